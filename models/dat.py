"""DAT / DAT++ (Vision Transformer with Deformable Attention): backbone, weights filter and timm registrations.

A stage is described by a string of block letters (``stage_spec``):
``L`` window, ``S`` shifted window, ``D`` deformable, ``N`` neighborhood, ``P`` spatial
reduction, ``Q`` learned queries, ``E`` slide attention, ``X`` depthwise conv.
Module and parameter names follow the official checkpoints so they load with ``strict=True``.

Papers: DAT, Xia et al., CVPR 2022 (arXiv:2201.00520); DAT++, arXiv:2309.01430.
Importing this module registers the ``dat_pp_*``, ``dat_plus_tiny`` and ``dat_v1_*`` names with timm.
Nothing is ever downloaded: pretrained weights come from a local file
(``pretrained_cfg_overlay=dict(file=...)``).
"""
from __future__ import annotations

import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, create_classifier
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, register_notrace_module
from timm.models._features import feature_take_indices
from timm.models._manipulate import adapt_input_conv
from torch.utils.checkpoint import checkpoint

from .attention_impl import check_attn_impl
from .dat_blocks import (DEFORM_ARITHS, POS_ENCODINGS, DAttention, LayerNorm2d, LayerScale, LocalAttention,
                         PyramidAttention, ShiftWindowAttention, TransformerMLP, TransformerMLPWithConv,
                         residual_depthwise_conv)
from .nat import NeighborhoodAttention2D
from .qna import FusedKQnA
from .slide import SlideAttention

__all__ = ['DAT', 'BLOCK_LETTERS', 'StageConfig', 'CheckpointMismatchError', 'checkpoint_filter_fn',
           'load_pretrained', 'VARIANTS', 'RELEASED_FILES']

BLOCK_LETTERS = 'LSDNPQEX'
SamplingPoints = List[Tuple[torch.Tensor, torch.Tensor]]

# The op modules hold shape-dependent Python logic (padding, key grids, checks): FX keeps them as leaves.
for _op in (NeighborhoodAttention2D, FusedKQnA, SlideAttention):
    register_notrace_module(_op)


# ----------------------------------------------------------------------------- stages
@dataclass(frozen=True)
class StageConfig:
    """Everything one stage's blocks are built from."""
    dim: int
    heads: int
    heads_q: int
    window_size: int
    fmap_size: int              # construction map size: sizes position tables and the shift mask
    groups: int
    stride: int
    offset_range_factor: float
    pos_enc: str
    no_off: bool
    ksize: int
    nat_ksize: int
    sr_ratio: int
    nq: int
    ksize_qna: int
    qna_activation: str
    expansion: int
    use_dwc_mlp: bool
    use_lpu: bool
    layer_scale_value: float
    attn_drop: float
    drop: float
    deform_arith: str
    attn_impl: str


def build_attention(letter: str, s: StageConfig) -> nn.Module:
    """The attention (token mixing) module of block letter ``letter``."""
    dim = s.dim
    if letter == 'L':
        return LocalAttention(dim, heads=s.heads, window_size=s.window_size, attn_drop=s.attn_drop, proj_drop=s.drop)
    if letter == 'S':
        return ShiftWindowAttention(dim, heads=s.heads, window_size=s.window_size, fmap_size=s.fmap_size,
                                    attn_drop=s.attn_drop, proj_drop=s.drop)
    if letter == 'D':
        return DAttention(dim, heads=s.heads, groups=s.groups, fmap_size=s.fmap_size, stride=s.stride,
                          offset_range_factor=s.offset_range_factor, ksize=s.ksize, pos_enc=s.pos_enc,
                          no_off=s.no_off, attn_drop=s.attn_drop, proj_drop=s.drop, arith=s.deform_arith,
                          attn_impl=s.attn_impl)
    if letter == 'N':
        return NeighborhoodAttention2D(dim=dim, num_heads=s.heads, kernel_size=s.nat_ksize, attn_drop=s.attn_drop,
                                       proj_drop=s.drop, attn_impl=s.attn_impl)
    if letter == 'P':
        return PyramidAttention(dim, heads=s.heads, sr_ratio=s.sr_ratio, attn_drop=s.attn_drop, proj_drop=s.drop)
    if letter == 'Q':
        return FusedKQnA(dim, nq=s.nq, num_heads=s.heads_q, kernel_size=s.ksize_qna, activation=s.qna_activation)
    if letter == 'E':    # the official stage gives Q and E no dropout
        return SlideAttention(dim, num_heads=s.heads, ka=3)
    if letter == 'X':
        return nn.Conv2d(dim, dim, s.window_size, 1, s.window_size // 2, groups=dim)
    raise ValueError(f"unknown block letter {letter!r} in stage_spec; use one of {', '.join(BLOCK_LETTERS)}")


class DATBlock:
    """One block of a stage: its residual branches, as a view of modules the stage registers.

    The official checkpoints name a stage's modules per kind (``attns.3``, ``mlps.3``,
    ``layer_norms.6`` ...), so the stage owns them under those names and each block keeps plain
    references. Running blocks as objects (rather than ``stage._block(x, index)``) keeps
    ``torch.compile`` from specialising on a block index.
    """

    def __init__(self, *, attn: nn.Module, mlp: nn.Module, norm1: nn.Module, norm2: nn.Module,
                 scale1: nn.Module, scale2: nn.Module, drop_path: nn.Module, lpu: Optional[nn.Module],
                 conv_norm: Optional[nn.Module]):
        self.attn, self.mlp = attn, mlp
        self.norm1, self.norm2 = norm1, norm2
        self.scale1, self.scale2 = scale1, scale2
        self.drop_path = drop_path
        self.lpu = lpu                  # local perception unit (DAT++), or None
        self.conv_norm = conv_norm      # set for an X block: conv -> norm -> MLP in one branch

    def forward_with_points(self, x: torch.Tensor, with_points: bool = True
                            ) -> Tuple[torch.Tensor, Optional[Tuple[torch.Tensor, torch.Tensor]]]:
        if self.lpu is not None:
            x = residual_depthwise_conv(self.lpu, x)
        if self.conv_norm is not None:
            return x + self.drop_path(self.mlp(self.conv_norm(self.attn(x)))), None
        y = self.norm1(x)
        points = None
        if with_points and isinstance(self.attn, DAttention):
            y, pos, ref = self.attn.forward_with_points(y)
            points = (pos, ref)
        else:
            y = self.attn(y)
        x = x + self.drop_path(self.scale1(y))
        x = x + self.drop_path(self.scale2(self.mlp(self.norm2(x))))
        return x, points

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_points(x, with_points=False)[0]


class DATStage(nn.Module):
    """One stage: ``len(spec)`` blocks, each an attention (or conv) residual branch and an MLP branch."""

    def __init__(self, dim_in: int, *, spec: Sequence[str], drop_path: Sequence[float], cfg: StageConfig):
        super().__init__()
        dim, depth = cfg.dim, len(spec)
        self.spec = list(spec)
        self.grad_checkpointing = False
        self.proj = nn.Conv2d(dim_in, dim, 1) if dim_in != dim else nn.Identity()
        self.layer_norms = nn.ModuleList(
            nn.Identity() if spec[i // 2] == 'X' else LayerNorm2d(dim) for i in range(2 * depth))
        self.ln_cnvnxt = nn.ModuleDict({str(d): LayerNorm2d(dim) for d in range(depth) if spec[d] == 'X'})
        mlp = TransformerMLPWithConv if cfg.use_dwc_mlp else TransformerMLP
        self.mlps = nn.ModuleList(mlp(dim, expansion=cfg.expansion, drop=cfg.drop) for _ in range(depth))
        self.attns = nn.ModuleList(build_attention(letter, cfg) for letter in spec)
        self.layer_scales = nn.ModuleList(
            LayerScale(dim, init_value=cfg.layer_scale_value) if cfg.layer_scale_value > 0 else nn.Identity()
            for _ in range(2 * depth))
        self.drop_path = nn.ModuleList(DropPath(p) if p > 0 else nn.Identity() for p in drop_path)
        if cfg.use_lpu:
            self.local_perception_units = nn.ModuleList(
                nn.Conv2d(dim, dim, 3, 1, 1, groups=dim) for _ in range(depth))
        self.blocks = [DATBlock(
            attn=self.attns[d], mlp=self.mlps[d], norm1=self.layer_norms[2 * d], norm2=self.layer_norms[2 * d + 1],
            scale1=self.layer_scales[2 * d], scale2=self.layer_scales[2 * d + 1], drop_path=self.drop_path[d],
            lpu=self.local_perception_units[d] if cfg.use_lpu else None,
            conv_norm=self.ln_cnvnxt[str(d)] if spec[d] == 'X' else None) for d in range(depth)]

    def forward_with_points(self, x: torch.Tensor) -> Tuple[torch.Tensor, SamplingPoints]:
        """Runs the stage; also returns ``(pos, ref)`` of every deformable block, in order."""
        x = self.proj(x)
        points: SamplingPoints = []
        for block in self.blocks:
            x, pts = block.forward_with_points(x)
            if pts is not None:
                points.append(pts)
        return x, points

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


# ----------------------------------------------------------------------------- model
def _per_stage(value: Any, name: str) -> list:
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise ValueError(f"DAT option '{name}' needs one value per stage (4), got {value!r}")
    return list(value)


class DAT(nn.Module):
    """Vision Transformer with Deformable Attention (DAT, CVPR 2022; DAT++).

    Keywords are those of the official constructor (``MODEL.DAT`` of the YAML configs), except that
    the position encoding of each stage's deformable blocks is one named choice, ``pos_encs``
    (one of ``'none', 'table', 'dwc', 'fixed', 'log_cpb'`` per stage; ``models.build`` translates
    the official booleans), plus ``deform_arith`` ('pp' or 'v1'), ``attn_impl`` ('auto',
    'reference', 'fused'; see ``models.attention_impl``) and the usual timm ``in_chans``,
    ``global_pool``, ``device`` and ``dtype``.
    """

    def __init__(
            self, *, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000, global_pool: str = 'avg',
            patch_size: int = 4, expansion: int = 4, dim_stem: int = 96, dims: Sequence[int] = (96, 192, 384, 768),
            depths: Sequence[int] = (2, 2, 6, 2), heads: Sequence[int] = (3, 6, 12, 24),
            heads_q: Sequence[int] = (6, 12, 24, 48), window_sizes: Sequence[int] = (7, 7, 7, 7),
            drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
            strides: Sequence[int] = (-1, -1, -1, -1), offset_range_factor: Sequence[float] = (1, 2, 3, 4),
            stage_spec: Sequence[Sequence[str]] = ('LD', 'LD', 'LDLDLD', 'LD'), groups: Sequence[int] = (-1, -1, 3, 6),
            pos_encs: Sequence[str] = ('none',) * 4, no_offs: Sequence[bool] = (False,) * 4,
            sr_ratios: Sequence[int] = (8, 4, 2, 1), lower_lr_kvs: Optional[Mapping[str, float]] = None,
            use_dwc_mlps: Sequence[bool] = (False,) * 4, use_conv_patches: bool = False,
            ksizes: Sequence[int] = (9, 7, 5, 3), ksize_qnas: Sequence[int] = (3,) * 4, nqs: Sequence[int] = (2,) * 4,
            qna_activation: str = 'exp', nat_ksizes: Sequence[int] = (3,) * 4,
            layer_scale_values: Sequence[float] = (-1,) * 4, use_lpus: Sequence[bool] = (False,) * 4,
            deform_arith: str = 'pp', attn_impl: str = 'auto',
            device: Optional[Union[torch.device, str]] = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        for name in ('dims', 'depths', 'heads', 'heads_q', 'window_sizes', 'strides', 'offset_range_factor',
                     'stage_spec', 'groups', 'pos_encs', 'no_offs', 'sr_ratios', 'use_dwc_mlps', 'ksizes',
                     'ksize_qnas', 'nqs', 'nat_ksizes', 'layer_scale_values', 'use_lpus'):
            _per_stage(locals()[name], name)
        for i, (spec, depth) in enumerate(zip(stage_spec, depths)):
            if len(spec) != depth:
                raise ValueError(f'stage {i}: stage_spec {list(spec)} has {len(spec)} blocks but depths[{i}] = {depth}')
            bad = [s for s in spec if s not in BLOCK_LETTERS]
            if bad:
                raise ValueError(f"stage {i}: unknown block letter(s) {bad}; use one of {', '.join(BLOCK_LETTERS)}")
        bad = [p for p in pos_encs if p not in POS_ENCODINGS]
        if bad:
            raise ValueError(f"unknown pos_encs {bad}; use one of {', '.join(POS_ENCODINGS)}")
        if deform_arith not in DEFORM_ARITHS:
            raise ValueError(f"deform_arith must be one of {', '.join(DEFORM_ARITHS)}, got {deform_arith!r}")
        check_attn_impl(attn_impl)

        with torch.device(device) if device is not None else nullcontext():
            self._build(img_size, in_chans, num_classes, global_pool, patch_size, expansion, dim_stem, dims, depths,
                        heads, heads_q, window_sizes, drop_rate, attn_drop_rate, drop_path_rate, strides,
                        offset_range_factor, stage_spec, groups, pos_encs, no_offs, sr_ratios, use_dwc_mlps,
                        use_conv_patches, ksizes, ksize_qnas, nqs, qna_activation, nat_ksizes, layer_scale_values,
                        use_lpus, deform_arith, attn_impl)
        if dtype is not None:
            self.to(dtype=dtype)
        self.lower_lr_kvs = dict(lower_lr_kvs or {})

    def _build(self, img_size, in_chans, num_classes, global_pool, patch_size, expansion, dim_stem, dims, depths,
               heads, heads_q, window_sizes, drop_rate, attn_drop_rate, drop_path_rate, strides, offset_range_factor,
               stage_spec, groups, pos_encs, no_offs, sr_ratios, use_dwc_mlps, use_conv_patches, ksizes, ksize_qnas,
               nqs, qna_activation, nat_ksizes, layer_scale_values, use_lpus, deform_arith, attn_impl) -> None:
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = img_size
        self.patch_size = patch_size
        self.dims = list(dims)
        self.num_features = self.head_hidden_size = dims[-1]
        self.deform_arith = deform_arith
        self.attn_impl = attn_impl

        half = dim_stem // 2
        if use_conv_patches:
            self.patch_proj = nn.Sequential(
                nn.Conv2d(in_chans, half, 3, patch_size // 2, 1), LayerNorm2d(half), nn.GELU(),
                nn.Conv2d(half, dim_stem, 3, patch_size // 2, 1), LayerNorm2d(dim_stem))
        else:
            self.patch_proj = nn.Sequential(nn.Conv2d(in_chans, dim_stem, patch_size, patch_size),
                                            LayerNorm2d(dim_stem))

        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        fmap = img_size // patch_size
        self.stages = nn.ModuleList()
        for i in range(4):
            cfg = StageConfig(
                dim=dims[i], heads=heads[i], heads_q=heads_q[i], window_size=window_sizes[i], fmap_size=fmap,
                groups=groups[i], stride=strides[i], offset_range_factor=offset_range_factor[i],
                pos_enc=pos_encs[i], no_off=bool(no_offs[i]), ksize=ksizes[i], nat_ksize=nat_ksizes[i],
                sr_ratio=sr_ratios[i], nq=nqs[i], ksize_qna=ksize_qnas[i], qna_activation=qna_activation,
                expansion=expansion, use_dwc_mlp=bool(use_dwc_mlps[i]), use_lpu=bool(use_lpus[i]),
                layer_scale_value=layer_scale_values[i], attn_drop=attn_drop_rate, drop=drop_rate,
                deform_arith=deform_arith, attn_impl=attn_impl)
            start = sum(depths[:i])
            dim_in = dim_stem if i == 0 else dims[i - 1] * 2
            self.stages.append(DATStage(dim_in, spec=stage_spec[i], drop_path=dpr[start:start + depths[i]], cfg=cfg))
            fmap //= 2

        self.down_projs = nn.ModuleList()
        for i in range(3):
            if use_conv_patches:
                conv = nn.Conv2d(dims[i], dims[i + 1], 3, 2, 1, bias=False)
            else:
                conv = nn.Conv2d(dims[i], dims[i + 1], 2, 2, 0, bias=False)
            self.down_projs.append(nn.Sequential(conv, LayerNorm2d(dims[i + 1])))

        self.cls_norm = LayerNorm2d(dims[-1])
        self.global_pool, self.cls_head = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self.feature_info = [dict(num_chs=dims[i], reduction=patch_size * 2 ** i, module=f'stages.{i}')
                             for i in range(4)]

    # -- optimizer hints (used by optimizer.build_optimizer) ------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return set()

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> Set[str]:
        return {'relative_position_bias_table', 'rpe_table'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^patch_proj',
                    blocks=r'^stages\.(\d+)' if coarse else [(r'^stages\.(\d+)', None), (r'^down_projs\.(\d+)', (0,)),
                                                              (r'^cls_norm', (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    # -- forward ---------------------------------------------------------------
    def forward_stages(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], List[SamplingPoints]]:
        """The stage outputs (NCHW, strides 4/8/16/32 of the input) and the deformable points per stage."""
        x = self.patch_proj(x)
        outs, points = [], []
        for i, stage in enumerate(self.stages):
            x, pts = stage.forward_with_points(x)
            outs.append(x)
            points.append(pts)
            if i < len(self.down_projs):
                x = self.down_projs[i](x)
        return outs, points

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, Sequence[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False
                              ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs for dense prediction (timm's ``forward_intermediates`` protocol).

        Each intermediate is the raw output of stage ``i`` (NCHW, ``dims[i]`` channels, stride
        ``patch_size * 2**i``), taken before the next down-projection and without a norm: the
        official detection / segmentation backbones add their own per-stage norms. ``norm=True``
        applies ``cls_norm`` to the last stage's map only (the one norm this model owns).
        ``indices``: None for all stages, an int for the last n, or a list of stage indices.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"DAT returns NCHW stage maps; got output_fmt={str(output_fmt)!r}")
        take, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        run = self.stages[:max_index + 1] if stop_early else self.stages
        x = self.patch_proj(x)
        intermediates = []
        for i, stage in enumerate(run):
            if i > 0:
                x = self.down_projs[i - 1](x)
            x = stage(x)
            if i in take:
                intermediates.append(self.cls_norm(x) if norm and i == last else x)
        if intermediates_only:
            return intermediates
        if len(run) == len(self.stages):    # cls_norm follows the last stage only
            x = self.cls_norm(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the stages after the last wanted one (and the norm / head) for a features-only model."""
        take, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        self.down_projs = self.down_projs[:max_index]
        if prune_norm or max_index < 3:
            self.cls_norm = nn.Identity()
        if max_index < 3:
            self.num_features = self.head_hidden_size = self.dims[max_index]
        if prune_head:
            self.reset_classifier(0, '')
        elif max_index < 3:
            self.reset_classifier(self.num_classes)
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised last-stage map (B, C, H/32, W/32)."""
        x = self.patch_proj(x)
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = self.down_projs[i - 1](x)
            x = stage(x)
        return self.cls_norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        return x if pre_logits else self.cls_head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def sampling_points(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[List[torch.Tensor]], List[List[torch.Tensor]]]:
        """Logits and, per stage, the deformable blocks' sampled positions and reference points.

        Positions are ``(B, groups, Hk, Wk, 2)`` in (y, x) order, normalised so that -1 and 1 are
        the centres of the first and last pixels (``grid_sample`` with ``align_corners=True``).
        """
        outs, points = self.forward_stages(x)
        logits = self.forward_head(self.cls_norm(outs[-1]))
        return logits, [[p for p, _ in pts] for pts in points], [[r for _, r in pts] for pts in points]

    # -- head ------------------------------------------------------------------
    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.cls_head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new head for ``num_classes`` (0: none); ``global_pool`` None keeps the current pooling."""
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        like = next(self.parameters())
        pool, head = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self.global_pool = pool.train(self.training)
        self.cls_head = head.to(device=like.device, dtype=like.dtype).train(self.training)


# ----------------------------------------------------------------------------- weights
class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the model; the message is one line naming what to change."""


_WRAPPER_PREFIXES = ('module.', '_orig_mod.')      # DDP / DataParallel, torch.compile
# Buffers derived from the construction resolution; a model built for another size keeps its own.
_RESOLUTION_BUFFERS = ('relative_position_index', 'attn_mask')
_HEAD = 'cls_head.'
_STEM = 'patch_proj.0.weight'                   # the first conv (timm's first_conv)


def _strip_prefixes(name: str) -> str:
    """``module._orig_mod.stages.0.x`` -> ``stages.0.x``."""
    while name.startswith(_WRAPPER_PREFIXES):
        name = name.split('.', 1)[1]
    return name


def _model_weights(checkpoint: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """The state dict in an official ``{'model': sd}`` file, a ``{'state_dict': sd}`` file or a bare one."""
    for key in ('model', 'state_dict'):
        inner = checkpoint.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return dict(inner)
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return dict(checkpoint)
    keys = ', '.join(str(k) for k in list(checkpoint)[:8])
    raise CheckpointMismatchError(f"no model weights in checkpoint (top-level keys: {keys}); expected a 'model' or "
                                  f"'state_dict' entry holding tensors, or a plain state dict")


def _bicubic(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bicubic resize of the last two dims of (1, C, H, W), in its own precision (float32 at least)."""
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    return F.interpolate(work, size=tuple(size), mode='bicubic', align_corners=False).to(x.dtype)


def resize_position_table(name: str, value: torch.Tensor, target: Sequence[int]) -> Optional[torch.Tensor]:
    """``value`` resized (bicubic) to ``target`` when ``name`` is a resizable position table, else None.

    ``rpe_table`` (heads, 2f-1, 2f-1) and ``rpb`` (heads, 2K-1, 2K-1) are images per head;
    ``relative_position_bias_table`` ((2w-1)^2, heads) is one after a reshape.
    """
    leaf = name.rsplit('.', 1)[-1]
    target = tuple(target)
    if leaf in ('rpe_table', 'rpb') and value.ndim == 3 and len(target) == 3 and value.shape[0] == target[0]:
        return _bicubic(value.unsqueeze(0), target[1:]).squeeze(0)
    if (leaf == 'relative_position_bias_table' and value.ndim == 2 and len(target) == 2
            and value.shape[1] == target[1]):
        side, new_side = math.isqrt(value.shape[0]), math.isqrt(target[0])
        if side * side != value.shape[0] or new_side * new_side != target[0]:
            return None
        heads = value.shape[1]
        image = value.reshape(side, side, heads).permute(2, 0, 1).unsqueeze(0)
        return _bicubic(image, (new_side, new_side))[0].permute(1, 2, 0).reshape(new_side * new_side, heads)
    return None


def read_class_map(path: Union[str, os.PathLike]) -> torch.Tensor:
    """Class indices (1-D int64) from a text file (one integer per line, ``#`` comments) or a saved tensor."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointMismatchError(f"class map file not found: {path} (give a text file with one class index "
                                      f"per line)")
    with open(path, 'rb') as f:
        magic = f.read(2)
    try:
        if magic == b'PK' or magic[:1] == b'\x80':     # torch zip format / legacy pickle
            index = torch.as_tensor(torch.load(path, map_location='cpu', weights_only=True))
        else:
            with open(path, 'r') as f:
                index = torch.tensor([int(tok) for line in f for tok in line.split('#', 1)[0].split()])
    except Exception as e:      # unreadable text, non-integers, or a file torch cannot load
        raise CheckpointMismatchError(f"class map {path} is not a list of integers ({str(e).splitlines()[0]})") from e
    if index.ndim != 1 or index.is_floating_point() or index.numel() == 0:
        raise CheckpointMismatchError(f"class map {path} must hold a non-empty 1-D list of integers, got shape "
                                      f"{tuple(index.shape)} {index.dtype}")
    return index.long()


def _is_fixed_table(model: nn.Module, name: str) -> bool:
    """True for a ``fixed`` position table: it indexes queries x keys and cannot be resized like an image."""
    module_name, _, leaf = name.rpartition('.')
    if leaf != 'rpe_table':
        return False
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return False
    return isinstance(module, DAttention) and module.pos_enc == 'fixed'


def _shape(t: torch.Tensor) -> str:
    return '(' + ', '.join(str(s) for s in t.shape) + ')'


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module,
                         class_map: Optional[Union[str, os.PathLike, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """Make an official or project checkpoint fit ``model``: the one weights filter of every loading path.

    * accepts ``{'model': sd}`` (official releases, this project's checkpoints), ``{'state_dict': sd}``
      and bare state dicts, and strips ``module.`` / ``_orig_mod.`` prefixes;
    * resolution-bound buffers (``relative_position_index``, ``attn_mask``) of another shape are
      replaced by the model's own;
    * position tables (``rpe_table``, ``relative_position_bias_table``, ``rpb``) are resized
      bicubically to the model's shape; a ``fixed`` table is refused (it is bound to its resolution);
    * a classifier for another number of classes keeps the rows ``class_map`` selects (a tensor or
      a file, see :func:`read_class_map`) or is dropped, so the model keeps its fresh head.

    Any other tensor of another shape raises :class:`CheckpointMismatchError` (one line).
    Used by ``timm.create_model(..., pretrained=True)`` and by :func:`load_pretrained`.
    """
    sd = {_strip_prefixes(k): v for k, v in _model_weights(state_dict).items()}
    own = model.state_dict()
    for name, value in own.items():
        if name.rsplit('.', 1)[-1] in _RESOLUTION_BUFFERS and (name not in sd or sd[name].shape != value.shape):
            sd[name] = value.detach().clone()

    head = [k for k in (_HEAD + 'weight', _HEAD + 'bias') if k in sd]
    if head and any(k not in own or sd[k].shape[0] != own[k].shape[0] for k in head):
        classes = sd[head[0]].shape[0]
        if class_map is not None and all(k in own for k in head):
            index = class_map if isinstance(class_map, torch.Tensor) else read_class_map(class_map)
            wanted = own[head[0]].shape[0]
            if index.numel() != wanted or int(index.min()) < 0 or int(index.max()) >= classes:
                raise CheckpointMismatchError(
                    f"class map holds {index.numel()} indices in [{int(index.min())}, {int(index.max())}]; it needs "
                    f"{wanted} (the model's classes) indices below {classes} (the checkpoint's classes)")
            for k in head:
                sd[k] = sd[k].index_select(0, index.long())
        else:
            for k in head:
                del sd[k]

    wrong = []
    for name, value in list(sd.items()):
        if name not in own or value.shape == own[name].shape:
            continue
        if name == _STEM and value.shape[:1] + value.shape[2:] == own[name].shape[:1] + own[name].shape[2:]:
            continue    # another number of input channels: adapted after filtering (adapt_input_conv)
        if _is_fixed_table(model, name):
            raise CheckpointMismatchError(
                f"{name} {_shape(value)} is a fixed position table bound to the resolution it was trained at and "
                f"cannot be resized to {_shape(own[name])}; build the model with that img_size")
        resized = resize_position_table(name, value, own[name].shape)
        if resized is None:
            wrong.append(f'{name} {_shape(value)} vs model {_shape(own[name])}')
        else:
            sd[name] = resized
    if wrong:
        shown = ', '.join(wrong[:4]) + (f' ... and {len(wrong) - 4} more' if len(wrong) > 4 else '')
        raise CheckpointMismatchError(f"checkpoint does not fit the model: {shown}; build the variant (config) the "
                                      f"checkpoint was trained as")
    return sd


def load_pretrained(model: nn.Module, checkpoint: Union[Mapping[str, Any], str, os.PathLike], *,
                    class_map: Optional[Union[str, os.PathLike, torch.Tensor]] = None,
                    new_head_ok: bool = True) -> Dict[str, List[str]]:
    """Load weights into ``model`` through :func:`checkpoint_filter_fn`.

    ``checkpoint`` is a loaded checkpoint dict or a path (read with ``torch.load(weights_only=True)``
    or as ``.safetensors``). A first conv for another number of input channels is adapted with
    timm's ``adapt_input_conv``. With ``new_head_ok`` a classifier for other classes (and no
    ``class_map``) leaves the model's own head; otherwise it is an error, as is any other tensor
    the checkpoint lacks or has in excess. Returns the names kept from the model (``kept``) and the
    resized ones (``resized``) for logging.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        path = os.fspath(checkpoint)
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file
            checkpoint = load_file(path, device='cpu')
        else:
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    source = {_strip_prefixes(k): v for k, v in _model_weights(checkpoint).items()}
    sd = checkpoint_filter_fn(checkpoint, model, class_map=class_map)
    own = model.state_dict()
    if _STEM in sd and _STEM in own and sd[_STEM].shape[1] != own[_STEM].shape[1]:
        base = sd[_STEM].shape[1]       # timm before 1.0.30 adapts from 3 channels only (no base_chans)
        sd[_STEM] = adapt_input_conv(own[_STEM].shape[1], sd[_STEM], **({} if base == 3 else {'base_chans': base}))

    missing = [k for k in own if k not in sd]
    dropped_head = [k for k in missing if k.startswith(_HEAD) and k in source]
    if not new_head_ok and dropped_head:
        raise CheckpointMismatchError(
            f"checkpoint classifier has {source[dropped_head[0]].shape[0]} classes, the model "
            f"{own[dropped_head[0]].shape[0]}; build the model with the checkpoint's num_classes")
    missing = [k for k in missing if k not in dropped_head]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        parts = [f'{len(names)} {what}: ' + ', '.join(names[:6]) + (' ...' if len(names) > 6 else '')
                 for what, names in (('missing', missing), ('unexpected', unexpected)) if names]
        raise CheckpointMismatchError('checkpoint does not fit the model (' + '; '.join(parts) + '); build the '
                                      'model with the config the checkpoint was trained with')
    model.load_state_dict(sd, strict=not dropped_head)
    resized = [k for k in sd if k in source and source[k].shape != sd[k].shape and not k.startswith(_HEAD)]
    kept = dropped_head + [k for k in own if k.rsplit('.', 1)[-1] in _RESOLUTION_BUFFERS
                           and (k not in source or source[k].shape != own[k].shape)]
    return dict(kept=kept, resized=resized)



# ----------------------------------------------------------------------------- variants
_DAT_PP = dict(
    img_size=224, patch_size=4, expansion=4, depths=(2, 4, 18, 2), stage_spec=('ND', 'NDND', 'ND' * 9, 'DD'),
    window_sizes=(7,) * 4, strides=(8, 4, 2, 1), offset_range_factor=(-1,) * 4, pos_encs=('table',) * 4,
    use_dwc_mlps=(True,) * 4, use_lpus=(True,) * 4, use_conv_patches=True, ksizes=(9, 7, 5, 3),
    nat_ksizes=(7,) * 4)
_DAT_PP_TINY = dict(_DAT_PP, dim_stem=64, dims=(64, 128, 256, 512), heads=(2, 4, 8, 16), groups=(1, 2, 4, 8),
                    drop_path_rate=0.2)
_DAT_PP_BASE = dict(_DAT_PP, dim_stem=128, dims=(128, 256, 512, 1024), heads=(4, 8, 16, 32), groups=(2, 4, 8, 16))
_DAT_V1 = dict(
    img_size=224, patch_size=4, expansion=4, window_sizes=(7,) * 4, strides=(-1, -1, 1, 1), sr_ratios=(-1,) * 4,
    offset_range_factor=(-1, -1, 2, 2), pos_encs=('none', 'none', 'table', 'table'), ksizes=(9, 7, 5, 3),
    deform_arith='v1')
_DAT_V1_SMALL = dict(_DAT_V1, dim_stem=96, dims=(96, 192, 384, 768), heads=(3, 6, 12, 24), groups=(-1, -1, 3, 6),
                     depths=(2, 2, 18, 2), stage_spec=('LS', 'LS', 'LD' * 9, 'LD'))
_DAT_V1_BASE = dict(_DAT_V1_SMALL, dim_stem=128, dims=(128, 256, 512, 1024), heads=(4, 8, 16, 32),
                    groups=(-1, -1, 4, 8), drop_path_rate=0.5)


@dataclass(frozen=True)
class Variant:
    """A registered model: its constructor keywords and evaluation settings."""
    kwargs: Mapping[str, Any]
    config: str                 # the training config in configs/ that builds the same model
    img_size: int = 224         # evaluation resolution
    crop_pct: float = 0.875
    paper: str = 'arXiv:2309.01430'


_V1_PAPER = 'arXiv:2201.00520'
VARIANTS: Dict[str, Variant] = {
    'dat_pp_tiny': Variant(_DAT_PP_TINY, 'dat_tiny.yaml'),
    'dat_pp_small': Variant(dict(_DAT_PP, dim_stem=96, dims=(96, 192, 384, 768), heads=(3, 6, 12, 24),
                                 groups=(1, 2, 3, 6), drop_path_rate=0.4), 'dat_small.yaml'),
    'dat_pp_base': Variant(dict(_DAT_PP_BASE, drop_path_rate=0.7), 'dat_base.yaml'),
    # fine-tuned at 384 from dat_pp_base; the model keeps its 224 tables (interpolated at run time)
    'dat_pp_base_384': Variant(dict(_DAT_PP_BASE, drop_path_rate=0.6), 'dat_base_384.yaml', 384, 1.0),
    # DAT+: DAT++ tiny without LPU, DWC-MLP and conv stem
    'dat_plus_tiny': Variant(dict(_DAT_PP_TINY, use_dwc_mlps=(False,) * 4, use_lpus=(False,) * 4,
                                  use_conv_patches=False), 'dat_p.yaml'),
    'dat_v1_tiny': Variant(dict(_DAT_V1_SMALL, depths=(2, 2, 6, 2), stage_spec=('LS', 'LS', 'LDLDLD', 'LD'),
                                drop_path_rate=0.2), 'dat_v1_tiny.yaml', paper=_V1_PAPER),
    'dat_v1_small': Variant(dict(_DAT_V1_SMALL, drop_path_rate=0.3), 'dat_v1_small.yaml', paper=_V1_PAPER),
    'dat_v1_base': Variant(_DAT_V1_BASE, 'dat_v1_base.yaml', paper=_V1_PAPER),
    'dat_v1_base_384': Variant(dict(_DAT_V1_BASE, img_size=384, window_sizes=(12,) * 4), 'dat_v1_base_384.yaml',
                               384, 1.0, paper=_V1_PAPER),
}
# File names of the official ImageNet-1K releases (weights are never downloaded: pass the local path
# with pretrained_cfg_overlay=dict(file=...)).
RELEASED_FILES = {
    'dat_pp_tiny': 'dat_pp_t_in1k_224.pth', 'dat_pp_small': 'dat_pp_s_in1k_224.pth',
    'dat_pp_base': 'dat_pp_b_in1k_224.pth', 'dat_pp_base_384': 'dat_pp_b_in1k_384.pth',
    'dat_v1_tiny': 'dat_tiny_in1k_224.pth', 'dat_v1_small': 'dat_small_in1k_224.pth',
    'dat_v1_base': 'dat_base_in1k_224.pth', 'dat_v1_base_384': 'dat_base_in1k_384.pth',
}


def pretrained_cfg_for(img_size: int = 224, crop_pct: float = 0.875, num_classes: int = 1000,
                       paper: str = 'arXiv:2309.01430') -> Dict[str, Any]:
    """timm pretrained-cfg fields of a DAT evaluated at ``img_size``. The official evaluation resizes
    to a square (``crop_mode='squash'``: the aspect ratio is not kept), then centre-crops."""
    return dict(num_classes=num_classes, input_size=(3, img_size, img_size), pool_size=(img_size // 32,) * 2,
                crop_pct=crop_pct, crop_mode='squash', interpolation='bicubic', mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                first_conv='patch_proj.0', classifier='cls_head', license='apache-2.0', paper_ids=paper,
                origin_url='https://github.com/LeapLabTHU/DAT')


default_cfgs = generate_default_cfgs({
    f'{name}.in1k': pretrained_cfg_for(v.img_size, v.crop_pct, paper=v.paper) for name, v in VARIANTS.items()})


def create_dat(variant: str, pretrained: bool = False, **kwargs: Any) -> DAT:
    """``DAT(**kwargs)`` through timm (pretrained loading, ``features_only``, cfgs) under the name ``variant``."""
    if pretrained:
        overlay = kwargs.get('pretrained_cfg_overlay') or {}
        cfg = kwargs.get('pretrained_cfg') or {}
        cfg = cfg if isinstance(cfg, dict) else cfg.to_dict()
        if not any(overlay.get(k) or cfg.get(k) for k in ('file', 'state_dict', 'url', 'hf_hub_id')):
            hint = RELEASED_FILES.get(variant, 'checkpoint.pth')
            raise RuntimeError(f"{variant}: pretrained=True needs a local checkpoint (nothing is downloaded); pass "
                               f"pretrained_cfg_overlay=dict(file='/path/to/{hint}')")
        path = overlay.get('file') or cfg.get('file')
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"{variant}: pretrained checkpoint '{path}' not found; pass its path with "
                                    f"pretrained_cfg_overlay=dict(file='/path/to/{os.path.basename(path)}')")
    return build_model_with_cfg(
        DAT, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        # Stages and down-projections interleave, so features come from forward_intermediates.
        feature_cfg=dict(feature_cls='getter', out_indices=(0, 1, 2, 3)),
        **kwargs)


def _create(variant: str, pretrained: bool, **kwargs: Any) -> DAT:
    return create_dat(variant, pretrained, **{**VARIANTS[variant].kwargs, **kwargs})


@register_model
def dat_pp_tiny(pretrained: bool = False, **kwargs: Any) -> DAT:
    """DAT++ tiny: 24.0M params, 4.3 GFLOPs at 224."""
    return _create('dat_pp_tiny', pretrained, **kwargs)


@register_model
def dat_pp_small(pretrained: bool = False, **kwargs: Any) -> DAT:
    """DAT++ small: 53.1M params, 9.4 GFLOPs at 224."""
    return _create('dat_pp_small', pretrained, **kwargs)


@register_model
def dat_pp_base(pretrained: bool = False, **kwargs: Any) -> DAT:
    """DAT++ base: 93.7M params, 16.6 GFLOPs at 224."""
    return _create('dat_pp_base', pretrained, **kwargs)


@register_model
def dat_pp_base_384(pretrained: bool = False, **kwargs: Any) -> DAT:
    """DAT++ base fine-tuned at 384: 49.7 GFLOPs at 384."""
    return _create('dat_pp_base_384', pretrained, **kwargs)


@register_model
def dat_plus_tiny(pretrained: bool = False, **kwargs: Any) -> DAT:
    """DAT+ tiny: DAT++ tiny without LPU, DWC-MLP and conv stem."""
    return _create('dat_plus_tiny', pretrained, **kwargs)


@register_model
def dat_v1_tiny(pretrained: bool = False, **kwargs: Any) -> DAT:
    """DAT v1 tiny (CVPR 2022)."""
    return _create('dat_v1_tiny', pretrained, **kwargs)


@register_model
def dat_v1_small(pretrained: bool = False, **kwargs: Any) -> DAT:
    """DAT v1 small (CVPR 2022)."""
    return _create('dat_v1_small', pretrained, **kwargs)


@register_model
def dat_v1_base(pretrained: bool = False, **kwargs: Any) -> DAT:
    """DAT v1 base (CVPR 2022)."""
    return _create('dat_v1_base', pretrained, **kwargs)


@register_model
def dat_v1_base_384(pretrained: bool = False, **kwargs: Any) -> DAT:
    """DAT v1 base at 384 (CVPR 2022)."""
    return _create('dat_v1_base_384', pretrained, **kwargs)
