"""Per-iteration learning-rate schedules (timm ``Scheduler`` convention).

Call ``scheduler.step_update(num_updates)`` after every optimizer update, where
``num_updates = epoch * n_iter_per_epoch + iteration``. All schedules warm up linearly from
``TRAIN.WARMUP_LR`` to ``TRAIN.BASE_LR`` over ``TRAIN.WARMUP_EPOCHS`` and then decay.

Groups keep their ``lr_scale`` (see ``optimizer.py``): the schedule is computed once for the
base learning rate and timm's ``Scheduler.update_groups`` multiplies it by each group's
``lr_scale``, so warm-up start, peak and floor are all scaled alike.
"""
from __future__ import annotations

from typing import List, Tuple, Union

import torch
from timm.scheduler.cosine_lr import CosineLRScheduler
from timm.scheduler.scheduler import Scheduler
from timm.scheduler.step_lr import StepLRScheduler

__all__ = ['build_scheduler', 'LinearLRScheduler']


class LinearLRScheduler(Scheduler):
    """Linear warm-up for ``warmup_t`` steps, then linear decay to ``lr_min`` over ``t_initial``
    further steps; ``lr_min`` afterwards.

    Ends at ``lr_min`` like the cosine schedule. (The official code decays to 1% of the base
    learning rate; with the default ``MIN_LR = BASE_LR / 100`` the two agree.)
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
    ) -> None:
        super().__init__(
            optimizer, param_group_field='lr', t_in_epochs=t_in_epochs, noise_range_t=noise_range_t,
            noise_pct=noise_pct, noise_std=noise_std, noise_seed=noise_seed, initialize=initialize)
        if t_initial <= 0:
            raise ValueError(f"linear schedule needs a positive decay length, got {t_initial} steps")
        self.t_initial = t_initial
        self.lr_min = lr_min
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
        return [v + (self.lr_min - v) * progress for v in self.base_values]


def _set_unscaled_initial_lr(optimizer: torch.optim.Optimizer) -> None:
    """Record each group's *unscaled* base lr as ``initial_lr`` (what timm schedules from).

    timm multiplies its result by ``lr_scale``; starting from ``lr`` (already scaled) would
    apply the multiplier twice. ``setdefault`` keeps the value a previous scheduler recorded.
    """
    for group in optimizer.param_groups:
        group.setdefault('initial_lr', group['lr'] / group.get('lr_scale', 1.0))


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
    _set_unscaled_initial_lr(optimizer)

    # Warm-up and stepping are the same for every schedule: per optimizer step, from WARMUP_LR.
    warmup = dict(warmup_lr_init=float(train.WARMUP_LR), warmup_t=warmup_steps, t_in_epochs=False)
    if name == 'cosine':
        # As the official recipe: one cosine over all EPOCHS (warm-up included), so at the
        # end of warm-up the rate is already slightly below BASE_LR.
        return CosineLRScheduler(optimizer, t_initial=total_steps, lr_min=float(train.MIN_LR), cycle_limit=1,
                                 **warmup)
    if name == 'linear':
        return LinearLRScheduler(optimizer, t_initial=decay_steps, lr_min=float(train.MIN_LR), **warmup)
    if name == 'step':
        decay_t = int(train.LR_SCHEDULER.DECAY_EPOCHS * n_iter_per_epoch)
        if decay_t <= 0:
            raise ValueError(f"TRAIN.LR_SCHEDULER.DECAY_EPOCHS must be positive, got {train.LR_SCHEDULER.DECAY_EPOCHS}")
        # Decays at absolute multiples of DECAY_EPOCHS, as in the official code (timm < 0.9).
        return StepLRScheduler(optimizer, decay_t=decay_t, decay_rate=float(train.LR_SCHEDULER.DECAY_RATE),
                               warmup_prefix=False, **warmup)
    raise ValueError(f"TRAIN.LR_SCHEDULER.NAME is {train.LR_SCHEDULER.NAME!r}; expected 'cosine', 'linear' or 'step'")
