"""Validation accuracy over a (possibly distributed) val set, and forward throughput."""
from __future__ import annotations

import logging
import time
from typing import Callable, ContextManager, Dict

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import AverageMeter

from data import DataError
from data.skips import missing_ancestor
from distributed import all_reduce

__all__ = ['validate', 'throughput', 'memory_mb', 'reset_peak_memory', 'step_clock']


def memory_mb(device: torch.device) -> float:
    """Peak memory of this process since the last :func:`reset_peak_memory`: allocated GPU memory,
    or the resident set on the CPU."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:        # Linux: the resident-set peak, which /proc/self/clear_refs can reset
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0    # KiB on Linux, lifetime peak


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak for :func:`memory_mb` (on the CPU where the system allows it)."""
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        pass


def step_clock(device: torch.device, sync: bool) -> float:
    """``time.time()``, after the device has finished its queued work when ``sync`` (log steps only:
    a sync per step would stall the pipeline, and without one CUDA step times are launch times)."""
    if sync and device.type == 'cuda':
        torch.cuda.synchronize(device)
    return time.time()


@torch.no_grad()
def validate(model: nn.Module, loader, device: torch.device, autocast: Callable[[], ContextManager],
             logger: logging.Logger, print_freq: int) -> Dict[str, float]:
    """Top-1 / top-5 / loss over the whole val set. Counts are summed over ranks, so every image
    counts exactly once whatever the number of processes."""
    model.eval()
    reset_peak_memory(device)       # the figure logged is evaluation's own peak, not training's
    # correct@1, correct@5, summed loss, images, skipped images
    totals = torch.zeros(5, dtype=torch.float64, device=device)
    batch_time = AverageMeter()
    end = time.time()
    for idx, (images, targets, n_skipped) in enumerate(loader):
        totals[4] += int(n_skipped)
        if images.shape[0] == 0:
            continue
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast():
            output = model(images)
        output = output.float()
        k = min(5, output.shape[1])
        hits = output.topk(k, dim=1).indices.eq(targets[:, None])
        totals[0] += hits[:, :1].sum()
        totals[1] += hits.sum()
        totals[2] += F.cross_entropy(output, targets, reduction='sum').double()
        totals[3] += targets.numel()
        batch_time.update(time.time() - end)
        end = time.time()
        if idx % print_freq == 0:
            c1, c5, loss, n, _ = totals.tolist()
            n = max(n, 1.0)
            logger.info(f"Test: [{idx}/{len(loader)}]\tTime {batch_time.val:.3f} ({batch_time.avg:.3f})\t"
                        f"Loss {loss / n:.4f}\tAcc@1 {100 * c1 / n:.3f}\tAcc@5 {100 * c5 / n:.3f}\t"
                        f"Mem {memory_mb(device):.0f}MB")
    correct1, correct5, loss_sum, count, skipped = all_reduce(totals).tolist()
    if count == 0:
        root = getattr(getattr(loader, 'dataset', None), 'root', None)
        missing = missing_ancestor(root) if isinstance(root, str) else None
        if missing is not None:
            raise DataError(f"'{missing}' no longer exists (an unmounted share or a deleted folder?): no "
                            f"validation image could be read; make it available again and run the same "
                            f"command to resume from the last checkpoint")
        raise DataError(f"no readable validation images: every file in {root or 'the val folder'} failed to load")
    result = {'acc1': 100.0 * correct1 / count, 'acc5': 100.0 * correct5 / count,
              'loss': loss_sum / count, 'count': int(count), 'skipped_images': int(skipped)}
    logger.info(f" * Acc@1 {result['acc1']:.3f} Acc@5 {result['acc5']:.3f} Loss {result['loss']:.4f} "
                f"({result['count']} images, {result['skipped_images']} corrupt skipped)")
    return result


@torch.no_grad()
def throughput(model: nn.Module, batch_size: int, img_size: int, device: torch.device,
               autocast: Callable[[], ContextManager], logger: logging.Logger,
               warmup: int = 10, iters: int = 30) -> float:
    """Images per second of forward passes (synthetic input, eval mode)."""
    model.eval()
    images = torch.randn(batch_size, 3, img_size, img_size, device=device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    with autocast():
        for _ in range(warmup):
            model(images)
        sync()
        tic = time.time()
        for _ in range(iters):
            model(images)
        sync()
    rate = iters * batch_size / (time.time() - tic)
    logger.info(f"batch_size {batch_size} throughput {rate:.1f} images/s ({device.type})")
    return rate
