"""Config loading: official YAMLs load unchanged; bad keys and types fail in one line."""
from pathlib import Path

import pytest

import argparse

from config import RANGES, ConfigError, default_config, get_config, load_config
from conftest import SHARED_FIXTURES, fixture_dir

ROOT = Path(__file__).resolve().parents[1]
# The model family a shipped config's file name announces.
FAMILY_BY_PREFIX = {'dat': 'dat', 'demo': 'dat', 'debiformer': 'debiformer', 'vitaev2': 'vitaev2_vsa',
                    'davit': 'timm'}


@pytest.mark.parametrize('name', sorted(p.name for p in (ROOT / 'configs').glob('*.yaml')))
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(str(ROOT / 'configs' / name))
    assert cfg.MODEL.TYPE == FAMILY_BY_PREFIX[name.split('_')[0].split('.')[0]]


def test_fixture_yamls_load_unchanged() -> None:
    fixture_dir('dat_official')
    for path in sorted(SHARED_FIXTURES.glob('*/*.yaml')):
        cfg = load_config(str(path))
        assert cfg.MODEL.NAME == path.stem


def test_official_values_and_string_floats() -> None:
    cfg = load_config(str(ROOT / 'configs' / 'dat_base_384.yaml'))
    # PyYAML reads "2e-05" as a string; it must arrive as the float.
    assert cfg.TRAIN.BASE_LR == pytest.approx(2e-5) and isinstance(cfg.TRAIN.BASE_LR, float)
    assert cfg.DATA.IMG_SIZE == 384 and cfg.MODEL.DAT.img_size == 224 and cfg.TEST.CROP is False
    tiny = load_config(str(ROOT / 'configs' / 'dat_tiny.yaml'))
    assert tiny.MODEL.DAT.stage_spec[3] == ['D', 'D'] and tiny.MODEL.DAT.nat_ksizes == [7, 7, 7, 7]


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / 'cfg.yaml'
    path.write_text(text)
    return str(path)


def test_misspelt_key_names_key_and_file(tmp_path: Path) -> None:
    path = _write(tmp_path, 'MODEL:\n  DAT:\n    drop_pth_rate: 0.1\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "MODEL.DAT.drop_pth_rate" in msg and path in msg and 'drop_path_rate' in msg
    assert '\n' not in msg


def test_misspelt_top_level_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'TRIAN'"):
        load_config(_write(tmp_path, 'TRIAN:\n  EPOCHS: 3\n'))


def test_wrong_value_type(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"TRAIN.EPOCHS' expects int"):
        load_config(_write(tmp_path, 'TRAIN:\n  EPOCHS: many\n'))


def test_int_accepted_for_float_and_opts_override(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, 'TRAIN:\n  BASE_LR: 1\n'), opts=['DATA.BATCH_SIZE', '7', 'MODEL.DAT.dims', '[8, 16, 32, 64]'])
    assert cfg.TRAIN.BASE_LR == 1.0 and isinstance(cfg.TRAIN.BASE_LR, float)
    assert cfg.DATA.BATCH_SIZE == 7 and cfg.MODEL.DAT.dims == [8, 16, 32, 64]
    with pytest.raises(ConfigError, match="unknown config key 'DATA.BATCH'"):
        load_config(opts=['DATA.BATCH', '7'])


def test_base_inheritance(tmp_path: Path) -> None:
    (tmp_path / 'base.yaml').write_text('TRAIN:\n  EPOCHS: 11\n  WARMUP_EPOCHS: 2\n')
    child = tmp_path / 'child.yaml'
    child.write_text("BASE: ['base.yaml']\nTRAIN:\n  EPOCHS: 5\n")
    cfg = load_config(str(child))
    assert cfg.TRAIN.EPOCHS == 5 and cfg.TRAIN.WARMUP_EPOCHS == 2


def test_missing_file_and_bad_choice(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match='config file not found'):
        load_config(str(tmp_path / 'nope.yaml'))
    with pytest.raises(ConfigError, match="MODEL.DAT.deform_arith"):
        load_config(opts=['MODEL.DAT.deform_arith', 'v3'])


# ----------------------------------------------------------------------------- value ranges
def _numeric_keys(node, prefix=''):
    for key, value in node.items():
        if hasattr(value, 'items'):
            # Other model families' constructor sections validate their own keywords.
            if prefix == 'MODEL.' and key != 'DAT':
                continue
            yield from _numeric_keys(value, prefix + key + '.')
        elif isinstance(value, (int, float)) and not isinstance(value, bool) or (
                isinstance(value, (list, tuple)) and value and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            yield prefix + key


def test_every_numeric_key_has_a_range_and_the_defaults_are_in_it() -> None:
    missing = [k for k in _numeric_keys(default_config()) if k not in RANGES]
    assert not missing, f"numeric config keys without a range in config.RANGES: {missing}"
    load_config()                                     # the defaults pass their own checks


RANGE_CASES = [
    (['SAVE_FREQ', '0'], 'SAVE_FREQ', '>= 1'),
    (['PRINT_FREQ', '0'], 'PRINT_FREQ', '>= 1'),
    (['TRAIN.ACCUMULATION_STEPS', '0'], 'TRAIN.ACCUMULATION_STEPS', '>= 1'),
    (['DATA.BATCH_SIZE', '0'], 'DATA.BATCH_SIZE', '>= 1'),
    (['DATA.BATCH_SIZE', '-4'], 'DATA.BATCH_SIZE', '>= 1'),
    (['DATA.NUM_WORKERS', '-1'], 'DATA.NUM_WORKERS', '>= 0'),
    (['DATA.IMG_SIZE', '16'], 'DATA.IMG_SIZE', '>= 32 for this model'),
    (['TRAIN.BASE_LR', '-0.1'], 'TRAIN.BASE_LR', '>= 0'),
    (['TRAIN.EPOCHS', '5', 'TRAIN.WARMUP_EPOCHS', '5'], 'TRAIN.WARMUP_EPOCHS', '< TRAIN.EPOCHS (5)'),
    (['AUG.REPROB', '1.5'], 'AUG.REPROB', 'in [0, 1]'),
    (['MODEL.DAT.drop_path_rate', '1.0'], 'MODEL.DAT.drop_path_rate', 'in [0, 1)'),
    (['MODEL.DAT.dims', '[8, 0, 32, 64]'], 'MODEL.DAT.dims', '>= 1 for every element'),
    (['MODEL.DAT.groups', '[-1, 0, 3, 6]'], 'MODEL.DAT.groups', '-1 or >= 1'),
    (['MODEL.NUM_CLASSES', '0'], 'MODEL.NUM_CLASSES', '>= 1'),
    (['TRAIN.OPTIMIZER.BETAS', '(0.9,)'], 'TRAIN.OPTIMIZER.BETAS', 'a list of 2 numbers'),
    (['AUG.CUTMIX_MINMAX', '[0.8, 0.2]'], 'AUG.CUTMIX_MINMAX', 'min < max'),
    (['SEED', '-1'], 'SEED', '>= 0'),
    (['TRAIN.EMA.DECAY', '2.0'], 'TRAIN.EMA.DECAY', 'in [0, 1]'),
    (['TEST.RESIZE_MODE', 'stretch'], 'TEST.RESIZE_MODE', "one of ['square', 'shorter_side']"),
]


@pytest.mark.parametrize('opts, key, expected', RANGE_CASES, ids=[c[1] + '=' + c[0][-1] for c in RANGE_CASES])
def test_out_of_range_values_are_one_line_errors(opts, key, expected) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(opts=opts)
    msg = str(err.value)
    assert msg.startswith('--opts: ') and f"'{key}'" in msg and expected in msg and '\n' not in msg


def test_range_error_names_the_file_or_the_flag(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cfg.yaml: config key 'SAVE_FREQ' is 0; it must be >= 1"):
        load_config(_write(tmp_path, 'SAVE_FREQ: 0\n'))
    args = argparse.Namespace(cfg=None, opts=None, batch_size=0, print_freq=None)
    with pytest.raises(ConfigError, match=r"^--batch-size: config key 'DATA.BATCH_SIZE' is 0"):
        get_config(args)
    args = argparse.Namespace(cfg=None, opts=None, batch_size=7, print_freq=3)
    cfg = get_config(args)
    assert cfg.DATA.BATCH_SIZE == 7 and cfg.PRINT_FREQ == 3
    with pytest.raises(ConfigError, match=r"^--print-freq: config key 'PRINT_FREQ' is 0"):
        get_config(argparse.Namespace(cfg=None, opts=None, print_freq=0))


# ----------------------------------------------------------------------------- number of classes
def test_num_classes_is_one_setting() -> None:
    tiny = str(ROOT / 'configs' / 'dat_tiny.yaml')            # sets MODEL.DAT.num_classes only
    assert load_config(tiny).MODEL.NUM_CLASSES == 1000
    for key in ('MODEL.NUM_CLASSES', 'MODEL.DAT.num_classes'):  # a later source sets both
        cfg = load_config(tiny, opts=[key, '10'])
        assert cfg.MODEL.NUM_CLASSES == cfg.MODEL.DAT.num_classes == 10
    demo = load_config(str(ROOT / 'configs' / 'demo.yaml'), opts=['MODEL.NUM_CLASSES', '3'])
    assert demo.MODEL.DAT.num_classes == 3
    with pytest.raises(ConfigError, match=r"--opts: MODEL.NUM_CLASSES is 3 but MODEL.DAT.num_classes is 4"):
        load_config(opts=['MODEL.NUM_CLASSES', '3', 'MODEL.DAT.num_classes', '4'])


def test_num_classes_disagreeing_in_one_file(tmp_path: Path) -> None:
    path = _write(tmp_path, 'MODEL:\n  NUM_CLASSES: 10\n  DAT:\n    num_classes: 100\n')
    with pytest.raises(ConfigError, match=r"cfg.yaml: MODEL.NUM_CLASSES is 10 but MODEL.DAT.num_classes is 100"):
        load_config(path)
    (tmp_path / 'base.yaml').write_text('MODEL:\n  DAT:\n    num_classes: 100\n')
    child = tmp_path / 'child.yaml'
    child.write_text("BASE: base.yaml\nMODEL:\n  NUM_CLASSES: 10\n")
    cfg = load_config(str(child))                            # the child overrides its base
    assert cfg.MODEL.NUM_CLASSES == cfg.MODEL.DAT.num_classes == 10


def test_unused_swin_drop_keys_point_to_the_model_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'MODEL.DROP_PATH_RATE' is not used by DAT; set 'MODEL.DAT.drop_path_rate'"):
        load_config(opts=['MODEL.DROP_PATH_RATE', '0.3'])
    with pytest.raises(ConfigError, match=r"'MODEL.DROP_RATE' is not used by DAT; set 'MODEL.DAT.drop_rate'"):
        load_config(_write(tmp_path, 'MODEL:\n  DROP_RATE: 0.1\n'))


# ----------------------------------------------------------------------------- files
def test_base_cycle_is_one_line(tmp_path: Path) -> None:
    (tmp_path / 'a.yaml').write_text("BASE: ['b.yaml']\nTRAIN:\n  EPOCHS: 3\n")
    (tmp_path / 'b.yaml').write_text("BASE: ['a.yaml']\nTRAIN:\n  EPOCHS: 4\n")
    with pytest.raises(ConfigError, match=r"BASE files include each other \(.*a.yaml -> .*b.yaml -> .*a.yaml\)"):
        load_config(str(tmp_path / 'a.yaml'))
    (tmp_path / 'self.yaml').write_text("BASE: self.yaml\nSEED: 1\n")
    with pytest.raises(ConfigError, match=r"BASE files include each other"):
        load_config(str(tmp_path / 'self.yaml'))


def test_base_as_string_and_bad_base(tmp_path: Path) -> None:
    (tmp_path / 'base.yaml').write_text('TRAIN:\n  EPOCHS: 11\n  WARMUP_EPOCHS: 1\n')
    (tmp_path / 'child.yaml').write_text('BASE: base.yaml\nSEED: 3\n')
    cfg = load_config(str(tmp_path / 'child.yaml'))
    assert cfg.TRAIN.EPOCHS == 11 and cfg.SEED == 3
    with pytest.raises(ConfigError, match=r"^--opts: config key 'TRAIN.EPOCHS' is 10; it must be > TRAIN.WARMUP_EPOCHS \(20\)"):
        load_config(opts=['TRAIN.EPOCHS', '10'])
    (tmp_path / 'lost.yaml').write_text('BASE: [nowhere.yaml]\nSEED: 3\n')
    with pytest.raises(ConfigError, match=r"config file not found: '.*nowhere.yaml' \(in BASE of '.*lost.yaml'\)"):
        load_config(str(tmp_path / 'lost.yaml'))
    (tmp_path / 'odd.yaml').write_text('BASE: {a: 1}\nSEED: 3\n')
    with pytest.raises(ConfigError, match=r"odd.yaml: BASE must be a file name or a list of file names"):
        load_config(str(tmp_path / 'odd.yaml'))


@pytest.mark.parametrize('text, where, problem', [
    ('TRAIN:\n  EPOCHS: [1, 2\nSEED: 3\n', 'line 3, column 5', "expected ',' or ']'"),
    ('TRAIN:\n\tEPOCHS: 3\n', 'line 2, column 1', 'cannot start any token'),
    ('TRAIN:\n  EPOCHS: 3\n  EPOCHS: 4\n', 'line 3, column 3', "key 'EPOCHS' appears twice (first on line 2)"),
])
def test_yaml_errors_name_file_and_line(tmp_path: Path, text, where, problem) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}, {where}: not valid YAML (") and problem in msg and '\n' not in msg


@pytest.mark.parametrize('text', ['', '# only a comment\n', '{}\n'])
def test_empty_config_file_is_an_error(tmp_path: Path, text) -> None:
    with pytest.raises(ConfigError, match=r"cfg.yaml: the file is empty \(no config keys\)"):
        load_config(_write(tmp_path, text))
