"""Pretrained loading and reproducibility (deterministic kernels, RNG state, digests).

Checkpoint files themselves (safe reading, atomic writes, resume) live in ``checkpoint.py``.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import re
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import (CheckpointError, _first_line, _list_names, _mismatch_message, _shape, check_model_config,
                        check_tensors, load_checkpoint_file, strip_prefixes, unwrap_model, unwrap_state_dict)

__all__ = ['load_pretrained', 'configure_determinism', 'state_digest', 'get_rng_state', 'set_rng_state']


# Buffers that depend on the input resolution; a model built for another size keeps its own.
_RESOLUTION_BUFFERS = ('relative_position_index', 'attn_mask')
_HEAD_PREFIX = 'cls_head.'


def _bicubic(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bicubic resize of the last two dims of a (1, C, H, W) tensor, in its own precision
    (float32 at least)."""
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    out = F.interpolate(work, size=tuple(size), mode='bicubic', align_corners=False)
    return out.to(x.dtype)


def _resize_position_table(name: str, value: torch.Tensor, target: torch.Size) -> Optional[torch.Tensor]:
    """``value`` resized to ``target`` when ``name`` is a resizable position table, else None.

    ``rpe_table`` (heads, 2f-1, 2f-1) and ``rpb`` (heads, 2K-1, 2K-1) are images per head;
    ``relative_position_bias_table`` ((2w-1)^2, heads) is one after a reshape.
    """
    leaf = name.rsplit('.', 1)[-1]
    if leaf in ('rpe_table', 'rpb') and value.ndim == 3 and len(target) == 3 and value.shape[0] == target[0]:
        return _bicubic(value.unsqueeze(0), target[1:]).squeeze(0)
    if (leaf == 'relative_position_bias_table' and value.ndim == 2 and len(target) == 2
            and value.shape[1] == target[1]):
        side, new_side = math.isqrt(value.shape[0]), math.isqrt(target[0])
        if side * side != value.shape[0] or new_side * new_side != target[0]:
            return None
        heads = value.shape[1]
        image = value.reshape(side, side, heads).permute(2, 0, 1).unsqueeze(0)
        resized = _bicubic(image, (new_side, new_side))[0]
        return resized.permute(1, 2, 0).reshape(new_side * new_side, heads)
    return None


def _uses_fixed_table(config, name: str) -> bool:
    """True for the ``fixed_pes`` table of a stage: it is bound to its resolution, not an image."""
    match = re.match(r'stages\.(\d+)\.', name)
    fixed = getattr(getattr(config.MODEL, 'DAT', None), 'fixed_pes', None)
    if not match or not fixed:
        return False
    stage = int(match.group(1))
    return stage < len(fixed) and bool(fixed[stage]) and name.endswith('.rpe_table')


def _read_class_index(path: str) -> torch.Tensor:
    """Class indices from a text file (one integer per line) or a file saved with ``torch.save``."""
    if not os.path.isfile(path):
        raise CheckpointError(f"MODEL.MAP_22K_TO_1K file not found: {path} (give a text file with one "
                              f"22K class index per line, or clear the key to train a fresh head)")
    with open(path, 'rb') as f:
        magic = f.read(2)
    if magic == b'PK' or magic[:1] == b'\x80':   # torch zip format / legacy pickle
        try:
            index = torch.as_tensor(torch.load(path, map_location='cpu', weights_only=True))
        except Exception as e:
            raise CheckpointError(f"MODEL.MAP_22K_TO_1K file {path} does not load as a tensor or list of "
                                  f"integers ({_first_line(e)})") from e
    else:
        try:
            with open(path, 'r') as f:
                values = [int(tok) for line in f for tok in line.split('#', 1)[0].split()]
        except (UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"MODEL.MAP_22K_TO_1K file {path} is not a list of integers "
                                  f"({_first_line(e)})") from e
        index = torch.tensor(values)
    if index.ndim != 1 or index.is_floating_point() or index.numel() == 0:
        raise CheckpointError(f"MODEL.MAP_22K_TO_1K file {path} must hold a non-empty 1-D list of integers, "
                              f"got shape {tuple(index.shape)} {index.dtype}")
    return index.long()


def _map_head(sd: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor], config, logger: logging.Logger) -> None:
    """Make the checkpoint's classifier fit the model: select mapped rows or drop it."""
    keys = [k for k in (_HEAD_PREFIX + 'weight', _HEAD_PREFIX + 'bias') if k in sd and k in own]
    if not keys or all(sd[k].shape[0] == own[k].shape[0] for k in keys):
        return
    ckpt_classes, model_classes = sd[keys[0]].shape[0], own[keys[0]].shape[0]
    map_file = getattr(config.MODEL, 'MAP_22K_TO_1K', '') or ''
    if not map_file:
        logger.warning(f"pretrained head has {ckpt_classes} classes, the model {model_classes}: "
                       f"head not loaded, a fresh one is trained (set MODEL.MAP_22K_TO_1K to select classes)")
        for k in keys:
            del sd[k]
        return
    index = _read_class_index(map_file)
    if index.numel() != model_classes or index.min() < 0 or index.max() >= ckpt_classes:
        raise CheckpointError(
            f"MODEL.MAP_22K_TO_1K {map_file} holds {index.numel()} indices in [{int(index.min())}, "
            f"{int(index.max())}]; it needs {model_classes} (MODEL.NUM_CLASSES) indices below {ckpt_classes} "
            f"(the checkpoint's classes)")
    for k in keys:
        sd[k] = sd[k].index_select(0, index)
    logger.info(f"mapped the pretrained {ckpt_classes}-class head to {model_classes} classes with {map_file}")


def load_pretrained(config, model: nn.Module, logger: logging.Logger, path: Optional[str] = None) -> None:
    """Initialise ``model`` from ``MODEL.PRETRAINED`` (or ``path``) for fine-tuning.

    Position tables are resized bicubically to the model's resolution, resolution-dependent
    buffers keep the model's values, and a classifier for another number of classes is mapped
    with ``MODEL.MAP_22K_TO_1K`` or left fresh. Every other tensor of the model must be
    loaded, otherwise CheckpointError is raised.
    """
    path = path or config.MODEL.PRETRAINED
    logger.info(f"loading pretrained weights from {path}")
    model = unwrap_model(model)
    ckpt = load_checkpoint_file(path)
    sd = {strip_prefixes(k): v for k, v in unwrap_state_dict(ckpt).items()}
    own = model.state_dict()
    params = dict(model.named_parameters())

    kept_buffers = [k for k in own if k.rsplit('.', 1)[-1] in _RESOLUTION_BUFFERS]
    for k in [k for k in sd if k.rsplit('.', 1)[-1] in _RESOLUTION_BUFFERS]:
        del sd[k]

    for k, value in list(sd.items()):
        if k not in params or value.shape == params[k].shape or value.ndim != params[k].ndim:
            continue
        if _uses_fixed_table(config, k):
            raise CheckpointError(
                f"pretrained {k} {_shape(value)} is a fixed position table (fixed_pes) bound to its "
                f"resolution and cannot be resized to {_shape(params[k])}; fine-tune at the pretraining size")
        resized = _resize_position_table(k, value, params[k].shape)
        if resized is not None:
            logger.info(f"resized {k} from {_shape(value)} to {_shape(resized)} (bicubic)")
            sd[k] = resized

    _map_head(sd, own, config, logger)

    shapes = [f"{k} checkpoint {_shape(sd[k])} vs model {_shape(own[k])}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    missing = [k for k in own if k not in sd and k not in kept_buffers and not k.startswith(_HEAD_PREFIX)]
    if shapes or missing:
        raise CheckpointError(_mismatch_message(
            f"pretrained checkpoint {path} does not fit the model (different architecture or config)",
            missing, [], shapes, "use a checkpoint of the same model or fix MODEL.DAT in the config"))
    check_tensors(sd, own, f"pretrained checkpoint {path}")
    check_model_config(ckpt, config, f"pretrained checkpoint {path}")
    result = model.load_state_dict(sd, strict=False)
    if result.missing_keys:
        logger.info(f"kept the model's own values for {len(result.missing_keys)} tensors: "
                    f"{_list_names(result.missing_keys)}")
    if result.unexpected_keys:
        logger.warning(f"ignored {len(result.unexpected_keys)} checkpoint tensors the model does not have: "
                       f"{_list_names(result.unexpected_keys)}")
    logger.info(f"loaded pretrained weights from {path}")


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
