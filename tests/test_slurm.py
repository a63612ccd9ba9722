"""``train_slurm.sh`` against a real one-node SLURM (``slurm_cluster.py``), tiny model, 2 CPU tasks
(gloo), the default ``PRINT_FREQ`` (100) and steps slowed down so that 100 of them take longer
than the cluster's ``KillWait``: a stop that waited for a logging step would be SIGKILLed.

- interactive (srun makes the allocation): ``scancel`` saves within seconds; the log says the
  job cannot be requeued, and running the same command again resumes and completes;
- batch (``--batch``): SLURM's time-limit warning reaches the tasks, they save, the job requeues
  itself and resumes; ``scontrol requeue`` resumes too; the log file is appended to;
- a task killed with SIGKILL: the other stops within seconds, one line names the lost rank.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DEMO_CFG, MODEL_NAME, REPO, free_port, kill_group, subprocess_env, tiny_args, wait_for
from slurm_cluster import KILL_WAIT, slurm  # noqa: F401  (the session fixture)

pytestmark = pytest.mark.slow

SLOW_STEPS = str(Path(__file__).parent / 'slow_steps')
STEP_SLEEP = 0.3            # 100 steps: 30 s, well past KILL_WAIT (20 s)
EPOCHS = 20                 # 6 optimizer steps per epoch per task (24 images, 2 tasks, batch 2)


def _env(cluster, tmp_path: Path, sleep: float, **extra: str):
    """train_slurm.sh's environment: the test cluster, CPU tasks, slowed steps (``tmp_path/sleep``)."""
    (tmp_path / 'sleep').write_text(str(sleep))
    env = subprocess_env(**cluster.env, GPUS_PER_NODE='0', PYTHON=sys.executable, MASTER_PORT=str(free_port()),
                         DAT_TEST_STEP_SLEEP_FILE=str(tmp_path / 'sleep'), **extra)
    env['PYTHONPATH'] = os.pathsep.join([SLOW_STEPS, env['PYTHONPATH']])
    return env


def _args(tmp_path: Path, data: str, tag: str):
    return [DEMO_CFG, '2', tag, '--output', str(tmp_path), *tiny_args(data, 'TRAIN.EPOCHS', str(EPOCHS),
                                                                      'PRINT_FREQ', '100')]


def _start(cmd, tmp_path: Path, env, name: str) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=open(tmp_path / f'{name}.out', 'w'),
                            stderr=open(tmp_path / f'{name}.err', 'w'), start_new_session=True)


def _read(path: Path) -> str:
    return path.read_text(errors='replace') if path.exists() else ''


def _job_id(cluster, name: str) -> str:
    out = cluster.run('squeue', '-h', '-n', name, '-o', '%i').stdout.split()
    return out[0] if out else ''


def _job(cluster, job: str) -> dict:
    out = cluster.run('scontrol', '-o', 'show', 'job', job).stdout
    return dict(f.split('=', 1) for f in out.split() if '=' in f)


def cluster_state(cluster, job: str) -> str:
    return f"\njob {job}: {_job(cluster, job)}\n{cluster.debug()}"


def _training(log: Path, after: str = '') -> bool:
    text = _read(log)
    return 'Train: [' in text[text.rfind(after):] if after else 'Train: [' in text


def _saved(log: str, signame: str):
    match = re.findall(rf'stop requested \((?:{signame})\): saving epoch (\d+) iteration (\d+)', log)
    assert match, log[-3000:]
    return tuple(int(x) for x in match[-1])


# ----------------------------------------------------------------------------- interactive
def test_interactive_scancel_saves_within_seconds_and_rerun_resumes(slurm, tmp_path, tiny_data):
    env = _env(slurm, tmp_path, STEP_SLEEP)
    cmd = ['bash', str(REPO / 'train_slurm.sh'), *_args(tmp_path, tiny_data, 'inter')]
    out_dir = tmp_path / MODEL_NAME / 'inter'
    log0, log1 = out_dir / 'log_rank0.txt', out_dir / 'log_rank1.txt'
    proc = _start(cmd, tmp_path, env, 'srun')
    try:
        assert wait_for(lambda: _training(log1), timeout=180, proc=proc), _read(tmp_path / 'srun.err')
        job = _job_id(slurm, 'inter')
        assert job and _job(slurm, job)['BatchFlag'] == '0'          # srun made the allocation
        time.sleep(2 * STEP_SLEEP)       # inside an epoch: not at a logging step (every 100)
        sent = time.time()
        assert slurm.run('scancel', job).returncode == 0
        proc.wait(timeout=KILL_WAIT + 60)
    finally:
        kill_group(proc)
    stderr = _read(tmp_path / 'srun.err')
    logs = [_read(log0), _read(log1)]
    epoch, done = _saved(logs[0], r'SIGTERM|a signal on another rank')
    assert (out_dir / f'ckpt_epoch_{epoch}_iter_{done}.pth').is_file(), logs[0][-2000:]
    # Saved mid-epoch (not at a logging step), well before SLURM's SIGKILL; the tasks exited by themselves.
    saved = re.search(r'\[([\d-]+ [\d:]+) dat\] \(trainer.py \d+\): INFO state saved', logs[0]).group(1)
    took = time.mktime(time.strptime(saved, '%Y-%m-%d %H:%M:%S')) - sent
    assert done % 100 != 0 and took < 10, (took, stderr[-2000:])
    assert 'Killed' not in stderr and 'exit code' not in stderr, stderr[-2000:]
    assert 'AMP: false' in logs[0] and 'cpu' in logs[0]                    # no GPU asked for, no AMP
    assert f'SLURM job {job} is an interactive srun job, which SLURM cannot requeue' in logs[0]
    assert 'can be requeued' not in logs[0]
    assert 'Traceback' not in stderr + _read(tmp_path / 'srun.out')

    # The same command again resumes there and completes.
    (tmp_path / 'sleep').write_text('0')
    proc = _start(cmd, tmp_path, env, 'srun2')
    try:
        assert proc.wait(timeout=300) == 0, _read(tmp_path / 'srun2.err')[-3000:]
    finally:
        kill_group(proc)
    log = _read(log0)
    assert f'resumed: epoch {epoch}, iteration {done}' in log and 'training time' in log


# ----------------------------------------------------------------------------- batch
def _restart(cluster, job: str, count: int, timeout: float = 120) -> None:
    """Wait until ``job`` was requeued ``count`` times, then let it start in a few seconds instead
    of after SLURM's requeue delay (two minutes on 22.05), with a limit that warns no more. (At
    once would be too soon: the node refuses a job whose credential it revoked in the same second.)"""
    assert wait_for(lambda: int(_job(cluster, job).get('Restarts', 0)) >= count
                    and _job(cluster, job).get('JobState') == 'PENDING', timeout=timeout, interval=0.5), \
        cluster_state(cluster, job)
    update = cluster.run('scontrol', 'update', f'JobId={job}', 'TimeLimit=30', 'StartTime=now+3')
    assert update.returncode == 0, update.stderr


def test_batch_time_limit_warning_requeues_and_scontrol_requeue_resumes(slurm, tmp_path, tiny_data):
    """A 3-minute limit with the warning 165 s before it: SLURM sends it 15-45 s into the job (its
    timer runs every 30 s), while the tasks train; the batch script passes it on, the tasks save,
    the job requeues itself and resumes. Then ``scontrol requeue`` during training: SIGTERM, a
    save, and the job resumes again and finishes. One log file holds the three runs."""
    env = _env(slurm, tmp_path, STEP_SLEEP, TIME='3', WARN_SECONDS='165', LOG=str(tmp_path / 'job-%j.out'))
    submit = subprocess.run(['bash', str(REPO / 'train_slurm.sh'), '--batch', *_args(tmp_path, tiny_data, 'batch')],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job = re.search(r'Submitted batch job (\d+)', submit.stdout).group(1)
    log = tmp_path / f'job-{job}.out'
    out_dir = tmp_path / MODEL_NAME / 'batch'
    rank0 = out_dir / 'log_rank0.txt'
    try:
        info = _job(slurm, job)
        assert info['BatchFlag'] == '1' and info['Requeue'] == '1' and info['TimeLimit'] == '00:03:00'
        _restart(slurm, job, 1, timeout=150)
        first = _read(rank0)
        assert 'stop requested' in first and f'batch job {job} resumes from it when requeued' in first, first[-3000:]
        assert 'requeueing job' in _read(log)

        # Resumed by itself; now `scontrol requeue` while it trains.
        assert wait_for(lambda: _training(rank0, after='resumed: epoch'), timeout=180, interval=0.5), \
            _read(log)[-1000:] + cluster_state(slurm, job)
        assert slurm.run('scontrol', 'requeue', job).returncode == 0
        _restart(slurm, job, 2)
        (tmp_path / 'sleep').write_text('0')
        assert wait_for(lambda: _job(slurm, job).get('JobState') in ('COMPLETED', 'FAILED', 'CANCELLED'),
                        timeout=300, interval=1), _read(log)[-1000:] + cluster_state(slurm, job)
    finally:
        slurm.run('scancel', job)
    info, text, logs = _job(slurm, job), _read(log), _read(rank0)
    assert info['JobState'] == 'COMPLETED' and info['ExitCode'] == '0:0', (info, text[-3000:])
    runs = logs.split('resumed: epoch')
    assert len(runs) == 3, logs[-3000:]              # resumed twice, each where the stop before saved
    for stopped, resumed in zip(runs[:2], runs[1:]):
        saved = re.findall(r'saved checkpoint \S+ckpt_epoch_(\d+)(?:_iter_(\d+))?\.pth', stopped)[-1]
        epoch, done = (int(saved[0]), int(saved[1])) if saved[1] else (int(saved[0]) + 1, 0)
        assert resumed.startswith(f' {epoch}, iteration {done}'), (saved, resumed[:200])
    assert 'stop requested (SIGTERM)' in runs[1] or 'stop requested: epoch' in runs[1], runs[1][-2000:]
    assert 'training time' in runs[2]
    for restart in range(3):                         # --open-mode=append: one file for all runs
        assert f'(restart {restart})' in text, text[-3000:]
    assert 'Traceback' not in text


# ----------------------------------------------------------------------------- a lost task
@pytest.mark.parametrize('victim', [1, 0])
def test_a_killed_task_stops_the_job_in_seconds_with_one_line(slurm, tmp_path, tiny_data, victim):
    """SIGKILL to one task (what the OOM killer sends): the other stops at once, one line names
    the lost rank and the checkpoint to resume from, no collective-library traceback."""
    env = _env(slurm, tmp_path, STEP_SLEEP)
    cmd = ['bash', str(REPO / 'train_slurm.sh'), *_args(tmp_path, tiny_data, 'lost')]
    out_dir = tmp_path / MODEL_NAME / 'lost'
    logs = [out_dir / f'log_rank{r}.txt' for r in (0, 1)]
    proc = _start(cmd, tmp_path, env, 'srun')
    try:
        assert wait_for(lambda: _training(logs[0], after='ckpt_epoch_0.pth'),
                        timeout=180, proc=proc), _read(tmp_path / 'srun.err')
        pid = int(re.search(r'\(pid (\d+)\)', _read(logs[victim])).group(1))
        os.kill(pid, signal.SIGKILL)
        killed = time.time()
        proc.wait(timeout=KILL_WAIT + 60)
        took = time.time() - killed
    finally:
        kill_group(proc)
    stderr = _read(tmp_path / 'srun.err')
    ours = [line for line in stderr.splitlines() if line.startswith('error:')]
    assert len(ours) == 1, stderr
    assert ours[0].startswith(f'error: rank {victim}')
    assert 'died (killed, out of memory, or its node was lost)' in ours[0]
    assert re.search(r'resume from \S+ckpt_epoch_\d+(_iter_\d+)?\.pth', ours[0]), ours[0]
    assert 'Traceback' not in stderr and 'gloo' not in stderr and 'Connection reset' not in stderr, stderr
    assert took < 20, (took, stderr)
