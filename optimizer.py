"""Optimizer construction: AdamW / SGD over named parameter groups.

Weight decay is skipped for 1-D parameters (norms, scales), biases, and position tables the
model names through ``no_weight_decay()`` / ``no_weight_decay_keywords()``. A model may also ask
for a lower learning rate on parameters whose name contains one keyword (``lower_lr_kvs``).

Every group carries ``lr_scale`` (its multiple of the base learning rate) and ``name``; the
scheduler (``lr_scheduler.py``) peaks each group at ``BASE_LR * lr_scale``. Groups also carry ``param_names`` so logs and checkpoints say what is in them.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from checkpoint import strip_prefixes

__all__ = ['build_optimizer', 'parameter_groups']


def _model_set(model: nn.Module, method: str) -> set:
    fn = getattr(model, method, None)
    return set(fn()) if callable(fn) else set()


def _lower_lr_entry(lower_lr_kvs: Optional[Mapping[str, Any]]) -> Optional[Tuple[str, float]]:
    """Validate ``lower_lr_kvs`` and return its single ``(keyword, multiplier)`` or None."""
    if not lower_lr_kvs:
        return None
    if len(lower_lr_kvs) > 1:
        raise ValueError(
            f"MODEL.DAT.lower_lr_kvs may hold at most one {{keyword: multiplier}} entry, "
            f"got {len(lower_lr_kvs)}: {dict(lower_lr_kvs)}; keep one")
    keyword, multiplier = next(iter(lower_lr_kvs.items()))
    try:
        multiplier = float(multiplier)
    except (TypeError, ValueError):
        multiplier = float('nan')
    if not keyword or not multiplier > 0:
        raise ValueError(
            f"MODEL.DAT.lower_lr_kvs entry {{{keyword!r}: {lower_lr_kvs[keyword]!r}}} needs a "
            f"non-empty name keyword and a positive lr multiplier")
    return str(keyword), multiplier


def parameter_groups(
        model: nn.Module,
        weight_decay: float,
        skip_list: Optional[Iterable[str]] = None,
        skip_keywords: Optional[Iterable[str]] = None,
        lower_lr_kvs: Optional[Mapping[str, Any]] = None,
) -> List[Dict[str, Any]]:
    """Group the trainable parameters of ``model`` by NAME.

    ``skip_list``, ``skip_keywords`` and ``lower_lr_kvs`` default to what the model declares
    (``no_weight_decay()``, ``no_weight_decay_keywords()``, ``lower_lr_kvs``).

    Returns non-empty groups in a fixed order, each a dict with ``name`` (``decay``,
    ``no_decay``, ``decay_lower_lr``, ``no_decay_lower_lr``), ``weight_decay``, ``lr_scale`` and
    ``param_names`` (in ``named_parameters()`` order, wrapper prefixes removed).
    Frozen parameters (``requires_grad=False``) are left out.
    """
    skip = set(skip_list) if skip_list is not None else _model_set(model, 'no_weight_decay')
    keywords = tuple(skip_keywords) if skip_keywords is not None else tuple(
        sorted(_model_set(model, 'no_weight_decay_keywords')))
    if lower_lr_kvs is None:
        lower_lr_kvs = getattr(model, 'lower_lr_kvs', None)
    lower = _lower_lr_entry(lower_lr_kvs)

    groups: Dict[Tuple[bool, bool], List[str]] = {
        (True, False): [], (False, False): [], (True, True): [], (False, True): []}
    for raw_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = strip_prefixes(raw_name)
        # 1-D tensors are norm weights, biases and layer scales: decaying them only hurts.
        no_decay = (param.ndim <= 1 or name.endswith('.bias') or name in skip
                    or any(k in name for k in keywords))
        is_lower = lower is not None and lower[0] in name
        groups[(not no_decay, is_lower)].append(name)

    result = []
    for (decay, is_lower), names in groups.items():
        if not names:
            continue
        result.append({
            'name': ('decay' if decay else 'no_decay') + ('_lower_lr' if is_lower else ''),
            'weight_decay': weight_decay if decay else 0.0,
            'lr_scale': lower[1] if is_lower else 1.0,
            'param_names': names,
        })
    return result


def build_optimizer(config, model: nn.Module,
                    logger: Optional[logging.Logger] = None) -> torch.optim.Optimizer:
    """AdamW or SGD (nesterov) from ``config.TRAIN`` over :func:`parameter_groups` of ``model``.

    Each group starts at ``lr = TRAIN.BASE_LR * lr_scale``; ``TRAIN.BASE_LR`` is used as given
    (linear scaling with the batch size is the caller's job).
    """
    train = config.TRAIN
    base_lr = float(train.BASE_LR)
    params = {strip_prefixes(n): p for n, p in model.named_parameters()}
    torch_groups = []
    for spec in parameter_groups(model, weight_decay=float(train.WEIGHT_DECAY)):
        torch_groups.append({
            # 'param_names' as torch >= 2.6 records it from (name, tensor) pairs, in the group and
            # its state dict; set by hand, torch 2.5 keeps it the same way.
            'params': [params[n] for n in spec['param_names']],
            'param_names': list(spec['param_names']),
            'name': spec['name'],
            'weight_decay': spec['weight_decay'],
            'lr_scale': spec['lr_scale'],
            'lr': base_lr * spec['lr_scale'],
        })
    if not torch_groups:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")

    opt_name = train.OPTIMIZER.NAME.lower()
    if opt_name == 'adamw':
        # The fused kernel (CUDA and CPU): one pass over all tensors (3x faster than the default on
        # CPU for DAT-T++), and it skips a step on a device-side non-finite flag (train_step.py).
        fused = all(p.device.type in ('cuda', 'cpu') and p.is_floating_point() for p in params.values())
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(
            torch_groups, lr=base_lr, eps=float(train.OPTIMIZER.EPS),
            betas=tuple(float(b) for b in train.OPTIMIZER.BETAS), weight_decay=float(train.WEIGHT_DECAY),
            fused=fused or None)
    elif opt_name == 'sgd':
        # Not fused: torch's fused SGD, told to skip its very first step, leaves the momentum buffers
        # it just allocated uninitialised and reads them on the next step.
        optimizer = torch.optim.SGD(
            torch_groups, lr=base_lr, momentum=float(train.OPTIMIZER.MOMENTUM), nesterov=True,
            weight_decay=float(train.WEIGHT_DECAY))
    else:
        raise ValueError(f"TRAIN.OPTIMIZER.NAME is {train.OPTIMIZER.NAME!r}; expected 'adamw' or 'sgd'")

    if logger is not None:
        for g in optimizer.param_groups:
            logger.info(f"optimizer group '{g['name']}': {len(g['params'])} tensors, "
                        f"weight_decay={g['weight_decay']}, lr_scale={g['lr_scale']}")
    return optimizer
