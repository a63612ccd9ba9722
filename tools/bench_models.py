"""What the benchmark measures: the entries of one model size (DAT++ per attention
implementation, eager and compiled, on shared weights; timm baselines of the same size), and the
logits check that keeps a wrong kernel from being timed."""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from tools.bench_report import Row, short_error
from tools.bench_timing import DTYPES, Entry, Workload

REPO = Path(__file__).resolve().parents[1]

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

CHECK_TABLE_STD = 1.0              # std of the shared weights' position tables for the logits check
# Largest tolerated max|variant - reference| / max|reference| of the logits, per compared dtype.
CHECK_TOL = {'fp32': 1e-3, 'fp16': 1e-2, 'bf16': 5e-2}
# Gradients compared in exact fp32 on GRAD_CHECK_IMAGES images: the position-bias tables and the
# offset networks (where a kernel with a wrong backward shows first), then every parameter.
GRAD_TOL = 1e-3
GRAD_CHECK_IMAGES = 2
GRAD_GROUPS = {'position tables': ('rpe_table', 'rpb', 'relative_position_bias_table'),
               'offset network': ('conv_offset',)}


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


def kernel_names(config, device: torch.device, img: int, checked: Sequence = ()) -> Dict[str, str]:
    """What each DAT attention op runs for this config; neighborhood attention per N-block map
    (maps smaller than the kernel run padded to it). ``checked``: the start-up check's results
    (``models.kernel_check``), which name the SDPA backend each fused call selected and the calls
    that fell back to the reference."""
    from models.nat import kernel_for
    impl, dat = config.MODEL.ATTN_IMPL, config.MODEL.DAT
    maps = sorted({max(img // 4 // 2 ** i, dat.nat_ksizes[i]) for i, spec in enumerate(dat.stage_spec)
                   if 'N' in spec}, reverse=True)
    na = {side: kernel_for(torch.empty(1, 1, side, side, 1, device=device), impl) for side in maps}

    def label(result) -> str:
        if not result.ok:
            return 'reference (self-check failed)'
        return result.call.kernel + (f" ({'/'.join(result.backends)})" if result.backends else '')

    deformable = sorted({label(r) for r in checked if r.call.op == 'deformable'})
    for r in checked:
        if r.call.op == 'neighborhood':
            na[r.call.shape[1]] = label(r)
    return {'deformable': ', '.join(deformable) or 'reference',
            'neighborhood': ', '.join(f'{side}x{side}: {name}' for side, name in na.items())}


def forward_flops_per_image(model: nn.Module, img: int) -> Optional[float]:
    """Forward FLOPs of one image (2 per multiply-accumulate); None when they cannot be counted."""
    try:
        from tools.flops import count_flops
        return 2.0 * count_flops(model, img)['macs']
    except Exception:  # noqa: BLE001 - FLOPs are informative only
        return None


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


def autocast_for(device: torch.device, dtype: str):
    """The autocast context factory of a benchmark dtype (none for fp32)."""
    return lambda: torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != 'fp32')


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


def eval_grads(model: nn.Module, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Exact-fp32 gradients of a fixed function of the logits (eval mode: no dropout or drop path)."""
    model.eval()
    model.zero_grad(set_to_none=True)
    with exact_fp32(x.device):
        logits = model(x).float()
        weights = torch.linspace(-1.0, 1.0, logits.numel(), device=x.device).view_as(logits)
        (logits * weights).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def compare_grads(model: nn.Module, x: torch.Tensor, reference: Dict[str, torch.Tensor], row: Row,
                  tol_scale: float) -> bool:
    """Fill ``row.grad_max_rel_diff`` per :data:`GRAD_GROUPS` group (and 'all'); True when within
    :data:`GRAD_TOL` everywhere and no reference gradient is missing."""
    grads = eval_grads(model, x)
    ok = set(grads) == set(reference)
    groups = dict(GRAD_GROUPS, all=('',))
    for group, keys in groups.items():
        names = [n for n in reference if any(k in n for k in keys)]
        if not names:
            continue
        # Relative to the group's largest gradient: some gradients are exactly zero in exact
        # arithmetic (the key projection's bias under softmax), and their rounding is no error.
        scale = max(reference[n].abs().max().item() for n in names)
        diff = max((grads[n] - reference[n]).abs().max().item() if n in grads else float('inf')
                   for n in names) / max(scale, 1e-12)
        row.grad_max_rel_diff[group] = diff
        ok = ok and math.isfinite(diff) and diff <= GRAD_TOL * tol_scale
    return ok


# ----------------------------------------------------------------------------- the entries of one size
def build_entries(size: str, args: argparse.Namespace, device: torch.device, dtype: str,
                  x: torch.Tensor, y: torch.Tensor) -> List[Entry]:
    """Every DAT variant (same weights) and every baseline of one size, ready to step."""
    from models import build_model
    from models.kernel_check import check_model_kernels
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
    reference_grads: Dict[str, torch.Tensor] = {}
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
            model = build_model(config)
            model.load_state_dict(state)
            model.to(device)
            checked = check_model_kernels(model, x[:1], autocast_for(device, dtype), impl)
            row.kernels = kernel_names(config, device, img, checked)
            grad_x = x[:GRAD_CHECK_IMAGES]
            if variant == 'reference':
                reference_grads = eval_grads(model, grad_x)
            elif reference_grads and not compare_grads(model, grad_x, reference_grads, row, args.check_tol_scale):
                diffs = ', '.join(f'{g} {v:.2e}' for g, v in row.grad_max_rel_diff.items())
                row.logits_check = 'fail'
                raise RuntimeError(f'gradients differ from the reference (max rel diff {diffs}); not timed')
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
