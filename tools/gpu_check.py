#!/usr/bin/env python
"""The first thing to run on a GPU: proves the CUDA paths on the device at hand and writes one
Markdown report whose sections paste into BENCHMARKS.md.

Sections: environment; the CUDA-only tests; the attention self-check (every fused call of DAT-T++,
``auto`` and ``fused``, fp16 and bf16, against the float64 reference, with the SDPA backend each
selected); DAT-T++ trained on synthetic data with ``auto`` and ``reference`` side by side, fp16 and
bf16; the fp16 grad scaler's overflow path; the benchmark table. ``--cpu`` runs a reduced mode
(small model, bf16 only, a few steps, no pytest) that the test suite exercises.

    bash tools/gpu_check.sh                     # on one GPU, at most ~8 minutes
    bash tools/gpu_check.sh --cpu --out r.md    # the reduced CPU mode
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CUDA_TESTS = ['tests/test_nat.py', 'tests/test_fast_paths.py', 'tests/test_sdpa_layout.py',
              'tests/test_amp_paths.py']
# Reduced CPU model: N and D blocks at 64 px (as tools/benchmark.py --small).
SMALL_OPTS = ['MODEL.DAT.img_size', '64', 'DATA.IMG_SIZE', '64', 'MODEL.DAT.dim_stem', '16',
              'MODEL.DAT.dims', '[16,32,64,128]', 'MODEL.DAT.depths', '[1,1,2,1]',
              'MODEL.DAT.stage_spec', "[['N'],['D'],['N','D'],['D']]", 'MODEL.DAT.heads', '[1,2,4,8]',
              'MODEL.DAT.groups', '[1,1,2,4]']
DTYPES = {'fp16': torch.float16, 'bf16': torch.bfloat16, 'fp32': torch.float32}


class Report:
    """Markdown lines, also echoed to stdout as they come."""

    def __init__(self, path: str) -> None:
        self.path, self.lines = path, []

    def add(self, *lines: str) -> None:
        for line in lines:
            print(line, flush=True)
            self.lines.append(line)
        self.save()

    def save(self) -> None:
        Path(self.path).write_text('\n'.join(self.lines) + '\n')


def _config(args, impl: str, dtype: str = 'fp32'):
    from config import load_config
    opts = (SMALL_OPTS if args.cpu else []) + ['MODEL.ATTN_IMPL', impl, 'MODEL.NUM_CLASSES', '10',
                                               'MODEL.DAT.num_classes', '10', 'TRAIN.CLIP_GRAD', '5.0']
    return load_config(str(REPO / 'configs' / 'dat_tiny.yaml'), opts=opts)


def _autocast(device: torch.device, dtype: str) -> Callable[[], contextlib.AbstractContextManager]:
    return lambda: torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != 'fp32')


# ----------------------------------------------------------------------------- sections
def environment(report: Report, device: torch.device) -> None:
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'
    cuda = torch.version.cuda or '-'
    cudnn = torch.backends.cudnn.version() if device.type == 'cuda' else '-'
    report.add(f"# gpu_check: {name}", '',
               f"- torch {torch.__version__}, CUDA {cuda}, cuDNN {cudnn}, device {device}"
               f"{' (reduced CPU mode)' if device.type == 'cpu' else ''}", '')


def cuda_tests(report: Report, args) -> bool:
    report.add('## CUDA-only tests', '')
    if args.cpu:
        report.add('- skipped in the reduced CPU mode (they skip without CUDA)', '')
        return True
    cmd = [sys.executable, '-m', 'pytest', *CUDA_TESTS, '-q', '-p', 'no:cacheprovider', '-k', 'cuda',
           '-m', 'not slow', '-rs']
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.test_timeout)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    report.add('```', *tail, '```', f"- exit status {proc.returncode}", '')
    return proc.returncode == 0


def self_check(report: Report, args, device: torch.device) -> bool:
    from models import build_model
    from models.kernel_check import _CACHE, check_model_kernels, format_report
    report.add('## Attention self-check', '')
    ok = True
    img = 64 if args.cpu else 224
    for impl in ('auto', 'fused'):
        for dtype in args.dtypes:
            _CACHE.clear()
            model = build_model(_config(args, impl)).to(device)
            tic = time.perf_counter()
            try:
                results = check_model_kernels(model, torch.zeros(1, 3, img, img, device=device),
                                              _autocast(device, dtype), impl, logging.getLogger('gpu_check'))
                lines = format_report(results) or ['no fused call (every op runs its reference here)']
            except Exception as e:  # noqa: BLE001 - 'fused' stops on a failure: that is a result too
                ok, lines = False, [f"FAILED: {' '.join(str(e).split())}"]
            ok = ok and all('FAILED' not in line for line in lines)
            report.add(f"- `{impl}` {dtype} ({time.perf_counter() - tic:.1f}s):", *[f"  - {x}" for x in lines])
    report.add('')
    return ok


def _synthetic(n: int, img: int, classes: int, seed: int, device: torch.device):
    """``n`` fixed images whose class is a colour shift (learnable within a few hundred steps)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=gen)
    x = torch.randn(n, 3, img, img, generator=gen) * 0.5
    x += (y.float() / classes - 0.5).view(n, 1, 1, 1) * 2
    return x.to(device), y.to(device)


def train_losses(args, device: torch.device, impl: str, dtype: str) -> List[float]:
    """Losses of ``args.steps`` optimizer steps (the project's AdamW, clipping, fp16 scaler)."""
    from models import build_model
    from models.kernel_check import check_model_kernels
    from optimizer import build_optimizer
    from train_step import OptimizerStep
    config = _config(args, impl)
    img, batch = (64, 2) if args.cpu else (224, args.batch_size)
    torch.manual_seed(args.seed)
    model = build_model(config).to(device).train()
    autocast = _autocast(device, dtype)
    check_model_kernels(model, torch.zeros(1, 3, img, img, device=device), autocast, impl)
    config.defrost()
    config.TRAIN.BASE_LR = 1e-3
    optimizer = build_optimizer(config, model)
    step = OptimizerStep(optimizer, fp16_scaler=dtype == 'fp16' and device.type == 'cuda', device=device,
                         clip_grad=config.TRAIN.CLIP_GRAD)
    x, y = _synthetic(batch * 8, img, 10, args.seed, device)
    losses = []
    for i in range(args.steps):
        j = (i % 8) * batch
        with autocast():
            out = model(x[j:j + batch])
        loss = torch.nn.functional.cross_entropy(out.float(), y[j:j + batch])
        step.backward(loss)
        step.step(model.parameters())
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return [float(v) for v in torch.stack(losses).tolist()]


def training(report: Report, args, device: torch.device) -> bool:
    report.add(f"## DAT-T++{' (reduced)' if args.cpu else ''} on synthetic data: `auto` vs `reference`", '')
    # On the CPU 'auto' is the reference: compare 'fused' there, which runs the SDPA kernels.
    fast = 'fused' if args.cpu else 'auto'
    ok = True
    marks = sorted({0, args.steps // 4, args.steps // 2, 3 * args.steps // 4, args.steps - 1})
    for dtype in args.dtypes:
        tic = time.perf_counter()
        try:
            a = train_losses(args, device, fast, dtype)
            r = train_losses(args, device, 'reference', dtype)
        except Exception as e:  # noqa: BLE001
            report.add(f"- {dtype}: FAILED: {' '.join(str(e).split())[:300]}")
            ok = False
            continue
        finite = all(math.isfinite(v) for v in a + r)
        gap = max(abs(p - q) for p, q in zip(a, r))
        window = max(1, args.steps // 10)
        drop = sum(a[:window]) / window - sum(a[-window:]) / window
        report.add(f"### {dtype} ({args.steps} steps, {time.perf_counter() - tic:.0f}s)", '',
                   f"| step | {fast} loss | reference loss |", '|---|---|---|',
                   *[f"| {i + 1} | {a[i]:.4f} | {r[i]:.4f} |" for i in marks], '',
                   f"- max loss difference {gap:.4f}; {fast} loss fell by {drop:.4f} (first vs last "
                   f"{window} steps); all finite: {finite}", '')
        ok = ok and finite
    return ok


def overflow(report: Report, device: torch.device) -> bool:
    """An inf loss under the fp16 scaler: step skipped, parameters and AdamW state untouched, scale halved."""
    from train_step import OptimizerStep
    report.add('## Grad-scaler overflow path', '')
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    step = OptimizerStep(optimizer, fp16_scaler=True, device=device, clip_grad=1.0)
    x = torch.randn(16, 8, device=device)
    with torch.autocast(device.type, dtype=torch.float16 if device.type == 'cuda' else torch.bfloat16):
        step.backward(model(x).float().square().mean())
    step.step(model.parameters())
    optimizer.zero_grad(set_to_none=True)
    before = [p.detach().clone() for p in model.parameters()]
    scale = step.loss_scale()
    steps_before = [float(s['step']) for s in optimizer.state.values()]
    step.backward(model(x).float().square().mean() * float('inf'))
    norm, skipped = step.step(model.parameters())
    unchanged = all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    state_kept = [float(s['step']) for s in optimizer.state.values()] == steps_before
    ok = bool(skipped) and unchanged and state_kept and step.loss_scale() == scale / 2
    report.add(f"- inf loss: skipped {bool(skipped)}, grad norm {float(norm)}, parameters unchanged {unchanged}, "
               f"AdamW state unchanged {state_kept}, loss scale {scale:g} -> {step.loss_scale():g}: "
               f"{'ok' if ok else 'FAILED'}", '')
    return ok


def benchmark(report: Report, args) -> bool:
    from tools import benchmark as bench
    report.add('## Benchmark', '')
    if args.cpu:
        argv = ['--small', '--device', 'cpu', '--rounds', '1', '--variants', 'reference,fused', '--baselines', '']
    else:
        argv = ['--models', 'tiny', '--batch-size', str(args.batch_size), '--dtype', 'bf16', '--rounds', '3',
                '--variants', 'reference,fused', '--baselines', 'swin']     # compiled: BENCHMARKS.md's commands
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = bench.main(argv)
    table = out.getvalue().strip().splitlines()
    start = next((i for i, line in enumerate(table) if line.startswith('entry ')), 0)
    report.add(f"`python tools/benchmark.py {' '.join(argv)}` (exit status {status})", '', '```',
               *table[max(start - 1, 0):], '```', '')
    return status == 0


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--cpu', action='store_true', help='the reduced CPU mode (what the test suite runs)')
    parser.add_argument('--out', default='gpu_check_report.md', help='the report file (Markdown)')
    parser.add_argument('--steps', type=int, default=None, help='training steps per run (default 300; 4 with --cpu)')
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--test-timeout', type=int, default=180, help='seconds for the CUDA-only tests')
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        parser.error('no CUDA device is visible; run with --cpu for the reduced CPU mode')
    args.steps = args.steps or (4 if args.cpu else 300)
    args.dtypes = ['bf16'] if args.cpu else ['fp16', 'bf16']
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format='%(message)s')
    device = torch.device('cpu' if args.cpu else 'cuda')
    report = Report(args.out)
    tic = time.perf_counter()
    environment(report, device)
    results = {}
    for name, section in (('cuda tests', lambda: cuda_tests(report, args)),
                          ('self-check', lambda: self_check(report, args, device)),
                          ('training', lambda: training(report, args, device)),
                          ('overflow', lambda: overflow(report, device)),
                          ('benchmark', lambda: benchmark(report, args))):
        try:
            results[name] = section()
        except Exception as e:  # noqa: BLE001 - one broken section must not hide the others
            report.add(f"- {name}: FAILED: {type(e).__name__}: {' '.join(str(e).split())[:300]}", '')
            results[name] = False
    failed = [n for n, ok in results.items() if not ok]
    report.add('## Summary', '', f"- {'all sections passed' if not failed else 'FAILED: ' + ', '.join(failed)} "
               f"in {time.perf_counter() - tic:.0f}s; report: {os.path.abspath(args.out)}")
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
