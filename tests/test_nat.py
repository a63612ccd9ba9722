"""Neighborhood attention (models/nat.py) against brute-force definitions, in float64.

The brute force builds the neighbourhood of every query with plain Python loops straight
from the definition (window start ``clamp(i - K//2, 0, L - K)``, bias
``rpb[h, a - i + K - 1, b - j + K - 1]``) and runs dense attention over all H*W keys.
"""
from __future__ import annotations

import warnings

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
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- brute force

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


# Kernels 3..13 on odd, even, square and non-square maps (every map >= the kernel).
CASES = [(3, 13, 17), (3, 16, 9), (3, 3, 4), (5, 13, 17), (5, 16, 9), (5, 5, 5),
         (7, 7, 7), (7, 13, 17), (7, 16, 9), (9, 13, 17), (9, 9, 10), (11, 13, 17),
         (11, 12, 11), (13, 13, 17), (13, 13, 13), (13, 16, 14)]
REFERENCE_IMPLS = {'dense': nat._reference_dense, 'gather': nat._reference_gather}


# ----------------------------------------------------------------------------- op vs brute force

@pytest.mark.parametrize('kernel,height,width', CASES)
def test_reference_matches_brute_force(kernel, height, width):
    q, k, v, rpb = make_qkv(2, 3, height, width, 5, kernel, seed=kernel * height + width)
    expected = brute_attention(q, k, v, rpb, kernel)
    # Both reference variants, whichever the public op picks for this size.
    for name, impl in REFERENCE_IMPLS.items():
        out = impl(q, k, v, rpb, kernel, 5 ** -0.5, 0.)
        assert rel_err(out, expected) < 1e-13, name
    out = neighborhood_attention(q, k, v, rpb, kernel, impl='reference')
    assert out.shape == q.shape and out.dtype == DT
    assert rel_err(out, expected) < 1e-13


def test_windows_shift_inwards_at_borders():
    """A corner query sees exactly the K x K block at the corner (not a truncated window)."""
    kernel, height, width = 5, 9, 11
    q, k, v, rpb = make_qkv(1, 1, height, width, 4, kernel)
    q = torch.zeros_like(q)                      # uniform attention over the window
    rpb = torch.zeros_like(rpb)
    out = neighborhood_attention(q, k, v, rpb, kernel, impl='reference')
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
    out = neighborhood_attention(q, k, v, rpb, kernel, impl='reference')
    torch.testing.assert_close(out[0, 1, 2, 3], v[0, 1, 3, 2], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[0, 0, 2, 3], v[0, 0, 1:4, 2:5].mean((0, 1)), rtol=1e-13, atol=1e-13)


def test_explicit_scale():
    q, k, v, rpb = make_qkv(1, 2, 8, 9, 4, 3)
    out = neighborhood_attention(q, k, v, rpb, 3, scale=0.3, impl='reference')
    assert rel_err(out, brute_attention(q, k, v, rpb, 3, scale=0.3)) < 1e-13


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize('variant', sorted(REFERENCE_IMPLS))
@pytest.mark.parametrize('kernel,height,width,fast', [(3, 3, 4, False), (3, 5, 6, True), (5, 6, 5, True)])
def test_gradcheck(variant, kernel, height, width, fast):
    inputs = make_qkv(1, 2 if fast else 1, height, width, 2, kernel, grad=True)
    impl = REFERENCE_IMPLS[variant]
    # The full Jacobian on the tiny case; random projections of it (fast_mode) on the larger
    # ones, whose complete gradients are also compared with the brute force below.
    assert torch.autograd.gradcheck(lambda q, k, v, rpb: impl(q, k, v, rpb, kernel, 0.7, 0.), inputs,
                                   fast_mode=fast)


@pytest.mark.parametrize('kernel,height,width', [(3, 13, 17), (7, 9, 8)])
def test_gradients_match_brute_force(kernel, height, width):
    inputs = make_qkv(2, 2, height, width, 4, kernel, grad=True, seed=3)
    grad_out = torch.randn(2, 2, height, width, 4, dtype=DT)
    expected = torch.autograd.grad(brute_attention(*inputs, kernel), inputs, grad_out)
    for name, impl in REFERENCE_IMPLS.items():
        got = torch.autograd.grad(impl(*inputs, kernel, 4 ** -0.5, 0.), inputs, grad_out)
        for which, g, e in zip('q k v rpb'.split(), got, expected):
            assert rel_err(g, e) < 1e-12, f'{name}: d{which}'


# ----------------------------------------------------------------------------- module

@pytest.mark.parametrize('kernel,height,width,qkv_bias', [
    (7, 3, 5, True), (5, 4, 9, True), (7, 7, 3, True), (3, 2, 2, False),   # smaller than the kernel
    (3, 6, 5, True), (5, 9, 7, False)])                                     # no padding needed
def test_module_matches_brute_force(kernel, height, width, qkv_bias):
    torch.manual_seed(kernel + height + width)
    module = NeighborhoodAttention2D(8, 2, kernel, qkv_bias=qkv_bias, impl='reference').to(DT)
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
    module = NeighborhoodAttention2D(4, 1, 5, impl='reference').to(DT)
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
    module = NeighborhoodAttention2D(64, 16, 13)
    shapes = {name: tuple(p.shape) for name, p in module.named_parameters()}
    assert shapes == {'qkv.weight': (192, 64), 'qkv.bias': (192,), 'rpb': (16, 25, 25),
                      'proj.weight': (64, 64), 'proj.bias': (64,)}
    assert set(module.state_dict()) == set(shapes)       # no buffers: any map size loads
    assert abs(module.rpb.std().item() - 0.02) < 0.002 and module.rpb.abs().max() < 0.1
    assert 'qkv.bias' not in dict(NeighborhoodAttention2D(8, 2, 3, qkv_bias=False).named_parameters())


def test_attention_dropout():
    torch.manual_seed(0)
    module = NeighborhoodAttention2D(8, 2, 3, attn_drop=0.5).to(DT)
    x = torch.randn(2, 8, 6, 7, dtype=DT)
    plain = NeighborhoodAttention2D(8, 2, 3).to(DT)
    plain.load_state_dict(module.state_dict())
    module.eval()
    assert torch.equal(module(x), plain(x))               # eval: no dropout
    module.train()
    torch.manual_seed(1)
    a = module(x)
    torch.manual_seed(1)
    assert torch.equal(a, module(x))                      # seeded
    assert rel_err(a, plain(x)) > 1e-2                    # and actually applied


@pytest.mark.parametrize('kwargs', [dict(kernel_size=4), dict(kernel_size=1), dict(num_heads=3), dict(impl='flash')])
def test_module_rejects_bad_arguments(kwargs):
    args = dict(dim=8, num_heads=2, kernel_size=3) | kwargs
    with pytest.raises(ValueError):
        NeighborhoodAttention2D(**args)


# ----------------------------------------------------------------------------- dispatch

def test_fused_on_cpu_raises_clear_error():
    q, k, v, rpb = make_qkv(1, 2, 5, 5, 4, 3, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"impl='fused' needs CUDA"):
        neighborhood_attention(q, k, v, rpb, 3, impl='fused')
    module = NeighborhoodAttention2D(8, 2, 3, impl='fused')
    with pytest.raises(RuntimeError, match=r"impl='fused' needs CUDA"):
        module(torch.randn(1, 8, 5, 5))


def test_auto_on_cpu_is_reference():
    for dtype in (torch.float32, DT):
        q, k, v, rpb = make_qkv(2, 2, 9, 8, 4, 5, dtype=dtype)
        assert torch.equal(neighborhood_attention(q, k, v, rpb, 5),
                           neighborhood_attention(q, k, v, rpb, 5, impl='reference'))


def test_dispatch_rules(monkeypatch):
    q = torch.zeros(1, 1, 3, 3, 4)
    assert nat._select_impl('auto', q, 0.) == 'reference'
    monkeypatch.setattr(nat, 'fused_available', lambda device=None: True)   # pretend CUDA
    assert nat._select_impl('auto', q, 0.) == 'fused'
    assert nat._select_impl('auto', q, 0.1) == 'reference'          # no dropout in the fused path
    assert nat._select_impl('auto', q.double(), 0.) == 'reference'  # no float64 either
    assert nat._select_impl('reference', q, 0.) == 'reference'
    with pytest.raises(ValueError, match='dropout'):
        nat._select_impl('fused', q, 0.1)
    with pytest.raises(ValueError, match='impl must be one of'):
        nat._select_impl('cuda', q, 0.)


def test_op_argument_errors():
    q, k, v, rpb = make_qkv(1, 2, 4, 6, 4, 5)
    with pytest.raises(ValueError, match='smaller than kernel_size 5'):
        neighborhood_attention(q, k, v, rpb, 5)
    with pytest.raises(ValueError, match='rpb must have shape'):
        neighborhood_attention(q, k, v, rpb, 3)
    with pytest.raises(ValueError, match='odd kernel_size'):
        neighborhood_attention(q, k, v, rpb, 4)


# ----------------------------------------------------------------------------- fused path

@pytest.mark.skipif(nat.flex_attention is None, reason='torch without flex attention')
@pytest.mark.parametrize('kernel,height,width', [(3, 13, 17), (7, 16, 9), (5, 5, 5), (13, 13, 14)])
def test_flex_mask_and_bias_logic_eager_cpu(kernel, height, width):
    """The fused path's block mask and score_mod, run by eager flex attention (forward, CPU)."""
    q, k, v, rpb = make_qkv(2, 2, height, width, 4, kernel, seed=kernel)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter('ignore')          # "flex_attention called without torch.compile"
        out = nat._fused(q, k, v, rpb, kernel, 0.5, compiled=False)
    assert rel_err(out, brute_attention(q, k, v, rpb, kernel, scale=0.5)) < 1e-13


@pytest.mark.skipif(not CUDA, reason='the fused (flex attention) path needs CUDA')
@pytest.mark.parametrize('dtype,tol', [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize('kernel,height,width', [(3, 13, 17), (7, 16, 9), (7, 7, 7), (5, 56, 56)])
def test_fused_matches_reference_cuda(dtype, tol, kernel, height, width):
    q, k, v, rpb = make_qkv(2, 4, height, width, 32, kernel, dtype=torch.float32, device='cuda', seed=kernel)
    low = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)] + [rpb.detach().clone().requires_grad_()]
    ref = [t.detach().to(dtype).float().requires_grad_() for t in (q, k, v)] + [rpb.detach().clone().requires_grad_()]
    grad_out = torch.randn(2, 4, height, width, 32, device='cuda')
    out = neighborhood_attention(*low, kernel, impl='fused')
    expected = neighborhood_attention(*ref, kernel, impl='reference')
    assert out.dtype == dtype
    assert rel_err(out.float(), expected) < tol
    got = torch.autograd.grad(out, low, grad_out.to(dtype))
    want = torch.autograd.grad(expected, ref, grad_out)
    for which, g, w in zip('q k v rpb'.split(), got, want):
        assert rel_err(g.float(), w) < tol, f'd{which}'


@pytest.mark.skipif(not CUDA, reason='the fused (flex attention) path needs CUDA')
def test_module_fused_matches_reference_cuda():
    torch.manual_seed(0)
    fused = NeighborhoodAttention2D(64, 2, 7, impl='fused').cuda()
    reference = NeighborhoodAttention2D(64, 2, 7, impl='reference').cuda()
    reference.load_state_dict(fused.state_dict())
    for hw in ((5, 9), (14, 14), (15, 22)):          # padded and plain maps
        x = torch.randn(2, 64, *hw, device='cuda')
        assert rel_err(fused(x), reference(x)) < 1e-4
