"""Per-iteration learning-rate schedules (timm ``Scheduler`` convention).

Call ``scheduler.step_update(num_updates)`` after every optimizer update, where
``num_updates = epoch * n_iter_per_epoch + iteration``. All schedules warm up linearly from
``TRAIN.WARMUP_LR`` to ``TRAIN.BASE_LR`` over ``TRAIN.WARMUP_EPOCHS`` and then decay.

Groups with an ``lr_scale`` (``lower_lr_kvs``, see ``optimizer.py``) are scheduled as the official
code does: each group peaks at its own ``TRAIN.BASE_LR * lr_scale``, but warms up from the
unscaled ``TRAIN.WARMUP_LR`` and the cosine decays to the unscaled ``TRAIN.MIN_LR`` (the linear
schedule ends at ``MIN_LR / BASE_LR`` of each group's peak, as the official ends at 1% of it).
``TRAIN.LR_SCHEDULER.SCALE_WARMUP_MIN True`` scales warm-up start and floor by ``lr_scale`` too
(the groups' ratio then holds through the whole schedule).
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
from timm.scheduler.cosine_lr import CosineLRScheduler
from timm.scheduler.scheduler import Scheduler
from timm.scheduler.step_lr import StepLRScheduler

__all__ = ['build_scheduler', 'LinearLRScheduler']


class _PerGroupValues:
    """Write the values a schedule computes from each group's own (scaled) ``initial_lr`` as they
    are: timm's ``update_groups`` would multiply them by ``lr_scale`` a second time."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # timm's constructors set the first lr through their base class's update_groups.
        self.update_groups(self.warmup_lr_init if self.warmup_t else self.base_values)

    def update_groups(self, values) -> None:
        groups = self.optimizer.param_groups
        if not isinstance(values, (list, tuple)):
            values = [values] * len(groups)
        for group, value in zip(groups, values):
            group[self.param_group_field] = value


class LinearLRScheduler(Scheduler):
    """Linear warm-up for ``warmup_t`` steps, then linear decay to ``lr_min`` over ``t_initial``
    further steps; ``lr_min`` afterwards.

    Ends at ``lr_min`` like the cosine schedule, times ``lr_min_scales[i]`` for group ``i`` when
    given. (The official code decays each group to 1% of its own peak; with
    ``MIN_LR = BASE_LR / 100`` and each group's ``lr_scale`` as its scale the two agree.)
    """

    def __init__(
            self,
            optimizer: torch.optim.Optimizer,
            t_initial: int,
            lr_min: float = 0.,
            warmup_t: int = 0,
            warmup_lr_init: float = 0.,
            t_in_epochs: bool = True,
            noise_range_t: Union[List[int], Tuple[int, int], int, None] = None,
            noise_pct: float = 0.67,
            noise_std: float = 1.0,
            noise_seed: int = 42,
            initialize: bool = True,
            lr_min_scales: Optional[List[float]] = None,
    ) -> None:
        super().__init__(
            optimizer, param_group_field='lr', t_in_epochs=t_in_epochs, noise_range_t=noise_range_t,
            noise_pct=noise_pct, noise_std=noise_std, noise_seed=noise_seed, initialize=initialize)
        if t_initial <= 0:
            raise ValueError(f"linear schedule needs a positive decay length, got {t_initial} steps")
        self.t_initial = t_initial
        self.lr_min = lr_min
        self.lr_mins = [lr_min * k for k in lr_min_scales] if lr_min_scales else [lr_min] * len(self.base_values)
        self.warmup_t = warmup_t
        self.warmup_lr_init = warmup_lr_init
        if self.warmup_t:
            self.warmup_steps = [(v - warmup_lr_init) / self.warmup_t for v in self.base_values]
            super().update_groups(self.warmup_lr_init)
        else:
            self.warmup_steps = [1.0 for _ in self.base_values]

    def _get_lr(self, t: int) -> List[float]:
        if t < self.warmup_t:
            return [self.warmup_lr_init + t * s for s in self.warmup_steps]
        progress = min((t - self.warmup_t) / self.t_initial, 1.0)
        return [v + (m - v) * progress for v, m in zip(self.base_values, self.lr_mins)]


class _OfficialCosine(_PerGroupValues, CosineLRScheduler):
    pass


class _OfficialLinear(_PerGroupValues, LinearLRScheduler):
    pass


class _OfficialStep(_PerGroupValues, StepLRScheduler):
    pass


def _set_initial_lr(optimizer: torch.optim.Optimizer, scaled: bool) -> None:
    """Record what the schedules start from as each group's ``initial_lr``: its own (scaled) base
    lr when the schedule writes per-group values, the unscaled one when timm multiplies by
    ``lr_scale`` on every update (starting from the scaled lr would apply it twice).
    ``setdefault`` keeps the value a previous scheduler recorded."""
    for group in optimizer.param_groups:
        group.setdefault('initial_lr', group['lr'] if scaled else group['lr'] / group.get('lr_scale', 1.0))


def build_scheduler(config, optimizer: torch.optim.Optimizer, n_iter_per_epoch: int) -> Scheduler:
    """The ``TRAIN.LR_SCHEDULER.NAME`` schedule (cosine, linear or step), counted in iterations."""
    if n_iter_per_epoch <= 0:
        raise ValueError(f"n_iter_per_epoch must be positive, got {n_iter_per_epoch} (empty data loader?)")
    train = config.TRAIN
    total_steps = int(train.EPOCHS * n_iter_per_epoch)
    warmup_steps = int(train.WARMUP_EPOCHS * n_iter_per_epoch)
    decay_steps = total_steps - warmup_steps
    name = train.LR_SCHEDULER.NAME.lower()
    if name in ('cosine', 'linear') and decay_steps <= 0:
        raise ValueError(
            f"TRAIN.EPOCHS ({train.EPOCHS}) must exceed TRAIN.WARMUP_EPOCHS ({train.WARMUP_EPOCHS}) "
            f"for the {name} schedule")
    scale_all = bool(train.LR_SCHEDULER.SCALE_WARMUP_MIN)
    _set_initial_lr(optimizer, scaled=not scale_all)
    cosine, linear, step = ((CosineLRScheduler, LinearLRScheduler, StepLRScheduler) if scale_all
                            else (_OfficialCosine, _OfficialLinear, _OfficialStep))

    # Warm-up and stepping are the same for every schedule: per optimizer step, from WARMUP_LR.
    warmup = dict(warmup_lr_init=float(train.WARMUP_LR), warmup_t=warmup_steps, t_in_epochs=False)
    if name == 'cosine':
        # As the official recipe: one cosine over all EPOCHS (warm-up included), so at the
        # end of warm-up the rate is already slightly below BASE_LR.
        return cosine(optimizer, t_initial=total_steps, lr_min=float(train.MIN_LR), cycle_limit=1, **warmup)
    if name == 'linear':
        scales = None if scale_all else [g.get('lr_scale', 1.0) for g in optimizer.param_groups]
        return linear(optimizer, t_initial=decay_steps, lr_min=float(train.MIN_LR), lr_min_scales=scales,
                      **warmup)
    if name == 'step':
        decay_t = int(train.LR_SCHEDULER.DECAY_EPOCHS * n_iter_per_epoch)
        if decay_t <= 0:
            raise ValueError(f"TRAIN.LR_SCHEDULER.DECAY_EPOCHS must be positive, got {train.LR_SCHEDULER.DECAY_EPOCHS}")
        # Decays at absolute multiples of DECAY_EPOCHS, as in the official code (timm < 0.9).
        return step(optimizer, decay_t=decay_t, decay_rate=float(train.LR_SCHEDULER.DECAY_RATE),
                               warmup_prefix=False, **warmup)
    raise ValueError(f"TRAIN.LR_SCHEDULER.NAME is {train.LR_SCHEDULER.NAME!r}; expected 'cosine', 'linear' or 'step'")
