#!/usr/bin/env python
"""Draw where deformable attention looks: sampled key points per group, and the keys one query attends to.

    python tools/visualize.py --cfg configs/dat_tiny.yaml --ckpt dat_pp_t_in1k_224.pth \\
        --image cat.jpg --out vis/ [--query 100 120] [--top-k 10] [--ema]

Writes ``stage{i}_deformable.png`` for every stage that has deformable (``D``) blocks: one
panel per block, showing over the resized image the points each offset group sampled its
keys at (one colour per group) and, for the query pixel (a star), its most attended keys
drawn as circles whose area is the attention weight (averaged over the group's heads).

Coordinates: the model returns positions in (y, x), normalised so that -1 and 1 are the
centres of the first and last pixel of the block's feature map (``grid_sample`` with
``align_corners=True``). A value ``p`` is feature-map pixel ``f = (p + 1) / 2 * (size - 1)``,
and feature pixel ``f`` (stride ``s`` = image size / map size) is centred on image pixel
``(f + 0.5) * s - 0.5``, in the coordinates of ``imshow`` (pixel ``i`` centred at ``i``).

Checkpoints: this project's (``{'model': ..., 'ema': ...}``) and official ``{'model': sd}``
files, read weights-only; convert official files that hold Python objects first with
``tools/convert_checkpoint.py``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.dat_blocks import DAttention  # noqa: E402
from tools.cli_options import add_img_size_option  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class BlockPoints:
    """The data behind one panel: one deformable block, image pixel coordinates in (y, x)."""
    stage: int
    block: int                          # index of the block in its stage (stage_spec position)
    fmap: Tuple[int, int]               # (h, w) of the block's feature map
    points: np.ndarray                  # (groups, Hk*Wk, 2) sampled key positions
    query: Optional[Tuple[float, float]] = None     # query pixel centre on the image
    attended: List[Tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # per group: (k, 2), (k,)


# ----------------------------------------------------------------------------- coordinates
def feature_to_pixels(f: torch.Tensor, fmap: Tuple[int, int], image: Tuple[int, int]) -> torch.Tensor:
    """(..., 2) feature-map pixel coordinates (y, x) -> image pixel coordinates (cell centres match)."""
    stride = f.new_tensor([image[0] / fmap[0], image[1] / fmap[1]])
    return (f + 0.5) * stride - 0.5


def normalized_to_pixels(pos: torch.Tensor, fmap: Tuple[int, int], image: Tuple[int, int]) -> torch.Tensor:
    """(..., 2) normalised (y, x) on an ``fmap`` map -> (y, x) pixel coordinates on an ``image``-sized image."""
    size = pos.new_tensor([fmap[0] - 1, fmap[1] - 1])
    return feature_to_pixels((pos + 1) / 2 * size, fmap, image)


def query_index(query: Tuple[float, float], fmap: Tuple[int, int], image: Tuple[int, int]) -> Tuple[int, int]:
    """The feature-map pixel (row, col) whose receptive cell holds image pixel ``query`` (y, x)."""
    row = int(min(max((query[0] + 0.5) * fmap[0] / image[0], 0), fmap[0] - 1))
    col = int(min(max((query[1] + 0.5) * fmap[1] / image[1], 0), fmap[1] - 1))
    return row, col


# ----------------------------------------------------------------------------- attention weights
@contextlib.contextmanager
def capture_deformable_attention(model: nn.Module) -> Iterator[Dict[Tuple[int, int], dict]]:
    """Record, per deformable block keyed (stage, block), its input map size ``'fmap'`` (h, w) and
    its softmax attention ``'attn'`` (B*heads, h*w, Ns).

    The map size is read from the input of the block's query projection, and a forward hook on
    each block's attention dropout sees the weights right after the softmax (in eval mode the
    dropout is the identity, so they are exactly the weights used). That needs the unfused path:
    build the model with ``MODEL.ATTN_IMPL reference`` (as :func:`load_model` does); a fused kernel
    never forms the weights. The model's outputs are unchanged and the hooks are removed on exit.
    """
    captured: Dict[Tuple[int, int], dict] = {}
    handles = []

    def on_input(key):
        def hook(module, inputs):
            captured.setdefault(key, {})['fmap'] = tuple(inputs[0].shape[-2:])
        return hook

    def on_attention(key):
        def hook(module, inputs, output):
            captured.setdefault(key, {})['attn'] = inputs[0].detach()
        return hook

    for i, stage in enumerate(model.stages):
        for d, attn in enumerate(stage.attns):
            if isinstance(attn, DAttention):
                handles.append(attn.proj_q.register_forward_pre_hook(on_input((i, d))))
                handles.append(attn.attn_drop.register_forward_hook(on_attention((i, d))))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def deformable_points(model: nn.Module, x: torch.Tensor, query: Optional[Tuple[float, float]] = None,
                      top_k: int = 10) -> List[BlockPoints]:
    """Sampling points of every deformable block for image 0 of ``x``, in image pixels.

    With ``query`` (y, x image pixel), also the ``top_k`` keys it attends to most in each group.
    """
    if model.training:
        raise ValueError('put the model in eval mode (model.eval()) so attention weights are the ones used')
    image = tuple(x.shape[-2:])
    with capture_deformable_attention(model) as captured:
        _, positions, _ = model.sampling_points(x)
    keys = sorted(captured)           # (stage, block) of the deformable blocks, in forward order
    if any('attn' not in captured[key] for key in keys):
        raise RuntimeError("deformable attention weights were not captured: build the model with "
                           "MODEL.ATTN_IMPL reference (fused kernels never form the weights)")
    flat = [p for stage in positions for p in stage]
    if len(flat) != len(keys):
        raise RuntimeError(f'{len(flat)} deformable point sets but {len(keys)} attention maps were captured')

    out = []
    for (stage, block), pos in zip(keys, flat):
        module = model.stages[stage].attns[block]
        fmap, attn = captured[(stage, block)]['fmap'], captured[(stage, block)]['attn']
        groups = pos.shape[1]
        pixels = normalized_to_pixels(pos[0].float(), fmap, image).reshape(groups, -1, 2)
        entry = BlockPoints(stage, block, fmap, pixels.cpu().numpy())
        if query is not None:
            row, col = query_index(query, fmap, image)
            centre = feature_to_pixels(torch.tensor([float(row), float(col)]), fmap, image)
            entry.query = (float(centre[0]), float(centre[1]))
            weights = attn[:module.heads, row * fmap[1] + col]            # image 0: heads 0..heads-1
            per_group = weights.float().reshape(groups, module.group_heads, -1).mean(1)   # (groups, Ns)
            k = min(top_k, per_group.shape[1])
            for g in range(groups):
                w, idx = per_group[g].topk(k)
                entry.attended.append((pixels[g, idx].cpu().numpy(), w.cpu().numpy()))
        out.append(entry)
    return out


# ----------------------------------------------------------------------------- drawing
def draw_stage(image: np.ndarray, blocks: Sequence[BlockPoints], title: str = ''):
    """A figure with one panel per block. Per group, scatter collection ``g`` of a panel holds
    that group's sampled points (x, y); with a query, the following collections are the star and
    then the attended keys of each group."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    n = len(blocks)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.2 * rows * image.shape[0] / image.shape[1] + 0.4),
                             squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis('off')
    for ax, blk in zip(axes.flat, blocks):
        groups = blk.points.shape[0]
        colours = (plt.get_cmap('tab10')(np.arange(groups)) if groups <= 10
                   else plt.get_cmap('hsv')(np.linspace(0, 1, groups, endpoint=False)))
        ax.imshow(image)
        for g in range(groups):
            ax.scatter(blk.points[g, :, 1], blk.points[g, :, 0], s=16, color=colours[g], alpha=0.9,
                       edgecolors='white', linewidths=0.4, label=f'group {g}')
        if blk.query is not None:
            ax.scatter([blk.query[1]], [blk.query[0]], marker='*', s=180, color='white', edgecolors='black')
            for g, (pts, w) in enumerate(blk.attended):
                area = 400 * w / max(float(w.max()), 1e-12)
                ax.scatter(pts[:, 1], pts[:, 0], s=area, facecolors='none', edgecolors=[colours[g]], linewidths=1.5)
        if groups <= 8:
            ax.legend(handles=ax.collections[:groups], loc='lower right', fontsize=6, framealpha=0.6)
        ax.set_xlim(-0.5, image.shape[1] - 0.5)
        ax.set_ylim(image.shape[0] - 0.5, -0.5)
        ax.set_title(f'stage {blk.stage} block {blk.block}: {groups} groups, {blk.points.shape[1]} keys',
                     fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def render(image: np.ndarray, blocks: Sequence[BlockPoints], out_dir: str) -> List[str]:
    """Write ``stage{i}_deformable.png`` per stage with deformable blocks; returns the paths."""
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for stage in sorted({b.stage for b in blocks}):
        fig = draw_stage(image, [b for b in blocks if b.stage == stage], f'deformable attention, stage {stage}')
        path = os.path.join(out_dir, f'stage{stage}_deformable.png')
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- inputs
def load_image(path: str, size: Tuple[int, int]) -> Tuple[torch.Tensor, np.ndarray]:
    """Image resized to ``size`` (h, w), bicubic: the normalised (1, 3, h, w) batch and the RGB array."""
    from PIL import Image

    if not os.path.isfile(path):
        raise FileNotFoundError(f'image not found: {path}')
    with Image.open(path) as img:
        rgb = np.asarray(img.convert('RGB').resize((size[1], size[0]), Image.BICUBIC))
    x = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div(255)
    x = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return x[None], rgb


def load_model(cfg_file: str, ckpt: Optional[str], opts: Sequence[str] = (), ema: bool = False):
    """Model of ``cfg_file`` in eval mode with the weights of ``ckpt`` (strict), and its config."""
    from config import load_config
    from models import build_model
    from checkpoint import CheckpointError, load_checkpoint_file, load_model_state, unwrap_state_dict

    # The reference kernels form the attention weights the capture reads (opts may override).
    config = load_config(cfg_file, opts=['MODEL.ATTN_IMPL', 'reference', *opts])
    model = build_model(config)
    if ckpt:
        data = load_checkpoint_file(ckpt)
        if ema:
            if not isinstance(data.get('ema'), dict):
                raise CheckpointError(f"{ckpt} has no 'ema' weights (train with TRAIN.EMA.ENABLE True, or drop --ema)")
            state = data['ema']
        else:
            state = unwrap_state_dict(data)
        load_model_state(model, state, strict=True)
    return model.eval(), config


def visualize(cfg_file: str, ckpt: Optional[str], image_path: str, out_dir: str,
              query: Optional[Tuple[float, float]] = None, img_size: Optional[Sequence[int]] = None,
              top_k: int = 10, ema: bool = False, opts: Sequence[str] = ()) -> Tuple[List[str], List[BlockPoints]]:
    """Everything the command does; returns the PNG paths and the data drawn in them."""
    model, config = load_model(cfg_file, ckpt, opts, ema)
    size = (config.DATA.IMG_SIZE,) * 2 if not img_size else (
        (img_size[0], img_size[0]) if len(img_size) == 1 else (img_size[0], img_size[1]))
    x, rgb = load_image(image_path, size)
    if query is None:
        query = ((size[0] - 1) / 2, (size[1] - 1) / 2)
    blocks = deformable_points(model, x, query, top_k)
    if not blocks:
        raise ValueError(f'{cfg_file} has no deformable (D) blocks to visualise')
    return render(rgb, blocks, out_dir), blocks


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description='Draw the sampling points of DAT deformable attention.')
    parser.add_argument('--cfg', required=True, help='YAML config of the model')
    parser.add_argument('--ckpt', default=None, help='checkpoint (this project\'s or official {"model": sd})')
    parser.add_argument('--image', required=True, help='input image file')
    parser.add_argument('--out', default='vis', help='output directory for the PNGs')
    parser.add_argument('--query', type=float, nargs=2, metavar=('Y', 'X'), default=None,
                        help='query pixel on the resized image (default: the centre)')
    add_img_size_option(parser, help='N or H W (default: DATA.IMG_SIZE)')
    parser.add_argument('--top-k', type=int, default=10, help='attended keys drawn per group')
    parser.add_argument('--ema', action='store_true', help="use the checkpoint's 'ema' weights")
    parser.add_argument('--opts', nargs='+', default=(), help="config overrides 'KEY VALUE' pairs")
    args = parser.parse_args(argv)
    if args.ckpt is None:
        print('warning: no --ckpt given, drawing a randomly initialised model', file=sys.stderr)

    from config import ConfigError
    from checkpoint import CheckpointError
    try:
        paths, blocks = visualize(args.cfg, args.ckpt, args.image, args.out, tuple(args.query) if args.query else None,
                                  args.img_size, args.top_k, args.ema, args.opts)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    for path in paths:
        print(f'wrote {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
