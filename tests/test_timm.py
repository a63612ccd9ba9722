"""timm integration: registered names built from code equal the configs, pretrained cfgs, the one
checkpoint filter on every loading path (timm, ``load_pretrained``), the timm model API, a
standalone ``models/`` package, and safetensors export. timm's own suite: tools/timm_model_tests.sh."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.data import resolve_data_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import models  # noqa: E402,F401  (registers the timm names)
from config import load_config  # noqa: E402
from models import (RELEASED_FILES, VARIANTS, CheckpointMismatchError, build_model, checkpoint_filter_fn,  # noqa: E402
                    create_from_yaml, load_pretrained)
from models.build import official_dat_kwargs, position_encoding  # noqa: E402
from models.dat import resize_position_table  # noqa: E402
from conftest import SHARED_FIXTURES as FIXTURES, float64_default, needs_fixtures, rel_err  # noqa: E402
from test_fixtures import check_logits  # noqa: E402
from test_param_counts import OFFICIAL_PARAMS  # noqa: E402

CONFIG_DIR = ROOT / 'configs'
DAT_PP = ['dat_pp_tiny', 'dat_pp_small', 'dat_pp_base', 'dat_pp_base_384', 'dat_plus_tiny']
DAT_V1 = ['dat_v1_tiny', 'dat_v1_small', 'dat_v1_base', 'dat_v1_base_384']
DEMO = str(CONFIG_DIR / 'demo.yaml')


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _write_official(tmp_path: Path, name: str, state_dict: dict, prefix: str = 'module.') -> str:
    """An official-format file: {'model': sd}, here with DataParallel names to be stripped."""
    path = tmp_path / f'{name}.pth'
    torch.save({'model': {prefix + k: v for k, v in state_dict.items()}, 'epoch': 299}, path)
    return str(path)


def _fixture(folder: str, name: str):
    return torch.load(FIXTURES / folder / f'{name}.pt', weights_only=True), str(FIXTURES / folder / f'{name}.yaml')


# ----------------------------------------------------------------------------- registration
def test_all_names_registered_and_none_advertises_weights() -> None:
    assert set(DAT_PP + DAT_V1) == set(timm.list_models('dat_*')) == set(VARIANTS)
    assert not set(timm.list_models('dat_*', pretrained=True))      # nothing to download


@pytest.mark.parametrize('name', DAT_PP + DAT_V1)
def test_pretrained_cfg(name: str) -> None:
    cfg = timm.models.get_pretrained_cfg(name)
    assert not cfg.file and not cfg.url and not cfg.hf_hub_id
    size = 384 if name.endswith('_384') else 224
    assert cfg.input_size == (3, size, size) and cfg.pool_size == (size // 32, size // 32)
    assert cfg.crop_pct == (1.0 if size == 384 else 0.875)
    assert cfg.interpolation == 'bicubic' and cfg.num_classes == 1000
    assert cfg.first_conv == 'patch_proj.0' and cfg.classifier == 'cls_head'
    data = resolve_data_config(pretrained_cfg=cfg.to_dict())
    assert data['input_size'] == (3, size, size) and data['mean'] == (0.485, 0.456, 0.406)


def _resolved(kwargs: dict) -> dict:
    """Constructor keywords with DAT's defaults filled in, sequences as lists."""
    import inspect
    from models import DAT
    defaults = {k: p.default for k, p in inspect.signature(DAT).parameters.items()}
    out = {**defaults, **kwargs}
    out['lower_lr_kvs'] = dict(out['lower_lr_kvs'] or {})
    return {k: [list(x) if isinstance(x, (list, tuple, str)) else x for x in v] if isinstance(v, (list, tuple)) else v
            for k, v in out.items()}


@pytest.mark.parametrize('name', DAT_PP + DAT_V1)
def test_registered_name_equals_its_config(name: str) -> None:
    """The architecture written in code is exactly the one of configs/<name>.yaml: every constructor
    keyword, and the config's evaluation settings."""
    from models.build import dat_kwargs
    config = load_config(str(CONFIG_DIR / VARIANTS[name].config))
    assert _resolved(dict(VARIANTS[name].kwargs)) == _resolved(dat_kwargs(config))
    assert VARIANTS[name].img_size == config.DATA.IMG_SIZE
    assert VARIANTS[name].crop_pct == (0.875 if config.TEST.CROP else 1.0)


@pytest.mark.parametrize('name', ['dat_pp_tiny', 'dat_v1_tiny'])
def test_registered_model_equals_config_model(name: str) -> None:
    """Built, the two give the same modules (with their settings) and tensor shapes."""
    path = CONFIG_DIR / VARIANTS[name].config
    with torch.device('meta'):                  # structure only: no memory, no init time
        ours = timm.create_model(name)
        reference = build_model(load_config(str(path)))
    assert repr(ours) == repr(reference)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert _n_params(ours) == OFFICIAL_PARAMS.get(path.stem, _n_params(reference))
    assert ours.pretrained_cfg['architecture'] == name


def test_position_encoding_translation() -> None:
    """The official booleans map to one named choice; offsets off means no position term."""
    assert position_encoding(False, True, True, True, False) == 'none'
    assert position_encoding(True, False, False, False, True) == 'none'
    assert position_encoding(True, True, True, True, False) == 'dwc'
    assert position_encoding(True, False, True, True, False) == 'fixed'
    assert position_encoding(True, False, False, True, False) == 'log_cpb'
    assert position_encoding(True, False, False, False, False) == 'table'
    kwargs = official_dat_kwargs({'use_pes': [True, True, False, True], 'no_offs': [False, True, False, False],
                                  'log_cpb': [False, False, False, True], 'ns_per_pts': [4] * 4, 'dims': [1, 2, 3, 4]})
    assert kwargs == {'dims': [1, 2, 3, 4], 'pos_encs': ['table', 'none', 'none', 'log_cpb'],
                      'no_offs': [False, True, False, False]}
    with pytest.raises(ValueError, match='use_pes'):
        official_dat_kwargs({'use_pes': [True]})


def test_unknown_and_official_only_keywords_are_refused() -> None:
    with pytest.raises(TypeError):
        timm.create_model('dat_plus_tiny', not_a_model_arg=1)
    with pytest.raises(TypeError):          # official booleans belong to configs, not to DAT
        timm.create_model('dat_plus_tiny', use_pes=[True] * 4)
    with pytest.raises(ValueError, match='pos_encs'):
        timm.create_model('dat_plus_tiny', pos_encs=['table', 'table', 'table', 'rope'])
    with pytest.raises(ValueError, match='needs offsets'):
        timm.create_model('dat_plus_tiny', no_offs=[True] * 4)
    with pytest.raises(ValueError, match='attn_impl'):
        timm.create_model('dat_plus_tiny', attn_impl='flash')


def test_models_package_imports_nothing_from_the_project_root() -> None:
    root_modules = {p.stem for p in ROOT.glob('*.py')} | {p.name for p in ROOT.iterdir() if (p / '__init__.py').is_file()}
    root_modules -= {'models'}
    for path in (ROOT / 'models').glob('*.py'):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name.split('.')[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [] if node.level else [node.module.split('.')[0]]
            else:
                continue
            assert not set(names) & root_modules, f'{path.name} imports {set(names) & root_modules} from the root'


@pytest.mark.slow
def test_every_name_builds_without_configs_on_disk(tmp_path: Path) -> None:
    """A copy of models/ alone (no configs/, config.py or utils.py beside it) creates every name."""
    import shutil
    shutil.copytree(ROOT / 'models', tmp_path / 'models', ignore=shutil.ignore_patterns('__pycache__'))
    code = ('import timm, torch, models\n'
            'for name in sorted(models.VARIANTS):\n'
            '    with torch.device("meta"):\n'
            '        timm.create_model(name)\n'
            'print("built", len(models.VARIANTS))\n')
    run = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, 'PYTHONPATH': str(tmp_path), 'OMP_NUM_THREADS': '1'})
    assert run.returncode == 0, run.stderr[-2000:]
    assert 'built 9' in run.stdout


# ----------------------------------------------------------------------------- timm model API
def test_timm_model_api() -> None:
    torch.manual_seed(0)
    model = create_from_yaml(DEMO, num_classes=5).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, model.num_features, 2, 3)
        pooled = model.forward_head(feats, pre_logits=True)
        assert pooled.shape == (2, model.head_hidden_size) and model.head_hidden_size == model.num_features
        assert torch.allclose(model.forward_head(feats), model(x))
        assert torch.allclose(model.cls_head(pooled), model(x))
        model.reset_classifier(11)
        assert model(x).shape == (2, 11) and model.num_classes == 11
        model.reset_classifier(0)
        assert torch.allclose(model(x), pooled)
        model.reset_classifier(0, '')                                   # no pooling either
        assert torch.equal(model(x), feats)
        model.reset_classifier(3, 'max')
        assert torch.equal(model.forward_head(feats, pre_logits=True), feats.amax((2, 3)))
    unpooled = create_from_yaml(DEMO, num_classes=0, global_pool='').eval()
    assert unpooled(x).shape == (2, unpooled.num_features, 2, 3)
    assert isinstance(model.no_weight_decay(), set)
    assert {'rpe_table', 'relative_position_bias_table'} <= model.no_weight_decay_keywords()

    model.reset_classifier(5, 'avg')

    def grads(checkpointing: bool):
        model.train()
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        model(x).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert all(s.grad_checkpointing for s in model.stages)
    assert plain.keys() == checkpointed.keys()
    for n in plain:
        assert torch.allclose(plain[n], checkpointed[n], rtol=1e-4, atol=1e-6), n


def test_fx_leaves_are_module_classes() -> None:
    # torchvision's FX tracer passes timm's leaf registry to isinstance(): one function in it breaks
    # FX feature extraction for every model, whichever module registered it.
    from timm.layers import get_notrace_modules
    bad = [m for m in get_notrace_modules() if not (isinstance(m, type) and issubclass(m, torch.nn.Module))]
    assert not bad, f'register_notrace_module given non-module classes: {bad}'


@pytest.mark.parametrize('name', ['dat_pp_tiny', 'dat_v1_tiny', 'vitaev2_vsa_s', 'debiformer_tiny'])
def test_fx_graph_node_names(name: str) -> None:
    from timm.models import get_graph_node_names
    train_nodes, eval_nodes = get_graph_node_names(timm.create_model(name, num_classes=3))
    assert train_nodes and eval_nodes


def test_in_chans() -> None:
    model = timm.create_model('dat_plus_tiny', in_chans=1, num_classes=3).eval()
    assert model.patch_proj[0].in_channels == 1 and model.in_chans == 1
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 64)).shape == (1, 3)


@pytest.mark.parametrize('name', ['dat_v1_tiny', 'dat_pp_tiny'])
def test_any_input_size(name: str) -> None:
    """Window blocks pad maps that are not multiples of the window (as Swin does); nothing is fixed-size."""
    model = timm.create_model(name, num_classes=4).eval()
    with torch.no_grad():
        for size in ((96, 96), (100, 132)):
            out = model(torch.randn(1, 3, *size))
            assert out.shape == (1, 4) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- loading checkpoints
@needs_fixtures
@pytest.mark.parametrize('folder,name', [('dat_official', 'mini_pp'), ('dat_official', 'mini_window'),
                                         ('dat_official', 'mini_mix'), ('dat_official', 'mini_qna'),
                                         ('dat_v1_official', 'v1_mini')])
def test_fixture_loads_through_timm(tmp_path: Path, folder: str, name: str) -> None:
    """An official-format file loaded with pretrained=True reproduces the official logits."""
    data, yaml = _fixture(folder, name)
    ckpt = _write_official(tmp_path, name, data['state_dict'])
    extra = {'deform_arith': 'v1'} if folder == 'dat_v1_official' else {}
    with float64_default():
        model = create_from_yaml(yaml, pretrained=True, pretrained_cfg_overlay=dict(file=ckpt),
                                 attn_impl='reference', **extra)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    for key, value in data['state_dict'].items():       # strict: every tensor came from the file
        assert torch.equal(model.state_dict()[key], value), key
    check_logits(model, data)


@needs_fixtures
def test_load_pretrained_is_the_same_filter(tmp_path: Path) -> None:
    """models.load_pretrained (what main.py uses) on an official file gives the official logits."""
    data, yaml = _fixture('dat_official', 'mini_mix')
    with float64_default():
        model = create_from_yaml(yaml, attn_impl='reference')
    info = load_pretrained(model, _write_official(tmp_path, 'mini_mix', data['state_dict']), new_head_ok=False)
    assert info == dict(kept=[], resized=[])
    check_logits(model, data)


@needs_fixtures
def test_fixture_features_only_loads_through_timm(tmp_path: Path) -> None:
    data, yaml = _fixture('dat_official', 'mini_pp')
    ckpt = _write_official(tmp_path, 'mini_pp', data['state_dict'])
    with float64_default():
        features = create_from_yaml(yaml, pretrained=True, features_only=True, pretrained_cfg_overlay=dict(file=ckpt),
                                    attn_impl='reference').eval()
        reference = build_model(load_config(yaml, opts=['MODEL.ATTN_IMPL', 'reference'])).eval()
    reference.load_state_dict(data['state_dict'])
    x = data['inputs'][0]
    with torch.no_grad():
        for ours, expected in zip(features(x), reference.forward_stages(x)[0]):
            assert rel_err(ours, expected) <= 1e-12


@needs_fixtures
def test_new_num_classes_drops_head_or_maps_it(tmp_path: Path) -> None:
    data, yaml = _fixture('dat_official', 'mini_pp')
    sd = data['state_dict']
    ckpt = _write_official(tmp_path, 'mini_pp', sd, prefix='')
    model = create_from_yaml(yaml, pretrained=True, pretrained_cfg_overlay=dict(file=ckpt), num_classes=3)
    assert model.cls_head.out_features == 3
    assert torch.equal(model.patch_proj[0].weight, sd['patch_proj.0.weight'].float())

    fresh = create_from_yaml(yaml, num_classes=3)
    info = load_pretrained(fresh, ckpt)                       # no class map: the fresh head stays
    assert info['kept'] == ['cls_head.weight', 'cls_head.bias']
    with pytest.raises(CheckpointMismatchError, match='10 classes'):
        load_pretrained(create_from_yaml(yaml, num_classes=3), ckpt, new_head_ok=False)
    index_file = tmp_path / 'map.txt'
    index_file.write_text('7\n2 # a comment\n9\n')
    mapped = create_from_yaml(yaml, num_classes=3)
    load_pretrained(mapped, ckpt, class_map=index_file)
    assert torch.equal(mapped.cls_head.weight, sd['cls_head.weight'][[7, 2, 9]].float())
    with pytest.raises(CheckpointMismatchError, match='needs 3'):
        load_pretrained(create_from_yaml(yaml, num_classes=3), ckpt, class_map=torch.tensor([1, 2]))
    with pytest.raises(CheckpointMismatchError, match='below 10'):
        load_pretrained(create_from_yaml(yaml, num_classes=3), ckpt, class_map=torch.tensor([1, 2, 10]))


@needs_fixtures
def test_load_pretrained_adapts_the_first_conv(tmp_path: Path) -> None:
    data, yaml = _fixture('dat_official', 'mini_pp')
    ckpt = _write_official(tmp_path, 'mini_pp', data['state_dict'])
    gray = create_from_yaml(yaml, in_chans=1)
    load_pretrained(gray, ckpt)
    assert torch.allclose(gray.patch_proj[0].weight, data['state_dict']['patch_proj.0.weight'].sum(1, keepdim=True).float())
    via_timm = create_from_yaml(yaml, in_chans=1, pretrained=True, pretrained_cfg_overlay=dict(file=ckpt))
    assert torch.equal(via_timm.patch_proj[0].weight, gray.patch_proj[0].weight)


@needs_fixtures
def test_filter_resizes_tables_for_another_resolution(tmp_path: Path) -> None:
    """A 224-pixel checkpoint into a model built for 448: position tables resized bicubically,
    resolution buffers kept from the model, everything else copied."""
    data, yaml = _fixture('dat_official', 'mini_window')
    sd = data['state_dict']
    big = load_config(yaml).MODEL.DAT.img_size * 2
    model = create_from_yaml(yaml, img_size=big)
    filtered = checkpoint_filter_fn({'model': {'module.' + k: v for k, v in sd.items()}}, model)
    own = model.state_dict()
    assert set(filtered) == set(own)
    resized = [k for k in sd if sd[k].shape != own[k].shape]
    assert any(k.endswith('rpe_table') for k in resized)
    for k in resized:
        if k.rsplit('.', 1)[-1] in ('relative_position_index', 'attn_mask'):
            assert torch.equal(filtered[k], own[k])
        else:
            assert torch.equal(filtered[k], resize_position_table(k, sd[k], own[k].shape))
    for k in set(sd) - set(resized):
        assert torch.equal(filtered[k], sd[k])
    path = _write_official(tmp_path, 'mini_window', sd)
    loaded = create_from_yaml(yaml, img_size=big, pretrained=True, pretrained_cfg_overlay=dict(file=path))
    key = 'stages.2.attns.1.rpe_table'
    assert loaded.state_dict()[key].shape == own[key].shape != sd[key].shape
    assert torch.equal(loaded.state_dict()[key], filtered[key].float())
    info = load_pretrained(create_from_yaml(yaml, img_size=big), path)
    assert key in info['resized'] and 'stages.0.attns.1.attn_mask' in info['kept']


@needs_fixtures
def test_filter_refuses_fixed_tables_and_foreign_shapes() -> None:
    data, yaml = _fixture('dat_official', 'mini_mix')
    config = load_config(yaml)
    assert any(config.MODEL.DAT.fixed_pes)
    model = create_from_yaml(yaml, img_size=config.MODEL.DAT.img_size * 2)
    with pytest.raises(CheckpointMismatchError, match='fixed position table') as info:
        checkpoint_filter_fn(data['state_dict'], model)
    assert '\n' not in str(info.value)
    with torch.device('meta'):                  # only the shapes are read before the error
        other = timm.create_model('dat_plus_tiny')
    mini_pp = create_from_yaml(str(FIXTURES / 'dat_official' / 'mini_pp.yaml'))
    with pytest.raises(CheckpointMismatchError, match='does not fit') as info:
        checkpoint_filter_fn({'model': other.state_dict()}, mini_pp)
    assert 'patch_proj.0.weight' in str(info.value) and '\n' not in str(info.value)
    with pytest.raises(CheckpointMismatchError, match='no model weights'):
        checkpoint_filter_fn({'epoch': 3}, mini_pp)


def test_registered_name_loads_its_own_checkpoint(tmp_path: Path) -> None:
    """A released-format file for a registered name (here dat_pp_tiny's own weights) loads strictly."""
    torch.manual_seed(0)
    source = timm.create_model('dat_pp_tiny')
    path = _write_official(tmp_path, RELEASED_FILES['dat_pp_tiny'].removesuffix('.pth'), source.state_dict())
    torch.manual_seed(1)
    model = timm.create_model('dat_pp_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=path))
    expected = source.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert model.pretrained_cfg['file'] == path


def test_pretrained_needs_a_local_readable_file(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"pretrained_cfg_overlay=dict\(file='/path/to/dat_pp_t_in1k_224.pth'\)"):
        timm.create_model('dat_pp_tiny', pretrained=True)
    with pytest.raises(FileNotFoundError, match='dat_pp_t_in1k_224.pth'):
        timm.create_model('dat_pp_tiny', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'dat_pp_t_in1k_224.pth')))


# ----------------------------------------------------------------------------- safetensors export
def _export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / 'tools' / 'export_safetensors.py'), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'})


@pytest.mark.slow
@needs_fixtures
def test_safetensors_export_loads_through_timm(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    data, yaml = _fixture('dat_official', 'mini_pp')
    ckpt = _write_official(tmp_path, 'mini_pp', data['state_dict'])
    out = tmp_path / 'mini_pp.safetensors'
    run = _export('--ckpt', ckpt, '--out', str(out))
    assert run.returncode == 0, run.stderr
    assert 'round-trip check passed' in run.stdout
    weights = load_file(str(out))
    assert set(weights) == set(data['state_dict'])                   # 'module.' stripped, weights only
    assert all(torch.equal(weights[k], v) for k, v in data['state_dict'].items())
    with float64_default():
        model = create_from_yaml(yaml, pretrained=True, pretrained_cfg_overlay=dict(file=str(out)),
                                 attn_impl='reference')
    check_logits(model, data)


def test_safetensors_export_ema_and_errors(tmp_path: Path, capsys) -> None:
    from safetensors.torch import load_file
    from tools.export_safetensors import main as export_main

    model = {'w': torch.arange(6.).reshape(2, 3), 'b': torch.zeros(3)}
    model['t'] = model['w'].t()                                        # a view sharing storage
    ema = {'w': torch.ones(2, 3), 'b': torch.ones(3), 't': torch.ones(3, 2)}
    ckpt = tmp_path / 'ckpt_epoch_3.pth'
    torch.save({'model': model, 'ema': ema, 'epoch': 3, 'config': 'MODEL: {}'}, ckpt)

    out = tmp_path / 'w.safetensors'
    assert export_main(['--ckpt', str(ckpt), '--out', str(out)]) == 0
    assert all(torch.equal(load_file(str(out))[k], v) for k, v in model.items())
    out_ema = tmp_path / 'ema.safetensors'
    assert export_main(['--ckpt', str(ckpt), '--out', str(out_ema), '--ema']) == 0
    assert 'EMA' in capsys.readouterr().out
    assert all(torch.equal(load_file(str(out_ema))[k], v) for k, v in ema.items())

    torch.save({'model': model}, tmp_path / 'no_ema.pth')
    assert export_main(['--ckpt', str(tmp_path / 'no_ema.pth'), '--out', str(tmp_path / 'x.safetensors'),
                        '--ema']) == 2
    err = capsys.readouterr().err
    assert "no 'ema' weights" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / 'x.safetensors').exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith('.')] == []     # no temp files left


@pytest.mark.parametrize('name,cfg_name', [('dat_pp_tiny', 'dat_tiny.yaml'), ('dat_pp_base_384', 'dat_base_384.yaml')])
def test_timm_eval_transform_equals_the_projects(name, cfg_name):
    """timm's transform from the registered cfg (squash resize + centre crop) is the official one
    that --eval uses, pixel for pixel, on a non-square image."""
    import numpy as np
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    from data.build import build_transform
    model = timm.create_model(name, pretrained=False, device='meta')
    ours = build_transform(is_train=False, config=load_config(str(CONFIG_DIR / cfg_name)))
    theirs = create_transform(**resolve_data_config({}, model=model))
    img = Image.fromarray((np.random.RandomState(0).rand(300, 500, 3) * 255).astype('uint8'))
    assert torch.equal(theirs(img), ours(img))
