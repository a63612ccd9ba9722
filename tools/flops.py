#!/usr/bin/env python
"""Parameters and FLOPs of DAT (and every other configured) model, counted as multiply-accumulates (MACs) like the papers.

    python tools/flops.py --cfg configs/dat_tiny.yaml                  # at DATA.IMG_SIZE
    python tools/flops.py --cfg configs/dat_base.yaml --img-size 384
    python tools/flops.py --cfg configs/dat_tiny.yaml configs/dat_small.yaml configs/dat_base.yaml \\
        configs/dat_base_384.yaml                                      # a table, with the paper's numbers

``torch.utils.flop_counter.FlopCounterMode`` counts convolutions, linears and matmuls. On top
of it this tool counts what that counter cannot see:

* neighborhood attention (``N`` blocks): per query and head, ``K*K`` keys of width ``c`` for
  ``q.k`` and as many for ``attn.v``, i.e. ``2 * B * heads * H * W * K*K * c`` MACs (on the
  map padded to at least ``K``, as the block computes it). The op itself is replaced by a
  shape-only stand-in while counting, so whatever kernel runs it is not counted twice.
* bilinear sampling (``grid_sample``: deformable keys and the interpolated position table,
  and the resampled keys and values of ViTAEv2-VSA's varied-size windows): 4 MACs per sampled
  value (4 taps; 1 for nearest, 16 for bicubic).

Window attention (``q.k`` and ``attn.v`` of VSA, DaViT and the others) runs as matmuls and is
counted by the counter itself.

DeBiFormer's routed and agent attentions are plain matmuls (counted as such); its agent sampling
and sampled position bias are ``grid_sample`` calls (counted as above).

Softmax, norms and activations are not counted (the papers do not count them either).
The forward pass runs on the ``meta`` device: no memory for activations and no arithmetic,
so counting a model takes about a second on a CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections import defaultdict
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import to_2tuple
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models.nat as nat  # noqa: E402
from tools.cli_options import add_img_size_option  # noqa: E402

# GFLOPs (MACs) the papers report, keyed by (MODEL.NAME, input size).
PAPER_GMACS: Dict[Tuple[str, int], float] = {
    ('dat_tiny', 224): 4.3,        # DAT++ (arXiv 2309.01430)
    ('dat_small', 224): 9.4,
    ('dat_base', 224): 16.6,
    ('dat_base_384', 384): 49.7,
    ('dat_v1_tiny', 224): 4.6,     # DAT (CVPR 2022, arXiv 2201.00520)
    ('dat_v1_small', 224): 9.0,
    ('dat_v1_base', 224): 15.8,
    ('dat_v1_base_384', 384): 49.8,
    ('debiformer_tiny', 224): 2.6,   # DeBiFormer release README (maclong01/DeBiFormer)
    ('debiformer_small', 224): 5.4,
    ('debiformer_base', 224): 11.8,
    ('davit_tiny', 224): 4.5,      # DaViT (ECCV 2022), official README
    ('davit_small', 224): 8.8,
    ('davit_base', 224): 15.5,
}

_SAMPLING_TAPS = {0: 4, 1: 1, 2: 16}   # grid_sample interpolation_mode: bilinear, nearest, bicubic


def _grid_sample_flops(input_shape, grid_shape, interpolation_mode=0, *args, out_shape=None, **kwargs) -> int:
    """FLOPs (2 per MAC, the counter's convention) of ``grid_sampler_2d``: taps per output value."""
    n, c = input_shape[:2]
    h_out, w_out = grid_shape[1:3]
    return 2 * _SAMPLING_TAPS.get(interpolation_mode, 4) * n * c * h_out * w_out


_EXTRA_FORMULAS = {torch.ops.aten.grid_sampler_2d: _grid_sample_flops}
if hasattr(torch.ops.aten, 'cudnn_grid_sampler'):
    _EXTRA_FORMULAS[torch.ops.aten.cudnn_grid_sampler] = (
        lambda input_shape, grid_shape, *a, out_shape=None, **k: _grid_sample_flops(input_shape, grid_shape))


@contextlib.contextmanager
def _count_neighborhood_attention(tally: Dict[str, int]) -> Iterator[None]:
    """Replace the neighborhood-attention op by a stand-in that records its MACs and returns a
    tensor of the right shape (its values are irrelevant to counting)."""
    real = nat.neighborhood_attention

    def stand_in(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: torch.Tensor, kernel_size: int,
                 *args, **kwargs) -> torch.Tensor:
        batch, heads, height, width, head_dim = q.shape
        tally['neighborhood'] += 2 * batch * heads * height * width * kernel_size ** 2 * head_dim
        return torch.empty_like(v)

    nat.neighborhood_attention = stand_in
    try:
        yield
    finally:
        nat.neighborhood_attention = real


def count_flops(model: nn.Module, img_size: Union[int, Sequence[int]] = 224, batch_size: int = 1) -> dict:
    """Parameters and MACs of one forward pass of ``model`` on ``batch_size`` RGB images.

    Returns ``{'params', 'img_size': (H, W), 'macs', 'gmacs', 'macs_by_kind': {'conv', 'matmul',
    'neighborhood', 'grid_sample'}}``. The model is not changed (its weights are swapped for
    meta tensors only inside the call).
    """
    height, width = to_2tuple(img_size)
    tally: Dict[str, int] = defaultdict(int)
    meta = {name: torch.empty_like(t, device='meta')
            for name, t in list(model.named_parameters()) + list(model.named_buffers())}
    x = torch.empty(batch_size, 3, height, width, device='meta')
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _count_neighborhood_attention(tally), \
                FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
            torch.func.functional_call(model, meta, (x,))
    finally:
        model.train(was_training)

    for op, flops in counter.get_flop_counts()['Global'].items():
        name = str(op)
        kind = 'conv' if 'convolution' in name else 'grid_sample' if 'grid_sampler' in name else 'matmul'
        tally[kind] += flops // 2
    by_kind = {k: int(tally.get(k, 0)) for k in ('conv', 'matmul', 'neighborhood', 'grid_sample')}
    macs = sum(by_kind.values())
    return dict(params=sum(p.numel() for p in model.parameters()), img_size=(height, width),
                macs=macs, gmacs=macs / 1e9, macs_by_kind=by_kind)


def paper_gmacs(model_name: str, img_size: Union[int, Sequence[int]]) -> Optional[float]:
    """The paper's GFLOPs for a config name at a square size, when it reports one."""
    h, w = to_2tuple(img_size)
    return PAPER_GMACS.get((model_name, h)) if h == w else None


# ----------------------------------------------------------------------------- command line
def _row(name: str, result: dict) -> List[str]:
    g = {k: v / 1e9 for k, v in result['macs_by_kind'].items()}
    paper = paper_gmacs(name, result['img_size'])
    diff = f"{(result['gmacs'] - paper) / paper * 100:+.1f}%" if paper else ''
    h, w = result['img_size']
    return [name, f'{h}x{w}', f"{result['params'] / 1e6:.2f}", f"{result['gmacs']:.2f}",
            f"{g['conv'] + g['matmul']:.2f}", f"{g['neighborhood']:.3f}", f"{g['grid_sample']:.3f}",
            f'{paper:.1f}' if paper else '-', diff]


def format_table(rows: List[List[str]]) -> str:
    header = ['model', 'input', 'params (M)', 'GMACs', 'conv+mm', 'neighb.', 'sampling', 'paper', 'diff']
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    lines = ['  '.join(c.ljust(wd) for c, wd in zip(header, widths)),
             '  '.join('-' * wd for wd in widths)]
    lines += ['  '.join(c.ljust(wd) for c, wd in zip(r, widths)) for r in rows]
    return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description='Parameters and GFLOPs (MACs) of model configs.')
    parser.add_argument('--cfg', nargs='+', required=True, help='YAML config file(s)')
    add_img_size_option(parser, help='input size N (or H W); default: each config\'s DATA.IMG_SIZE')
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument('--opts', nargs='+', default=(), help="config overrides 'KEY VALUE' pairs")
    args = parser.parse_args(argv)

    from config import ConfigError, load_config
    from models import build_model

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    rows = []
    for cfg_file in args.cfg:
        try:
            config = load_config(cfg_file, opts=args.opts)
        except ConfigError as e:
            print(f'error: {e}', file=sys.stderr)
            return 1
        size = config.DATA.IMG_SIZE if args.img_size is None else args.img_size
        result = count_flops(build_model(config), size, args.batch_size)
        rows.append(_row(config.MODEL.NAME, result))
    print(format_table(rows))
    print('GMACs = conv+mm (torch.utils.flop_counter) + neighborhood-attention products + bilinear sampling')
    return 0


if __name__ == '__main__':
    sys.exit(main())
