"""Data-parallel runs on the CPU (gloo): real ``torchrun`` through ``train.sh`` / ``evaluate.sh``
and SLURM-style tasks through ``slurm_main.py``. Replicas stay bit-identical, and distributed
evaluation counts every validation image exactly once (9 readable images, an odd number, plus
a corrupt file that every process must skip alike)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (ACC_DETAIL, ACC_LINE, MODEL_NAME, REPO, Run, assert_same_training_state, free_port,
                      kill_group, load_ckpt, run_main, run_process, subprocess_env, tiny_args, wait_for)
from slurm_main import SlurmEnvError, parse_nodelist, slurm_env_to_torch

N_VAL = 9
DDP_OPTS = ['TRAIN.EPOCHS', '2', 'TRAIN.SAVE_ITER_FREQ', '0']


@pytest.fixture(scope='module')
def ddp_data(tmp_path_factory, tiny_data) -> str:
    """``tiny_data`` plus one truncated JPEG in train/ and one in val/ (after the 9 good ones)."""
    root = tmp_path_factory.mktemp('ddp_data') / 'data'
    shutil.copytree(tiny_data, root)
    for split in ('train', 'val'):
        folder = sorted((root / split).iterdir())[-1]
        good = sorted(folder.iterdir())[0].read_bytes()
        (folder / f'{split}_zz_truncated.JPEG').write_bytes(good[:len(good) // 3])
    return str(root)


def _script(script: str, args, output: Path, timeout: float = 300) -> Run:
    """Run ``./train.sh`` / ``./evaluate.sh`` with torchrun from this interpreter."""
    cmd, env = _script_cmd(script, args)
    start = time.time()
    proc = run_process(cmd, output, env, timeout)
    return Run(proc.returncode, proc.stdout, proc.stderr, output, time.time() - start)


def _script_cmd(script: str, args):
    env = subprocess_env(PORT=str(free_port()), TORCHRUN=f'{sys.executable} -m torch.distributed.run')
    return ['bash', str(REPO / script), *args], env


def _digest(log: str) -> str:
    found = re.findall(r'parameter digest \(rank \d\): ([0-9a-f]{64})', log)
    assert len(found) == 1, 'no parameter digest logged'
    return found[0]


@pytest.fixture(scope='module')
def ddp_run(tmp_path_factory, ddp_data) -> Run:
    """``./train.sh 2 configs/demo.yaml ddp`` on the tiny model: 2 CPU processes, 6 steps each per epoch."""
    out = tmp_path_factory.mktemp('ddp')
    run = _script('train.sh', ['2', str(REPO / 'configs' / 'demo.yaml'), 'ddp', '--output', str(out),
                               *tiny_args(ddp_data, *DDP_OPTS)], out)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    run.output = out / MODEL_NAME / 'ddp'
    return run


@pytest.mark.slow
def test_ranks_hold_identical_parameters(ddp_run, tmp_path):
    logs = [ddp_run.log(rank) for rank in (0, 1)]
    for rank, log in enumerate(logs):
        assert f'rank {rank} of 2 on cpu (pid ' in log
        # Both ranks took the optimizer steps of both epochs (24 images / 2 ranks / batch 2).
        assert 'Train: [1/2][5/6]' in log
    # train.sh asks for AMP only where it applies: not on the CPU.
    assert 'AMP float16 needs CUDA' not in logs[0] and 'AMP: false' in logs[0]
    # The full config goes to the log file; the screen gets one summary line.
    assert 'full config:' in logs[0] and 'full config:' not in ddp_run.stdout
    digests = [_digest(log) for log in logs]
    assert digests[0] == digests[1]
    # The truncated training image left a batch of one, which mixup cannot pair: that rank had no
    # images for the step, and every rank skipped that optimizer step alike.
    epochs = [re.findall(r'epoch \d done .*?(\d+) corrupt images skipped, (\d+) optimizer steps skipped', log)
              for log in logs]
    assert sum(int(corrupt) for rank in epochs for corrupt, _ in rank) >= 1
    assert [steps for _, steps in epochs[0]] == [steps for _, steps in epochs[1]] != ['0', '0']

    # ... and the checkpoint holds exactly those replicas.
    from config import load_config
    from utils import state_digest
    from models import build_model
    ckpt = load_ckpt(ddp_run.output / 'ckpt_epoch_1.pth')
    (tmp_path / 'saved.yaml').write_text(ckpt['config'])
    model = build_model(load_config(str(tmp_path / 'saved.yaml')))
    model.load_state_dict(ckpt['model'])
    assert state_digest(model) == digests[0]
    # The checkpoint carries every rank's RNG state, for an exact resume at the same world size.
    assert len(ckpt['rng_ranks']) == 2


@pytest.mark.slow
def test_signal_to_one_rank_stops_all_and_resume_is_exact(ddp_run, tmp_path, ddp_data):
    """SIGTERM reaches only rank 1: both ranks finish the step, agree, rank 0 saves, all exit 0;
    the resumed 2-process run then ends bit-identical to the uninterrupted one."""
    args = ['2', str(REPO / 'configs' / 'demo.yaml'), 'ddp', '--output', str(tmp_path),
            *tiny_args(ddp_data, *DDP_OPTS)]
    out_dir = tmp_path / MODEL_NAME / 'ddp'
    cmd, env = _script_cmd('train.sh', args)
    with open(tmp_path / 'torchrun.out', 'w') as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rank1 = out_dir / 'log_rank1.txt'
            assert wait_for(lambda: rank1.exists() and 'Train: [0/2][1/6]' in rank1.read_text(), timeout=120,
                            proc=proc)
            pid = int(re.search(r'rank 1 of 2 on cpu \(pid (\d+)\)', rank1.read_text()).group(1))
            os.kill(pid, signal.SIGTERM)
            assert proc.wait(timeout=120) == 0
        finally:
            kill_group(proc)
    logs = [(out_dir / f'log_rank{r}.txt').read_text() for r in (0, 1)]
    assert 'stop requested (SIGTERM)' in logs[1]
    match = re.search(r'stop requested \(a signal on another rank\): saving epoch (\d+) iteration (\d+)', logs[0])
    assert match, logs[0][-2000:]
    epoch, done = int(match.group(1)), int(match.group(2))
    assert f'stop requested (SIGTERM): saving epoch {epoch} iteration {done}' in logs[1]
    ckpt = load_ckpt(out_dir / f'ckpt_epoch_{epoch}_iter_{done}.pth')
    assert (ckpt['epoch'], ckpt['iteration']) == (epoch, done) and len(ckpt['rng_ranks']) == 2

    resumed = _script('train.sh', args, tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f'resumed: epoch {epoch}, iteration {done}' in (out_dir / 'log_rank1.txt').read_text()
    assert_same_training_state(load_ckpt(ddp_run.output / 'ckpt_epoch_1.pth'), load_ckpt(out_dir / 'ckpt_epoch_1.pth'))
    assert _digest((out_dir / 'log_rank1.txt').read_text().split('resumed: epoch')[-1]) == \
        _digest(ddp_run.log(1))


@pytest.mark.slow
def test_distributed_eval_counts_each_image_once(ddp_run, tmp_path, ddp_data):
    ckpt = str(ddp_run.output / 'ckpt_epoch_1.pth')
    # Training's own end-of-epoch evaluation ran on 2 ranks (5 + 4 images).
    assert [int(n) for n, _ in ACC_LINE.findall(ddp_run.stdout)] == [N_VAL, N_VAL]

    single = run_main(['--eval', '--resume', ckpt, *tiny_args(ddp_data)], tmp_path, tag='single').check()
    dist = _script('evaluate.sh', ['2', str(REPO / 'configs' / 'demo.yaml'), ckpt, '--output', str(tmp_path),
                                   '--tag', 'dist', *tiny_args(ddp_data)], tmp_path)
    assert dist.returncode == 0, dist.stdout[-3000:] + dist.stderr[-3000:]

    (n_single, acc_single), = ACC_LINE.findall(single.stdout)
    (n_dist, acc_dist), = ACC_LINE.findall(dist.stdout)
    assert int(n_single) == int(n_dist) == N_VAL
    assert acc_dist == acc_single
    # Top-1 and top-5 (counts) agree exactly; the summed loss up to float rounding.
    (s1, s5, s_loss, _), = ACC_DETAIL.findall(single.stdout)
    (d1, d5, d_loss, _), = ACC_DETAIL.findall(dist.stdout)
    # The corrupt file was skipped (by whichever rank held it), counted once, and named in the log.
    for out in (single.stdout, dist.stdout):
        assert '(9 images, 1 corrupt skipped)' in out
    assert 'skipped unreadable image' in single.log() and 'val_zz_truncated.JPEG' in single.log()
    assert (s1, s5) == (d1, d5)
    assert abs(float(s_loss) - float(d_loss)) < 1e-3
    # ... and equal to what the 2-rank training run measured at its end.
    assert float(acc_single) == pytest.approx(float(ACC_LINE.findall(ddp_run.stdout)[-1][1]))


@pytest.mark.slow
def test_slurm_main_runs_a_two_task_job(ddp_run, tmp_path, ddp_data):
    """Two 'SLURM tasks' on this machine: slurm_main.py turns SLURM_* into a working process group."""
    ckpt = str(ddp_run.output / 'ckpt_epoch_1.pth')
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = subprocess_env(SLURM_PROCID=str(rank), SLURM_NTASKS='2', SLURM_LOCALID=str(rank),
                             SLURM_NODELIST='localhost', SLURM_JOB_ID='4242', MASTER_PORT=port)
        cmd = [sys.executable, 'slurm_main.py', '--cfg', str(REPO / 'configs' / 'demo.yaml'), '--eval',
               '--resume', ckpt, '--output', str(tmp_path), '--tag', 'slurm', *tiny_args(ddp_data)]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:     # a hung rank must not outlive the test
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    (n, acc), = ACC_LINE.findall(outs[0][0])
    assert int(n) == N_VAL
    assert float(acc) == pytest.approx(float(ACC_LINE.findall(ddp_run.stdout)[-1][1]))
    assert 'rank 1 of 2' in (tmp_path / MODEL_NAME / 'slurm' / 'log_rank1.txt').read_text()


# ----------------------------------------------------------------------------- SLURM environment
@pytest.mark.parametrize('nodelist, hosts', [
    ('node07', ['node07']),
    ('gpu[01-03,07]', ['gpu01', 'gpu02', 'gpu03', 'gpu07']),
    ('a[9-10],b2', ['a9', 'a10', 'b2']),
    ('dc1-n[008-009].cluster', ['dc1-n008.cluster', 'dc1-n009.cluster']),
])
def test_parse_nodelist(nodelist, hosts):
    assert parse_nodelist(nodelist) == hosts


def test_slurm_env_to_torch():
    env = {'SLURM_PROCID': '9', 'SLURM_NTASKS': '16', 'SLURM_LOCALID': '1',
           'SLURM_NODELIST': 'gpu[12-13]', 'SLURM_JOB_ID': '123456'}
    torch_env = slurm_env_to_torch(env, resolve_host=lambda nodes: parse_nodelist(nodes)[0])
    assert torch_env == {'RANK': '9', 'WORLD_SIZE': '16', 'LOCAL_RANK': '1', 'MASTER_ADDR': 'gpu12',
                         'MASTER_PORT': str(20000 + 123456 % 20000)}
    # Values given explicitly win.
    explicit = slurm_env_to_torch({**env, 'MASTER_ADDR': '10.0.0.1', 'MASTER_PORT': '1234'})
    assert (explicit['MASTER_ADDR'], explicit['MASTER_PORT']) == ('10.0.0.1', '1234')


@pytest.mark.parametrize('env, words', [
    ({}, 'SLURM_PROCID is not set'),
    ({'SLURM_PROCID': '2', 'SLURM_NTASKS': '2', 'SLURM_NODELIST': 'n1'}, 'outside'),
    ({'SLURM_PROCID': 'x', 'SLURM_NTASKS': '2', 'SLURM_NODELIST': 'n1'}, 'not an integer'),
    ({'SLURM_PROCID': '0', 'SLURM_NTASKS': '2'}, 'SLURM_NODELIST is not set'),
])
def test_slurm_env_errors(env, words):
    with pytest.raises(SlurmEnvError, match=words):
        slurm_env_to_torch(env)


@pytest.mark.slow
def test_slurm_main_outside_slurm_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, 'slurm_main.py', '--cfg', 'configs/demo.yaml'], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: SLURM_PROCID is not set: slurm_main.py runs inside 'srun' (see train_slurm.sh); "
        "use main.py or train.sh outside SLURM"]
