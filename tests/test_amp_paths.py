"""The CUDA training defaults, exercised on the CPU where torch allows it: the fp16 grad scaler with
fused AdamW and gradient clipping, evaluation's own memory peak, and step times that include the
device's work at log steps."""
from __future__ import annotations

import logging
import os
import time

import pytest
import torch
import torch.nn as nn

from evaluation import memory_mb, reset_peak_memory, step_clock, validate
from train_step import OptimizerStep, total_norm

CUDA = torch.cuda.is_available()


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 3))
    twin = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 3))
    twin.load_state_dict(model.state_dict())
    return model, twin


def _loss(model, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step)
    x, y = torch.randn(8, 6, generator=gen) * 3, torch.randint(0, 3, (8,), generator=gen)
    return nn.functional.cross_entropy(model(x), y)


def test_scaled_fused_adamw_with_clipping_equals_plain_adamw():
    """GradScaler('cpu') + fused AdamW + unscale + clip takes exactly the steps of an unscaled,
    unfused AdamW clipped by hand."""
    model, twin = _pair()
    fused = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05, fused=True)
    plain = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.05, foreach=False)
    step = OptimizerStep(fused, fp16_scaler=True, device=torch.device('cpu'), clip_grad=0.5)
    assert step.scaler.is_enabled() and step.loss_scale() == 65536.0
    for i in range(6):
        step.backward(_loss(model, i))
        norm, skipped = step.step(model.parameters())
        fused.zero_grad(set_to_none=True)
        _loss(twin, i).backward()
        want = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5)
        plain.step()
        plain.zero_grad(set_to_none=True)
        assert not bool(skipped)
        assert torch.allclose(norm, want, rtol=1e-5)
        assert want > 0.5           # clipping acted
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)


def test_an_overflow_skips_the_fused_step_and_halves_the_scale():
    model, twin = _pair()
    fused = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    step = OptimizerStep(fused, fp16_scaler=True, device=torch.device('cpu'), clip_grad=1.0)
    step.backward(_loss(model, 0))
    step.step(model.parameters())
    fused.zero_grad(set_to_none=True)
    before = [p.detach().clone() for p in model.parameters()]
    state_steps = [float(s['step']) for s in fused.state.values()]
    step.backward(_loss(model, 1) * float('inf'))
    norm, skipped = step.step(model.parameters())
    assert bool(skipped) and not torch.isfinite(norm)
    assert step.loss_scale() == 65536.0 / 2
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert [float(s['step']) for s in fused.state.values()] == state_steps


def test_total_norm_is_the_clipping_norm():
    grads = [torch.randn(5, 3), torch.randn(7).double(), torch.zeros(2)]
    params = [torch.zeros_like(g, requires_grad=True) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    assert torch.allclose(total_norm(grads).double(),
                          torch.nn.utils.clip_grad_norm_(params, float('inf')).double(), rtol=1e-6)


needs_hwm = pytest.mark.skipif(not os.path.exists('/proc/self/clear_refs'),
                               reason='no resettable resident-set peak (/proc/self/clear_refs) on this system')


@needs_hwm
def test_evaluation_reports_its_own_memory_peak():
    """A large allocation before evaluation does not show in evaluation's memory figure."""
    device = torch.device('cpu')
    big = torch.ones(64 * 2 ** 20)             # 256 MiB, touched
    peak_with_big = memory_mb(device)
    del big
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger('test_eval_memory')
    logger.addHandler(Keep())
    logger.setLevel(logging.INFO)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    loader = [(torch.randn(2, 3, 2, 2), torch.tensor([0, 1]), 0)]
    validate(model, loader, device, lambda: torch.autocast('cpu', enabled=False), logger, print_freq=1)
    mem = [float(m.rsplit('Mem ', 1)[1].rstrip('MB')) for m in records if 'Mem ' in m]
    assert mem and mem[0] < peak_with_big - 128, (mem, peak_with_big)


@needs_hwm
def test_reset_peak_memory_starts_a_new_peak():
    device = torch.device('cpu')
    big = torch.ones(64 * 2 ** 20)
    high = memory_mb(device)
    del big
    reset_peak_memory(device)
    assert memory_mb(device) < high - 128


def test_step_clock_on_cpu_is_the_wall_clock():
    before = time.time()
    now = step_clock(torch.device('cpu'), sync=True)
    assert before <= now <= time.time()


@pytest.mark.skipif(not CUDA, reason='synchronising the clock with queued GPU work needs CUDA')
def test_step_clock_waits_for_queued_cuda_work():
    device = torch.device('cuda')
    a = torch.randn(4096, 4096, device=device)
    for _ in range(20):
        a = a @ a
        a = a / a.norm()
    step_clock(device, sync=False)
    step_clock(device, sync=True)
    assert torch.cuda.current_stream(device).query()        # nothing left in the queue
