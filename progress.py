"""Progress of a training run: the console / log line of a step, skipped-step warnings, and the
per-epoch row in ``metrics.jsonl`` and TensorBoard."""
from __future__ import annotations

import datetime
import json
import logging
import os
from typing import Optional

import torch
from timm.utils import AverageMeter

from evaluation import memory_mb

__all__ = ['Progress']


class Progress:
    """Writes what a run reports; TensorBoard and ``metrics.jsonl`` on rank 0 only."""

    def __init__(self, config, rank: int, world_size: int, device: torch.device, logger: logging.Logger) -> None:
        self.config, self.rank, self.world_size, self.device, self.logger = config, rank, world_size, device, logger
        self.tb_writer = None
        self._reported_loss = 0.0
        if rank == 0 and config.TENSORBOARD:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb_writer = SummaryWriter(os.path.join(config.OUTPUT, 'tensorboard'))
            except ImportError:
                logger.warning("TENSORBOARD is on but tensorboard is not installed; not logging to it")

    def new_epoch(self) -> None:
        self._reported_loss = 0.0

    def skipped(self, epoch: int, values: dict) -> None:
        """Warn about the non-finite steps since the last read (``StepStats.read`` values)."""
        if values['last_skipped'] < 0:
            return
        kind = 'loss' if values['skipped_loss'] > self._reported_loss else 'gradients'
        self._reported_loss = values['skipped_loss']
        first, last = int(values['first_skipped']), int(values['last_skipped'])
        where = f"iteration {last}" if first == last else f"iterations {first}..{last}"
        self.logger.warning("non-finite %s at epoch %d %s: optimizer step skipped (%d this epoch)", kind, epoch,
                            where, int(values['skipped_loss'] + values['skipped_grad']))

    def step(self, epoch: int, idx: int, num_steps: int, values: dict, batch_time: AverageMeter, batch: int,
             optimizer: torch.optim.Optimizer, loss_scale: float) -> None:
        lr = optimizer.param_groups[0]['lr']
        wd = optimizer.param_groups[0].get('weight_decay', 0.0)
        loss_avg = values['loss_sum'] / values['images'] if values['images'] else float('nan')
        norm_avg = values['norm_sum'] / values['steps'] if values['steps'] else float('nan')
        etas = batch_time.avg * (num_steps - idx - 1)
        mem = memory_mb(self.device)
        self.logger.info(
            f"Train: [{epoch}/{self.config.TRAIN.EPOCHS}][{idx}/{num_steps}]\t"
            f"eta {datetime.timedelta(seconds=int(etas))} lr {lr:.6f}\t wd {wd:.4f}\t"
            f"time {batch_time.val:.4f} ({batch_time.avg:.4f})\t"
            f"loss {values['loss']:.4f} ({loss_avg:.4f})\t"
            f"grad_norm {values['grad_norm']:.4f} ({norm_avg:.4f})\t"
            f"loss_scale {loss_scale:.1f}\tmem {mem:.0f}MB")
        if self.tb_writer is not None:
            step = epoch * num_steps + idx
            self.tb_writer.add_scalar('train/loss', values['loss'], step)
            self.tb_writer.add_scalar('train/lr', lr, step)
            self.tb_writer.add_scalar('train/grad_norm', values['grad_norm'], step)
            # images/s of the whole job (all ranks), from this rank's step time
            self.tb_writer.add_scalar('train/throughput', batch * self.world_size / max(batch_time.val, 1e-9), step)
            self.tb_writer.add_scalar('train/memory_mb', mem, step)

    def epoch(self, epoch: int, row: dict, ema_result: Optional[dict] = None) -> None:
        """Append the epoch's numbers to <OUTPUT>/metrics.jsonl (rank 0), for plots and tests."""
        if self.rank != 0:
            return
        if ema_result is not None:
            row = {**row, 'val_ema_acc1': ema_result['acc1'], 'val_ema_acc5': ema_result['acc5']}
        with open(os.path.join(self.config.OUTPUT, 'metrics.jsonl'), 'a') as f:
            f.write(json.dumps(row) + '\n')
        if self.tb_writer is not None:
            for key in ('val_acc1', 'val_acc5', 'val_loss'):
                self.tb_writer.add_scalar(f"val/{key[4:]}", row[key], epoch)
            for key in ('val_ema_acc1', 'val_ema_acc5'):
                if key in row:
                    self.tb_writer.add_scalar(f"val_ema/{key[8:]}", row[key], epoch)
            self.tb_writer.flush()

    def close(self) -> None:
        """Close TensorBoard. Its own failures (a full disk fails its flush too) are logged, never
        raised, so that they cannot hide the error that ended the run."""
        writer, self.tb_writer = self.tb_writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception as e:
                self.logger.warning("could not close TensorBoard (%s)", ' '.join(str(e).split()))
