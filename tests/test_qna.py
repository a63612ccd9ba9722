"""Learned-query attention (models/qna.py) against a loop written from the formula."""

import numpy as np
import pytest
import torch
from torch.func import functional_call

from conftest import SHARED_FIXTURES, needs_fixtures
from models.qna import FusedKQnA

FIXTURE = SHARED_FIXTURES / 'dat_official' / 'mini_qna.pt'

_ACT = {
    'exp': np.exp,  # deliberately unshifted: the module's max shift must cancel
    'sigmoid': lambda z: 1.0 / (1.0 + np.exp(-z)),
    'linear': lambda z: z,
}


def _make(nq, dim, heads, k, activation='exp', seed=0):
    """Module in float64 with every parameter moved well away from its small init."""
    torch.manual_seed(seed)
    m = FusedKQnA(dim, nq=nq, num_heads=heads, kernel_size=k, activation=activation).double()
    with torch.no_grad():
        m.q_param.normal_()
        m.attn_scale.normal_(1.0, 0.5)
        m.rpb_table.normal_(0.0, 0.7)
        if activation == 'linear':  # keep the denominators clear of zero
            m.rpb_table.uniform_(0.5, 1.5)
    return m


def brute_force(m: FusedKQnA, x: torch.Tensor) -> np.ndarray:
    """out[b,:,y,x] = proj_out(sum_q num/den) with explicit loops over pixels, queries, heads, taps."""
    x = x.detach().numpy()
    B, C, H, W = x.shape
    nq, nh, hc, k = m.nq, m.num_heads, C // m.num_heads, m.kernel_size
    act = _ACT[m.activation]
    keys = np.einsum('oc,bchw->bhwo', m.proj_k.weight.detach().numpy(), x)
    vals = np.einsum('oc,bchw->bhwo', m.proj_v.weight.detach().numpy(), x)
    queries = m.q_param.detach().numpy()
    scale_tab = m.attn_scale.detach().numpy().reshape(k * k, nq * nh)
    rpb = m.rpb_table.detach().numpy()
    out = np.zeros((B, C, H, W))
    for b in range(B):
        for y in range(H):
            for xx in range(W):
                for qi in range(nq):
                    for h in range(nh):
                        sl, col = slice(h * hc, (h + 1) * hc), qi * nh + h
                        num, den = np.zeros(hc), 0.0
                        for row in range(k):
                            for cl in range(k):
                                yy, xs = y + row - k // 2, xx + cl - k // 2
                                if not (0 <= yy < H and 0 <= xs < W):
                                    continue  # outside taps take no part
                                t = row * k + cl
                                e = act(m.scale * queries[qi, sl] @ keys[b, yy, xs, sl])
                                w = act(rpb[t, col])
                                num += w * scale_tab[t, col] * e * vals[b, yy, xs, sl]
                                den += w * e
                        out[b, sl, y, xx] += num / den
    return np.einsum('oc,bchw->bohw', m.proj_out.weight.detach().numpy()[:, :, 0, 0], out)


@pytest.mark.parametrize('k', [3, 5])
def test_windowed_matches_brute_force(k):
    m = _make(nq=2, dim=8, heads=2, k=k)
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    got = m(x).detach().numpy()
    np.testing.assert_allclose(got, brute_force(m, x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('activation', ['sigmoid', 'linear'])
def test_other_activations_match_brute_force(activation):
    m = _make(nq=3, dim=8, heads=4, k=3, activation=activation, seed=1)
    x = torch.randn(1, 8, 4, 5, dtype=torch.float64)
    np.testing.assert_allclose(m(x).detach().numpy(), brute_force(m, x), rtol=1e-10, atol=1e-12)


def test_kernel1_matches_brute_force_and_reduces_to_scaled_values():
    m = _make(nq=2, dim=8, heads=2, k=1)
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    got = m(x).detach()
    np.testing.assert_allclose(got.numpy(), brute_force(m, x), rtol=1e-10, atol=1e-12)
    # With one tap the ratio cancels: out = proj_out(sum_q attn_scale[q, h] * v_h).
    v = torch.einsum('oc,bchw->bohw', m.proj_v.weight, x).reshape(2, 2, 4, 5, 6)
    per_head = m.attn_scale.reshape(2, 2).sum(0)                     # (heads,)
    expected = m.proj_out((v * per_head.view(1, 2, 1, 1, 1)).reshape(2, 8, 5, 6))
    torch.testing.assert_close(got, expected.detach(), rtol=1e-12, atol=1e-12)


def test_gradcheck_input_and_parameters():
    m = _make(nq=2, dim=4, heads=2, k=3)
    names = [n for n, p in m.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in m.parameters())
    x = torch.randn(1, 4, 3, 4, dtype=torch.float64, requires_grad=True)

    def fn(inp, *ps):
        return functional_call(m, dict(zip(names, ps)), (inp,))

    assert torch.autograd.gradcheck(fn, (x,) + params, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize('k,hw', [(3, (7, 5)), (5, (3, 9)), (3, (1, 1)), (1, (5, 2))])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_odd_and_non_square_maps_keep_size(k, hw, dtype):
    m = FusedKQnA(12, nq=2, num_heads=3, kernel_size=k).to(dtype)
    x = torch.randn(2, 12, *hw, dtype=dtype, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape and y.dtype == dtype
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_float32_is_batch_independent_when_sample_scales_differ():
    """A sample whose logits sit ~150 below another's must not underflow to 0/0."""
    m = _make(nq=2, dim=8, heads=2, k=3)
    calm = torch.randn(1, 8, 4, 5, dtype=torch.float64)
    direction = torch.randn(8, dtype=torch.float64)
    logit = m.scale * (m.q_param.reshape(2, 2, 4) * (m.proj_k.weight @ direction).reshape(1, 2, 4)).sum(-1)
    loud = (150.0 / logit.abs().max()) * direction.view(1, 8, 1, 1).expand(1, 8, 4, 5)
    batch = torch.cat([calm, loud])
    ref = m(batch).detach()
    got = m.float()(batch.float()).detach()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[:1].double(), ref[:1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[:1], m(calm.float()).detach(), rtol=1e-6, atol=1e-6)


def test_parameter_names_shapes_and_init():
    torch.manual_seed(0)
    m = FusedKQnA(32, nq=3, num_heads=4, kernel_size=5)
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes == {
        'q_param': (3, 32), 'attn_scale': (1, 1, 25, 12), 'rpb_table': (25, 12),
        'proj_k.weight': (32, 32), 'proj_v.weight': (32, 32), 'proj_out.weight': (32, 32, 1, 1),
    }
    assert m.proj_k.bias is None and m.proj_v.bias is None and m.proj_out.bias is None
    assert m.q_param.abs().max() <= 2.0  # truncated at +-2 (absolute bounds), std sqrt(1/8)
    assert 0.2 < m.q_param.std() < 0.5
    assert m.rpb_table.std() < 0.05 and m.attn_scale.std() < 0.05


@needs_fixtures
def test_loads_official_state_dict_strictly():
    sd = torch.load(FIXTURE, weights_only=True)['state_dict']
    for prefix, dim, heads in [('stages.0.attns.0.', 16, 2), ('stages.1.attns.0.', 32, 4)]:
        sub = {n[len(prefix):]: t for n, t in sd.items() if n.startswith(prefix)}
        m = FusedKQnA(dim, nq=2, num_heads=heads, kernel_size=1).double()
        m.load_state_dict(sub, strict=True)
        assert m(torch.randn(1, dim, 3, 5, dtype=torch.float64)).shape == (1, dim, 3, 5)


@pytest.mark.parametrize('args,match', [
    ((2, 10, 3, 3), 'divisible by num_heads'),
    ((2, 12, 3, 2), 'positive odd'),
    ((0, 12, 3, 3), 'nq must be'),
])
def test_bad_arguments_raise_one_line_errors(args, match):
    with pytest.raises(ValueError, match=match):
        nq, dim, heads, k = args
        FusedKQnA(dim, nq=nq, num_heads=heads, kernel_size=k)


def test_bad_activation_and_channel_count():
    with pytest.raises(ValueError, match='unknown activation'):
        FusedKQnA(12, nq=2, num_heads=3, kernel_size=3, activation='softmax')
    with pytest.raises(ValueError, match='expected 12 input channels'):
        FusedKQnA(12, nq=2, num_heads=3, kernel_size=3)(torch.randn(1, 8, 4, 4))
