"""DeBiFormer: equal to the official release (float64 fixtures), exact parameter counts, the timm
API, input-size errors, the fused attention path, FLOPs, and one real training run."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import timm
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conftest import REPO, TINY_DATA_OPTS, EXACT_OPTS, fixture_dir, float64_default, load_ckpt, rel_err, run_main  # noqa: E402
from config import load_config  # noqa: E402
from models import build_model  # noqa: E402
from models.debiformer import (DeBiFormer, _route, checkpoint_filter_fn,  # noqa: E402
                               valid_input_sides)

RTOL = 1e-9
FIXTURES = ('mini_base_pad', 'mini_small_g2', 'mini_tiny_g1')
# Official constructor keywords the model takes; the fixture JSONs also list inert ones.
MODEL_KEYS = ('depth', 'embed_dim', 'qk_dims', 'mlp_ratios', 'param_size', 'drop_path_rate', 'n_win', 'topks',
              'head_dim', 'side_dwconv', 'before_attn_dwconv', 'auto_pad', 'num_classes', 'in_chans')
# debiformer_facts.md section 9: parameters of the released configurations.
OFFICIAL_PARAMS = {'debiformer_tiny': 21_495_598, 'debiformer_small': 44_008_028, 'debiformer_base': 95_501_926}
# A small model with every block kind at 64x64 (maps 16/8/4/2, one 2x2 agent grid per stage).
SMALL = dict(depth=(1, 1, 1, 1), embed_dim=(64, 128, 256, 512), n_win=2, num_classes=5)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_fixture(name: str, **overrides):
    folder = fixture_dir('debiformer_official')
    spec = json.loads((folder / f'{name}.json').read_text())
    data = torch.load(folder / f'{name}.pt', weights_only=True)
    assert data['dtype'] == 'float64'
    kwargs = {key: spec['kwargs'][key] for key in MODEL_KEYS}
    model = DeBiFormer(**kwargs, **overrides).double()
    model.load_state_dict(data['state_dict'], strict=True)
    return model, data, spec


def check_grads(model, data) -> None:
    """Eval-mode gradients (BatchNorm on running stats), as the fixtures were made. Key biases of
    the agent attention have a mathematically zero gradient: compare against a floor."""
    model.eval()
    model.zero_grad(set_to_none=True)
    (model(data['inputs'][0]) * data['grad_output']).sum().backward()
    params = dict(model.named_parameters())
    assert set(data['grads']) == set(params)
    largest = max(g.abs().max().item() for g in data['grads'].values())
    for name, expected in data['grads'].items():
        grad = params[name].grad
        grad = torch.zeros_like(expected) if grad is None else grad
        err = rel_err(grad, expected, floor=1e-6 * largest)
        assert err <= RTOL, f'grad of {name}: relative error {err:.3e}'


# ----------------------------------------------------------------------------- official equivalence
def test_fixture_folder_complete() -> None:
    assert sorted(p.stem for p in fixture_dir('debiformer_official').glob('*.pt')) == list(FIXTURES)


@pytest.mark.parametrize('name', FIXTURES)
def test_fixture_logits_and_grads(name: str) -> None:
    model, data, spec = load_fixture(name)
    assert n_params(model) == spec['generation']['n_params']
    model.eval()
    with torch.no_grad():
        for x, expected in zip(data['inputs'], data['logits']):
            err = rel_err(model(x), expected)
            assert err <= RTOL, f'logits for input {tuple(x.shape)}: relative error {err:.3e}'
    check_grads(model, data)


def test_fused_attention_equals_reference_on_fixture() -> None:
    """The SDPA path (any device with attn_impl='fused') gives the official logits and gradients too."""
    model, data, _ = load_fixture('mini_small_g2', attn_impl='fused')
    model.eval()
    with torch.no_grad():
        for x, expected in zip(data['inputs'], data['logits']):
            assert rel_err(model(x), expected) <= RTOL
    check_grads(model, data)
    model, data, _ = load_fixture('mini_base_pad', attn_impl='fused')      # padded map and agent grid
    with torch.no_grad():
        assert rel_err(model.eval()(data['inputs'][1]), data['logits'][1]) <= RTOL


def test_fused_equals_reference_when_every_region_is_routed() -> None:
    """n_win=2: most attentions route to all 4 regions (one attention over all pixels), the first
    BRA to one region (gathered); fused and reference agree, on a padded input too."""
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for auto_pad, inputs in ((False, x), (True, x[:1, :, :50, :61])):
        torch.manual_seed(0)
        with float64_default():
            model = DeBiFormer(depth=(1, 1, 0, 0), embed_dim=(64, 128, 16, 16), n_win=2, auto_pad=auto_pad).eval()
        with torch.no_grad():
            expected = model(inputs)
            for module in model.modules():
                if hasattr(module, 'attn_impl'):
                    module.attn_impl = 'fused'
            assert rel_err(model(inputs), expected) <= RTOL


# ----------------------------------------------------------------------------- sizes and names
@pytest.mark.parametrize('name', sorted(OFFICIAL_PARAMS))
def test_param_counts_of_configs(name: str) -> None:
    config = load_config(str(REPO / 'configs' / f'{name}.yaml'))
    with torch.device('meta'):
        assert n_params(build_model(config)) == OFFICIAL_PARAMS[name]


def test_official_state_dict_names() -> None:
    """Spot checks against the official names and shapes (debiformer_facts.md section 8)."""
    with torch.device('meta'):
        sd = timm.create_model('debiformer_tiny').state_dict()
        small = timm.create_model('debiformer_small')
        assert build_model(load_config(str(REPO / 'configs' / 'debiformer_tiny.yaml'))).state_dict().keys() == sd.keys()
    params = [k for k in sd if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))]
    assert (len(params), len(sd) - len(params)) == (460, 18)
    assert len(list(small.parameters())) == 1037
    shapes = {
        'downsample_layers.0.0.weight': (32, 3, 3, 3), 'downsample_layers.0.4.running_var': (64,),
        'downsample_layers.3.0.weight': (512, 256, 3, 3), 'norm.num_batches_tracked': (),
        'head.weight': (1000, 512), 'stages.0.0.attn1.qkv.qkv.weight': (192, 64),
        'stages.0.0.attn1.wo.weight': (64, 64), 'stages.0.0.attn2.rpe_table': (2, 111, 111),
        'stages.0.0.attn2.qkv_conv.qkv.weight': (192, 64, 1, 1),
        'stages.0.0.attn2.conv_offset_q.0.weight': (64, 1, 9, 9),
        'stages.0.0.attn2.conv_offset_q.1.norm.weight': (64,),
        'stages.0.0.attn2.conv_offset_q.3.weight': (1, 64, 1, 1),
        'stages.0.0.attn2.mlp.linear1.0.weight': (192, 64, 1, 1), 'stages.0.0.mlp2.dwc.weight': (192, 1, 3, 3),
        'stages.3.0.attn1.rpe_table': (16, 13, 13), 'stages.3.0.attn1.conv_offset_q.0.weight': (64, 1, 3, 3),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert tuple(small.state_dict()['stages.3.0.attn2.mlp.linear1.0.weight'].shape) == (512, 512, 1, 1)
    assert 'stages.3.0.attn1.wo.weight' not in sd       # topks -2: two deformable attentions


def test_valid_input_sides_and_size_error() -> None:
    with torch.device('meta'):
        model = timm.create_model('debiformer_tiny')
    assert valid_input_sides(model, 700) == [221, 222, 223, 224, 445, 446, 447, 448, 669, 670, 671, 672]
    x = torch.zeros(1, 3, 232, 224, device='meta')
    with pytest.raises(ValueError, match=r'input height 232 .*nearest sides that work: 224 or 445') as info:
        model(x)
    assert '\n' not in str(info.value)
    assert model(torch.zeros(1, 3, 221, 448, device='meta')).shape == (1, 1000)     # H and W independent
    with pytest.raises(ValueError, match='input width 64'):
        timm.create_model('debiformer_tiny', img_size=(224, 64))


def test_auto_pad_takes_any_size() -> None:
    torch.manual_seed(0)
    model = DeBiFormer(**{**SMALL, 'auto_pad': True}).eval()
    for size in ((50, 77), (33, 33), (64, 64)):
        with torch.no_grad():
            out = model(torch.randn(1, 3, *size))
        assert out.shape == (1, 5) and torch.isfinite(out).all()


@pytest.mark.parametrize('kwargs, match', [
    (dict(embed_dim=(48, 128, 256, 512)), 'no agent constants for stage 1 width 48'),
    (dict(param_size='huge'), "param_size 'huge'"),
    (dict(topks=(4, 8, 16, -1)), r'topks\[3\]=-1'),
    (dict(qk_dims=(32, 128, 256, 512)), 'qk_dims'),
    (dict(before_attn_dwconv=5), 'before_attn_dwconv=5'),
    (dict(head_dim=128), 'stage 1 width 64 with head_dim 128'),
])
def test_constructor_errors_name_the_problem(kwargs, match) -> None:
    with torch.device('meta'), pytest.raises(ValueError, match=match):
        DeBiFormer(**kwargs)


def test_topk_above_region_count_routes_to_all_regions() -> None:
    """With fewer regions than the stage's top-k, every region is routed (the release raises)."""
    q, k = torch.randn(2, 4, 3, 8), torch.randn(2, 4, 5, 8)
    index = _route(q, k, 0.5, 49)
    assert index.shape == (2, 4, 4)
    assert (index.sort(-1).values == torch.arange(4)).all()
    torch.manual_seed(0)
    model = DeBiFormer(**SMALL).eval()        # n_win=2: the stage top-k values 8, 16 and 49 exceed 4 regions
    with torch.no_grad():
        for x in (torch.randn(2, 3, 64, 64), torch.zeros(1, 3, 64, 64)):
            assert torch.isfinite(model(x)).all()


def test_grad_checkpointing_gives_the_same_gradients() -> None:
    grads = []
    for enable in (False, True):
        torch.manual_seed(0)
        with float64_default():
            model = DeBiFormer(depth=(1, 1, 0, 0), embed_dim=(64, 128, 16, 16), n_win=2, num_classes=3)
        model.set_grad_checkpointing(enable)
        model.train()
        model(torch.ones(2, 3, 64, 64, dtype=torch.float64)).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert torch.allclose(grads[1][name], g, rtol=1e-10, atol=1e-14), name


# ----------------------------------------------------------------------------- timm API
def test_registered_names_and_cfgs() -> None:
    assert timm.list_models('debiformer*') == ['debiformer_base', 'debiformer_small', 'debiformer_tiny']
    for name in OFFICIAL_PARAMS:
        cfg = timm.models.get_pretrained_cfg(name)
        assert not cfg.url and not cfg.hf_hub_id and not cfg.file      # nothing advertises weights
        assert cfg.input_size == cfg.min_input_size == (3, 224, 224)
    with torch.device('meta'):
        model = timm.create_model('debiformer_small', num_classes=100, drop_path_rate=0.1)
    assert model.head.out_features == 100       # keywords are honoured (the release ignores them)
    assert model.stages[3][2].drop_path1.drop_prob == pytest.approx(0.1)


def test_features_only_and_forward_intermediates() -> None:
    torch.manual_seed(0)
    feats = timm.create_model('debiformer_tiny', features_only=True, depth=(1, 1, 1, 1), n_win=2).eval()
    assert feats.feature_info.channels() == [64, 128, 256, 512]
    assert feats.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        outs = feats(torch.randn(1, 3, 64, 128))
    assert [tuple(o.shape[1:]) for o in outs] == [(64, 16, 32), (128, 8, 16), (256, 4, 8), (512, 2, 4)]

    model = DeBiFormer(**SMALL).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert torch.allclose(final, model.forward_features(x))
        assert len(inter) == 4 and torch.allclose(model.norm(inter[-1]), final)
        pooled = model.forward_head(final, pre_logits=True)
    assert pooled.shape == (1, 512)
    model.reset_classifier(0, '')
    assert model(x).shape == (1, 512, 2, 2)


def test_pretrained_from_local_official_file(tmp_path: Path) -> None:
    """An official-format file ({'model': ...} with DataParallel names) loads through timm."""
    folder = fixture_dir('debiformer_official')
    data = torch.load(folder / 'mini_tiny_g1.pt', weights_only=True)
    path = tmp_path / 'debi_mini.pth'
    torch.save({'model': {'module.' + k: v for k, v in data['state_dict'].items()}, 'epoch': 299}, path)
    with float64_default():
        model = timm.create_model('debiformer_tiny', pretrained=True, num_classes=10,
                                  pretrained_cfg_overlay=dict(file=str(path), num_classes=10),
                                  depth=(1, 0, 0, 0), embed_dim=(64, 32, 32, 32), topks=(-2, -2, -2, -2))
    model.eval()
    with torch.no_grad():
        assert rel_err(model(data['inputs'][0]), data['logits'][0]) <= RTOL
    assert checkpoint_filter_fn({'state_dict': {'_orig_mod.module.a': 1}}, model) == {'a': 1}
    with pytest.raises(RuntimeError, match='needs a local checkpoint'):
        timm.create_model('debiformer_tiny', pretrained=True)


def test_rpe_tables_are_weight_decayed_like_the_official_recipe() -> None:
    from optimizer import parameter_groups
    with torch.device('meta'):
        model = DeBiFormer(**SMALL)
    groups = {g['name']: g['param_names'] for g in parameter_groups(model, 0.1)}
    assert 'stages.0.0.attn2.rpe_table' in groups['decay']
    assert 'stages.0.0.attn2.proj_k.bias' in groups['no_decay']


def test_flops_count_attention_and_sampling() -> None:
    """GMACs of debiformer_tiny: the official fvcore count (2.654 G) without its norms (0.014 G)."""
    from tools.flops import count_flops
    config = load_config(str(REPO / 'configs' / 'debiformer_tiny.yaml'))
    with torch.device('meta'):
        model = build_model(config)
    result = count_flops(model, 224)
    assert result['params'] == OFFICIAL_PARAMS['debiformer_tiny']
    assert result['gmacs'] == pytest.approx(2.640, abs=0.003)
    # fvcore's linear (0.309 G) + matmul (0.087 G) + einsum (0.054 G): projections and both attentions
    assert result['macs_by_kind']['matmul'] == pytest.approx(0.450e9, rel=0.005)
    # agent sampling (4 taps x C x 7 x 7 per DBRA) and the sampled bias (4 x heads x HW x 49)
    assert result['macs_by_kind']['grid_sample'] == pytest.approx(3.82e6, rel=0.01)


# ----------------------------------------------------------------------------- training
@pytest.mark.slow
def test_main_trains_and_evaluates_a_tiny_debiformer(tmp_path: Path, tiny_data: str) -> None:
    opts = ['MODEL.TYPE', 'debiformer', 'MODEL.DEBI.depth', '[1,1,1,1]', 'MODEL.DEBI.n_win', '2',
            'MODEL.DEBI.drop_path_rate', '0.1', 'DATA.IMG_SIZE', '64', 'DATA.BATCH_SIZE', '4',
            'TRAIN.EPOCHS', '1', 'TRAIN.WARMUP_EPOCHS', '0', 'PRINT_FREQ', '1', 'TENSORBOARD', 'False',
            *EXACT_OPTS, *TINY_DATA_OPTS]
    run = run_main(['--data-path', tiny_data, '--opts', *opts], tmp_path, tag='debi').check()
    assert len(run.accuracies()) == 1
    ckpt = load_ckpt(run.output / 'ckpt_epoch_0.pth')
    assert ckpt['model']['stages.0.0.attn2.rpe_table'].shape == (2, 111, 111)
    assert ckpt['model']['head.weight'].shape == (3, 512)
    evaluated = run_main(['--data-path', tiny_data, '--eval', '--resume', str(run.output / 'ckpt_epoch_0.pth'),
                          '--opts', *opts], tmp_path, tag='debi-eval').check()
    assert evaluated.accuracies() == run.accuracies()
    bad = run_main(['--data-path', tiny_data, '--opts', *opts, 'DATA.IMG_SIZE', '72'], tmp_path, tag='bad')
    assert bad.returncode == 2 and 'nearest sides that work: 64 or 125' in bad.stderr


def test_routing_attentions_compile_with_torchscript() -> None:
    """timm's model tests script DeBiFormer: its attention modules must stay TorchScript-able."""
    from models.debiformer import BiLevelRoutingAttention
    attn = BiLevelRoutingAttention(dim=16, num_heads=2, n_win=2, topk=2).eval()
    x = torch.randn(1, 4, 4, 16)
    with torch.no_grad():
        assert torch.allclose(torch.jit.script(attn)(x), attn(x), atol=1e-6)
