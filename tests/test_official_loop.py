"""The training loop in float64 against a hand-written loop of the official recipe: the same
batches, weights and lr at every step, to float64 rounding (the loss is not cast to float32),
with a lower-lr group, clipping and gradient accumulation with a shorter last window."""
from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from config import load_config
from conftest import DEMO_CFG, EXACT_OPTS, TINY_DATA_OPTS, TINY_OPTS, float64_default

# TINY_OPTS: 4 epochs, 1 of warm-up, BASE_LR 0.05, WARMUP_LR = MIN_LR = 5e-4; 12 batches an epoch.
BASE, WARM, MIN, EPOCHS, WARMUP_EPOCHS = 0.05, 5e-4, 5e-4, 4, 1


def _official_lr(t: int, scale: float, updates: int) -> float:
    """The official cosine schedule of a group at ``BASE * scale``: warm-up from the unscaled
    WARMUP_LR, one cosine over all updates down to the unscaled MIN_LR."""
    total, warmup = EPOCHS * updates, WARMUP_EPOCHS * updates
    peak = BASE * scale
    if t < warmup:
        return WARM + t * ((peak - WARM) / warmup)
    return MIN + 0.5 * (peak - MIN) * (1 + math.cos(math.pi * t / total)) if t < total else MIN


class _Net(nn.Module):
    """A small stand-in for the model (the loop is under test, not DAT++): a convolution named like
    DAT++'s offset networks (its lower-lr group), a batch norm (buffers) and a head."""

    def __init__(self):
        super().__init__()
        self.conv_offset = nn.Conv2d(3, 8, 8, stride=8)
        self.norm = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 3)
        self.lower_lr_kvs = {'conv_offset': 0.1}

    def forward(self, x):
        return self.head(self.norm(self.conv_offset(x)).relu().mean((2, 3)))


def _trainer(tmp_path, data, accum: int, monkeypatch):
    import trainer as trainer_module
    from trainer import Trainer
    monkeypatch.setattr(trainer_module, 'build_checked_model', lambda config, device: _Net().to(device))
    config = load_config(DEMO_CFG, [
        *TINY_OPTS, *EXACT_OPTS, *TINY_DATA_OPTS, 'DATA.DATA_PATH', data, 'OUTPUT', str(tmp_path),
        'AUG.MIXUP', '0.0', 'AUG.CUTMIX', '0.0', 'PRINT_FREQ', '1000', 'TRAIN.CLIP_GRAD', '0.5',
        'TRAIN.ACCUMULATION_STEPS', str(accum)])
    with float64_default():
        trainer = Trainer(config, 0, 1, torch.device('cpu'), logging.getLogger('test_official_loop'))
        trainer.build()
    return trainer


def _official_epochs(model, groups, batches, accum: int, epochs: int, clip: float, lrs: list,
                     fused: bool) -> None:
    """The official loop: loss / accum per batch (the last, shorter window by its own length),
    clip, AdamW step, then the lr for the next update from the number of updates so far.

    ``fused``: torch's fused AdamW kernel, as ours uses on the CPU (it rounds differently from the
    for-loop one by ~1e-17 a step, which this small batch-norm net amplifies to ~1e-10)."""
    optimizer = torch.optim.AdamW(groups, eps=1e-8, betas=(0.9, 0.999), fused=fused or None,
                                  foreach=None if fused else False)
    n = len(batches)
    updates = -(-n // accum)
    tail_start = n - n % accum
    for g in optimizer.param_groups:
        g['lr'] = WARM
    for epoch in range(epochs):
        for idx, (images, targets) in enumerate(batches):
            window = accum if idx < tail_start else n - tail_start
            loss = F.cross_entropy(model(images), targets, label_smoothing=0.1)
            (loss / window).backward()
            if (idx + 1) % accum and idx + 1 != n:
                continue
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            optimizer.zero_grad()
            t = epoch * updates + idx // accum
            for g in optimizer.param_groups:
                g['lr'] = _official_lr(t, g['scale'], updates)
            lrs.append([g['lr'] for g in optimizer.param_groups])


@pytest.mark.parametrize('accum', [1, 5])
def test_float64_loop_equals_the_official_loop(tmp_path, tiny_data, accum, monkeypatch):
    trainer = _trainer(tmp_path, tiny_data, accum, monkeypatch)
    model = trainer.model_without_ddp
    assert next(model.parameters()).dtype == torch.float64
    assert any(g['lr_scale'] == 0.1 for g in trainer.optimizer.param_groups)
    trainer.loader_train.sampler.set_epoch(0)
    batches = [(x.double(), t) for x, t, _ in trainer.loader_train]
    assert len(batches) == 12 and (accum == 1 or len(batches) % accum)       # 5 + 5 + a window of 2

    reference = copy.deepcopy(model)
    initial = copy.deepcopy(model.state_dict())
    params = dict(reference.named_parameters())
    groups = [{'params': [params[n] for n in g['param_names']], 'weight_decay': g['weight_decay'],
               'scale': g['lr_scale']} for g in trainer.optimizer.param_groups]
    expected_lrs: list = []
    epochs = 2
    fused = bool(trainer.optimizer.param_groups[0].get('fused'))
    _official_epochs(reference, groups, batches, accum, epochs, 0.5, expected_lrs, fused)

    ours_lrs = []
    step_update = trainer.lr_scheduler.step_update

    def recorded(t, metric=None):
        step_update(t, metric)
        ours_lrs.append([g['lr'] for g in trainer.optimizer.param_groups])
    trainer.lr_scheduler.step_update = recorded
    trainer.loader_train = [(x, t, 0) for x, t in batches]
    for epoch in range(epochs):
        assert trainer.train_one_epoch(epoch, 0) is False

    assert [pytest.approx(a, rel=1e-15, abs=0) for a in expected_lrs] == ours_lrs
    assert len(ours_lrs) == epochs * -(-12 // accum)
    worst = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
                for a, b in zip(model.state_dict().values(), reference.state_dict().values())
                if a.is_floating_point())
    assert worst <= 1e-15, worst
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, initial[k])]
    assert len(moved) > len(initial) // 2


def test_a_shorter_last_window_never_runs_the_schedule_past_its_end(tmp_path, tiny_data, monkeypatch):
    trainer = _trainer(tmp_path, tiny_data, 5, monkeypatch)
    seen = []
    step_update = trainer.lr_scheduler.step_update
    trainer.lr_scheduler.step_update = lambda t, metric=None: (seen.append(t), step_update(t, metric))
    trainer.loader_train.sampler.set_epoch(0)
    trainer.loader_train = [(x.double(), t, n) for x, t, n in trainer.loader_train]
    t_initial = trainer.lr_scheduler.t_initial
    assert t_initial == EPOCHS * 3
    for epoch in range(EPOCHS):
        trainer.train_one_epoch(epoch, 0)
    assert seen == list(range(t_initial))          # one count per window, the last one t_initial - 1
    # The last update leaves every group at the official floor, none beyond the schedule.
    assert [g['lr'] for g in trainer.optimizer.param_groups] == pytest.approx(
        [_official_lr(t_initial - 1, g['lr_scale'], 3) for g in trainer.optimizer.param_groups], rel=1e-15)
