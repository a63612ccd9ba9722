"""One optimizer step without host syncs: mixed precision, clipping, skipping non-finite steps,
device-side statistics and the weight EMA.

Whether a step is taken is decided on the device, as a grad scaler does: fused optimizers (AdamW)
receive the non-finite flag and leave their state untouched; for other optimizers the flag is
read once per step. Losses, norms
and counters stay on the device in :class:`StepStats` and are read when logging.
"""
from __future__ import annotations

import logging
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ['autocast_settings', 'total_norm', 'OptimizerStep', 'StepStats', 'ema_update']


def autocast_settings(config, device: torch.device, logger: logging.Logger) -> Tuple[bool, torch.dtype]:
    """(autocast enabled, dtype); fp16 autocast is dropped on CPU, where bf16 is the supported type."""
    dtype = torch.bfloat16 if config.AMP_DTYPE == 'bfloat16' else torch.float16
    enabled = bool(config.AMP)
    if enabled and device.type != 'cuda' and dtype == torch.float16:
        logger.warning("AMP float16 needs CUDA; training in float32 on %s (use --amp-dtype bfloat16 "
                       "for mixed precision on CPU)", device.type)
        enabled = False
    return enabled, dtype


def total_norm(grads: List[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all ``grads`` together, as ``clip_grad_norm_`` measures it, without clipping
    (``torch.nn.utils.get_total_norm`` from torch 2.6 on; the same arithmetic before)."""
    get_total_norm = getattr(torch.nn.utils, 'get_total_norm', None)
    if get_total_norm is not None:
        return get_total_norm(grads)
    if not grads:
        return torch.tensor(0.0)
    norms = torch._foreach_norm(grads)
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))


def _is_fused(optimizer: torch.optim.Optimizer) -> bool:
    # Read per step: loading a checkpoint of a non-fused run overwrites the groups' 'fused'.
    return all(group.get('fused') for group in optimizer.param_groups)


class OptimizerStep:
    """Backward (scaled for fp16), unscale, clip, and step unless the gradients are non-finite.

    ``state_dict`` / ``load_state_dict`` carry the grad scaler's state (empty without fp16).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, fp16_scaler: bool, device: torch.device,
                 clip_grad: Optional[float]) -> None:
        self.optimizer = optimizer
        self.scaler = torch.amp.GradScaler(device.type, enabled=fp16_scaler)
        self.clip_grad = clip_grad

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, parameters: Iterable[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Finish the accumulated gradients; returns device tensors ``(grad norm before clipping,
        skipped)``. The gradients are left for the caller to zero."""
        params = [p for p in parameters if p.grad is not None]
        self.scaler.unscale_(self.optimizer)        # clip and measure true gradients
        if self.clip_grad is not None and self.clip_grad > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad)
        else:
            norm = total_norm([p.grad for p in params])
        skipped = ~torch.isfinite(norm)
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)        # skips on the scaler's own inf check
            self.scaler.update()
        elif _is_fused(self.optimizer):
            # The protocol grad scalers use with fused optimizers: no update where found_inf is 1.
            self.optimizer.found_inf = skipped.float()
            self.optimizer.grad_scale = None
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf, self.optimizer.grad_scale
        elif not bool(skipped):
            self.optimizer.step()
        return norm.detach(), skipped

    def loss_scale(self) -> float:
        """The fp16 loss scale (1.0 without scaling); reads the device, so call it when logging."""
        return float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        # An fp16 run resumed in bf16 (or the reverse) has nothing to restore.
        if state_dict and self.scaler.is_enabled():
            self.scaler.load_state_dict(state_dict)


_FIELDS = ('loss', 'grad_norm', 'loss_sum', 'images', 'norm_sum', 'steps', 'skipped_loss', 'skipped_grad',
           'overflow', 'dropped', 'streak', 'max_streak', 'first_skipped', 'last_skipped')


class StepStats:
    """Step results accumulated on the device; :meth:`read` is the only host sync.

    Sums cover the optimizer steps taken this epoch; ``streak`` counts non-finite steps in a row
    (kept across epochs) and ``max_streak`` / ``first_skipped`` / ``last_skipped`` cover the steps
    since the last read. With an fp16 grad scaler, steps it skips on overflow while the loss is
    finite are its normal loss-scale search (``overflow``), not a divergence.
    """

    def __init__(self, device: torch.device, grad_scaler: bool = False) -> None:
        self.grad_scaler = grad_scaler
        dtype = torch.float32 if device.type == 'mps' else torch.float64
        self.values = torch.zeros(len(_FIELDS), dtype=dtype, device=device)
        self._index = {name: i for i, name in enumerate(_FIELDS)}
        self.values[self._index['first_skipped']] = float('inf')
        self.values[self._index['last_skipped']] = -1

    def _get(self, name: str) -> torch.Tensor:
        return self.values[self._index[name]]

    def new_epoch(self) -> None:
        for name in ('loss_sum', 'images', 'norm_sum', 'steps', 'skipped_loss', 'skipped_grad', 'overflow',
                     'dropped'):
            self._get(name).zero_()

    @torch.no_grad()
    def update(self, iteration: int, loss: torch.Tensor, images: int, norm: torch.Tensor, skipped: torch.Tensor,
               dropped: torch.Tensor) -> None:
        """Record one optimizer step. ``dropped``: some rank had no images for it (not a divergence)."""
        v = self.values
        loss = loss.detach().to(v.dtype)
        norm = norm.to(v.dtype)
        taken = (~skipped).to(v.dtype)
        finite_loss = torch.isfinite(loss)
        nonfinite = skipped & ~dropped
        if self.grad_scaler:
            nonfinite = nonfinite & ~finite_loss
        overflow = skipped & ~dropped & ~nonfinite
        zero = torch.zeros((), dtype=v.dtype, device=v.device)
        nan = torch.full((), float('nan'), dtype=v.dtype, device=v.device)
        streak = torch.where(nonfinite, self._get('streak') + 1, zero)
        update = {
            'loss': torch.where(dropped, nan, loss), 'grad_norm': torch.where(dropped, nan, norm),
            'loss_sum': self._get('loss_sum') + torch.where(skipped, zero, loss * images),
            'images': self._get('images') + taken * images,
            'norm_sum': self._get('norm_sum') + torch.where(skipped, zero, norm),
            'steps': self._get('steps') + taken,
            'skipped_loss': self._get('skipped_loss') + (nonfinite & ~finite_loss).to(v.dtype),
            'skipped_grad': self._get('skipped_grad') + (nonfinite & finite_loss).to(v.dtype),
            'overflow': self._get('overflow') + overflow.to(v.dtype),
            'dropped': self._get('dropped') + dropped.to(v.dtype),
            'streak': streak,
            'max_streak': torch.maximum(self._get('max_streak'), streak),
            'first_skipped': torch.where(nonfinite, torch.minimum(self._get('first_skipped'), zero + iteration),
                                         self._get('first_skipped')),
            'last_skipped': torch.where(nonfinite, zero + iteration, self._get('last_skipped')),
        }
        self.values.copy_(torch.stack([update[name] for name in _FIELDS]))

    def read(self) -> Dict[str, float]:
        """The values on the host; starts a new window for the ``max_streak`` / ``*_skipped`` fields."""
        out = dict(zip(_FIELDS, self.values.tolist()))
        self._get('max_streak').copy_(self._get('streak'))
        self._get('first_skipped').fill_(float('inf'))
        self._get('last_skipped').fill_(-1)
        return out


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, taken: torch.Tensor) -> None:
    """``ema <- ema + (1 - decay) * (model - ema)`` for floating tensors where ``taken`` (a device
    flag), others copied. timm's ModelEma updates cannot be skipped on a device-side flag."""
    weights: Dict[torch.dtype, torch.Tensor] = {}
    for e, m in zip(ema.state_dict().values(), model.state_dict().values()):
        if e.is_floating_point():
            if e.dtype not in weights:
                weights[e.dtype] = ((1.0 - decay) * taken.to(torch.float64)).to(e.dtype)
            e.lerp_(m.to(e.dtype), weights[e.dtype])
        else:
            e.copy_(m)
