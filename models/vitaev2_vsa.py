"""ViTAEv2 with Varied-Size Window Attention (VSA; Zhang et al., arXiv 2204.08446).

Each of the four stages is a reduction cell (a pyramid of dilated strided convolutions, VSA
attention from the concatenated pyramid to the stage width, a parallel convolution branch on
the cell input, and an MLP) followed by normal cells (VSA attention and a grouped convolution
branch in parallel, then an MLP). VSA attention regresses, per sample, head and window, a scale
and an offset of each window; the keys and values of a head are resampled bilinearly on the
scaled and shifted window, the queries stay on the window's own pixels.

Parameter names equal the official release's, so its checkpoints load with ``strict=True``; the
arithmetic, quirks included, is the official one (see ``../shared/reference/vsa_facts.md``):
softmax scale from the attention's input width, offsets divided by ``floor(size / window)``,
no mask for padded keys, reduction-cell norms with eps 1e-5 and an MLP ratio of 1, drop-path
rates sliced per stage as the official code slices them, and the float32 reference grid.

Input sizes: at the size a model is built for the outputs are the official ones. Any other
input whose sides are multiples of 32 and whose last stage map is at least one window wide is
accepted and gives exactly what the official model built for that size gives (nothing but the
reference grids depends on the size). Smaller or odd sizes, where the official model fails or
returns NaN, raise a ``ValueError`` naming the smallest valid size. Inputs need not be square.
"""
import functools
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, to_2tuple, trunc_normal_
from timm.models import (build_model_with_cfg, generate_default_cfgs, register_model, register_notrace_function,
                         register_notrace_module)
from timm.models._features import feature_take_indices
from torch.utils.checkpoint import checkpoint

from .attention_impl import check_attn_impl, use_fused
from .sampling import grid_sample_bilinear

__all__ = ['ViTAEv2VSA', 'VSAttention', 'ReductionCell', 'NormalCell', 'checkpoint_filter_fn',
           'reference_grid', 'VSA_VARIANTS']

TOKEN_TYPES = ('VSA',)


# ----------------------------------------------------------------------------- helpers
def _per_stage(value: Any, stages: int, name: str) -> List[Any]:
    """A per-stage keyword as a list: a scalar is repeated, a list must cover every stage."""
    if isinstance(value, (list, tuple)):
        if len(value) < stages:
            raise ValueError(f'{name} has {len(value)} entries for {stages} stages: {list(value)}')
        return list(value[:stages])
    return [value] * stages


def _stride_split(ratio: int) -> Tuple[int, int, int]:
    """The three conv strides of a reduction-cell PCM: 2 while halving remains, then 1."""
    strides = []
    for _ in range(3):
        step = 2 if ratio > 1 else 1
        strides.append(step)
        ratio //= step
    return strides[0], strides[1], strides[2]


@functools.lru_cache(maxsize=64)
def reference_grid(hp: int, wp: int, window_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The official float32 window grid of a ``hp x wp`` (padded) map, built on the CPU.

    Returns ``(base, rel)``, each ``(1, 2, hp // ws, ws, wp // ws, ws)`` with channel 0 = x and
    channel 1 = y in ``align_corners=True`` coordinates: ``rel`` holds the pixel offsets from the
    window centre, ``base`` the window's own pixels (centre + rel). The centres come from
    ``avg_pool2d`` of a ``linspace`` map and everything stays float32, as in the official code;
    the logits depend on these exact values at the 1e-7 level. Cached: callers must not modify them.
    """
    ws = window_size
    nh, nw = hp // ws, wp // ws
    cpu = torch.device('cpu')
    xs = torch.linspace(-1, 1, wp, dtype=torch.float32, device=cpu)
    ys = torch.linspace(-1, 1, hp, dtype=torch.float32, device=cpu)
    plane = torch.stack([xs.view(1, wp).expand(hp, wp), ys.view(hp, 1).expand(hp, wp)]).unsqueeze(0)
    centres = F.avg_pool2d(plane, kernel_size=ws, stride=ws)                 # (1, 2, nh, nw)
    steps = torch.arange(ws, dtype=torch.float32, device=cpu) * 2
    rx = steps / (wp - 1)
    ry = steps / (hp - 1)
    rx = rx - rx.mean()
    ry = ry - ry.mean()
    rel = torch.stack([rx.view(1, 1, 1, ws).expand(nh, ws, nw, ws),
                       ry.view(1, ws, 1, 1).expand(nh, ws, nw, ws)]).unsqueeze(0)
    base = centres.view(1, 2, nh, 1, nw, 1) + rel
    return base.contiguous(), rel.contiguous()


def _relative_position_index(window_size: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Swin's index into the ``(2ws-1)^2`` bias table for every (query, key) pair of a window."""
    ws = window_size
    coords = torch.stack(torch.meshgrid(torch.arange(ws, device=device), torch.arange(ws, device=device),
                                        indexing='ij')).flatten(1)           # (2, ws*ws): row, column
    rel = coords[:, :, None] - coords[:, None, :] + (ws - 1)
    return rel[0] * (2 * ws - 1) + rel[1]


def _tokens_to_map(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


def _map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


def _padded(size: int, window_size: int) -> int:
    return size + (window_size - size % window_size) % window_size


@register_notrace_function
def check_input_size(x: torch.Tensor, unit: int, window_size: int) -> None:
    """Raise a one-line ``ValueError`` for an input the official arithmetic cannot take: sides must be
    multiples of the total reduction ``unit`` and give a last stage map of at least one window."""
    if x.dim() != 4:
        raise ValueError(f'ViTAEv2-VSA takes image batches (B, C, H, W); got a {x.dim()}-D input')
    h, w = x.shape[-2], x.shape[-1]
    if h % unit or w % unit or h // unit < window_size or w // unit < window_size:
        raise ValueError(f'ViTAEv2-VSA takes inputs whose sides are multiples of {unit} and at least '
                         f'{unit * window_size} (window_size {window_size} on the last stage map); got {h}x{w}')


# ----------------------------------------------------------------------------- attention
@register_notrace_module    # FX: a leaf (its shapes drive padding and window counts)
class VSAttention(nn.Module):
    """Varied-size window attention from ``dim`` to ``out_dim`` channels on a token map.

    Per window, head and sample, ``sampling_scales`` / ``sampling_offsets`` (average pool over the
    window, LeakyReLU, 1x1 conv) scale and shift the window; keys and values are sampled
    bilinearly on it, queries are the window's own pixels. The map is zero-padded bottom/right
    to whole windows; padded keys are not masked (official behaviour).
    """
    base_grid: torch.Tensor
    rel_grid: torch.Tensor

    def __init__(
            self,
            dim: int,
            out_dim: int,
            num_heads: int,
            window_size: int,
            input_size: Tuple[int, int],
            *,
            proj_drop: float = 0.,
            attn_impl: str = 'reference',
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if out_dim % num_heads:
            raise ValueError(f'VSA attention: {out_dim} channels do not split into {num_heads} heads')
        self.num_heads = num_heads
        self.out_dim = out_dim
        self.head_dim = out_dim // num_heads
        self.window_size = window_size
        self.scale = (dim // num_heads) ** -0.5         # from the INPUT width (official)
        self.attn_impl = check_attn_impl(attn_impl)

        ws, n = window_size, num_heads
        self.sampling_offsets = nn.Sequential(
            nn.AvgPool2d(ws, ws), nn.LeakyReLU(), nn.Conv2d(dim, 2 * n, 1, **dd))
        self.sampling_scales = nn.Sequential(
            nn.AvgPool2d(ws, ws), nn.LeakyReLU(), nn.Conv2d(dim, 2 * n, 1, **dd))
        self.qkv = nn.Conv2d(dim, 3 * out_dim, 1, **dd)
        self.proj = nn.Conv2d(out_dim, out_dim, 1, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, n, **dd))
        self.register_buffer('relative_position_index', _relative_position_index(ws, device=device))
        if not self.relative_position_bias_table.is_meta:
            trunc_normal_(self.relative_position_bias_table, std=.02)

        # The official float32 grid of the build size: follows the module's device, never its
        # dtype (see _apply); other input sizes build theirs on the fly.
        self.grid_size = to_2tuple(input_size)
        self.base_grid, self.rel_grid = reference_grid(
            _padded(self.grid_size[0], ws), _padded(self.grid_size[1], ws), ws)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        device = fn(torch.empty(0, device=self.base_grid.device)).device
        if device != self.base_grid.device:
            self.base_grid = self.base_grid.to(device)
            self.rel_grid = self.rel_grid.to(device)
        return self

    @torch.jit.ignore
    def _grids(self, h: int, w: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        if (h, w) == self.grid_size:
            base, rel = self.base_grid, self.rel_grid
        else:
            ws = self.window_size
            base, rel = reference_grid(_padded(h, ws), _padded(w, ws), ws)
        return base.to(device), rel.to(device)

    def sampling_grid(self, z: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Sampling positions ``(B*heads, Hp, Wp, 2)`` (x, y) of every head, from the padded map ``z``."""
        b = z.shape[0]
        ws, n = self.window_size, self.num_heads
        nh, nw = z.shape[2] // ws, z.shape[3] // ws
        offsets = self.sampling_offsets(z).reshape(b, n, 2, nh, 1, nw, 1)
        scales = self.sampling_scales(z).reshape(b, n, 2, nh, 1, nw, 1)
        # Divided by floor(unpadded size / ws), not by the window count (official).
        offsets = torch.cat([offsets[:, :, :1] / (w // ws), offsets[:, :, 1:] / (h // ws)], dim=2)
        base, rel = self._grids(h, w, z.device)
        # float32 grid promoted to the activation dtype (float64 stays float64, bf16 becomes float32)
        grid = base.unsqueeze(1) + rel.unsqueeze(1) * scales + offsets   # (B, n, 2, nh, ws, nw, ws)
        return grid.permute(0, 1, 3, 4, 5, 6, 2).reshape(b * n, nh * ws, nw * ws, 2)

    def _windows(self, t: torch.Tensor, b: int, nh: int, nw: int) -> torch.Tensor:
        """``(B*heads, m, Hp, Wp)`` -> ``(B*nh*nw, heads, ws*ws, m)``, positions row-major in the window."""
        ws, n, m = self.window_size, self.num_heads, t.shape[1]
        t = t.reshape(b, n, m, nh, ws, nw, ws).permute(0, 3, 5, 1, 4, 6, 2)
        return t.reshape(b * nh * nw, n, ws * ws, m)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Tokens ``(B, h*w, dim)`` -> ``(B, h*w, out_dim)``."""
        b = x.shape[0]
        ws, n, c = self.window_size, self.num_heads, self.head_dim
        if h < ws or w < ws:
            raise ValueError(f'VSA attention: a {h}x{w} map is smaller than window_size {ws} (the official '
                             f'model returns NaN there); use a larger input or a smaller window_size')
        z = _tokens_to_map(x, h, w)
        pad_b, pad_r = _padded(h, ws) - h, _padded(w, ws) - w
        hp, wp = h + pad_b, w + pad_r
        nh, nw = hp // ws, wp // ws

        grid = self.sampling_grid(F.pad(z, (0, pad_r, 0, pad_b)), h, w)
        # qkv on the unpadded map, then zero padding: the bias does not reach the padding.
        qkv = F.pad(self.qkv(z), (0, pad_r, 0, pad_b))
        q = qkv[:, :self.out_dim].reshape(b * n, c, hp, wp)
        kv = qkv[:, self.out_dim:].reshape(b, 2, n, c, hp, wp).transpose(1, 2).reshape(b * n, 2 * c, hp, wp)
        sampled = grid_sample_bilinear(kv.to(grid.dtype), grid).to(kv.dtype)

        q = self._windows(q, b, nh, nw)
        kv = self._windows(sampled, b, nh, nw)
        k, v = kv[..., :c], kv[..., c:]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(ws * ws, ws * ws, n).permute(2, 0, 1).unsqueeze(0)
        if use_fused(self.attn_impl, q):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=self.scale)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1) + bias
            out = attn.softmax(dim=-1) @ v

        out = out.reshape(b, nh, nw, n, ws, ws, c).permute(0, 3, 6, 1, 4, 2, 5).reshape(b, n * c, hp, wp)
        out = self.proj(out[:, :, :h, :w].contiguous())
        return _map_to_tokens(self.proj_drop(out))


# ----------------------------------------------------------------------------- cells
class PyramidReduction(nn.Module):
    """PRM: one strided conv + GELU per dilation, concatenated dilation-major (``RC.PRM``)."""

    def __init__(self, in_dim: int, embed_dim: int, kernel_size: int, ratio: int, dilations: Sequence[int],
                 *, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.convs = nn.ModuleList()
        for d in dilations:
            pad = -(-((kernel_size - 1) * d + 1 - ratio) // 2)        # ceil
            self.convs.append(nn.Sequential(
                nn.Conv2d(in_dim, embed_dim, kernel_size, ratio, pad, d, **dd), nn.GELU()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = []
        for conv in self.convs:
            branches.append(conv(x))
        return torch.cat(branches, dim=1)


def _pcm(in_dim: int, mid1: int, mid2: int, out_dim: int, strides: Tuple[int, int, int], groups: int,
         dd: Dict[str, Any]) -> nn.Sequential:
    """Parallel convolution module: conv-BN-SiLU, conv-BN-SiLU, conv (all 3x3, padding 1, grouped)."""
    return nn.Sequential(
        nn.Conv2d(in_dim, mid1, 3, strides[0], 1, groups=groups, **dd), nn.BatchNorm2d(mid1, **dd), nn.SiLU(),
        nn.Conv2d(mid1, mid2, 3, strides[1], 1, groups=groups, **dd), nn.BatchNorm2d(mid2, **dd), nn.SiLU(),
        nn.Conv2d(mid2, out_dim, 3, strides[2], 1, groups=groups, **dd))


class ReductionCell(nn.Module):
    """Reduction cell (``layers.i.RC``): PRM -> [CPE] -> LN -> VSA (to the stage width), plus a strided
    PCM branch on the cell input, then an MLP with hidden ratio 1 (official). No drop path, no dropout."""

    def __init__(
            self,
            in_dim: int,
            embed_dim: int,
            token_dim: int,
            *,
            ratio: int,
            kernel_size: int,
            dilations: Sequence[int],
            num_heads: int,
            window_size: int,
            input_size: Tuple[int, int],
            group: int = 1,
            wide_pcm: bool = False,
            cpe: bool = False,
            attn_impl: str = 'reference',
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        pyramid_dim = embed_dim * len(dilations)
        self.PRM = PyramidReduction(in_dim, embed_dim, kernel_size, ratio, dilations, **dd)
        self.pos = nn.Conv2d(pyramid_dim, pyramid_dim, 7, 1, 3, groups=pyramid_dim, **dd) if cpe else None
        self.norm1 = nn.LayerNorm(pyramid_dim, eps=1e-5, **dd)
        self.attn = VSAttention(pyramid_dim, token_dim, num_heads, window_size, input_size,
                                attn_impl=attn_impl, **dd)
        self.norm2 = nn.LayerNorm(token_dim, eps=1e-5, **dd)
        self.mlp = Mlp(token_dim, token_dim, token_dim, act_layer=nn.GELU, **dd)
        mid = 2 * token_dim if wide_pcm else embed_dim
        self.PCM = _pcm(in_dim, mid, mid, token_dim, _stride_split(ratio), group, dd)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
        """Map ``(B, C_in, H, W)`` -> tokens ``(B, H/r * W/r, token_dim)`` and the new map size."""
        t = self.PRM(x)
        h, w = t.shape[2], t.shape[3]
        if self.pos is not None:
            t = t + self.pos(t)
        y = self.attn(self.norm1(_map_to_tokens(t)), h, w) + _map_to_tokens(self.PCM(x))
        y = y + self.mlp(self.norm2(y))
        return y, h, w


class NormalCell(nn.Module):
    """Normal cell (``layers.i.NC.j``): x + DP(VSA(LN(x + CPE(x)))) + DP(PCM(x)), then x + DP(MLP(LN(x)))."""

    def __init__(
            self,
            dim: int,
            *,
            num_heads: int,
            window_size: int,
            input_size: Tuple[int, int],
            mlp_ratio: float = 4.,
            group: int = 1,
            drop: float = 0.,
            drop_path: float = 0.,
            norm_layer: Optional[Any] = None,
            cpe: bool = False,
            attn_impl: str = 'reference',
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        norm_layer = norm_layer or _default_norm
        hidden = int(dim * mlp_ratio)
        self.pos = nn.Conv2d(dim, dim, 7, 1, 3, groups=dim, **dd) if cpe else None
        self.norm1 = norm_layer(dim, **dd)
        self.attn = VSAttention(dim, dim, num_heads, window_size, input_size, proj_drop=drop,
                                attn_impl=attn_impl, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, hidden, dim, act_layer=nn.GELU, drop=drop, **dd)
        self.PCM = _pcm(dim, hidden, dim, dim, (1, 1, 1), group, dd)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        xm = _tokens_to_map(x, h, w)
        u = x + _map_to_tokens(self.pos(xm)) if self.pos is not None else x    # CPE feeds attention only
        x = x + self.drop_path(self.attn(self.norm1(u), h, w)) + self.drop_path(_map_to_tokens(self.PCM(xm)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def _default_norm(dim: int, **kwargs: Any) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6, **kwargs)


class VSAStage(nn.Module):
    """A reduction cell and its normal cells (``layers.i``); maps in, maps out (NCHW)."""

    def __init__(self, reduction: ReductionCell, cells: List[NormalCell]) -> None:
        super().__init__()
        self.RC = reduction
        self.NC = nn.ModuleList(cells)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, h, w = self.RC(x)
        for cell in self.NC:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(cell, x, h, w, use_reentrant=False)
            else:
                x = cell(x, h, w)
        return _tokens_to_map(x, h, w)


# ----------------------------------------------------------------------------- model
class ViTAEv2VSA(nn.Module):
    """ViTAEv2-VSA (official class ``ViTAE_VSA_basic``); keywords as in the official constructor.

    Per-stage keywords take a scalar (repeated) or a list. ``qkv_bias``, ``qk_scale``,
    ``attn_drop_rate``, ``relative_pos`` and ``num_deform`` are accepted and, as in the official
    VSA models, have no effect. ``img_size`` is the size whose reference grids are built ahead;
    see the module docstring for other sizes. ``attn_impl`` picks the window-attention kernel.
    """

    def __init__(
            self,
            *,
            img_size: Union[int, Tuple[int, int]] = 224,
            in_chans: int = 3,
            stages: int = 4,
            embed_dims: Union[int, Sequence[int]] = 64,
            wide_pcm: Union[bool, Sequence[bool]] = True,
            token_dims: Union[int, Sequence[int]] = 64,
            downsample_ratios: Union[int, Sequence[int]] = (4, 2, 2, 2),
            kernel_size: Union[int, Sequence[int]] = (7, 3, 3, 3),
            RC_heads: Union[int, Sequence[int]] = (1, 1, 1, 1),
            NC_heads: Union[int, Sequence[int]] = 4,
            dilations: Sequence[Sequence[int]] = ((1, 2, 3, 4), (1, 2, 3), (1, 2), (1, 2)),
            RC_op: Union[str, Sequence[str]] = 'cat',
            RC_tokens_type: Union[str, Sequence[str]] = ('VSA', 'VSA', 'VSA', 'VSA'),
            NC_tokens_type: Union[str, Sequence[str]] = 'VSA',
            RC_group: Union[int, Sequence[int]] = (1, 1, 1, 1),
            NC_group: Union[int, Sequence[int]] = (1, 32, 64, 64),
            NC_depth: Union[int, Sequence[int]] = (2, 2, 6, 2),
            mlp_ratio: Union[float, Sequence[float]] = 4.,
            qkv_bias: bool = True,
            qk_scale: Optional[float] = None,
            drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer: Optional[Any] = None,
            num_classes: int = 1000,
            window_size: int = 7,
            relative_pos: bool = False,
            cpe: bool = False,
            num_deform: Optional[int] = None,
            global_pool: str = 'avg',
            attn_impl: str = 'reference',
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        n = stages
        if isinstance(token_dims, int):
            token_dims = [token_dims * 2 ** i for i in range(n)]
        if dilations and isinstance(dilations[0], int):
            dilations = [dilations] * n
        embed_dims = _per_stage(embed_dims, n, 'embed_dims')
        wide_pcm = _per_stage(wide_pcm, n, 'wide_pcm')
        token_dims = _per_stage(token_dims, n, 'token_dims')
        ratios = _per_stage(downsample_ratios, n, 'downsample_ratios')
        kernel_size = _per_stage(kernel_size, n, 'kernel_size')
        RC_heads = _per_stage(RC_heads, n, 'RC_heads')
        NC_heads = _per_stage(NC_heads, n, 'NC_heads')
        dilations = [list(d) for d in _per_stage(list(dilations), n, 'dilations')]
        RC_op = _per_stage(RC_op, n, 'RC_op')
        RC_tokens_type = _per_stage(RC_tokens_type, n, 'RC_tokens_type')
        NC_tokens_type = _per_stage(NC_tokens_type, n, 'NC_tokens_type')
        RC_group = _per_stage(RC_group, n, 'RC_group')
        NC_group = _per_stage(NC_group, n, 'NC_group')
        NC_depth = _per_stage(NC_depth, n, 'NC_depth')
        mlp_ratio = _per_stage(mlp_ratio, n, 'mlp_ratio')
        for i in range(n):
            if RC_tokens_type[i] not in TOKEN_TYPES or NC_tokens_type[i] not in TOKEN_TYPES:
                raise ValueError(f"stage {i}: token type {RC_tokens_type[i]!r}/{NC_tokens_type[i]!r} is not "
                                 f"implemented; every registered ViTAEv2-VSA model uses 'VSA'")
            if RC_op[i] != 'cat':
                raise ValueError(f"stage {i}: RC_op {RC_op[i]!r} is not implemented; use 'cat' (all variants)")
            r = ratios[i]
            if r < 2 or r & (r - 1) or r > 8:
                raise ValueError(f'stage {i}: downsample_ratio {r} is not implemented; use 2, 4 or 8')
        if global_pool not in ('avg', ''):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = to_2tuple(img_size)
        self.window_size = window_size
        self.global_pool = global_pool
        self.reductions = [math.prod(ratios[:i + 1]) for i in range(n)]
        self.num_features = self.head_hidden_size = token_dims[-1]
        self.drop_rate = drop_rate

        # Official drop-path slicing: stage i starts at NC_depth[i-1] (not the cumulative depth).
        dpr = torch.linspace(0, drop_path_rate, sum(NC_depth), device='cpu').tolist()
        size = self.img_size
        self.layers = nn.ModuleList()
        for i in range(n):
            size = (size[0] // ratios[i], size[1] // ratios[i])
            start = 0 if i == 0 else NC_depth[i - 1]
            reduction = ReductionCell(
                in_chans if i == 0 else token_dims[i - 1], embed_dims[i], token_dims[i], ratio=ratios[i],
                kernel_size=kernel_size[i], dilations=dilations[i], num_heads=RC_heads[i], window_size=window_size,
                input_size=size, group=RC_group[i], wide_pcm=wide_pcm[i], cpe=cpe, attn_impl=attn_impl, **dd)
            cells = [NormalCell(
                token_dims[i], num_heads=NC_heads[i], window_size=window_size, input_size=size,
                mlp_ratio=mlp_ratio[i], group=NC_group[i], drop=drop_rate, drop_path=dpr[start + j],
                norm_layer=norm_layer, cpe=cpe, attn_impl=attn_impl, **dd) for j in range(NC_depth[i])]
            self.layers.append(VSAStage(reduction, cells))
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(num_chs=token_dims[i], reduction=self.reductions[i], module=f'layers.{i}')
                             for i in range(n)]
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # Official: Linear and LayerNorm only; every conv keeps PyTorch's default init.
        if any(p.is_meta for p in m.parameters(recurse=False)):
            return                           # nothing to initialise (and slow on meta)
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # -- optimizer / training hints ---------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        # The official list names a cls_token this model does not have, so the official recipe
        # decays everything but 1-D parameters and biases (bias tables included).
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^layers\.0\.RC', blocks=r'^layers\.(\d+)' if coarse else [
            (r'^layers\.(\d+)\.RC', (0,)), (r'^layers\.(\d+)\.NC\.(\d+)', None)])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.layers:
            stage.grad_checkpointing = enable

    # -- head ------------------------------------------------------------------
    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            if global_pool not in ('avg', ''):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        ref = next(self.layers.parameters())
        if num_classes > 0:
            self.head = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
            self._init_weights(self.head)
        else:
            self.head = nn.Identity()
        self.head.train(self.training)

    # -- forward ---------------------------------------------------------------
    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (NCHW; ``token_dims[i]`` channels, stride ``reductions[i]``); the model
        has no norm, so ``norm`` changes nothing. ``indices``: None (all), last n, or a list."""
        if output_fmt != 'NCHW':
            raise ValueError(f"ViTAEv2-VSA returns NCHW stage maps; got output_fmt={output_fmt!r}")
        check_input_size(x, self.reductions[-1], self.window_size)
        take, max_index = feature_take_indices(len(self.layers), indices)
        stages = self.layers[:max_index + 1] if stop_early else self.layers
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the stages after the last wanted one (and the head) for a features-only model."""
        take, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[:max_index + 1]
        if prune_head:
            self.reset_classifier(0, '')
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage map ``(B, C, H/32, W/32)`` (there is no final norm)."""
        check_input_size(x, self.reductions[-1], self.window_size)
        for stage in self.layers:
            x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x.mean(dim=(2, 3))       # the official mean over the last stage's tokens
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ----------------------------------------------------------------------------- checkpoints
_CHECKPOINT_KEYS = ('model', 'state_dict', 'model_ema', 'state_dict_ema')


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: ViTAEv2VSA) -> Dict[str, torch.Tensor]:
    """Make an official or project checkpoint fit ``model`` (timm's ``pretrained_filter_fn``).

    Unwraps ``{'model': sd}`` / ``{'state_dict': sd}`` (the non-EMA weights first), strips
    ``module.`` and ``_orig_mod.`` prefixes, keeps the model's own ``relative_position_index``
    when the window differs, and resizes ``relative_position_bias_table`` to the model's window.
    """
    for key in _CHECKPOINT_KEYS:
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
            break
    own = model.state_dict()
    out = {}
    for name, value in state_dict.items():
        for prefix in ('module.', '_orig_mod.'):
            if name.startswith(prefix):
                name = name[len(prefix):]
        target = own.get(name)
        if target is not None and value.shape != target.shape:
            if name.endswith('relative_position_index'):
                value = target.clone()
            elif name.endswith('relative_position_bias_table'):
                from timm.layers import resize_rel_pos_bias_table
                side = int(round(target.shape[0] ** 0.5))
                value = resize_rel_pos_bias_table(value, new_window_size=((side + 1) // 2,) * 2,
                                                  new_bias_shape=tuple(target.shape))
        out[name] = value
    return out


# ----------------------------------------------------------------------------- variants
_COMMON = dict(stages=4, downsample_ratios=[4, 2, 2, 2], kernel_size=[7, 3, 3, 3],
               dilations=[[1, 2, 3, 4], [1, 2, 3], [1, 2], [1, 2]], mlp_ratio=4., cpe=True,
               RC_group=[1, 16, 32, 64], NC_group=[1, 32, 64, 128], window_size=7)
_S = dict(embed_dims=[64, 64, 128, 256], token_dims=[64, 128, 256, 512], NC_heads=[2, 4, 8, 16],
          NC_depth=[2, 2, 8, 2])
_B = dict(embed_dims=[128, 128, 256, 512], token_dims=[128, 256, 512, 1024], RC_heads=[4, 8, 16, 32],
          NC_heads=[4, 8, 16, 32], NC_depth=[2, 2, 12, 2], wide_pcm=True)

# The official builders' keywords (vsa_facts.md section 9); configs/vitaev2_vsa_*.yaml repeat them.
VSA_VARIANTS: Dict[str, Dict[str, Any]] = {
    'vitaev2_vsa_s': dict(_COMMON, **_S, wide_pcm=False, RC_heads=[2, 2, 4, 8]),
    'vitaev2_vsa_widepcm_s': dict(_COMMON, **_S, wide_pcm=True, RC_heads=[2, 4, 8, 16]),
    'vitaev2_vsa_widepcm_48m': dict(
        _COMMON, embed_dims=[96, 96, 192, 384], token_dims=[96, 192, 384, 768], wide_pcm=True,
        RC_heads=[3, 6, 12, 24], NC_heads=[3, 6, 12, 24], NC_depth=[2, 2, 11, 2]),
    'vitaev2_vsa_widepcm_b': dict(_COMMON, **_B),
    # Window 12: its last stage map must be >= 12, so it is a 384 model (at 224 the official one gives NaN).
    'vitaev2_vsa_widepcm_b_ws12': dict(_COMMON, **dict(_B, window_size=12), relative_pos=True, img_size=384),
}


def _cfg(size: int = 224, **kwargs: Any) -> Dict[str, Any]:
    unit = 32
    return dict(
        num_classes=1000, input_size=(3, size, size), min_input_size=(3, size, size),
        pool_size=(size // unit, size // unit), crop_pct=0.9, interpolation='bicubic',
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        first_conv=tuple(f'layers.0.RC.PRM.convs.{k}.0' for k in range(4)) + ('layers.0.RC.PCM.0',),
        classifier='head', paper_ids='arXiv:2204.08446', license='mit',
        origin_url='https://github.com/ViTAE-Transformer/ViTAE-VSA', **kwargs)


# No weights are published for these models: the cfgs name no url, hub id or file.
default_cfgs = generate_default_cfgs({
    'vitaev2_vsa_s': _cfg(),
    'vitaev2_vsa_widepcm_s': _cfg(),
    'vitaev2_vsa_widepcm_48m': _cfg(),
    'vitaev2_vsa_widepcm_b': _cfg(),
    'vitaev2_vsa_widepcm_b_ws12': _cfg(384),
})


def _check_pretrained(variant: str, kwargs: Dict[str, Any]) -> None:
    """pretrained=True needs a local file (or state dict): fail in one line instead of a random init."""
    from timm.models import resolve_pretrained_cfg
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                 pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
    if cfg.state_dict is not None or cfg.url or cfg.hf_hub_id:
        return
    if not cfg.file:
        raise RuntimeError(f"{variant}: no published weights; pass a local checkpoint with "
                           f"pretrained_cfg_overlay=dict(file='/path/to/checkpoint.pth')")
    import os
    if not os.path.isfile(cfg.file):
        raise FileNotFoundError(f"{variant}: pretrained checkpoint '{cfg.file}' not found")


def create_vitaev2_vsa(variant: str, pretrained: bool = False, **kwargs: Any) -> ViTAEv2VSA:
    """Build a registered variant (or ``variant``'s cfg with explicit keywords) through timm."""
    if pretrained:
        _check_pretrained(variant, kwargs)
    model_kwargs = dict(VSA_VARIANTS.get(variant, {}), **kwargs)
    return build_model_with_cfg(
        ViTAEv2VSA, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls='getter', out_indices=(0, 1, 2, 3)),
        **model_kwargs)


@register_model
def vitaev2_vsa_s(pretrained: bool = False, **kwargs: Any) -> ViTAEv2VSA:
    """ViTAEv2-VSA-S (official ``ViTAEv2_VSA_S``): 19.8M params; 82.7 top-1 (IN-1K, 224)."""
    return create_vitaev2_vsa('vitaev2_vsa_s', pretrained, **kwargs)


@register_model
def vitaev2_vsa_widepcm_s(pretrained: bool = False, **kwargs: Any) -> ViTAEv2VSA:
    """ViTAEv2-VSA-S with wide PCM (official ``ViTAEv2_VSA_widePCM_S``): 20.3M params."""
    return create_vitaev2_vsa('vitaev2_vsa_widepcm_s', pretrained, **kwargs)


@register_model
def vitaev2_vsa_widepcm_48m(pretrained: bool = False, **kwargs: Any) -> ViTAEv2VSA:
    """ViTAEv2-VSA-48M (official ``ViTAEv2_VSA_widePCM_48M``): 51.1M params; 83.9 top-1 (IN-1K, 224)."""
    return create_vitaev2_vsa('vitaev2_vsa_widepcm_48m', pretrained, **kwargs)


@register_model
def vitaev2_vsa_widepcm_b(pretrained: bool = False, **kwargs: Any) -> ViTAEv2VSA:
    """ViTAEv2-VSA-B (official ``ViTAEv2_VSA_widePCM_B``): 93.7M params."""
    return create_vitaev2_vsa('vitaev2_vsa_widepcm_b', pretrained, **kwargs)


@register_model
def vitaev2_vsa_widepcm_b_ws12(pretrained: bool = False, **kwargs: Any) -> ViTAEv2VSA:
    """ViTAEv2-VSA-B with window 12 (official ``ViTAEv2_VSA_widePCM_B_ws12``), a 384 model: 93.8M params."""
    return create_vitaev2_vsa('vitaev2_vsa_widepcm_b_ws12', pretrained, **kwargs)
