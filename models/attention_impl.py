"""One switch for every attention op in ``models/``: the exact reference path or fused kernels.

``'reference'`` runs plain PyTorch arithmetic (any device, any dtype, float64 included) and is what
the official-equivalence tests use. ``'fused'`` runs the fastest exact kernel each op has on the
device at hand (``scaled_dot_product_attention``, flex attention on CUDA, ...), on any device.
``'auto'`` is ``'fused'`` on CUDA and ``'reference'`` elsewhere. Modules keep the configured name
and resolve it per call with :func:`use_fused`, so a model moved between devices stays correct.
"""
from __future__ import annotations

import torch

ATTN_IMPLS = ('auto', 'reference', 'fused')


def check_attn_impl(impl: str) -> str:
    """``impl`` if it is one of :data:`ATTN_IMPLS`, else a ``ValueError`` naming the choices."""
    if impl not in ATTN_IMPLS:
        raise ValueError('attn_impl must be one of ' + ', '.join(ATTN_IMPLS) + ', got ' + repr(impl))
    return impl


def use_fused(impl: str, x: torch.Tensor) -> bool:
    """Whether an op configured with ``impl`` runs its fused kernel on input ``x``."""
    return impl == 'fused' or (impl == 'auto' and x.is_cuda)
