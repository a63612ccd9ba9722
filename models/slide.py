"""Slide attention ("E" blocks of DAT++), after Slide-Transformer (Pan et al., 2023).

Each pixel attends to its ``ka x ka`` neighbourhood on a channel-reduced
projection (``Cr = dim / dim_reduction``, ``cr = Cr / num_heads`` per head).
The neighbourhood is gathered by depthwise convolutions instead of unfolding:
``dep_conv`` holds a frozen one-hot shift kernel (output channel ``c*ka*ka + t``
copies input channel ``c`` at tap ``t = row*ka + col``, i.e. at offset
``(row - ka//2, col - ka//2)``; zero padding outside the map) and
``dep_conv1`` is a trainable kernel of the same shape that deforms the shift.
Both are applied to the keys and to the values and their outputs added.

For head ``h``, pixel ``p`` and tap ``t``:

    logit[t] = sum_c (q[c] * scale) * (k'[c, t] + rpb[h, t])
    out[c]   = sum_t softmax_t(logit)[t] * v'[c, t]

The output ``(B, Cr, H, W)`` (channel ``h*cr + c``) is mapped back to ``dim``
by ``proj``. Note that ``scale`` uses the full head width ``dim / num_heads``,
not the reduced one, and that the bias table is added to the keys.
"""
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

__all__ = ['SlideAttention']


class SlideAttention(nn.Module):
    """Local attention over ``ka x ka`` windows built from shifted depthwise convs.

    Args:
        dim: channels of the input and output map.
        num_heads: attention heads (``heads[i]`` of the DAT stage).
        ka: odd window size (the DAT stage uses 3).
        qkv_bias: bias of the ``qkv`` projection.
        qk_scale: override of the logit scale, default ``(dim // num_heads) ** -0.5``.
        attn_drop: dropout on the attention weights.
        proj_drop: dropout after ``proj``.
        dim_reduction: channel reduction of the attention path.
        rpb: learn ``relative_position_bias_table`` (1, heads, 1, ka*ka, 1, 1).

    Input and output are NCHW maps of shape ``(B, dim, H, W)``.
    """

    def __init__(self, dim: int, *, num_heads: int, ka: int = 3, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, attn_drop: float = 0., proj_drop: float = 0.,
                 dim_reduction: int = 4, rpb: bool = True):
        super().__init__()
        if num_heads < 1 or dim_reduction < 1 or dim % (dim_reduction * num_heads) != 0:
            raise ValueError(f'SlideAttention: dim {dim} must be divisible by dim_reduction * num_heads '
                             f'= {dim_reduction} * {num_heads}; change dims or heads.')
        if ka < 1 or ka % 2 == 0:
            raise ValueError(f'SlideAttention: ka must be a positive odd number, got {ka}.')
        self.dim = dim
        self.num_heads = num_heads
        self.ka = ka
        self.dim_reduction = dim_reduction
        self.reduced_dim = dim // dim_reduction
        self.reduced_head_dim = self.reduced_dim // num_heads
        self.scale = qk_scale if qk_scale is not None else (dim // num_heads) ** -0.5

        cr, taps = self.reduced_head_dim, ka * ka
        # Creation order follows the official module so that a seeded init draws
        # the same numbers.
        # qkv output channel (h*3 + j)*cr + c: per head a q, k, v block (j = 0, 1, 2).
        self.qkv = nn.Linear(dim, 3 * self.reduced_dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(self.reduced_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dep_conv = nn.Conv2d(cr, cr * taps, ka, padding=ka // 2, groups=cr)
        self.dep_conv1 = nn.Conv2d(cr, cr * taps, ka, padding=ka // 2, groups=cr)
        self._init_shift_kernel()
        if rpb:
            self.relative_position_bias_table = nn.Parameter(torch.zeros(1, num_heads, 1, taps, 1, 1))
            trunc_normal_(self.relative_position_bias_table, std=.02)
        else:
            self.relative_position_bias_table = None

    @torch.no_grad()
    def _init_shift_kernel(self):
        """Make ``dep_conv.weight`` the frozen one-hot shift; its bias stays trainable."""
        ka = self.ka
        one_hot = torch.eye(ka * ka).reshape(ka * ka, 1, ka, ka)       # tap t -> (t // ka, t % ka)
        weight = self.dep_conv.weight
        weight.copy_(one_hot.repeat(self.reduced_head_dim, 1, 1, 1))
        weight.requires_grad_(False)

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, num_heads={self.num_heads}, ka={self.ka}, '
                f'dim_reduction={self.dim_reduction}, scale={self.scale:.4g}')

    def _gather_window(self, t: torch.Tensor, B: int, H: int, W: int) -> torch.Tensor:
        """(B*heads, cr, H, W) -> (B, heads, cr, ka*ka, H, W) neighbourhood values."""
        shifted = self.dep_conv(t) + self.dep_conv1(t)                 # channel c*ka*ka + tap
        return shifted.reshape(B, self.num_heads, self.reduced_head_dim, self.ka * self.ka, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        if C != self.dim:
            raise ValueError(f'SlideAttention: expected {self.dim} input channels, got {C}.')
        nh, cr = self.num_heads, self.reduced_head_dim

        qkv = self.qkv(x.permute(0, 2, 3, 1))                          # (B, H, W, 3*Cr)
        qkv = qkv.permute(0, 3, 1, 2).reshape(B * nh, 3 * cr, H, W)     # per head [q | k | v]
        q = (qkv[:, :cr] * self.scale).reshape(B, nh, cr, 1, H, W)
        k = self._gather_window(qkv[:, cr:2 * cr], B, H, W)
        v = self._gather_window(qkv[:, 2 * cr:], B, H, W)
        if self.relative_position_bias_table is not None:
            k = k + self.relative_position_bias_table

        attn = (q * k).sum(dim=2, keepdim=True).softmax(dim=3)         # (B, heads, 1, taps, H, W)
        attn = self.attn_drop(attn)
        out = (attn * v).sum(dim=3).reshape(B, self.reduced_dim, H, W)  # channel h*cr + c
        out = self.proj_drop(self.proj(out.permute(0, 2, 3, 1)))
        return out.permute(0, 3, 1, 2)
