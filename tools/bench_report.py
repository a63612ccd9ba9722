"""The benchmark's results: one :class:`Row` per entry, the table printed on stdout, the JSON
file, and the environment recorded with them."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

REPO = Path(__file__).resolve().parents[1]


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
    logits_check: Optional[str] = None           # logits and gradients against the reference
    grad_max_rel_diff: Dict[str, float] = field(default_factory=dict)
    kernels: Dict[str, str] = field(default_factory=dict)
    profile_top_ops: Optional[List[dict]] = None
    error: Optional[str] = None


def short_error(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f'{type(exc).__name__}: {(lines[0] if lines else "")[:300]}'


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
        diffs = list(r.logits_max_rel_diff.values()) + list(r.grad_max_rel_diff.values())
        if diffs:
            check += f' ({max(diffs):.1e})'
        lines.append([r.entry, r.arch] + numbers + [check])
    widths = [max(len(x[i]) for x in lines + [TABLE_HEADER]) for i in range(len(TABLE_HEADER))]
    out = ['  '.join(c.ljust(w) for c, w in zip(TABLE_HEADER, widths)), '  '.join('-' * w for w in widths)]
    out += ['  '.join(c.ljust(w) for c, w in zip(x, widths)) for x in lines]
    errors = [f'  {r.entry}: {r.error}' for r in rows if r.error is not None]
    if errors:
        out += ['errors:'] + errors
    return '\n'.join(out)


def format_loader(loader: dict) -> str:
    """The loader's line under the table: its error, or images/s per worker of both pipelines."""
    if loader.get('error'):
        return 'loader: ' + loader['error']
    return (f"loader: {_fmt(loader['float_img_s_per_worker'], '.1f')} img/s per worker float, "
            f"{_fmt(loader['device_normalize_img_s_per_worker'], '.1f')} with DATA.DEVICE_NORMALIZE "
            f"({_fmt(loader['ratio'], '.2f')}x; {loader['workers']} workers, {loader['images_timed']} images, "
            f"median of {loader['rounds']} rounds)")


def write_json(path: str, payload: dict) -> None:
    tmp = f'{path}.tmp'
    with open(tmp, 'w') as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- environment
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
        env['gpu_memory_gib'] = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
    return env
