"""Pretrained loading, RNG state, distributed helpers and AMP gradient scaling.

Checkpoint files themselves (safe reading, atomic writes, resume) live in ``checkpoint.py``.
"""
from __future__ import annotations

import logging
import math
import os
import random
import re
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import (CheckpointError, _first_line, _list_names, _mismatch_message, _shape, check_model_config,
                        check_tensors, load_checkpoint_file, strip_prefixes, unwrap_model, unwrap_state_dict)

__all__ = [
    'load_pretrained', 'get_rng_state', 'set_rng_state',
    'init_distributed', 'cleanup_distributed', 'is_dist', 'get_rank', 'get_world_size',
    'is_main_process', 'all_reduce_sum', 'reduce_mean', 'barrier',
    'get_grad_norm', 'NativeScalerWithGradNormCount', 'AverageMeter',
]


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


# ============================================================================ RNG state
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


# ============================================================================ distributed
def _env_int(name: str, default: Optional[int] = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise RuntimeError(f"environment variable {name} is not set; launch with torchrun "
                               f"(or set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)")
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed() -> Tuple[int, int, int, torch.device]:
    """Set up this process from torchrun's environment; returns ``(rank, world_size, local_rank, device)``.

    With ``WORLD_SIZE > 1`` a process group is created (NCCL on CUDA, gloo on CPU). A single
    process (no environment) gets ``(0, 1, 0, cuda:0 or cpu)`` and no process group.
    """
    world_size = _env_int('WORLD_SIZE', 1)
    rank = _env_int('RANK') if world_size > 1 else _env_int('RANK', 0)
    local_rank = _env_int('LOCAL_RANK', rank if world_size > 1 else 0)
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK is {local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                               f"use at most that many processes per node (--nproc_per_node)")
        torch.cuda.set_device(local_rank)
        device = torch.device('cuda', local_rank)
    else:
        device = torch.device('cpu')
    if world_size > 1 and not is_dist():
        for name in ('MASTER_ADDR', 'MASTER_PORT'):
            if not os.environ.get(name):
                raise RuntimeError(f"WORLD_SIZE is {world_size} but {name} is not set; launch with torchrun")
        backend = 'nccl' if device.type == 'cuda' else 'gloo'
        # Binding NCCL to the device up front avoids guessing it at the first collective.
        extra = {'device_id': device} if backend == 'nccl' else {}
        dist.init_process_group(backend=backend, init_method='env://', rank=rank, world_size=world_size, **extra)
    return rank, world_size, local_rank, device


def cleanup_distributed() -> None:
    """Destroy the process group, if any (end of training)."""
    if is_dist():
        dist.destroy_process_group()


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over all processes, as a new tensor (``t`` itself is unchanged)."""
    out = t.detach().clone()
    if is_dist():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over all processes, as a new tensor."""
    return all_reduce_sum(t) / get_world_size()


# ============================================================================ gradients and AMP
def get_grad_norm(parameters: Union[torch.Tensor, Iterable[torch.Tensor]], norm_type: float = 2.0) -> float:
    """Total ``norm_type`` norm of the gradients of ``parameters`` (those without a grad are skipped)."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.nn.utils.get_total_norm(grads, norm_type=float(norm_type)))


class NativeScalerWithGradNormCount:
    """Backward, unscale, clip and step with ``torch.amp.GradScaler`` (Swin-style loss scaler).

    ``enabled=False`` (bf16 / fp32 training) keeps the same interface without scaling. After
    each update ``last_step_skipped`` says whether the optimizer step was skipped because the
    gradients were not finite: the scaler skips such steps itself, and without scaling they
    are skipped here so that a NaN never reaches the weights.
    """
    state_dict_key = 'amp_scaler'

    def __init__(self, enabled: bool = True, device: str = 'cuda'):
        self._scaler = torch.amp.GradScaler(device, enabled=enabled)
        self.last_step_skipped = False

    @property
    def enabled(self) -> bool:
        return self._scaler.is_enabled()

    def get_scale(self) -> float:
        """The current loss scale (1.0 when scaling is disabled)."""
        return float(self._scaler.get_scale()) if self.enabled else 1.0

    def __call__(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, clip_grad: Optional[float] = None,
                 parameters: Optional[Iterable[torch.Tensor]] = None, create_graph: bool = False,
                 update_grad: bool = True) -> Optional[float]:
        """Backward ``loss``; when ``update_grad`` also step ``optimizer`` and return the gradient norm
        (before clipping; may be inf / nan). Returns None while accumulating (``update_grad=False``)."""
        self._scaler.scale(loss).backward(create_graph=create_graph)
        self.last_step_skipped = False
        if not update_grad:
            return None
        params = list(parameters) if parameters is not None else [
            p for group in optimizer.param_groups for p in group['params']]
        self._scaler.unscale_(optimizer)   # clip and measure true gradients
        if clip_grad is not None and clip_grad > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(params, clip_grad))
        else:
            norm = get_grad_norm(params)
        if self.enabled:
            scale = self._scaler.get_scale()
            self._scaler.step(optimizer)
            self._scaler.update()
            # The scaler backs off its scale exactly when it found inf/nan and skipped the step.
            self.last_step_skipped = self._scaler.get_scale() < scale
        elif math.isfinite(norm):
            optimizer.step()
        else:
            self.last_step_skipped = True
        return norm

    def state_dict(self) -> Dict[str, Any]:
        return self._scaler.state_dict()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        # An fp16 run resumed in bf16 (or the reverse) has nothing to restore.
        if state_dict and self.enabled:
            self._scaler.load_state_dict(state_dict)


class AverageMeter:
    """Running value, sum, count and average of a metric."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.val = 0.0
        self.sum = 0.0
        self.count = 0
        self.avg = 0.0

    def update(self, val: Union[float, torch.Tensor], n: int = 1) -> None:
        val = float(val.item()) if isinstance(val, torch.Tensor) else float(val)
        self.val = val
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count if self.count else 0.0
