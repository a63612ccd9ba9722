"""Samplers for data-parallel training (resumable mid-epoch) and exact distributed evaluation.

Both work without ``torch.distributed``: replicas and rank then default to 1 and 0.

Evaluation with :class:`DistributedEvalSampler` pads nothing, so ranks may hold different
numbers of images; every rank must therefore all-reduce its *counts* (correct predictions and
images seen), never average per-rank accuracies.
"""
from __future__ import annotations

import math
from typing import Iterator, List, Optional, Sized, Tuple

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler

__all__ = ['ResumableDistributedSampler', 'DistributedEvalSampler', 'eval_indices', 'dist_info']


def dist_info(num_replicas: Optional[int] = None, rank: Optional[int] = None) -> Tuple[int, int]:
    """``(num_replicas, rank)``: the given values, else the process group's, else ``(1, 0)``."""
    initialized = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialized else 1
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f"invalid rank {rank} for {num_replicas} replicas: need 0 <= rank < num_replicas")
    return int(num_replicas), int(rank)


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` that can start an epoch at a given batch.

    Per epoch, every rank draws the same permutation from ``seed + epoch``, pads it (by
    repeating its head) to a multiple of ``num_replicas`` (or trims it with ``drop_last``) and
    takes every ``num_replicas``-th index from ``rank``: exactly ``DistributedSampler``'s order.
    ``set_epoch(epoch, start_batch=k)`` then drops the first ``k * batch_size`` indices of this
    rank's list, so a loader with the same ``batch_size`` resumes at batch ``k`` with exactly the
    batches an uninterrupted epoch would still have produced. The skip holds for every
    iteration until the next ``set_epoch`` call.
    """

    def __init__(self, dataset: Sized, num_replicas: Optional[int] = None, rank: Optional[int] = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False, batch_size: int = 1) -> None:
        num_replicas, rank = dist_info(num_replicas, rank)
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=drop_last)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Use epoch ``epoch``'s order and skip its first ``start_batch`` batches."""
        full = self.num_samples // self.batch_size
        if not 0 <= start_batch <= full:
            raise ValueError(f"start_batch {start_batch} is outside this epoch's 0..{full} batches "
                             f"({self.num_samples} samples per rank, batch size {self.batch_size})")
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def epoch_indices(self) -> List[int]:
        """This rank's full index list for the current epoch (before the resume skip)."""
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(n, generator=g).tolist()
        else:
            indices = list(range(n))
        if self.drop_last:
            indices = indices[:self.total_size]
        elif self.total_size > n:
            pad = self.total_size - n
            indices += (indices * math.ceil(pad / n))[:pad]
        return indices[self.rank:self.total_size:self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.start_batch * self.batch_size:])

    def __len__(self) -> int:
        return self.num_samples - self.start_batch * self.batch_size


def eval_indices(n: int, rank: int, world: int) -> range:
    """Indices ``rank, rank + world, ...`` below ``n``: each index lands on exactly one rank."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"invalid rank {rank} for world size {world}: need 0 <= rank < world")
    return range(rank, n, world)


class DistributedEvalSampler(Sampler[int]):
    """Strided, unpadded, unshuffled split of a dataset across ranks for evaluation.

    Unlike ``DistributedSampler`` no index is repeated, so metrics summed over ranks count
    every image exactly once (ranks may differ in length by one).
    """

    def __init__(self, dataset: Sized, num_replicas: Optional[int] = None, rank: Optional[int] = None) -> None:
        self.dataset = dataset
        self.num_replicas, self.rank = dist_info(num_replicas, rank)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Accepted for interface compatibility; the order never changes."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(eval_indices(len(self.dataset), self.rank, self.num_replicas))  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(eval_indices(len(self.dataset), self.rank, self.num_replicas))  # type: ignore[arg-type]
