"""How the benchmark times its entries: a :class:`Workload` (model, optimizer, batch and step
functions), the warm-up with peak memory, interleaved rounds, and the medians, ratios and MFU
they are summarised into. A profile of the top ops is one more measurement of a workload."""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from data.throughput import sync_device
from tools.bench_report import Row, short_error

GIB = float(2 ** 30)
DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}

# Dense tensor-core peaks in TFLOP/s (NVIDIA data sheets); fp32 means TF32, which this tool
# enables for fp32 runs on CUDA. Matched in order against the device name.
PEAK_TFLOPS: Sequence[Tuple[Tuple[str, ...], Dict[str, float]]] = (
    (('H100', 'PCIE'), {'bf16': 756.0, 'fp16': 756.0, 'fp32': 378.0}),
    (('H100',), {'bf16': 989.0, 'fp16': 989.0, 'fp32': 494.0}),      # SXM
    (('H200',), {'bf16': 989.0, 'fp16': 989.0, 'fp32': 494.0}),
    (('A100',), {'bf16': 312.0, 'fp16': 312.0, 'fp32': 156.0}),
)
TRAIN_FLOPS_PER_FORWARD = 3.0      # forward + backward (grads of activations and weights)


# ----------------------------------------------------------------------------- device, memory, peak FLOP/s
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
        sync_device(self.device)

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
        sync_device(self.device)


def timed(step: Callable[[], None]) -> Tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    return time.perf_counter() - wall, time.process_time() - cpu


# ----------------------------------------------------------------------------- rounds and summary
@dataclass
class Entry:
    row: Row
    work: Optional[Workload] = None
    train_times: List[float] = field(default_factory=list)
    infer_times: List[float] = field(default_factory=list)
    cpu_shares: List[float] = field(default_factory=list)


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


# ----------------------------------------------------------------------------- profile
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
