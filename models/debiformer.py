"""DeBiFormer: vision transformer with deformable agent bi-level routing attention.

A BatchNorm conv stem, four stages of blocks, a BatchNorm and a linear head. Every block has two
attention sub-blocks, each followed by a conv MLP:

* ``BiLevelRoutingAttention`` (BRA): the map is cut into ``n_win x n_win`` regions; each region
  keeps the ``k`` regions whose mean key best matches its mean query and attends to their pixels.
* ``DeBiLevelRoutingAttention`` (DBRA): agents are sampled at learned (diagonally shifted)
  positions on a strided grid; they gather the map by region routing, are refined by an MLP, and
  every pixel then attends to all agents with a sampled relative-position bias.

Module and parameter names are those of the official release (maclong01/DeBiFormer), so its
checkpoints load with ``strict=True``. Two defects of the release are read as its evident intent:
the misspelt ``uto_pad=`` keyword is ``auto_pad=``, and the agent-grid size that the release
leaves undefined without ``auto_pad`` is the sampled grid's size.

Generalisations (the release raises in these cases; where it runs, results are identical):
a routing ``top-k`` above the number of regions routes to all regions; unsupported input sizes
and widths raise a one-line ``ValueError`` that says what to change; the registered constructors
honour ``num_classes``, ``drop_path_rate`` and the other keywords instead of ignoring them.
"""
from contextlib import nullcontext
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, trunc_normal_
from timm.models import register_notrace_function, register_notrace_module
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch.utils.checkpoint import checkpoint

from .attention_impl import check_attn_impl, use_fused
from .sampling import grid_sample_bilinear

__all__ = ['DeBiFormer', 'BiLevelRoutingAttention', 'DeBiLevelRoutingAttention', 'AGENT_CONSTANTS',
           'checkpoint_filter_fn', 'check_input_size', 'valid_input_sides']

# Per-width constants of the deformable agent attention, keyed by (param_size, stage width):
# (offset groups, offset kernel, agent stride, inner MLP ratio, position-table half size Q).
# The table holds 2Q-1 entries per axis. These are the official values; other widths have none.
AGENT_CONSTANTS: Dict[str, Dict[int, Tuple[int, int, int, int, int]]] = {
    'tiny': {64: (1, 9, 8, 3, 56), 128: (2, 7, 4, 3, 28), 256: (4, 5, 2, 3, 14), 512: (8, 3, 1, 3, 7)},
    'small': {64: (1, 9, 8, 3, 56), 128: (2, 7, 4, 3, 28), 256: (4, 5, 2, 3, 14), 512: (8, 3, 1, 1, 7)},
    'base': {96: (1, 9, 8, 3, 56), 192: (2, 7, 4, 3, 28), 384: (3, 5, 2, 3, 14), 768: (6, 3, 1, 3, 7)},
}

# A stage's ``topks`` entry picks its two attentions: (kind, top-k) for attn1 and attn2.
BLOCK_KINDS: Dict[int, Tuple[Tuple[str, int], Tuple[str, int]]] = {
    4: (('bra', 1), ('dbra', 4)),
    8: (('bra', 4), ('dbra', 8)),
    16: (('bra', 16), ('dbra', 16)),
    -2: (('dbra', 49), ('dbra', 49)),
}


# ----------------------------------------------------------------------------- region helpers
def _to_regions(x: torch.Tensor, n: int) -> torch.Tensor:
    """(N, H, W, C) -> (N, n*n, H/n * W/n, C): regions row-major, pixels row-major inside each."""
    b, h, w, c = x.shape
    x = x.reshape(b, n, h // n, n, w // n, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, n * n, (h // n) * (w // n), c)


def _from_regions(x: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`_to_regions` for regions of ``h x w`` pixels: (N, n*n, h*w, C) -> (N, n*h, n*w, C)."""
    b, c = x.shape[0], x.shape[-1]
    x = x.reshape(b, n, n, h, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, n * h, n * w, c)


def _route(q: torch.Tensor, k: torch.Tensor, scale: float, topk: int) -> torch.Tensor:
    """Indices (N, R, topk) of the regions whose mean key scores highest against each region's mean
    query. Routing is a hard selection on detached descriptors: it sends no gradient."""
    q_mean = q.detach().mean(2)
    k_mean = k.detach().mean(2)
    scores = (q_mean * scale) @ k_mean.transpose(-2, -1)
    return torch.topk(scores, min(topk, scores.shape[-1]), dim=-1).indices


def _gather_regions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(N, R, P, C) gathered by (N, R, k) region indices -> (N, R, k*P, C)."""
    b, r, p, c = x.shape
    k = index.shape[-1]
    offset = torch.arange(b, device=index.device).view(b, 1, 1) * r
    flat = (index + offset).reshape(-1)
    return x.reshape(b * r, p, c).index_select(0, flat).reshape(b, r, k * p, c)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, fused: bool,
            bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(scale * q k^T + bias) v over the last two axes, (B, m, L, c) layout."""
    if fused:
        # SDPA wants the additive mask in the query's dtype (they differ under autocast).
        mask = None if bias is None else bias.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    logits = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1) @ v


def _routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
                      num_heads: int, scale: float, fused: bool) -> torch.Tensor:
    """Every region's queries attend to the pixels of its routed regions.

    q: (N, R, Pq, Cqk); k: (N, R, Pk, Cqk); v: (N, R, Pk, Cv); index: (N, R, topk).
    Heads take consecutive channel blocks; the output (N, R, Pq, Cv) is head-major.
    """
    b, r, pq, cq = q.shape
    cv = v.shape[-1]
    if index.shape[-1] == r:
        # Every region is routed to every region: one attention over all pixels, without
        # materialising r copies of the keys (same keys, so the same result up to rounding).
        qh = q.reshape(b, r * pq, num_heads, cq // num_heads).transpose(1, 2)
        kh = k.reshape(b, -1, num_heads, cq // num_heads).transpose(1, 2)
        vh = v.reshape(b, -1, num_heads, cv // num_heads).transpose(1, 2)
        return _attend(qh, kh, vh, scale, fused).transpose(1, 2).reshape(b, r, pq, cv)
    ks = _gather_regions(k, index)
    vs = _gather_regions(v, index)
    pk = ks.shape[2]
    qh = q.reshape(b * r, pq, num_heads, cq // num_heads).transpose(1, 2)
    kh = ks.reshape(b * r, pk, num_heads, cq // num_heads).transpose(1, 2)
    vh = vs.reshape(b * r, pk, num_heads, cv // num_heads).transpose(1, 2)
    out = _attend(qh, kh, vh, scale, fused)
    return out.transpose(1, 2).reshape(b, r, pq, cv)


def _pad_to_multiple(x: torch.Tensor, n: int, channels_last: bool) -> torch.Tensor:
    """Zero-pad the bottom / right of a map so both sides are multiples of ``n``."""
    h, w = (x.shape[1], x.shape[2]) if channels_last else (x.shape[-2], x.shape[-1])
    pad_h, pad_w = (n - h % n) % n, (n - w % n) % n
    if pad_h == 0 and pad_w == 0:
        return x
    if channels_last:
        return F.pad(x, [0, 0, 0, pad_w, 0, pad_h])
    return F.pad(x, [0, pad_w, 0, pad_h])


# ----------------------------------------------------------------------------- building blocks
class ConvMlp(nn.Module):
    """1x1 conv -> (+ depthwise 3x3 conv of itself) -> GELU -> 1x1 conv, on NCHW maps."""

    def __init__(self, *, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.linear1 = nn.Sequential(nn.Conv2d(dim, hidden_dim, 1))
        self.dwc = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim)
        self.linear2 = nn.Sequential(nn.Conv2d(hidden_dim, dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear1(x)
        x = F.gelu(x + self.dwc(x))
        return self.linear2(x)


class LayerNormProxy(nn.Module):
    """LayerNorm over the channels of an NCHW map (held as ``.norm``, the official name)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class QKVLinear(nn.Module):
    """Joint query / key / value projection of channels-last tokens (output order Q, K, V)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.qkv(x)


class QKVConv(nn.Module):
    """Joint query / key / value 1x1 convolution of an NCHW map (output order Q, K, V)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Conv2d(dim, 3 * dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.qkv(x)


def _check_divisible(name: str, h: int, w: int, n: int, what: str) -> None:
    if h % n != 0 or w % n != 0:
        raise ValueError(f"{name}: {what} {h}x{w} cannot be split into {n}x{n} regions (n_win={n}); "
                         f"use an input size the model accepts (see valid_input_sides) or auto_pad=True")


class _RoutingAttention(nn.Module):
    """The settings both routing attentions share, and fitting their channels-last input to
    ``n_win x n_win`` regions: zero padding with ``auto_pad`` (cropped off the output), else a
    one-line error for a map that does not split."""

    def __init__(self, dim: int, num_heads: int, n_win: int, topk: int, auto_pad: bool, attn_impl: str) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.n_win = n_win
        self.topk = topk
        self.auto_pad = auto_pad
        self.scale = dim ** -0.5
        self.attn_impl = check_attn_impl(attn_impl)

    def _fit(self, x: torch.Tensor, name: str) -> torch.Tensor:
        # ``name`` is passed in (not ``type(self).__name__``), which TorchScript cannot compile.
        if self.auto_pad:
            return _pad_to_multiple(x, self.n_win, channels_last=True)
        _check_divisible(name, x.shape[1], x.shape[2], self.n_win, 'feature map')
        return x

    def _crop(self, out: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return out[:, :height, :width].contiguous() if self.auto_pad else out


class BiLevelRoutingAttention(_RoutingAttention):
    """Bi-level routing attention on channels-last maps (N, H, W, C) -> (N, H, W, C).

    Queries of each of the ``n_win**2`` regions attend to the pixels of the ``topk`` regions
    routed to it; heads use the scale ``dim**-0.5`` of the full width. A depthwise conv of the
    values (LePE) is added before the output projection.
    """

    def __init__(self, *, dim: int, num_heads: int, n_win: int, topk: int, side_dwconv: int = 5,
                 auto_pad: bool = False, attn_impl: str = 'reference') -> None:
        super().__init__(dim, num_heads, n_win, topk, auto_pad, attn_impl)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
        self.qkv = QKVLinear(dim)
        self.wo = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[1], x.shape[2]
        n = self.n_win
        x = self._fit(x, 'BiLevelRoutingAttention')
        h, w = x.shape[1] // n, x.shape[2] // n
        q, k, v = self.qkv(x).split([self.dim, self.dim, self.dim], dim=-1)
        qr, kr, vr = _to_regions(q, n), _to_regions(k, n), _to_regions(v, n)
        index = _route(qr, kr, self.scale, self.topk)
        out = _routed_attention(qr, kr, vr, index, self.num_heads, self.scale, use_fused(self.attn_impl, x))
        out = _from_regions(out, n, h, w)
        out = out + self.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self._crop(self.wo(out), height, width)


class DeBiLevelRoutingAttention(_RoutingAttention):
    """Deformable agent bi-level routing attention on channels-last maps (N, H, W, C) -> (N, H, W, C).

    1. Q, K, V of every pixel (one 1x1 conv). 2. Offsets from Q (per group, a strided depthwise
    conv, LN, GELU and a 1x1 conv to ONE channel) move the agents of a stride-``stride`` grid
    along the diagonal; agents are bilinear samples of the input there. 3. Agent queries gather
    the pixels of their ``topk`` routed regions; the result (plus a strided LePE of V) refines
    the agents, followed by an MLP and LayerNorms. 4. Every pixel query attends to all agents,
    with a relative-position bias sampled from ``rpe_table`` at the pixel-agent displacement.
    """

    def __init__(self, *, dim: int, num_heads: int, n_win: int, topk: int, groups: int, offset_kernel: int,
                 stride: int, mlp_ratio: int, table_size: int, side_dwconv: int = 5, auto_pad: bool = False,
                 attn_impl: str = 'reference') -> None:
        if dim % groups or num_heads % groups:
            raise ValueError(f"DeBiLevelRoutingAttention: width {dim} and heads {num_heads} must both be "
                             f"divisible by the {groups} offset groups")
        super().__init__(dim, num_heads, n_win, topk, auto_pad, attn_impl)
        self.groups = groups
        self.stride = stride
        group_dim = dim // groups

        self.rpe_table = nn.Parameter(torch.zeros(num_heads, 2 * table_size - 1, 2 * table_size - 1))
        self.lepe1 = nn.Conv2d(dim, dim, side_dwconv, stride=stride, padding=side_dwconv // 2, groups=dim)
        self.qkv_conv = QKVConv(dim)
        self.proj_q = nn.Conv2d(dim, dim, 1)
        self.proj_k = nn.Conv2d(dim, dim, 1)
        self.proj_v = nn.Conv2d(dim, dim, 1)
        self.proj_out = nn.Conv2d(dim, dim, 1)
        self.unifyheads1 = nn.Conv2d(dim, dim, 1)
        self.conv_offset_q = nn.Sequential(
            nn.Conv2d(group_dim, group_dim, offset_kernel, stride, offset_kernel // 2, groups=group_dim, bias=False),
            LayerNormProxy(group_dim),
            nn.GELU(),
            nn.Conv2d(group_dim, 1, 1, bias=False),
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ConvMlp(dim=dim, hidden_dim=int(mlp_ratio * dim))
        trunc_normal_(self.rpe_table, std=0.01)

    @staticmethod
    def _agent_reference(hk: int, wk: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Centres of an ``hk x wk`` agent grid, (hk, wk, 2) in normalised (y, x), -1 / 1 at the map edges."""
        ys = torch.arange(hk, dtype=dtype, device=device).add(0.5).div(hk).mul(2).sub(1)
        xs = torch.arange(wk, dtype=dtype, device=device).add(0.5).div(wk).mul(2).sub(1)
        return torch.stack(torch.meshgrid(ys, xs, indexing='ij'), dim=-1)

    @staticmethod
    def _pixel_grid(h: int, w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Pixel centres of an ``h x w`` map, (h*w, 2) in normalised (y, x), -1 / 1 at the first / last pixel."""
        ys = torch.arange(h, dtype=dtype, device=device).div(h - 1.0).mul(2).sub(1)
        xs = torch.arange(w, dtype=dtype, device=device).div(w - 1.0).mul(2).sub(1)
        return torch.stack(torch.meshgrid(ys, xs, indexing='ij'), dim=-1).reshape(h * w, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[1], x.shape[2]
        n, g, m, c = self.n_win, self.groups, self.num_heads, self.dim
        x = self._fit(x, 'DeBiLevelRoutingAttention')
        b, h, w = x.shape[0], x.shape[1], x.shape[2]
        if h < 2 or w < 2:
            raise ValueError(f"DeBiLevelRoutingAttention: feature map {h}x{w} needs at least 2 pixels per side")
        fused = use_fused(self.attn_impl, x)
        x = x.permute(0, 3, 1, 2)
        q, k, v = self.qkv_conv(x).split([c, c, c], dim=1)

        # Agents: a strided grid moved by one learned scalar per agent and group (same on y and x).
        lepe = self.lepe1(v)
        offset = self.conv_offset_q(q.reshape(b * g, c // g, h, w))            # (b*g, 1, hk, wk)
        hk, wk = offset.shape[-2], offset.shape[-1]
        reference = self._agent_reference(hk, wk, x.dtype, x.device)
        pos = (offset.permute(0, 2, 3, 1) + reference).clamp(-1.0, 1.0)        # (b*g, hk, wk, 2), (y, x)
        agents = grid_sample_bilinear(x.reshape(b * g, c // g, h, w), pos.flip(-1)).reshape(b, c, hk, wk)
        if self.auto_pad:       # padded agents: zero features at position (0, 0)
            agents = _pad_to_multiple(agents, n, channels_last=False)
            lepe = _pad_to_multiple(lepe, n, channels_last=False)
            pos = _pad_to_multiple(pos, n, channels_last=True)
        else:
            _check_divisible('DeBiLevelRoutingAttention', hk, wk, n, f'agent grid (stride {self.stride})')
        hg, wg = agents.shape[-2], agents.shape[-1]

        # Agents gather the pixels of their routed regions.
        qa = _to_regions(self.proj_q(agents).permute(0, 2, 3, 1), n)
        kr = _to_regions(k.permute(0, 2, 3, 1), n)
        vr = _to_regions(v.permute(0, 2, 3, 1), n)
        index = _route(qa, kr, self.scale, self.topk)
        gathered = _routed_attention(qa, kr, vr, index, m, self.scale, fused)
        gathered = _from_regions(gathered, n, hg // n, wg // n).permute(0, 3, 1, 2)
        agents = agents + self.unifyheads1(gathered + lepe)
        agents = agents + self.mlp(self.norm2(agents.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        agents = self.norm(agents.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

        # Every pixel attends to all agents, with a bias sampled at the pixel-agent displacement.
        num_agents = hg * wg
        ka = self.proj_k(agents).reshape(b, m, c // m, num_agents).transpose(-2, -1)
        va = self.proj_v(agents).reshape(b, m, c // m, num_agents).transpose(-2, -1)
        qp = q.reshape(b, m, c // m, h * w).transpose(-2, -1)
        grid = self._pixel_grid(h, w, x.dtype, x.device)
        displacement = (grid.view(1, h * w, 1, 2) - pos.reshape(b * g, 1, num_agents, 2)).mul(0.5)
        table = self.rpe_table
        table = table.unsqueeze(0).expand(b, -1, -1, -1).reshape(b * g, m // g, table.shape[-2], table.shape[-1])
        bias = grid_sample_bilinear(table, displacement.flip(-1))
        out = _attend(qp, ka, va, self.scale, fused, bias.reshape(b, m, h * w, num_agents))
        out = self.proj_out(out.transpose(-2, -1).reshape(b, c, h, w)).permute(0, 2, 3, 1)
        return self._crop(out, height, width)


def _build_attention(kind: str, topk: int, dim: int, num_heads: int, n_win: int, agent: Tuple[int, int, int, int, int],
                     side_dwconv: int, auto_pad: bool, attn_impl: str) -> nn.Module:
    if kind == 'bra':
        return BiLevelRoutingAttention(dim=dim, num_heads=num_heads, n_win=n_win, topk=topk, side_dwconv=side_dwconv,
                                       auto_pad=auto_pad, attn_impl=attn_impl)
    groups, kernel, stride, ratio, table = agent
    return DeBiLevelRoutingAttention(dim=dim, num_heads=num_heads, n_win=n_win, topk=topk, groups=groups,
                                     offset_kernel=kernel, stride=stride, mlp_ratio=ratio, table_size=table,
                                     side_dwconv=side_dwconv, auto_pad=auto_pad, attn_impl=attn_impl)


class DeBiFormerBlock(nn.Module):
    """Two pre-norm attention sub-blocks, each with a conv position embedding before it and a conv
    MLP after it; NCHW in and out. Both drop paths of a block share its rate."""

    def __init__(self, *, dim: int, num_heads: int, n_win: int, topk_code: int, mlp_ratio: float,
                 agent: Tuple[int, int, int, int, int], drop_path: float = 0.0, side_dwconv: int = 5,
                 auto_pad: bool = False, attn_impl: str = 'reference') -> None:
        super().__init__()
        (kind1, k1), (kind2, k2) = BLOCK_KINDS[topk_code]
        self.pos_embed1 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.pos_embed2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn1 = _build_attention(kind1, k1, dim, num_heads, n_win, agent, side_dwconv, auto_pad, attn_impl)
        self.attn2 = _build_attention(kind2, k2, dim, num_heads, n_win, agent, side_dwconv, auto_pad, attn_impl)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp1 = ConvMlp(dim=dim, hidden_dim=int(mlp_ratio * dim))
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)
        self.norm4 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp2 = ConvMlp(dim=dim, hidden_dim=int(mlp_ratio * dim))
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed1(x)
        x = x.permute(0, 2, 3, 1)
        x = x + self.drop_path1(self.attn1(self.norm1(x)))
        x = x + self.drop_path1(self.mlp1(self.norm2(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        x = x.permute(0, 3, 1, 2)
        x = x + self.pos_embed2(x)
        x = x.permute(0, 2, 3, 1)
        x = x + self.drop_path2(self.attn2(self.norm3(x)))
        x = x + self.drop_path2(self.mlp2(self.norm4(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        return x.permute(0, 3, 1, 2)


class DeBiFormerStage(nn.Sequential):
    """The blocks of one stage, optionally with gradient checkpointing per block."""

    def __init__(self, blocks: List[nn.Module]) -> None:
        super().__init__(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self:
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


# ----------------------------------------------------------------------------- input sizes
def _half(side: int) -> int:
    return (side + 1) // 2          # a 3x3 / stride 2 / pad 1 conv


def _size_problem(side: int, depth: Sequence[int], n_win: int, strides: Sequence[int], auto_pad: bool) -> Optional[str]:
    """Why an input side does not fit the model, or None when it does."""
    s = _half(_half(side))
    for i in range(4):
        if i > 0:
            s = _half(s)
        if depth[i] == 0:
            continue
        padded = s + (-s) % n_win if auto_pad else s
        if padded < 2:
            return f'stage {i + 1} map side {s} is below 2'
        if auto_pad:
            continue
        if s % n_win:
            return f'stage {i + 1} map side {s} is not a multiple of n_win={n_win}'
        agents = -(-s // strides[i])
        if agents % n_win:
            return f'stage {i + 1} agent grid side {agents} (stride {strides[i]}) is not a multiple of n_win={n_win}'
    return None


def valid_input_sides(model: 'DeBiFormer', limit: int = 1024) -> List[int]:
    """Every input side length up to ``limit`` the model accepts (H and W are independent)."""
    return [s for s in range(1, limit + 1)
            if _size_problem(s, model.depth, model.n_win, model.agent_strides, model.auto_pad) is None]


@register_notrace_function
@torch.jit.ignore
def check_input_size(x: torch.Tensor, depth: List[int], n_win: int, strides: List[int], auto_pad: bool) -> None:
    """One-line ValueError for an input size the model cannot take, naming sizes that work.
    (A public name: torch.fx keeps it as one opaque call, which it does not do for ``_names``.)"""
    for axis, side in (('height', x.shape[-2]), ('width', x.shape[-1])):
        problem = _size_problem(side, depth, n_win, strides, auto_pad)
        if problem is None:
            continue
        near = [s for s in range(1, side + 4096) if _size_problem(s, depth, n_win, strides, auto_pad) is None]
        below = [s for s in near if s < side][-1:]
        above = [s for s in near if s > side][:1]
        hint = ' or '.join(str(s) for s in below + above) or 'none nearby'
        raise ValueError(f"DeBiFormer cannot take input {axis} {side} ({problem}); nearest sides that work: "
                         f"{hint} (or build it with auto_pad=True)")


# ----------------------------------------------------------------------------- the model
class DeBiFormer(nn.Module):
    """DeBiFormer (official constructor keywords; see the module docstring for the architecture).

    ``qk_dims`` must equal ``embed_dim`` (the agent attention needs it); heads per stage are
    ``qk_dims[i] // head_dim``. ``param_size`` selects the per-width agent constants
    (:data:`AGENT_CONSTANTS`); ``topks`` the two attentions of each stage's blocks
    (:data:`BLOCK_KINDS`). ``before_attn_dwconv`` must be 3 (the release pads it by 1).
    ``img_size`` (optional) is only checked: the model takes any size its regions divide, see
    :func:`valid_input_sides`. ``device`` / ``dtype`` place the parameters (timm factory keywords).
    """

    def __init__(
            self,
            *,
            depth: Sequence[int] = (1, 1, 4, 1),
            embed_dim: Sequence[int] = (64, 128, 256, 512),
            qk_dims: Optional[Sequence[int]] = None,
            mlp_ratios: Sequence[float] = (3, 3, 3, 3),
            param_size: str = 'tiny',
            drop_path_rate: float = 0.0,
            drop_rate: float = 0.0,
            n_win: int = 7,
            topks: Sequence[int] = (4, 8, 16, -2),
            head_dim: int = 32,
            side_dwconv: int = 5,
            before_attn_dwconv: int = 3,
            auto_pad: bool = False,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            img_size: Optional[Union[int, Sequence[int]]] = None,
            attn_impl: str = 'reference',
            device: Optional[Union[str, torch.device]] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        with torch.device(device) if device is not None else nullcontext():
            self._build(depth, embed_dim, qk_dims, mlp_ratios, param_size, drop_path_rate, drop_rate, n_win, topks,
                        head_dim, side_dwconv, before_attn_dwconv, auto_pad, num_classes, in_chans, global_pool,
                        img_size, attn_impl)
        if dtype is not None:
            self.to(dtype=dtype)

    def _build(self, depth, embed_dim, qk_dims, mlp_ratios, param_size, drop_path_rate, drop_rate, n_win, topks,
               head_dim, side_dwconv, before_attn_dwconv, auto_pad, num_classes, in_chans, global_pool, img_size,
               attn_impl) -> None:
        depth, embed_dim = [int(d) for d in depth], [int(c) for c in embed_dim]
        qk_dims = list(embed_dim) if qk_dims is None else [int(c) for c in qk_dims]
        for name, value in (('depth', depth), ('embed_dim', embed_dim), ('qk_dims', qk_dims),
                            ('mlp_ratios', mlp_ratios), ('topks', topks)):
            if len(value) != 4:
                raise ValueError(f'DeBiFormer: {name} needs one value per stage (4), got {list(value)}')
        if qk_dims != embed_dim:
            raise ValueError(f'DeBiFormer: qk_dims {qk_dims} must equal embed_dim {embed_dim} '
                             f'(the deformable agent attention projects queries and keys at full width)')
        if param_size not in AGENT_CONSTANTS:
            raise ValueError(f"DeBiFormer: param_size {param_size!r} is not one of {sorted(AGENT_CONSTANTS)}")
        if before_attn_dwconv != 3:
            raise ValueError(f'DeBiFormer: before_attn_dwconv={before_attn_dwconv} is not supported; the '
                             f'position conv is padded by 1, so only 3 keeps the map size')
        if side_dwconv < 1 or side_dwconv % 2 == 0:
            raise ValueError(f'DeBiFormer: side_dwconv={side_dwconv} must be a positive odd kernel size')
        if n_win < 1:
            raise ValueError(f'DeBiFormer: n_win={n_win} must be positive')
        if global_pool not in ('avg', ''):
            raise ValueError(f"DeBiFormer: global_pool {global_pool!r} must be 'avg' or ''")
        if in_chans < 1:
            raise ValueError(f'DeBiFormer: in_chans={in_chans} must be positive')

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.depth = depth
        self.n_win = n_win
        self.auto_pad = auto_pad
        self.num_features = self.head_hidden_size = embed_dim[-1]
        self.grad_checkpointing = False

        agents: List[Tuple[int, int, int, int, int]] = []
        for i in range(4):
            if depth[i] == 0:           # no block: the width only sizes the down-sampling conv
                agents.append((1, 1, 1, 1, 1))
                continue
            if topks[i] not in BLOCK_KINDS:
                raise ValueError(f'DeBiFormer: topks[{i}]={topks[i]} is not one of {sorted(BLOCK_KINDS)}')
            table = AGENT_CONSTANTS[param_size]
            if embed_dim[i] not in table:
                raise ValueError(f"DeBiFormer: param_size {param_size!r} has no agent constants for stage "
                                 f"{i + 1} width {embed_dim[i]}; widths it defines: {sorted(table)}")
            heads = qk_dims[i] // head_dim
            if heads < 1 or embed_dim[i] % heads:
                raise ValueError(f'DeBiFormer: stage {i + 1} width {embed_dim[i]} with head_dim {head_dim} '
                                 f'gives {heads} heads; the width must be a positive multiple of head_dim')
            agents.append(table[embed_dim[i]])
        self.agent_strides = [a[2] for a in agents]
        if img_size is not None:
            sides = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
            check_input_size(torch.empty(0, 0, *sides, device='meta'), depth, n_win, self.agent_strides, auto_pad)

        stem = embed_dim[0] // 2
        self.downsample_layers = nn.ModuleList([nn.Sequential(
            nn.Conv2d(in_chans, stem, 3, 2, 1), nn.BatchNorm2d(stem), nn.GELU(),
            nn.Conv2d(stem, embed_dim[0], 3, 2, 1), nn.BatchNorm2d(embed_dim[0]))])
        for i in range(1, 4):
            self.downsample_layers.append(nn.Sequential(
                nn.Conv2d(embed_dim[i - 1], embed_dim[i], 3, 2, 1), nn.BatchNorm2d(embed_dim[i])))

        rates = [r.item() for r in torch.linspace(0, drop_path_rate, sum(depth), device='cpu')]
        self.stages = nn.ModuleList()
        self.feature_info: List[Dict[str, Any]] = []
        start = 0
        for i in range(4):
            self.stages.append(DeBiFormerStage([
                DeBiFormerBlock(dim=embed_dim[i], num_heads=qk_dims[i] // head_dim, n_win=n_win, topk_code=topks[i],
                                mlp_ratio=mlp_ratios[i], agent=agents[i], drop_path=rates[start + j],
                                side_dwconv=side_dwconv, auto_pad=auto_pad, attn_impl=attn_impl)
                for j in range(depth[i])]))
            start += depth[i]
            self.feature_info.append(dict(num_chs=embed_dim[i], reduction=4 * 2 ** i, module=f'stages.{i}'))

        self.norm = nn.BatchNorm2d(embed_dim[-1])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim[-1], num_classes) if num_classes > 0 else nn.Identity()

    # -- optimizer and timm hooks ------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return set()

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> Set[str]:
        # The official recipe decays everything but 1-D parameters and biases, position tables included.
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^downsample_layers\.0',
                    blocks=r'^stages\.(\d+)' if coarse else [(r'^stages\.(\d+)\.(\d+)', None),
                                                            (r'^downsample_layers\.(\d+)', (0,)),
                                                            (r'^norm', (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ('avg', ''):
                raise ValueError(f"DeBiFormer: global_pool {global_pool!r} must be 'avg' or ''")
            self.global_pool = global_pool
        ref = self.norm.weight if isinstance(self.norm, nn.BatchNorm2d) else next(self.parameters())
        self.head = (nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
                     if num_classes > 0 else nn.Identity()).train(self.training)

    # -- forward -----------------------------------------------------------------
    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False
                              ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (NCHW, strides 4/8/16/32), timm's ``forward_intermediates`` protocol.

        ``norm=True`` applies the final BatchNorm to the last stage's map (the one norm the model owns).
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"DeBiFormer returns NCHW stage maps; got output_fmt={output_fmt!r}")
        check_input_size(x, self.depth, self.n_win, self.agent_strides, self.auto_pad)
        take, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        intermediates: List[torch.Tensor] = []
        num_run = max_index + 1 if stop_early else len(self.stages)
        for i in range(num_run):
            x = self.stages[i](self.downsample_layers[i](x))
            if i in take:
                intermediates.append(self.norm(x) if norm and i == last else x)
        if intermediates_only:
            return intermediates
        if num_run == len(self.stages) == 4:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the stages after the last wanted one (and the norm / head) for a features-only model."""
        take, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        self.downsample_layers = self.downsample_layers[:max_index + 1]
        if prune_norm or max_index < 3:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised last-stage map (N, C3, H/32, W/32)."""
        check_input_size(x, self.depth, self.n_win, self.agent_strides, self.auto_pad)
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x.flatten(2).mean(-1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


register_notrace_module(BiLevelRoutingAttention)
register_notrace_module(DeBiLevelRoutingAttention)


# ----------------------------------------------------------------------------- checkpoints and timm
def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Official or project checkpoint -> ``model``'s state dict: unwraps ``{'model': ...}`` /
    ``{'state_dict': ...}`` and strips ``module.`` / ``_orig_mod.`` prefixes. Names are the
    official ones and position tables do not depend on the input size, so nothing is renamed."""
    for key in ('model', 'state_dict'):
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
            break
    out = {}
    for name, value in state_dict.items():
        while name.startswith(('module.', '_orig_mod.')):
            name = name.split('.', 1)[1]
        out[name] = value
    return out


# Registered variants: official architecture keywords (debiformer_facts.md section 1).
VARIANTS: Dict[str, Dict[str, Any]] = {
    'debiformer_tiny': dict(depth=(1, 1, 4, 1), embed_dim=(64, 128, 256, 512), mlp_ratios=(3, 3, 3, 3),
                            param_size='tiny', drop_path_rate=0.0),
    'debiformer_small': dict(depth=(2, 2, 9, 3), embed_dim=(64, 128, 256, 512), mlp_ratios=(3, 3, 3, 2),
                             param_size='small', drop_path_rate=0.3),
    'debiformer_base': dict(depth=(2, 2, 9, 2), embed_dim=(96, 192, 384, 768), mlp_ratios=(3, 3, 3, 3),
                            param_size='base', drop_path_rate=0.4),
}


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    # Valid sides are 224k-3 .. 224k only (with n_win 7), so nothing may shrink the input below 224.
    return dict(num_classes=1000, input_size=(3, 224, 224), min_input_size=(3, 224, 224), pool_size=(7, 7),
                crop_pct=0.875, interpolation='bicubic', mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                first_conv='downsample_layers.0.0', classifier='head',
                origin_url='https://github.com/maclong01/DeBiFormer', **kwargs)


# No URLs: the release publishes no downloadable weights; load a local file with
# pretrained_cfg_overlay=dict(file='/path/to/checkpoint.pth').
default_cfgs = generate_default_cfgs({f'{name}.in1k': _cfg() for name in VARIANTS})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> DeBiFormer:
    if pretrained:
        from timm.models import resolve_pretrained_cfg
        cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                     pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
        if not cfg.file and cfg.state_dict is None:
            raise RuntimeError(f"{variant}: pretrained=True needs a local checkpoint (nothing is downloaded); "
                               f"pass pretrained_cfg_overlay=dict(file='/path/to/checkpoint.pth')")
    model_kwargs = {**VARIANTS[variant], **kwargs}
    return build_model_with_cfg(
        DeBiFormer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        # Stages and down-sampling layers interleave, so features come from forward_intermediates.
        feature_cfg=dict(feature_cls='getter', out_indices=(0, 1, 2, 3)),
        **model_kwargs)


@register_model
def debiformer_tiny(pretrained: bool = False, **kwargs: Any) -> DeBiFormer:
    """DeBiFormer-T: 21.50M params, 2.6 GFLOPs at 224 (official debi_tiny)."""
    return _create('debiformer_tiny', pretrained, **kwargs)


@register_model
def debiformer_small(pretrained: bool = False, **kwargs: Any) -> DeBiFormer:
    """DeBiFormer-S: 44.01M params, 5.4 GFLOPs at 224 (official debi_small)."""
    return _create('debiformer_small', pretrained, **kwargs)


@register_model
def debiformer_base(pretrained: bool = False, **kwargs: Any) -> DeBiFormer:
    """DeBiFormer-B: 95.50M params (the paper lists 77M), 11.7 GFLOPs at 224 (official debi_base)."""
    return _create('debiformer_base', pretrained, **kwargs)
