"""One switch for every attention op in ``models/``: the exact reference path or fused kernels.

``'reference'`` runs plain PyTorch arithmetic (any device, any dtype, float64 included) and is what
the official-equivalence tests use. ``'fused'`` runs the fastest exact kernel each op has on the
device at hand (``scaled_dot_product_attention``, flex attention on CUDA, ...), on any device.
``'auto'`` is ``'fused'`` on CUDA and ``'reference'`` elsewhere, except that it never takes the
kernels whose gain is unmeasured and whose risk is known (flex attention: see ``models.nat``).
Modules keep the configured name and resolve it per call with :func:`use_fused`, so a model moved
between devices stays correct.

The fused calls a model makes can be recorded (:func:`recording`) and the SDPA backend each call
selects observed (:func:`sdpa_probe`); ``models.kernel_check`` uses both to test every fused call
against the reference before a run starts.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

ATTN_IMPLS = ('auto', 'reference', 'fused')

__all__ = ['ATTN_IMPLS', 'check_attn_impl', 'use_fused', 'AttentionCall', 'recording', 'reference_only', 'record', 'sdpa',
           'sdpa_probe', 'sdpa_backend']


def check_attn_impl(impl: str) -> str:
    """``impl`` if it is one of :data:`ATTN_IMPLS`, else a ``ValueError`` naming the choices."""
    if impl not in ATTN_IMPLS:
        raise ValueError('attn_impl must be one of ' + ', '.join(ATTN_IMPLS) + ', got ' + repr(impl))
    return impl


def use_fused(impl: str, x: torch.Tensor) -> bool:
    """Whether an op configured with ``impl`` runs its fused kernel on input ``x``."""
    return impl == 'fused' or (impl == 'auto' and x.is_cuda)


class AttentionCall(NamedTuple):
    """One distinct fused attention call, without its batch size."""
    op: str                 # 'neighborhood' or 'deformable'
    kernel: str             # 'sdpa' or 'flex'
    shape: Tuple            # the op's own sizes (see the op)
    dtype: torch.dtype      # of q as the kernel receives it
    device: str
    autocast: Optional[torch.dtype]     # the autocast dtype around the call, None without autocast

    def describe(self) -> str:
        dtype = str(self.dtype).replace('torch.', '')
        if self.autocast is not None:
            dtype += f" (autocast {str(self.autocast).replace('torch.', '')})"
        if self.op == 'neighborhood':
            heads, height, width, c, kernel_size = self.shape
            sizes = f"{height}x{width} window {kernel_size} heads {heads} dim {c}"
        else:
            heads, queries, keys, c, bias = self.shape
            sizes = (f"{queries} queries {keys} keys heads {heads} dim {c} "
                     f"bias {('none', 'shared', 'per-image')[bias]}")
        return f"{self.op} {self.kernel} {sizes} {dtype} on {self.device}"


# (call, module) pairs while recording; the module is the attention module that made the call.
_RECORD: Optional[List[Tuple[AttentionCall, Optional[torch.nn.Module]]]] = None
_CURRENT: List[torch.nn.Module] = []
_PROBE: Optional[List[str]] = None


@contextlib.contextmanager
def recording(model: torch.nn.Module, module_types: Tuple[type, ...]) -> Iterator[List]:
    """Collect the :class:`AttentionCall` of every fused call ``model`` makes inside the block,
    each with the ``module_types`` instance that made it."""
    global _RECORD
    def enter(module, args) -> None:
        _CURRENT.append(module)

    def leave(module, args, out) -> None:
        _CURRENT.pop()

    handles = []
    for module in model.modules():
        if isinstance(module, module_types):
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave))
    calls: List = []
    _RECORD = calls
    try:
        yield calls
    finally:
        _RECORD = None
        _CURRENT.clear()
        for h in handles:
            h.remove()


@contextlib.contextmanager
def reference_only() -> Iterator[None]:
    """Every fused call inside the block runs its reference kernel instead (for a forward that
    only checks shapes, before the kernels have been checked on the device)."""
    global _RECORD
    saved, _RECORD = _RECORD, []
    try:
        yield
    finally:
        _RECORD = saved


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    if device_type not in ('cuda', 'cpu') or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def record(op: str, kernel: str, shape: Tuple, q: torch.Tensor) -> bool:
    """Note a fused call while :func:`recording`; True then, and the op runs its reference kernel
    instead (the recording pass must not run a kernel that is not checked yet)."""
    if _RECORD is None:
        return False
    call = AttentionCall(op, kernel, tuple(int(s) for s in shape), q.dtype, str(q.device),
                         _autocast_dtype(q.device.type))
    _RECORD.append((call, _CURRENT[-1] if _CURRENT else None))
    return True


@contextlib.contextmanager
def sdpa_probe() -> Iterator[List[str]]:
    """The SDPA backend (``'flash_attention'``, ``'efficient_attention'``, ``'cudnn_attention'``,
    ``'math'``, ...) of every :func:`sdpa` call inside the block."""
    global _PROBE
    names: List[str] = []
    _PROBE = names
    try:
        yield names
    finally:
        _PROBE = None


def sdpa_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                 dropout_p: float = 0.0, scale: Optional[float] = None) -> str:
    """The backend ``F.scaled_dot_product_attention`` selects for these inputs (under the autocast in
    force, which casts them first)."""
    dtype = _autocast_dtype(q.device.type)
    if dtype is not None:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        attn_mask = attn_mask.to(dtype) if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
    choice = torch._fused_sdp_choice(q, k, v, attn_mask, dropout_p, False, scale=scale)
    try:
        from torch.nn.attention import SDPBackend
        return SDPBackend(choice).name.lower()
    except (ImportError, ValueError):      # pragma: no cover - depends on the installed torch
        return f'backend {choice}'


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
         dropout_p: float = 0.0, scale: Optional[float] = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, noting its backend inside :func:`sdpa_probe`."""
    if _PROBE is not None:
        _PROBE.append(sdpa_backend(q, k, v, attn_mask, dropout_p, scale))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
