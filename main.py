"""Train, evaluate or time DAT / DAT++ on an ImageNet-style folder (Swin-style entry point).

    torchrun --nproc_per_node 8 main.py --cfg configs/dat_tiny.yaml --data-path /imagenet --amp
    python main.py --cfg configs/dat_tiny.yaml --eval --resume dat_pp_tiny.pth --data-path /imagenet
    python main.py --cfg configs/dat_tiny.yaml --throughput --batch-size 64

One code path serves one CPU process, ``torchrun`` on CPU (gloo) and ``torchrun`` / SLURM on GPUs
(NCCL). Runs are restartable at any moment: checkpoints are written atomically, the newest loadable
one is picked up automatically (``TRAIN.AUTO_RESUME``) and restores the exact trajectory, and
SIGTERM / SIGUSR1 make every rank finish its step, save and exit with status 0 (requeue-friendly).

Exit status: 0 success or preempted-and-saved; 2 a problem in the config, data, a checkpoint or
the launch environment (one line on stderr, no traceback); 3 training stopped because the loss
stayed non-finite (one line too; the last good checkpoint is left as it was).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import random
import resource
import signal
import sys
import time
from contextlib import nullcontext
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from torch.nn.parallel import DistributedDataParallel

from checkpoint import (CheckpointError, CheckpointManager, RunLock, check_model_config, check_optimizer,
                        load_checkpoint_file, load_model_state, model_config, prepare_output_dir,
                        resume_position, unwrap_state_dict)
from config import ConfigError, get_config
from data import DataError, build_loader
from logger import create_logger
from lr_scheduler import build_scheduler
from models import build_model
from optimizer import build_optimizer
from utils import (AverageMeter, NativeScalerWithGradNormCount, all_reduce_sum, get_rng_state,
                   init_distributed, load_pretrained, set_rng_state)

EXIT_USER_ERROR = 2      # config / data / checkpoint problem, reported in one line
EXIT_DIVERGED = 3        # the loss stayed non-finite for TRAIN.MAX_NONFINITE_STEPS steps


class TrainingDiverged(RuntimeError):
    """Training stopped because the loss was non-finite too many optimizer steps in a row."""


class ModelInputError(ValueError):
    """The model cannot be built for, or run at, the configured input size."""


class LaunchError(RuntimeError):
    """The process was started without a usable distributed environment."""


# ----------------------------------------------------------------------------- command line
def parse_option(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, Any]:
    """Parse the Swin / official command line and return ``(args, frozen config)``."""
    parser = argparse.ArgumentParser('DAT training and evaluation', add_help=True)
    parser.add_argument('--cfg', type=str, metavar='FILE', help='path to a config YAML')
    parser.add_argument('--opts', nargs='+', default=None, metavar='KEY VALUE',
                        help="override config keys, e.g. --opts TRAIN.EPOCHS 30 DATA.NUM_WORKERS 4")
    parser.add_argument('--batch-size', type=int, help='batch size per process (GPU)')
    parser.add_argument('--data-path', type=str, default=os.environ.get('DAT_DATA_PATH') or None,
                        help='dataset root with train/ and val/ (default: $DAT_DATA_PATH)')
    parser.add_argument('--resume', type=str, help='checkpoint to resume from or to evaluate')
    parser.add_argument('--pretrained', type=str, help='weights to fine-tune from (model only)')
    parser.add_argument('--amp', action='store_true', help='mixed precision (autocast)')
    parser.add_argument('--amp-dtype', choices=['float16', 'bfloat16'], help='autocast dtype')
    parser.add_argument('--use-checkpoint', action='store_true',
                        help='gradient checkpointing, to save memory')
    parser.add_argument('--output', default='output', type=str, metavar='PATH',
                        help='root of output folders: <output>/<MODEL.NAME>/<tag>')
    parser.add_argument('--tag', type=str, help='experiment tag (default: TAG of the config)')
    parser.add_argument('--eval', action='store_true', help='evaluate a checkpoint only')
    parser.add_argument('--throughput', action='store_true', help='measure images/s only')
    parser.add_argument('--print-freq', type=int, help='log every N iterations')
    # torch.distributed.launch passes this; torchrun sets LOCAL_RANK in the environment instead.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    return args, get_config(args)


# ----------------------------------------------------------------------------- setup
def _configure_determinism(config) -> None:
    """Reproducible kernels and thread counts when ``DETERMINISTIC``; fast autotuning otherwise."""
    if config.DETERMINISTIC:
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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _scale_lr(config, world_size: int):
    """Linear scaling rule: the config's learning rates are per 512 images of global batch."""
    factor = config.DATA.BATCH_SIZE * world_size * config.TRAIN.ACCUMULATION_STEPS / 512.0
    config.defrost()
    config.TRAIN.BASE_LR = config.TRAIN.BASE_LR * factor
    config.TRAIN.WARMUP_LR = config.TRAIN.WARMUP_LR * factor
    config.TRAIN.MIN_LR = config.TRAIN.MIN_LR * factor
    config.freeze()
    return config


def _amp_settings(config, device: torch.device, logger: logging.Logger) -> Tuple[bool, torch.dtype]:
    """(autocast enabled, dtype); fp16 autocast is dropped on CPU, where bf16 is the supported type."""
    dtype = torch.bfloat16 if config.AMP_DTYPE == 'bfloat16' else torch.float16
    enabled = bool(config.AMP)
    if enabled and device.type != 'cuda' and dtype == torch.float16:
        logger.warning("AMP float16 needs CUDA; training in float32 on %s (use --amp-dtype bfloat16 "
                       "for mixed precision on CPU)", device.type)
        enabled = False
    return enabled, dtype


def _build_model(config, device: torch.device) -> nn.Module:
    """Build the model and run one tiny forward pass, so that an input size the architecture cannot
    handle is reported now, in one line, rather than as a traceback from inside the first step."""
    try:
        model = build_model(config)
        model.to(device)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            size = config.DATA.IMG_SIZE
            model(torch.zeros(1, 3, size, size, device=device))
        model.train(was_training)
    except ConfigError:
        raise
    except ValueError as e:
        raise ModelInputError(f"model '{config.MODEL.NAME}' at DATA.IMG_SIZE {config.DATA.IMG_SIZE}: "
                              f"{e}") from None
    return model


def _build_criterion(config, mixup_fn) -> nn.Module:
    if mixup_fn is not None:
        return SoftTargetCrossEntropy()          # mixup / cutmix already smooth the labels
    if config.MODEL.LABEL_SMOOTHING > 0.0:
        return nn.CrossEntropyLoss(label_smoothing=config.MODEL.LABEL_SMOOTHING)
    return nn.CrossEntropyLoss()


def _memory_mb(device: torch.device) -> float:
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0    # Linux: KiB


def state_digest(module: nn.Module) -> str:
    """SHA-256 over every parameter and buffer (names, dtypes and bytes): equal digests on two
    ranks mean bit-identical replicas."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b'')
    return h.hexdigest()


# ----------------------------------------------------------------------------- preemption
class StopRequest:
    """Remembers that SIGTERM / SIGUSR1 arrived; the training loop acts on it between steps.

    The handler only sets a flag: logging or saving inside a signal handler can deadlock.
    """
    SIGNALS = ('SIGTERM', 'SIGUSR1')

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def install(self) -> None:
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None


# ----------------------------------------------------------------------------- the run
class Trainer:
    """The objects of one run and the operations on them (train, validate, save, resume)."""

    def __init__(self, config, rank: int, world_size: int, device: torch.device,
                 logger: logging.Logger) -> None:
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.logger = logger
        self.amp, self.amp_dtype = _amp_settings(config, device, logger)
        self.stop = StopRequest()
        self.max_accuracy = 0.0
        self.start_epoch = config.TRAIN.START_EPOCH
        self.start_iter = 0
        self.pending_rng: Optional[dict] = None     # restored after the resumed epoch's loader starts
        self.nonfinite_streak = 0
        self.last_checkpoint: Optional[str] = None
        self.tb_writer = None

    # ------------------------------------------------------------------ building
    def build(self, with_data: bool = True) -> None:
        config, logger = self.config, self.logger
        self.mixup_fn = None
        if with_data:
            (self.dataset_train, self.dataset_val, self.loader_train, self.loader_val,
             self.mixup_fn) = build_loader(config)
            logger.info("data: %d train / %d val images, %d classes, %d train iterations per epoch",
                        len(self.dataset_train), len(self.dataset_val), len(self.dataset_val.classes),
                        len(self.loader_train))

        logger.info("creating model %s/%s", config.MODEL.TYPE, config.MODEL.NAME)
        self.model_without_ddp = _build_model(config, self.device)
        n_parameters = sum(p.numel() for p in self.model_without_ddp.parameters() if p.requires_grad)
        logger.info("number of trainable parameters: %d", n_parameters)
        # The training forward goes through torch.compile and DDP; checkpoints, evaluation and
        # the optimizer see the bare model (plain parameter names).
        self.model: nn.Module = self.model_without_ddp
        if config.TRAIN.COMPILE:
            self.model = torch.compile(self.model)
        if dist.is_available() and dist.is_initialized() and self.world_size > 1:
            device_ids = [self.device.index] if self.device.type == 'cuda' else None
            self.model = DistributedDataParallel(self.model, device_ids=device_ids, broadcast_buffers=False)

        if not with_data or config.EVAL_MODE:
            return
        self.n_iter = len(self.loader_train)
        try:    # their ValueErrors are one-line config problems (epochs vs warm-up, lower_lr_kvs, ...)
            self.optimizer = build_optimizer(config, self.model_without_ddp)
            self.lr_scheduler = build_scheduler(config, self.optimizer,
                                                self.n_iter // config.TRAIN.ACCUMULATION_STEPS)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.loss_scaler = NativeScalerWithGradNormCount(
            enabled=self.amp and self.amp_dtype == torch.float16 and self.device.type == 'cuda',
            device=self.device.type)
        self.criterion = _build_criterion(config, self.mixup_fn)
        self.ema = None
        if config.TRAIN.EMA.ENABLE:
            from timm.utils import ModelEmaV2      # imported lazily: timm is slow to import
            self.ema = ModelEmaV2(self.model_without_ddp, decay=config.TRAIN.EMA.DECAY)
        self.manager = CheckpointManager(config.OUTPUT, keep_last=config.TRAIN.KEEP_CHECKPOINTS,
                                         logger=logger)
        if self.rank == 0 and config.TENSORBOARD:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb_writer = SummaryWriter(os.path.join(config.OUTPUT, 'tensorboard'))
            except ImportError:
                logger.warning("TENSORBOARD is on but tensorboard is not installed; not logging to it")

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_state(self) -> dict:
        """Everything needed to continue bit-for-bit; only tensors and plain values (weights_only).

        CheckpointManager.save adds the progress: 'epoch' and 'iteration' (batches done in that
        epoch, or None once the epoch is finished and validated); ``save`` adds 'samples_seen'.
        'model_config' (the MODEL node) lets a later resume, --eval or --pretrained refuse a
        model whose arithmetic differs."""
        state = {
            'model': self.model_without_ddp.state_dict(),
            'optimizer': self.optimizer.state_dict(),
            'optimizer_name': type(self.optimizer).__name__,
            'lr_scheduler': self.lr_scheduler.state_dict(),
            'scaler': self.loss_scaler.state_dict(),
            'max_accuracy': float(self.max_accuracy),
            'config': self.config.dump(),
            'model_config': model_config(self.config),
            'rng': get_rng_state(),
        }
        if self.world_size > 1:
            ranks: List[Any] = [None] * self.world_size
            dist.all_gather_object(ranks, state['rng'])
            state['rng_ranks'] = ranks
        if self.ema is not None:
            state['ema'] = self.ema.module.state_dict()
        return state

    def _global_batch(self) -> int:
        """Images one training iteration consumes on all ranks together."""
        return self.config.DATA.BATCH_SIZE * self.world_size

    def save(self, epoch: int, iteration: Optional[int] = None, is_best: bool = False) -> None:
        """Checkpoint ``iteration`` batches into ``epoch`` (None: the finished, validated epoch).

        Collective: every rank calls it (RNG states are gathered); rank 0 writes the file, and
        every rank stops with rank 0's one-line error when the write failed."""
        state = self._checkpoint_state()
        # The position in images, so that a run with another batch size or process count resumes
        # at the right image (see checkpoint.resume_position).
        state['samples_seen'] = None if iteration is None else int(iteration) * self._global_batch()
        error = None
        if self.rank == 0:
            try:
                self.last_checkpoint = self.manager.save(state, epoch, iteration=iteration, is_best=is_best)
            except CheckpointError as e:
                error = str(e)
        if self.world_size > 1:
            shared = [error]
            dist.broadcast_object_list(shared, src=0)
            error = shared[0]
        if error is not None:
            self._close_tensorboard_quietly()
            raise CheckpointError(error)

    def _close_tensorboard_quietly(self) -> None:
        """A failed save ends the run: close TensorBoard now and ignore its own errors (on a full
        disk its flush fails too), so that the error reported is the checkpoint's."""
        writer, self.tb_writer = self.tb_writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:
                pass

    def _resume_file(self) -> Optional[str]:
        """The checkpoint to resume from, as rank 0 sees it: every rank must load the same file.

        Rank 0 first takes the run folder's lock (it writes the checkpoints): a second run into the
        same folder stops here, before it has touched a file. Its errors reach every rank."""
        path = error = None
        if self.rank == 0:
            try:
                self.manager.lock()
                path = self._find_resume_file()
            except CheckpointError as e:
                error = str(e)
        if self.world_size > 1:
            shared = [path, error]
            dist.broadcast_object_list(shared, src=0)
            path, error = shared
        if error is not None:
            raise CheckpointError(error)
        if self.world_size > 1:
            if path and not os.path.isfile(path):
                raise CheckpointError(f"rank {self.rank} cannot see {path}, which rank 0 resumes from: put "
                                      f"OUTPUT (and MODEL.RESUME) on a file system shared by all nodes")
        return path

    def _find_resume_file(self) -> Optional[str]:
        config = self.config
        if config.TRAIN.AUTO_RESUME:
            latest = self.manager.latest()
            if latest:
                if config.MODEL.RESUME and os.path.abspath(config.MODEL.RESUME) != os.path.abspath(latest):
                    self.logger.warning("auto-resume: continuing from %s instead of MODEL.RESUME %s",
                                        latest, config.MODEL.RESUME)
                return latest
        return config.MODEL.RESUME or None

    def _restore_schedule(self, saved: Optional[dict]) -> None:
        """Restore the checkpoint's LR schedule when the config describes the same one; when the
        config changed it (e.g. a lower TRAIN.BASE_LR after a divergence), keep the config's."""
        current = self.lr_scheduler.state_dict()
        self._schedule_restored = saved is None or saved == current
        if saved is not None and self._schedule_restored:
            self.lr_scheduler.load_state_dict(saved)
        elif saved is not None:
            changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
            self.logger.warning("the config's learning-rate schedule differs from the checkpoint's (%s): "
                                "continuing with the config's", ', '.join(changed))

    def resume(self) -> bool:
        """Restore the newest checkpoint (or MODEL.RESUME); returns whether anything was loaded."""
        path = self._resume_file()
        if not path:
            return False
        self.logger.info("resuming from %s", path)
        ckpt = load_checkpoint_file(path)
        # Names and shapes first (they say most about another architecture), then the arithmetic.
        load_model_state(self.model_without_ddp, unwrap_state_dict(ckpt), strict=True, source=f"checkpoint {path}")
        check_model_config(ckpt, self.config, f"checkpoint {path}")
        if not isinstance(ckpt, dict) or 'optimizer' not in ckpt:
            self.logger.info("%s holds model weights only: starting from epoch %d", path, self.start_epoch)
            return True
        check_optimizer(ckpt, self.optimizer, path)
        try:
            self.optimizer.load_state_dict(ckpt['optimizer'])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"the optimizer state of {path} does not fit this run's optimizer "
                                  f"({' '.join(str(e).split())}); to start a new run from its weights, pass "
                                  f"--pretrained {path} with another --tag (or --output)") from None
        self._restore_schedule(ckpt.get('lr_scheduler'))
        if 'scaler' in ckpt:
            self.loss_scaler.load_state_dict(ckpt['scaler'])
        self.max_accuracy = float(ckpt.get('max_accuracy', 0.0))
        self.start_epoch, self.start_iter, repeated = resume_position(ckpt, self.n_iter, self._global_batch())
        if repeated:
            self.logger.warning("the checkpoint's position, %d images into epoch %d, is not a whole number of "
                                "this run's batches of %d images (batch size or process count changed): "
                                "resuming at batch %d, so %d images of it are seen a second time",
                                ckpt['samples_seen'], self.start_epoch, self._global_batch(), self.start_iter,
                                repeated)
        if self.ema is not None and 'ema' in ckpt:
            load_model_state(self.ema.module, ckpt['ema'], strict=True, source=f"EMA weights of {path}")
        rng = ckpt.get('rng')
        ranks = ckpt.get('rng_ranks')
        if ranks is not None and len(ranks) == self.world_size:
            rng = ranks[self.rank]
        elif rng is not None and self.world_size > 1:
            self.logger.warning("checkpoint saved with another world size: ranks share rank 0's RNG state")
        self.pending_rng = rng
        if not self._schedule_restored and (self.start_epoch or self.start_iter):
            # The config's new schedule takes effect from the first resumed step.
            done = self.start_epoch * self.n_iter + self.start_iter
            self.lr_scheduler.step_update(max(done - 1, 0) // self.config.TRAIN.ACCUMULATION_STEPS)
        self.logger.info("resumed: epoch %d, iteration %d, max accuracy %.2f%%",
                         self.start_epoch, self.start_iter, self.max_accuracy)
        return True

    # ------------------------------------------------------------------ training
    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.amp)

    def _agree(self, *flags: float) -> List[float]:
        """Sum small per-rank flags over all ranks (one all-reduce), so every rank decides alike."""
        if self.world_size == 1:
            return list(flags)
        return all_reduce_sum(torch.tensor(flags, dtype=torch.float32, device=self.device)).tolist()

    def _loss_scale(self) -> float:
        scaler = getattr(self.loss_scaler, '_scaler', None)
        return float(scaler.get_scale()) if self.loss_scaler.enabled and scaler is not None else 1.0

    def train_one_epoch(self, epoch: int, start_batch: int) -> bool:
        """Train one epoch from batch ``start_batch``; returns True when stopped by a signal.

        Every micro-batch the ranks agree (tiny all-reduces, only with several processes) on
        whether some rank has no images (all corrupt) or got a stop signal, and then whether some
        rank's loss is non-finite. An accumulation window with such a micro-batch is dropped on
        every rank alike (no optimizer step), which keeps DDP's collectives paired and the
        replicas identical.
        """
        config, logger, model = self.config, self.logger, self.model
        accum = config.TRAIN.ACCUMULATION_STEPS
        num_steps = self.n_iter
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        batch_time, loss_meter, norm_meter = AverageMeter(), AverageMeter(), AverageMeter()
        n_skipped_images = n_dropped_steps = 0
        window_dropped = window_nonfinite = False

        loader_iter = iter(self.loader_train)
        if self.pending_rng is not None:
            # A mid-epoch checkpoint was taken with this epoch's loader already started: restore
            # the RNGs only now, so that starting the loader here does not shift them.
            set_rng_state(self.pending_rng)
            self.pending_rng = None
        end = time.time()
        for idx, (images, targets, n_skipped) in enumerate(loader_iter, start=start_batch):
            n_skipped_images += int(n_skipped)
            boundary = (idx + 1) % accum == 0 or idx + 1 == num_steps
            images = images.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            if self.mixup_fn is not None and images.shape[0] > 0:
                images, targets = self.mixup_fn(images, targets)   # may drop one sample of an odd batch
            # Agreed before the forward: a rank without images (all corrupt) makes every rank skip
            # this micro-batch, so that DDP's forwards and collectives stay paired across ranks.
            any_empty, any_stop = self._agree(float(images.shape[0] == 0), float(self.stop.requested))
            window_dropped |= bool(any_empty)
            loss = grad_norm = None
            if not window_dropped:
                sync = boundary or not isinstance(model, DistributedDataParallel)
                with (nullcontext() if sync else model.no_sync()):
                    with self._autocast():
                        outputs = model(images)
                    loss = self.criterion(outputs.float(), targets)
                    (any_nonfinite,) = self._agree(float(not bool(torch.isfinite(loss.detach()))))
                    if any_nonfinite:
                        logger.warning("non-finite loss at epoch %d iteration %d: optimizer step skipped",
                                       epoch, idx)
                        window_nonfinite = True
                    # Backward even then: DDP expects one after every forward. The step is dropped.
                    grad_norm = self.loss_scaler(loss / accum, self.optimizer, clip_grad=config.TRAIN.CLIP_GRAD,
                                                 parameters=model.parameters(),
                                                 update_grad=boundary and not window_nonfinite)
                window_dropped |= window_nonfinite
            if not boundary:
                continue

            # ---- end of an accumulation window: an optimizer step was taken or skipped
            stepped = not window_dropped and not self.loss_scaler.last_step_skipped
            if not window_dropped and self.loss_scaler.last_step_skipped and not self.loss_scaler.enabled:
                # Finite loss, non-finite gradients (without a grad scaler, which handles its own).
                logger.warning("non-finite gradients at epoch %d iteration %d: optimizer step skipped",
                               epoch, idx)
                window_nonfinite = True
            n_dropped_steps += int(not stepped)
            self.nonfinite_streak = self.nonfinite_streak + 1 if window_nonfinite else 0
            window_dropped = window_nonfinite = False
            self.optimizer.zero_grad(set_to_none=True)
            self.lr_scheduler.step_update((epoch * num_steps + idx) // accum)
            if self.nonfinite_streak >= config.TRAIN.MAX_NONFINITE_STEPS:
                self._diverged(epoch, idx)
            # This step's values (nan when skipped) and running averages over the steps taken.
            loss_val = loss.item() if loss is not None else float('nan')
            norm_val = float(grad_norm) if grad_norm is not None else float('nan')
            if stepped:
                if self.ema is not None:
                    self.ema.update(self.model_without_ddp)
                loss_meter.update(loss_val, targets.size(0))
                norm_meter.update(norm_val)
            batch_time.update(time.time() - end)
            end = time.time()

            if idx % config.PRINT_FREQ == 0 or idx + 1 == num_steps:
                lr = self.optimizer.param_groups[0]['lr']
                wd = self.optimizer.param_groups[0].get('weight_decay', 0.0)
                etas = batch_time.avg * (num_steps - idx - 1)
                logger.info(
                    f"Train: [{epoch}/{config.TRAIN.EPOCHS}][{idx}/{num_steps}]\t"
                    f"eta {datetime.timedelta(seconds=int(etas))} lr {lr:.6f}\t wd {wd:.4f}\t"
                    f"time {batch_time.val:.4f} ({batch_time.avg:.4f})\t"
                    f"loss {loss_val:.4f} ({loss_meter.avg:.4f})\t"
                    f"grad_norm {norm_val:.4f} ({norm_meter.avg:.4f})\t"
                    f"loss_scale {self._loss_scale():.1f}\t"
                    f"mem {_memory_mb(self.device):.0f}MB")
                if self.tb_writer is not None:
                    step = epoch * num_steps + idx
                    self.tb_writer.add_scalar('train/loss', loss_val, step)
                    self.tb_writer.add_scalar('train/lr', lr, step)
                    self.tb_writer.add_scalar('train/grad_norm', norm_val, step)
                    # images/s of the whole job (all ranks), from this rank's step time
                    images = targets.size(0) * self.world_size
                    self.tb_writer.add_scalar('train/throughput', images / max(batch_time.val, 1e-9), step)
                    self.tb_writer.add_scalar('train/memory_mb', _memory_mb(self.device), step)

            done = idx + 1
            if any_stop:
                self._preempted(epoch, done)
                return True
            freq = config.TRAIN.SAVE_ITER_FREQ
            if freq > 0 and done % freq == 0 and done < num_steps:
                self.save(epoch, done)

        self.epoch_summary = {'train_loss': loss_meter.avg, 'skipped_images': n_skipped_images,
                              'skipped_steps': n_dropped_steps, 'epoch_time': batch_time.sum}
        logger.info("epoch %d done in %s: train loss %.4f, %d corrupt images skipped, %d optimizer "
                    "steps skipped", epoch, datetime.timedelta(seconds=int(batch_time.sum)),
                    loss_meter.avg, n_skipped_images, n_dropped_steps)
        return False

    def _diverged(self, epoch: int, idx: int) -> None:
        """Stop without saving: the state in memory is not trusted, the files on disk are."""
        kept = self.last_checkpoint or self.manager.latest()
        raise TrainingDiverged(
            f"the loss was non-finite for {self.nonfinite_streak} optimizer steps in a row (epoch {epoch}, "
            f"iteration {idx}, TRAIN.MAX_NONFINITE_STEPS {self.config.TRAIN.MAX_NONFINITE_STEPS}); stopped "
            f"without saving. " + (f"Last good checkpoint: {kept}. " if kept else 'No checkpoint was saved. ')
            + "Lower TRAIN.BASE_LR, lengthen TRAIN.WARMUP_EPOCHS or train without --amp, then run again")

    def _preempted(self, epoch: int, done: int) -> None:
        name = signal.Signals(self.stop.signum).name if self.stop.signum else 'a signal on another rank'
        self.logger.info("stop requested (%s): saving epoch %d iteration %d", name, epoch, done)
        self.save(epoch, done)
        job = os.environ.get('SLURM_JOB_ID')
        if job:
            self.logger.info("state saved; SLURM job %s can be requeued (scontrol requeue %s) and will "
                             "resume from it", job, job)
        else:
            self.logger.info("state saved; run the same command again to resume")

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def validate(self, model: Optional[nn.Module] = None) -> Dict[str, float]:
        """Top-1 / top-5 / loss over the whole val set; counts are summed over ranks, so every image
        counts exactly once whatever the number of processes."""
        config, logger = self.config, self.logger
        model = model if model is not None else self.model_without_ddp
        model.eval()
        # correct@1, correct@5, summed loss, images, skipped images
        totals = torch.zeros(5, dtype=torch.float64, device=self.device)
        batch_time = AverageMeter()
        end = time.time()
        for idx, (images, targets, n_skipped) in enumerate(self.loader_val):
            totals[4] += int(n_skipped)
            if images.shape[0] == 0:
                continue
            images = images.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            with self._autocast():
                output = model(images)
            output = output.float()
            k = min(5, output.shape[1])
            top = output.topk(k, dim=1).indices
            hits = top.eq(targets[:, None])
            totals[0] += hits[:, :1].sum()
            totals[1] += hits.sum()
            totals[2] += F.cross_entropy(output, targets, reduction='sum').double()
            totals[3] += targets.numel()
            batch_time.update(time.time() - end)
            end = time.time()
            if idx % config.PRINT_FREQ == 0:
                n = max(totals[3].item(), 1.0)
                logger.info(f"Test: [{idx}/{len(self.loader_val)}]\tTime {batch_time.val:.3f} "
                            f"({batch_time.avg:.3f})\tLoss {totals[2].item() / n:.4f}\t"
                            f"Acc@1 {100 * totals[0].item() / n:.3f}\tAcc@5 {100 * totals[1].item() / n:.3f}\t"
                            f"Mem {_memory_mb(self.device):.0f}MB")
        if self.world_size > 1:
            totals = all_reduce_sum(totals)
        correct1, correct5, loss_sum, count, skipped = totals.tolist()
        if count == 0:
            raise DataError("no readable validation images: every file in the val folder failed to load")
        result = {'acc1': 100.0 * correct1 / count, 'acc5': 100.0 * correct5 / count,
                  'loss': loss_sum / count, 'count': int(count), 'skipped_images': int(skipped)}
        logger.info(f" * Acc@1 {result['acc1']:.3f} Acc@5 {result['acc5']:.3f} "
                    f"Loss {result['loss']:.4f} ({result['count']} images, "
                    f"{result['skipped_images']} corrupt skipped)")
        return result

    # ------------------------------------------------------------------ the loop
    def fit(self) -> int:
        config, logger = self.config, self.logger
        if not self.resume() and config.MODEL.PRETRAINED:
            load_pretrained(config, self.model_without_ddp, logger)
        if self.rank == 0:  # written once data, model and checkpoint work: a failed start changes nothing
            with open(os.path.join(config.OUTPUT, 'config.yaml'), 'w') as f:
                f.write(config.dump())
        if self.pending_rng is not None and self.start_iter == 0:
            set_rng_state(self.pending_rng)     # an epoch boundary: continue exactly from here
            self.pending_rng = None
        self.stop.install()
        try:
            return self._loop()
        finally:
            self.stop.uninstall()
            if self.tb_writer is not None:
                self.tb_writer.close()

    def _loop(self) -> int:
        config, logger = self.config, self.logger
        logger.info("start training: epochs %d..%d", self.start_epoch, config.TRAIN.EPOCHS - 1)
        start_time = time.time()
        for epoch in range(self.start_epoch, config.TRAIN.EPOCHS):
            self.loader_train.sampler.set_epoch(epoch, start_batch=self.start_iter)
            start_batch, self.start_iter = self.start_iter, 0
            if self.train_one_epoch(epoch, start_batch):
                return 0
            result = self.validate()
            logger.info(f"Accuracy of the network on the {result['count']} test images: "
                        f"{result['acc1']:.2f}%")
            is_best = result['acc1'] > self.max_accuracy
            self.max_accuracy = max(self.max_accuracy, result['acc1'])
            logger.info(f"Max accuracy: {self.max_accuracy:.2f}%")
            ema_result = None
            if self.ema is not None:
                ema_result = self.validate(self.ema.module)
                logger.info(f"EMA accuracy: {ema_result['acc1']:.2f}%")
            last = epoch == config.TRAIN.EPOCHS - 1
            if epoch % config.SAVE_FREQ == 0 or last or is_best:
                self.save(epoch, is_best=is_best)
            self._record(epoch, result, ema_result)
            if self._agree(float(self.stop.requested))[0]:      # every rank takes part
                if not (epoch % config.SAVE_FREQ == 0 or last or is_best):
                    self.save(epoch)
                logger.info("stop requested: epoch %d finished and saved; exiting", epoch)
                return 0
        total = time.time() - start_time
        logger.info("training time %s", datetime.timedelta(seconds=int(total)))
        logger.info("parameter digest (rank %d): %s", self.rank, state_digest(self.model_without_ddp))
        return 0

    def _record(self, epoch: int, result: Dict[str, float], ema_result: Optional[Dict[str, float]] = None) -> None:
        """Append the epoch's numbers to <OUTPUT>/metrics.jsonl (rank 0), for plots and tests."""
        if self.rank != 0:
            return
        summary = dict(getattr(self, 'epoch_summary', {}))
        row = {'epoch': epoch, 'lr': self.optimizer.param_groups[0]['lr'], **summary,
               'val_acc1': result['acc1'], 'val_acc5': result['acc5'], 'val_loss': result['loss'],
               'val_images': result['count'], 'max_accuracy': self.max_accuracy}
        if ema_result is not None:
            row.update(val_ema_acc1=ema_result['acc1'], val_ema_acc5=ema_result['acc5'])
        with open(os.path.join(self.config.OUTPUT, 'metrics.jsonl'), 'a') as f:
            f.write(json.dumps(row) + '\n')
        if self.tb_writer is not None:
            for key in ('val_acc1', 'val_acc5', 'val_loss'):
                self.tb_writer.add_scalar(f"val/{key[4:]}", row[key], epoch)
            for key in ('val_ema_acc1', 'val_ema_acc5'):
                if key in row:
                    self.tb_writer.add_scalar(f"val_ema/{key[8:]}", row[key], epoch)
            self.tb_writer.flush()

    def evaluate(self) -> int:
        """``--eval``: load MODEL.RESUME (ours or an official ``{'model': ...}`` file), validate."""
        config = self.config
        path = config.MODEL.RESUME
        if not path:
            path = CheckpointManager(config.OUTPUT, logger=self.logger).latest()
        if not path:
            raise CheckpointError("--eval needs weights: pass --resume CHECKPOINT (ours or an official "
                                  "release file)")
        self.logger.info("evaluating %s", path)
        ckpt = load_checkpoint_file(path)
        load_model_state(self.model_without_ddp, unwrap_state_dict(ckpt), strict=True, source=f"checkpoint {path}")
        check_model_config(ckpt, config, f"checkpoint {path}")
        result = self.validate()
        self.logger.info(f"Accuracy of the network on the {result['count']} test images: "
                         f"{result['acc1']:.2f}%")
        return 0

    @torch.no_grad()
    def throughput(self, warmup: int = 10, iters: int = 30) -> int:
        """Images per second of forward passes at DATA.BATCH_SIZE (synthetic input, eval mode)."""
        config, model = self.config, self.model_without_ddp
        model.eval()
        size = config.DATA.IMG_SIZE
        images = torch.randn(config.DATA.BATCH_SIZE, 3, size, size, device=self.device)
        sync = torch.cuda.synchronize if self.device.type == 'cuda' else (lambda: None)
        with self._autocast():
            for _ in range(warmup):
                model(images)
            sync()
            tic = time.time()
            for _ in range(iters):
                model(images)
            sync()
        elapsed = time.time() - tic
        self.logger.info(f"batch_size {images.shape[0]} throughput "
                         f"{iters * images.shape[0] / elapsed:.1f} images/s ({self.device.type})")
        return 0


# ----------------------------------------------------------------------------- entry points
def main(config) -> int:
    """Run what ``config`` asks for (training, ``EVAL_MODE`` or ``THROUGHPUT_MODE``) in this process,
    one rank of a torchrun / SLURM job or a lone process; returns the exit status."""
    if config.DETERMINISTIC:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    try:
        rank, world_size, _local_rank, device = init_distributed()
    except RuntimeError as e:   # a launch problem (missing / inconsistent torchrun environment)
        raise LaunchError(_one_line(e)) from None
    try:
        _configure_determinism(config)
        _seed_everything(config.SEED + rank)
        config = _scale_lr(config.clone(), world_size)
        read_only = config.EVAL_MODE or config.THROUGHPUT_MODE
        writable = prepare_output_dir(config.OUTPUT, need_write=not read_only)
        if rank == 0 and not read_only:
            # Before anything is written there (even the log): a second run into this folder
            # stops here with one line naming the run that holds it.
            RunLock(config.OUTPUT).acquire()
        # 'dat' is the parent of the library loggers ('dat.data', ...): their warnings, such as
        # skipped unreadable images, land in the same console and log files.
        logger = create_logger(output_dir=config.OUTPUT if writable else None, dist_rank=rank, name='dat')
        if not writable:
            logger.warning("output folder %s is not writable: logging to the console only", config.OUTPUT)
        logger.info("rank %d of %d on %s (pid %d), %d CPU threads, output %s", rank, world_size, device,
                    os.getpid(), torch.get_num_threads(), config.OUTPUT)
        logger.info(config.dump())

        trainer = Trainer(config, rank, world_size, device, logger)
        if config.THROUGHPUT_MODE:
            trainer.build(with_data=False)
            return trainer.throughput()
        trainer.build()
        if config.EVAL_MODE:
            return trainer.evaluate()
        return trainer.fit()
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _one_line(error: BaseException) -> str:
    return ' '.join(str(error).split('\n')).strip() or type(error).__name__


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry: user errors become one line on stderr and exit status 2."""
    try:
        _, config = parse_option(argv)
        return main(config)
    except (ConfigError, DataError, CheckpointError, ModelInputError, LaunchError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TrainingDiverged as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_DIVERGED


if __name__ == '__main__':
    sys.exit(run())
