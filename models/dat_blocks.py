"""Building blocks of DAT / DAT++: norms, MLPs, layer scale and the attention blocks
L (window), S (shifted window), P (spatial reduction) and D (deformable).

Every attention block maps an NCHW tensor to an NCHW tensor of the same shape.
Parameter and buffer names follow the official checkpoints exactly.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_


# ----------------------------------------------------------------------------- basic layers
class LayerNorm2d(nn.Module):
    """``nn.LayerNorm`` over the channel axis of an NCHW map (parameters under ``.norm``)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (CaiT), on NCHW maps."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(1, -1, 1, 1)


class TransformerMLP(nn.Module):
    """Plain MLP applied to every pixel: Linear -> GELU -> Linear, dropout after each linear."""

    def __init__(self, dim: int, expansion: int, drop: float = 0.0):
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


class TransformerMLPWithConv(nn.Module):
    """MLP of 1x1 convs with a residual 3x3 depthwise conv in the hidden layer (DAT++ "DWC MLP")."""

    def __init__(self, dim: int, expansion: int, drop: float = 0.0):
        super().__init__()
        hidden = dim * expansion
        self.linear1 = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.Dropout(drop))
        self.dwc = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act = nn.GELU()
        self.linear2 = nn.Sequential(nn.Conv2d(hidden, dim, 1), nn.Dropout(drop))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear1(x)
        x = self.act(x + self.dwc(x))
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


@lru_cache(maxsize=32)
def _shift_mask_cpu(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    regions = torch.zeros(height, width)
    label = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            regions[hs, ws] = label
            label += 1
    win = regions.view(height // window, window, width // window, window).permute(0, 2, 1, 3)
    win = win.reshape(-1, window * window)
    mask = win[:, None, :] - win[:, :, None]
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def shifted_window_mask(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    """(nW, w^2, w^2) additive mask, -100 between tokens of different regions after the roll."""
    return _shift_mask_cpu(height, width, window, shift).clone()


class LocalAttention(nn.Module):
    """L: multi-head self-attention in non-overlapping ``window x window`` windows (Swin W-MSA)."""

    def __init__(self, dim: int, heads: int, window_size: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        assert dim % heads == 0, f'dim {dim} must be divisible by heads {heads}'
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

    def _check_size(self, h: int, w: int) -> None:
        ws = self.window_size
        if h % ws or w % ws:
            raise ValueError(
                f'window attention needs feature maps divisible by window_size={ws}, got {h}x{w}; '
                f'choose an input size whose stage maps are multiples of {ws} (e.g. 224 for window 7)')

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
        b, c, h, w = x.shape
        self._check_size(h, w)
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
        return self._attend(x, None)


class ShiftWindowAttention(LocalAttention):
    """S: window attention on a map rolled by ``ceil(window/2)`` (4 for window 7), with Swin's region mask."""

    def __init__(self, dim: int, heads: int, window_size: int, fmap_size: int,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__(dim, heads, window_size, attn_drop, proj_drop)
        self.shift = math.ceil(window_size / 2)
        self.fmap_size = fmap_size
        self.register_buffer('attn_mask', shifted_window_mask(fmap_size, fmap_size, window_size, self.shift))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        self._check_size(h, w)
        if (h, w) == (self.fmap_size, self.fmap_size):
            mask = self.attn_mask
        else:   # other input sizes: the same mask rule, rebuilt for this map
            mask = shifted_window_mask(h, w, self.window_size, self.shift).to(x.device)
        x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(2, 3))
        x = self._attend(x, mask)
        return torch.roll(x, shifts=(self.shift, self.shift), dims=(2, 3))


# ----------------------------------------------------------------------------- spatial-reduction attention
class PyramidAttention(nn.Module):
    """P: PVT spatial-reduction attention; keys/values from a map downsampled by ``sr_ratio``."""

    def __init__(self, dim: int, heads: int, sr_ratio: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        assert dim % heads == 0, f'dim {dim} must be divisible by heads {heads}'
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


class DAttention(nn.Module):
    """D: deformable multi-head attention (DAT / DAT++).

    Queries are every pixel; keys and values are sampled from the input at ``Hk x Wk``
    deformed points per group (``groups`` offset groups share the heads evenly).
    ``arith='pp'`` reproduces the DAT++ release, ``'v1'`` the CVPR 2022 release: they
    differ only in how reference points, offset ranges and the query grid are computed.
    """

    def __init__(self, dim: int, heads: int, groups: int, fmap_size: int, stride: int,
                 offset_range_factor: float, use_pe: bool, dwc_pe: bool, no_off: bool,
                 fixed_pe: bool, ksize: int, log_cpb: bool, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, arith: str = 'pp', attn_impl: str = 'auto'):
        super().__init__()
        if attn_impl not in ('auto', 'reference', 'fused'):
            raise ValueError(f"attn_impl must be 'auto', 'reference' or 'fused', got {attn_impl!r}")
        self.attn_impl = attn_impl
        if dim % heads or heads % groups:
            raise ValueError(f'deformable attention needs dim ({dim}) divisible by heads ({heads}) '
                             f'and heads divisible by groups ({groups})')
        if arith not in ('pp', 'v1'):
            raise ValueError(f"deform_arith must be 'pp' or 'v1', got {arith!r}")
        self.dim, self.heads, self.groups = dim, heads, groups
        self.head_dim = dim // heads
        self.group_dim = dim // groups
        self.group_heads = heads // groups
        self.scale = self.head_dim ** -0.5
        self.fmap_size = fmap_size
        self.kv_size = fmap_size // stride
        self.stride = stride
        self.offset_range_factor = offset_range_factor
        self.use_pe, self.dwc_pe, self.no_off = use_pe, dwc_pe, no_off
        self.fixed_pe, self.log_cpb = fixed_pe, log_cpb
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
        self.attn_drop_p = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

        self.rpe_table: Optional[nn.Module | nn.Parameter] = None
        if use_pe and not no_off:
            if dwc_pe:
                self.rpe_table = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
            elif fixed_pe:
                self.rpe_table = nn.Parameter(torch.zeros(heads, fmap_size ** 2, self.kv_size ** 2))
                trunc_normal_(self.rpe_table, std=0.01)
            elif log_cpb:
                self.rpe_table = nn.Sequential(
                    nn.Linear(2, 32, bias=True), nn.ReLU(inplace=True), nn.Linear(32, self.group_heads, bias=False))
            else:
                self.rpe_table = nn.Parameter(torch.zeros(heads, 2 * fmap_size - 1, 2 * fmap_size - 1))
                trunc_normal_(self.rpe_table, std=0.01)

    # -- geometry ---------------------------------------------------------------
    def _reference_points(self, hk: int, wk: int, n: int, dtype, device) -> torch.Tensor:
        """(n, Hk, Wk, 2) key reference points in (y, x), normalised to [-1, 1]-ish coordinates."""
        if self.arith == 'pp' and (hk < 2 or wk < 2):
            raise ValueError(
                f'deformable attention (stride {self.stride}) got a {hk}x{wk} key grid; DAT++ reference points '
                f'need at least 2 keys per axis: use a larger input or a smaller stride for this stage')
        denom = (hk - 1, wk - 1) if self.arith == 'pp' else (hk, wk)
        ys = _centres(hk, dtype, device) / denom[0] * 2 - 1
        xs = _centres(wk, dtype, device) / denom[1] * 2 - 1
        ref = torch.stack(torch.meshgrid(ys, xs, indexing='ij'), dim=-1)
        return ref[None].expand(n, -1, -1, -1)

    def _query_grid(self, h: int, w: int, n: int, dtype, device) -> torch.Tensor:
        """(n, H, W, 2) normalised query positions in (y, x)."""
        if self.arith == 'pp':
            ys = torch.arange(h, dtype=dtype, device=device) / max(h - 1, 1) * 2 - 1
            xs = torch.arange(w, dtype=dtype, device=device) / max(w - 1, 1) * 2 - 1
        else:
            ys = _centres(h, dtype, device) / h * 2 - 1
            xs = _centres(w, dtype, device) / w * 2 - 1
        grid = torch.stack(torch.meshgrid(ys, xs, indexing='ij'), dim=-1)
        return grid[None].expand(n, -1, -1, -1)

    def _sample_positions(self, offset: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """Deformed sampling positions from raw offsets ``(B*g, 2, Hk, Wk)`` and reference points."""
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
        g, hg, heads = self.groups, self.group_heads, self.heads
        dtype, device = x.dtype, x.device

        q = self.proj_q(x)
        offset = self.conv_offset(q.reshape(b * g, self.group_dim, h, w))      # (B*g, 2, Hk, Wk)
        hk, wk = offset.shape[-2:]
        n_keys = hk * wk
        ref = self._reference_points(hk, wk, b * g, dtype, device)
        pos = self._sample_positions(offset, ref)

        if self.no_off:
            sampled = F.avg_pool2d(x, kernel_size=self.stride, stride=self.stride)
            if sampled.shape[-2:] != (hk, wk):
                raise ValueError(f'no_off deformable attention: {h}x{w} map pooled by stride {self.stride} gives '
                                 f'{tuple(sampled.shape[-2:])}, offsets give {hk}x{wk}; use a map divisible by the stride')
        else:
            sampled = F.grid_sample(x.reshape(b * g, self.group_dim, h, w), pos[..., (1, 0)],
                                    mode='bilinear', padding_mode='zeros', align_corners=True)
        sampled = sampled.reshape(b, c, 1, n_keys)

        q = q.reshape(b * heads, self.head_dim, h * w)
        k = self.proj_k(sampled).reshape(b * heads, self.head_dim, n_keys)
        v = self.proj_v(sampled).reshape(b * heads, self.head_dim, n_keys)

        lepe = bias = None
        if self.rpe_table is not None:
            if self.dwc_pe:
                lepe = self.rpe_table(q.reshape(b, c, h, w)).reshape(b * heads, self.head_dim, h * w)
            else:
                bias = self._position_bias(pos, b, h, w, n_keys)               # (B*heads, HW, Ns)

        if self._use_fused(x):
            # One fused kernel (flash / memory-efficient / math by backend) instead of
            # materialising logits, softmax and weights separately; same arithmetic.
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias,
                dropout_p=self.attn_drop_p if self.training else 0.0, scale=self.scale).transpose(1, 2)
        else:
            attn = torch.einsum('bcm,bcn->bmn', q, k) * self.scale              # (B*heads, HW, Ns)
            if bias is not None:
                attn = attn + bias
            attn = self.attn_drop(attn.softmax(dim=2))
            out = torch.einsum('bmn,bcn->bcm', attn, v)
        if lepe is not None:
            out = out + lepe
        out = self.proj_drop(self.proj_out(out.reshape(b, c, h, w)))
        return out, pos.reshape(b, g, hk, wk, 2), ref.reshape(b, g, hk, wk, 2)

    def _use_fused(self, x: torch.Tensor) -> bool:
        if self.attn_impl == 'auto':
            return x.is_cuda
        return self.attn_impl == 'fused'

    def _position_bias(self, pos: torch.Tensor, b: int, h: int, w: int, n_keys: int) -> torch.Tensor:
        """Additive logit bias (B*heads, HW, Ns) from the fixed, log-CPB or interpolated table."""
        g, hg, heads = self.groups, self.group_heads, self.heads
        if self.fixed_pe:
            return self.rpe_table[None].expand(b, -1, -1, -1).reshape(b * heads, h * w, n_keys)
        grid = self._query_grid(h, w, b * g, pos.dtype, pos.device).reshape(b * g, h * w, 1, 2)
        disp = grid - pos.reshape(b * g, 1, n_keys, 2)                          # (B*g, HW, Ns, 2)
        if self.log_cpb:
            d = disp * 4.0
            d = torch.sign(d) * torch.log2(d.abs() + 1.0) / math.log2(8.0)
            bias = self.rpe_table(d)                                            # (B*g, HW, Ns, hg)
            return bias.permute(0, 3, 1, 2).reshape(b * heads, h * w, n_keys)
        table = self.rpe_table[None].expand(b, -1, -1, -1).reshape(b * g, hg, *self.rpe_table.shape[-2:])
        bias = F.grid_sample(table, (disp * 0.5)[..., (1, 0)], mode='bilinear', padding_mode='zeros',
                             align_corners=True)
        return bias.reshape(b * heads, h * w, n_keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_points(x)[0]
