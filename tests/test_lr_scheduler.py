"""Per-iteration schedules: warm-up, decay shapes, lr_scale ratios, and resuming from a saved state."""
import math

import pytest
import torch
import torch.nn as nn

from config import load_config
from lr_scheduler import build_scheduler
from optimizer import build_optimizer
from checkpoint import atomic_save, load_checkpoint_file

BASE, WARM, MIN = 1e-3, 1e-6, 1e-5
N_ITER, EPOCHS, WARMUP = 5, 10, 2          # 50 updates, the first 10 warming up
TOTAL, WARMUP_T = N_ITER * EPOCHS, N_ITER * WARMUP


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_q = nn.Linear(4, 4)
        self.proj_k = nn.Linear(4, 4)
        self.lower_lr_kvs = {'proj_k': 0.1}


def _setup(name='cosine', *opts):
    config = load_config(opts=[
        'TRAIN.BASE_LR', str(BASE), 'TRAIN.WARMUP_LR', str(WARM), 'TRAIN.MIN_LR', str(MIN),
        'TRAIN.EPOCHS', str(EPOCHS), 'TRAIN.WARMUP_EPOCHS', str(WARMUP), 'TRAIN.LR_SCHEDULER.NAME', name, *opts])
    optimizer = build_optimizer(config, Net())
    return optimizer, build_scheduler(config, optimizer, N_ITER)


def _lrs(optimizer):
    """(lr of the full-rate decayed group, lr of the 0.1-rate decayed group)."""
    groups = {g['name']: g for g in optimizer.param_groups}
    return groups['decay']['lr'], groups['decay_lower_lr']['lr']


def _trace(optimizer, scheduler, steps):
    out = []
    for t in steps:
        scheduler.step_update(t)
        out.append(_lrs(optimizer))
    return out


def test_cosine_warms_up_peaks_and_ends_at_min_lr():
    optimizer, scheduler = _setup('cosine')
    assert _lrs(optimizer)[0] == pytest.approx(WARM)          # set on construction, before any update
    full = [lr for lr, _ in _trace(optimizer, scheduler, range(TOTAL + 5))]
    assert full[0] == pytest.approx(WARM)
    assert full[WARMUP_T // 2] == pytest.approx(WARM + (BASE - WARM) / 2)
    assert all(a < b for a, b in zip(full[:WARMUP_T], full[1:WARMUP_T + 1]))      # rising warm-up
    # official recipe: one cosine over all steps, warm-up included
    assert full[WARMUP_T] == pytest.approx(MIN + (BASE - MIN) * (1 + math.cos(math.pi * WARMUP_T / TOTAL)) / 2)
    assert all(a > b for a, b in zip(full[WARMUP_T:TOTAL], full[WARMUP_T + 1:TOTAL + 1]))  # falling
    assert full[TOTAL // 2] == pytest.approx((BASE + MIN) / 2)   # cosine midpoint
    assert full[TOTAL] == pytest.approx(MIN) and full[TOTAL + 4] == pytest.approx(MIN)
    assert full[TOTAL - 1] > MIN


@pytest.mark.parametrize('name', ['cosine', 'linear', 'step'])
def test_scale_warmup_min_keeps_the_lower_groups_ratio_everywhere(name):
    optimizer, scheduler = _setup(name, 'TRAIN.LR_SCHEDULER.SCALE_WARMUP_MIN', 'True')
    assert _lrs(optimizer)[1] == pytest.approx(0.1 * _lrs(optimizer)[0], rel=1e-12)
    for full, lower in _trace(optimizer, scheduler, range(TOTAL + 3)):
        assert lower == pytest.approx(0.1 * full, rel=1e-12)


def _official_lr(name: str, t: int, scale: float) -> float:
    """The official schedule for a group whose lr is ``BASE * scale`` (timm's schedulers of the
    official code, which know nothing of lr_scale): linear warm-up from the unscaled WARMUP_LR to
    the group's own peak; then one cosine over all steps down to the unscaled MIN_LR, a linear
    decay to 1% of the group's peak (MIN = BASE / 100 here), or steps of DECAY_RATE."""
    peak = BASE * scale
    if t < WARMUP_T:
        return WARM + t * ((peak - WARM) / WARMUP_T)
    if name == 'cosine':
        return MIN + 0.5 * (peak - MIN) * (1 + math.cos(math.pi * t / TOTAL)) if t < TOTAL else MIN
    if name == 'linear':
        total = TOTAL - WARMUP_T
        return peak - (peak - peak * 0.01) * min((t - WARMUP_T) / total, 1.0)
    return peak * 0.1 ** (t // (3 * N_ITER))


@pytest.mark.parametrize('name', ['cosine', 'linear', 'step'])
def test_lower_lr_group_follows_the_official_schedule_in_float64(name):
    assert MIN == BASE / 100
    optimizer, scheduler = _setup(name, 'TRAIN.LR_SCHEDULER.DECAY_EPOCHS', '3')
    # Before the first update every group starts at the unscaled WARMUP_LR, as the official's.
    assert _lrs(optimizer) == (WARM, WARM)
    for t, (full, lower) in zip(range(TOTAL + 3), _trace(optimizer, scheduler, range(TOTAL + 3))):
        assert lower == pytest.approx(_official_lr(name, t, 0.1), rel=1e-15, abs=0), t
        assert full == pytest.approx(_official_lr(name, t, 1.0), rel=1e-15, abs=0), t


def test_linear_decays_in_equal_steps_to_min_lr():
    optimizer, scheduler = _setup('linear')
    full = [lr for lr, _ in _trace(optimizer, scheduler, range(TOTAL + 3))]
    assert full[0] == pytest.approx(WARM) and full[WARMUP_T] == pytest.approx(BASE)
    drops = [a - b for a, b in zip(full[WARMUP_T:TOTAL], full[WARMUP_T + 1:TOTAL + 1])]
    assert all(d == pytest.approx((BASE - MIN) / (TOTAL - WARMUP_T)) for d in drops)
    assert full[TOTAL] == pytest.approx(MIN) and full[TOTAL + 2] == pytest.approx(MIN)


def test_step_decays_at_multiples_of_decay_epochs():
    optimizer, scheduler = _setup('step', 'TRAIN.LR_SCHEDULER.DECAY_EPOCHS', '3',
                                  'TRAIN.LR_SCHEDULER.DECAY_RATE', '0.1')
    full = [lr for lr, _ in _trace(optimizer, scheduler, range(TOTAL))]
    assert full[0] == pytest.approx(WARM)
    decay_t = 3 * N_ITER
    for t in range(WARMUP_T, TOTAL):
        assert full[t] == pytest.approx(BASE * 0.1 ** (t // decay_t)), t


def test_no_warmup_starts_at_base_lr():
    optimizer, scheduler = _setup('cosine', 'TRAIN.WARMUP_EPOCHS', '0')
    assert _lrs(optimizer)[0] == pytest.approx(BASE)
    scheduler.step_update(0)
    assert _lrs(optimizer) == pytest.approx((BASE, 0.1 * BASE))


def test_warmup_as_long_as_training_is_rejected():
    with pytest.raises(ValueError, match='WARMUP_EPOCHS'):
        _setup('cosine', 'TRAIN.WARMUP_EPOCHS', str(EPOCHS))


@pytest.mark.parametrize('name', ['cosine', 'linear', 'step'])
def test_state_dict_round_trip_resumes_the_same_sequence(tmp_path, name):
    optimizer, scheduler = _setup(name)
    _trace(optimizer, scheduler, range(23))
    path = str(tmp_path / 'ckpt.pth')
    atomic_save({'optimizer': optimizer.state_dict(), 'lr_scheduler': scheduler.state_dict()}, path)
    expected = _trace(optimizer, scheduler, range(23, TOTAL + 2))

    # A fresh process would build both from the config, then restore them from the file.
    resumed_opt, resumed_sched = _setup(name)
    ckpt = load_checkpoint_file(path)
    resumed_opt.load_state_dict(ckpt['optimizer'])
    resumed_sched.load_state_dict(ckpt['lr_scheduler'])
    assert _trace(resumed_opt, resumed_sched, range(23, TOTAL + 2)) == expected


def test_schedule_drives_a_real_optimizer_step():
    optimizer, scheduler = _setup('cosine', 'TRAIN.WEIGHT_DECAY', '0.0')
    params = {n: p for g in optimizer.param_groups for n, p in zip(g['param_names'], g['params'])}
    scheduler.step_update(WARMUP_T)
    peak, lower = _lrs(optimizer)
    assert lower == _official_lr('cosine', WARMUP_T, 0.1)
    before = {n: p.detach().clone() for n, p in params.items()}
    for p in params.values():
        p.grad = torch.ones_like(p)
    optimizer.step()
    # Adam's first step moves each weight by lr (times a sign), so the step size shows each group's lr.
    moved_full = (before['proj_q.weight'] - params['proj_q.weight']).abs().mean().item()
    moved_lower = (before['proj_k.weight'] - params['proj_k.weight']).abs().mean().item()
    assert math.isclose(moved_full, peak, rel_tol=1e-3) and peak > 0.9 * BASE
    assert math.isclose(moved_lower, lower, rel_tol=1e-3)
