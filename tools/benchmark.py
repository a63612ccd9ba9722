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
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GIB = float(2 ** 30)

# DAT++ config per size, and the timm baselines of the same size.
DAT_CONFIGS = {'tiny': 'configs/dat_tiny.yaml', 'small': 'configs/dat_small.yaml',
               'base': 'configs/dat_base.yaml'}
BASELINES = {
    'swin': {'tiny': 'swin_tiny_patch4_window7_224', 'small': 'swin_small_patch4_window7_224',
             'base': 'swin_base_patch4_window7_224'},
    'davit': {'tiny': 'davit_tiny', 'small': 'davit_small', 'base': 'davit_base'},
    'convnext': {'tiny': 'convnext_tiny', 'small': 'convnext_small', 'base': 'convnext_base'},
}
VARIANTS = ('reference', 'fused', 'reference+compile', 'fused+compile')
DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}

# --small: models a few hundred thousand parameters large (DAT++ with N and D blocks), 64 px,
# so that every entry runs on a CPU in seconds.
SMALL_DAT_OPTS = [
    'MODEL.DAT.img_size', '64', 'MODEL.DAT.dim_stem', '16', 'MODEL.DAT.dims', '[16,32,64,128]',
    'MODEL.DAT.depths', '[1,1,2,1]', 'MODEL.DAT.stage_spec', "[['N'],['D'],['N','D'],['D']]",
    'MODEL.DAT.heads', '[1,2,4,8]', 'MODEL.DAT.groups', '[1,1,2,4]',
]
SMALL_BASELINE_KWARGS = {
    'swin': dict(embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=2, img_size=64),
    'davit': dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 4), window_size=2),
    'convnext': dict(dims=(16, 32, 64, 128), depths=(1, 1, 1, 1)),
}
SMALL_IMG = 64

# Dense tensor-core peaks in TFLOP/s (NVIDIA data sheets); fp32 means TF32, which this tool
# enables for fp32 runs on CUDA. Matched in order against the device name.
PEAK_TFLOPS: Sequence[Tuple[Tuple[str, ...], Dict[str, float]]] = (
    (('H100', 'PCIE'), {'bf16': 756.0, 'fp16': 756.0, 'fp32': 378.0}),
    (('H100',), {'bf16': 989.0, 'fp16': 989.0, 'fp32': 494.0}),      # SXM
    (('H200',), {'bf16': 989.0, 'fp16': 989.0, 'fp32': 494.0}),
    (('A100',), {'bf16': 312.0, 'fp16': 312.0, 'fp32': 156.0}),
)
TRAIN_FLOPS_PER_FORWARD = 3.0      # forward + backward (grads of activations and weights)
CHECK_TABLE_STD = 1.0              # std of the shared weights' position tables for the logits check
# Largest tolerated max|variant - reference| / max|reference| of the logits, per compared dtype.
CHECK_TOL = {'fp32': 1e-3, 'fp16': 1e-2, 'bf16': 5e-2}


@dataclass
class Row:
    """One entry's measurements; ``error`` is set instead of numbers when it failed."""
    model: str                    # size key, e.g. 'tiny'
    entry: str                    # 'dat:reference', 'dat:fused+compile', 'swin', ...
    arch: str                     # config or timm name
    batch_size: int
    dtype: str
    img_size: int
    params_m: Optional[float] = None
    fwd_gflops_per_img: Optional[float] = None
    train_img_s: Optional[float] = None
    infer_img_s: Optional[float] = None
    train_step_s: Optional[float] = None           # median timed training step
    first_train_step_s: Optional[float] = None     # the very first step (compilation included)
    first_step_ratio: Optional[float] = None       # first / median training step
    train_peak_mem_gib: Optional[float] = None     # peak memory of training above the weights
    cpu_share: Optional[float] = None              # CPU: median process CPU time / (wall x threads)
    train_steps: int = 0
    infer_steps: int = 0
    train_vs_baseline: Optional[float] = None      # img/s ratios against the first baseline
    infer_vs_baseline: Optional[float] = None
    mem_vs_baseline: Optional[float] = None
    train_vs_reference: Optional[float] = None     # DAT rows: against the DAT reference (eager)
    train_mfu: Optional[float] = None
    infer_mfu: Optional[float] = None
    logits_max_rel_diff: Dict[str, float] = field(default_factory=dict)
    logits_check: Optional[str] = None
    kernels: Dict[str, str] = field(default_factory=dict)
    profile_top_ops: Optional[List[dict]] = None
    error: Optional[str] = None


# ----------------------------------------------------------------------------- device helpers
def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _release_freed_heap() -> None:
    """Give freed malloc memory back to the OS (glibc), so that the resident set shrinks to what
    is live and the next phase's growth is its own; a no-op elsewhere."""
    try:
        ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Growth of memory over a phase, above what was allocated when it began. CUDA: the
    allocator's peak; CPU: the process's peak resident set (``VmHWM``, reset through
    ``/proc/self/clear_refs``; Linux, approximate: it includes allocator overhead)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._base: Optional[int] = None

    @staticmethod
    def _status_kib(key: str) -> Optional[int]:
        try:
            with open('/proc/self/status') as f:
                for line in f:
                    if line.startswith(key + ':'):
                        return int(line.split()[1])
        except OSError:
            pass
        return None

    def reset(self) -> None:
        gc.collect()
        if self.device.type == 'cuda':
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return
        self._base = None
        _release_freed_heap()
        try:
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')            # '5' resets the peak RSS to the current RSS
        except OSError:
            return
        rss = self._status_kib('VmRSS')
        self._base = None if rss is None else rss * 1024

    def peak_gib(self) -> Optional[float]:
        if self._base is None:
            return None
        if self.device.type == 'cuda':
            return (torch.cuda.max_memory_allocated(self.device) - self._base) / GIB
        peak = self._status_kib('VmHWM')
        return None if peak is None else max(peak * 1024 - self._base, 0) / GIB


def peak_tflops(device: torch.device, dtype: str, override: Optional[float]) -> Optional[float]:
    """The device's dense peak for ``dtype`` (``--peak-tflops`` wins); None when unknown."""
    if override:
        return override
    if device.type != 'cuda':
        return None
    name = torch.cuda.get_device_name(device).upper()
    for keys, peaks in PEAK_TFLOPS:
        if all(k in name for k in keys):
            return peaks[dtype]
    return None


def mfu(img_per_s: Optional[float], fwd_flops_per_img: Optional[float], peak: Optional[float],
        flops_per_forward: float = 1.0) -> Optional[float]:
    """Model FLOP utilisation: achieved FLOP/s over the peak (``peak`` in TFLOP/s)."""
    if not img_per_s or not peak or not fwd_flops_per_img:
        return None
    return img_per_s * flops_per_forward * fwd_flops_per_img / (peak * 1e12)


def device_name(device: torch.device) -> str:
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    import timm
    try:
        commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
               torch=torch.__version__, timm=timm.__version__, python=platform.python_version(),
               cuda=torch.version.cuda, device=device.type, device_name=device_name(device),
               cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), git_commit=commit)
    try:
        env['load_average'] = os.getloadavg()
    except OSError:
        pass
    if device.type == 'cuda':
        env['tf32'] = torch.backends.cuda.matmul.allow_tf32
        env['gpu_memory_gib'] = torch.cuda.get_device_properties(device).total_memory / GIB
    return env


def short_error(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f'{type(exc).__name__}: {(lines[0] if lines else "")[:300]}'


# ----------------------------------------------------------------------------- models
def load_dat_config(size: str, args: argparse.Namespace, impl: str):
    from config import load_config
    opts = (SMALL_DAT_OPTS if args.small else []) + list(args.opts) + ['MODEL.ATTN_IMPL', impl]
    return load_config(str(REPO / DAT_CONFIGS[size]), opts=opts)


def build_baseline(kind: str, size: str, args: argparse.Namespace, img: int) -> Tuple[str, nn.Module]:
    import timm
    name = BASELINES[kind][size]
    kwargs = dict(SMALL_BASELINE_KWARGS[kind]) if args.small else {}
    if kind == 'swin' and img != 224:
        kwargs['img_size'] = img
    return name, timm.create_model(name, pretrained=False, num_classes=1000, **kwargs)


def redraw_position_tables(model: nn.Module, std: float, seed: int) -> None:
    """Re-draw relative-position tables with ``std``: at init they are ~0.01, and a kernel that
    dropped or misplaced the bias would still match the reference's logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rsplit('.', 1)[-1] in ('rpe_table', 'rpb', 'relative_position_bias_table'):
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def kernel_names(config, device: torch.device, img: int) -> Dict[str, str]:
    """What each DAT attention op runs for this config; neighborhood attention per N-block map
    (maps smaller than the kernel run padded to it)."""
    from models.nat import kernel_for
    impl, dat = config.MODEL.ATTN_IMPL, config.MODEL.DAT
    maps = sorted({max(img // 4 // 2 ** i, dat.nat_ksizes[i]) for i, spec in enumerate(dat.stage_spec)
                   if 'N' in spec}, reverse=True)
    na = {side: kernel_for(torch.empty(1, 1, side, side, 1, device=device), impl) for side in maps}
    return {'deformable': 'sdpa' if impl == 'fused' else 'reference',
            'neighborhood': ', '.join(f'{side}x{side}: {name}' for side, name in na.items())}


def forward_flops_per_image(model: nn.Module, img: int) -> Optional[float]:
    """Forward FLOPs of one image (2 per multiply-accumulate); None when they cannot be counted."""
    try:
        from tools.flops import count_flops
        return 2.0 * count_flops(model, img)['macs']
    except Exception:  # noqa: BLE001 - FLOPs are informative only
        return None


# ----------------------------------------------------------------------------- workload
class Workload:
    """A model, its optimizer, one fixed batch, and the timed step functions."""

    def __init__(self, model: nn.Module, config, x: torch.Tensor, y: torch.Tensor, dtype: str,
                 device: torch.device, compile_kwargs: Optional[dict] = None):
        from optimizer import build_optimizer
        self.model = model
        self.runner = torch.compile(model, **compile_kwargs) if compile_kwargs is not None else model
        self.x, self.y, self.device = x, y, device
        self.amp_dtype = DTYPES[dtype]
        self.autocast = dtype != 'fp32'
        self.optimizer = build_optimizer(config, model)
        self.scaler = torch.amp.GradScaler(device.type) if dtype == 'fp16' else None

    def _amp(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.autocast)

    def infer_step(self) -> None:
        self.model.eval()
        with torch.no_grad(), self._amp():
            self.runner(self.x)
        _sync(self.device)

    def train_step(self) -> None:
        self.model.train()
        with self._amp():
            loss = F.cross_entropy(self.runner(self.x), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        _sync(self.device)


def timed(step: Callable[[], None]) -> Tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    return time.perf_counter() - wall, time.process_time() - cpu


# ----------------------------------------------------------------------------- logits check
@contextlib.contextmanager
def exact_fp32(device: torch.device) -> Iterator[None]:
    """Full-precision matmuls / convolutions while comparing fp32 logits (TF32 off)."""
    if device.type != 'cuda':
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def eval_logits(runner: nn.Module, model: nn.Module, x: torch.Tensor, dtype: str) -> torch.Tensor:
    model.eval()
    ctx = exact_fp32(x.device) if dtype == 'fp32' else torch.autocast(x.device.type, dtype=DTYPES[dtype])
    with torch.no_grad(), ctx:
        return runner(x).float()


def check_dtypes(bench_dtype: str) -> List[str]:
    """The benchmark dtype, then exact fp32 (which separates a wrong kernel from rounding)."""
    return list(dict.fromkeys([bench_dtype, 'fp32']))


def compare_logits(work: Workload, reference: Dict[str, torch.Tensor], row: Row, tol_scale: float) -> bool:
    """Fill ``row.logits_*``; True when every compared dtype is within tolerance."""
    ok = True
    for dtype, ref in reference.items():
        out = eval_logits(work.runner, work.model, work.x, dtype)
        diff = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
        row.logits_max_rel_diff[dtype] = diff
        ok = ok and math.isfinite(diff) and diff <= CHECK_TOL[dtype] * tol_scale
    row.logits_check = 'pass' if ok else 'fail'
    return ok


# ----------------------------------------------------------------------------- one model size
@dataclass
class Entry:
    row: Row
    work: Optional[Workload] = None
    train_times: List[float] = field(default_factory=list)
    infer_times: List[float] = field(default_factory=list)
    cpu_shares: List[float] = field(default_factory=list)


def build_entries(size: str, args: argparse.Namespace, device: torch.device, dtype: str,
                  x: torch.Tensor, y: torch.Tensor) -> List[Entry]:
    """Every DAT variant (same weights) and every baseline of one size, ready to step."""
    from models import build_model
    img, batch = x.shape[-1], x.shape[0]
    entries: List[Entry] = []

    def new_row(entry: str, arch: str) -> Row:
        return Row(model=size, entry=entry, arch=arch, batch_size=batch, dtype=dtype, img_size=img)

    ref_config = load_dat_config(size, args, 'reference')
    torch.manual_seed(args.seed)
    model = build_model(ref_config)
    redraw_position_tables(model, CHECK_TABLE_STD, args.seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    flops = forward_flops_per_image(model, img)
    reference_logits: Dict[str, torch.Tensor] = {}
    compile_kwargs = dict(backend=args.compile_backend)
    if args.compile_mode:
        compile_kwargs['mode'] = args.compile_mode
    for variant in args.variants:
        impl = variant.split('+')[0]
        row = new_row(f'dat:{variant}', ref_config.MODEL.NAME)
        row.params_m, row.fwd_gflops_per_img = params_m, flops / 1e9 if flops else None
        entry = Entry(row)
        entries.append(entry)
        try:
            config = load_dat_config(size, args, impl)
            row.kernels = kernel_names(config, device, img)
            model = build_model(config)
            model.load_state_dict(state)
            model.to(device)
            entry.work = Workload(model, config, x, y, dtype, device,
                                  compile_kwargs if variant.endswith('+compile') else None)
            if variant == 'reference':
                for d in check_dtypes(dtype):
                    reference_logits[d] = eval_logits(model, model, x, d)
            elif reference_logits and not compare_logits(entry.work, reference_logits, row, args.check_tol_scale):
                diffs = ', '.join(f'{d} {v:.2e}' for d, v in row.logits_max_rel_diff.items())
                raise RuntimeError(f'logits differ from the reference (max rel diff {diffs}); not timed')
        except Exception as exc:  # noqa: BLE001 - one failing entry (compile, OOM) must not end the run
            row.error, entry.work = short_error(exc), None
    for kind in args.baselines:
        try:
            torch.manual_seed(args.seed)
            name, model = build_baseline(kind, size, args, img)
        except Exception as exc:  # noqa: BLE001
            entries.append(Entry(new_row(kind, BASELINES[kind][size])))
            entries[-1].row.error = short_error(exc)
            continue
        row = new_row(kind, name)
        row.params_m = sum(p.numel() for p in model.parameters()) / 1e6
        baseline_flops = forward_flops_per_image(model, img)
        row.fwd_gflops_per_img = baseline_flops / 1e9 if baseline_flops else None
        entry = Entry(row)
        entries.append(entry)
        try:
            entry.work = Workload(model.to(device), ref_config, x, y, dtype, device)
        except Exception as exc:  # noqa: BLE001
            row.error = short_error(exc)
    gc.collect()
    return entries


def warm_up(entry: Entry, args: argparse.Namespace) -> None:
    """First training step (timed: compilation and lazy setup included), the remaining warm-up
    steps and one inference step, with the peak memory of training."""
    work, row = entry.work, entry.row
    memory = PeakMemory(work.device)
    memory.reset()
    row.first_train_step_s, _ = timed(work.train_step)
    for _ in range(args.warmup - 1):
        work.train_step()
    row.train_peak_mem_gib = memory.peak_gib()
    work.infer_step()                       # compiles the inference graph before timing


def run_rounds(entries: List[Entry], args: argparse.Namespace, phase: str) -> None:
    """``args.rounds`` rounds; each runs ``args.steps_per_round`` steps of every live entry,
    starting one entry later every round."""
    live = [e for e in entries if e.work is not None and e.row.error is None]
    threads = torch.get_num_threads()
    for r in range(args.rounds):
        start = r % max(len(live), 1)
        for entry in live[start:] + live[:start]:
            if entry.work is None:           # failed earlier in this phase
                continue
            step = entry.work.train_step if phase == 'train' else entry.work.infer_step
            times = entry.train_times if phase == 'train' else entry.infer_times
            try:
                for _ in range(args.steps_per_round):
                    wall, cpu = timed(step)
                    times.append(wall)
                    entry.cpu_shares.append(cpu / (wall * threads))
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory: this entry stops
                entry.row.error, entry.work = short_error(exc), None
        print(f'  {phase} round {r + 1}/{args.rounds} done', flush=True)


def summarise(entries: List[Entry], peak: Optional[float]) -> None:
    rows = [e.row for e in entries]
    for e in entries:
        row = e.row
        row.train_steps, row.infer_steps = len(e.train_times), len(e.infer_times)
        if e.train_times:
            row.train_step_s = statistics.median(e.train_times)
            row.train_img_s = row.batch_size / row.train_step_s
            if row.first_train_step_s:
                row.first_step_ratio = row.first_train_step_s / row.train_step_s
        if e.infer_times:
            row.infer_img_s = row.batch_size / statistics.median(e.infer_times)
        if e.cpu_shares and e.work is not None and e.work.device.type == 'cpu':
            row.cpu_share = statistics.median(e.cpu_shares)
        if row.fwd_gflops_per_img:
            row.train_mfu = mfu(row.train_img_s, row.fwd_gflops_per_img * 1e9, peak, TRAIN_FLOPS_PER_FORWARD)
            row.infer_mfu = mfu(row.infer_img_s, row.fwd_gflops_per_img * 1e9, peak)
    baseline = next((r for r in rows if not r.entry.startswith('dat:')), None)
    reference = next((r for r in rows if r.entry == 'dat:reference'), None)

    def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
        return a / b if a is not None and b else None

    for row in rows:
        if baseline is not None and row.error is None and baseline.error is None:
            row.train_vs_baseline = ratio(row.train_img_s, baseline.train_img_s)
            row.infer_vs_baseline = ratio(row.infer_img_s, baseline.infer_img_s)
            row.mem_vs_baseline = ratio(row.train_peak_mem_gib, baseline.train_peak_mem_gib)
        if reference is not None and row.entry.startswith('dat:') and row.error is None:
            row.train_vs_reference = ratio(row.train_img_s, reference.train_img_s)


def profile_top_ops(work: Workload, steps: int, limit: int = 15) -> Tuple[str, List[dict]]:
    """torch.profiler over ``steps`` training steps: the ops with the most self device (CUDA)
    or CPU time, as a printable table and as rows."""
    from torch.profiler import ProfilerActivity, profile
    cuda = work.device.type == 'cuda'
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            work.train_step()
    averages = prof.key_averages()
    key = 'self_device_time_total' if cuda else 'self_cpu_time_total'
    table = averages.table(sort_by=key, row_limit=limit)
    events = sorted(averages, key=lambda e: getattr(e, key, 0.0), reverse=True)[:limit]
    total = sum(getattr(e, key, 0.0) for e in averages) or 1.0
    rows = [dict(op=e.key, self_time_ms=getattr(e, key, 0.0) / 1000.0 / steps,
                 share=getattr(e, key, 0.0) / total, calls_per_step=e.count / steps) for e in events]
    return table, rows


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
    and the rest of the training transform) on a generated demo ImageFolder."""
    from config import load_config
    from data import build_loader
    from data.demo import make_demo_dataset
    root = args.loader_data or os.path.join(tempfile.gettempdir(), f'dat_bench_demo_{args.loader_image_size}')
    per_class = max(1, -(-args.loader_images // 4))
    make_demo_dataset(root, classes=4, train_per_class=per_class, val_per_class=1, size=args.loader_image_size)
    opts = ['DATA.DATA_PATH', root, 'DATA.BATCH_SIZE', str(args.loader_batch_size),
            'DATA.NUM_WORKERS', str(args.loader_workers), 'MODEL.NUM_CLASSES', '4'] + list(args.loader_opts)
    config = load_config(str(REPO / DAT_CONFIGS['tiny']), opts=opts)
    loader = build_loader(config)[2]
    loader.sampler.set_epoch(0)
    times, images = [], 0
    it = iter(loader)
    next(it)                          # worker start-up and the first batch are not timed
    start = time.perf_counter()
    for batch in it:
        images += batch[0].shape[0]
    elapsed = time.perf_counter() - start
    del it
    img_s = images / elapsed if elapsed > 0 else None
    return dict(workers=args.loader_workers, batch_size=args.loader_batch_size, images_timed=images,
                source_image_size=args.loader_image_size, img_size=int(config.DATA.IMG_SIZE),
                img_s=img_s, img_s_per_worker=img_s / args.loader_workers if img_s else None,
                opts=list(args.loader_opts))


# ----------------------------------------------------------------------------- output
def _fmt(value: Optional[float], spec: str, suffix: str = '') -> str:
    return '-' if value is None else f'{value:{spec}}{suffix}'


TABLE_HEADER = ['entry', 'arch', 'train img/s', 'infer img/s', 'train x base', 'infer x base',
                'mem GiB', 'mem x base', 'first/step', 'steps', 'cpu share', 'logits check']


def format_table(rows: List[Row]) -> str:
    lines = []
    for r in rows:
        if r.error is not None:
            numbers = ['error'] + [''] * 8
        else:
            numbers = [_fmt(r.train_img_s, '.2f'), _fmt(r.infer_img_s, '.2f'),
                       _fmt(r.train_vs_baseline, '.2f', 'x'), _fmt(r.infer_vs_baseline, '.2f', 'x'),
                       _fmt(r.train_peak_mem_gib, '.2f'), _fmt(r.mem_vs_baseline, '.2f', 'x'),
                       _fmt(r.first_step_ratio, '.1f', 'x'), f'{r.train_steps}/{r.infer_steps}',
                       _fmt(r.cpu_share, '.2f')]
        check = '-' if r.logits_check is None else r.logits_check
        if r.logits_max_rel_diff:
            check += f' ({max(r.logits_max_rel_diff.values()):.1e})'
        lines.append([r.entry, r.arch] + numbers + [check])
    widths = [max(len(x[i]) for x in lines + [TABLE_HEADER]) for i in range(len(TABLE_HEADER))]
    out = ['  '.join(c.ljust(w) for c, w in zip(TABLE_HEADER, widths)), '  '.join('-' * w for w in widths)]
    out += ['  '.join(c.ljust(w) for c, w in zip(x, widths)) for x in lines]
    errors = [f'  {r.entry}: {r.error}' for r in rows if r.error is not None]
    if errors:
        out += ['errors:'] + errors
    return '\n'.join(out)


def write_json(path: str, payload: dict) -> None:
    tmp = f'{path}.tmp'
    with open(tmp, 'w') as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


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
    for name in ('batch_size', 'warmup', 'rounds', 'steps_per_round'):
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
        print('loader: ' + (loader.get('error') or
                            f"{_fmt(loader['img_s_per_worker'], '.1f')} img/s per worker "
                            f"({loader['workers']} workers, {loader['images_timed']} images)"))
    if args.json:
        write_json(args.json, payload())
        print(f'wrote {args.json}')
    failed = [r for r in rows if r.logits_check == 'fail' or (r.error is not None and 'compile' not in r.entry)]
    return 1 if failed or (loader or {}).get('error') else 0


if __name__ == '__main__':
    sys.exit(main())
