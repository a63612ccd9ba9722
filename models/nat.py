"""Neighborhood attention with a relative position bias (the ``N`` block of DAT++).

Semantics follow natten 0.14.6 as used by the official DAT++ (dilation 1): along an axis of
length ``L >= K`` query ``i`` attends to keys ``s(i) .. s(i) + K - 1`` with
``s(i) = clamp(i - K // 2, 0, L - K)``, so windows near the border shift inwards instead of
being truncated, and

    logit(i, j -> a, b) = (q . k) * scale + rpb[h, a - i + K - 1, b - j + K - 1]

with a softmax over the ``K * K`` keys of the window.

Every implementation computes this exactly with the same tiled formulation: queries are cut
into ``T x T`` tiles; a tile's windows all lie inside one ``(T + K - 1)^2`` key halo, so each
tile is plain dense attention over its halo with an additive bias that is the gathered
``rpb`` inside the windows and ``-inf`` outside. That is a few large batched matmuls instead of
a loop over the ``K * K`` window offsets, with memory ``O(B * heads * H * W * (T + K - 1)^2)``.
A map no larger than about two tiles per axis is a single tile: dense attention with the
neighbourhood as a mask.

Kernels (:func:`kernel_for`; ``attn_impl`` resolved per call with
:func:`models.attention_impl.use_fused`):

* ``'tiled'``, the reference: the tiles through ``matmul`` / ``softmax`` with a written-out
  backward; any device and dtype (float64 included). ``'fused'`` also runs it on CPU, where it
  is the fastest exact kernel.
* ``'sdpa'``: the same tiles through ``scaled_dot_product_attention``: what ``'auto'`` runs on
  CUDA, at every map size, and what ``'fused'`` runs where flex attention is not allowed.
* ``'flex'``: flex attention with a block mask for the windows and the bias as ``score_mod``:
  only when ``'fused'`` is asked for explicitly, on CUDA, with torch >= :data:`FLEX_MIN_TORCH`,
  for maps of at least :data:`FLEX_MIN_TOKENS` tokens. Its compiled backward of a learned bias
  is the least-trodden path in PyTorch and its gain over the tiles has not been measured on a
  GPU, so ``'auto'`` does not take it; the start-up check (``models.kernel_check``) verifies it
  either way.

The geometry (key halos and bias-table indices) depends only on ``(H, W, K)`` and is built once
per shape and device. The tiled kernel is a forward/backward pair of custom ops
(``torch.ops.dat_nat``), so ``torch.compile`` sees one node that reads the cached tables; the
other kernels build their tables inside the graph (a few ``arange`` ops). Either way the op
compiles without graph breaks.
"""
from typing import Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from timm.layers import trunc_normal_
from timm.models import register_notrace_function

from .attention_impl import check_attn_impl, record, sdpa as _sdpa, use_fused

try:  # flex attention appeared in torch 2.5; without it the CUDA path uses SDPA everywhere
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - depends on the installed torch
    create_block_mask = flex_attention = None

__all__ = ['neighborhood_attention', 'kernel_for', 'choose_kernel', 'tile_size', 'NeighborhoodAttention2D']

# Query tile side for large maps. The scores per query grow with the halo (T + K - 1)^2 and the
# halo copies with (T + K - 1)^2 / T^2; on CPU (fp32, forward + backward, K = 7, 56 x 56 and
# 28 x 28, c = 32) T = 7 was fastest among 4, 7 and 8, and it divides DAT++'s map sides.
TILE = 7
# On CUDA, an explicit 'fused' runs flex attention from this many tokens on, and SDPA over the
# tiles below (flex pads a map to 128-token blocks: at 14 x 14 it would compute several times
# the scores SDPA needs). The switch point is not measured: 'auto' runs SDPA at every size. On
# CPU 'fused' runs the tiled matmul kernel: SDPA with a bias that needs a gradient falls back to
# its unfused math there and measured 1.3-1.5x slower, forward and backward alike.
FLEX_MIN_TOKENS = 1024
# torch 2.5's flex attention refuses a captured bias that requires grad (the learnable table),
# even under no_grad, and its block-mask builder calls the mask past the end of a map whose
# length is not a multiple of 128.
FLEX_MIN_TORCH = (2, 6)
_FLEX_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _torch_version() -> Tuple[int, int]:
    major, minor = torch.__version__.split('.')[:2]
    return int(major), int(''.join(ch for ch in minor if ch.isdigit()) or 0)


FLEX_SUPPORTED = flex_attention is not None and _torch_version() >= FLEX_MIN_TORCH


# --------------------------------------------------------------------------- geometry

def tile_size(length: int, kernel_size: int) -> int:
    """Query tile side along an axis of ``length``: the whole axis when it is at most two tiles."""
    return length if length <= 2 * max(TILE, kernel_size) else TILE


class _AxisTables(NamedTuple):
    tiles: int       # query tiles along the axis
    tile: int        # query tile side (the last tile may overhang the map)
    halo: int        # keys per tile: min(tile + K - 1, length)
    query: Tensor    # (tiles, tile) query index of each tile slot, the overhang clamped to the last query
    keys: Tensor     # (tiles, halo) key index of each halo slot
    rel: Tensor      # (tiles, tile, halo) bias-table row of (query slot, halo slot); 2K - 1 outside the window


def _axis_tables(length: int, kernel_size: int, tile: int, device: torch.device) -> _AxisTables:
    tiles = -(-length // tile)
    halo = min(tile + kernel_size - 1, length)
    # Queries past the end of the map (the overhang of the last tile) borrow the last query's
    # window; their outputs are dropped.
    query = torch.arange(tiles * tile, device=device).clamp(max=length - 1).view(tiles, tile)
    start = (query - kernel_size // 2).clamp(0, length - kernel_size)            # window starts
    # Window starts grow by at most one per query, so a tile's windows span at most
    # tile + K - 1 keys from its first window's start; near the end the halo shifts inwards.
    halo_start = start[:, 0].clamp(max=length - halo)
    keys = halo_start[:, None] + torch.arange(halo, device=device)
    keys_, start_ = keys[:, None, :], start[:, :, None]
    inside = (keys_ >= start_) & (keys_ < start_ + kernel_size)
    rel = torch.where(inside, keys_ - query[:, :, None] + kernel_size - 1, 2 * kernel_size - 1)
    return _AxisTables(tiles, tile, halo, query, keys, rel)


class _Geometry(NamedTuple):
    """Flat gather indices of one (H, W, K); tiles are numbered row-major, ``n = ty * tiles_x + tx``."""
    tiles: int            # tiles_y * tiles_x
    tile_tokens: int      # queries per tile, T_y * T_x
    halo_tokens: int      # keys per tile, halo_y * halo_x
    single: bool          # one tile covering the whole map: no gathers needed
    query: Tensor         # (tiles * tile_tokens,) token of each tile query slot
    keys: Tensor          # (tiles * halo_tokens,) token of each halo key slot
    out: Tensor           # (H * W,) tile query slot of each token
    bias: Tensor          # (tiles * tile_tokens * halo_tokens,) index into the (2K)^2 padded bias table


def _build_geometry(height: int, width: int, kernel_size: int, tile_y: int, tile_x: int,
                    device: torch.device) -> _Geometry:
    y = _axis_tables(height, kernel_size, tile_y, device)
    x = _axis_tables(width, kernel_size, tile_x, device)
    # Axis order of every table: (ty, tx, slot_y, slot_x[, halo_y, halo_x]).
    query = (y.query[:, None, :, None] * width + x.query[None, :, None, :]).flatten()
    keys = (y.keys[:, None, :, None] * width + x.keys[None, :, None, :]).flatten()
    span = 2 * kernel_size
    bias = (y.rel[:, None, :, None, :, None] * span + x.rel[None, :, None, :, None, :]).flatten()
    row, col = torch.arange(height, device=device), torch.arange(width, device=device)
    out = ((row[:, None] // y.tile * x.tiles + col[None, :] // x.tile) * (y.tile * x.tile)
           + (row[:, None] % y.tile) * x.tile + col[None, :] % x.tile).flatten()
    single = y.tiles == 1 and x.tiles == 1      # then tile == length and every index is the identity
    return _Geometry(y.tiles * x.tiles, y.tile * x.tile, y.halo * x.halo, single, query, keys, out, bias)


_GEOMETRY: Dict[Tuple[int, int, int, int, int, str], _Geometry] = {}
_GEOMETRY_MAX = 64


def _geometry(height: int, width: int, kernel_size: int, device: torch.device) -> _Geometry:
    """Tables for one ``(H, W, K)``, built once per device in eager mode. Under
    ``torch.compile`` they are traced ``arange`` arithmetic instead: a Python cache would be a
    graph break."""
    tile_y, tile_x = tile_size(height, kernel_size), tile_size(width, kernel_size)
    if torch.compiler.is_compiling():
        return _build_geometry(height, width, kernel_size, tile_y, tile_x, device)
    key = (height, width, kernel_size, tile_y, tile_x, str(device))
    geometry = _GEOMETRY.get(key)
    if geometry is None:
        # Cached tensors must be ordinary tensors even when first built under inference_mode.
        with torch.inference_mode(False), torch.no_grad():
            geometry = _build_geometry(height, width, kernel_size, tile_y, tile_x, device)
        if len(_GEOMETRY) >= _GEOMETRY_MAX:      # e.g. inference at many sizes: keep memory bounded
            _GEOMETRY.clear()
        _GEOMETRY[key] = geometry
    return geometry


def _tile_bias(rpb: Tensor, g: _Geometry) -> Tensor:
    """Additive bias of every (tile, query, halo key): (heads, tiles, T*T, halo^2), ``-inf`` outside the windows."""
    # One extra row and column of -inf: index 2K - 1 marks halo keys outside a window.
    table = F.pad(rpb, (0, 1, 0, 1), value=float('-inf')).flatten(1)
    return table[:, g.bias].view(rpb.shape[0], g.tiles, g.tile_tokens, g.halo_tokens)


def _gather_tokens(t: Tensor, index: Tensor, single: bool, groups: int) -> Tensor:
    """(B, heads, N, c) -> (B, heads, groups, len(index) / groups, c): the rows ``index``."""
    if not single:
        t = t.index_select(2, index)
    return t.unflatten(2, (groups, -1))


def _tile_counts(height: int, width: int, kernel_size: int) -> Tuple[int, int, int]:
    """(tiles, queries per tile, keys per tile) of one (H, W, K), without building tables."""
    ty, tx = tile_size(height, kernel_size), tile_size(width, kernel_size)
    tiles = -(-height // ty) * -(-width // tx)
    return tiles, ty * tx, min(ty + kernel_size - 1, height) * min(tx + kernel_size - 1, width)


# The tiled kernel is a pair of custom ops (forward, backward), so that torch.compile keeps it
# whole: one graph node running these ATen kernels, its tables from the eager cache (inductor's
# own lowering of the gathers and their scatter-add gradients measured slower on CPU).
@torch.library.custom_op('dat_nat::tiled_attention', mutates_args=())
def _tiled_attention(q: Tensor, k: Tensor, v: Tensor, rpb: Tensor, kernel_size: int,
                     scale: float) -> Tuple[Tensor, Tensor]:
    """``(out, attn)`` for q, k, v ``(B, heads, H, W, c)``; ``attn`` (B, heads, tiles, T*T, halo^2)
    is kept for the backward."""
    batch, heads, height, width, c = q.shape
    g = _geometry(height, width, kernel_size, q.device)
    qt = _gather_tokens(q.reshape(batch, heads, height * width, c), g.query, g.single, g.tiles)
    kt = _gather_tokens(k.reshape(batch, heads, height * width, c), g.keys, g.single, g.tiles)
    vt = _gather_tokens(v.reshape(batch, heads, height * width, c), g.keys, g.single, g.tiles)
    logits = torch.matmul(qt, kt.transpose(-2, -1))
    # Low-precision scores meet the float32 bias here: the softmax runs in float32.
    logits = logits.to(torch.promote_types(logits.dtype, rpb.dtype)).mul_(scale).add_(_tile_bias(rpb, g))
    attn = torch.softmax(logits, dim=-1)
    del logits
    out = torch.matmul(attn.to(v.dtype), vt).flatten(2, 3)
    if not g.single:
        out = out.index_select(2, g.out)
    return out.view(batch, heads, height, width, c), attn


@_tiled_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, rpb: Tensor, kernel_size: int, scale: float) -> Tuple[Tensor, Tensor]:
    tiles, tile_tokens, halo_tokens = _tile_counts(q.shape[2], q.shape[3], kernel_size)
    attn_dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), rpb.dtype)
    return (torch.empty_like(v, memory_format=torch.contiguous_format),
            q.new_empty(q.shape[0], q.shape[1], tiles, tile_tokens, halo_tokens, dtype=attn_dtype))


def _scatter_tokens(t: Tensor, index: Tensor, single: bool, tokens: int) -> Tensor:
    """Adjoint of :func:`_gather_tokens`: (B, heads, groups, n, c) summed back into (B, heads, tokens, c)."""
    t = t.flatten(2, 3)
    if single:
        return t
    return t.new_zeros(t.shape[0], t.shape[1], tokens, t.shape[-1]).index_add_(2, index, t)


@torch.library.custom_op('dat_nat::tiled_attention_backward', mutates_args=())
def _tiled_attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, rpb: Tensor, attn: Tensor,
                              out: Tensor, kernel_size: int, scale: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of q, k, v and rpb. The softmax gradient needs no extra pass over the scores
    (``sum_k attn * dattn = out . dout``) and runs in place."""
    batch, heads, height, width, c = q.shape
    tokens = height * width
    g = _geometry(height, width, kernel_size, q.device)
    kt = _gather_tokens(k.reshape(batch, heads, tokens, c), g.keys, g.single, g.tiles)
    vt = _gather_tokens(v.reshape(batch, heads, tokens, c), g.keys, g.single, g.tiles)
    qt = _gather_tokens(q.reshape(batch, heads, tokens, c), g.query, g.single, g.tiles)
    grad = grad.to(v.dtype).reshape(batch, heads, tokens, c)
    delta = (out.reshape(batch, heads, tokens, c) * grad).sum(-1, keepdim=True).to(attn.dtype)
    if not g.single:
        # Into tile slots; the overhanging slots (outputs that were dropped) get zero gradient.
        slots = g.tiles * g.tile_tokens
        grad = grad.new_zeros(batch, heads, slots, c).index_copy_(2, g.out, grad)
        delta = delta.new_zeros(batch, heads, slots, 1).index_copy_(2, g.out, delta)
    grad, delta = grad.unflatten(2, (g.tiles, -1)), delta.unflatten(2, (g.tiles, -1))
    grad_vt = torch.matmul(attn.to(v.dtype).transpose(-2, -1), grad)
    grad_logits = torch.matmul(grad, vt.transpose(-2, -1)).to(attn.dtype).sub_(delta).mul_(attn)
    span = 2 * kernel_size
    grad_table = grad_logits.new_zeros(heads, span * span).index_add_(1, g.bias, grad_logits.sum(0).flatten(1))
    grad_rpb = grad_table.view(heads, span, span)[:, :-1, :-1].to(rpb.dtype).contiguous()
    grad_logits = grad_logits.to(q.dtype)
    grad_qt = torch.matmul(grad_logits, kt).mul_(scale)
    grad_kt = torch.matmul(grad_logits.transpose(-2, -1), qt).mul_(scale)
    shape = (batch, heads, height, width, c)
    return (_scatter_tokens(grad_qt, g.query, g.single, tokens).reshape(shape),
            _scatter_tokens(grad_kt, g.keys, g.single, tokens).reshape(shape),
            _scatter_tokens(grad_vt, g.keys, g.single, tokens).reshape(shape), grad_rpb)


@_tiled_attention_backward.register_fake
def _(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, rpb: Tensor, attn: Tensor, out: Tensor,
      kernel_size: int, scale: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    like = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format)  # noqa: E731
    return like(q), like(k), like(v), like(rpb)


def _tiled_setup_context(ctx, inputs, output) -> None:
    q, k, v, rpb, kernel_size, scale = inputs
    out, attn = output
    ctx.save_for_backward(q, k, v, rpb, attn, out)
    ctx.kernel_size, ctx.scale = kernel_size, scale
    # attn is an output only for the backward: no zero gradient of its size is made for it.
    ctx.set_materialize_grads(False)


def _tiled_backward(ctx, grad_out: Optional[Tensor], grad_attn: Optional[Tensor]):
    if grad_out is None:
        return None, None, None, None, None, None
    return (*_tiled_attention_backward(grad_out, *ctx.saved_tensors, ctx.kernel_size, ctx.scale), None, None)


_tiled_attention.register_autograd(_tiled_backward, setup_context=_tiled_setup_context)


# --------------------------------------------------------------------------- kernels

def _tiled(q: Tensor, k: Tensor, v: Tensor, rpb: Tensor, kernel_size: int, scale: float,
           dropout_p: float, sdpa: bool) -> Tensor:
    """Every query tile attends to its key halo: the custom op above (reference), the same
    tiles through SDPA, or with attention dropout in plain autograd."""
    if not sdpa and dropout_p == 0:
        return _tiled_attention(q, k, v, rpb, kernel_size, scale)[0]
    batch, heads, height, width, c = q.shape
    g = _geometry(height, width, kernel_size, q.device)
    bias = _tile_bias(rpb, g)
    flat = lambda t: t.reshape(batch, heads, height * width, c)  # noqa: E731
    qt = _gather_tokens(flat(q), g.query, g.single, g.tiles)
    kt = _gather_tokens(flat(k), g.keys, g.single, g.tiles)
    vt = _gather_tokens(flat(v), g.keys, g.single, g.tiles)
    if sdpa:
        # SDPA wants (batch, heads, L, c): the tiles fold into the head axis.
        out = _sdpa(qt.flatten(1, 2), kt.flatten(1, 2), vt.flatten(1, 2), attn_mask=bias.to(q.dtype).flatten(0, 1),
                    dropout_p=dropout_p, scale=scale).view(qt.shape)
    else:
        attn = (torch.matmul(qt * scale, kt.transpose(-2, -1)) + bias).softmax(dim=-1)
        out = torch.matmul(F.dropout(attn, p=dropout_p).to(v.dtype), vt)
    out = out.flatten(2, 3)
    if not g.single:
        out = out.index_select(2, g.out)
    return out.view(batch, heads, height, width, c)


_FLEX_CACHE: Dict[Tuple[int, int, int, str], tuple] = {}
_compiled_flex = None


def _flex_tables(height: int, width: int, kernel_size: int, device: torch.device):
    """Token coordinates, window starts and block mask of one (H, W, K) for flex attention."""
    token = torch.arange(height * width, device=device)
    row, col = token // width, token % width
    row_start = (row - kernel_size // 2).clamp(0, height - kernel_size)
    col_start = (col - kernel_size // 2).clamp(0, width - kernel_size)

    def mask_mod(b, h, q_idx, kv_idx):
        in_rows = (row[kv_idx] >= row_start[q_idx]) & (row[kv_idx] < row_start[q_idx] + kernel_size)
        in_cols = (col[kv_idx] >= col_start[q_idx]) & (col[kv_idx] < col_start[q_idx] + kernel_size)
        return in_rows & in_cols

    tokens = height * width
    return row, col, create_block_mask(mask_mod, None, None, tokens, tokens, device=device)


def _flex(q: Tensor, k: Tensor, v: Tensor, rpb: Tensor, kernel_size: int, scale: float,
          compiled: bool = True) -> Tensor:
    """Flex attention with a block mask for the clamped windows and the bias as ``score_mod``.
    ``compiled=False`` runs flex attention eagerly (forward only on CPU), which checks the mask
    and bias logic without a GPU."""
    global _compiled_flex
    batch, heads, height, width, c = q.shape
    key = (height, width, kernel_size, str(q.device))
    if torch.compiler.is_compiling():
        row, col, block_mask = _flex_tables(height, width, kernel_size, q.device)
    else:
        if key not in _FLEX_CACHE:
            with torch.inference_mode(False), torch.no_grad():
                _FLEX_CACHE[key] = _flex_tables(height, width, kernel_size, q.device)
        row, col, block_mask = _FLEX_CACHE[key]
    span = 2 * kernel_size - 1
    bias = rpb if rpb.dtype == torch.float64 else rpb.float()   # scores are computed in float32

    def score_mod(score, b, h, q_idx, kv_idx):
        # score_mod also runs on masked entries of partially masked blocks: clamp the index.
        dy = (row[kv_idx] - row[q_idx] + kernel_size - 1).clamp(0, span - 1)
        dx = (col[kv_idx] - col[q_idx] + kernel_size - 1).clamp(0, span - 1)
        return score + bias[h, dy, dx]

    attend = flex_attention
    if compiled and not torch.compiler.is_compiling():
        # Eager callers need a compiled flex attention (its eager form is dense); inside a
        # compiled model dynamo compiles the call itself.
        if _compiled_flex is None:
            # Specialised per (shape, dtype, grad mode): a run meets several (train / eval, last
            # batch), and past dynamo's recompile limit flex would fall back to its dense form.
            config = torch._dynamo.config
            name = 'recompile_limit' if hasattr(config, 'recompile_limit') else 'cache_size_limit'
            setattr(config, name, max(getattr(config, name), 64))
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        attend = _compiled_flex
    tokens = height * width
    flat = lambda t: t.reshape(batch, heads, tokens, c)  # noqa: E731
    out = attend(flat(q), flat(k), flat(v), score_mod=score_mod, block_mask=block_mask, scale=scale)
    return out.reshape(batch, heads, height, width, c)


def kernel_for(q: Tensor, attn_impl: str, dropout_p: float = 0.0) -> str:
    """The kernel that runs for ``q`` (B, heads, H, W, c): ``'tiled'`` (matmul / softmax,
    the reference) off CUDA or with ``'reference'``; on CUDA ``'sdpa'`` (the same tiles through
    SDPA), or ``'flex'`` for large maps when ``attn_impl == 'fused'`` and flex is supported."""
    return choose_kernel(attn_impl, cuda=q.is_cuda, dtype=q.dtype, tokens=q.shape[2] * q.shape[3],
                         dropout_p=dropout_p)


def choose_kernel(attn_impl: str, *, cuda: bool, dtype: torch.dtype, tokens: int, dropout_p: float = 0.0,
                  flex_supported: Optional[bool] = None) -> str:
    """:func:`kernel_for` as a rule of plain values (testable without a GPU)."""
    if not cuda or attn_impl == 'reference':
        return 'tiled'
    flex_ok = FLEX_SUPPORTED if flex_supported is None else flex_supported
    if (attn_impl == 'fused' and flex_ok and dtype in _FLEX_DTYPES and dropout_p == 0
            and tokens >= FLEX_MIN_TOKENS):
        return 'flex'
    return 'sdpa'


def _check_kernel_size(kernel_size: int) -> None:
    if not isinstance(kernel_size, int) or kernel_size < 3 or kernel_size % 2 == 0:
        raise ValueError(f'neighborhood attention needs an odd kernel_size >= 3, got {kernel_size!r}')


@torch.jit.ignore
def neighborhood_attention(q: Tensor, k: Tensor, v: Tensor, rpb: Tensor, kernel_size: int,
                           scale: Optional[float] = None, attn_impl: str = 'auto',
                           dropout_p: float = 0.0) -> Tensor:
    """2-D neighborhood attention with relative position bias.

    Args:
        q, k, v: ``(B, heads, H, W, c)``, with ``H >= kernel_size`` and ``W >= kernel_size``.
        rpb: bias table ``(heads, 2K-1, 2K-1)``.
        kernel_size: odd window size ``K``.
        scale: logit scale, ``c ** -0.5`` by default.
        attn_impl: ``'reference'``, ``'fused'`` or ``'auto'`` (see :func:`kernel_for`).
        dropout_p: dropout on the attention weights (always applied when > 0: pass 0 in eval).
    Returns:
        ``(B, heads, H, W, c)``.
    """
    check_attn_impl(attn_impl)
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
    kernel = kernel_for(q, attn_impl, dropout_p)
    if kernel != 'tiled' and record('neighborhood', kernel, (heads, height, width, q.shape[-1], kernel_size), q):
        kernel = 'tiled'
    return attend_with(kernel, q, k, v, rpb, kernel_size, scale, dropout_p)


def attend_with(kernel: str, q: Tensor, k: Tensor, v: Tensor, rpb: Tensor, kernel_size: int, scale: float,
                dropout_p: float = 0.0) -> Tensor:
    """Run one named kernel (``'tiled'``, ``'sdpa'`` or ``'flex'``) on checked inputs."""
    if kernel == 'flex':
        return _flex(q, k, v, rpb, kernel_size, scale)
    return _tiled(q, k, v, rpb, kernel_size, scale, dropout_p, sdpa=kernel == 'sdpa')


@torch.jit.ignore
def _pad_to_kernel(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Zero-pad an NHWC map at the bottom/right to at least ``kernel_size`` per side."""
    pad_h = max(0, kernel_size - x.shape[1])
    pad_w = max(0, kernel_size - x.shape[2])
    return F.pad(x, (0, 0, 0, pad_w, 0, pad_h)) if pad_h or pad_w else x


@torch.jit.ignore
def _attend_packed(qkv: torch.Tensor, rpb: torch.Tensor, num_heads: int, kernel_size: int, scale: float,
                   attn_impl: str, dropout_p: float) -> torch.Tensor:
    """(B, H, W, 3C) packed q|k|v -> (B, H, W, C) attention output."""
    batch, height, width, _ = qkv.shape
    # One copy into (3, B, heads, H, W, c): the kernels' matmuls then read q, k, v (and the
    # backward its saved inputs) without copying each again.
    q, k, v = qkv.reshape(batch, height, width, 3, num_heads, -1).permute(3, 0, 4, 1, 2, 5).contiguous().unbind(0)
    out = neighborhood_attention(q, k, v, rpb, kernel_size, scale, attn_impl, dropout_p)
    return out.permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1)


# Shape-dependent Python (padding, tiling, kernel choice) stays out of FX graphs: timm's FX
# feature extraction treats these functions as leaves.
for _fn in (neighborhood_attention, attend_with, _pad_to_kernel, _attend_packed):
    register_notrace_function(_fn)
    torch.fx.wrap(_fn.__name__)


# --------------------------------------------------------------------------- module

class NeighborhoodAttention2D(nn.Module):
    """Neighborhood attention block on NCHW maps (natten 0.14.6 semantics, dilation 1).

    Maps smaller than the kernel are zero-padded at the bottom/right before ``qkv`` (padded
    tokens act as keys/values whose k, v equal the qkv bias) and cropped back.
    """

    def __init__(self, *, dim: int, num_heads: int, kernel_size: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, attn_impl: str = 'auto'):
        super().__init__()
        _check_kernel_size(kernel_size)
        if dim % num_heads != 0:
            raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
        self.attn_impl = check_attn_impl(attn_impl)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.kernel_size = kernel_size
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
        trunc_normal_(self.rpb, std=.02, a=-2., b=2.)
        self.attn_drop = nn.Dropout(attn_drop)  # holds the rate; applied inside the op
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: (B, C, H, W) -> (B, C, H, W)."""
        x = x.permute(0, 2, 3, 1)
        qkv = self.qkv(_pad_to_kernel(x, self.kernel_size))
        dropout_p = self.attn_drop.p if self.training else 0.0
        out = _attend_packed(qkv, self.rpb, self.num_heads, self.kernel_size, self.scale, self.attn_impl, dropout_p)
        out = out[:, :x.shape[1], :x.shape[2]]
        out = self.proj_drop(self.proj(out))
        return out.permute(0, 3, 1, 2)     # channels-last strides, as the norms' outputs

    def extra_repr(self) -> str:
        return (f'num_heads={self.num_heads}, head_dim={self.head_dim}, '
                f'kernel_size={self.kernel_size}, attn_impl={self.attn_impl!r}')
