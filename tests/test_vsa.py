"""ViTAEv2-VSA: equal to the official implementation (float64 fixtures), exact parameter counts,
the float32 reference grid, input sizes, and the timm model API."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import timm
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import models  # noqa: E402,F401  (registers the timm names)
from config import load_config  # noqa: E402
from conftest import MODEL_NAME, fixture_dir, load_ckpt, rel_err, run_main  # noqa: E402
from models import build_model  # noqa: E402
from models.vitaev2_vsa import VSA_VARIANTS, ViTAEv2VSA, VSAttention, checkpoint_filter_fn, reference_grid  # noqa: E402

RTOL = 1e-9
FIXTURES = ('mini_s', 'mini_wide')
CONFIGS = ROOT / 'configs'

# vsa_facts.md section 9 (measured on the official code) and section 7 (state-dict entries).
OFFICIAL_PARAMS = {
    'vitaev2_vsa_s': (19_773_300, 672),
    'vitaev2_vsa_widepcm_s': (20_342_442, 672),
    'vitaev2_vsa_widepcm_48m': (51_089_119, 780),
    'vitaev2_vsa_widepcm_b': (93_711_532, 816),
    'vitaev2_vsa_widepcm_b_ws12': (93_833_932, 816),
}


def load(name: str, **opts: str):
    folder = fixture_dir('vsa_official')
    data = torch.load(folder / f'{name}.pt', weights_only=True)
    assert data['dtype'] == 'float64'
    extra = [x for kv in opts.items() for x in kv]
    config = load_config(str(folder / f'{name}.yaml'), opts=['MODEL.ATTN_IMPL', 'reference', *extra])
    model = build_model(config).double()
    model.load_state_dict(data['state_dict'], strict=True)
    return model.eval(), data


def small(**kwargs) -> ViTAEv2VSA:
    """A small VSA-S layout (CPE, grouped PCMs, per-stage heads) for API tests."""
    cfg = dict(embed_dims=[8, 8, 16, 16], token_dims=[8, 16, 32, 32], RC_heads=[1, 2, 2, 4], NC_heads=[2, 2, 4, 4],
               NC_depth=[1, 1, 1, 1], RC_group=[1, 2, 4, 8], NC_group=[1, 4, 8, 8], wide_pcm=False, cpe=True,
               window_size=2, img_size=64, num_classes=5)
    cfg.update(kwargs)
    return ViTAEv2VSA(**cfg)


# ----------------------------------------------------------------------------- official fixtures
@pytest.mark.parametrize('name', FIXTURES)
def test_fixture(name: str) -> None:
    """Logits, stage outputs, every gradient, train-mode logits and the reference grids."""
    model, data = load(name)
    with torch.no_grad():
        for x, expected in zip(data['inputs'], data['logits']):
            assert rel_err(model(x), expected) <= RTOL
        _, maps = model.forward_intermediates(data['inputs'][0][:1])
    for i, (ours, theirs) in enumerate(zip(maps, data['stage_outputs'])):
        assert rel_err(ours.flatten(2).transpose(1, 2), theirs) <= RTOL, f'stage {i}'

    (model(data['inputs'][0]) * data['grad_output']).sum().backward()
    params = dict(model.named_parameters())
    assert set(params) == set(data['grads'])
    for pname, expected in data['grads'].items():
        assert rel_err(params[pname].grad, expected) <= RTOL, pname

    # BatchNorm with batch statistics in every PCM: train-mode logits differ from eval-mode ones.
    with torch.no_grad():
        out = copy.deepcopy(model).train()(data['inputs'][0])
    assert rel_err(out, data['logits_train']) <= RTOL
    assert rel_err(out, data['logits'][0]) > 1e-6

    # The model was converted to float64; its reference grids are still the official float32 ones.
    for module_name, grids in data['grids'].items():
        attn = model.get_submodule(module_name)
        assert attn.base_grid.dtype == torch.float32
        assert torch.equal(attn.base_grid, grids['base_coords']), module_name
        assert torch.equal(attn.rel_grid, grids['coords']), module_name
    # The same grid built in float64 misses the official logits by far more than 1e-9.
    for attn in (m for m in model.modules() if isinstance(m, VSAttention)):
        _, _, nh, ws, nw, _ = attn.base_grid.shape
        attn.base_grid, attn.rel_grid = _float64_grid(nh * ws, nw * ws, ws)
    with torch.no_grad():
        assert rel_err(model(data['inputs'][0]), data['logits'][0]) > 1e-8


def _float64_grid(hp: int, wp: int, ws: int):
    """The grid in exact float64 arithmetic: (base, rel), each (1, 2, nh, ws, nw, ws)."""
    nh, nw = hp // ws, wp // ws
    cx = torch.linspace(-1, 1, wp, dtype=torch.float64).view(nw, ws).mean(1).view(1, 1, nw, 1)
    cy = torch.linspace(-1, 1, hp, dtype=torch.float64).view(nh, ws).mean(1).view(nh, 1, 1, 1)
    rx = torch.arange(ws, dtype=torch.float64) * 2 / (wp - 1)
    ry = torch.arange(ws, dtype=torch.float64) * 2 / (hp - 1)
    rx, ry = (rx - rx.mean()).view(1, 1, 1, ws), (ry - ry.mean()).view(1, ws, 1, 1)
    zero = torch.zeros(nh, ws, nw, ws, dtype=torch.float64)
    rel = torch.stack([rx + zero, ry + zero]).unsqueeze(0)
    base = torch.stack([cx + zero, cy + zero]).unsqueeze(0) + rel
    return base, rel


def test_fused_attention_equals_reference() -> None:
    model, data = load('mini_wide')
    for attn in (m for m in model.modules() if isinstance(m, VSAttention)):
        attn.attn_impl = 'fused'          # scaled_dot_product_attention, also on the CPU
    with torch.no_grad():
        assert rel_err(model(data['inputs'][0]), data['logits'][0]) <= 1e-12


# ----------------------------------------------------------------------------- variants
@pytest.mark.parametrize('name', sorted(OFFICIAL_PARAMS))
def test_param_counts(name: str) -> None:
    params, entries = OFFICIAL_PARAMS[name]
    model = timm.create_model(name, device='meta')
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.state_dict()) == entries


@pytest.mark.parametrize('name', sorted(VSA_VARIANTS))
def test_config_builds_the_registered_variant(name: str) -> None:
    """configs/<name>.yaml repeats the registered keywords (so it builds the same model)."""
    config = load_config(str(CONFIGS / f'{name}.yaml'))
    assert config.MODEL.TYPE == 'vitaev2_vsa' and config.MODEL.NAME == name
    for key, value in VSA_VARIANTS[name].items():
        assert config.MODEL.VSA[key] == value, key
    assert config.DATA.IMG_SIZE == config.MODEL.VSA.img_size == VSA_VARIANTS[name].get('img_size', 224)
    # the official recipe (vsa_facts.md section 12); learning rates per 512 images at batch 1024
    t = config.TRAIN
    assert (t.EPOCHS, t.WARMUP_EPOCHS, t.BASE_LR, t.WARMUP_LR, t.MIN_LR) == (300, 10, 5e-4, 5e-7, 5e-6)
    assert (t.CLIP_GRAD, t.EMA.ENABLE, t.EMA.DECAY, config.SEED) == (0.0, True, 0.99992, 42)
    recipe = {'vitaev2_vsa_s': (0.05, 0.1, 128), 'vitaev2_vsa_widepcm_48m': (0.055, 0.25, 64)}
    if name in recipe:
        assert (t.WEIGHT_DECAY, config.MODEL.VSA.drop_path_rate, config.DATA.BATCH_SIZE) == recipe[name]


def test_drop_path_follows_the_official_slicing() -> None:
    """Stage i takes dpr[NC_depth[i-1] : NC_depth[i-1] + NC_depth[i]] (not the cumulative depth)."""
    model = timm.create_model('vitaev2_vsa_s', drop_path_rate=0.1, device='meta')
    dpr = torch.linspace(0, 0.1, 14).tolist()
    rates = [[cell.drop_path.drop_prob if cell.drop_path.__class__.__name__ == 'DropPath' else 0.0
              for cell in stage.NC] for stage in model.layers]
    assert rates == [dpr[0:2], dpr[2:4], dpr[2:10], dpr[8:10]]
    assert max(max(r) for r in rates) == pytest.approx(0.0692, abs=1e-4)


def test_reduction_cells_have_no_drop_path_and_official_eps() -> None:
    model = small(drop_path_rate=0.5, drop_rate=0.3)
    for stage in model.layers:
        assert stage.RC.norm1.eps == 1e-5 and stage.RC.norm2.eps == 1e-5
        assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in stage.RC.modules())
        assert all(cell.norm1.eps == 1e-6 for cell in stage.NC)


# ----------------------------------------------------------------------------- input sizes
def test_other_input_size_equals_a_model_built_for_it() -> None:
    torch.manual_seed(0)
    built_64 = small().double().eval()
    built_96 = small(img_size=96).double().eval()
    built_96.load_state_dict(built_64.state_dict())
    x = torch.randn(1, 3, 96, 96, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(built_64(x), built_96(x))
        # non-square inputs work too (the official model asserts square)
        assert built_64(torch.randn(2, 3, 64, 96, dtype=torch.float64)).shape == (2, 5)


@pytest.mark.parametrize('size,minimum', [(192, 224), (240, 224), (100, 224)])
def test_sizes_the_official_model_cannot_take_fail_clearly(size: int, minimum: int) -> None:
    model = timm.create_model('vitaev2_vsa_s', num_classes=3, device='meta')
    with pytest.raises(ValueError, match=f'multiples of 32 and at least {minimum}.*got {size}x{size}'):
        model(torch.zeros(1, 3, size, size, device='meta'))


def test_window_12_needs_384() -> None:
    cfg = timm.models.get_pretrained_cfg('vitaev2_vsa_widepcm_b_ws12')
    assert cfg.input_size == cfg.min_input_size == (3, 384, 384) and cfg.pool_size == (12, 12)
    model = small(window_size=12, img_size=384, device='meta')
    with pytest.raises(ValueError, match='at least 384'):
        model(torch.zeros(1, 3, 224, 224, device='meta'))


def test_attention_refuses_maps_smaller_than_the_window() -> None:
    attn = VSAttention(8, 8, 2, 7, (14, 14))
    with pytest.raises(ValueError, match='smaller than window_size 7'):
        attn(torch.zeros(1, 36, 8), 6, 6)


def test_grid_keeps_float32_under_dtype_and_device_moves() -> None:
    model = small()
    attn = model.layers[0].RC.attn
    base = attn.base_grid.clone()
    model.double()
    model.to(torch.bfloat16)
    assert attn.base_grid.dtype == torch.float32 and torch.equal(attn.base_grid, base)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    model.to('meta')
    assert attn.base_grid.device.type == 'meta'


def test_reference_grid_without_scale_or_offset_is_the_window() -> None:
    base, rel = reference_grid(14, 14, 7)
    # window (0, 1), pixel (2, 3): x of column 7 + 3 = 10, y of row 2, in [-1, 1] coordinates
    assert base[0, 0, 0, 2, 1, 3].item() == pytest.approx(-1 + 2 * 10 / 13, abs=1e-6)
    assert base[0, 1, 0, 2, 1, 3].item() == pytest.approx(-1 + 2 * 2 / 13, abs=1e-6)
    assert rel.sum().abs().item() < 1e-5


# ----------------------------------------------------------------------------- timm API
def test_features_only_and_intermediates() -> None:
    assert timm.create_model('vitaev2_vsa_s', features_only=True, device='meta').feature_info.channels() == \
        [64, 128, 256, 512]
    tiny = dict(embed_dims=[8, 8, 16, 16], token_dims=[8, 16, 32, 32], RC_heads=1, NC_heads=2, NC_depth=1,
                RC_group=1, NC_group=1, window_size=2, img_size=64)
    model = timm.create_model('vitaev2_vsa_s', features_only=True, out_indices=(1, 2, 3), **tiny)
    assert model.feature_info.channels() == [16, 32, 32]
    assert model.feature_info.reduction() == [8, 16, 32]
    outs = model(torch.zeros(2, 3, 96, 64))
    assert [tuple(o.shape) for o in outs] == [(2, 16, 12, 8), (2, 32, 6, 4), (2, 32, 3, 2)]

    net = small().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        last, maps = net.forward_intermediates(x)
        assert torch.equal(last, net.forward_features(x)) and torch.equal(maps[-1], last)
        assert [m.shape[1] for m in maps] == [8, 16, 32, 32]
        assert len(net.forward_intermediates(x, indices=2, intermediates_only=True)) == 2


def test_head_api() -> None:
    net = small().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pre = net.forward_head(net.forward_features(x), pre_logits=True)
        assert pre.shape == (2, 32) and net.get_classifier().out_features == 5
        net.reset_classifier(0)
        assert torch.equal(net(x), pre)
        net.reset_classifier(0, '')
        assert net(x).shape == (2, 32, 2, 2)
        net.reset_classifier(7, 'avg')
        assert net(x).shape == (2, 7)
    assert net.no_weight_decay() == set()      # official: the bias tables are decayed
    with pytest.raises(TypeError):
        timm.create_model('vitaev2_vsa_s', not_a_model_arg=1)


def test_grad_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    net = small(drop_path_rate=0.0).double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)

    def grads():
        net.zero_grad()
        net(x).square().sum().backward()
        return [p.grad.clone() for p in net.parameters()]

    plain = grads()
    net.set_grad_checkpointing(True)
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-14) for a, b in zip(plain, grads()))


def test_pretrained_needs_a_local_file(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match='no published weights'):
        timm.create_model('vitaev2_vsa_s', pretrained=True)
    with pytest.raises(FileNotFoundError, match='not found'):
        timm.create_model('vitaev2_vsa_s', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'missing.pth')))


def test_official_checkpoint_loads_through_timm(tmp_path: Path) -> None:
    model, data = load('mini_s')
    kwargs = {k: v for k, v in dict(load_config(str(fixture_dir('vsa_official') / 'mini_s.yaml')).MODEL.VSA).items()}
    path = tmp_path / 'official.pth'
    # a timm-trainer file: 'state_dict' (and EMA), DataParallel names
    torch.save({'state_dict': {'module.' + k: v for k, v in data['state_dict'].items()}, 'epoch': 309}, path)
    kwargs.pop('num_classes')
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        loaded = timm.create_model('vitaev2_vsa_s', pretrained=True, num_classes=10,
                                   pretrained_cfg_overlay=dict(file=str(path), num_classes=10), **kwargs).eval()
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        assert rel_err(loaded(data['inputs'][0]), data['logits'][0]) <= RTOL


def test_filter_resizes_bias_tables_for_another_window() -> None:
    src = small(window_size=2)
    dst = small(window_size=3, img_size=96)
    sd = checkpoint_filter_fn({'model': src.state_dict()}, dst)
    dst.load_state_dict(sd, strict=True)
    assert sd['layers.0.RC.attn.relative_position_bias_table'].shape == (25, 1)


# ----------------------------------------------------------------------------- training entry point
@pytest.mark.slow
def test_trains_and_evaluates_through_main(tmp_path: Path, tiny_data: str) -> None:
    """``main.py`` with MODEL.TYPE vitaev2_vsa on the demo config: one epoch of a tiny VSA model."""
    opts = ['MODEL.TYPE', 'vitaev2_vsa', 'MODEL.NUM_CLASSES', '3', 'MODEL.VSA.num_classes', '3',
            'MODEL.VSA.img_size', '64', 'MODEL.VSA.window_size', '2', 'MODEL.VSA.embed_dims', '[8,8,16,16]',
            'MODEL.VSA.token_dims', '[8,16,32,32]', 'MODEL.VSA.RC_heads', '[1,2,2,4]',
            'MODEL.VSA.NC_heads', '[2,2,4,4]', 'MODEL.VSA.NC_depth', '[1,1,1,1]', 'MODEL.VSA.NC_group', '[1,4,8,8]',
            'MODEL.VSA.RC_group', '[1,2,4,8]', 'MODEL.VSA.cpe', 'True', 'MODEL.VSA.drop_path_rate', '0.1',
            'DATA.BATCH_SIZE', '4', 'TRAIN.EPOCHS', '1', 'TRAIN.WARMUP_EPOCHS', '0', 'TRAIN.EMA.ENABLE', 'True',
            'TENSORBOARD', 'False', 'DATA.NUM_WORKERS', '0']
    run = run_main(['--data-path', tiny_data, '--opts', *opts], tmp_path, tag='vsa').check()
    assert 'creating model vitaev2_vsa/' in run.log()
    assert run.accuracies(), run.stdout[-2000:]
    ckpt = load_ckpt(tmp_path / MODEL_NAME / 'vsa' / 'ckpt_epoch_0.pth')
    assert 'layers.0.RC.attn.sampling_offsets.2.weight' in ckpt['model'] and 'ema' in ckpt


# ----------------------------------------------------------------------------- FLOPs
def test_flops_count_window_attention_and_sampling() -> None:
    """tools/flops.py: per VSA module, 4 taps per resampled key/value channel, and q.k + attn.v as
    matmuls (2 * Hp*Wp * ws^2 * out_dim), next to the linears; exact for a padded layout."""
    from tools.flops import count_flops
    model = small(window_size=3, img_size=128)         # maps 32/16/8/4 -> padded 33/18/9/6
    sizes, linear = {}, 0
    for name, module in model.named_modules():
        if isinstance(module, VSAttention):
            stage = int(name.split('.')[1])
            sizes[name] = (128 // 2 ** (stage + 2), module)
    for stage, layer in enumerate(model.layers):
        tokens = (128 // 2 ** (stage + 2)) ** 2
        linear += sum(tokens * m.in_features * m.out_features for m in layer.modules()
                      if isinstance(m, torch.nn.Linear))
    linear += model.head.in_features * model.head.out_features
    sampling = attention = 0
    for side, attn in sizes.values():
        padded = -(-side // 3) * 3
        sampling += 4 * 2 * attn.out_dim * padded ** 2
        attention += 2 * padded ** 2 * 9 * attn.out_dim
    result = count_flops(model, 128)
    assert result['macs_by_kind']['grid_sample'] == sampling
    assert result['macs_by_kind']['matmul'] == linear + attention
