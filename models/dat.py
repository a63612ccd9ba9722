"""DAT / DAT++ backbone: a conv stem, four stages of mixed attention blocks, and a linear head.

A stage is described by a string of block letters (``stage_spec``):
``L`` window, ``S`` shifted window, ``D`` deformable, ``N`` neighborhood, ``P`` spatial
reduction, ``Q`` learned queries, ``E`` slide attention, ``X`` depthwise conv.
Module and parameter names follow the official checkpoints so they load with ``strict=True``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models._features import feature_take_indices
from torch.utils.checkpoint import checkpoint

from .dat_blocks import (DAttention, LayerNorm2d, LayerScale, LocalAttention, PyramidAttention,
                         ShiftWindowAttention, TransformerMLP, TransformerMLPWithConv)
from .nat import NeighborhoodAttention2D
from .qna import FusedKQnA
from .slide import SlideAttention

BLOCK_LETTERS = 'LSDNPQEX'
SamplingPoints = List[Tuple[torch.Tensor, torch.Tensor]]


class StageSettings(dict):
    """Per-stage keyword bundle (a plain dict with attribute access) handed to the block factory."""

    __getattr__ = dict.__getitem__


def build_attention(letter: str, dim: int, s: StageSettings) -> nn.Module:
    """The attention module for block letter ``letter`` in a stage of width ``dim``."""
    if letter == 'L':
        return LocalAttention(dim, s.heads, s.window_size, s.attn_drop, s.proj_drop)
    if letter == 'S':
        return ShiftWindowAttention(dim, s.heads, s.window_size, s.fmap_size, s.attn_drop, s.proj_drop)
    if letter == 'D':
        return DAttention(dim, s.heads, s.groups, s.fmap_size, s.stride, s.offset_range_factor,
                          s.use_pe, s.dwc_pe, s.no_off, s.fixed_pe, s.ksize, s.log_cpb,
                          s.attn_drop, s.proj_drop, arith=s.deform_arith, attn_impl=s.attn_impl)
    if letter == 'N':
        return NeighborhoodAttention2D(dim=dim, num_heads=s.heads, kernel_size=s.nat_ksize, attn_drop=s.attn_drop,
                                       proj_drop=s.proj_drop, attn_impl=s.attn_impl)
    if letter == 'P':
        return PyramidAttention(dim, s.heads, s.sr_ratio, s.attn_drop, s.proj_drop)
    if letter == 'Q':
        return FusedKQnA(s.nq, dim, s.heads_q, s.ksize_qna, activation=s.qna_activation)
    if letter == 'E':    # the official stage gives Q and E no dropout
        return SlideAttention(dim, s.heads, 3)
    if letter == 'X':
        return nn.Conv2d(dim, dim, s.window_size, 1, s.window_size // 2, groups=dim)
    raise ValueError(f"unknown block letter {letter!r} in stage_spec; use one of {', '.join(BLOCK_LETTERS)}")


class DATStage(nn.Module):
    """One stage: ``len(spec)`` blocks, each an attention (or conv) residual branch and an MLP branch."""

    def __init__(self, dim_in: int, dim: int, spec: Sequence[str], expansion: int, drop_path: Sequence[float],
                 use_dwc_mlp: bool, use_lpu: bool, layer_scale_value: float, drop: float, settings: StageSettings):
        super().__init__()
        depth = len(spec)
        self.spec = list(spec)
        self.use_lpu = use_lpu
        self.grad_checkpointing = False
        self.proj = nn.Conv2d(dim_in, dim, 1) if dim_in != dim else nn.Identity()
        self.layer_norms = nn.ModuleList(
            nn.Identity() if spec[i // 2] == 'X' else LayerNorm2d(dim) for i in range(2 * depth))
        self.ln_cnvnxt = nn.ModuleDict({str(d): LayerNorm2d(dim) for d in range(depth) if spec[d] == 'X'})
        mlp = TransformerMLPWithConv if use_dwc_mlp else TransformerMLP
        self.mlps = nn.ModuleList(mlp(dim, expansion, drop) for _ in range(depth))
        self.attns = nn.ModuleList(build_attention(letter, dim, settings) for letter in spec)
        self.layer_scales = nn.ModuleList(
            LayerScale(dim, layer_scale_value) if layer_scale_value > 0 else nn.Identity() for _ in range(2 * depth))
        self.drop_path = nn.ModuleList(DropPath(p) if p > 0 else nn.Identity() for p in drop_path)
        if use_lpu:
            self.local_perception_units = nn.ModuleList(
                nn.Conv2d(dim, dim, 3, 1, 1, groups=dim) for _ in range(depth))

    def _block(self, x: torch.Tensor, d: int) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        pos = ref = None
        if self.use_lpu:
            x = x + self.local_perception_units[d](x)
        if self.spec[d] == 'X':
            y = self.mlps[d](self.ln_cnvnxt[str(d)](self.attns[d](x)))
            return x + self.drop_path[d](y), pos, ref
        attn = self.attns[d]
        y = self.layer_norms[2 * d](x)
        if isinstance(attn, DAttention):
            y, pos, ref = attn.forward_with_points(y)
        else:
            y = attn(y)
        x = x + self.drop_path[d](self.layer_scales[2 * d](y))
        y = self.mlps[d](self.layer_norms[2 * d + 1](x))
        x = x + self.drop_path[d](self.layer_scales[2 * d + 1](y))
        return x, pos, ref

    def forward_with_points(self, x: torch.Tensor) -> Tuple[torch.Tensor, SamplingPoints]:
        """Runs the stage; also returns ``(pos, ref)`` of every deformable block, in order."""
        x = self.proj(x)
        points: SamplingPoints = []
        for d in range(len(self.spec)):
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x, pos, ref = checkpoint(self._block, x, d, use_reentrant=False)
            else:
                x, pos, ref = self._block(x, d)
            if pos is not None:
                points.append((pos, ref))
        return x, points

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_points(x)[0]


def _per_stage(value: Any, name: str) -> list:
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise ValueError(f"DAT option '{name}' needs one value per stage (4), got {value!r}")
    return list(value)


class DAT(nn.Module):
    """Vision Transformer with Deformable Attention (DAT, CVPR 2022; DAT++).

    Keyword arguments are those of the official constructor (``MODEL.DAT`` in the YAML
    configs), plus ``deform_arith`` ('pp' or 'v1') and ``attn_impl`` (kernel choice for
    neighborhood attention: 'auto', 'reference', 'fused').
    """

    def __init__(self, img_size: int = 224, patch_size: int = 4, num_classes: int = 1000, expansion: int = 4,
                 dim_stem: int = 96, dims: Sequence[int] = (96, 192, 384, 768), depths: Sequence[int] = (2, 2, 6, 2),
                 heads: Sequence[int] = (3, 6, 12, 24), heads_q: Sequence[int] = (6, 12, 24, 48),
                 window_sizes: Sequence[int] = (7, 7, 7, 7), drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, strides: Sequence[int] = (-1, -1, -1, -1),
                 offset_range_factor: Sequence[float] = (1, 2, 3, 4),
                 stage_spec: Sequence[Sequence[str]] = (('L', 'D'), ('L', 'D'), ('L', 'D', 'L', 'D', 'L', 'D'), ('L', 'D')),
                 groups: Sequence[int] = (-1, -1, 3, 6), use_pes: Sequence[bool] = (False,) * 4,
                 dwc_pes: Sequence[bool] = (False,) * 4, sr_ratios: Sequence[int] = (8, 4, 2, 1),
                 lower_lr_kvs: Optional[Dict[str, float]] = None, fixed_pes: Sequence[bool] = (False,) * 4,
                 no_offs: Sequence[bool] = (False,) * 4, ns_per_pts: Sequence[int] = (4,) * 4,
                 use_dwc_mlps: Sequence[bool] = (False,) * 4, use_conv_patches: bool = False,
                 ksizes: Sequence[int] = (9, 7, 5, 3), ksize_qnas: Sequence[int] = (3,) * 4,
                 nqs: Sequence[int] = (2,) * 4, qna_activation: str = 'exp', nat_ksizes: Sequence[int] = (3,) * 4,
                 layer_scale_values: Sequence[float] = (-1,) * 4, use_lpus: Sequence[bool] = (False,) * 4,
                 log_cpb: Sequence[bool] = (False,) * 4, deform_arith: str = 'pp', attn_impl: str = 'auto',
                 **unused: Any):
        super().__init__()
        if unused:
            raise ValueError(f'unknown DAT option(s): {sorted(unused)}')
        for name in ('dims', 'depths', 'heads', 'heads_q', 'window_sizes', 'strides', 'offset_range_factor',
                     'stage_spec', 'groups', 'use_pes', 'dwc_pes', 'sr_ratios', 'fixed_pes', 'no_offs',
                     'use_dwc_mlps', 'ksizes', 'ksize_qnas', 'nqs', 'nat_ksizes', 'layer_scale_values',
                     'use_lpus', 'log_cpb'):
            _per_stage(locals()[name], name)
        for i, (spec, depth) in enumerate(zip(stage_spec, depths)):
            if len(spec) != depth:
                raise ValueError(f'stage {i}: stage_spec {list(spec)} has {len(spec)} blocks but depths[{i}] = {depth}')
            bad = [s for s in spec if s not in BLOCK_LETTERS]
            if bad:
                raise ValueError(f"stage {i}: unknown block letter(s) {bad}; use one of {', '.join(BLOCK_LETTERS)}")

        self.num_classes = num_classes
        self.img_size = img_size
        self.patch_size = patch_size
        self.dims = list(dims)
        self.num_features = dims[-1]
        self.lower_lr_kvs = dict(lower_lr_kvs or {})
        self.deform_arith = deform_arith

        half = dim_stem // 2
        if use_conv_patches:
            self.patch_proj = nn.Sequential(
                nn.Conv2d(3, half, 3, patch_size // 2, 1), LayerNorm2d(half), nn.GELU(),
                nn.Conv2d(half, dim_stem, 3, patch_size // 2, 1), LayerNorm2d(dim_stem))
        else:
            self.patch_proj = nn.Sequential(nn.Conv2d(3, dim_stem, patch_size, patch_size), LayerNorm2d(dim_stem))

        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        fmap = img_size // patch_size
        self.stages = nn.ModuleList()
        for i in range(4):
            dim_in = dim_stem if i == 0 else dims[i - 1] * 2
            settings = StageSettings(
                heads=heads[i], heads_q=heads_q[i], window_size=window_sizes[i], fmap_size=fmap, groups=groups[i],
                stride=strides[i], offset_range_factor=offset_range_factor[i], use_pe=use_pes[i],
                dwc_pe=dwc_pes[i], no_off=no_offs[i], fixed_pe=fixed_pes[i], ksize=ksizes[i], log_cpb=log_cpb[i],
                nat_ksize=nat_ksizes[i], sr_ratio=sr_ratios[i], nq=nqs[i], ksize_qna=ksize_qnas[i],
                qna_activation=qna_activation, attn_drop=attn_drop_rate, proj_drop=drop_rate,
                deform_arith=deform_arith, attn_impl=attn_impl)
            start = sum(depths[:i])
            self.stages.append(DATStage(
                dim_in, dims[i], stage_spec[i], expansion, dpr[start:start + depths[i]], use_dwc_mlps[i],
                use_lpus[i], layer_scale_values[i], drop_rate, settings))
            fmap //= 2

        self.down_projs = nn.ModuleList()
        for i in range(3):
            if use_conv_patches:
                conv = nn.Conv2d(dims[i], dims[i + 1], 3, 2, 1, bias=False)
            else:
                conv = nn.Conv2d(dims[i], dims[i + 1], 2, 2, 0, bias=False)
            self.down_projs.append(nn.Sequential(conv, LayerNorm2d(dims[i + 1])))

        self.cls_norm = LayerNorm2d(dims[-1])
        self.cls_head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
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
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    # -- forward ---------------------------------------------------------------
    def forward_stages(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], List[SamplingPoints]]:
        """The four stage outputs (NCHW, strides 4/8/16/32 of the input) and the deformable points per stage."""
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
        if len(run) == len(self.stages) == 4:    # cls_norm fits only the last stage's width
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
        if prune_head:
            self.reset_classifier(0)
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised last-stage map (B, C, H/32, W/32)."""
        return self.cls_norm(self.forward_stages(x)[0][-1])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
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
    def get_classifier(self) -> nn.Module:
        return self.cls_head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.cls_head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
