"""Pretrained loading and reproducibility (deterministic kernels, RNG state, digests).

Checkpoint files themselves (safe reading, atomic writes, resume policy) live in the ``checkpoint`` package.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
import sys
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn

from checkpoint import (CheckpointError, _list_names, _mismatch_message, _shape, check_model_config, check_tensors,
                        load_checkpoint_file, load_model_state, strip_prefixes, unwrap_model, unwrap_state_dict)

__all__ = ['load_pretrained', 'configure_determinism', 'state_digest', 'get_rng_state', 'set_rng_state']


def load_pretrained(config, model: nn.Module, logger: logging.Logger, path: Optional[str] = None) -> None:
    """Initialise ``model`` from ``MODEL.PRETRAINED`` (or ``path``) for fine-tuning.

    The file is read with the safe loader and checked (model arithmetic, tensor kinds, finite
    values). DAT weights then go through ``models.load_pretrained``, the filter timm's
    ``pretrained=True`` uses too: position tables resized, resolution buffers kept, a classifier
    for other classes mapped with ``MODEL.MAP_22K_TO_1K`` or left fresh. Other families go through
    their own module's ``checkpoint_filter_fn`` when it has one; a classifier for another number of
    classes is left fresh. Any other tensor that does not fit is a CheckpointError.
    """
    from models import load_pretrained as load_dat_weights

    path = path or config.MODEL.PRETRAINED
    source = f"pretrained checkpoint {path}"
    logger.info("loading pretrained weights from %s", path)
    model = unwrap_model(model)
    ckpt = load_checkpoint_file(path)
    check_model_config(ckpt, config, source)
    weights = {strip_prefixes(k): v for k, v in unwrap_state_dict(ckpt).items()}
    check_tensors(weights, model.state_dict(), source)
    try:
        if config.MODEL.TYPE == 'dat':
            info = load_dat_weights(model, ckpt, class_map=config.MODEL.MAP_22K_TO_1K or None)
        else:
            info = _load_family_weights(model, ckpt, source)
    except ValueError as e:         # models.CheckpointMismatchError and the filters' own refusals
        raise CheckpointError(f"{source}: {' '.join(str(e).split())}") from None
    params = dict(model.named_parameters())
    fresh_head = [k for k in info['kept'] if k in params and k in weights]      # buffers kept are not heads
    if fresh_head:
        logger.warning("pretrained head has %d classes, the model %d: head not loaded, a fresh one is trained "
                       "(set MODEL.MAP_22K_TO_1K to select classes)", weights[fresh_head[0]].shape[0],
                       params[fresh_head[0]].shape[0])
    own = model.state_dict()
    for k in info['resized']:
        logger.info("resized %s from %s to %s (bicubic)", k, _shape(weights[k]), _shape(own[k]))
    if info['kept']:
        logger.info("kept the model's own values for %d tensors: %s", len(info['kept']), _list_names(info['kept']))
    logger.info("loaded pretrained weights from %s", path)


def _classifier_names(model: nn.Module) -> List[str]:
    """State-dict names of the classifier (timm's ``get_classifier``), whatever the family calls it."""
    head = model.get_classifier() if hasattr(model, 'get_classifier') else None
    if not isinstance(head, nn.Module):
        return []
    ids = {id(t) for t in head.state_dict(keep_vars=True).values()}
    return [k for k, t in model.state_dict(keep_vars=True).items() if id(t) in ids]


def _load_family_weights(model: nn.Module, ckpt: dict, source: str) -> Dict[str, List[str]]:
    """Non-DAT families: the model module's ``checkpoint_filter_fn`` (timm convention), then a strict
    load except for a classifier of another class count, which keeps the model's fresh one."""
    sd = {strip_prefixes(k): v for k, v in unwrap_state_dict(ckpt).items()}
    family_filter = getattr(sys.modules.get(type(model).__module__), 'checkpoint_filter_fn', None)
    if family_filter is not None:
        sd = family_filter(sd, model)
    own = model.state_dict()
    fresh = [k for k in _classifier_names(model) if k in sd and sd[k].shape != own[k].shape]
    for k in fresh:
        del sd[k]
    missing, unexpected = load_model_state(model, sd, strict=False, source=source)
    missing = [k for k in missing if k not in fresh]
    if missing or unexpected:
        raise CheckpointError(_mismatch_message(f"{source} does not fit the model (different architecture or config)",
                                                missing, unexpected, [], "use a checkpoint of the same model"))
    return dict(kept=fresh, resized=[])


# ============================================================================ reproducibility
def configure_determinism(deterministic: bool) -> None:
    """Reproducible kernels and thread counts when ``deterministic``; fast autotuning otherwise."""
    if deterministic:
        # cuBLAS is only deterministic with a fixed workspace; must be set before its first use.
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
        # grid_sample's CUDA backward has no deterministic kernel: warn there instead of failing.
        torch.use_deterministic_algorithms(True, warn_only=torch.cuda.is_available())
        # Float reductions split over threads depend on the thread count: pin it.
        torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS') or 1))
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.backends.cudnn.benchmark = True


def state_digest(module: nn.Module) -> str:
    """SHA-256 over every parameter and buffer (names, dtypes and bytes): equal digests on two
    ranks mean bit-identical replicas."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b'')
    return h.hexdigest()


def get_rng_state() -> Dict[str, Any]:
    """Python, numpy, torch CPU and CUDA generator states, as tensors and plain values."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        'python': {'version': version, 'state': torch.tensor(internal, dtype=torch.int64),
                   'gauss_next': gauss_next},
        'numpy': {'kind': str(kind), 'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                  'has_gauss': int(has_gauss), 'cached_gaussian': float(cached)},
        'torch': torch.get_rng_state(),
        'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned; parts missing from ``state`` are left alone."""
    if 'python' in state:
        py = state['python']
        random.setstate((py['version'], tuple(int(v) for v in py['state'].tolist()), py['gauss_next']))
    if 'numpy' in state:
        npy = state['numpy']
        np.random.set_state((npy['kind'], npy['keys'].numpy().astype(np.uint32), npy['pos'],
                             npy['has_gauss'], npy['cached_gaussian']))
    if 'torch' in state:
        torch.set_rng_state(state['torch'])
    if state.get('cuda') and torch.cuda.is_available():
        # A run resumed on fewer GPUs restores the devices it has.
        for index, device_state in enumerate(state['cuda'][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, index)
