"""timm integration: registered names, pretrained cfgs, parameter counts, loading official-format
checkpoints (with resizing) through ``timm.create_model``, the timm model API, and safetensors export."""
from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import timm
import torch
from timm.data import resolve_data_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import models  # noqa: E402,F401  (registers the timm names)
from config import load_config  # noqa: E402
from models import build_model  # noqa: E402
from models.registry import CONFIG_DIR, VARIANTS, checkpoint_filter_fn  # noqa: E402
from test_fixtures import FIXTURES, check_logits, rel_err  # noqa: E402
from test_param_counts import OFFICIAL_PARAMS  # noqa: E402
from checkpoint import CheckpointError  # noqa: E402
from utils import _resize_position_table  # noqa: E402

DAT_PP = ['dat_pp_tiny', 'dat_pp_small', 'dat_pp_base', 'dat_pp_base_384', 'dat_plus_tiny']
DAT_V1 = ['dat_v1_tiny', 'dat_v1_small', 'dat_v1_base', 'dat_v1_base_384']
OFFICIAL_FILES = {
    'dat_pp_tiny': 'dat_pp_t_in1k_224.pth', 'dat_pp_small': 'dat_pp_s_in1k_224.pth',
    'dat_pp_base': 'dat_pp_b_in1k_224.pth', 'dat_pp_base_384': 'dat_pp_b_in1k_384.pth',
    'dat_v1_tiny': 'dat_tiny_in1k_224.pth', 'dat_v1_small': 'dat_small_in1k_224.pth',
    'dat_v1_base': 'dat_base_in1k_224.pth', 'dat_v1_base_384': 'dat_base_in1k_384.pth',
}
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f'official fixtures not found at {FIXTURES}')


def _yaml(name: str) -> Path:
    path = CONFIG_DIR / VARIANTS[name].cfg
    if not path.is_file():
        pytest.skip(f'{path.name} not written yet')
    return path


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@contextmanager
def _float64():
    """Build models in float64 so fixture weights load without rounding."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _write_official(tmp_path: Path, name: str, state_dict: dict, prefix: str = 'module.') -> str:
    """An official-format file: {'model': sd}, here with DataParallel names to be stripped."""
    path = tmp_path / f'{name}.pth'
    torch.save({'model': {prefix + k: v for k, v in state_dict.items()}, 'epoch': 299}, path)
    return str(path)


# ----------------------------------------------------------------------------- registration
def test_all_names_registered() -> None:
    assert set(DAT_PP + DAT_V1 + ['dat_custom']) == set(timm.list_models('dat*'))


@pytest.mark.parametrize('name', DAT_PP + DAT_V1)
def test_pretrained_cfg(name: str) -> None:
    cfg = timm.models.get_pretrained_cfg(name)
    assert cfg.file == OFFICIAL_FILES.get(name)          # dat_plus_tiny: no released weights
    assert not cfg.url and not cfg.hf_hub_id              # nothing is ever downloaded
    size = 384 if name.endswith('_384') else 224
    assert cfg.input_size == (3, size, size)
    assert cfg.crop_pct == (1.0 if size == 384 else 0.875)
    assert cfg.interpolation == 'bicubic' and cfg.num_classes == 1000
    assert cfg.first_conv == 'patch_proj.0' and cfg.classifier == 'cls_head'
    data = resolve_data_config(pretrained_cfg=cfg.to_dict())
    assert data['input_size'] == (3, size, size) and data['mean'] == (0.485, 0.456, 0.406)


@pytest.mark.parametrize('name', DAT_PP + DAT_V1)
def test_eval_settings_match_yaml(name: str) -> None:
    """The registry's input size / crop pct are those the training config evaluates with."""
    config = load_config(str(_yaml(name)))
    assert VARIANTS[name].img_size == config.DATA.IMG_SIZE
    assert VARIANTS[name].crop_pct == (0.875 if config.TEST.CROP else 1.0)


@pytest.mark.parametrize('name', DAT_PP + DAT_V1)
def test_param_count_equals_yaml_model(name: str) -> None:
    path = _yaml(name)
    model = timm.create_model(name, pretrained=False)
    reference = build_model(load_config(str(path)))
    assert {k: v.shape for k, v in model.state_dict().items()} == \
           {k: v.shape for k, v in reference.state_dict().items()}
    assert _n_params(model) == _n_params(reference)
    official = OFFICIAL_PARAMS.get(path.stem)
    if official is not None:
        assert _n_params(model) == official
    assert model.pretrained_cfg['architecture'] == name
    # first_conv / classifier name real modules (timm adapts them on load)
    assert isinstance(model.get_submodule('patch_proj.0'), torch.nn.Conv2d)
    assert model.get_classifier() is model.get_submodule('cls_head')


def test_kwargs_override_yaml() -> None:
    model = timm.create_model('dat_plus_tiny', num_classes=7, drop_path_rate=0.0)
    assert model.cls_head.out_features == 7
    assert all(isinstance(dp, torch.nn.Identity) for s in model.stages for dp in s.drop_path)
    with pytest.raises(ValueError, match='in_chans'):
        timm.create_model('dat_plus_tiny', in_chans=1)


# ----------------------------------------------------------------------------- loading checkpoints
@needs_fixtures
@pytest.mark.parametrize('folder,name', [('dat_official', 'mini_pp'), ('dat_official', 'mini_window'),
                                         ('dat_official', 'mini_mix'), ('dat_official', 'mini_qna'),
                                         ('dat_v1_official', 'v1_mini')])
def test_fixture_loads_through_timm(tmp_path: Path, folder: str, name: str) -> None:
    """timm.create_model(pretrained=True) on an official-format file reproduces the official logits."""
    data = torch.load(FIXTURES / folder / f'{name}.pt', weights_only=True)
    ckpt = _write_official(tmp_path, name, data['state_dict'])
    extra = {'deform_arith': 'v1'} if folder == 'dat_v1_official' else {}
    with _float64():
        model = timm.create_model('dat_custom', cfg_file=str(FIXTURES / folder / f'{name}.yaml'), pretrained=True,
                                  pretrained_cfg_overlay=dict(file=ckpt), attn_impl='reference', **extra)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    for key, value in data['state_dict'].items():       # strict: every tensor came from the file
        assert torch.equal(model.state_dict()[key], value), key
    check_logits(model, data)


@needs_fixtures
def test_fixture_features_only_loads_through_timm(tmp_path: Path) -> None:
    data = torch.load(FIXTURES / 'dat_official' / 'mini_pp.pt', weights_only=True)
    ckpt = _write_official(tmp_path, 'mini_pp', data['state_dict'])
    yaml = str(FIXTURES / 'dat_official' / 'mini_pp.yaml')
    with _float64():
        features = timm.create_model('dat_custom', cfg_file=yaml, pretrained=True, features_only=True,
                                     pretrained_cfg_overlay=dict(file=ckpt), attn_impl='reference').eval()
        reference = build_model(load_config(yaml, opts=['MODEL.ATTN_IMPL', 'reference'])).eval()
    reference.load_state_dict(data['state_dict'])
    x = data['inputs'][0]
    with torch.no_grad():
        for ours, expected in zip(features(x), reference.forward_stages(x)[0]):
            assert rel_err(ours, expected) <= 1e-12


@needs_fixtures
def test_new_num_classes_drops_head_and_keeps_backbone(tmp_path: Path) -> None:
    data = torch.load(FIXTURES / 'dat_official' / 'mini_pp.pt', weights_only=True)
    ckpt = _write_official(tmp_path, 'mini_pp', data['state_dict'], prefix='')
    model = timm.create_model('dat_custom', cfg_file=str(FIXTURES / 'dat_official' / 'mini_pp.yaml'),
                              pretrained=True, pretrained_cfg_overlay=dict(file=ckpt), num_classes=3)
    assert model.cls_head.out_features == 3
    assert torch.equal(model.patch_proj[0].weight, data['state_dict']['patch_proj.0.weight'].float())


@needs_fixtures
def test_filter_resizes_tables_for_another_resolution(tmp_path: Path) -> None:
    """A 64-pixel checkpoint into a model built for 96: position tables resized bicubically,
    resolution buffers kept from the model, everything else copied."""
    data = torch.load(FIXTURES / 'dat_official' / 'mini_window.pt', weights_only=True)
    sd = data['state_dict']
    yaml = str(FIXTURES / 'dat_official' / 'mini_window.yaml')
    small = load_config(yaml).MODEL.DAT.img_size
    big = small + 224          # window attention needs multiples of 7 * 32
    model = timm.create_model('dat_custom', cfg_file=yaml, img_size=big)
    filtered = checkpoint_filter_fn({'model': {'module.' + k: v for k, v in sd.items()}}, model)
    own = model.state_dict()
    assert set(filtered) == set(own)
    resized = [k for k in sd if sd[k].shape != own[k].shape]
    assert any(k.endswith('rpe_table') for k in resized)
    for k in resized:
        leaf = k.rsplit('.', 1)[-1]
        if leaf in ('relative_position_index', 'attn_mask'):
            assert torch.equal(filtered[k], own[k])
        else:
            assert torch.equal(filtered[k], _resize_position_table(k, sd[k], own[k].shape))
    for k in set(sd) - set(resized):
        assert torch.equal(filtered[k], sd[k])
    path = _write_official(tmp_path, 'mini_window', sd)
    loaded = timm.create_model('dat_custom', cfg_file=yaml, img_size=big, pretrained=True,
                               pretrained_cfg_overlay=dict(file=path))
    key = 'stages.2.attns.1.rpe_table'
    assert loaded.state_dict()[key].shape == own[key].shape != sd[key].shape
    assert torch.equal(loaded.state_dict()[key], filtered[key].float())


@needs_fixtures
def test_filter_refuses_fixed_tables_and_foreign_shapes() -> None:
    data = torch.load(FIXTURES / 'dat_official' / 'mini_mix.pt', weights_only=True)
    yaml = str(FIXTURES / 'dat_official' / 'mini_mix.yaml')
    config = load_config(yaml)
    if not any(config.MODEL.DAT.fixed_pes):
        pytest.skip('mini_mix has no fixed position table')
    model = timm.create_model('dat_custom', cfg_file=yaml, img_size=config.MODEL.DAT.img_size * 2)
    with pytest.raises(ValueError, match='fixed_pes') as info:
        checkpoint_filter_fn(data['state_dict'], model)
    assert '\n' not in str(info.value)
    other = timm.create_model('dat_plus_tiny')
    mini_pp = timm.create_model('dat_custom', cfg_file=str(FIXTURES / 'dat_official' / 'mini_pp.yaml'))
    with pytest.raises(ValueError, match='does not fit') as info:
        checkpoint_filter_fn({'model': other.state_dict()}, mini_pp)
    assert 'patch_proj.0.weight' in str(info.value) and '\n' not in str(info.value)


def test_registered_name_loads_its_own_checkpoint(tmp_path: Path) -> None:
    """A released-format file for a registered name (here dat_pp_tiny's own weights) loads strictly."""
    torch.manual_seed(0)
    source = timm.create_model('dat_pp_tiny')
    path = _write_official(tmp_path, 'dat_pp_t_in1k_224', source.state_dict())
    torch.manual_seed(1)
    model = timm.create_model('dat_pp_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=path))
    expected = source.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert model.pretrained_cfg['file'] == path


def test_pretrained_needs_a_local_readable_file(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match='pretrained_cfg_overlay'):
        timm.create_model('dat_plus_tiny', pretrained=True)
    with pytest.raises(FileNotFoundError, match='dat_pp_t_in1k_224.pth'):
        timm.create_model('dat_pp_tiny', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'dat_pp_t_in1k_224.pth')))
    pickled = tmp_path / 'pickled.pth'
    torch.save({'model': {}, 'config': argparse_like()}, pickled)
    with pytest.raises(CheckpointError, match='convert_checkpoint'):
        timm.create_model('dat_custom', cfg_file=str(ROOT / 'configs' / 'demo.yaml'), pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(pickled)))


class argparse_like:    # noqa: N801 - a stand-in for the yacs object official files pickle
    pass


# ----------------------------------------------------------------------------- timm model API
def test_timm_model_api() -> None:
    torch.manual_seed(0)
    model = timm.create_model('dat_custom', cfg_file=str(ROOT / 'configs' / 'demo.yaml'), num_classes=5).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, model.num_features, 2, 3)
        pooled = model.forward_head(feats, pre_logits=True)
        assert pooled.shape == (2, model.num_features)
        assert torch.allclose(model.forward_head(feats), model(x))
        assert torch.allclose(model.cls_head(pooled), model(x))
        model.reset_classifier(11)
        assert model(x).shape == (2, 11) and model.num_classes == 11
        model.reset_classifier(0)
        assert torch.allclose(model(x), pooled)
    assert isinstance(model.no_weight_decay(), set)
    assert {'rpe_table', 'relative_position_bias_table'} <= model.no_weight_decay_keywords()

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


# ----------------------------------------------------------------------------- safetensors export
def _export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / 'tools' / 'export_safetensors.py'), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'})


@needs_fixtures
def test_safetensors_export_loads_through_timm(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    data = torch.load(FIXTURES / 'dat_official' / 'mini_pp.pt', weights_only=True)
    ckpt = _write_official(tmp_path, 'mini_pp', data['state_dict'])
    out = tmp_path / 'mini_pp.safetensors'
    run = _export('--ckpt', ckpt, '--out', str(out))
    assert run.returncode == 0, run.stderr
    assert 'round-trip check passed' in run.stdout
    weights = load_file(str(out))
    assert set(weights) == set(data['state_dict'])                   # 'module.' stripped, weights only
    assert all(torch.equal(weights[k], v) for k, v in data['state_dict'].items())
    with _float64():
        model = timm.create_model('dat_custom', cfg_file=str(FIXTURES / 'dat_official' / 'mini_pp.yaml'),
                                  pretrained=True, pretrained_cfg_overlay=dict(file=str(out)), attn_impl='reference')
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
