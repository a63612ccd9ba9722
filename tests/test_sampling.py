"""``models.sampling.grid_sample_bilinear``: ``F.grid_sample`` in eager mode, one custom op (ATen's
kernels, forward and backward) inside compiled CPU graphs, equal to the eager values and gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.sampling import COMPILED_CPU_OP, grid_sample_bilinear

needs_op = pytest.mark.skipif(not COMPILED_CPU_OP, reason='this torch has no torch.library.register_autocast: '
                              'compiled graphs call F.grid_sample instead of the op')


def _inputs(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(3, 4, 9, 11, dtype=dtype, generator=gen, requires_grad=True)
    # Some points outside [-1, 1]: the zero padding is part of what must match.
    grid = (torch.rand(3, 5, 7, 2, dtype=dtype, generator=gen) * 2.4 - 1.2).requires_grad_()
    return table, grid


def _reference(table, grid, align_corners=True):
    return F.grid_sample(table, grid, mode='bilinear', padding_mode='zeros', align_corners=align_corners)


@needs_op
@pytest.mark.parametrize('align_corners', [True, False])
def test_compiled_graph_calls_the_op_and_matches_eager(align_corners: bool) -> None:
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    def fn(table, grid):
        return grid_sample_bilinear(table, grid, align_corners).softmax(-1)

    torch._dynamo.reset()
    table, grid = _inputs()
    out = torch.compile(fn, backend=backend, fullgraph=True)(table, grid)
    expected = _reference(table, grid, align_corners).softmax(-1)
    weights = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out * weights).sum(), (table, grid))
    expected_grads = torch.autograd.grad((expected * weights).sum(), (table, grid))
    assert torch.equal(out, expected)
    for got, want in zip(grads, expected_grads):
        assert torch.equal(got, want)
    targets = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == 'call_function'}
    assert any('dat_ops.grid_sample_bilinear' in t for t in targets), targets
    torch._dynamo.reset()


def test_eager_is_grid_sample_and_autocast_keeps_float32() -> None:
    table, grid = _inputs(torch.float32)
    assert torch.equal(grid_sample_bilinear(table, grid), _reference(table, grid))
    torch._dynamo.reset()
    compiled = torch.compile(grid_sample_bilinear, backend='aot_eager', fullgraph=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        eager = grid_sample_bilinear(table.bfloat16(), grid.bfloat16())
        out = compiled(table.bfloat16(), grid.bfloat16())
    assert out.dtype == eager.dtype == torch.float32
    assert torch.equal(out, eager)
    torch._dynamo.reset()


def test_op_registration_passes_opcheck() -> None:
    """Schema, fake (meta) kernel, autograd registration and AOT dispatch of the custom op."""
    from models.sampling import _grid_sample
    table, grid = _inputs()
    for align_corners in (True, False):
        torch.library.opcheck(_grid_sample, (table, grid, align_corners))
