"""Slide attention (models/slide.py) against a loop over pixels and window taps."""

import numpy as np
import pytest
import torch
from torch.func import functional_call

from conftest import SHARED_FIXTURES, needs_fixtures
from models.slide import SlideAttention

FIXTURE = SHARED_FIXTURES / 'dat_official' / 'mini_mix.pt'


def _make(dim=32, heads=2, ka=3, seed=0, perturb_shift=False):
    """Module in float64 with the trainable parameters moved well away from their init."""
    torch.manual_seed(seed)
    m = SlideAttention(dim, num_heads=heads, ka=ka).double()
    with torch.no_grad():
        m.relative_position_bias_table.normal_(0.0, 0.5)
        m.dep_conv.bias.normal_(0.0, 0.3)
        m.dep_conv1.bias.normal_(0.0, 0.3)
        if perturb_shift:  # the official fixtures store a perturbed shift kernel
            m.dep_conv.weight.add_(0.05 * torch.randn_like(m.dep_conv.weight))
    return m


def brute_force(m: SlideAttention, x: torch.Tensor) -> np.ndarray:
    """Explicit loops over pixels, heads, channels and the ka*ka window taps."""
    x = x.detach().numpy()
    B, C, H, W = x.shape
    nh, cr, ka, Cr = m.num_heads, m.reduced_head_dim, m.ka, m.reduced_dim
    T, r0 = ka * ka, ka // 2
    npy = lambda t: t.detach().numpy()
    qkv = np.einsum('oc,bchw->bohw', npy(m.qkv.weight), x) + npy(m.qkv.bias)[None, :, None, None]
    kern = npy(m.dep_conv.weight)[:, 0] + npy(m.dep_conv1.weight)[:, 0]   # (cr*T, ka, ka)
    bias = npy(m.dep_conv.bias) + npy(m.dep_conv1.bias)
    table = npy(m.relative_position_bias_table).reshape(nh, T)
    reduced = np.zeros((B, Cr, H, W))
    for b in range(B):
        for h in range(nh):
            q_ch, k_ch, v_ch = (h * 3 * cr + j * cr for j in range(3))   # per head: q, k, v blocks
            for y in range(H):
                for xx in range(W):
                    keys, vals = np.zeros((cr, T)), np.zeros((cr, T))
                    for c in range(cr):
                        for t in range(T):
                            o = c * T + t
                            keys[c, t] = vals[c, t] = bias[o]
                            for row in range(ka):
                                for col in range(ka):
                                    yy, xs = y + row - r0, xx + col - r0
                                    if 0 <= yy < H and 0 <= xs < W:   # zero padding
                                        keys[c, t] += kern[o, row, col] * qkv[b, k_ch + c, yy, xs]
                                        vals[c, t] += kern[o, row, col] * qkv[b, v_ch + c, yy, xs]
                    q = qkv[b, q_ch:q_ch + cr, y, xx] * m.scale
                    logits = q @ (keys + table[h][None, :])
                    attn = np.exp(logits - logits.max())
                    attn /= attn.sum()
                    reduced[b, h * cr:(h + 1) * cr, y, xx] = vals @ attn
    return np.einsum('oc,bchw->bohw', npy(m.proj.weight), reduced) + npy(m.proj.bias)[None, :, None, None]


@pytest.mark.parametrize('perturb_shift', [False, True])
def test_matches_brute_force(perturb_shift):
    m = _make(perturb_shift=perturb_shift)
    x = torch.randn(2, 32, 5, 6, dtype=torch.float64)
    np.testing.assert_allclose(m(x).detach().numpy(), brute_force(m, x), rtol=1e-10, atol=1e-12)


def test_matches_brute_force_single_head_window5():
    m = _make(dim=16, heads=1, ka=5, seed=3)
    x = torch.randn(1, 16, 4, 7, dtype=torch.float64)
    np.testing.assert_allclose(m(x).detach().numpy(), brute_force(m, x), rtol=1e-10, atol=1e-12)


def test_shift_kernel_is_frozen_one_hot():
    m = SlideAttention(32, num_heads=2)
    w = m.dep_conv.weight
    assert not w.requires_grad and w.shape == (36, 1, 3, 3)
    for c in range(4):
        for t in range(9):
            expected = torch.zeros(3, 3)
            expected[t // 3, t % 3] = 1.0
            assert torch.equal(w[c * 9 + t, 0], expected)
    # Functionally: channel c*9+t at (y, x) is input channel c at (y + row - 1, x + col - 1), else 0.
    inp = torch.randn(1, 4, 5, 6)
    with torch.no_grad():
        shifted = m.dep_conv(inp) - m.dep_conv.bias.view(1, -1, 1, 1)
    padded = torch.nn.functional.pad(inp, (1, 1, 1, 1))
    for c in range(4):
        for t in range(9):
            row, col = divmod(t, 3)
            torch.testing.assert_close(shifted[0, c * 9 + t], padded[0, c, row:row + 5, col:col + 6])


def test_gradients_reach_everything_but_the_shift_kernel():
    m = SlideAttention(32, num_heads=2)
    m(torch.randn(2, 32, 5, 4)).square().sum().backward()
    assert m.dep_conv.weight.grad is None
    for name, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert 'dep_conv.bias' in trainable and 'dep_conv1.weight' in trainable
    assert 'dep_conv.weight' not in trainable


def test_dep_conv1_keeps_default_init():
    torch.manual_seed(0)
    m = SlideAttention(32, num_heads=2)
    w = m.dep_conv1.weight
    assert w.abs().max() <= 1 / 3 and w.std() > 0.1   # PyTorch default, fan_in 9: U(-1/3, 1/3)


def test_gradcheck_input_and_parameters():
    m = _make(dim=8, heads=2, seed=2)
    named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    params = tuple(p.detach().clone().requires_grad_(True) for _, p in named)
    x = torch.randn(1, 8, 3, 4, dtype=torch.float64, requires_grad=True)

    def fn(inp, *ps):
        return functional_call(m, dict(zip(names, ps)), (inp,))

    assert torch.autograd.gradcheck(fn, (x,) + params, eps=1e-6, atol=1e-7)


def test_parameter_shapes_and_scale():
    m = SlideAttention(32, num_heads=2)
    shapes = {n: tuple(t.shape) for n, t in m.state_dict().items()}
    assert shapes == {
        'qkv.weight': (24, 32), 'qkv.bias': (24,), 'proj.weight': (32, 8), 'proj.bias': (32,),
        'dep_conv.weight': (36, 1, 3, 3), 'dep_conv.bias': (36,),
        'dep_conv1.weight': (36, 1, 3, 3), 'dep_conv1.bias': (36,),
        'relative_position_bias_table': (1, 2, 1, 9, 1, 1),
    }
    assert m.scale == pytest.approx(16 ** -0.5)   # full head width, not the reduced one


@pytest.mark.parametrize('hw', [(7, 5), (1, 1), (2, 9)])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_odd_and_non_square_maps_keep_size(hw, dtype):
    m = SlideAttention(16, num_heads=2).to(dtype)
    y = m(torch.randn(2, 16, *hw, dtype=dtype))
    assert y.shape == (2, 16, *hw) and y.dtype == dtype and torch.isfinite(y).all()


@needs_fixtures
def test_loads_official_state_dict_and_keeps_kernel_frozen():
    sd = torch.load(FIXTURE, weights_only=True)['state_dict']
    prefix = 'stages.1.attns.0.'
    sub = {n[len(prefix):]: t for n, t in sd.items() if n.startswith(prefix)}
    m = SlideAttention(32, num_heads=2).double()
    m.load_state_dict(sub, strict=True)
    assert not m.dep_conv.weight.requires_grad
    torch.testing.assert_close(m.dep_conv.weight, sub['dep_conv.weight'])
    x = torch.randn(1, 32, 4, 5, dtype=torch.float64)
    np.testing.assert_allclose(m(x).detach().numpy(), brute_force(m, x), rtol=1e-10, atol=1e-12)


def test_bad_arguments_raise_one_line_errors():
    with pytest.raises(ValueError, match='divisible by dim_reduction'):
        SlideAttention(24, num_heads=4)
    with pytest.raises(ValueError, match='positive odd'):
        SlideAttention(32, num_heads=2, ka=2)
    with pytest.raises(ValueError, match='expected 32 input channels'):
        SlideAttention(32, num_heads=2)(torch.randn(1, 16, 4, 4))
