"""The resume policy: which checkpoint a run continues from, whether its optimizer state and LR
schedule carry over, where in the epoch it continues, and which RNG state each rank takes.
"""
from __future__ import annotations

import logging
import os
from typing import List, Optional, Tuple

import torch

from .files import CheckpointError
from .runs import BEST_NAME, CheckpointManager

_VERSION_FLAGS = frozenset({'foreach', 'maximize', 'capturable', 'differentiable', 'fused',
                            'decoupled_weight_decay', 'initial_lr'})


def choose_resume_file(manager: CheckpointManager, auto_resume: bool, resume: str,
                       logger: logging.Logger) -> Optional[str]:
    """The checkpoint to resume from: with ``auto_resume`` the most advanced loadable one in the
    run folder (it wins over ``resume``, MODEL.RESUME, with a warning when they differ); else
    ``resume``, or None for a fresh start."""
    if auto_resume:
        latest = manager.latest()
        if latest:
            if resume and os.path.abspath(resume) != os.path.abspath(latest):
                logger.warning("auto-resume: continuing from %s instead of MODEL.RESUME %s", latest, resume)
            return latest
    return resume or None


def choose_eval_file(output_dir: str, resume: str, logger: logging.Logger) -> str:
    """The weights ``--eval`` loads: ``resume`` (MODEL.RESUME), else the most advanced loadable
    checkpoint in ``output_dir``; a one-line CheckpointError when there is neither."""
    path = resume or CheckpointManager(output_dir, logger=logger).latest()
    if not path:
        raise CheckpointError("--eval needs weights: pass --resume CHECKPOINT (ours or an official "
                              "release file)")
    return path


def check_optimizer(ckpt: dict, optimizer: torch.optim.Optimizer, source: str) -> None:
    """Refuse optimizer state saved by another optimizer (type or parameter groups)."""
    saved = ckpt.get('optimizer')
    fix = (f"its state cannot carry over; to start a new run from its weights, pass --pretrained {source} "
           f"with another --tag (or --output)")
    name = ckpt.get('optimizer_name')
    if name is not None and name != type(optimizer).__name__:
        raise CheckpointError(f"{source} was saved by optimizer {name}, this run uses "
                              f"{type(optimizer).__name__}: {fix}")
    if not isinstance(saved, dict) or not isinstance(saved.get('param_groups'), list):
        raise CheckpointError(f"{source} has no readable optimizer state: {fix}")
    groups, own = saved['param_groups'], optimizer.param_groups
    sizes, own_sizes = [len(g.get('params', ())) for g in groups], [len(g['params']) for g in own]
    if sizes != own_sizes:
        raise CheckpointError(f"{source} has optimizer parameter groups of sizes {sizes}, this run {own_sizes} "
                              f"(another optimizer or weight-decay grouping): {fix}")
    if name is not None:
        return
    # Without the name (Swin / official files) the settings tell optimizers apart; flags that
    # torch versions add or drop do not.
    keys = sorted((set(groups[0]) ^ set(own[0])) - _VERSION_FLAGS) if groups and own else []
    if keys:
        raise CheckpointError(f"{source} was saved by another optimizer (settings {', '.join(keys)} differ): "
                              f"{fix}")


def load_optimizer_state(ckpt: dict, optimizer: torch.optim.Optimizer, source: str) -> None:
    """Check (see :func:`check_optimizer`) and load the optimizer state of checkpoint ``source``;
    state that torch refuses becomes a one-line CheckpointError."""
    check_optimizer(ckpt, optimizer, source)
    try:
        optimizer.load_state_dict(ckpt['optimizer'])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"the optimizer state of {source} does not fit this run's optimizer "
                              f"({' '.join(str(e).split())}); to start a new run from its weights, pass "
                              f"--pretrained {source} with another --tag (or --output)") from None


def _saved_config(ckpt: dict) -> dict:
    """The config a checkpoint was trained with, as a dict: ours store it as YAML text, official
    files as a (rebuilt) CfgNode; {} when there is none or it does not parse."""
    saved = ckpt.get('config')
    if isinstance(saved, str):
        import yaml
        try:
            saved = yaml.safe_load(saved)
        except yaml.YAMLError:
            return {}
    return saved if isinstance(saved, dict) else {}


def restore_schedule(lr_scheduler, saved: Optional[dict]) -> List[str]:
    """Restore the checkpoint's LR schedule ``saved`` when the config describes the same one; when
    the config changed it (e.g. a lower TRAIN.BASE_LR after a divergence, more TRAIN.EPOCHS), keep
    the config's. Returns the schedule fields that differ (empty: the checkpoint's is in use, also
    when there is none)."""
    current = lr_scheduler.state_dict()
    if saved is None:
        return []
    if saved == current:
        lr_scheduler.load_state_dict(saved)
        return []
    return sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))


_SCHEDULE_KEYS = ('EPOCHS', 'WARMUP_EPOCHS', 'BASE_LR', 'WARMUP_LR', 'MIN_LR', 'ACCUMULATION_STEPS')
_SCHEDULER_KEYS = ('NAME', 'DECAY_EPOCHS', 'DECAY_RATE', 'SCALE_WARMUP_MIN')


def schedule_changes(ckpt: dict, config) -> List[str]:
    """``TRAIN.EPOCHS 2 -> 3``, ...: the schedule's config keys that differ from the checkpoint's
    saved config (empty when it has none)."""
    saved = _saved_config(ckpt)
    train = saved.get('TRAIN')
    if not isinstance(train, dict):
        return []
    pairs = [(f'TRAIN.{k}', train.get(k), config.TRAIN.get(k)) for k in _SCHEDULE_KEYS]
    scheduler = train.get('LR_SCHEDULER') if isinstance(train.get('LR_SCHEDULER'), dict) else {}
    pairs += [(f'TRAIN.LR_SCHEDULER.{k}', scheduler.get(k), config.TRAIN.LR_SCHEDULER.get(k)) for k in _SCHEDULER_KEYS]
    return [f'{key} {old:g} -> {new:g}' if isinstance(old, (int, float)) and isinstance(new, (int, float))
            else f'{key} {old} -> {new}' for key, old, new in pairs if old is not None and old != new]


def resume_position(ckpt: dict, iters_per_epoch: int, global_batch: int,
                    logger: Optional[logging.Logger] = None) -> Tuple[int, int, int]:
    """``(epoch, batch, repeated)``: where a run with ``global_batch`` images per iteration (all
    ranks together) continues from ``ckpt``, and how many images of the resumed epoch it sees twice.

    Our checkpoints record ``epoch``, ``iteration`` (batches done, None once the epoch ended) and
    ``samples_seen`` (images of that epoch consumed by all ranks). The samplers deal a fixed
    per-epoch permutation out in order, so after ``k`` batches of ``b`` images on ``w`` ranks the
    first ``k * b * w`` images of that permutation are done, whatever ``b`` and ``w`` were: the
    position is kept in images and converted to this run's batches. When it is not a whole
    number of this run's batches, the run restarts at the batch holding that image (``repeated``
    images are seen twice; none is skipped; ``logger`` warns of them). Swin / official files record
    the last finished epoch.
    """
    epoch = int(ckpt['epoch'])
    if 'iteration' not in ckpt:
        return epoch + 1, 0, 0
    iteration = ckpt['iteration']
    if iteration is None:
        return epoch + 1, 0, 0
    samples = ckpt.get('samples_seen')
    if not isinstance(samples, int) or samples < 0:
        samples = max(int(iteration), 0) * global_batch      # older files: assume the batch is unchanged
    batch = min(samples // global_batch, iters_per_epoch)
    repeated = samples - batch * global_batch if batch < iters_per_epoch else 0
    if repeated and logger is not None:
        logger.warning("the checkpoint's position, %d images into epoch %d, is not a whole number of this "
                       "run's batches of %d images (batch size or process count changed): resuming at batch "
                       "%d, so %d images of it are seen a second time", samples, epoch, global_batch, batch,
                       repeated)
    return epoch, batch, repeated


def rank_rng_state(ckpt: dict, rank: int, world_size: int, logger: logging.Logger) -> Optional[dict]:
    """The RNG state rank ``rank`` of ``world_size`` continues with: its own when the checkpoint was
    saved by as many ranks ('rng_ranks'), else rank 0's ('rng', with a warning when several ranks
    now share it); None when the checkpoint holds none."""
    rng = ckpt.get('rng')
    ranks = ckpt.get('rng_ranks')
    if ranks is not None and len(ranks) == world_size:
        return ranks[rank]
    if rng is not None and world_size > 1:
        logger.warning("checkpoint saved with another world size: ranks share rank 0's RNG state")
    return rng


def saved_img_size(ckpt: dict) -> Optional[int]:
    """``DATA.IMG_SIZE`` the checkpoint was trained at (from its saved config), or None."""
    data = _saved_config(ckpt).get('DATA')
    size = data.get('IMG_SIZE') if isinstance(data, dict) else None
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def set_aside_best(output_dir: str, old_size: int) -> Optional[str]:
    """At a change of resolution, keep the old resolution's ``best.pth`` as ``best_<size>px.pth``
    (accuracies at two sizes do not compare); returns the new name, None without a best.pth."""
    best = os.path.join(output_dir, BEST_NAME)
    if not os.path.isfile(best):
        return None
    kept = os.path.join(output_dir, f'best_{old_size}px.pth')
    try:
        os.replace(best, kept)
    except OSError as e:
        raise CheckpointError(f"cannot rename {best} to {kept} ({e.strerror or e}): check the output folder's "
                              f"permissions") from None
    return kept
