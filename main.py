"""Train, evaluate or time DAT / DAT++ on an ImageNet-style folder (Swin-style entry point).

One code path serves one CPU process, ``torchrun`` on CPU (gloo) and ``torchrun`` / SLURM on GPUs
(NCCL): parse the command line, build the run (``trainer.py``), loop over epochs, validate, save.
Heavy imports wait until the arguments are parsed, so ``--help`` and argument errors are quick.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Any, Optional, Sequence, Tuple

EXIT_USER_ERROR = 2      # config / data / checkpoint / launch problem, reported in one line
EXIT_DIVERGED = 3        # the loss stayed non-finite for TRAIN.MAX_NONFINITE_STEPS steps
EXIT_WORKER_DIED = 4     # a DataLoader worker died (e.g. the out-of-memory killer); resumable
EXIT_RANK_LOST = 5       # another rank died (killed, out of memory, node lost); rerun to resume
EXIT_INTERRUPTED = 130   # Ctrl-C (after saving when training had started)

EXAMPLES = """examples:
  python main.py --cfg configs/demo.yaml --data-path demo_data --tag try1
  torchrun --nproc_per_node 8 main.py --cfg configs/dat_tiny.yaml --data-path /imagenet --amp --tag run1
  python main.py --cfg configs/dat_tiny.yaml --eval --resume dat_pp_t_in1k_224.pth --data-path /imagenet
  python main.py --cfg configs/dat_tiny.yaml --eval-ema --resume output/dat_tiny/run1/best.pth --data-path /imagenet
  python main.py --cfg configs/dat_tiny.yaml --throughput --batch-size 64

Outputs go to <output>/<MODEL.NAME>/<tag>; running the same command again resumes there.
exit status: 0 done, or stopped by SIGTERM/SIGUSR1 with the current step saved; 130 stopped by
Ctrl-C with the current step saved; 2 a problem with the config, data, a checkpoint or the launch
(one line on stderr); 3 the loss stayed non-finite (the last good checkpoint is kept); 4 a
DataLoader worker died, e.g. killed by the out-of-memory killer (one line on stderr; run the same
command again to resume from the last checkpoint); 5 another
rank died (killed, out of memory, its node lost): one line names it and the checkpoint a rerun
resumes from."""


# ----------------------------------------------------------------------------- command line
def parse_option(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, Any]:
    """Parse the Swin / official command line and return ``(args, frozen config)``."""
    parser = argparse.ArgumentParser(
        prog='main.py', description='Train, evaluate or time DAT / DAT++ models.', epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--cfg', type=str, required=True, metavar='FILE', help='path to a config YAML')
    parser.add_argument('--opts', nargs='+', default=None, metavar='KEY VALUE',
                        help="override config keys, e.g. --opts TRAIN.EPOCHS 30 DATA.NUM_WORKERS 4")
    parser.add_argument('--batch-size', type=int, help='batch size per process (GPU)')
    parser.add_argument('--data-path', type=str, default=os.environ.get('DAT_DATA_PATH') or None,
                        help='dataset root with train/ and val/ (default: $DAT_DATA_PATH)')
    parser.add_argument('--resume', type=str, help='checkpoint to resume from or to evaluate')
    parser.add_argument('--pretrained', type=str, help='weights to fine-tune from (model only)')
    parser.add_argument('--amp', action='store_true', help='mixed precision (autocast; float16 needs CUDA)')
    parser.add_argument('--amp-dtype', choices=['float16', 'bfloat16'], help='autocast dtype')
    parser.add_argument('--use-checkpoint', action='store_true',
                        help='gradient checkpointing, to save memory')
    parser.add_argument('--output', default='output', type=str, metavar='PATH',
                        help='root of output folders: <output>/<MODEL.NAME>/<tag>')
    parser.add_argument('--tag', type=str, help='experiment tag (default: TAG of the config)')
    parser.add_argument('--eval', action='store_true', help='evaluate a checkpoint only')
    parser.add_argument('--eval-ema', action='store_true',
                        help="evaluate the checkpoint's EMA weights (TEST.EMA; implies --eval)")
    parser.add_argument('--throughput', action='store_true', help='measure images/s only')
    parser.add_argument('--print-freq', type=int, help='log every N iterations')
    parser.add_argument('--show-config', action='store_true',
                        help='print the full config on screen too (it is always in the log file)')
    args = parser.parse_args(argv)
    from config import get_config
    return args, get_config(args)


# ----------------------------------------------------------------------------- setup
def scale_lr(config, world_size: int):
    """Linear scaling rule: the config's learning rates are per 512 images of global batch."""
    factor = config.DATA.BATCH_SIZE * world_size * config.TRAIN.ACCUMULATION_STEPS / 512.0
    config = config.clone()
    config.defrost()
    config.TRAIN.BASE_LR = config.TRAIN.BASE_LR * factor
    config.TRAIN.WARMUP_LR = config.TRAIN.WARMUP_LR * factor
    config.TRAIN.MIN_LR = config.TRAIN.MIN_LR * factor
    config.freeze()
    return config


def _flat(node: Any, prefix: str = '') -> dict:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_flat(value, f'{prefix}{key}.'))
        return out
    return {prefix[:-1]: list(node) if isinstance(node, tuple) else node}


def refuse_foreign_run(config) -> None:
    """An untagged run must not auto-resume another model's run in the shared default folder."""
    from config import ConfigError, default_config
    saved = os.path.join(config.OUTPUT, 'config.yaml')
    if config.TAG != default_config().TAG or config.EVAL_MODE or config.THROUGHPUT_MODE or not os.path.isfile(saved):
        return
    import yaml
    with open(saved) as f:
        before = _flat((yaml.safe_load(f) or {}).get('MODEL', {}))
    now = _flat(config.MODEL)
    differ = [k for k in sorted(set(before) | set(now))
              if k not in ('RESUME', 'PRETRAINED') and before.get(k) != now.get(k)]
    if differ:
        raise ConfigError(f"{config.OUTPUT} holds an untagged run of another model (MODEL.{differ[0]} "
                          f"differs{' and more' if len(differ) > 1 else ''}), which this run would resume: "
                          f"pass --tag NAME for a run of its own")


# ----------------------------------------------------------------------------- the loop
def train(trainer) -> int:
    """Resume (or load pretrained weights), then train, validate and save every epoch."""
    from distributed import agree
    from preemption import exit_code
    from utils import load_pretrained, set_rng_state, state_digest

    from slurm_main import release_warning, resume_hint

    config, logger = trainer.config, trainer.logger
    trainer.stop.install()
    release_warning()       # SLURM's time-limit warning, if it came during start-up
    try:
        if not trainer.resume() and config.MODEL.PRETRAINED:
            load_pretrained(config, trainer.model_without_ddp, logger)
        trainer.start_ema()
        if trainer.start_epoch >= config.TRAIN.EPOCHS:
            logger.info("training is already finished: %s holds the last of TRAIN.EPOCHS %d epochs (raise "
                        "TRAIN.EPOCHS to train longer, or pass another --tag for a new run)",
                        config.OUTPUT, config.TRAIN.EPOCHS)
            return 0
        if trainer.rank == 0:   # written once data, model and checkpoint work: a failed start changes nothing
            with open(os.path.join(config.OUTPUT, 'config.yaml'), 'w') as f:
                f.write(config.dump())
        if trainer.pending_rng is not None and trainer.start_iter == 0:
            set_rng_state(trainer.pending_rng)     # an epoch boundary: continue exactly from here
            trainer.pending_rng = None

        logger.info("start training: epochs %d..%d", trainer.start_epoch, config.TRAIN.EPOCHS - 1)
        start_time = time.time()
        for epoch in range(trainer.start_epoch, config.TRAIN.EPOCHS):
            trainer.loader_train.sampler.set_epoch(epoch, start_batch=trainer.start_iter)
            start_batch, trainer.start_iter = trainer.start_iter, 0
            if trainer.train_one_epoch(epoch, start_batch):
                return exit_code(trainer.stop_signum)

            result = trainer.validate()
            logger.info(f"Accuracy of the network on the {result['count']} test images: {result['acc1']:.2f}%")
            is_best = result['acc1'] > trainer.max_accuracy
            trainer.max_accuracy = max(trainer.max_accuracy, result['acc1'])
            logger.info(f"Max accuracy: {trainer.max_accuracy:.2f}%")
            ema_result = None
            if trainer.ema is not None:
                ema_result = trainer.validate(trainer.ema.module)
                logger.info(f"EMA accuracy: {ema_result['acc1']:.2f}%")
            last = epoch == config.TRAIN.EPOCHS - 1
            saved = epoch % config.SAVE_FREQ == 0 or last or is_best
            if saved:
                trainer.save(epoch, is_best=is_best)
            trainer.progress.epoch(epoch, {
                'epoch': epoch, 'lr': trainer.optimizer.param_groups[0]['lr'], **trainer.epoch_summary,
                'val_acc1': result['acc1'], 'val_acc5': result['acc5'], 'val_loss': result['loss'],
                'val_images': result['count'], 'max_accuracy': trainer.max_accuracy}, ema_result)

            (signum,) = agree([trainer.stop.signum or 0], trainer.device)   # every rank takes part
            if signum:
                if not saved:
                    trainer.save(epoch)
                logger.info("stop requested: epoch %d finished and saved; %s", epoch, resume_hint(int(signum)))
                return exit_code(int(signum))
        logger.info("training time %s", _duration(time.time() - start_time))
        logger.info("parameter digest (rank %d): %s", trainer.rank, state_digest(trainer.model_without_ddp))
        return 0
    finally:
        trainer.stop.settle()       # stays installed: a later signal cannot change the exit code
        trainer.progress.close()


def _duration(seconds: float) -> str:
    import datetime
    return str(datetime.timedelta(seconds=int(seconds)))


# ----------------------------------------------------------------------------- entry points
def main(config, show_config: bool = False) -> int:
    """Run what ``config`` asks for (training, ``EVAL_MODE`` or ``THROUGHPUT_MODE``) in this process,
    one rank of a torchrun / SLURM job or a lone process; returns the exit status."""
    from timm.utils import random_seed

    from checkpoint import RunLock, prepare_output_dir
    from distributed import cleanup_distributed, init_distributed, is_collective_failure, rank_lost
    from evaluation import throughput
    from logger import create_logger
    from trainer import Trainer
    from utils import configure_determinism

    rank, world_size, _local_rank, device = init_distributed()
    trainer = None
    lost = False
    try:
        configure_determinism(config.DETERMINISTIC)
        random_seed(config.SEED, rank)
        config = scale_lr(config, world_size)
        refuse_foreign_run(config)
        read_only = config.EVAL_MODE or config.THROUGHPUT_MODE
        writable = prepare_output_dir(config.OUTPUT, need_write=not read_only)
        if rank == 0 and not read_only:
            # Before anything is written there (even the log): a second run into this folder
            # stops here with one line naming the run that holds it.
            RunLock(config.OUTPUT).acquire()
        # 'dat' is the parent of the library loggers ('dat.data', ...): their warnings, such as
        # skipped unreadable images, land in the same console and log files.
        logger = create_logger(output_dir=config.OUTPUT if writable else None, dist_rank=rank, name='dat',
                               capture_warnings=True)
        if not writable:
            logger.warning("output folder %s is not writable: logging to the console only", config.OUTPUT)
        mode = 'evaluating' if config.EVAL_MODE else 'timing' if config.THROUGHPUT_MODE else 'training'
        logger.info("%s %s: rank %d of %d on %s (pid %d), output %s", mode, config.MODEL.NAME, rank, world_size,
                    device, os.getpid(), config.OUTPUT)
        logger.info("full config:\n%s", config.dump(), extra={'console': show_config})

        trainer = Trainer(config, rank, world_size, device, logger)
        if config.THROUGHPUT_MODE:
            trainer.build(with_data=False)
            throughput(trainer.model_without_ddp, config.DATA.BATCH_SIZE, config.DATA.IMG_SIZE, device,
                       trainer.autocast, logger)
            return 0
        trainer.build()
        if config.EVAL_MODE:
            return trainer.evaluate()
        return train(trainer)
    except RuntimeError as e:
        if world_size == 1 or not is_collective_failure(e):
            raise
        lost = True     # the process group is broken: tearing it down could wait on the dead peer
        from preemption import STOP_SIGNALS
        for sig in STOP_SIGNALS:        # the launcher's stop signal follows: finish the report first
            signal.signal(sig, signal.SIG_IGN)
        saved = trainer.manager.checkpoints() if trainer is not None and hasattr(trainer, 'manager') else []
        error = rank_lost(rank, world_size, saved[-1][1] if saved else None)
        if error is None:               # every rank is still there: some other collective error
            raise
        raise error from None
    finally:
        if not lost:
            cleanup_distributed()


def one_line(error: BaseException) -> str:
    """The error's message on one line, safe to print and write (file names that are not UTF-8
    are shown with their bytes escaped)."""
    from logger import safe_text
    return safe_text(' '.join(str(error).split('\n')).strip() or type(error).__name__)


def _report(code: int, message: str = '') -> int:
    """Tell a launcher script (``train.sh``) this rank's exit status and one-line error, so that it
    can end with them instead of torchrun's summary."""
    folder = os.environ.get('DAT_RESULT_DIR')
    if folder:
        try:
            with open(os.path.join(folder, f"rank{os.environ.get('RANK', '0')}"), 'w', encoding='utf-8',
                      errors='backslashreplace') as f:
                f.write(f"{code}\n{message}\n")
        except OSError:
            pass
    return code


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry: user errors become one line on stderr and exit status 2."""
    from config import ConfigError
    from slurm_main import hold_warning
    hold_warning()
    try:
        args, config = parse_option(argv)
        from data import DataError
        from distributed import LaunchError, RankLost
        from trainer import ModelInputError, TrainingDiverged
        from checkpoint import CheckpointError
        user_errors = (ConfigError, DataError, CheckpointError, ModelInputError, LaunchError)
        try:
            return _report(main(config, show_config=args.show_config))
        except user_errors as e:
            code, message = EXIT_USER_ERROR, f"error: {one_line(e)}"
        except TrainingDiverged as e:
            code, message = EXIT_DIVERGED, f"error: {one_line(e)}"
        except RankLost as e:
            message = f"error: {one_line(e)}"
            if e.report:
                print(message, file=sys.stderr)
            return _report(EXIT_RANK_LOST, message)
    except ConfigError as e:
        code, message = EXIT_USER_ERROR, f"error: {one_line(e)}"
    except KeyboardInterrupt:
        code, message = EXIT_INTERRUPTED, "error: interrupted (nothing saved; checkpoints on disk are intact)"
    except RuntimeError as e:
        from preemption import worker_death
        death = worker_death(e)
        if death is None:
            raise
        code, message = EXIT_WORKER_DIED, f"error: {death}"
    finally:
        from preemption import end_loader_workers
        end_loader_workers()
    print(message, file=sys.stderr)
    return _report(code, message)


if __name__ == '__main__':
    sys.exit(run())
