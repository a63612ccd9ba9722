"""Process-group set-up from torchrun's environment, and the collectives training needs.

A lone process (no ``WORLD_SIZE``) gets rank 0 of 1 and no process group; everything else
works unchanged, so one code path serves a laptop, ``torchrun`` and SLURM.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

__all__ = ['LaunchError', 'init_distributed', 'cleanup_distributed', 'is_dist', 'all_reduce', 'agree']


class LaunchError(RuntimeError):
    """The process was started without a usable distributed environment (one line)."""


def _env_int(name: str, default: Optional[int] = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise LaunchError(f"environment variable {name} is not set; launch with torchrun "
                              f"(or set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)")
        return default
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed() -> Tuple[int, int, int, torch.device]:
    """``(rank, world_size, local_rank, device)`` from torchrun's environment.

    With ``WORLD_SIZE > 1`` a process group is created (NCCL on CUDA, gloo on CPU).
    """
    world_size = _env_int('WORLD_SIZE', 1)
    rank = _env_int('RANK') if world_size > 1 else _env_int('RANK', 0)
    local_rank = _env_int('LOCAL_RANK', rank if world_size > 1 else 0)
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise LaunchError(f"LOCAL_RANK is {local_rank} but only {torch.cuda.device_count()} GPUs are "
                              f"visible; use at most that many processes per node (--nproc_per_node)")
        torch.cuda.set_device(local_rank)
        device = torch.device('cuda', local_rank)
    else:
        device = torch.device('cpu')
    if world_size > 1 and not is_dist():
        for name in ('MASTER_ADDR', 'MASTER_PORT'):
            if not os.environ.get(name):
                raise LaunchError(f"WORLD_SIZE is {world_size} but {name} is not set; launch with torchrun")
        backend = 'nccl' if device.type == 'cuda' else 'gloo'
        # Binding NCCL to the device up front avoids guessing it at the first collective.
        extra = {'device_id': device} if backend == 'nccl' else {}
        dist.init_process_group(backend=backend, init_method='env://', rank=rank, world_size=world_size, **extra)
    return rank, world_size, local_rank, device


def is_dist() -> bool:
    """Whether a process group is up (the one place that asks)."""
    return dist.is_available() and dist.is_initialized()


def cleanup_distributed() -> None:
    if is_dist():
        dist.destroy_process_group()


def all_reduce(t: torch.Tensor, op: str = 'sum') -> torch.Tensor:
    """``op`` ('sum' or 'max') of ``t`` over all processes, as a new tensor; no host sync."""
    out = t.detach().clone()
    if is_dist():
        dist.all_reduce(out, op=dist.ReduceOp.SUM if op == 'sum' else dist.ReduceOp.MAX)
    return out


def agree(values: Sequence[float], device: torch.device) -> List[float]:
    """Element-wise maximum of small host values over all ranks, so every rank decides alike.

    A host round trip: call it every few steps, not every step."""
    if not is_dist():
        return [float(v) for v in values]
    return all_reduce(torch.tensor(list(values), dtype=torch.float64, device=device), op='max').tolist()
