"""Config loading: official YAMLs load unchanged; bad keys and types fail in one line."""
from pathlib import Path

import pytest

from config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / 'shared' / 'fixtures'


@pytest.mark.parametrize('name', sorted(p.name for p in (ROOT / 'configs').glob('*.yaml')))
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(str(ROOT / 'configs' / name))
    assert cfg.MODEL.TYPE == 'dat'


@pytest.mark.skipif(not FIXTURES.is_dir(), reason='../shared/fixtures not present')
def test_fixture_yamls_load_unchanged() -> None:
    for path in sorted(FIXTURES.glob('*/*.yaml')):
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
