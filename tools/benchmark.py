#!/usr/bin/env python
"""Throughput, peak memory and MFU of DAT++ with the reference and fast kernels, against Swin.

One run measures, on one device and with one batch size and dtype, for each model
(DAT-T/S/B++ at 224 and DAT-B++ at 384) and each variant:

* ``reference``: ``MODEL.ATTN_IMPL reference`` (plain PyTorch attention everywhere);
* ``fast``: ``MODEL.ATTN_IMPL auto``: deformable attention through SDPA and, on CUDA,
  neighborhood attention through flex attention;
* ``compile``: ``fast`` wrapped in ``torch.compile`` (a failure becomes a row with the error);
* ``channels_last``: ``fast`` with weights and input in channels-last layout (opt-in);
* ``swin``: timm's Swin of the same size (random init, nothing downloaded), 224 only.

A training step is forward + cross-entropy + backward + AdamW step (the project's
``optimizer.build_optimizer``) under autocast; fp16 adds a GradScaler. Inference is
``eval()`` + ``no_grad`` + autocast. The input is one random batch kept on the device, so
the numbers are the model's, not the data loader's. Before a fast variant is timed its
logits are compared with the reference's on the same weights and batch; a mismatch is
reported and makes the exit status 1, so a speed-up can never come from a wrong kernel.

    python tools/benchmark.py --models tiny --batch-size 128 --dtype bf16 --json tiny.json
    python tools/benchmark.py --small --device cpu --models tiny --json smoke.json   # CPU smoke (CI)

MFU = achieved FLOP/s / the device's dense peak, with forward FLOPs per image from
``tools/flops.py`` (2 FLOPs per multiply-accumulate) and a training step counted as 3x forward.
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


@dataclass(frozen=True)
class ModelSpec:
    config: str                 # YAML under configs/
    swin: Optional[str]         # timm Swin of the same size (None: no Swin row, e.g. at 384)


MODELS: Dict[str, ModelSpec] = {
    'tiny': ModelSpec('configs/dat_tiny.yaml', 'swin_tiny_patch4_window7_224'),
    'small': ModelSpec('configs/dat_small.yaml', 'swin_small_patch4_window7_224'),
    'base': ModelSpec('configs/dat_base.yaml', 'swin_base_patch4_window7_224'),
    'base384': ModelSpec('configs/dat_base_384.yaml', None),
}
VARIANTS = ('reference', 'fast', 'compile', 'channels_last', 'swin')
VARIANT_LABELS = {'reference': 'reference', 'fast': 'fast', 'compile': 'fast+compile',
                  'channels_last': 'fast+channels_last'}
DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}

# Dense (no sparsity) tensor-core peaks in TFLOP/s from NVIDIA's data sheets; fp32 means TF32,
# which this tool enables for fp32 runs on CUDA. Matched in order against the device name.
PEAK_TFLOPS: Sequence[Tuple[Tuple[str, ...], Dict[str, float]]] = (
    (('H100', 'PCIE'), {'bf16': 756.0, 'fp16': 756.0, 'fp32': 378.0}),
    (('H100',), {'bf16': 989.0, 'fp16': 989.0, 'fp32': 494.0}),      # SXM
    (('H200',), {'bf16': 989.0, 'fp16': 989.0, 'fp32': 494.0}),
    (('A100',), {'bf16': 312.0, 'fp16': 312.0, 'fp32': 156.0}),
)

# --small: a DAT++ a few hundred thousand parameters large with both N and D blocks,
# and a Swin of the same spirit, so that every variant runs on a CPU in seconds.
SMALL_DAT_OPTS = [
    'MODEL.DAT.img_size', '64', 'MODEL.DAT.dim_stem', '16', 'MODEL.DAT.dims', '[16,32,64,128]',
    'MODEL.DAT.depths', '[1,1,2,1]', 'MODEL.DAT.stage_spec', "[['N'],['D'],['N','D'],['D']]",
    'MODEL.DAT.heads', '[1,2,4,8]', 'MODEL.DAT.groups', '[1,1,2,4]',
]
SMALL_SWIN_KWARGS = dict(embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=2)
SMALL_IMG = 64                      # input side at 224 in --small mode (scaled for the 384 model)
SMALL_DEFAULTS = dict(batch_size=2, warmup=1, iters=2)

CHECK_TABLE_STD = 1.0              # std of the shared weights' position tables (redraw_position_tables)
TRAIN_FLOPS_PER_FORWARD = 3.0      # forward + backward (grads of activations and weights)

# Largest tolerated max|fast - reference| / max|reference| of the logits, per compared dtype.
CHECK_TOL = {'fp32': 1e-3, 'fp16': 1e-2, 'bf16': 5e-2}


@dataclass
class Row:
    """One (model, variant) measurement; ``error`` is set instead of numbers when it failed."""
    model: str
    variant: str
    arch: str
    batch_size: int
    dtype: str
    img_size: int
    kernels: Dict[str, str] = field(default_factory=dict)
    train_img_s: Optional[float] = None
    infer_img_s: Optional[float] = None
    train_peak_mem_gib: Optional[float] = None
    infer_peak_mem_gib: Optional[float] = None
    first_train_step_s: Optional[float] = None     # includes compilation for 'compile'
    first_infer_step_s: Optional[float] = None
    train_speedup_vs_reference: Optional[float] = None
    infer_speedup_vs_reference: Optional[float] = None
    train_mem_vs_reference: Optional[float] = None
    params_m: Optional[float] = None
    fwd_gflops_per_img: Optional[float] = None
    train_mfu: Optional[float] = None
    infer_mfu: Optional[float] = None
    logits_max_rel_diff: Dict[str, float] = field(default_factory=dict)   # compared dtype -> diff
    logits_check: Optional[str] = None           # 'pass' | 'fail' | 'skipped: ...' | None (not compared)
    profile_top_ops: Optional[List[dict]] = None
    error: Optional[str] = None

    @property
    def label(self) -> str:
        return self.arch if self.variant == 'swin' else VARIANT_LABELS[self.variant]


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
    """Peak memory of a phase: the CUDA allocator's peak on GPU; on CPU the growth of the
    process's peak resident set (``VmHWM``) over the phase, reset through
    ``/proc/self/clear_refs`` (Linux; approximate: it includes allocator overhead);
    ``None`` where neither is available."""

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
            return
        self._base = None
        _release_freed_heap()
        try:
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')            # '5' resets the peak RSS to the current RSS
        except OSError:
            return
        self._base = self._status_kib('VmRSS')

    def peak_gib(self) -> Optional[float]:
        if self.device.type == 'cuda':
            return torch.cuda.max_memory_allocated(self.device) / GIB
        peak = self._status_kib('VmHWM')
        if self._base is None or peak is None:
            return None
        return max(peak - self._base, 0) * 1024 / GIB


def seconds_per_step(fn: Callable[[], None], iters: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` over ``iters`` calls. On GPU: the mean, from CUDA events
    around the whole loop (the queue stays full, as in training). On CPU: the median of
    individually timed calls, robust to other processes taking the cores for a while."""
    _sync(device)
    if device.type == 'cuda':
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0 / iters
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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


def mfu(img_per_s: Optional[float], fwd_flops_per_img: float, peak: Optional[float],
        flops_per_forward: float = 1.0) -> Optional[float]:
    """Model FLOP utilisation: achieved FLOP/s over the peak (``peak`` in TFLOP/s); a training
    step costs ``flops_per_forward`` forwards (about 3: the backward pass is about two)."""
    if not img_per_s or not peak:
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
               cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if torch.cuda.is_available() else None,
               device=device.type, device_name=device_name(device), cpu_count=os.cpu_count(),
               torch_threads=torch.get_num_threads(), git_commit=commit)
    env['timing'] = ('mean step time, CUDA events around the timed loop' if device.type == 'cuda' else
                     'median step time, perf_counter per step')
    env['memory_measure'] = ('torch.cuda.max_memory_allocated' if device.type == 'cuda' else
                             'growth of peak RSS (VmHWM) over the phase, approximate')
    if device.type == 'cuda':
        env['tf32'] = torch.backends.cuda.matmul.allow_tf32
        env['gpu_memory_gib'] = torch.cuda.get_device_properties(device).total_memory / GIB
    return env


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()


def short_error(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else ''
    return f'{type(exc).__name__}: {text[:300]}'


# ----------------------------------------------------------------------------- models
def load_dat_config(spec: ModelSpec, args: argparse.Namespace, impl: str):
    from config import load_config
    opts = (SMALL_DAT_OPTS if args.small else []) + list(args.opts) + ['MODEL.ATTN_IMPL', impl]
    return load_config(str(REPO / spec.config), opts=opts)


def input_size(spec: ModelSpec, args: argparse.Namespace) -> int:
    """The benchmark's input side: ``--img-size``, else the config's ``DATA.IMG_SIZE`` (384 for
    the 384 model, whose tables stay at 224), scaled down to the smoke size with ``--small``."""
    if args.img_size:
        return args.img_size
    config = load_dat_config(spec, args, 'reference')
    size = config.DATA.IMG_SIZE
    if args.small:
        size = max(32, SMALL_IMG * size // 224 // 32 * 32)
    return size


def use_sdpa_for_deformable(model: nn.Module) -> None:
    """Deformable attention's 'auto' means SDPA only on CUDA; SDPA also runs on CPU (same
    arithmetic, tested in tests/test_fast_paths.py), so the fast variants ask for it explicitly."""
    from models.dat_blocks import DAttention
    for module in model.modules():
        if isinstance(module, DAttention):
            module.attn_impl = 'fused'


POSITION_TABLES = ('rpe_table', 'rpb', 'relative_position_bias_table')


def redraw_position_tables(model: nn.Module, std: float, seed: int) -> int:
    """Re-draw the relative-position bias tables with ``std``. At initialisation they are ~0.01,
    so a kernel that dropped or misplaced the bias would still match the reference's logits;
    trained tables are O(1). Throughput does not depend on the values. Returns the count."""
    gen = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rsplit('.', 1)[-1] in POSITION_TABLES:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
                count += 1
    return count


def kernel_names(variant: str, device: torch.device) -> Dict[str, str]:
    from models.nat import fused_available
    if variant == 'swin':
        return {'attention': 'timm swin (window attention)'}
    if variant == 'reference':
        return {'deformable': 'reference', 'neighborhood': 'reference'}
    return {'deformable': 'sdpa', 'neighborhood': 'flex_attention' if fused_available(device) else 'reference'}


def build_swin(name: str, args: argparse.Namespace, img: int) -> nn.Module:
    import timm
    kwargs = dict(SMALL_SWIN_KWARGS) if args.small else {}
    if img != 224 or args.small:
        kwargs['img_size'] = img
    return timm.create_model(name, pretrained=False, num_classes=1000, **kwargs)


def forward_flops_per_image(model: nn.Module, img: int) -> Tuple[Optional[float], str]:
    """Forward FLOPs of one image (2 per multiply-accumulate) and how they were counted."""
    try:
        from tools.flops import count_flops
        return 2.0 * count_flops(model, img)['macs'], 'tools/flops.py (conv, matmul, neighborhood, sampling)'
    except ImportError:
        pass
    from torch.utils.flop_counter import FlopCounterMode
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, img, img, device=device))
    finally:
        model.train(was_training)
    return float(counter.get_total_flops()), 'torch.utils.flop_counter (conv, matmul)'


# ----------------------------------------------------------------------------- workload
class Workload:
    """A model, one fixed batch and the step functions timed on them."""

    def __init__(self, model: nn.Module, config, x: torch.Tensor, y: torch.Tensor, dtype: str,
                 device: torch.device):
        from optimizer import build_optimizer
        self.model, self.x, self.y, self.device = model, x, y, device
        self.amp_dtype = DTYPES[dtype]
        self.autocast = dtype != 'fp32'
        self._config = config
        self._build_optimizer = build_optimizer
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scaler = torch.amp.GradScaler(device.type) if dtype == 'fp16' else None

    def _amp(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.autocast)

    def infer_step(self) -> None:
        with torch.no_grad(), self._amp():
            self.model(self.x)

    def train_step(self) -> None:
        if self.optimizer is None:      # created lazily so that inference runs without its state
            self.optimizer = self._build_optimizer(self._config, self.model)
        with self._amp():
            loss = F.cross_entropy(self.model(self.x), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()


def _time_phase(work: Workload, step, warmup: int, iters: int) -> Tuple[float, float, float]:
    """(first step seconds, images/s, peak memory GiB) of one phase (inference or training)."""
    device, batch = work.device, work.x.shape[0]
    memory = PeakMemory(device)
    memory.reset()
    t0 = time.perf_counter()
    step()
    _sync(device)
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        step()
    return first, batch / seconds_per_step(step, iters, device), memory.peak_gib()


def measure(work: Workload, row: Row, warmup: int, iters: int) -> None:
    """Inference first (no gradients or optimizer state exist yet), then training."""
    work.model.eval()
    row.first_infer_step_s, row.infer_img_s, row.infer_peak_mem_gib = _time_phase(
        work, work.infer_step, warmup, iters)
    work.model.train()
    row.first_train_step_s, row.train_img_s, row.train_peak_mem_gib = _time_phase(
        work, work.train_step, warmup, iters)


def profile_top_ops(work: Workload, steps: int, limit: int = 15) -> Tuple[str, List[dict]]:
    """torch.profiler over ``steps`` training steps: the ops with the most self device time
    (CUDA) or self CPU time, as a printable table and as rows."""
    from torch.profiler import ProfilerActivity, profile
    cuda = work.device.type == 'cuda'
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    work.model.train()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            work.train_step()
        _sync(work.device)
    averages = prof.key_averages()
    key = 'self_device_time_total' if cuda else 'self_cpu_time_total'
    if cuda and not hasattr(next(iter(averages), None), key):
        key = 'self_cuda_time_total'      # older torch
    table = averages.table(sort_by=key, row_limit=limit)
    events = sorted(averages, key=lambda e: getattr(e, key, 0.0), reverse=True)[:limit]
    total = sum(getattr(e, key, 0.0) for e in averages) or 1.0
    rows = [dict(op=e.key, self_time_ms=getattr(e, key, 0.0) / 1000.0 / steps,
                 share=getattr(e, key, 0.0) / total, calls_per_step=e.count / steps) for e in events]
    return table, rows


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


def eval_logits(model: nn.Module, x: torch.Tensor, dtype: str) -> torch.Tensor:
    model.eval()
    ctx = exact_fp32(x.device) if dtype == 'fp32' else torch.autocast(x.device.type, dtype=DTYPES[dtype])
    with torch.no_grad(), ctx:
        return model(x).float()


def check_dtypes(bench_dtype: str) -> List[str]:
    """The benchmark dtype, then exact fp32: fp32 separates a wrong kernel from rounding (a
    dropped position bias moves fp32 logits ~50x the fp32 tolerance, bf16 ones only ~1x)."""
    return list(dict.fromkeys([bench_dtype, 'fp32']))


def compare_logits(model: nn.Module, x: torch.Tensor, reference: Dict[str, torch.Tensor], row: Row,
                   tol_scale: float) -> bool:
    """Fill ``row.logits_*``; True when every compared dtype is within tolerance."""
    ok = True
    for dtype in check_dtypes(row.dtype):
        if dtype not in reference:
            continue
        ref = reference[dtype]
        out = eval_logits(model, x, dtype)
        diff = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
        row.logits_max_rel_diff[dtype] = diff
        ok = ok and math.isfinite(diff) and diff <= CHECK_TOL[dtype] * tol_scale
    row.logits_check = 'pass' if ok else 'fail'
    return ok


# ----------------------------------------------------------------------------- one model
def build_fast_dat(spec: ModelSpec, args: argparse.Namespace, state: Dict[str, torch.Tensor], variant: str,
                   device: torch.device) -> nn.Module:
    """A fast variant (``MODEL.ATTN_IMPL auto``) with the reference's weights, on ``device``."""
    from models import build_model
    model = build_model(load_dat_config(spec, args, 'auto'))
    model.load_state_dict(state)
    use_sdpa_for_deformable(model)
    model.to(device)
    if variant == 'channels_last':
        model.to(memory_format=torch.channels_last)
    if variant == 'compile':
        kwargs = dict(backend=args.compile_backend)
        if args.compile_mode:
            kwargs['mode'] = args.compile_mode
        model = torch.compile(model, **kwargs)
    return model


def check_against_reference(model: nn.Module, x: torch.Tensor, reference_logits: Dict[str, torch.Tensor],
                            ref_error: Optional[str], row: Row, args: argparse.Namespace) -> None:
    """Compare logits with the reference's; raise (so the variant is not timed) on a mismatch."""
    if not reference_logits:
        row.logits_check = f'skipped: {ref_error}'
        return
    if not compare_logits(model, x, reference_logits, row, args.check_tol_scale):
        diffs = ', '.join(f'{d} {v:.2e}' for d, v in row.logits_max_rel_diff.items())
        raise RuntimeError(f'logits differ from the reference (max rel diff {diffs}); not timed')


def run_model(key: str, args: argparse.Namespace, device: torch.device, dtype: str,
              peak: Optional[float], emit: Callable[[Row], None]) -> None:
    """Every requested variant of one model; each finished row goes to ``emit``."""
    from models import build_model
    spec = MODELS[key]
    img = input_size(spec, args)
    batch = args.batch_size
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(batch, 3, img, img, generator=gen).to(device)
    y = torch.randint(0, 1000, (batch,), generator=gen).to(device)

    def new_row(variant: str, arch: str) -> Row:
        return Row(model=key, variant=variant, arch=arch, batch_size=batch, dtype=dtype, img_size=img,
                   kernels=kernel_names(variant, device))

    # Reference first: its weights are shared by every DAT variant and its logits are the check.
    ref_config = load_dat_config(spec, args, 'reference')
    dat_name = ref_config.MODEL.NAME
    torch.manual_seed(args.seed)
    model: Optional[nn.Module] = build_model(ref_config)
    redraw_position_tables(model, CHECK_TABLE_STD, args.seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    flops, _ = forward_flops_per_image(model, img)
    reference_logits: Dict[str, torch.Tensor] = {}
    ref_error = None
    try:
        model.to(device)
        for d in check_dtypes(dtype):
            reference_logits[d] = eval_logits(model, x, d)
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory: reported, the other variants still run
        ref_error = short_error(exc)

    for variant in args.variants:
        if variant == 'swin':
            if spec.swin is None:
                continue
            row = new_row('swin', spec.swin)
        else:
            row = new_row(variant, dat_name)
        row.params_m, row.fwd_gflops_per_img = params_m, flops / 1e9 if flops else None
        x_run = x.contiguous(memory_format=torch.channels_last) if variant == 'channels_last' else x
        try:
            if variant == 'reference':
                if ref_error:
                    raise RuntimeError(f'reference logits failed: {ref_error}')
            else:
                model = None                      # the reference model is no longer needed
                free_memory(device)
                if variant == 'swin':
                    torch.manual_seed(args.seed)
                    model = build_swin(spec.swin, args, img)
                    row.params_m = sum(p.numel() for p in model.parameters()) / 1e6
                    swin_flops, _ = forward_flops_per_image(model, img)
                    row.fwd_gflops_per_img = swin_flops / 1e9 if swin_flops else None
                    model.to(device)
                else:
                    model = build_fast_dat(spec, args, state, variant, device)
                    check_against_reference(model, x_run, reference_logits, ref_error, row, args)
            work = Workload(model, ref_config, x_run, y, dtype, device)
            measure(work, row, args.warmup, args.iters)
            if args.profile and variant == 'fast':
                table, row.profile_top_ops = profile_top_ops(work, args.profile_steps)
                print(f'\n== profile: {dat_name} fast, {args.profile_steps} training steps, '
                      f'batch {batch}, {dtype} ==\n{table}', flush=True)
        except Exception as exc:  # noqa: BLE001 - one failing variant (compile, OOM) must not end the run
            row.error = short_error(exc)
        finally:
            work = model = None
            if variant == 'compile':
                torch._dynamo.reset()
            free_memory(device)
        if row.error is None and row.fwd_gflops_per_img:
            row.train_mfu = mfu(row.train_img_s, row.fwd_gflops_per_img * 1e9, peak, TRAIN_FLOPS_PER_FORWARD)
            row.infer_mfu = mfu(row.infer_img_s, row.fwd_gflops_per_img * 1e9, peak)
        emit(row)


def add_ratios(rows: List[Row]) -> None:
    """Speed-ups and memory ratios of every row against its model's DAT reference row."""
    refs = {r.model: r for r in rows if r.variant == 'reference' and r.error is None}
    for r in rows:
        ref = refs.get(r.model)
        if ref is None or r.error is not None:
            continue
        if ref.train_img_s and r.train_img_s:
            r.train_speedup_vs_reference = r.train_img_s / ref.train_img_s
        if ref.infer_img_s and r.infer_img_s:
            r.infer_speedup_vs_reference = r.infer_img_s / ref.infer_img_s
        if ref.train_peak_mem_gib and r.train_peak_mem_gib is not None:
            r.train_mem_vs_reference = r.train_peak_mem_gib / ref.train_peak_mem_gib


def issue_targets(rows: List[Row], args: argparse.Namespace, dtype: str) -> List[dict]:
    """Issue 4's goals for DAT-T++ (batch 128, bf16): a fast variant trains >= 2x the reference,
    at least as fast as swin_tiny, with <= 0.7x the reference's peak training memory."""
    by_variant = {r.variant: r for r in rows if r.model == 'tiny'}
    swin = by_variant.get('swin')
    out = []
    for variant in ('fast', 'compile', 'channels_last'):
        row = by_variant.get(variant)
        if row is None or row.error is not None:
            continue

        def verdict(value: Optional[float], ok: Callable[[float], bool]) -> Optional[bool]:
            return None if value is None else bool(ok(value))

        swin_ratio = (row.train_img_s / swin.train_img_s
                      if swin is not None and swin.error is None and swin.train_img_s else None)
        out.append(dict(
            variant=row.label,
            at_target_settings=(args.batch_size == 128 and dtype == 'bf16' and not args.small
                                and row.img_size == 224),
            train_speedup_vs_reference=row.train_speedup_vs_reference,
            train_speedup_ok=verdict(row.train_speedup_vs_reference, lambda v: v >= 2.0),
            train_vs_swin_tiny=swin_ratio,
            train_vs_swin_ok=verdict(swin_ratio, lambda v: v >= 1.0),
            train_mem_vs_reference=row.train_mem_vs_reference,
            train_mem_ok=verdict(row.train_mem_vs_reference, lambda v: v <= 0.7),
        ))
    return out


# ----------------------------------------------------------------------------- output
def _fmt(value: Optional[float], spec: str, suffix: str = '') -> str:
    return '-' if value is None else f'{value:{spec}}{suffix}'


TABLE_HEADER = ['model', 'variant', 'batch', 'dtype', 'img', 'train img/s', 'infer img/s',
                'train GiB', 'infer GiB', 'train x ref', 'infer x ref', 'mem x ref', 'MFU train',
                'logits check']


def format_table(rows: List[Row]) -> str:
    lines = []
    for r in rows:
        if r.error is not None:
            numbers = ['error'] + [''] * 7
        else:
            numbers = [_fmt(r.train_img_s, '.1f'), _fmt(r.infer_img_s, '.1f'),
                       _fmt(r.train_peak_mem_gib, '.3f'), _fmt(r.infer_peak_mem_gib, '.3f'),
                       _fmt(r.train_speedup_vs_reference, '.2f', 'x'),
                       _fmt(r.infer_speedup_vs_reference, '.2f', 'x'),
                       _fmt(r.train_mem_vs_reference, '.2f', 'x'),
                       _fmt(None if r.train_mfu is None else 100 * r.train_mfu, '.1f', '%')]
        diff = max(r.logits_max_rel_diff.values()) if r.logits_max_rel_diff else None
        check = '-' if r.logits_check is None else r.logits_check
        if diff is not None and r.variant != 'reference':
            check += f' ({diff:.1e})'
        lines.append([r.arch, r.label, str(r.batch_size), r.dtype, str(r.img_size)] + numbers + [check])
    widths = [max(len(x[i]) for x in lines + [TABLE_HEADER]) for i in range(len(TABLE_HEADER))]
    out = ['  '.join(c.ljust(w) for c, w in zip(TABLE_HEADER, widths)), '  '.join('-' * w for w in widths)]
    out += ['  '.join(c.ljust(w) for c, w in zip(x, widths)) for x in lines]
    errors = [f'  {r.model} {r.label}: {r.error}' for r in rows if r.error is not None]
    if errors:
        out += ['errors:'] + errors
    return '\n'.join(out)


def format_targets(targets: List[dict]) -> str:
    def mark(ok: Optional[bool]) -> str:
        return 'n/a' if ok is None else 'PASS' if ok else 'FAIL'

    lines = []
    for t in targets:
        note = '' if t['at_target_settings'] else '  (not at the target settings: batch 128, bf16, 224, GPU)'
        lines.append(
            f"  DAT-T++ {t['variant']}: train {_fmt(t['train_speedup_vs_reference'], '.2f', 'x')} reference "
            f"(>= 2x: {mark(t['train_speedup_ok'])}), {_fmt(t['train_vs_swin_tiny'], '.2f', 'x')} swin_tiny "
            f"(>= 1x: {mark(t['train_vs_swin_ok'])}), peak memory {_fmt(t['train_mem_vs_reference'], '.2f', 'x')} "
            f"reference (<= 0.7x: {mark(t['train_mem_ok'])}){note}")
    return '\n'.join(lines)


def write_json(path: str, payload: dict) -> None:
    tmp = f'{path}.tmp'
    with open(tmp, 'w') as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- command line
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Training / inference throughput, peak memory and MFU of DAT++ kernels vs. reference and Swin.')
    parser.add_argument('--models', default='tiny,small,base,base384',
                        help=f"comma-separated, from {','.join(MODELS)}")
    parser.add_argument('--variants', default='reference,fast,compile,swin',
                        help=f"comma-separated, from {','.join(VARIANTS)}")
    parser.add_argument('--batch-size', type=int, default=None, help='images per step (default 128; 2 with --small)')
    parser.add_argument('--dtype', choices=sorted(DTYPES), default=None,
                        help='autocast dtype (default bf16 on CUDA, fp32 on CPU)')
    parser.add_argument('--warmup', type=int, default=None, help='untimed steps per phase (default 10; 1 with --small)')
    parser.add_argument('--iters', type=int, default=None, help='timed steps per phase (default 30; 2 with --small)')
    parser.add_argument('--img-size', type=int, default=None,
                        help="input side for every model (default: the config's DATA.IMG_SIZE)")
    parser.add_argument('--device', choices=['cuda', 'cpu'], default=None,
                        help='default: cuda when available')
    parser.add_argument('--json', default=None, help='write rows and environment to this file')
    parser.add_argument('--small', action='store_true',
                        help='CPU smoke mode: tiny DAT / Swin widths, batch 2, 64 px, 1 warm-up + 2 timed steps')
    parser.add_argument('--peak-tflops', type=float, default=None,
                        help='device peak for MFU (default: known GPUs; MFU is n/a otherwise)')
    parser.add_argument('--compile-backend', default=None,
                        help="torch.compile backend (default inductor; 'eager' with --small, where inductor "
                             "takes minutes on a CPU)")
    parser.add_argument('--compile-mode', default=None, help="torch.compile mode, e.g. 'max-autotune'")
    parser.add_argument('--check-tol-scale', type=float, default=1.0,
                        help=f'multiplies the logits tolerances {CHECK_TOL}')
    parser.add_argument('--profile', action='store_true',
                        help='profile the fast variant and print its top-15 ops by self device (or CPU) time')
    parser.add_argument('--profile-steps', type=int, default=5)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--opts', nargs='+', default=[],
                        help="extra DAT config overrides 'KEY VALUE' pairs, e.g. TRAIN.USE_CHECKPOINT True")
    args = parser.parse_args(argv)

    args.models = [m.strip() for m in args.models.split(',') if m.strip()]
    args.variants = [v.strip() for v in args.variants.split(',') if v.strip()]
    for name, given, allowed in (('--models', args.models, MODELS), ('--variants', args.variants, VARIANTS)):
        bad = [x for x in given if x not in allowed]
        if bad or not given:
            parser.error(f"{name}: unknown {bad or 'empty list'}; choose from {','.join(allowed)}")
    # Reference first: every other DAT row is compared with it.
    args.variants = sorted(dict.fromkeys(args.variants), key=VARIANTS.index)
    defaults = SMALL_DEFAULTS if args.small else dict(batch_size=128, warmup=10, iters=30)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.batch_size < 1 or args.iters < 1 or args.warmup < 1:
        parser.error('--batch-size, --iters and --warmup must be >= 1 (one warm-up step absorbs lazy setup)')
    if args.compile_backend is None:
        args.compile_backend = 'eager' if args.small else 'inductor'
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: no CUDA device is visible; use --device cpu (with --small for a smoke run)')
    if args.dtype is None:
        args.dtype = 'bf16' if args.device == 'cuda' else 'fp32'
    if args.dtype == 'fp16' and args.device == 'cpu':
        parser.error('--dtype fp16 needs CUDA; use bf16 or fp32 on the CPU')
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = args.dtype
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True          # as in training: fixed shapes
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True   # fp32 = TF32
    peak = peak_tflops(device, dtype, args.peak_tflops)
    env = environment(device)
    settings = dict(models=args.models, variants=args.variants, batch_size=args.batch_size, dtype=dtype,
                    warmup=args.warmup, iters=args.iters, img_size=args.img_size, small=args.small,
                    compile_backend=args.compile_backend, compile_mode=args.compile_mode, opts=args.opts,
                    peak_tflops=peak, train_flops='3x forward', seed=args.seed,
                    check_tolerances={k: v * args.check_tol_scale for k, v in CHECK_TOL.items()})
    print(f"device: {env['device_name']} ({device.type}), torch {env['torch']}, cuda {env['cuda']}, "
          f"batch {args.batch_size}, {dtype}, warmup {args.warmup}, iters {args.iters}"
          f"{', SMALL smoke models' if args.small else ''}; peak "
          f"{'n/a' if peak is None else f'{peak:g} TFLOP/s'}", flush=True)

    rows: List[Row] = []

    def payload() -> dict:
        return dict(environment=env, settings=settings, rows=[asdict(r) | {'label': r.label} for r in rows],
                    targets=issue_targets(rows, args, dtype))

    def emit(row: Row) -> None:
        rows.append(row)
        add_ratios(rows)
        status = row.error or (f'train {row.train_img_s:.1f} img/s, infer {row.infer_img_s:.1f} img/s')
        print(f'[{row.model}] {row.label}: {status}', flush=True)
        if args.json:
            write_json(args.json, payload())      # partial results survive a killed run

    for key in args.models:
        try:
            run_model(key, args, device, dtype, peak, emit)
        except Exception as exc:  # noqa: BLE001 - a model that cannot be built is one error row
            emit(Row(model=key, variant='reference', arch=key, batch_size=args.batch_size, dtype=dtype,
                     img_size=args.img_size or 0, error=short_error(exc)))

    print()
    print(format_table(rows))
    targets = issue_targets(rows, args, dtype)
    if targets:
        print('issue 4 targets:')
        print(format_targets(targets))
    if args.json:
        write_json(args.json, payload())
        print(f'wrote {args.json}')
    failed = [r for r in rows if r.logits_check == 'fail' or (r.error is not None and r.variant != 'compile')]
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
