"""Learned-query attention ("Q" blocks of DAT++), after QnA (Arar et al., 2022).

Every pixel is summarised by ``nq`` learned queries that attend over its
``k x k`` neighbourhood. The attention normaliser is computed with two depthwise
convolutions instead of materialising the windows:

    out[p] = sum_q  sum_t w(rpb[t]) * attn_scale[t] * e[p+t] * v[p+t]
                    ------------------------------------------------
                           sum_t w(rpb[t]) * e[p+t]

where ``e = act(q . k * scale)`` per query and head, ``w`` is the same
activation applied to the relative-position table, and ``t`` runs over the
window taps (tap ``t = row * k + col`` sits at offset ``(row - k//2, col - k//2)``).

Border handling (k > 1). The official code passes padding 0 to those
convolutions, so only k = 1 produces a map of the input size. Here the
convolutions are zero-padded by ``k // 2``: the padding is applied to the
*activated* terms ``e`` and ``e * v``, so taps outside the map contribute to
neither sum; each border pixel is normalised over the taps that exist. This is
what the official arithmetic gives once its padding argument is ``k // 2`` (and
what the original QnA 'SAME' convolutions do). It is *not* the same as
zero-padding the input map, where outside taps would carry ``k = v = 0`` and
still add ``w(rpb) * act(0)`` to the denominator.

Stabilising shift ('exp'). The official code subtracts one detached maximum
taken over the whole batch. Any shift that is constant over a window cancels
between numerator and denominator, so this module subtracts the detached
maximum per (sample, query, head) instead: the result equals the official one
up to rounding, no longer depends on the other samples of the batch, and a
sample whose logits sit far below another's cannot underflow to 0 / 0.
"""
import math
from typing import Callable, Dict

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

__all__ = ['FusedKQnA']


def _shifted_exp(logits: torch.Tensor, dims) -> torch.Tensor:
    """exp(logits - max) with a detached max over ``dims`` (cancels in the ratio)."""
    return torch.exp(logits - logits.detach().amax(dim=dims, keepdim=True))


_LOGIT_ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    # logits: (B, N, nq, heads); shift per sample, query and head (over the N pixels)
    'exp': lambda t: _shifted_exp(t, dims=1),
    'sigmoid': torch.sigmoid,
    'linear': lambda t: t,
}

_TABLE_ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    # the table is shared by every window, so one global shift cancels
    'exp': lambda t: _shifted_exp(t, dims=(0, 1)),
    'sigmoid': torch.sigmoid,
    'linear': lambda t: t,
}


class FusedKQnA(nn.Module):
    """Learned-query attention over ``kernel_size x kernel_size`` windows.

    Args:
        dim: channels ``C`` of the input and output map.
        nq: number of learned queries (``nqs[i]`` in the DAT config).
        num_heads: attention heads (``heads_q[i]``); head width is ``dim // num_heads``.
        kernel_size: odd window size (``ksize_qnas[i]``); the map size is preserved.
        activation: 'exp' (softmax-like, the default), 'sigmoid' or 'linear'
            (``qna_activation``); applied to the logits and to ``rpb_table``.

    Input and output are NCHW maps of shape ``(B, dim, H, W)``.
    """

    def __init__(self, dim: int, *, nq: int, num_heads: int, kernel_size: int, activation: str = 'exp'):
        super().__init__()
        if nq < 1:
            raise ValueError(f'FusedKQnA: nq must be >= 1, got {nq}.')
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f'FusedKQnA: dim {dim} must be divisible by num_heads {num_heads}; '
                             f'change heads_q or dims.')
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f'FusedKQnA: kernel_size must be a positive odd number to keep the map size, '
                             f'got {kernel_size}; change ksize_qnas.')
        if activation not in _LOGIT_ACTIVATIONS:
            raise ValueError(f'FusedKQnA: unknown activation {activation!r}; '
                             f'use one of {sorted(_LOGIT_ACTIVATIONS)}.')
        self.nq = nq
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.kernel_size = kernel_size
        self.activation = activation
        self.scale = self.head_dim ** -0.5

        # Creation order follows the official module so that a seeded init draws
        # the same numbers.
        self.proj_k = nn.Linear(dim, dim, bias=False)
        self.proj_v = nn.Linear(dim, dim, bias=False)
        self.proj_out = nn.Conv2d(dim, dim, kernel_size=1, bias=False)
        self.q_param = nn.Parameter(torch.empty(nq, dim))
        trunc_normal_(self.q_param, std=math.sqrt(1.0 / self.head_dim))
        taps, columns = kernel_size * kernel_size, nq * num_heads
        # column index of both tables: query * num_heads + head
        self.attn_scale = nn.Parameter(torch.empty(1, 1, taps, columns))
        nn.init.normal_(self.attn_scale, std=0.02)
        self.rpb_table = nn.Parameter(torch.empty(taps, columns))
        trunc_normal_(self.rpb_table, std=0.02)

    def extra_repr(self) -> str:
        return (f'nq={self.nq}, dim={self.dim}, num_heads={self.num_heads}, '
                f'kernel_size={self.kernel_size}, activation={self.activation!r}')

    def _window_kernels(self):
        """Depthwise kernels (out_channels, 1, k, k) for the denominator and numerator sums."""
        k, hc = self.kernel_size, self.head_dim
        tap_weight = _TABLE_ACTIVATIONS[self.activation](self.rpb_table)   # (k*k, nq*heads)
        den = tap_weight.t().reshape(-1, 1, k, k)
        num = tap_weight * self.attn_scale.reshape(k * k, -1)
        # one copy per channel of the head: column (q*heads + h) -> channels (q*heads + h)*hc + c
        num = num.repeat_interleave(hc, dim=1).t().reshape(-1, 1, k, k)
        return den, num

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        if C != self.dim:
            raise ValueError(f'FusedKQnA: expected {self.dim} input channels, got {C}.')
        nq, nh, hc, N = self.nq, self.num_heads, self.head_dim, H * W

        tokens = x.flatten(2).transpose(1, 2)                          # (B, N, C)
        k = self.proj_k(tokens).reshape(B, N, nh, hc)
        v = self.proj_v(tokens).reshape(B, N, 1, nh, hc)
        q = (self.q_param * self.scale).reshape(nq, nh, hc)
        logits = torch.einsum('bnhc,qhc->bnqh', k, q)                  # (B, N, nq, heads)
        e = _LOGIT_ACTIVATIONS[self.activation](logits)

        # Per-pixel terms as maps, channels ordered (query, head[, channel]).
        den_terms = e.reshape(B, H, W, nq * nh).permute(0, 3, 1, 2)
        num_terms = (e.unsqueeze(-1) * v).reshape(B, H, W, nq * C).permute(0, 3, 1, 2)

        den_kernel, num_kernel = self._window_kernels()
        pad = self.kernel_size // 2
        den = F.conv2d(den_terms, den_kernel, padding=pad, groups=nq * nh)
        num = F.conv2d(num_terms, num_kernel, padding=pad, groups=nq * C)

        out = num.reshape(B, nq, nh, hc, H, W) / den.reshape(B, nq, nh, 1, H, W)
        out = out.sum(dim=1).reshape(B, C, H, W)                       # sum over queries
        return self.proj_out(out)
