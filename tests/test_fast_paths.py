"""Fast paths equal the reference: deformable attention through SDPA (CPU and CUDA), the whole
model with fused kernels on CUDA (skipped without a GPU), and ``torch.compile`` capturing every
block in one graph without breaks or recompiles."""
from __future__ import annotations


import pytest
import torch

from config import load_config
from conftest import SHARED_FIXTURES, needs_fixtures
from models import DAT, build_model

FIXTURES = SHARED_FIXTURES / 'dat_official'
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='CUDA fast paths need a GPU')


def _model(name: str, impl: str) -> torch.nn.Module:
    cfg = load_config(str(FIXTURES / f'{name}.yaml'), opts=['MODEL.ATTN_IMPL', impl])
    model = build_model(cfg)
    model.load_state_dict(torch.load(FIXTURES / f'{name}.pt', weights_only=True)['state_dict'])
    return model


def _logits_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@needs_fixtures
@pytest.mark.parametrize('name', ['mini_pp', 'mini_mix', 'mini_qna', 'mini_window'])
def test_fused_equals_reference_cpu(name: str) -> None:
    """Every deformable variant (table, log-CPB, fixed, DWC, no-offset) and neighborhood attention with
    ``MODEL.ATTN_IMPL fused`` on the CPU, float64: same logits and gradients as ``reference``."""
    x = torch.randn(1, 3, 224 if name == 'mini_window' else 64, 224 if name == 'mini_window' else 96,
                    dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    if name in ('mini_mix', 'mini_window'):   # fixed tables bind the size; window blocks like 224
        x = x[..., :x.shape[-2]]
    ref_out, ref_grads = _logits_and_grads(_model(name, 'reference').double().train(), x)
    fused = _model(name, 'fused').double().train()
    assert {m.attn_impl for m in fused.modules() if hasattr(m, 'proj_q') and hasattr(m, 'attn_impl')} == {'fused'}
    out, grads = _logits_and_grads(fused, x)
    assert torch.allclose(out, ref_out, rtol=1e-10, atol=1e-12)
    assert ref_grads.keys() == grads.keys()
    for n in ref_grads:
        assert torch.allclose(grads[n], ref_grads[n], rtol=1e-8, atol=1e-10), n


@needs_cuda
@needs_fixtures
@pytest.mark.parametrize('name', ['mini_pp', 'mini_mix', 'mini_qna', 'mini_window'])
@pytest.mark.parametrize('dtype,rtol', [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_fused_model_equals_reference_cuda(name: str, dtype: torch.dtype, rtol: float) -> None:
    ref = _model(name, 'reference').cuda().train()
    fast = _model(name, 'auto').cuda().train()
    size = (224, 224) if name in ('mini_window',) else (64, 64) if name == 'mini_mix' else (72, 104)
    x = torch.randn(2, 3, *size, device='cuda')
    with torch.autocast('cuda', dtype=dtype, enabled=dtype != torch.float32):
        ref_out, ref_grads = _logits_and_grads(ref, x)
        out, grads = _logits_and_grads(fast, x)
    scale = ref_out.abs().max()
    assert (out - ref_out).abs().max() <= rtol * scale
    for n in ref_grads:
        g_scale = ref_grads[n].abs().max().clamp_min(1e-6)
        assert (grads[n] - ref_grads[n]).abs().max() <= 10 * rtol * g_scale, n


@pytest.mark.slow     # dynamo tracing of a whole model takes ~10 s on one CPU core
def test_compile_one_graph_without_breaks_or_recompiles() -> None:
    """Every block type (L, S, D with each position encoding, N, P, X, Q, E), two
    blocks a stage, compiles to one graph: no graph break, no recompile across blocks or calls."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = DAT(img_size=64, dim_stem=8, dims=(8, 16, 32, 64), depths=(2, 2, 2, 2), heads=(1, 2, 4, 4),
                heads_q=(2, 2, 4, 4), groups=(1, 1, 2, 2), stage_spec=('LS', 'DN', 'PX', 'QE'), window_sizes=(3,) * 4,
                strides=(2, 2, 1, 1), expansion=2, pos_encs=('table', 'log_cpb', 'dwc', 'table'),
                attn_impl='fused', num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend='eager')
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(compiled(x), expected)
        assert torch.equal(compiled(x + 0), expected)
    assert not counters['graph_break'], dict(counters['graph_break'])
    assert counters['frames']['total'] == 1 and counters['stats']['unique_graphs'] == 1, dict(counters['stats'])
    assert not counters['recompiles']
    torch._dynamo.reset()
