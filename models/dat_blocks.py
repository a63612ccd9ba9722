"""Building blocks of DAT / DAT++: norms, MLPs, layer scale and the attention blocks
L (window), S (shifted window), P (spatial reduction) and D (deformable).

Every attention block maps an NCHW tensor to an NCHW tensor of the same shape.
Parameter and buffer names follow the official checkpoints exactly.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models import register_notrace_module

from .attention_impl import check_attn_impl, record, sdpa, use_fused
from .sampling import grid_sample_bilinear

__all__ = ['POS_ENCODINGS', 'DEFORM_ARITHS', 'LayerNorm2d', 'LayerScale', 'TransformerMLP', 'TransformerMLPWithConv',
           'residual_depthwise_conv',
           'LocalAttention', 'ShiftWindowAttention', 'PyramidAttention', 'DAttention', 'shifted_window_mask',
           'window_relative_index', 'deformable_sdpa', 'sdpa_layout']

# Position encoding of a deformable block: none, the interpolated relative table ('table'), a
# depthwise conv on the queries ('dwc'), a table bound to the construction size ('fixed'), or the
# log-spaced continuous position bias MLP ('log_cpb').
POS_ENCODINGS = ('none', 'table', 'dwc', 'fixed', 'log_cpb')
# Deformable arithmetic: 'pp' is the DAT++ release, 'v1' the CVPR 2022 one.
DEFORM_ARITHS = ('pp', 'v1')


# ----------------------------------------------------------------------------- basic layers
class LayerNorm2d(nn.Module):
    """``nn.LayerNorm`` over the channel axis of an NCHW map (parameters under ``.norm``)."""

    def __init__(self, dim: int, *, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (CaiT), on NCHW maps."""

    def __init__(self, dim: int, *, init_value: float):
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(1, -1, 1, 1)


class TransformerMLP(nn.Module):
    """Plain MLP applied to every pixel: Linear -> GELU -> Linear, dropout after each linear."""

    def __init__(self, dim: int, *, expansion: int, drop: float = 0.0):
        super().__init__()
        hidden = dim * expansion
        self.chunk = nn.Sequential()
        self.chunk.add_module('linear1', nn.Linear(dim, hidden))
        self.chunk.add_module('act', nn.GELU())
        self.chunk.add_module('drop1', nn.Dropout(drop))
        self.chunk.add_module('linear2', nn.Linear(hidden, dim))
        self.chunk.add_module('drop2', nn.Dropout(drop))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.chunk(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def residual_depthwise_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``x + conv(x)`` for a depthwise, stride-1, same-size conv, as one conv with its centre tap
    raised by one: neither the sum nor a second gradient of ``x`` is materialised (equal up to
    rounding)."""
    kh, kw = conv.kernel_size
    if (conv.groups != conv.in_channels or conv.in_channels != conv.out_channels or conv.stride != (1, 1)
            or conv.dilation != (1, 1) or conv.padding != (kh // 2, kw // 2) or kh % 2 == 0 or kw % 2 == 0
            or conv.padding_mode != 'zeros'):
        return x + conv(x)
    # A one at the centre of each channel's kernel, built without item assignment (FX-traceable).
    identity = F.pad(conv.weight.new_ones(conv.out_channels, 1, 1, 1), (kw // 2, kw // 2, kh // 2, kh // 2))
    return F.conv2d(x, conv.weight + identity, conv.bias, padding=conv.padding, groups=conv.groups)


class TransformerMLPWithConv(nn.Module):
    """MLP of 1x1 convs with a residual 3x3 depthwise conv in the hidden layer (DAT++ "DWC MLP")."""

    def __init__(self, dim: int, *, expansion: int, drop: float = 0.0):
        super().__init__()
        hidden = dim * expansion
        self.linear1 = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.Dropout(drop))
        self.dwc = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act = nn.GELU()
        self.linear2 = nn.Sequential(nn.Conv2d(hidden, dim, 1), nn.Dropout(drop))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear1(x)
        x = self.act(residual_depthwise_conv(self.dwc, x))
        return self.linear2(x)


# ----------------------------------------------------------------------------- window attention
def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, heads, N, C // heads); head h owns channels [h*c, (h+1)*c)."""
    b, n, c = t.shape
    return t.view(b, n, heads, c // heads).transpose(1, 2)


def window_relative_index(window: int) -> torch.Tensor:
    """Swin's relative position index for a ``window x window`` window: (w^2, w^2) into a (2w-1)^2 table."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing='ij')).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)   # query minus key
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def _region_labels(length: int, window: int, shift: int, device: Optional[torch.device]) -> torch.Tensor:
    """Swin's three regions along one axis of the rolled map: [0, L-w), [L-w, L-shift), [L-shift, L)."""
    pos = torch.arange(length, device=device)
    return (pos >= length - window).long() + (pos >= length - shift).long()


def shifted_window_mask(height: int, width: int, window: int, shift: int,
                        device: Optional[torch.device] = None) -> torch.Tensor:
    """(nW, w^2, w^2) additive mask, -100 between tokens of different regions after the roll.

    Plain tensor arithmetic (no Python loops, no cache), so it can be built inside a compiled graph.
    """
    labels = (_region_labels(height, window, shift, device)[:, None] * 3
              + _region_labels(width, window, shift, device)[None, :]).float()
    win = labels.view(height // window, window, width // window, window).permute(0, 2, 1, 3)
    win = win.reshape(-1, window * window)
    different = win[:, None, :] != win[:, :, None]
    return torch.zeros(different.shape, device=device).masked_fill(different, -100.0)


@register_notrace_module   # padding sizes depend on the input shape: a leaf for FX tracing
class LocalAttention(nn.Module):
    """L: multi-head self-attention in non-overlapping ``window x window`` windows (Swin W-MSA).

    Maps that are not a multiple of the window are zero-padded at the bottom/right (after the
    block's norm, as Swin does) and cropped back; padded tokens take part as keys.
    """

    def __init__(self, dim: int, *, heads: int, window_size: int, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f'window attention needs dim ({dim}) divisible by heads ({heads})')
        self.heads = heads
        self.window_size = window_size
        self.scale = (dim // heads) ** -0.5
        self.proj_qkv = nn.Linear(dim, 3 * dim)
        self.proj_out = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, heads))
        trunc_normal_(self.relative_position_bias_table, std=0.01)
        self.register_buffer('relative_position_index', window_relative_index(window_size))

    def extra_repr(self) -> str:
        return f'heads={self.heads}, window_size={self.window_size}'

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        ws = self.window_size
        pad_h, pad_w = (-x.shape[-2]) % ws, (-x.shape[-1]) % ws
        return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x

    def _windows(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        ws = self.window_size
        x = x.view(b, c, h // ws, ws, w // ws, ws).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(-1, ws * ws, c)

    def _merge(self, win: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
        ws = self.window_size
        c = win.shape[-1]
        x = win.view(b, h // ws, w // ws, ws, ws, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, h, w)

    def _attend(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Window attention on a map whose sides are multiples of the window."""
        b, c, h, w = x.shape
        tokens = self._windows(x)                                        # (B*nW, N, C)
        q, k, v = self.proj_qkv(tokens).chunk(3, dim=-1)
        q, k, v = (_split_heads(t, self.heads) for t in (q, k, v))       # (B*nW, h, N, c)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        n = tokens.shape[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(n, n, -1).permute(2, 0, 1)
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.view(-1, nw, self.heads, n, n) + mask[None, :, None].to(attn.dtype)).view(-1, self.heads, n, n)
        attn = self.attn_drop(attn.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(-1, n, c)
        out = self.proj_drop(self.proj_out(out))
        return self._merge(out, b, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        return self._attend(self._pad(x), None)[..., :h, :w]


@register_notrace_module
class ShiftWindowAttention(LocalAttention):
    """S: window attention on a map rolled by ``ceil(window/2)`` (4 for window 7), with Swin's region mask.

    The mask of the construction size is the official buffer ``attn_mask``; other (padded) sizes
    build theirs from the same rule.
    """

    def __init__(self, dim: int, *, heads: int, window_size: int, fmap_size: int, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__(dim, heads=heads, window_size=window_size, attn_drop=attn_drop, proj_drop=proj_drop)
        self.shift = math.ceil(window_size / 2)
        self.fmap_size = fmap_size
        self.mask_size = fmap_size + (-fmap_size) % window_size     # the padded construction size
        self.register_buffer('attn_mask', shifted_window_mask(self.mask_size, self.mask_size, window_size, self.shift))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = self._pad(x)
        hp, wp = x.shape[-2:]
        if hp == wp == self.mask_size:
            mask = self.attn_mask
        else:
            mask = shifted_window_mask(hp, wp, self.window_size, self.shift, device=x.device)
        x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(2, 3))
        x = self._attend(x, mask)
        return torch.roll(x, shifts=(self.shift, self.shift), dims=(2, 3))[..., :h, :w]


# ----------------------------------------------------------------------------- spatial-reduction attention
class PyramidAttention(nn.Module):
    """P: PVT spatial-reduction attention; keys/values from a map downsampled by ``sr_ratio``."""

    def __init__(self, dim: int, *, heads: int, sr_ratio: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f'spatial-reduction attention needs dim ({dim}) divisible by heads ({heads})')
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim ** -0.5
        self.q = nn.Conv2d(dim, dim, 1)
        self.kv = nn.Conv2d(dim, 2 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.proj_ds = nn.Sequential(nn.Conv2d(dim, dim, sr_ratio, sr_ratio), LayerNorm2d(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.q(x).reshape(b * self.heads, self.head_dim, h * w)
        source = self.proj_ds(x) if self.sr_ratio > 1 else x
        k, v = self.kv(source).chunk(2, dim=1)
        k = k.reshape(b * self.heads, self.head_dim, -1)
        v = v.reshape(b * self.heads, self.head_dim, -1)
        attn = torch.einsum('bcm,bcn->bmn', q, k) * self.scale
        attn = self.attn_drop(attn.softmax(dim=2))
        out = torch.einsum('bmn,bcn->bcm', attn, v).reshape(b, c, h, w)
        return self.proj_drop(self.proj(out))


# ----------------------------------------------------------------------------- deformable attention
def _centres(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Pixel centres 0.5, 1.5, ..., n-0.5."""
    return torch.linspace(0.5, n - 0.5, n, dtype=dtype, device=device)


def sdpa_layout(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B*heads, c, N) channel-major -> (B, heads, N, c) contiguous: the layout SDPA's flash,
    memory-efficient and cuDNN kernels accept (a transposed view, last stride != 1, sends every
    backend but math away)."""
    bh, c, n = t.shape
    return t.reshape(bh // heads, heads, c, n).transpose(-1, -2).contiguous()


def deformable_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor], heads: int,
                    scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """The deformable attention core through one fused SDPA kernel: q ``(B*heads, c, HW)``, k, v
    ``(B*heads, c, Ns)``, bias ``(B or 1, heads, HW, Ns)`` or None -> ``(B*heads, c, HW)``."""
    out = sdpa(sdpa_layout(q, heads), sdpa_layout(k, heads), sdpa_layout(v, heads),
               attn_mask=bias, dropout_p=dropout_p, scale=scale)
    return out.transpose(-1, -2).reshape(q.shape)


def deformable_bias_kind(bias: Optional[torch.Tensor]) -> int:
    """0: no bias; 1: one bias shared by the batch (the fixed table); 2: a bias per image."""
    return 0 if bias is None else (1 if bias.shape[0] == 1 else 2)


@register_notrace_module   # the key grid size (and its checks) depend on the input shape
class DAttention(nn.Module):
    """D: deformable multi-head attention (DAT / DAT++).

    Queries are every pixel; keys and values are sampled from the input at ``Hk x Wk``
    deformed points per group (``groups`` offset groups share the heads evenly).
    ``arith='pp'`` reproduces the DAT++ release, ``'v1'`` the CVPR 2022 release: they
    differ only in how reference points, offset ranges and the query grid are computed.
    ``no_off`` switches offsets off (keys are average-pooled); ``pos_enc`` is one of
    :data:`POS_ENCODINGS` and needs offsets on.
    """

    def __init__(self, dim: int, *, heads: int, groups: int, fmap_size: int, stride: int,
                 offset_range_factor: float, ksize: int, pos_enc: str = 'none', no_off: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, arith: str = 'pp', attn_impl: str = 'auto'):
        super().__init__()
        self.attn_impl = check_attn_impl(attn_impl)
        if dim % heads or heads % groups:
            raise ValueError(f'deformable attention needs dim ({dim}) divisible by heads ({heads}) '
                             f'and heads divisible by groups ({groups})')
        if arith not in DEFORM_ARITHS:
            raise ValueError(f"deform_arith must be one of {', '.join(DEFORM_ARITHS)}, got {arith!r}")
        if pos_enc not in POS_ENCODINGS:
            raise ValueError(f"pos_enc must be one of {', '.join(POS_ENCODINGS)}, got {pos_enc!r}")
        if no_off and pos_enc != 'none':
            raise ValueError(f"pos_enc {pos_enc!r} needs offsets; with no_off use pos_enc 'none'")
        self.dim, self.heads, self.groups = dim, heads, groups
        self.head_dim = dim // heads
        self.group_dim = dim // groups
        self.group_heads = heads // groups
        self.scale = self.head_dim ** -0.5
        self.fmap_size = fmap_size
        self.kv_size = fmap_size // stride
        self.stride = stride
        self.offset_range_factor = offset_range_factor
        self.pos_enc = pos_enc
        self.no_off = no_off
        self.arith = arith

        cg = self.group_dim
        pad = ksize // 2 if ksize != stride else 0
        self.conv_offset = nn.Sequential(
            nn.Conv2d(cg, cg, ksize, stride, pad, groups=cg),
            LayerNorm2d(cg),
            nn.GELU(),
            nn.Conv2d(cg, 2, 1, 1, 0, bias=False),
        )
        if no_off:
            self.conv_offset.requires_grad_(False)
        self.proj_q = nn.Conv2d(dim, dim, 1)
        self.proj_k = nn.Conv2d(dim, dim, 1)
        self.proj_v = nn.Conv2d(dim, dim, 1)
        self.proj_out = nn.Conv2d(dim, dim, 1)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)

        # One name for every kind, as in the official checkpoints.
        self.rpe_table: Optional[nn.Module | nn.Parameter] = None
        if pos_enc == 'dwc':
            self.rpe_table = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
        elif pos_enc == 'fixed':
            self.rpe_table = nn.Parameter(torch.zeros(heads, fmap_size ** 2, self.kv_size ** 2))
            trunc_normal_(self.rpe_table, std=0.01)
        elif pos_enc == 'log_cpb':
            self.rpe_table = nn.Sequential(
                nn.Linear(2, 32, bias=True), nn.ReLU(inplace=True), nn.Linear(32, self.group_heads, bias=False))
        elif pos_enc == 'table':
            self.rpe_table = nn.Parameter(torch.zeros(heads, 2 * fmap_size - 1, 2 * fmap_size - 1))
            trunc_normal_(self.rpe_table, std=0.01)

    def extra_repr(self) -> str:
        return (f'heads={self.heads}, groups={self.groups}, fmap_size={self.fmap_size}, stride={self.stride}, '
                f'offset_range_factor={self.offset_range_factor}, pos_enc={self.pos_enc!r}, no_off={self.no_off}, '
                f'arith={self.arith!r}, attn_impl={self.attn_impl!r}')

    # -- geometry ---------------------------------------------------------------
    def _reference_points(self, hk: int, wk: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """(Hk, Wk, 2) key reference points in (y, x), normalised to [-1, 1]-ish coordinates."""
        if self.arith == 'pp' and (hk < 2 or wk < 2):
            raise ValueError(
                f'deformable attention (stride {self.stride}) got a {hk}x{wk} key grid; DAT++ reference points '
                f'need at least 2 keys per axis: use a larger input or a smaller stride for this stage')
        denom = (hk - 1, wk - 1) if self.arith == 'pp' else (hk, wk)
        ys = _centres(hk, dtype, device) / denom[0] * 2 - 1
        xs = _centres(wk, dtype, device) / denom[1] * 2 - 1
        return torch.stack(torch.meshgrid(ys, xs, indexing='ij'), dim=-1)

    def _query_grid(self, h: int, w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """(H, W, 2) normalised query positions in (y, x)."""
        if self.arith == 'pp':
            ys = torch.arange(h, dtype=dtype, device=device) / max(h - 1, 1) * 2 - 1
            xs = torch.arange(w, dtype=dtype, device=device) / max(w - 1, 1) * 2 - 1
        else:
            ys = _centres(h, dtype, device) / h * 2 - 1
            xs = _centres(w, dtype, device) / w * 2 - 1
        return torch.stack(torch.meshgrid(ys, xs, indexing='ij'), dim=-1)

    def _sample_positions(self, offset: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """(B*g, Hk, Wk, 2) deformed sampling positions from raw offsets ``(B*g, 2, Hk, Wk)``."""
        hk, wk = offset.shape[-2:]
        factor = self.offset_range_factor
        if self.no_off:
            offset = torch.zeros_like(offset)
        elif factor >= 0:
            span = (1.0 / (hk - 1.0), 1.0 / (wk - 1.0)) if self.arith == 'pp' else (1.0 / hk, 1.0 / wk)
            offset = offset.tanh() * offset.new_tensor(span).view(1, 2, 1, 1) * factor
        pos = offset.permute(0, 2, 3, 1) + ref
        if factor >= 0:
            return pos
        return pos.clamp(-1.0, 1.0) if self.arith == 'pp' else pos.tanh()

    # -- forward ---------------------------------------------------------------
    def forward_with_points(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``(out, pos, ref)``; ``pos``/``ref`` are ``(B, groups, Hk, Wk, 2)`` in (y, x), [-1, 1]."""
        b, c, h, w = x.shape
        g, heads = self.groups, self.heads
        dtype, device = x.dtype, x.device

        q = self.proj_q(x).contiguous()        # NCHW once: both head/group splits below are views
        # The strided depthwise conv of the offset network runs 2-4x faster channels-last on CPU.
        offset = self.conv_offset(q.reshape(b * g, self.group_dim, h, w).contiguous(
            memory_format=torch.channels_last))                                 # (B*g, 2, Hk, Wk)
        hk, wk = offset.shape[-2:]
        n_keys = hk * wk
        ref = self._reference_points(hk, wk, dtype, device)
        pos = self._sample_positions(offset, ref)

        if self.no_off:
            sampled = F.avg_pool2d(x, kernel_size=self.stride, stride=self.stride)
            if sampled.shape[-2:] != (hk, wk):
                raise ValueError(f'no_off deformable attention: {h}x{w} map pooled by stride {self.stride} gives '
                                 f'{tuple(sampled.shape[-2:])}, offsets give {hk}x{wk}; use a map divisible by the stride')
        else:
            sampled = grid_sample_bilinear(x.reshape(b * g, self.group_dim, h, w), pos.flip(-1))
        sampled = sampled.reshape(b, c, 1, n_keys)

        q = q.reshape(b * heads, self.head_dim, h * w)
        k = self.proj_k(sampled).reshape(b * heads, self.head_dim, n_keys)
        v = self.proj_v(sampled).reshape(b * heads, self.head_dim, n_keys)

        lepe = bias = None
        if self.pos_enc == 'dwc':
            lepe = self.rpe_table(q.reshape(b, c, h, w)).reshape(b * heads, self.head_dim, h * w)
        elif self.pos_enc != 'none':
            bias = self._position_bias(pos, b, h, w)                            # (B or 1, heads, HW, Ns)

        fused = use_fused(self.attn_impl, x)
        if fused and record('deformable', 'sdpa', (heads, h * w, n_keys, self.head_dim, deformable_bias_kind(bias)), q):
            fused = False
        if fused:
            out = deformable_sdpa(q, k, v, bias, heads, self.scale, self.attn_drop.p if self.training else 0.0)
        else:
            attn = torch.einsum('bcm,bcn->bmn', q, k) * self.scale              # (B*heads, HW, Ns)
            if bias is not None:
                attn = (attn.view(b, heads, h * w, n_keys) + bias).view(b * heads, h * w, n_keys)
            attn = self.attn_drop(attn.softmax(dim=2))
            out = torch.einsum('bmn,bcn->bcm', attn, v)
        if lepe is not None:
            out = out + lepe
        out = self.proj_drop(self.proj_out(out.reshape(b, c, h, w)))
        ref = ref.expand(b, g, hk, wk, 2)
        return out, pos.reshape(b, g, hk, wk, 2), ref

    def _position_bias(self, pos: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
        """Additive logit bias from the fixed, log-CPB or interpolated table.

        ``(1, heads, HW, Ns)`` for the fixed table (shared by the batch), else ``(B, heads, HW, Ns)``.
        """
        g, hg, heads = self.groups, self.group_heads, self.heads
        n_keys = pos.shape[1] * pos.shape[2]
        if self.pos_enc == 'fixed':
            if self.rpe_table.shape[1:] != (h * w, n_keys):
                raise ValueError(f'deformable attention with a fixed position table was built for a '
                                 f'{self.fmap_size}x{self.fmap_size} map, got {h}x{w}; use the input size the '
                                 f'model was built for (img_size) or another pos_enc')
            return self.rpe_table.view(1, heads, h * w, n_keys)
        query = self._query_grid(h, w, pos.dtype, pos.device)                  # (H, W, 2)
        if self.pos_enc == 'log_cpb':
            d = (query.reshape(1, h * w, 1, 2) - pos.reshape(b * g, 1, n_keys, 2)) * 4.0   # (B*g, HW, Ns, 2)
            d = torch.sign(d) * torch.log2(d.abs() + 1.0) / math.log2(8.0)
            bias = self.rpe_table(d)                                            # (B*g, HW, Ns, hg)
            return bias.view(b, g, h * w, n_keys, hg).permute(0, 1, 4, 2, 3).reshape(b, heads, h * w, n_keys)
        # Sample each group's table at every displacement of the batch at once: the table is the
        # grid_sample input (batch = groups) and the batch moves into the grid, so it is never expanded.
        # The halving and the (y, x) -> (x, y) swap act on the small operands (exact: halving is a
        # power of two), so the (g, B, HW, Ns, 2) grid is made by one subtraction, already in place.
        table = self.rpe_table.view(g, hg, *self.rpe_table.shape[-2:])
        query_xy = (query.flip(-1) * 0.5).reshape(1, 1, h * w, 1, 2)
        keys_xy = (pos.flip(-1) * 0.5).reshape(b, g, 1, n_keys, 2).transpose(0, 1).contiguous()
        grid = (query_xy - keys_xy).reshape(g, b * h * w, n_keys, 2)
        bias = grid_sample_bilinear(table, grid)
        return bias.view(g, hg, b, h * w, n_keys).permute(2, 0, 1, 3, 4).reshape(b, heads, h * w, n_keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_points(x)[0]
