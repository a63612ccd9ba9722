"""Neighborhood attention (models/nat.py) against brute-force definitions, in float64.

The brute force builds the neighbourhood of every query with plain Python loops straight
from the definition (window start ``clamp(i - K//2, 0, L - K)``, bias
``rpb[h, a - i + K - 1, b - j + K - 1]``) and runs dense attention over all H*W keys.
"""
from __future__ import annotations

import functools
import warnings
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from models import nat
from models.nat import NeighborhoodAttention2D, neighborhood_attention

DT = torch.float64
CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- brute force

@functools.lru_cache(maxsize=None)
def brute_tables(height: int, width: int, kernel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, N) neighbourhood mask and flat rpb index, N = H*W, by explicit loops."""
    span = 2 * kernel - 1
    n = height * width
    mask = [[False] * n for _ in range(n)]
    index = [[0] * n for _ in range(n)]
    for i in range(height):
        si = min(max(i - kernel // 2, 0), height - kernel)
        for j in range(width):
            sj = min(max(j - kernel // 2, 0), width - kernel)
            for a in range(si, si + kernel):
                for b in range(sj, sj + kernel):
                    mask[i * width + j][a * width + b] = True
                    index[i * width + j][a * width + b] = (a - i + kernel - 1) * span + (b - j + kernel - 1)
    return torch.tensor(mask), torch.tensor(index)


def brute_attention(q, k, v, rpb, kernel, scale=None):
    """Dense attention over every key, masked to the neighbourhood; autograd-friendly."""
    batch, heads, height, width, c = q.shape
    scale = c ** -0.5 if scale is None else scale
    mask, index = brute_tables(height, width, kernel)
    bias = rpb.flatten(1)[:, index].masked_fill(~mask, float('-inf'))
    flat = lambda t: t.reshape(batch, heads, height * width, c)  # noqa: E731
    logits = torch.einsum('bhnc,bhmc->bhnm', flat(q), flat(k)) * scale + bias
    out = logits.softmax(-1) @ flat(v)
    return out.reshape(batch, heads, height, width, c)


def brute_module(module: NeighborhoodAttention2D, x: torch.Tensor) -> torch.Tensor:
    """The module's computation with explicit zero padding of the NHWC map before qkv."""
    batch, channels, height, width = x.shape
    kernel, heads = module.kernel_size, module.num_heads
    ph, pw = max(height, kernel), max(width, kernel)
    padded = x.new_zeros(batch, ph, pw, channels)
    padded[:, :height, :width] = x.permute(0, 2, 3, 1)
    qkv = padded @ module.qkv.weight.t()
    if module.qkv.bias is not None:
        qkv = qkv + module.qkv.bias
    q, k, v = qkv.split(channels, dim=-1)
    to_heads = lambda t: t.reshape(batch, ph, pw, heads, -1).permute(0, 3, 1, 2, 4)  # noqa: E731
    out = brute_attention(to_heads(q), to_heads(k), to_heads(v), module.rpb, kernel)
    out = out.permute(0, 2, 3, 1, 4).reshape(batch, ph, pw, channels)[:, :height, :width]
    out = out @ module.proj.weight.t() + module.proj.bias
    return out.permute(0, 3, 1, 2)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def make_qkv(batch, heads, height, width, c, kernel, dtype=DT, device='cpu', seed=0, grad=False):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, height, width, c, generator=gen, dtype=dtype) for _ in range(3))
    rpb = torch.randn(heads, 2 * kernel - 1, 2 * kernel - 1, generator=gen, dtype=dtype)
    return [t.to(device).requires_grad_(grad) for t in (q, k, v, rpb)]


# Kernels 3..13 on odd, even, square and non-square maps (every map >= the kernel; smaller
# maps are the module's job, below), a few large enough for several tiles at any kernel.
CASES = [(3, 13, 17), (3, 16, 9), (3, 3, 4), (5, 13, 17), (5, 16, 9), (5, 5, 5),
         (7, 7, 7), (7, 13, 17), (7, 23, 18), (9, 13, 17), (9, 9, 10), (11, 13, 17),
         (11, 12, 11), (13, 13, 17), (13, 13, 13), (13, 16, 14)]
KERNELS = ('tiled', 'sdpa')          # the reference, and the same tiles through SDPA (any device)


def attend(kernel, q, k, v, rpb, kernel_size, scale=None):
    """The public op with ``kernel`` forced (on CPU 'fused' itself runs the tiled kernel)."""
    with mock.patch.object(nat, 'kernel_for', lambda *args, **kwargs: kernel):
        return neighborhood_attention(q, k, v, rpb, kernel_size, scale, attn_impl='fused')


# Query tile sides: 2 cuts every map into several tiles (with an overhanging last tile
# where the side does not divide the map), 64 makes every map one dense tile, None keeps the
# size rule of the op.
TILES = (2, 64, None)


@pytest.fixture(params=TILES, ids=lambda t: f'tile{t}')
def tile(request, monkeypatch):
    if request.param is not None:
        monkeypatch.setattr(nat, 'tile_size', lambda length, kernel_size: min(request.param, length))
    return request.param


# ----------------------------------------------------------------------------- op vs brute force

@pytest.mark.parametrize('kernel,height,width', CASES)
def test_op_matches_brute_force(kernel, height, width, tile):
    """Outputs and the gradients of q, k, v and the bias table, both kernels, in float64."""
    inputs = make_qkv(2, 2, height, width, 3, kernel, seed=kernel * height + width, grad=True)
    grad_out = torch.randn(2, 2, height, width, 3, dtype=DT)
    expected = brute_attention(*inputs, kernel)
    expected_grads = torch.autograd.grad(expected, inputs, grad_out)
    for name in KERNELS:
        out = attend(name, *inputs, kernel)
        assert out.shape == expected.shape and out.dtype == DT
        assert rel_err(out, expected) < 1e-13, name
        for which, got, want in zip('q k v rpb'.split(), torch.autograd.grad(out, inputs, grad_out), expected_grads):
            assert rel_err(got, want) < 1e-12, f'{name}: d{which}'


def test_windows_shift_inwards_at_borders():
    """A corner query sees exactly the K x K block at the corner (not a truncated window)."""
    kernel, height, width = 5, 9, 11
    q, k, v, rpb = make_qkv(1, 1, height, width, 4, kernel)
    q = torch.zeros_like(q)                      # uniform attention over the window
    rpb = torch.zeros_like(rpb)
    for name in KERNELS:
        out = attend(name, q, k, v, rpb, kernel)
        torch.testing.assert_close(out[0, 0, 0, 0], v[0, 0, :kernel, :kernel].mean((0, 1)), rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(out[0, 0, -1, 1], v[0, 0, -kernel:, :kernel].mean((0, 1)), rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(out[0, 0, 4, 6], v[0, 0, 2:7, 4:9].mean((0, 1)), rtol=1e-13, atol=1e-13)


def test_bias_table_orientation():
    """rpb[h, a-i+K-1, b-j+K-1]: a bias on one table cell moves attention to that relative key."""
    kernel, height, width = 3, 6, 7
    q, k, v, rpb = make_qkv(1, 2, height, width, 4, kernel)
    q = torch.zeros_like(q)
    rpb = torch.zeros_like(rpb)
    rpb[1, kernel - 1 + 1, kernel - 1 - 1] = 50.     # head 1 prefers the key one row down, one column left
    out = neighborhood_attention(q, k, v, rpb, kernel, attn_impl='reference')
    torch.testing.assert_close(out[0, 1, 2, 3], v[0, 1, 3, 2], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[0, 0, 2, 3], v[0, 0, 1:4, 2:5].mean((0, 1)), rtol=1e-13, atol=1e-13)


def test_explicit_scale_and_extreme_logits():
    q, k, v, rpb = make_qkv(1, 2, 8, 9, 4, 3)
    for name in KERNELS:
        out = attend(name, q, k, v, rpb, 3, scale=0.3)
        assert rel_err(out, brute_attention(q, k, v, rpb, 3, scale=0.3)) < 1e-13
        # Large logits (a peaked softmax) and an all-zero input stay finite and exact.
        big = attend(name, q * 30, k, v, rpb * 30, 3)
        assert rel_err(big, brute_attention(q * 30, k, v, rpb * 30, 3)) < 1e-12
        zero = attend(name, *(torch.zeros_like(t) for t in (q, k, v, rpb)), 3)
        assert torch.equal(zero, torch.zeros_like(q))


def test_gradcheck_across_tiles(monkeypatch):
    """Jacobian-vector products (gradcheck's fast mode) with tiles of 2: several tiles and an
    overhang on both axes; every gradient is also compared with the brute force above."""
    monkeypatch.setattr(nat, 'tile_size', lambda length, kernel_size: min(2, length))
    inputs = make_qkv(1, 2, 5, 7, 2, 3, grad=True)
    for name in KERNELS:
        assert torch.autograd.gradcheck(lambda q, k, v, rpb: attend(name, q, k, v, rpb, 3, 0.7), inputs,
                                        fast_mode=True)


@pytest.mark.parametrize('shape', [(1, 2, 9, 10, 3), (2, 1, 5, 5, 2)])     # several tiles; one dense tile
def test_custom_ops_pass_opcheck(shape, monkeypatch):
    """The tiled kernel's custom ops: fake (meta) kernels, autograd registration, schema."""
    monkeypatch.setattr(nat, 'tile_size', lambda length, kernel_size: min(4, length) if length > 5 else length)
    q, k, v, rpb = make_qkv(*shape, 3, grad=True)
    torch.library.opcheck(torch.ops.dat_nat.tiled_attention, (q, k, v, rpb, 3, 0.5))
    out, attn = nat._tiled_attention(q, k, v, rpb, 3, 0.5)
    grad = torch.randn_like(out)
    inputs = [t.detach() for t in (grad, q, k, v, rpb, attn, out)]     # no double backward
    torch.library.opcheck(torch.ops.dat_nat.tiled_attention_backward, (*inputs, 3, 0.5))


def test_float32_and_bfloat16_inputs():
    """Low-precision inputs: the scores and softmax run in float32, the output keeps the input dtype."""
    q, k, v, rpb = make_qkv(2, 2, 12, 10, 8, 5)
    expected = brute_attention(q, k, v, rpb, 5)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2e-2)):
        low = [t.to(dtype) for t in (q, k, v)] + [rpb.float()]
        for name in KERNELS:
            out = attend(name, *low, 5)
            assert out.dtype == dtype
            assert rel_err(out.double(), expected) < tol, (dtype, name)


def test_geometry_is_built_once_per_shape():
    nat._GEOMETRY.clear()
    q, k, v, rpb = make_qkv(1, 2, 21, 19, 4, 5)
    neighborhood_attention(q, k, v, rpb, 5, attn_impl='reference')
    (first,) = nat._GEOMETRY.values()
    neighborhood_attention(q, k, v, rpb, 5, attn_impl='fused')
    neighborhood_attention(q[:, :, :16], k[:, :, :16], v[:, :, :16], rpb, 5, attn_impl='reference')
    assert len(nat._GEOMETRY) == 2 and first in nat._GEOMETRY.values()
    # Bounded memory: T*T queries per tile (the last tiles overhang), each over a (T + K - 1)^2 halo.
    t = nat.tile_size(21, 5)
    assert t == nat.tile_size(19, 5) < 19
    assert first.tiles * first.tile_tokens == (-(-21 // t) * t) * (-(-19 // t) * t)
    assert first.halo_tokens == (t + 4) ** 2
    with torch.inference_mode():      # tables first built under inference_mode are still usable with autograd
        nat._GEOMETRY.clear()
        neighborhood_attention(q.detach(), k.detach(), v.detach(), rpb.detach(), 5)
    q.requires_grad_()
    neighborhood_attention(q, k, v, rpb, 5).sum().backward()
    assert q.grad is not None


# ----------------------------------------------------------------------------- module

@pytest.mark.parametrize('kernel,height,width,qkv_bias', [
    (7, 3, 5, True), (5, 4, 9, True), (7, 7, 3, True), (3, 2, 2, False), (3, 1, 1, True),  # smaller than the kernel
    (3, 6, 5, True), (5, 9, 7, False), (7, 18, 15, True)])                                  # no padding needed
@pytest.mark.parametrize('impl', ['reference', 'fused', 'sdpa'])
def test_module_matches_brute_force(kernel, height, width, qkv_bias, impl, monkeypatch):
    if impl == 'sdpa':
        monkeypatch.setattr(nat, 'kernel_for', lambda *args, **kwargs: 'sdpa')
    torch.manual_seed(kernel + height + width)
    module = NeighborhoodAttention2D(dim=8, num_heads=2, kernel_size=kernel, qkv_bias=qkv_bias,
                                     attn_impl='reference' if impl == 'reference' else 'fused').to(DT)
    if qkv_bias:  # a visible bias makes the padded keys/values matter
        torch.nn.init.normal_(module.qkv.bias)
    x = torch.randn(2, 8, height, width, dtype=DT, requires_grad=True)
    out = module(x)
    expected = brute_module(module, x)
    assert out.shape == x.shape
    assert rel_err(out, expected) < 1e-13
    # Same gradients for the input and every parameter.
    grad_out = torch.randn_like(out)
    params = [x, *module.parameters()]
    for got, want in zip(torch.autograd.grad(out, params, grad_out),
                         torch.autograd.grad(expected, params, grad_out)):
        assert rel_err(got, want) < 1e-12


def test_padding_tokens_are_keys():
    """With a map smaller than the kernel, the padded tokens change the output (they are keys)."""
    torch.manual_seed(0)
    module = NeighborhoodAttention2D(dim=4, num_heads=1, kernel_size=5, attn_impl='reference').to(DT)
    torch.nn.init.normal_(module.qkv.bias)
    x = torch.randn(1, 4, 3, 3, dtype=DT)
    # Attention restricted to the 3x3 real tokens only (what a crop-free implementation would do).
    q, k, v = F.linear(x.permute(0, 2, 3, 1), module.qkv.weight, module.qkv.bias).reshape(1, 9, 3, 4).unbind(2)
    rpb = module.rpb[0, 2:5, 2:5].reshape(1, 9)
    real_only = F.linear(((q @ k.transpose(1, 2)) / 2 + rpb).softmax(-1) @ v, module.proj.weight, module.proj.bias)
    out = module(x)
    assert not torch.allclose(out, real_only.reshape(1, 3, 3, 4).permute(0, 3, 1, 2), atol=1e-6)
    assert rel_err(out, brute_module(module, x)) < 1e-13


def test_module_parameters():
    module = NeighborhoodAttention2D(dim=64, num_heads=16, kernel_size=13)
    shapes = {name: tuple(p.shape) for name, p in module.named_parameters()}
    assert shapes == {'qkv.weight': (192, 64), 'qkv.bias': (192,), 'rpb': (16, 25, 25),
                      'proj.weight': (64, 64), 'proj.bias': (64,)}
    assert set(module.state_dict()) == set(shapes)       # no buffers: any map size loads
    assert abs(module.rpb.std().item() - 0.02) < 0.002 and module.rpb.abs().max() < 0.1
    small = NeighborhoodAttention2D(dim=8, num_heads=2, kernel_size=3, qkv_bias=False)
    assert 'qkv.bias' not in dict(small.named_parameters())
    assert small.attn_impl == 'auto'
    with pytest.raises(TypeError):
        NeighborhoodAttention2D(8, 2, 3)                  # keyword-only


@pytest.mark.parametrize('kernel', KERNELS)
def test_attention_dropout(kernel, monkeypatch):
    monkeypatch.setattr(nat, 'kernel_for', lambda *args, **kwargs: kernel)
    torch.manual_seed(0)
    module = NeighborhoodAttention2D(dim=8, num_heads=2, kernel_size=3, attn_drop=0.5).to(DT)
    x = torch.randn(2, 8, 6, 7, dtype=DT)
    plain = NeighborhoodAttention2D(dim=8, num_heads=2, kernel_size=3).to(DT)
    plain.load_state_dict(module.state_dict())
    module.eval()
    assert torch.equal(module(x), plain(x))               # eval: no dropout
    module.train()
    torch.manual_seed(1)
    a = module(x)
    torch.manual_seed(1)
    assert torch.equal(a, module(x))                      # seeded
    assert rel_err(a, plain(x)) > 1e-2                    # and actually applied


@pytest.mark.parametrize('kwargs', [dict(kernel_size=4), dict(kernel_size=1), dict(kernel_size=0),
                                    dict(num_heads=3), dict(attn_impl='flash')])
def test_module_rejects_bad_arguments(kwargs):
    args = dict(dim=8, num_heads=2, kernel_size=3) | kwargs
    with pytest.raises(ValueError):
        NeighborhoodAttention2D(**args)


def test_op_argument_errors():
    q, k, v, rpb = make_qkv(1, 2, 4, 6, 4, 5)
    with pytest.raises(ValueError, match='smaller than kernel_size 5'):
        neighborhood_attention(q, k, v, rpb, 5)
    with pytest.raises(ValueError, match='rpb must have shape'):
        neighborhood_attention(q, k, v, rpb, 3)
    with pytest.raises(ValueError, match='odd kernel_size'):
        neighborhood_attention(q, k, v, rpb, 4)
    with pytest.raises(ValueError, match='attn_impl must be one of'):
        neighborhood_attention(q, k, v, rpb, 3, attn_impl='cuda')
    with pytest.raises(ValueError, match='share one'):
        neighborhood_attention(q, k[:, :1], v, rpb, 3)


# ----------------------------------------------------------------------------- kernel choice

def test_kernel_choice_on_cpu():
    q = torch.zeros(1, 2, 64, 64, 4)
    assert nat.kernel_for(q, 'reference') == 'tiled'
    assert nat.kernel_for(q, 'auto') == 'tiled'          # 'auto' is the reference off CUDA
    assert nat.kernel_for(q, 'fused') == 'tiled'         # the fastest exact kernel on CPU
    q64 = torch.zeros(1, 2, 9, 8, 4, dtype=DT)
    assert torch.equal(neighborhood_attention(q64, q64, q64, torch.zeros(2, 5, 5, dtype=DT), 3),
                       neighborhood_attention(q64, q64, q64, torch.zeros(2, 5, 5, dtype=DT), 3,
                                              attn_impl='reference'))


def test_kernel_rule_for_cuda():
    """On CUDA 'auto' is the verified SDPA tiles at every size; flex only for an explicit 'fused', on a
    torch that supports it, for large maps without attention dropout."""
    f32, large, small = torch.float32, 56 * 56, 14 * 14
    for flex in (True, False):
        rule = lambda impl, **kw: nat.choose_kernel(impl, cuda=True, flex_supported=flex, **kw)  # noqa: E731
        assert rule('auto', dtype=f32, tokens=large) == 'sdpa'
        assert rule('auto', dtype=torch.float16, tokens=small) == 'sdpa'
        assert rule('fused', dtype=f32, tokens=large) == ('flex' if flex else 'sdpa')
        assert rule('fused', dtype=torch.bfloat16, tokens=small) == 'sdpa'
        assert rule('fused', dtype=f32, tokens=large, dropout_p=0.1) == 'sdpa'
        assert rule('fused', dtype=torch.float64, tokens=large) == 'sdpa'
        assert rule('reference', dtype=f32, tokens=large) == 'tiled'
    assert nat.choose_kernel('fused', cuda=False, dtype=f32, tokens=large) == 'tiled'
    old = tuple(int(p) for p in torch.__version__.split('.')[:2]) < nat.FLEX_MIN_TORCH
    assert not (old and nat.FLEX_SUPPORTED)


@pytest.mark.skipif(not CUDA, reason='kernel choice by map size applies on CUDA')
def test_kernel_choice_on_cuda():
    small, large = torch.zeros(1, 2, 14, 14, 4, device='cuda'), torch.zeros(1, 2, 56, 56, 4, device='cuda')
    assert nat.kernel_for(small, 'auto') == 'sdpa'
    assert nat.kernel_for(large, 'auto') == 'sdpa'
    assert nat.kernel_for(large, 'fused') == ('flex' if nat.FLEX_SUPPORTED else 'sdpa')
    assert nat.kernel_for(large, 'fused', dropout_p=0.1) == 'sdpa'     # flex has no attention dropout
    assert nat.kernel_for(large.double(), 'fused') == 'sdpa'
    assert nat.kernel_for(large, 'reference') == 'tiled'


# ----------------------------------------------------------------------------- compile, FX, TorchScript

@pytest.mark.parametrize('kernel', ['tiled', pytest.param('sdpa', marks=pytest.mark.slow)])
def test_compiles_without_graph_breaks(kernel, monkeypatch):
    """The module compiles as one graph (fullgraph: a break raises), forward and backward."""
    from torch._dynamo.utils import counters
    monkeypatch.setattr(nat, 'kernel_for', lambda *args, **kwargs: kernel)
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    module = NeighborhoodAttention2D(dim=8, num_heads=2, kernel_size=3, attn_impl='fused')
    compiled = torch.compile(module, backend='eager', fullgraph=True)
    x = torch.randn(2, 8, 7, 9, requires_grad=True)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, module(x), rtol=0, atol=0)
    assert not counters['graph_break']
    assert counters['stats']['unique_graphs'] == 1
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiles_with_aot_autograd():
    """aot_eager traces the backward too (the reference's hand-written backward included)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    module = NeighborhoodAttention2D(dim=8, num_heads=2, kernel_size=3, attn_impl='reference').to(DT)
    compiled = torch.compile(module, backend='aot_eager', fullgraph=True)
    x = torch.randn(2, 8, 10, 11, dtype=DT, requires_grad=True)
    grads = torch.autograd.grad(compiled(x).sum(), [x, module.rpb])
    expected = torch.autograd.grad(module(x).sum(), [x, module.rpb])
    for got, want in zip(grads, expected):
        assert rel_err(got, want) < 1e-13
    assert not counters['graph_break']
    torch._dynamo.reset()


def test_fx_trace_keeps_the_op_a_leaf():
    from timm.layers import is_notrace_function
    torch.manual_seed(0)
    module = NeighborhoodAttention2D(dim=8, num_heads=2, kernel_size=5).eval()
    traced = torch.fx.symbolic_trace(module)
    targets = {getattr(n.target, '__name__', n.target) for n in traced.graph.nodes if n.op == 'call_function'}
    assert {'_pad_to_kernel', '_attend_packed'} <= targets
    assert is_notrace_function(nat._attend_packed) and is_notrace_function(nat.neighborhood_attention)
    for hw in ((3, 7), (9, 6)):               # shape logic lives in the leaves: any size works
        x = torch.randn(2, 8, *hw)
        assert torch.equal(traced(x), module(x))


def test_torchscript():
    torch.manual_seed(0)
    module = NeighborhoodAttention2D(dim=8, num_heads=2, kernel_size=3).eval()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')       # torch.jit.script is deprecated in recent torch
        scripted = torch.jit.script(module)
    x = torch.randn(1, 8, 2, 6)
    assert torch.equal(scripted(x), module(x))


# ----------------------------------------------------------------------------- flex attention

@pytest.mark.skipif(not nat.FLEX_SUPPORTED, reason=f'flex attention is used from torch '
                    f'{nat.FLEX_MIN_TORCH[0]}.{nat.FLEX_MIN_TORCH[1]} on; this is {torch.__version__}')
@pytest.mark.parametrize('kernel,height,width', [(3, 9, 11), pytest.param(7, 8, 7, marks=pytest.mark.slow)])
def test_flex_mask_and_bias_logic_eager_cpu(kernel, height, width):
    """The flex path's block mask and score_mod, run by eager flex attention (forward, CPU)."""
    q, k, v, rpb = make_qkv(2, 2, height, width, 4, kernel, seed=kernel)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter('ignore')          # "flex_attention called without torch.compile"
        out = nat._flex(q, k, v, rpb, kernel, 0.5, compiled=False)
    assert rel_err(out, brute_attention(q, k, v, rpb, kernel, scale=0.5)) < 1e-13


@pytest.mark.skipif(not CUDA, reason='the fused kernels (SDPA with a bias gradient, flex attention) need CUDA')
@pytest.mark.parametrize('dtype,tol', [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize('kernel,height,width', [(3, 13, 17), (7, 16, 9), (7, 7, 7), (7, 56, 56), (5, 40, 33)])
def test_fused_matches_reference_cuda(dtype, tol, kernel, height, width):
    q, k, v, rpb = make_qkv(2, 4, height, width, 32, kernel, dtype=torch.float32, device='cuda', seed=kernel)
    low = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)] + [rpb.detach().clone().requires_grad_()]
    ref = [t.detach().to(dtype).double().requires_grad_() for t in (q, k, v)] + [rpb.detach().double().requires_grad_()]
    grad_out = torch.randn(2, 4, height, width, 32, device='cuda')
    out = neighborhood_attention(*low, kernel, attn_impl='fused')
    expected = neighborhood_attention(*ref, kernel, attn_impl='reference')
    assert out.dtype == dtype
    assert rel_err(out.double(), expected) < tol
    got = torch.autograd.grad(out, low, grad_out.to(dtype))
    want = torch.autograd.grad(expected, ref, grad_out.double())
    for which, g, w in zip('q k v rpb'.split(), got, want):
        assert rel_err(g.double(), w) < tol, f'd{which}'


@pytest.mark.skipif(not CUDA, reason='the fused kernels need CUDA')
def test_module_fused_matches_reference_cuda():
    torch.manual_seed(0)
    fused = NeighborhoodAttention2D(dim=64, num_heads=2, kernel_size=7, attn_impl='fused').cuda()
    reference = NeighborhoodAttention2D(dim=64, num_heads=2, kernel_size=7, attn_impl='reference').cuda()
    reference.load_state_dict(fused.state_dict())
    for hw in ((5, 9), (14, 14), (15, 22), (40, 36)):          # padded, dense, tiled and flex maps
        x = torch.randn(2, 64, *hw, device='cuda')
        assert rel_err(fused(x), reference(x)) < 1e-4
