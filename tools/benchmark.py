#!/usr/bin/env python
"""Training / inference throughput, first-step time and peak memory of DAT++ next to timm baselines.

One process builds every entry of a model size, then times them in interleaved rounds: each
round runs a few steps of every entry in turn (the starting entry rotates), so a slow-down of
the machine (other jobs, thermal limits) hits every entry alike and the ratios stay fair.
Reported numbers are medians over the timed steps.

Entries for a size (``--models tiny``: DAT-T++):

* DAT++ with each attention implementation (``--variants``): ``reference`` (plain PyTorch
  kernels everywhere, ``MODEL.ATTN_IMPL reference``) and ``fused`` (SDPA / flex kernels,
  ``MODEL.ATTN_IMPL fused``), eager and ``+compile`` (``torch.compile``);
* timm baselines of the same size (``--baselines``): ``swin``, ``davit``, ``convnext``
  (random init, nothing downloaded). Ratios are against the first baseline (Swin by default).

A training step is forward + cross-entropy + backward + AdamW step (``optimizer.build_optimizer``)
under autocast (fp16 adds a GradScaler); inference is ``eval()`` + ``no_grad``. The input is one
random batch kept on the device. Before a DAT variant is timed its logits are compared with the
reference's on the same weights; a mismatch makes it an error row and the exit status 1.
``--loader-workers N`` also measures the data pipeline (``data.build_loader`` on a generated
demo ImageFolder): training images per second per worker.

    python tools/benchmark.py --device cpu --models tiny --batch-size 16 --json cpu.json
    python tools/benchmark.py --models tiny --batch-size 128 --dtype bf16 --json gpu.json
    python tools/benchmark.py --small --device cpu --rounds 2 --json smoke.json   # CPU smoke (CI)

This file is the command line and the order of work; the entries and the logits check are in
``tools/bench_models.py``, the timing, memory and MFU in ``tools/bench_timing.py``, the table and
JSON in ``tools/bench_report.py``.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools.bench_models import (BASELINES, CHECK_TOL, DAT_CONFIGS, SMALL_IMG, VARIANTS,  # noqa: E402
                                build_entries)
from tools.bench_report import Row, environment, format_loader, format_table, short_error, write_json  # noqa: E402
from tools.bench_timing import (DTYPES, Entry, PeakMemory, mfu, peak_tflops, profile_top_ops,  # noqa: E402
                                run_rounds, summarise, warm_up)

# The tool's API (the tests drive its parts through this module).
__all__ = ['BASELINES', 'CHECK_TOL', 'DAT_CONFIGS', 'VARIANTS', 'Entry', 'PeakMemory', 'Row', 'format_table',
           'main', 'measure_loader', 'mfu', 'parse_args', 'peak_tflops', 'run_rounds', 'run_size', 'summarise']


# ----------------------------------------------------------------------------- one model size
def run_size(size: str, args: argparse.Namespace, device: torch.device, dtype: str,
             peak: Optional[float], checkpoint: Callable[[List[Row]], None]) -> List[Row]:
    """Build, warm up and time every entry of one size; ``checkpoint`` gets the rows so far
    after every phase (a run that is killed keeps them)."""
    img = args.img_size or (SMALL_IMG if args.small else 224)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch_size, 3, img, img, generator=gen).to(device)
    y = torch.randint(0, 1000, (args.batch_size,), generator=gen).to(device)
    entries = build_entries(size, args, device, dtype, x, y)
    for entry in entries:
        if entry.work is None or entry.row.error is not None:
            continue
        print(f'[{size}] warm-up {entry.row.entry}', flush=True)
        try:
            warm_up(entry, args)
        except Exception as exc:  # noqa: BLE001
            entry.row.error, entry.work = short_error(exc), None
    checkpoint([e.row for e in entries])
    for phase in ('train', 'infer'):
        run_rounds(entries, args, phase)
        summarise(entries, peak)
        checkpoint([e.row for e in entries])
    if args.profile:
        for entry in entries:
            if entry.work is not None and entry.row.entry.startswith('dat:'):
                table, entry.row.profile_top_ops = profile_top_ops(entry.work, args.profile_steps)
                print(f'\n== profile: {entry.row.entry}, {args.profile_steps} training steps ==\n{table}')
    summarise(entries, peak)
    for entry in entries:
        entry.work = None
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    return [e.row for e in entries]


# ----------------------------------------------------------------------------- data loader
def measure_loader(args: argparse.Namespace) -> dict:
    """Training images per second per worker through ``data.build_loader`` (decode, RandAugment
    and the rest of the training transform) on a generated demo ImageFolder, for the float
    pipeline and ``DATA.DEVICE_NORMALIZE`` in alternating rounds (medians): every batch of one
    epoch after the first (worker start-up), timed by ``data.throughput``."""
    from config import load_config
    from data.demo import make_demo_dataset
    from data.throughput import compare_pipelines
    root = args.loader_data or os.path.join(tempfile.gettempdir(), f'dat_bench_demo_{args.loader_image_size}')
    per_class = max(1, -(-args.loader_images // 4))
    make_demo_dataset(root, classes=4, train_per_class=per_class, val_per_class=1, size=args.loader_image_size)
    opts = ['DATA.DATA_PATH', root, 'DATA.BATCH_SIZE', str(args.loader_batch_size),
            'DATA.NUM_WORKERS', str(args.loader_workers), 'MODEL.NUM_CLASSES', '4'] + list(args.loader_opts)
    config = load_config(str(REPO / DAT_CONFIGS['tiny']), opts=opts)
    # As many batches as training images: more than one epoch holds, so the whole epoch is timed.
    result = compare_pipelines(config, args.loader_workers, batches=4 * per_class, warmup=0,
                               rounds=args.loader_rounds, device=args.device)
    return dict(workers=args.loader_workers, batch_size=args.loader_batch_size, rounds=args.loader_rounds,
                images_timed=result['images_timed'],
                source_image_size=args.loader_image_size, img_size=int(config.DATA.IMG_SIZE),
                float_img_s_per_worker=result['float_per_worker'],
                device_normalize_img_s_per_worker=result['device_normalize_per_worker'],
                ratio=result['ratio'], opts=list(args.loader_opts))


# ----------------------------------------------------------------------------- command line
def _csv(text: str) -> List[str]:
    return [t.strip() for t in text.split(',') if t.strip()]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Throughput, first step and peak memory of DAT++ (each attention implementation, '
                    'eager and compiled) next to Swin, DaViT and ConvNeXt, in interleaved rounds.')
    parser.add_argument('--models', default='tiny', help=f"comma-separated sizes from {','.join(DAT_CONFIGS)}")
    parser.add_argument('--variants', default=','.join(VARIANTS),
                        help=f"DAT++ entries, comma-separated from {','.join(VARIANTS)} ('' for none)")
    parser.add_argument('--baselines', default=','.join(BASELINES),
                        help=f"timm entries, comma-separated from {','.join(BASELINES)}; ratios are "
                             f"against the first ('' for none)")
    parser.add_argument('--batch-size', type=int, default=None, help='images per step (default 128; 2 with --small)')
    parser.add_argument('--dtype', choices=sorted(DTYPES), default=None,
                        help='autocast dtype (default bf16 on CUDA, fp32 on CPU)')
    parser.add_argument('--warmup', type=int, default=None,
                        help='untimed training steps per entry, the first timed on its own (default 3; 1 with --small)')
    parser.add_argument('--rounds', type=int, default=None, help='interleaved rounds per phase (default 5)')
    parser.add_argument('--steps-per-round', type=int, default=None,
                        help='steps of each entry per round (default 4 on CUDA, 1 on CPU)')
    parser.add_argument('--img-size', type=int, default=None, help='input side (default 224; 64 with --small)')
    parser.add_argument('--device', choices=['cuda', 'cpu'], default=None, help='default: cuda when available')
    parser.add_argument('--threads', type=int, default=None, help='torch threads on CPU (default: torch default)')
    parser.add_argument('--json', default=None, help='write rows, loader result and environment to this file')
    parser.add_argument('--small', action='store_true',
                        help='CPU smoke mode: tiny models, batch 2, 64 px, 1 warm-up step')
    parser.add_argument('--peak-tflops', type=float, default=None, help='device peak for MFU (default: known GPUs)')
    parser.add_argument('--compile-backend', default=None,
                        help="torch.compile backend (default inductor; 'eager' with --small)")
    parser.add_argument('--compile-mode', default=None, help="torch.compile mode, e.g. 'max-autotune'")
    parser.add_argument('--check-tol-scale', type=float, default=1.0, help=f'multiplies the logits tolerances {CHECK_TOL}')
    parser.add_argument('--profile', action='store_true', help='print the top-15 ops of each DAT entry')
    parser.add_argument('--profile-steps', type=int, default=3)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--loader-workers', type=int, default=0,
                        help='also measure the data loader with this many workers (0: skip)')
    parser.add_argument('--loader-images', type=int, default=256, help='images in the generated demo folder')
    parser.add_argument('--loader-image-size', type=int, default=320, help='side of the generated JPEGs')
    parser.add_argument('--loader-batch-size', type=int, default=32)
    parser.add_argument('--loader-rounds', type=int, default=3,
                        help='alternating rounds of the float and device-normalised pipelines (medians)')
    parser.add_argument('--loader-data', default=None, help='folder for the demo dataset (default: a temp folder)')
    parser.add_argument('--loader-opts', nargs='+', default=[],
                        help="config overrides for the loader, e.g. a DATA option of the pipeline")
    parser.add_argument('--opts', nargs='+', default=[], help="extra DAT config overrides 'KEY VALUE' pairs")
    args = parser.parse_args(argv)

    args.models, args.variants, args.baselines = _csv(args.models), _csv(args.variants), _csv(args.baselines)
    for name, given, allowed in (('--models', args.models, DAT_CONFIGS), ('--variants', args.variants, VARIANTS),
                                 ('--baselines', args.baselines, BASELINES)):
        bad = [x for x in given if x not in allowed]
        if bad:
            parser.error(f"{name}: unknown {bad}; choose from {','.join(allowed)}")
    if not args.models or not (args.variants or args.baselines):
        parser.error('nothing to measure: give --models and at least one variant or baseline')
    args.variants = sorted(dict.fromkeys(args.variants), key=VARIANTS.index)   # reference first: the check
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: no CUDA device is visible; use --device cpu')
    defaults = dict(batch_size=2, warmup=1, rounds=2) if args.small else dict(batch_size=128, warmup=3, rounds=5)
    defaults['steps_per_round'] = 4 if args.device == 'cuda' else 1
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ('batch_size', 'warmup', 'rounds', 'steps_per_round', 'loader_rounds'):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.variants and 'reference' not in args.variants:
        parser.error("--variants: include 'reference' (every other DAT entry is checked against its logits)")
    if args.compile_backend is None:
        args.compile_backend = 'eager' if args.small else 'inductor'
    if args.dtype is None:
        args.dtype = 'bf16' if args.device == 'cuda' else 'fp32'
    if args.dtype == 'fp16' and args.device == 'cpu':
        parser.error('--dtype fp16 needs CUDA; use bf16 or fp32 on the CPU')
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True   # fp32 = TF32
    peak = peak_tflops(device, args.dtype, args.peak_tflops)
    env = environment(device)
    settings = {k: v for k, v in vars(args).items() if k != 'json'}
    settings.update(peak_tflops=peak, check_tolerances={k: v * args.check_tol_scale for k, v in CHECK_TOL.items()},
                    timing='median step wall time over interleaved rounds',
                    memory='growth of peak memory during the warm-up training steps, above the weights '
                           '(CUDA allocator peak; CPU peak RSS, approximate)')
    print(f"device: {env['device_name']} ({device.type}), torch {env['torch']}, batch {args.batch_size}, "
          f"{args.dtype}, threads {torch.get_num_threads()}, {args.rounds} rounds x {args.steps_per_round} steps"
          f"{', SMALL smoke models' if args.small else ''}", flush=True)
    rows: List[Row] = []
    loader: Optional[dict] = None

    def payload() -> dict:
        return dict(environment=env, settings=settings, rows=[asdict(r) for r in rows], loader=loader)

    def checkpoint(size_rows: List[Row]) -> None:
        if args.json:
            write_json(args.json, dict(payload(), rows=[asdict(r) for r in rows + size_rows]))

    for size in args.models:
        rows += run_size(size, args, device, args.dtype, peak, checkpoint)
        checkpoint([])
    if args.loader_workers:
        try:
            loader = measure_loader(args)
        except Exception as exc:  # noqa: BLE001
            loader = dict(error=short_error(exc))
    env['load_average_end'] = os.getloadavg() if hasattr(os, 'getloadavg') else None
    print()
    print(format_table(rows))
    if loader is not None:
        print(format_loader(loader))
    if args.json:
        write_json(args.json, payload())
        print(f'wrote {args.json}')
    failed = [r for r in rows if r.logits_check == 'fail' or (r.error is not None and 'compile' not in r.entry)]
    return 1 if failed or (loader or {}).get('error') else 0


if __name__ == '__main__':
    sys.exit(main())
