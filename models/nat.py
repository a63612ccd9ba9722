"""Neighborhood attention with a relative position bias (the ``N`` block of DAT++).

Semantics follow natten 0.14.6 as used by the official DAT++ (dilation 1):
along an axis of length ``L >= K`` query ``i`` attends to keys
``s(i) .. s(i) + K - 1`` with ``s(i) = clamp(i - K // 2, 0, L - K)``, so
windows near the border are shifted inwards instead of being truncated, and

    logit(i, j -> a, b) = (q . k) * scale + rpb[h, a - i + K - 1, b - j + K - 1]

with a softmax over the ``K * K`` keys of the window.

Implementations, all behind :func:`neighborhood_attention`:

* ``'reference'``: plain PyTorch, any device and dtype (float64 included),
  autograd. Small maps use dense masked attention (a few matmuls, the
  fastest on CPU); larger maps loop over the ``K * K`` key offsets with
  gathered key/value rows and a hand-written backward, so memory stays
  ``O(B * heads * H * W * (c + K * K))``.
* ``'fused'``: ``torch.nn.attention.flex_attention`` on CUDA with a block mask
  for the clamped windows and a ``score_mod`` adding the bias.
* ``'auto'``: ``'fused'`` when it can run, else ``'reference'``.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.init import trunc_normal_

try:  # flex attention appeared in torch 2.5; without it only the reference path exists
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - depends on the installed torch
    create_block_mask = flex_attention = None

__all__ = ['neighborhood_attention', 'fused_available', 'NeighborhoodAttention2D']

_IMPLS = ('auto', 'reference', 'fused')
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The reference path uses dense masked attention while H*W <= ratio * K*K and the
# per-offset gather loop above. Measured on CPU (fp32 forward+backward, c=32, 1 thread):
# 16x16, K=7, B=32: dense ~0.12 s, gather ~0.5 s; the two meet near H*W = 16-20 K*K;
# 56x56, K=7: gather ~10x faster, and dense would also hold an (H*W)^2 attention matrix.
_DENSE_MAX_TOKENS_PER_KEY = 16


# --------------------------------------------------------------------------- geometry

def _cached_geometry(fn):
    """Memoise index tables per (size, kernel, device), and keep them out of ``torch.compile``
    graphs: traced, the lru_cache would be bypassed and the tables rebuilt every step."""
    return torch.compiler.disable(functools.lru_cache(maxsize=64)(fn))


def _check_kernel_size(kernel_size: int) -> None:
    if not isinstance(kernel_size, int) or kernel_size < 3 or kernel_size % 2 == 0:
        raise ValueError(f'neighborhood attention needs an odd kernel_size >= 3, got {kernel_size!r}')


def _window_start(length: int, kernel_size: int, device: torch.device) -> Tensor:
    """First key index of every query's window along one axis, shape (length,)."""
    pos = torch.arange(length, device=device)
    return (pos - kernel_size // 2).clamp(0, length - kernel_size)


@_cached_geometry
def _axis_tables(length: int, kernel_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Per-axis lookup tables, both (kernel_size, length) int64.

    ``key[d, i]``: key index of window offset ``d`` for query ``i``;
    ``rel[d, i]``: the matching row/column of the bias table, ``key - i + K - 1``.
    """
    # Cached tensors must not be inference tensors: index ops save them for backward.
    with torch.inference_mode(False), torch.no_grad():
        pos = torch.arange(length, device=device)
        key = _window_start(length, kernel_size, device)[None, :] + torch.arange(kernel_size, device=device)[:, None]
        rel = key - pos[None, :] + kernel_size - 1
    return key, rel


@_cached_geometry
def _dense_tables(height: int, width: int, kernel_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Dense (N, N) tables, N = H*W: flat bias-table index and the neighbourhood mask."""
    with torch.inference_mode(False), torch.no_grad():
        span = 2 * kernel_size - 1

        def axis(length: int) -> tuple[Tensor, Tensor]:
            pos = torch.arange(length, device=device)
            start = _window_start(length, kernel_size, device)
            inside = (pos[None, :] >= start[:, None]) & (pos[None, :] < start[:, None] + kernel_size)
            rel = (pos[None, :] - pos[:, None] + kernel_size - 1).clamp(0, span - 1)
            return inside, rel  # both (queries, keys)

        in_y, rel_y = axis(height)
        in_x, rel_x = axis(width)
        tokens = height * width
        # (qy, qx, ky, kx) -> (query token, key token)
        mask = (in_y[:, None, :, None] & in_x[None, :, None, :]).reshape(tokens, tokens)
        index = (rel_y[:, None, :, None] * span + rel_x[None, :, None, :]).reshape(tokens, tokens)
    return index, mask


def _bias_windows(rpb: Tensor, height: int, width: int, kernel_size: int) -> Tensor:
    """Bias of every (query, window offset) pair, (heads, H, W, K*K); offset n = dy*K + dx."""
    _, rel_y = _axis_tables(height, kernel_size, rpb.device)
    _, rel_x = _axis_tables(width, kernel_size, rpb.device)
    bias = rpb[:, rel_y]              # (heads, K, H, 2K-1)
    bias = bias[..., rel_x]           # (heads, K, H, K, W)
    return bias.permute(0, 2, 4, 1, 3).reshape(rpb.shape[0], height, width, kernel_size ** 2)


# --------------------------------------------------------------------------- reference

class _WindowLogits(torch.autograd.Function):
    """``out[..., dy*K+dx] = q . k[window key (dy, dx)]`` without materialising the windows."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, kernel_size: int) -> Tensor:
        key_y, _ = _axis_tables(q.shape[2], kernel_size, q.device)
        key_x, _ = _axis_tables(q.shape[3], kernel_size, q.device)
        out = q.new_empty(*q.shape[:-1], kernel_size ** 2)
        for dy in range(kernel_size):
            k_rows = k.index_select(2, key_y[dy])
            for dx in range(kernel_size):
                out[..., dy * kernel_size + dx] = (q * k_rows.index_select(3, key_x[dx])).sum(-1)
        ctx.save_for_backward(q, k)
        ctx.kernel_size = kernel_size
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        q, k = ctx.saved_tensors
        kernel_size = ctx.kernel_size
        key_y, _ = _axis_tables(q.shape[2], kernel_size, q.device)
        key_x, _ = _axis_tables(q.shape[3], kernel_size, q.device)
        grad_q = torch.zeros_like(q)
        grad_k = torch.zeros_like(k)
        for dy in range(kernel_size):
            k_rows = k.index_select(2, key_y[dy])
            # Scatter columns first into the gathered rows, then the rows into k, once per dy.
            grad_rows = torch.zeros_like(q)
            for dx in range(kernel_size):
                g = grad[..., dy * kernel_size + dx, None]
                grad_q.addcmul_(g, k_rows.index_select(3, key_x[dx]))
                grad_rows.index_add_(3, key_x[dx], g * q)
            grad_k.index_add_(2, key_y[dy], grad_rows)
        return grad_q, grad_k, None


class _WindowMix(torch.autograd.Function):
    """``out = sum_n attn[..., n] * v[window key n]`` without materialising the windows."""

    @staticmethod
    def forward(ctx, attn: Tensor, v: Tensor, kernel_size: int) -> Tensor:
        key_y, _ = _axis_tables(v.shape[2], kernel_size, v.device)
        key_x, _ = _axis_tables(v.shape[3], kernel_size, v.device)
        out = torch.zeros_like(v)
        for dy in range(kernel_size):
            v_rows = v.index_select(2, key_y[dy])
            for dx in range(kernel_size):
                out.addcmul_(attn[..., dy * kernel_size + dx, None], v_rows.index_select(3, key_x[dx]))
        ctx.save_for_backward(attn, v)
        ctx.kernel_size = kernel_size
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        attn, v = ctx.saved_tensors
        kernel_size = ctx.kernel_size
        key_y, _ = _axis_tables(v.shape[2], kernel_size, v.device)
        key_x, _ = _axis_tables(v.shape[3], kernel_size, v.device)
        grad_attn = torch.empty_like(attn)
        grad_v = torch.zeros_like(v)
        for dy in range(kernel_size):
            v_rows = v.index_select(2, key_y[dy])
            grad_rows = torch.zeros_like(v)
            for dx in range(kernel_size):
                n = dy * kernel_size + dx
                grad_attn[..., n] = (grad * v_rows.index_select(3, key_x[dx])).sum(-1)
                grad_rows.index_add_(3, key_x[dx], attn[..., n, None] * grad)
            grad_v.index_add_(2, key_y[dy], grad_rows)
        return grad_attn, grad_v, None


def _reference_gather(q: Tensor, k: Tensor, v: Tensor, rpb: Tensor, kernel_size: int,
                      scale: float, dropout_p: float) -> Tensor:
    """Per-offset gather loop: memory O(B*heads*H*W*(c + K*K)), suits large maps."""
    height, width = q.shape[2:4]
    logits = _WindowLogits.apply(q * scale, k, kernel_size)
    # Adding the (float32) bias promotes low-precision logits, so the softmax runs in float32.
    logits = logits + _bias_windows(rpb, height, width, kernel_size)
    attn = logits.softmax(dim=-1)
    if dropout_p > 0:
        attn = F.dropout(attn, p=dropout_p)
    return _WindowMix.apply(attn.to(v.dtype), v, kernel_size)


def _reference_dense(q: Tensor, k: Tensor, v: Tensor, rpb: Tensor, kernel_size: int,
                     scale: float, dropout_p: float) -> Tensor:
    """Dense attention over all H*W keys with the neighbourhood as a -inf mask: fast for small maps."""
    batch, heads, height, width, head_dim = q.shape
    tokens = height * width
    index, mask = _dense_tables(height, width, kernel_size, q.device)
    bias = rpb.flatten(1)[:, index].masked_fill(~mask, float('-inf'))   # (heads, N, N)
    q = q.reshape(batch, heads, tokens, head_dim) * scale
    k = k.reshape(batch, heads, tokens, head_dim)
    v = v.reshape(batch, heads, tokens, head_dim)
    logits = q @ k.transpose(-2, -1)
    attn = (logits + bias).softmax(dim=-1)
    if dropout_p > 0:
        attn = F.dropout(attn, p=dropout_p)
    return (attn.to(v.dtype) @ v).reshape(batch, heads, height, width, head_dim)


def _reference(q: Tensor, k: Tensor, v: Tensor, rpb: Tensor, kernel_size: int,
               scale: float, dropout_p: float) -> Tensor:
    height, width = q.shape[2:4]
    small = height * width <= _DENSE_MAX_TOKENS_PER_KEY * kernel_size ** 2
    impl = _reference_dense if small else _reference_gather
    return impl(q, k, v, rpb, kernel_size, scale, dropout_p)


# --------------------------------------------------------------------------- fused (CUDA)

def fused_available(device: torch.device | str | None = None) -> bool:
    """True when the flex-attention path can run (CUDA present and flex attention importable)."""
    if flex_attention is None or not torch.cuda.is_available():
        return False
    return device is None or torch.device(device).type == 'cuda'


@functools.lru_cache(maxsize=1)
def _compiled_flex_attention():
    # One compiled entry point; dynamo specialises it per (shape, dtype, grad mode).
    # A DAT++ run meets several maps (stages x train/eval x last batch), more than
    # dynamo's default of 8 recompilations, beyond which flex attention would fall
    # back to its dense eager form, so the limit is raised once here.
    dynamo_config = torch._dynamo.config
    name = 'recompile_limit' if hasattr(dynamo_config, 'recompile_limit') else 'cache_size_limit'
    setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
    return torch.compile(flex_attention, dynamic=False)


@_cached_geometry
def _flex_geometry(height: int, width: int, kernel_size: int, device: torch.device):
    """Token tables and block mask for one (H, W, K): built once and reused."""
    with torch.inference_mode(False), torch.no_grad():
        token = torch.arange(height * width, device=device)
        row, col = token // width, token % width
        row_start = _window_start(height, kernel_size, device)[row]
        col_start = _window_start(width, kernel_size, device)[col]

        def mask_mod(b, h, q_idx, kv_idx):
            in_rows = (row[kv_idx] >= row_start[q_idx]) & (row[kv_idx] < row_start[q_idx] + kernel_size)
            in_cols = (col[kv_idx] >= col_start[q_idx]) & (col[kv_idx] < col_start[q_idx] + kernel_size)
            return in_rows & in_cols

        block_mask = create_block_mask(mask_mod, None, None, height * width, height * width, device=device)
    return row, col, block_mask


def _fused(q: Tensor, k: Tensor, v: Tensor, rpb: Tensor, kernel_size: int, scale: float,
           compiled: bool = True) -> Tensor:
    """Flex-attention path. ``compiled=False`` runs flex attention eagerly (forward only on
    CPU), which lets the mask and bias logic be checked without a GPU."""
    batch, heads, height, width, head_dim = q.shape
    row, col, block_mask = _flex_geometry(height, width, kernel_size, q.device)
    span = 2 * kernel_size - 1
    # The kernel computes scores in float32; keep the bias there for low-precision inputs.
    bias = rpb if rpb.dtype == torch.float64 else rpb.float()

    def score_mod(score, b, h, q_idx, kv_idx):
        # score_mod also runs on masked entries of partially masked blocks, so the table
        # index is clamped to stay in bounds; inside a window it never needs clamping.
        dy = (row[kv_idx] - row[q_idx] + kernel_size - 1).clamp(0, span - 1)
        dx = (col[kv_idx] - col[q_idx] + kernel_size - 1).clamp(0, span - 1)
        return score + bias[h, dy, dx]

    attend = _compiled_flex_attention() if compiled else flex_attention
    tokens = height * width
    out = attend(q.reshape(batch, heads, tokens, head_dim), k.reshape(batch, heads, tokens, head_dim),
                 v.reshape(batch, heads, tokens, head_dim), score_mod=score_mod,
                 block_mask=block_mask, scale=scale)
    return out.reshape(batch, heads, height, width, head_dim)


# --------------------------------------------------------------------------- dispatch

def _select_impl(impl: str, q: Tensor, dropout_p: float) -> str:
    """The single place that decides which implementation runs."""
    if impl not in _IMPLS:
        raise ValueError(f"neighborhood attention impl must be one of {_IMPLS}, got {impl!r}")
    fused_ok = fused_available(q.device) and q.dtype in _FUSED_DTYPES
    if impl == 'auto':
        return 'fused' if fused_ok and dropout_p == 0 else 'reference'
    if impl == 'fused':
        if not fused_ok:
            raise RuntimeError(
                f"impl='fused' needs CUDA tensors of dtype float32/float16/bfloat16 and "
                f"torch.nn.attention.flex_attention; got {q.device.type} {q.dtype} "
                f"(use impl='auto' or 'reference')")
        if dropout_p > 0:
            raise ValueError("impl='fused' does not support attention dropout; use impl='auto' or 'reference'")
    return impl


def neighborhood_attention(q: Tensor, k: Tensor, v: Tensor, rpb: Tensor, kernel_size: int,
                           scale: float | None = None, impl: str = 'auto',
                           dropout_p: float = 0.0) -> Tensor:
    """2-D neighborhood attention with relative position bias.

    Args:
        q, k, v: ``(B, heads, H, W, c)``, with ``H >= kernel_size`` and ``W >= kernel_size``.
        rpb: bias table ``(heads, 2K-1, 2K-1)``.
        kernel_size: odd window size ``K``.
        scale: logit scale, ``c ** -0.5`` by default.
        impl: ``'auto'``, ``'reference'`` or ``'fused'``.
        dropout_p: dropout on the attention weights (always applied when > 0: pass 0 in eval).
    Returns:
        ``(B, heads, H, W, c)``.
    """
    _check_kernel_size(kernel_size)
    if q.dim() != 5 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f'q, k, v must share one (B, heads, H, W, c) shape, got '
                         f'{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}')
    heads, height, width = q.shape[1:4]
    span = 2 * kernel_size - 1
    if tuple(rpb.shape) != (heads, span, span):
        raise ValueError(f'rpb must have shape {(heads, span, span)} for {heads} heads and '
                         f'kernel_size {kernel_size}, got {tuple(rpb.shape)}')
    if height < kernel_size or width < kernel_size:
        raise ValueError(f'feature map {height}x{width} is smaller than kernel_size {kernel_size}; '
                         f'pad it first (NeighborhoodAttention2D does)')
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if _select_impl(impl, q, dropout_p) == 'fused':
        return _fused(q, k, v, rpb, kernel_size, scale)
    return _reference(q, k, v, rpb, kernel_size, scale, dropout_p)


# --------------------------------------------------------------------------- module

class NeighborhoodAttention2D(nn.Module):
    """Neighborhood attention block on NCHW maps (natten 0.14.6 semantics, dilation 1).

    Maps smaller than the kernel are zero-padded at the bottom/right before ``qkv``
    (padded tokens act as keys/values whose k, v equal the qkv bias) and cropped back.
    """

    def __init__(self, dim: int, num_heads: int, kernel_size: int, qkv_bias: bool = True,
                 attn_drop: float = 0., proj_drop: float = 0., impl: str = 'auto'):
        super().__init__()
        _check_kernel_size(kernel_size)
        if dim % num_heads != 0:
            raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
        if impl not in _IMPLS:
            raise ValueError(f'impl must be one of {_IMPLS}, got {impl!r}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.kernel_size = kernel_size
        self.impl = impl
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
        trunc_normal_(self.rpb, std=.02, a=-2., b=2.)
        self.attn_drop = nn.Dropout(attn_drop)  # holds the rate; applied inside the op
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: (B, C, H, W) -> (B, C, H, W)."""
        x = x.permute(0, 2, 3, 1)
        batch, height, width, channels = x.shape
        pad_h = max(0, self.kernel_size - height)
        pad_w = max(0, self.kernel_size - width)
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        padded_h, padded_w = height + pad_h, width + pad_w
        qkv = self.qkv(x).reshape(batch, padded_h, padded_w, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)          # each (B, heads, H, W, c)
        dropout_p = self.attn_drop.p if self.training else 0.
        # The fused path has no attention dropout: fall back while it is active.
        impl = self.impl if dropout_p == 0 else 'reference'
        x = neighborhood_attention(q, k, v, self.rpb, self.kernel_size, self.scale, impl, dropout_p)
        x = x.permute(0, 2, 3, 1, 4).reshape(batch, padded_h, padded_w, channels)
        x = x[:, :height, :width]
        x = self.proj_drop(self.proj(x))
        return x.permute(0, 3, 1, 2).contiguous()

    def extra_repr(self) -> str:
        return (f'num_heads={self.num_heads}, head_dim={self.head_dim}, '
                f'kernel_size={self.kernel_size}, impl={self.impl!r}')
