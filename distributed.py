"""Process-group set-up from torchrun's environment, and the collectives training needs.

A lone process (no ``WORLD_SIZE``) gets rank 0 of 1 and no process group; everything else
works unchanged, so one code path serves a laptop, ``torchrun`` and SLURM.
"""
from __future__ import annotations

import math
import os
import socket
import threading
import time
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

__all__ = ['LaunchError', 'RankLost', 'init_distributed', 'cleanup_distributed', 'is_dist', 'all_reduce', 'agree',
           'AgreementClock', 'is_collective_failure', 'lost_ranks', 'rank_lost']


class LaunchError(RuntimeError):
    """The process was started without a usable distributed environment (one line)."""


class RankLost(RuntimeError):
    """Another rank of the run died (killed, out of memory, its node lost); the message is one line.
    ``report``: whether this rank prints it (one rank does; every rank exits alike)."""

    def __init__(self, message: str, report: bool = True) -> None:
        super().__init__(message)
        self.report = report


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


class AgreementClock:
    """When the ranks next compare their stop requests: every ``interval`` seconds or so, at a step
    fixed in advance, so that every rank enters the collective at the same step whatever its own
    clock says. Each agreement also settles the next one: every rank proposes how many steps
    fill ``interval`` at its own pace, and the smallest proposal (the slowest rank's) is used."""

    def __init__(self, interval: float = 2.0) -> None:
        self.interval = interval
        self.next_step = 0
        self._since = time.monotonic()
        self._from = 0

    def start(self, step: int) -> None:
        """A new epoch (every rank alike): agree at its first step, then at the measured pace."""
        self.next_step = step
        self._since, self._from = time.monotonic(), step

    def due(self, step: int) -> bool:
        return step >= self.next_step

    def proposal(self, step: int) -> int:
        """Steps that take about ``interval`` seconds at this rank's pace since the last agreement."""
        per_step = (time.monotonic() - self._since) / max(step + 1 - self._from, 1)
        return int(min(max(math.floor(self.interval / max(per_step, 1e-6)), 1), 1_000_000))

    def agreed(self, step: int, steps: float) -> None:
        """All ranks agreed at ``step`` to compare again ``steps`` steps later."""
        self.next_step = step + max(int(steps), 1)
        self._since, self._from = time.monotonic(), step + 1


# Messages of collectives whose peer went away (gloo raises plain RuntimeErrors; a connection
# lost by c10d itself is a DistNetworkError). main.py then asks the store which ranks are left.
_PEER_GONE = ('Connection reset by peer', 'Connection closed by peer', 'Broken pipe', 'Connection refused',
              'gloo/transport')


def is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective (or the rendezvous store) failing because a peer is gone."""
    network_error = getattr(dist, 'DistNetworkError', None)
    if network_error is not None and isinstance(error, network_error):
        return True
    return isinstance(error, RuntimeError) and any(s in str(error) for s in _PEER_GONE)


def lost_ranks(rank: int, world_size: int, wait: float = 2.0) -> Optional[List[int]]:
    """After a failed collective: the ranks that do not check in with the rendezvous store within
    ``wait`` seconds. None when the store cannot be reached either (it lives in rank 0's process
    under SLURM and ``env://``, in torchrun's agent under torchrun)."""
    result: List[Optional[List[int]]] = [None]

    def check() -> None:
        try:
            # A plain connection first: c10d's own client prints a C++ stack trace when the store is gone.
            socket.create_connection((os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT'])),
                                     timeout=wait).close()
            store = dist.distributed_c10d._get_default_store()
            keys = [f'dat_alive_after_failure/{r}' for r in range(world_size)]
            store.set(keys[rank], '1')
            deadline = time.monotonic() + wait
            while True:
                present = [r for r in range(world_size) if store.check([keys[r]])]
                if len(present) == world_size or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            result[0] = [r for r in range(world_size) if r not in present]
        except Exception:       # the store is gone too (or this torch has no default store)
            pass

    # A store on a lost node may not answer at all: never wait longer than ``wait`` for it.
    thread = threading.Thread(target=check, daemon=True)
    thread.start()
    thread.join(wait + 1.0)
    return result[0]


def rank_lost(rank: int, world_size: int, checkpoint: Optional[str]) -> Optional[RankLost]:
    """The one-line account of a collective that failed because another rank died, naming it and
    ``checkpoint`` (the newest on disk); None when every rank answers (then the collective failed
    for another reason)."""
    lost = lost_ranks(rank, world_size)
    if lost is None:        # the rendezvous store went with it: under SLURM it lives in rank 0
        who, reporter = "rank 0 (which holds the rendezvous store)", 1
    elif not lost:
        return None
    else:
        who = f"rank{'s' if len(lost) > 1 else ''} {', '.join(map(str, lost))}"
        reporter = min(r for r in range(world_size) if r not in lost)
    resume = (f"run the same command again to resume from {checkpoint}" if checkpoint else
              "no checkpoint was saved yet: run the same command again to start over")
    return RankLost(f"{who} of {world_size} died (killed, out of memory, or its node was lost) and the other "
                    f"ranks stopped; {resume}", report=rank == reporter)
