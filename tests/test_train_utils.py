"""Logger, distributed helpers (two real gloo processes), the optimizer step that skips non-finite
updates on the device, and the device-side step statistics."""
import logging
import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn

from conftest import REPO
from distributed import LaunchError, agree, init_distributed, is_dist
from logger import create_logger
from train_step import OptimizerStep, StepStats, ema_update
from checkpoint import atomic_save, load_checkpoint_file

ROOT = str(REPO)


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
    with pytest.raises(LaunchError, match='MASTER_ADDR.*torchrun'):
        init_distributed()
    assert not is_dist()


@pytest.mark.slow
def test_two_gloo_processes_reduce_across_ranks(tmp_path):
    script = tmp_path / 'worker.py'
    script.write_text(textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {ROOT!r})
        from distributed import agree, all_reduce, cleanup_distributed, init_distributed, is_dist
        rank, world, local, device = init_distributed()
        t = torch.tensor([float(rank + 1), 10.0])
        s, m = all_reduce(t), all_reduce(t, op='max')
        a = agree([rank, 5 - rank], device)
        # one file per rank: the ranks share stdout, where their lines can interleave
        with open(f"{tmp_path}/rank{{rank}}.txt", "w") as out:
            out.write(f"{{rank}} {{world}} {{local}} {{device}} {{is_dist()}} {{s.tolist()}} {{m.tolist()}} "
                      f"{{a}} {{t.tolist()}}")
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
        '0 2 0 cpu True [3.0, 20.0] [2.0, 10.0] [1.0, 5.0] [1.0, 10.0]',
        '1 2 1 cpu True [3.0, 20.0] [2.0, 10.0] [1.0, 5.0] [2.0, 10.0]',
    ]


# ----------------------------------------------------------------------------- optimizer step
def _model_and_opt(seed=0, opt='sgd'):
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    if opt == 'fused_adamw':
        return model, torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    if opt == 'fused_sgd':
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, fused=True)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _loss(model, scale=1.0):
    torch.manual_seed(1)
    return (model(torch.randn(8, 4)) ** 2).mean() * scale


def _flat_grad_norm(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()


def test_step_clips_and_reports_the_norm_before_clipping():
    model, opt = _model_and_opt()
    ref, _ = _model_and_opt()
    _loss(ref).backward()
    expected = _flat_grad_norm(ref)
    before = model.weight.detach().clone()
    step = OptimizerStep(opt, fp16_scaler=False, device=torch.device('cpu'), clip_grad=0.01)
    step.backward(_loss(model))
    norm, skipped = step.step(model.parameters())
    assert norm.item() == pytest.approx(expected) and expected > 0.01      # the norm before clipping
    assert _flat_grad_norm(model) == pytest.approx(0.01, rel=1e-4)
    assert not skipped.item() and not torch.equal(before, model.weight)
    assert step.loss_scale() == 1.0 and step.state_dict() == {}


def test_step_without_clipping_reports_the_total_norm():
    model, opt = _model_and_opt()
    step = OptimizerStep(opt, fp16_scaler=False, device=torch.device('cpu'), clip_grad=0.0)
    step.backward(_loss(model))
    expected = _flat_grad_norm(model)
    norm, _ = step.step(model.parameters())
    assert norm.item() == pytest.approx(expected)


@pytest.mark.parametrize('opt', ['sgd', 'fused_adamw', 'fused_sgd'])
def test_non_finite_step_is_skipped(opt):
    """Plain optimizers skip on a host check, fused ones on the device flag: weights and
    optimizer state (AdamW's step count, SGD's momentum) stay as they were."""
    model, optimizer = _model_and_opt(opt=opt)
    step = OptimizerStep(optimizer, fp16_scaler=False, device=torch.device('cpu'), clip_grad=5.0)
    step.backward(_loss(model))
    step.step(model.parameters())
    optimizer.zero_grad()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state_before = {k: {n: t.clone() for n, t in v.items()} for k, v in optimizer.state.items()}
    step.backward(_loss(model, scale=float('inf')))
    norm, skipped = step.step(model.parameters())
    assert not math.isfinite(norm.item()) and skipped.item()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for p, state in optimizer.state.items():
        for name, value in state.items():
            assert torch.equal(value, state_before[p][name]), name
    assert not hasattr(optimizer, 'found_inf')      # the protocol attributes are cleared again


def test_fp16_scaler_unscales_and_skips_overflow():
    model, opt = _model_and_opt()
    ref, _ = _model_and_opt()
    _loss(ref).backward()
    step = OptimizerStep(opt, fp16_scaler=True, device=torch.device('cpu'), clip_grad=None)
    step.backward(_loss(model))
    norm, skipped = step.step(model.parameters())
    assert norm.item() == pytest.approx(_flat_grad_norm(ref), rel=1e-5)    # unscaled
    assert not skipped.item()
    opt.zero_grad()
    before = model.weight.detach().clone()
    scale = step.loss_scale()
    step.backward(_loss(model, scale=float('inf')))
    _, skipped = step.step(model.parameters())
    assert skipped.item() and torch.equal(before, model.weight)
    assert step.loss_scale() == scale / 2 == step.state_dict()['scale']


def test_scaler_state_round_trip_through_file(tmp_path):
    model, opt = _model_and_opt()
    step = OptimizerStep(opt, fp16_scaler=True, device=torch.device('cpu'), clip_grad=None)
    step.backward(_loss(model, scale=float('inf')))
    step.step(model.parameters())                        # backs the scale off once
    path = str(tmp_path / 's.pth')
    atomic_save({'scaler': step.state_dict()}, path)
    restored = OptimizerStep(opt, fp16_scaler=True, device=torch.device('cpu'), clip_grad=None)
    restored.load_state_dict(load_checkpoint_file(path)['scaler'])
    assert restored.state_dict() == step.state_dict() and restored.state_dict()['scale'] == 2.0 ** 15
    OptimizerStep(opt, fp16_scaler=False, device=torch.device('cpu'), clip_grad=None).load_state_dict(
        step.state_dict())   # bf16 resume: ignored


# ----------------------------------------------------------------------------- step statistics
def _update(stats, it, loss, norm, skipped=False, dropped=False, images=2):
    stats.update(it, torch.tensor(loss), images, torch.tensor(norm), torch.tensor(skipped), torch.tensor(dropped))


def test_step_stats_sum_taken_steps_and_count_streaks():
    stats = StepStats(torch.device('cpu'))
    _update(stats, 0, 1.0, 3.0)
    _update(stats, 1, float('nan'), float('nan'), skipped=True)
    _update(stats, 2, 2.0, float('inf'), skipped=True)                     # finite loss, bad gradients
    _update(stats, 3, 0.5, 9.0, skipped=True, dropped=True)                # a rank had no images
    v = stats.read()
    assert (v['loss_sum'], v['images'], v['norm_sum'], v['steps']) == (2.0, 2.0, 3.0, 1.0)
    assert (v['skipped_loss'], v['skipped_grad'], v['dropped'], v['overflow']) == (1.0, 1.0, 1.0, 0.0)
    assert v['streak'] == 0 and v['max_streak'] == 2                       # the dropped step ends it
    assert (v['first_skipped'], v['last_skipped']) == (1.0, 2.0)
    assert math.isnan(v['loss'])                                           # a dropped step shows nan
    _update(stats, 4, 1.0, 1.0)
    v = stats.read()
    assert v['max_streak'] == 0 and v['last_skipped'] == -1 and v['steps'] == 2.0
    stats.new_epoch()
    assert stats.read()['steps'] == 0


def test_step_stats_with_a_grad_scaler_count_only_non_finite_losses():
    stats = StepStats(torch.device('cpu'), grad_scaler=True)
    _update(stats, 0, 2.0, float('inf'), skipped=True)      # loss-scale search, not a divergence
    _update(stats, 1, float('inf'), float('nan'), skipped=True)
    v = stats.read()
    assert (v['overflow'], v['skipped_loss'], v['max_streak']) == (1.0, 1.0, 1.0)


def test_ema_update_follows_taken_steps_only():
    torch.manual_seed(0)
    model, ema = nn.Linear(3, 2), nn.Linear(3, 2)
    model.register_buffer('count', torch.tensor(7))
    ema.register_buffer('count', torch.tensor(0))
    before = ema.weight.detach().clone()
    ema_update(ema, model, 0.9, torch.tensor(False))
    assert torch.equal(ema.weight, before)
    ema_update(ema, model, 0.9, torch.tensor(True))
    assert torch.allclose(ema.weight, 0.9 * before + 0.1 * model.weight)
    assert ema.count.item() == 7


def test_agree_in_a_single_process():
    assert agree([3, 0.5], torch.device('cpu')) == [3.0, 0.5]


def test_python_warnings_go_to_the_log_file(tmp_path):
    logger = create_logger(str(tmp_path), dist_rank=1, name='t_warn', capture_warnings=True)
    try:
        warnings.warn('a library warning', UserWarning)
        assert 'a library warning' in (tmp_path / 'log_rank1.txt').read_text()
    finally:
        logging.captureWarnings(False)
        _drop(logging.getLogger('py.warnings'))
        _drop(logger)


def test_file_only_records_stay_off_the_console(tmp_path, capsys):
    logger = create_logger(str(tmp_path), dist_rank=0, name='t_file_only')
    try:
        logger.info('the full config', extra={'console': False})
        logger.info('one summary line')
        out = capsys.readouterr().out
        assert 'one summary line' in out and 'the full config' not in out
        assert 'the full config' in (tmp_path / 'log_rank0.txt').read_text()
    finally:
        _drop(logger)
