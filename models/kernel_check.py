"""Start-up self-check of the fused attention kernels on the device a run uses.

Before the first step, :func:`check_model_kernels` records every distinct fused attention call the
model makes (one batch-1 forward at the run's input size, under the run's autocast; see
``models.attention_impl.recording``) and replays each on a tiny batch, forward and backward, against
the exact reference computed in float64 on the same device. A call fails on an exception, a
non-finite value, or an error larger than the tolerance (a floor per dtype, or a few times the
reference kernel's own error in the same dtype, whichever is larger). The modules that made a
failing call then run the reference kernel, with one warning line each; when ``fused`` was asked for
explicitly, :class:`KernelCheckError` is raised instead. The SDPA backend each call selected is
reported. Verdicts are cached per process and, in a distributed run, agreed by all ranks (a call
that fails on one rank falls back on all).
"""
from __future__ import annotations

import logging
import time
from typing import Callable, ContextManager, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from . import nat
from .attention_impl import AttentionCall, recording, sdpa_probe
from .dat_blocks import DAttention, deformable_sdpa
from .nat import NeighborhoodAttention2D

__all__ = ['KernelCheckError', 'CallResult', 'check_call', 'check_model_kernels', 'TOLERANCE']

# Largest error (max |fused - exact| / max |exact|, per output and per gradient) a kernel may
# show in each dtype, unless the reference kernel itself shows more (then a few times that).
TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float64: 1e-10}
_REFERENCE_FACTOR = 4.0
_BATCH = 2

_CACHE: Dict[AttentionCall, 'CallResult'] = {}


class KernelCheckError(RuntimeError):
    """A fused kernel that was asked for explicitly failed its start-up check."""


class CallResult(NamedTuple):
    call: AttentionCall
    ok: bool
    reason: str             # what failed ('' when ok)
    backends: Tuple[str, ...]   # SDPA backends the fused replay selected
    error: float            # worst relative error over output and gradients (nan on an exception)
    seconds: float


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def _neighborhood_inputs(call: AttentionCall, gen: torch.Generator):
    heads, height, width, c, kernel_size = call.shape
    shape = (_BATCH, heads, height, width, c)
    q, k, v = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))
    # A bias of the size training reaches (the tables start at std 0.02), so it shapes the softmax.
    rpb = torch.randn(heads, 2 * kernel_size - 1, 2 * kernel_size - 1, generator=gen, dtype=torch.float64)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64)
    return (q, k, v, rpb), grad


def _neighborhood_run(call: AttentionCall, kernel: str, inputs, dtype: torch.dtype):
    kernel_size = call.shape[4]
    q, k, v, rpb = inputs
    # The learnable table stays float32 (float64 for the exact run), as the module's parameter.
    rpb = rpb.detach().to(torch.float64 if dtype == torch.float64 else torch.float32)
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)] + [rpb.requires_grad_()]
    out = nat.attend_with(kernel, *leaves, kernel_size, q.shape[-1] ** -0.5)
    return out, leaves


def _deformable_inputs(call: AttentionCall, gen: torch.Generator):
    heads, queries, keys, c, bias_kind = call.shape
    q = torch.randn(_BATCH * heads, c, queries, generator=gen, dtype=torch.float64)
    k = torch.randn(_BATCH * heads, c, keys, generator=gen, dtype=torch.float64)
    v = torch.randn(_BATCH * heads, c, keys, generator=gen, dtype=torch.float64)
    bias = None
    if bias_kind:
        bias = torch.randn(1 if bias_kind == 1 else _BATCH, heads, queries, keys, generator=gen, dtype=torch.float64)
    grad = torch.randn(_BATCH * heads, c, queries, generator=gen, dtype=torch.float64)
    return (q, k, v, bias), grad


def _deformable_run(call: AttentionCall, kernel: str, inputs, dtype: torch.dtype):
    heads = call.shape[0]
    q, k, v, bias = inputs
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    scale = q.shape[1] ** -0.5
    if bias is not None:    # the tables and the bias MLP are float32 (float64 for the exact run)
        leaves.append(bias.detach().to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_())
    b = None if bias is None else leaves[3]
    if kernel == 'sdpa':
        out = deformable_sdpa(leaves[0], leaves[1], leaves[2], b, heads, scale)
    else:   # the module's reference arithmetic
        n, m = q.shape[2], k.shape[2]
        attn = torch.einsum('bcm,bcn->bmn', leaves[0], leaves[1]) * scale
        if b is not None:
            attn = (attn.view(-1, heads, n, m) + b).view(-1, n, m)
        out = torch.einsum('bmn,bcn->bcm', attn.softmax(dim=2).to(leaves[2].dtype), leaves[2])
    return out, leaves


_OPS = {'neighborhood': (_neighborhood_inputs, _neighborhood_run, 'tiled'),
        'deformable': (_deformable_inputs, _deformable_run, 'reference')}


def _forward_backward(run, call, kernel, inputs, grad, dtype, device, autocast) -> List[torch.Tensor]:
    inputs = [None if t is None else t.to(device) for t in inputs]
    with autocast:
        out, leaves = run(call, kernel, inputs, dtype)
    # A kernel that ignores an input (a dropped bias) gives it no gradient: zero, then compared.
    grads = torch.autograd.grad(out, leaves, grad.to(device, out.dtype), allow_unused=True)
    return [out.detach()] + [torch.zeros_like(t) if g is None else g.detach() for g, t in zip(grads, leaves)]


def check_call(call: AttentionCall, seed: int = 0) -> CallResult:
    """Replay ``call`` (forward and backward, batch 2) with its fused kernel and compare it with the
    float64 reference on the same device. Never raises for the kernel's own failures."""
    tic = time.perf_counter()
    make_inputs, run, reference = _OPS[call.op]
    device = torch.device(call.device)
    gen = torch.Generator().manual_seed(seed)
    inputs, grad = make_inputs(call, gen)
    names = ['output'] + ['d' + n for n in ('q', 'k', 'v', 'bias')]
    backends: List[str] = []

    def autocast():
        return torch.autocast(device.type, dtype=call.autocast or torch.float32, enabled=call.autocast is not None)

    def done(ok: bool, reason: str, error: float) -> CallResult:
        return CallResult(call, ok, reason, tuple(dict.fromkeys(backends)), error, time.perf_counter() - tic)

    try:
        exact = _forward_backward(run, call, reference, inputs, grad, torch.float64, device,
                                  torch.autocast(device.type, enabled=False))
        with sdpa_probe() as probe:
            fused = _forward_backward(run, call, call.kernel, inputs, grad, call.dtype, device, autocast())
        backends.extend(probe)
        baseline = _forward_backward(run, call, reference, inputs, grad, call.dtype, device, autocast())
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
    except Exception as e:  # the kernel's own failure, whatever its type, is the verdict
        message = ' '.join(str(e).split())[:200]
        return done(False, f'{type(e).__name__}: {message}', float('nan'))
    worst = 0.0
    for name, got, want, base in zip(names, fused, exact, baseline):
        if not bool(torch.isfinite(got).all()):
            return done(False, f'non-finite {name}', float('nan'))
        err = _rel_err(got, want)
        worst = max(worst, err)
        limit = max(TOLERANCE.get(call.dtype, 1e-2), _REFERENCE_FACTOR * _rel_err(base, want))
        if not err <= limit:
            return done(False, f'{name} error {err:.2e} > {limit:.2e}', err)
    return done(True, '', worst)


def _agree(failed: List[bool]) -> List[bool]:
    """A call failed if it failed on any rank."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or not failed:
        return failed
    device = torch.device('cuda', torch.cuda.current_device()) if dist.get_backend() == 'nccl' else 'cpu'
    flags = torch.tensor([float(f) for f in failed], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [bool(f) for f in flags.tolist()]


def record_calls(model: nn.Module, example: torch.Tensor,
                 autocast: Callable[[], ContextManager]) -> List[Tuple[AttentionCall, List[nn.Module]]]:
    """The distinct fused calls of one eval-mode forward of ``example``, each with its modules."""
    if example.shape[0] == 1:   # two images tell a bias shared by the batch from a per-image one
        example = example.expand(2, *example.shape[1:])
    was_training = model.training
    model.eval()
    try:
        with recording(model, (NeighborhoodAttention2D, DAttention)) as calls, torch.no_grad(), autocast():
            model(example)
    finally:
        model.train(was_training)
    merged: Dict[AttentionCall, List[nn.Module]] = {}
    for call, module in calls:
        modules = merged.setdefault(call, [])
        if module is not None and all(m is not module for m in modules):
            modules.append(module)
    return list(merged.items())


def nothing_fused(attn_impl: str, device: torch.device) -> bool:
    """Whether ``attn_impl`` runs only reference kernels on ``device`` (no check needed)."""
    return attn_impl == 'reference' or (attn_impl == 'auto' and device.type != 'cuda')


def check_model_kernels(model: nn.Module, example: torch.Tensor, autocast: Callable[[], ContextManager],
                        attn_impl: str, logger: Optional[logging.Logger] = None,
                        checker: Callable[[AttentionCall], CallResult] = check_call) -> List[CallResult]:
    """Check every fused attention call ``model`` makes on ``example``'s device (see the module
    docstring); modules whose calls failed are switched to ``attn_impl='reference'``.

    Raises :class:`KernelCheckError` (one line) when ``attn_impl == 'fused'`` and a call failed.
    """
    logger = logger or logging.getLogger(__name__)
    if nothing_fused(attn_impl, example.device):
        return []
    tic = time.perf_counter()
    calls = record_calls(model, example, autocast)
    results = []
    for call, _ in calls:
        if call not in _CACHE:
            _CACHE[call] = checker(call)
        results.append(_CACHE[call])
    agreed = _agree([not r.ok for r in results])
    final = []
    for result, failed, (call, modules) in zip(results, agreed, calls):
        if failed and result.ok:
            result = result._replace(ok=False, reason='failed on another rank')
        final.append(result)
        if result.ok:
            continue
        line = f"attention self-check: {call.describe()} failed ({result.reason})"
        if attn_impl == 'fused':
            raise KernelCheckError(line + "; run with MODEL.ATTN_IMPL auto (falls back per shape) or reference")
        for module in modules:
            module.attn_impl = 'reference'
        logger.warning("%s; %d module(s) run the reference kernel instead", line, len(modules))
    backends = sorted({b for r in final for b in r.backends})
    passed = sum(r.ok for r in final)
    logger.info("attention self-check on %s: %d/%d fused calls passed in %.1fs%s", example.device, passed,
                len(final), time.perf_counter() - tic, f" (SDPA backends: {', '.join(backends)})" if backends else '')
    return final


def format_report(results: Sequence[CallResult]) -> List[str]:
    """One line per checked call: verdict, worst error, SDPA backends, time."""
    lines = []
    for r in results:
        verdict = 'ok' if r.ok else f'FAILED ({r.reason})'
        lines.append(f"{r.call.describe()}: {verdict}; max rel err {r.error:.2e}; "
                     f"sdpa backend {'/'.join(r.backends) or '-'}; {r.seconds:.2f}s")
    return lines
