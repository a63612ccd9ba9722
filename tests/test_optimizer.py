"""Parameter grouping (weight decay, lower-lr keyword) and optimizer construction, checked by name."""
import pytest
import torch
import torch.nn as nn

from config import load_config
from conftest import REPO, fixture_dir
from optimizer import build_optimizer, parameter_groups
from checkpoint import atomic_save, load_checkpoint_file


class _Deform(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_q = nn.Conv2d(4, 4, 1)
        self.proj_k = nn.Conv2d(4, 4, 1)
        self.rpe_table = nn.Parameter(torch.zeros(2, 7, 7))


class _Window(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_qkv = nn.Linear(4, 12)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(9, 2))


class _Stage(nn.Module):
    def __init__(self):
        super().__init__()
        self.attns = nn.ModuleList([_Window(), _Deform()])
        self.layer_norms = nn.ModuleList([nn.LayerNorm(4)])


class TinyNet(nn.Module):
    """Parameter names shaped like DAT's, plus one name listed by no_weight_decay() and a frozen conv."""

    def __init__(self, lower_lr_kvs=None):
        super().__init__()
        self.stages = nn.ModuleList([_Stage()])
        self.x = nn.Linear(4, 4)
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, 4, 2, 2))
        self.frozen = nn.Conv2d(4, 4, 3)
        self.frozen.requires_grad_(False)
        self.lower_lr_kvs = lower_lr_kvs or {}

    def no_weight_decay(self):
        return {'absolute_pos_embed'}

    def no_weight_decay_keywords(self):
        return {'relative_position_bias_table', 'rpe_table'}


DECAY = {
    'stages.0.attns.0.proj_qkv.weight', 'stages.0.attns.1.proj_q.weight', 'stages.0.attns.1.proj_k.weight',
    'x.weight',
}
NO_DECAY = {
    'stages.0.attns.0.proj_qkv.bias', 'stages.0.attns.0.relative_position_bias_table',
    'stages.0.attns.1.proj_q.bias', 'stages.0.attns.1.proj_k.bias', 'stages.0.attns.1.rpe_table',
    'stages.0.layer_norms.0.weight', 'stages.0.layer_norms.0.bias', 'x.bias', 'absolute_pos_embed',
}


def _by_name(groups):
    return {g['name']: g for g in groups}


def _config(*opts):
    return load_config(opts=['TRAIN.BASE_LR', '0.001', 'TRAIN.WEIGHT_DECAY', '0.05', *opts])


def test_weight_decay_split_by_name():
    groups = _by_name(parameter_groups(TinyNet(), weight_decay=0.05))
    assert set(groups) == {'decay', 'no_decay'}
    assert set(groups['decay']['param_names']) == DECAY
    assert set(groups['no_decay']['param_names']) == NO_DECAY
    assert groups['decay']['weight_decay'] == 0.05 and groups['no_decay']['weight_decay'] == 0.0
    assert groups['decay']['lr_scale'] == groups['no_decay']['lr_scale'] == 1.0


def test_frozen_parameters_are_left_out():
    names = {n for g in parameter_groups(TinyNet(), weight_decay=0.05) for n in g['param_names']}
    assert not any(n.startswith('frozen.') for n in names)
    assert names == DECAY | NO_DECAY


def test_lower_lr_keyword_gets_scaled_groups():
    groups = _by_name(parameter_groups(TinyNet({'proj_k': 0.1}), weight_decay=0.05))
    assert groups['decay_lower_lr']['param_names'] == ['stages.0.attns.1.proj_k.weight']
    assert groups['no_decay_lower_lr']['param_names'] == ['stages.0.attns.1.proj_k.bias']
    assert groups['decay_lower_lr']['lr_scale'] == groups['no_decay_lower_lr']['lr_scale'] == 0.1
    assert groups['no_decay_lower_lr']['weight_decay'] == 0.0
    assert set(groups['decay']['param_names']) == DECAY - {'stages.0.attns.1.proj_k.weight'}
    assert groups['decay']['lr_scale'] == 1.0


@pytest.mark.parametrize('kvs', [{'proj_k': 0.1, 'proj_v': 0.1}, {'proj_k': 0}, {'': 0.5}])
def test_bad_lower_lr_kvs_is_a_one_line_error(kvs):
    with pytest.raises(ValueError, match='lower_lr_kvs') as info:
        parameter_groups(TinyNet(kvs), weight_decay=0.05)
    assert '\n' not in str(info.value)


def test_build_adamw_groups_carry_lr_scale_and_names():
    model = TinyNet({'proj_k': 0.1})
    opt = build_optimizer(_config('TRAIN.OPTIMIZER.EPS', '1e-6', 'TRAIN.OPTIMIZER.BETAS', '(0.8, 0.95)'), model)
    assert isinstance(opt, torch.optim.AdamW)
    params = dict(model.named_parameters())
    seen = []
    for g in opt.param_groups:
        assert g['lr'] == pytest.approx(0.001 * g['lr_scale'])
        assert g['eps'] == 1e-6 and tuple(g['betas']) == (0.8, 0.95)
        # the recorded names point at exactly the tensors of the group
        assert [params[n] for n in g['param_names']] == g['params']
        seen += g['param_names']
    assert len(seen) == len(set(seen)) == len(DECAY | NO_DECAY)
    lower = _by_name(opt.param_groups)['decay_lower_lr']
    assert lower['lr'] == pytest.approx(1e-4) and lower['weight_decay'] == 0.05


def test_build_sgd_is_nesterov():
    opt = build_optimizer(_config('TRAIN.OPTIMIZER.NAME', 'sgd', 'TRAIN.OPTIMIZER.MOMENTUM', '0.8'), TinyNet())
    assert isinstance(opt, torch.optim.SGD)
    assert all(g['nesterov'] and g['momentum'] == 0.8 for g in opt.param_groups)
    assert _by_name(opt.param_groups)['no_decay']['weight_decay'] == 0.0


def test_optimizer_state_survives_weights_only_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = TinyNet({'proj_k': 0.1})
    opt = build_optimizer(_config(), model)
    model.x(torch.randn(3, 4)).sum().backward()
    opt.step()
    atomic_save({'optimizer': opt.state_dict()}, str(tmp_path / 'opt.pth'))
    restored = build_optimizer(_config(), TinyNet({'proj_k': 0.1}))
    restored.load_state_dict(load_checkpoint_file(str(tmp_path / 'opt.pth'))['optimizer'])
    x_weight = model.x.weight
    assert torch.equal(restored.state[restored.param_groups[0]['params'][
        restored.param_groups[0]['param_names'].index('x.weight')]]['exp_avg'], opt.state[x_weight]['exp_avg'])
    assert [g['lr_scale'] for g in restored.param_groups] == [g['lr_scale'] for g in opt.param_groups]


# ----------------------------------------------------------------------------- the real model
@pytest.mark.parametrize('cfg_file', ['fixture:mini_pp.yaml', 'fixture:mini_window.yaml', 'configs/dat_tiny.yaml'])
def test_real_model_position_tables_and_biases_are_not_decayed(cfg_file):
    from models import build_model
    if cfg_file.startswith('fixture:'):
        path = fixture_dir('dat_official') / cfg_file.split(':', 1)[1]
    else:
        path = REPO / cfg_file
    model = build_model(load_config(str(path)))
    groups = _by_name(parameter_groups(model, weight_decay=0.05))
    no_decay = set(groups['no_decay']['param_names'])
    decay = set(groups['decay']['param_names'])
    params = dict(model.named_parameters())
    tables = [n for n in params if n.endswith(('rpe_table', 'relative_position_bias_table', '.bias'))]
    assert tables and set(tables) <= no_decay
    assert all(params[n].ndim >= 2 and not n.endswith('.bias') for n in decay)
    assert decay | no_decay == {n for n, p in params.items() if p.requires_grad}


@pytest.mark.parametrize('name', ['adamw', 'sgd'])
def test_a_skipped_first_step_leaves_no_trace(name):
    """A non-finite very first step (before any optimizer state exists), then a finite one, equals
    the finite step alone: AdamW is fused on CPU, and SGD stays unfused because torch's fused SGD
    keeps the momentum buffers it allocated for a skipped first step uninitialised."""
    from train_step import OptimizerStep

    def run(skip_first):
        torch.manual_seed(0)
        model = TinyNet()
        opt = build_optimizer(_config('TRAIN.OPTIMIZER.NAME', name, 'TRAIN.OPTIMIZER.MOMENTUM', '0.9'), model)
        step = OptimizerStep(opt, fp16_scaler=False, device=torch.device('cpu'), clip_grad=5.0)
        for scale in ([float('nan')] if skip_first else []) + [1.0]:
            loss = sum((p.float() ** 2).sum() for p in model.parameters() if p.requires_grad) * scale
            step.backward(loss)
            _, skipped = step.step(model.parameters())
            assert bool(skipped) == (scale != 1.0)
            opt.zero_grad()
        return opt, model.state_dict()

    opt, skipped_first = run(True)
    _, plain = run(False)
    assert all(g.get('fused') for g in opt.param_groups) == (name == 'adamw')
    assert all(torch.equal(skipped_first[k], plain[k]) for k in plain)
