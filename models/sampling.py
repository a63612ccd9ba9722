"""Bilinear ``grid_sample`` that ``torch.compile`` keeps as ATen's kernel on CPU.

Inductor decomposes ``grid_sample`` into gathers and fuses them into their consumers. On CPU the
deformable blocks' position bias then lands inside the softmax kernel, which re-runs the
(unvectorised) gathers on each of its passes over a row: compiled DAT-T++ inference measured
0.85x eager because of it. Wrapped as a custom op (forward and backward), the compiled graph calls
the same ATen kernels as eager, so values and gradients are those of ``F.grid_sample``. Eager
mode, and compiled graphs on other devices (where a fused gather is cheap), call
``F.grid_sample`` directly.
"""
# No ``from __future__ import annotations``: torch 2.5 infers custom-op schemas from real types only.
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ['grid_sample_bilinear']

# ATen's enums for grid_sampler_2d: interpolation 0 = bilinear, padding 0 = zeros.
_BILINEAR, _ZEROS = 0, 0


@torch.library.custom_op('dat_ops::grid_sample_bilinear', mutates_args=())
def _grid_sample(input: Tensor, grid: Tensor, align_corners: bool) -> Tensor:
    return torch.ops.aten.grid_sampler_2d(input, grid, _BILINEAR, _ZEROS, align_corners)


@_grid_sample.register_fake
def _(input: Tensor, grid: Tensor, align_corners: bool) -> Tensor:
    return input.new_empty(input.shape[0], input.shape[1], grid.shape[1], grid.shape[2])


@torch.library.custom_op('dat_ops::grid_sample_bilinear_backward', mutates_args=())
def _grid_sample_backward(grad: Tensor, input: Tensor, grid: Tensor, align_corners: bool) -> Tuple[Tensor, Tensor]:
    grad_input, grad_grid = torch.ops.aten.grid_sampler_2d_backward(
        grad.contiguous(), input, grid, _BILINEAR, _ZEROS, align_corners, [True, True])
    return grad_input, grad_grid


@_grid_sample_backward.register_fake
def _(grad: Tensor, input: Tensor, grid: Tensor, align_corners: bool) -> Tuple[Tensor, Tensor]:
    return (torch.empty_like(input, memory_format=torch.contiguous_format),
            torch.empty_like(grid, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output) -> None:
    input, grid, align_corners = inputs
    ctx.save_for_backward(input, grid)
    ctx.align_corners = align_corners


def _backward(ctx, grad: Tensor):
    input, grid = ctx.saved_tensors
    grad_input, grad_grid = _grid_sample_backward(grad, input, grid, ctx.align_corners)
    return grad_input, grad_grid, None


_grid_sample.register_autograd(_backward, setup_context=_setup_context)
# The op runs inside compiled CPU graphs only where torch can give it F.grid_sample's autocast
# rule (float32 in, float32 out; torch >= 2.6): without the rule a bfloat16 autocast region would
# reach ATen's CPU kernel in bfloat16, which it does not implement.
COMPILED_CPU_OP = hasattr(torch.library, 'register_autocast')
if COMPILED_CPU_OP:
    torch.library.register_autocast(_grid_sample, 'cpu', torch.float32)


def grid_sample_bilinear(input: Tensor, grid: Tensor, align_corners: bool = True) -> Tensor:
    """``F.grid_sample(input, grid, mode='bilinear', padding_mode='zeros', align_corners=...)``."""
    if not torch.jit.is_scripting():
        if COMPILED_CPU_OP and torch.compiler.is_compiling() and input.device.type == 'cpu':
            return _grid_sample(input, grid, align_corners)
    return F.grid_sample(input, grid, mode='bilinear', padding_mode='zeros', align_corners=align_corners)
