"""models.kernel_check: every fused attention call is replayed against the float64 reference before a
run starts; a broken kernel (wrong values, an exception, non-finite output) makes its modules fall back
to the reference with one warning line, or stops a run that asked for ``fused`` with one line."""
from __future__ import annotations

import contextlib
import logging

import pytest
import torch

from config import load_config
from models import attention_impl, build_model, kernel_check, nat

# A small DAT++ with N and D blocks at 64 px: every fused call replays in well under a second.
SMALL = ['MODEL.DAT.dims', '[16,32,64,128]',
         'MODEL.DAT.dim_stem', '16', 'MODEL.DAT.depths', '[1,1,1,1]', 'MODEL.DAT.heads', '[1,2,4,8]',
         'MODEL.DAT.groups', '[1,1,2,4]', 'MODEL.DAT.stage_spec', "[['N'],['D'],['N'],['D']]",
         'MODEL.DAT.nat_ksizes', '[3,3,3,3]']


def _model(impl: str):
    torch.manual_seed(0)
    return build_model(load_config('configs/demo.yaml', opts=SMALL + ['MODEL.ATTN_IMPL', impl]))


@pytest.fixture(autouse=True)
def fresh_cache():
    kernel_check._CACHE.clear()
    yield
    kernel_check._CACHE.clear()


@pytest.fixture
def na_sdpa_on_cpu(monkeypatch):
    """Neighborhood attention takes the SDPA tiles on the CPU too, and 'auto' counts as fused here:
    the CUDA choice, run on the CPU."""
    monkeypatch.setattr(nat, 'kernel_for', lambda q, impl, dropout_p=0.0: 'tiled' if impl == 'reference' else 'sdpa')
    monkeypatch.setattr(kernel_check, 'nothing_fused', lambda impl, device: impl == 'reference')


def _broken_na_sdpa(monkeypatch, how: str):
    real = attention_impl.sdpa

    def broken(q, k, v, attn_mask=None, dropout_p=0.0, scale=None):
        out = real(q, k, v, attn_mask, dropout_p, scale)
        if how == 'wrong':
            return out * 1.5
        if how == 'nan':
            return out + float('nan')
        raise RuntimeError('CUDA error: an illegal memory access was encountered')

    monkeypatch.setattr(nat, '_sdpa', broken)


def _x():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_every_fused_call_passes_and_names_its_backend(na_sdpa_on_cpu, caplog):
    model = _model('fused')
    for autocast in (contextlib.nullcontext, lambda: torch.autocast('cpu', dtype=torch.bfloat16)):
        with caplog.at_level(logging.INFO):
            results = kernel_check.check_model_kernels(model, torch.zeros(1, 3, 64, 64), autocast, 'fused')
        ops = {(r.call.op, r.call.kernel) for r in results}
        assert ops == {('neighborhood', 'sdpa'), ('deformable', 'sdpa')}
        assert all(r.ok and r.backends for r in results), kernel_check.format_report(results)
        assert {m.attn_impl for m in model.modules() if hasattr(m, 'attn_impl')} == {'fused'}
    dtypes = {r.call.dtype for r in results}
    assert dtypes == {torch.bfloat16} and {r.call.autocast for r in results} == {torch.bfloat16}
    assert 'fused calls passed' in caplog.text and 'SDPA backends' in caplog.text


def test_nothing_is_checked_where_nothing_fused_runs():
    calls = []
    checker = lambda call: calls.append(call)  # noqa: E731
    for impl in ('reference', 'auto'):      # 'auto' is the reference on the CPU
        assert kernel_check.check_model_kernels(_model(impl), torch.zeros(1, 3, 64, 64), contextlib.nullcontext,
                                                impl, checker=checker) == []
    assert calls == []


@pytest.mark.parametrize('how,reason', [
    ('wrong', 'output error'), pytest.param('nan', 'non-finite output', marks=pytest.mark.slow),
    pytest.param('raise', 'RuntimeError: CUDA error: an illegal memory access', marks=pytest.mark.slow)])
def test_a_broken_kernel_falls_back_to_the_reference(na_sdpa_on_cpu, monkeypatch, caplog, how, reason):
    _broken_na_sdpa(monkeypatch, how)
    model, reference = _model('auto'), _model('reference')
    with caplog.at_level(logging.WARNING):
        results = kernel_check.check_model_kernels(model, torch.zeros(1, 3, 64, 64), contextlib.nullcontext, 'auto')
    failed = [r for r in results if not r.ok]
    assert failed and {r.call.op for r in failed} == {'neighborhood'}
    assert all(reason in r.reason for r in failed)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == len(failed)
    assert all('\n' not in w and 'neighborhood sdpa' in w and 'reference kernel' in w for w in warnings)
    na = [m for m in model.modules() if isinstance(m, nat.NeighborhoodAttention2D)]
    assert na and all(m.attn_impl == 'reference' for m in na)
    # The deformable blocks passed and keep their kernel.
    assert {m.attn_impl for m in model.modules() if type(m).__name__ == 'DAttention'} == {'auto'}
    with torch.no_grad():
        assert torch.allclose(model.eval()(_x()), reference.eval()(_x()), atol=1e-5)


def test_an_explicit_fused_run_stops_with_one_line(na_sdpa_on_cpu, monkeypatch):
    _broken_na_sdpa(monkeypatch, 'wrong')
    with pytest.raises(kernel_check.KernelCheckError) as info:
        kernel_check.check_model_kernels(_model('fused'), torch.zeros(1, 3, 64, 64), contextlib.nullcontext, 'fused')
    message = str(info.value)
    assert '\n' not in message and 'neighborhood sdpa' in message and 'MODEL.ATTN_IMPL' in message


def test_verdicts_are_cached_per_process(na_sdpa_on_cpu):
    seen = []

    def checker(call):
        seen.append(call)
        return kernel_check.CallResult(call, True, '', ('math',), 0.0, 0.0)

    model = _model('fused')
    first = kernel_check.check_model_kernels(model, torch.zeros(1, 3, 64, 64), contextlib.nullcontext, 'fused',
                                             checker=checker)
    again = kernel_check.check_model_kernels(model, torch.zeros(1, 3, 64, 64), contextlib.nullcontext, 'fused',
                                             checker=checker)
    assert len(seen) == len(first) == len(set(seen)) and first == again


def test_a_failure_on_another_rank_fails_here(na_sdpa_on_cpu, monkeypatch, caplog):
    monkeypatch.setattr(kernel_check, '_agree', lambda failed: [True] * len(failed))
    model = _model('auto')
    results = kernel_check.check_model_kernels(model, torch.zeros(1, 3, 64, 64), contextlib.nullcontext, 'auto')
    assert results and all(not r.ok and r.reason == 'failed on another rank' for r in results)
    assert {m.attn_impl for m in model.modules() if isinstance(m, nat.NeighborhoodAttention2D)} == {'reference'}


def test_trainer_build_stops_a_fused_run_with_a_config_error(na_sdpa_on_cpu, monkeypatch, tmp_path):
    from config import ConfigError
    from trainer import Trainer
    _broken_na_sdpa(monkeypatch, 'raise')
    config = load_config('configs/demo.yaml', opts=SMALL + ['MODEL.ATTN_IMPL', 'fused', 'OUTPUT', str(tmp_path)])
    trainer = Trainer(config, 0, 1, torch.device('cpu'), logging.getLogger('test'))
    with pytest.raises(ConfigError, match='attention self-check: neighborhood sdpa .* illegal memory access'):
        trainer.build(with_data=False)


def _agree_worker(rank: int, port: int, out) -> None:
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)
    try:
        out[rank] = kernel_check._agree([rank == 1, False, rank == 0])
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_agree_on_every_verdict():
    """Two real gloo ranks, each failing a different call: both fall back on both calls."""
    import torch.multiprocessing as mp
    from conftest import free_port
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_agree_worker, args=(free_port(), out), nprocs=2, join=True)
        assert dict(out) == {0: [True, False, True], 1: [True, False, True]}
