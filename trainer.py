"""The objects of one training run and the operations on them: build, train an epoch, save,
resume, evaluate.

:meth:`Trainer.train_one_epoch` runs without per-step host syncs: steps that are not finite are
skipped on the device (see ``train_step.py``), and statistics, the stop request and the
divergence check are read every ``PRINT_FREQ`` steps (every step a stop signal is pending in a
single process), at the end of the epoch and before a mid-epoch checkpoint. With several
processes the ranks also compare stop requests every couple of seconds, at steps they agree on
in advance (``distributed.AgreementClock``), so that a stop is honoured within seconds whatever
``PRINT_FREQ``.
"""
from __future__ import annotations

import datetime
import logging
import os
import time
from contextlib import nullcontext
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.loss import SoftTargetCrossEntropy
from timm.utils import AverageMeter, ModelEmaV2
from torch.nn.parallel import DistributedDataParallel

from config import ConfigError
from data import build_loader
from data.skips import SkipGuard
from distributed import AgreementClock, agree, all_reduce
from evaluation import step_clock, validate
from lr_scheduler import build_scheduler
from models import build_model
from models.attention_impl import reference_only
from models.kernel_check import KernelCheckError, check_model_kernels
from optimizer import build_optimizer
from preemption import StopRequest, ignore_stop_signals
from progress import Progress
from slurm_main import resume_hint
from train_step import OptimizerStep, StepStats, autocast_settings, ema_update
from checkpoint import (CheckpointError, CheckpointManager, check_model_config, choose_eval_file,
                        choose_resume_file, load_checkpoint_file, load_model_state, load_optimizer_state,
                        model_config, rank_rng_state, restore_schedule, resume_position, saved_img_size,
                        schedule_changes, set_aside_best, unwrap_state_dict)
from utils import get_rng_state, set_rng_state

__all__ = ['Trainer', 'TrainingDiverged', 'ModelInputError']


class TrainingDiverged(RuntimeError):
    """Training stopped because the loss was non-finite too many optimizer steps in a row."""


class ModelInputError(ValueError):
    """The model cannot be built for, or run at, the configured input size."""


def build_checked_model(config, device: torch.device) -> nn.Module:
    """Build the model and run one tiny forward pass, so that an input size the architecture cannot
    handle is reported now, in one line, rather than as a traceback from inside the first step."""
    try:
        model = build_model(config)
        model.to(device)
        model.eval()
        with torch.no_grad(), reference_only():     # fused kernels run only once checked (_check_kernels)
            size = config.DATA.IMG_SIZE
            model(torch.zeros(1, 3, size, size, device=device))
        model.train()
    except ConfigError:
        raise
    except ValueError as e:
        raise ModelInputError(f"model '{config.MODEL.NAME}' at DATA.IMG_SIZE {config.DATA.IMG_SIZE}: "
                              f"{e}") from None
    return model


def build_criterion(config, mixup_fn) -> nn.Module:
    if mixup_fn is not None:
        return SoftTargetCrossEntropy()          # mixup / cutmix already smooth the labels
    return nn.CrossEntropyLoss(label_smoothing=max(config.MODEL.LABEL_SMOOTHING, 0.0))


def loss_input(outputs: torch.Tensor) -> torch.Tensor:
    """The logits the loss is computed from: float16 / bfloat16 ones in float32 (as autocast runs
    log-softmax), float32 and float64 ones as they are (a float64 run stays float64 throughout)."""
    return outputs if outputs.dtype in (torch.float32, torch.float64) else outputs.float()


def updates_per_epoch(n_iter: int, accum: int) -> int:
    """Optimizer updates in an epoch of ``n_iter`` batches: one per ``accum`` batches, and one for a
    shorter last window when ``n_iter`` is not a multiple of ``accum``."""
    return -(-n_iter // accum)


class Trainer:
    """Model, data, optimizer, schedule, EMA and checkpoints of one run (one rank of it)."""

    def __init__(self, config, rank: int, world_size: int, device: torch.device,
                 logger: logging.Logger) -> None:
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.logger = logger
        self.amp, self.amp_dtype = autocast_settings(config, device, logger)
        self.stop = StopRequest()
        self.max_accuracy = 0.0
        self.start_epoch = config.TRAIN.START_EPOCH
        self.start_iter = 0
        self.pending_rng: Optional[dict] = None     # restored after the resumed epoch's loader starts
        self.last_checkpoint: Optional[str] = None
        self.ema = None
        self.ema_restored = False
        self.stop_signum = 0            # the stop signal agreed by all ranks
        self.clock = AgreementClock()   # when the ranks next compare stop requests
        self.progress: Optional[Progress] = None
        self.epoch_summary: dict = {}

    # ------------------------------------------------------------------ building
    def build(self, with_data: bool = True) -> None:
        config, logger = self.config, self.logger
        self.mixup_fn = None
        if with_data:   # evaluation reads the validation split alone
            (self.dataset_train, self.dataset_val, self.loader_train, self.loader_val,
             self.mixup_fn) = build_loader(config, device=self.device, worker_init_fn=ignore_stop_signals,
                                           train=not config.EVAL_MODE)
            if self.dataset_train is not None:
                logger.info("data: %d train / %d val images, %d classes, %d train iterations per epoch",
                            len(self.dataset_train), len(self.dataset_val), len(self.dataset_val.classes),
                            len(self.loader_train))

        logger.info("creating model %s/%s", config.MODEL.TYPE, config.MODEL.NAME)
        self.model_without_ddp = build_checked_model(config, self.device)
        self.kernel_check = self._check_kernels()
        n_parameters = sum(p.numel() for p in self.model_without_ddp.parameters() if p.requires_grad)
        logger.info("number of trainable parameters: %d", n_parameters)
        # The training forward goes through torch.compile and DDP; checkpoints, evaluation and
        # the optimizer see the bare model (plain parameter names).
        self.model: nn.Module = self.model_without_ddp
        if config.TRAIN.COMPILE:
            self.model = torch.compile(self.model)
        if self.world_size > 1:
            device_ids = [self.device.index] if self.device.type == 'cuda' else None
            self.model = DistributedDataParallel(self.model, device_ids=device_ids, broadcast_buffers=False)

        if not with_data or config.EVAL_MODE:
            return
        self.n_iter = len(self.loader_train)
        self.skip_guard = SkipGuard(getattr(self.dataset_train, 'root', os.path.join(config.DATA.DATA_PATH, 'train')),
                                    self.n_iter * config.DATA.BATCH_SIZE, config.DATA.MAX_SKIPPED_FRACTION)
        try:    # their ValueErrors are one-line config problems (epochs vs warm-up, lower_lr_kvs, ...)
            self.optimizer = build_optimizer(config, self.model_without_ddp)
            self.lr_scheduler = build_scheduler(
                config, self.optimizer, updates_per_epoch(self.n_iter, config.TRAIN.ACCUMULATION_STEPS))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.loss_scaler = OptimizerStep(
            self.optimizer, fp16_scaler=self.amp and self.amp_dtype == torch.float16 and self.device.type == 'cuda',
            device=self.device, clip_grad=config.TRAIN.CLIP_GRAD)
        self.stats = StepStats(self.device, grad_scaler=self.loss_scaler.scaler.is_enabled())
        self.criterion = build_criterion(config, self.mixup_fn)
        if config.TRAIN.EMA.ENABLE:
            self.ema = ModelEmaV2(self.model_without_ddp, decay=config.TRAIN.EMA.DECAY)
        self.manager = CheckpointManager(config.OUTPUT, keep_last=config.TRAIN.KEEP_CHECKPOINTS,
                                         logger=logger)
        self.progress = Progress(config, self.rank, self.world_size, self.device, logger)

    def _check_kernels(self) -> list:
        """Every fused attention call checked against the reference on this device, before the first step
        (models.kernel_check); a failing one falls back to the reference kernel, or stops the run when
        MODEL.ATTN_IMPL is 'fused'."""
        size = self.config.DATA.IMG_SIZE
        try:
            return check_model_kernels(self.model_without_ddp, torch.zeros(1, 3, size, size, device=self.device),
                                       self.autocast, self.config.MODEL.ATTN_IMPL, self.logger)
        except KernelCheckError as e:
            raise ConfigError(str(e)) from None

    def start_ema(self) -> None:
        """Start the EMA from the weights in use (pretrained or resumed), unless it was resumed too."""
        if self.ema is not None and not self.ema_restored:
            self.ema.set(self.model_without_ddp)

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

    def _on_rank0(self, action: Callable[[], Any]) -> Any:
        """Run ``action`` on rank 0 only; every rank returns its result, or raises the
        CheckpointError it raised (the same one-line message on every rank)."""
        result = error = None
        if self.rank == 0:
            try:
                result = action()
            except CheckpointError as e:
                error = str(e)
        if self.world_size > 1:
            shared = [result, error]
            dist.broadcast_object_list(shared, src=0)
            result, error = shared
        if error is not None:
            raise CheckpointError(error)
        return result

    def save(self, epoch: int, iteration: Optional[int] = None, is_best: bool = False) -> None:
        """Checkpoint ``iteration`` batches into ``epoch`` (None: the finished, validated epoch).

        Collective: every rank calls it (RNG states are gathered); rank 0 writes the file, and
        every rank stops with rank 0's one-line error when the write failed."""
        state = self._checkpoint_state()
        # The position in images, so that a run with another batch size or process count resumes
        # at the right image (see checkpoint.resume_position).
        state['samples_seen'] = None if iteration is None else int(iteration) * self._global_batch()

        def write() -> None:
            self.last_checkpoint = self.manager.save(state, epoch, iteration=iteration, is_best=is_best)

        try:
            self._on_rank0(write)
        except CheckpointError:
            # A failed save ends the run; close TensorBoard now (quietly: on a full disk its flush
            # fails too) so that the error reported is the checkpoint's.
            self.progress.close()
            raise

    def _resume_file(self) -> Optional[str]:
        """The checkpoint to resume from, as rank 0 sees it: every rank must load the same file.

        Rank 0 first takes the run folder's lock (it writes the checkpoints): a second run into the
        same folder stops here, before it has touched a file. Its errors reach every rank."""
        def lock_and_find() -> Optional[str]:
            self.manager.lock()
            return choose_resume_file(self.manager, self.config.TRAIN.AUTO_RESUME, self.config.MODEL.RESUME,
                                      self.logger)

        path = self._on_rank0(lock_and_find)
        if self.world_size > 1 and path and not os.path.isfile(path):
            raise CheckpointError(f"rank {self.rank} cannot see {path}, which rank 0 resumes from: put "
                                  f"OUTPUT (and MODEL.RESUME) on a file system shared by all nodes")
        return path

    def _load_weights(self, path: str) -> dict:
        """Load the model weights of checkpoint ``path`` (ours or an official ``{'model': ...}``
        file) and return the whole checkpoint."""
        ckpt = load_checkpoint_file(path)
        # Names and shapes first (they say most about another architecture), then the arithmetic.
        load_model_state(self.model_without_ddp, unwrap_state_dict(ckpt), strict=True, source=f"checkpoint {path}")
        check_model_config(ckpt, self.config, f"checkpoint {path}")
        return ckpt

    def resume(self) -> bool:
        """Restore the newest checkpoint (or MODEL.RESUME); returns whether anything was loaded."""
        path = self._resume_file()
        if not path:
            return False
        self.logger.info("resuming from %s", path)
        ckpt = self._load_weights(path)
        if not isinstance(ckpt, dict) or 'optimizer' not in ckpt:
            self.logger.info("%s holds model weights only: starting from epoch %d", path, self.start_epoch)
            return True
        load_optimizer_state(ckpt, self.optimizer, path)
        schedule_changed = restore_schedule(self.lr_scheduler, ckpt.get('lr_scheduler'))
        if 'scaler' in ckpt:
            self.loss_scaler.load_state_dict(ckpt['scaler'])
        self.max_accuracy = float(ckpt.get('max_accuracy', 0.0))
        self._resolution_change(saved_img_size(ckpt), path)
        self.start_epoch, self.start_iter, _ = resume_position(ckpt, self.n_iter, self._global_batch(), self.logger)
        if self.ema is not None and 'ema' in ckpt:
            load_model_state(self.ema.module, ckpt['ema'], strict=True, source=f"EMA weights of {path}")
            self.ema_restored = True
        self.pending_rng = rank_rng_state(ckpt, self.rank, self.world_size, self.logger)
        if schedule_changed:
            self._take_new_schedule(schedule_changes(ckpt, self.config) or schedule_changed)
        self.logger.info("resumed: epoch %d, iteration %d, max accuracy %.2f%%",
                         self.start_epoch, self.start_iter, self.max_accuracy)
        return True

    def _take_new_schedule(self, changes: List[str]) -> None:
        """The config changed the schedule: it takes effect from the first resumed step, in one
        warning that says where the learning rate goes (raising TRAIN.EPOCHS on a finished run
        puts it back up the new, longer cosine)."""
        before = self.optimizer.param_groups[0]['lr']          # the checkpoint's (optimizer state)
        if self.start_epoch or self.start_iter:
            epoch, idx = divmod(self.start_epoch * self.n_iter + self.start_iter - 1, self.n_iter)
            self.lr_scheduler.step_update(self._update_count(epoch, idx))
        after = self.optimizer.param_groups[0]['lr']
        self.logger.warning(
            "the config's learning-rate schedule differs from the checkpoint's (%s): continuing on the config's "
            "schedule, so at epoch %d iteration %d the learning rate goes from %.3g to %.3g%s", ', '.join(changes),
            self.start_epoch, self.start_iter, before, after,
            " (it rises again: the new schedule's value at this step, not a continuation of the old decay)"
            if after > before * (1 + 1e-9) else '')

    def _resolution_change(self, old: Optional[int], path: str) -> None:
        """Resuming at another DATA.IMG_SIZE: say so; the best accuracy starts again at the new size
        and the old size's best.pth is kept as best_<size>px.pth."""
        new = self.config.DATA.IMG_SIZE
        if old is None or old == new:
            return
        kept = self._on_rank0(lambda: set_aside_best(self.config.OUTPUT, old))
        self.logger.warning(
            "resuming at DATA.IMG_SIZE %d from %s, trained at %d: max accuracy starts again from 0 at the new "
            "size (it was %.2f%%)%s", new, path, old, self.max_accuracy,
            f" and the best checkpoint at {old} px is kept as {kept}" if kept else '')
        self.max_accuracy = 0.0

    # ------------------------------------------------------------------ training
    def _update_count(self, epoch: int, idx: int) -> int:
        """The schedule position after the window holding batch ``idx`` of ``epoch``: windows are
        counted, so a shorter last window never carries the count past the schedule's end."""
        accum = self.config.TRAIN.ACCUMULATION_STEPS
        return epoch * updates_per_epoch(self.n_iter, accum) + idx // accum

    def autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.amp)

    def _placeholder(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """One blank image for a rank without images: its forward and backward keep DDP's collectives
        paired with the other ranks, and the window is dropped everywhere."""
        size = self.config.DATA.IMG_SIZE
        images = torch.zeros(1, 3, size, size, device=self.device)
        if self.mixup_fn is not None:       # the criterion takes soft targets
            return images, torch.zeros(1, self.config.MODEL.NUM_CLASSES, device=self.device)
        return images, torch.zeros(1, dtype=torch.long, device=self.device)

    def train_one_epoch(self, epoch: int, start_batch: int) -> bool:
        """Train one epoch from batch ``start_batch``; returns True when stopped by a signal."""
        config, model, stats = self.config, self.model, self.stats
        accum = config.TRAIN.ACCUMULATION_STEPS
        num_steps = self.n_iter
        # A shorter last window (num_steps not a multiple of accum) is averaged over its own batches.
        tail_start = num_steps - num_steps % accum
        print_freq = max(config.PRINT_FREQ, 1)
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        stats.new_epoch()
        self.progress.new_epoch()
        batch_time = AverageMeter()
        n_skipped_images = 0
        self.skip_guard.new_epoch()
        no, yes = torch.zeros((), device=self.device), torch.ones((), device=self.device)
        window_dropped = no > 0

        loader_iter = iter(self.loader_train)
        if self.pending_rng is not None:
            # A mid-epoch checkpoint was taken with this epoch's loader already started: restore
            # the RNGs only now, so that starting the loader here does not shift them.
            set_rng_state(self.pending_rng)
            self.pending_rng = None
        end = time.time()
        self.clock.start(start_batch)
        for idx, (images, targets, n_skipped) in enumerate(loader_iter, start=start_batch):
            n_skipped_images += int(n_skipped)
            self.skip_guard.add(n_skipped, epoch, getattr(self.loader_train, 'last_skipped', None))
            boundary = (idx + 1) % accum == 0 or idx + 1 == num_steps
            images = images.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            if self.mixup_fn is not None and images.shape[0] > 0:
                images, targets = self.mixup_fn(images, targets)   # may drop one sample of an odd batch
            empty = images.shape[0] == 0
            if empty:
                images, targets = self._placeholder()
            # Some rank without images drops the window on every rank (a device flag, no host sync).
            window_dropped = window_dropped | (all_reduce(yes if empty else no, op='max') > 0)
            sync = boundary or not isinstance(model, DistributedDataParallel)
            with (nullcontext() if sync else model.no_sync()):
                with self.autocast():
                    outputs = model(images)
                loss = self.criterion(loss_input(outputs), targets)
                # NaN makes every gradient non-finite on every rank (DDP averages them), so the
                # step is skipped alike everywhere; a finite loss is multiplied by exactly 1.
                keep = torch.where(window_dropped | ~torch.isfinite(loss.detach()), float('nan'), 1.0)
                window = accum if idx < tail_start else num_steps - tail_start
                self.loss_scaler.backward(loss * keep / window)
            if not boundary:
                continue

            # ---- end of an accumulation window
            grad_norm, skipped = self.loss_scaler.step(model.parameters())
            self.optimizer.zero_grad(set_to_none=True)
            self.lr_scheduler.step_update(self._update_count(epoch, idx))
            stats.update(idx, loss, targets.size(0), grad_norm, skipped, window_dropped)
            if self.ema is not None:
                ema_update(self.ema.module, self.model_without_ddp, self.ema.decay, ~skipped)
            window_dropped = no > 0

            done = idx + 1
            freq = config.TRAIN.SAVE_ITER_FREQ
            save_now = freq > 0 and done % freq == 0 and done < num_steps
            log_now = idx % print_freq == 0 or done == num_steps or save_now
            now = step_clock(self.device, sync=log_now)     # logged step times include the GPU's work
            batch_time.update(now - end)
            end = now
            # Every rank takes the same branch at the same step: the clock's next step is agreed.
            if not (log_now or (self.world_size > 1 and self.clock.due(idx))
                    or (self.world_size == 1 and self.stop.requested)):
                continue
            values = stats.read() if log_now else {'max_streak': 0}
            # Ranks decide alike: a rank's signal stops all; the streak can differ by rank only
            # when fp16 overflow hides another rank's non-finite loss. The maximum of the negated
            # proposals is the smallest proposal: the slowest rank's pace sets the next agreement.
            stop_signum, streak, later = agree([self.stop.signum or 0, values['max_streak'],
                                                -self.clock.proposal(idx)], self.device)
            self.clock.agreed(idx, -later)
            if log_now:
                self.progress.skipped(epoch, values)
                if streak >= max(config.TRAIN.MAX_NONFINITE_STEPS, 1):
                    self._diverged(epoch, idx, int(streak))
                self.progress.step(epoch, idx, num_steps, values, batch_time, targets.size(0), self.optimizer,
                                   self.loss_scaler.loss_scale())
            if stop_signum:
                self.stop_signum = int(stop_signum)
                self._preempted(epoch, done)
                return True
            if save_now:
                self.save(epoch, done)

        values = stats.read()
        skipped_steps = values['dropped'] + values['skipped_loss'] + values['skipped_grad'] + values['overflow']
        self.epoch_summary = {'train_loss': values['loss_sum'] / max(values['images'], 1.0),
                              'skipped_images': n_skipped_images, 'skipped_steps': int(skipped_steps),
                              'epoch_time': batch_time.sum}
        self.logger.info("epoch %d done in %s: train loss %.4f, %d corrupt images skipped, %d optimizer "
                         "steps skipped", epoch, datetime.timedelta(seconds=int(batch_time.sum)),
                         self.epoch_summary['train_loss'], n_skipped_images, self.epoch_summary['skipped_steps'])
        return False

    def _diverged(self, epoch: int, idx: int, streak: int) -> None:
        """Stop without saving: the state in memory is not trusted, the files on disk are."""
        kept = self.last_checkpoint or self.manager.latest()
        raise TrainingDiverged(
            f"the loss was non-finite for {streak} optimizer steps in a row (epoch {epoch}, "
            f"iteration {idx}, TRAIN.MAX_NONFINITE_STEPS {self.config.TRAIN.MAX_NONFINITE_STEPS}); stopped "
            f"without saving. " + (f"Last good checkpoint: {kept}. " if kept else 'No checkpoint was saved. ')
            + "Lower TRAIN.BASE_LR, lengthen TRAIN.WARMUP_EPOCHS or train without --amp, then run again")

    def _preempted(self, epoch: int, done: int) -> None:
        self.logger.info("stop requested (%s): saving epoch %d iteration %d", self.stop.name, epoch, done)
        self.save(epoch, done)
        self.logger.info("state saved; %s", resume_hint(self.stop_signum))

    # ------------------------------------------------------------------ evaluation
    def validate(self, model: Optional[nn.Module] = None) -> dict:
        return validate(model if model is not None else self.model_without_ddp, self.loader_val, self.device,
                        self.autocast, self.logger, max(self.config.PRINT_FREQ, 1))

    def evaluate(self) -> int:
        """``--eval``: load MODEL.RESUME (ours or an official ``{'model': ...}`` file), validate."""
        path = choose_eval_file(self.config.OUTPUT, self.config.MODEL.RESUME, self.logger)
        ckpt = self._load_weights(path)
        has_ema = isinstance(ckpt, dict) and isinstance(ckpt.get('ema'), dict)
        if self.config.TEST.EMA:
            if not has_ema:
                raise CheckpointError(f"{path} holds no EMA weights (saved without TRAIN.EMA.ENABLE): evaluate "
                                      f"its weights with --eval, without --eval-ema (TEST.EMA)")
            load_model_state(self.model_without_ddp, ckpt['ema'], strict=True, source=f"EMA weights of {path}")
            self.logger.info("evaluating %s: its EMA weights ('ema')", path)
        else:
            self.logger.info("evaluating %s: its weights ('model')%s", path,
                             "; it also holds EMA weights ('ema'), which --eval-ema evaluates" if has_ema else '')
        result = self.validate()
        self.logger.info(f"Accuracy of the network on the {result['count']} test images: "
                         f"{result['acc1']:.2f}%")
        return 0
