"""Logger, distributed helpers (two real gloo processes), AMP loss scaler, grad norm, AverageMeter."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from checkpoint import atomic_save, load_checkpoint_file  # noqa: E402
from logger import create_logger  # noqa: E402
from utils import AverageMeter, NativeScalerWithGradNormCount, get_grad_norm, init_distributed, is_dist  # noqa: E402


# ----------------------------------------------------------------------------- logger
def _drop(logger):
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()


def test_logger_rank0_console_and_file_without_duplicates(tmp_path, capsys):
    logger = create_logger(str(tmp_path), dist_rank=0, name='t_rank0')
    logger = create_logger(str(tmp_path), dist_rank=0, name='t_rank0')     # e.g. main called twice
    try:
        assert len(logger.handlers) == 2
        logger.info('hello once')
        logger.warning('careful')
        out = capsys.readouterr().out
        assert out.count('hello once') == 1 and 'careful' in out
        text = (tmp_path / 'log_rank0.txt').read_text()
        assert text.count('hello once') == 1 and 'WARNING careful' in text
        assert '\x1b[' not in text                    # colour codes stay out of the file
    finally:
        _drop(logger)


def test_logger_other_ranks_write_only_their_file_and_append_on_resume(tmp_path, capsys):
    logger = create_logger(str(tmp_path), dist_rank=1, name='t_rank1')
    logger.info('first run')
    _drop(logger)
    logger = create_logger(str(tmp_path), dist_rank=1, name='t_rank1')      # resumed run, same directory
    try:
        logger.info('resumed run')
        assert capsys.readouterr().out == ''
        text = (tmp_path / 'log_rank1.txt').read_text()
        assert text.index('first run') < text.index('resumed run')
        assert not (tmp_path / 'log_rank0.txt').exists()
    finally:
        _drop(logger)


# ----------------------------------------------------------------------------- distributed
_DIST_ENV = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')


def test_single_process_needs_no_process_group(monkeypatch):
    for name in _DIST_ENV:
        monkeypatch.delenv(name, raising=False)
    rank, world, local, device = init_distributed()
    assert (rank, world, local) == (0, 1, 0)
    assert device.type == ('cuda' if torch.cuda.is_available() else 'cpu')
    assert not is_dist()


def test_multi_process_env_without_master_is_a_clear_error(monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setenv('RANK', '0')
    monkeypatch.delenv('MASTER_ADDR', raising=False)
    with pytest.raises(RuntimeError, match='MASTER_ADDR.*torchrun'):
        init_distributed()
    assert not is_dist()


def test_two_gloo_processes_reduce_across_ranks(tmp_path):
    script = tmp_path / 'worker.py'
    script.write_text(textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {ROOT!r})
        from utils import (init_distributed, is_dist, get_rank, get_world_size, is_main_process,
                           all_reduce_sum, reduce_mean, barrier, cleanup_distributed)
        rank, world, local, device = init_distributed()
        t = torch.tensor([float(rank + 1), 10.0])
        s, m = all_reduce_sum(t), reduce_mean(t)
        barrier()
        # one file per rank: the ranks share stdout, where their lines can interleave
        with open(f"{tmp_path}/rank{{rank}}.txt", "w") as out:
            out.write(f"{{rank}} {{world}} {{local}} {{device}} {{is_dist()}} {{get_rank()}} {{get_world_size()}} "
                      f"{{is_main_process()}} {{s.tolist()}} {{m.tolist()}} {{t.tolist()}}")
        cleanup_distributed()
    """))
    env = {**os.environ, 'CUDA_VISIBLE_DEVICES': '', 'OMP_NUM_THREADS': '1'}
    run = subprocess.run(
        # --standalone lets torchrun pick a free port itself (no race with other processes).
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', str(script)],
        capture_output=True, text=True, timeout=180, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [(tmp_path / f'rank{r}.txt').read_text() for r in range(2)]
    assert lines == [
        '0 2 0 cpu True 0 2 True [3.0, 20.0] [1.5, 10.0] [1.0, 10.0]',
        '1 2 1 cpu True 1 2 False [3.0, 20.0] [1.5, 10.0] [2.0, 10.0]',
    ]


# ----------------------------------------------------------------------------- grad norm and scaler
def _model_and_opt(seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _loss(model, scale=1.0):
    torch.manual_seed(1)
    return (model(torch.randn(8, 4)) ** 2).mean() * scale


def test_get_grad_norm_matches_flat_norm():
    model, _ = _model_and_opt()
    _loss(model).backward()
    flat = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert get_grad_norm(model.parameters()) == pytest.approx(flat.norm().item())
    assert get_grad_norm(model.parameters(), norm_type=float('inf')) == pytest.approx(flat.abs().max().item())
    assert get_grad_norm([nn.Parameter(torch.ones(2))]) == 0.0          # no grads at all


def test_scaler_disabled_steps_clips_and_reports_norm():
    model, opt = _model_and_opt()
    ref, _ = _model_and_opt()
    _loss(ref).backward()
    expected = get_grad_norm(ref.parameters())
    before = model.weight.detach().clone()
    scaler = NativeScalerWithGradNormCount(enabled=False)
    assert scaler.get_scale() == 1.0
    norm = scaler(_loss(model), opt, clip_grad=0.01, parameters=model.parameters())
    assert norm == pytest.approx(expected) and expected > 0.01      # the norm before clipping
    assert get_grad_norm(model.parameters()) == pytest.approx(0.01, rel=1e-4)
    assert not scaler.last_step_skipped and not torch.equal(before, model.weight)


def test_scaler_disabled_skips_non_finite_step():
    model, opt = _model_and_opt()
    before = model.weight.detach().clone()
    scaler = NativeScalerWithGradNormCount(enabled=False)
    norm = scaler(_loss(model, scale=float('inf')), opt, clip_grad=5.0, parameters=model.parameters())
    assert not math.isfinite(norm) and scaler.last_step_skipped
    assert torch.equal(before, model.weight)


def test_scaler_enabled_unscales_and_skips_overflow():
    model, opt = _model_and_opt()
    ref, _ = _model_and_opt()
    _loss(ref).backward()
    scaler = NativeScalerWithGradNormCount(enabled=True, device='cpu')
    assert scaler.enabled
    norm = scaler(_loss(model), opt, clip_grad=None)
    assert norm == pytest.approx(get_grad_norm(ref.parameters()), rel=1e-5)    # unscaled
    assert not scaler.last_step_skipped
    opt.zero_grad()
    before = model.weight.detach().clone()
    scale = scaler.get_scale()
    scaler(_loss(model, scale=float('inf')), opt, clip_grad=5.0, parameters=model.parameters())
    assert scaler.last_step_skipped and torch.equal(before, model.weight)
    assert scaler.get_scale() == scale / 2 == scaler.state_dict()['scale']


def test_scaler_accumulation_does_not_step():
    model, opt = _model_and_opt()
    before = model.weight.detach().clone()
    scaler = NativeScalerWithGradNormCount(enabled=False)
    assert scaler(_loss(model), opt, update_grad=False) is None
    assert torch.equal(before, model.weight) and model.weight.grad is not None


def test_scaler_state_round_trip_through_file(tmp_path):
    model, opt = _model_and_opt()
    scaler = NativeScalerWithGradNormCount(enabled=True, device='cpu')
    scaler(_loss(model, scale=float('inf')), opt)          # backs the scale off once
    path = str(tmp_path / 's.pth')
    atomic_save({'scaler': scaler.state_dict()}, path)
    restored = NativeScalerWithGradNormCount(enabled=True, device='cpu')
    restored.load_state_dict(load_checkpoint_file(path)['scaler'])
    assert restored.state_dict() == scaler.state_dict() and restored.state_dict()['scale'] == 2.0 ** 15
    NativeScalerWithGradNormCount(enabled=False).load_state_dict(scaler.state_dict())   # bf16 resume: ignored


def test_average_meter_weights_by_count():
    meter = AverageMeter()
    meter.update(1.0, n=3)
    meter.update(torch.tensor(5.0))
    assert (meter.val, meter.sum, meter.count, meter.avg) == (5.0, 8.0, 4, 2.0)
