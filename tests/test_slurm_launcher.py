"""What ``train_slurm.sh`` asks SLURM for (srun / sbatch stand-ins that record their arguments),
what a stopped run says about resuming in each launch mode, when ranks compare stop requests,
and which errors mean a lost rank. The real cluster runs are in ``test_slurm.py``."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import DEMO_CFG, REPO

RECORD = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$RECORD_DIR/$(basename "$0").args"
printf '%s' "${DAT_SLURM_TASK:-}" > "$RECORD_DIR/$(basename "$0").task"
"""


def _launch(tmp_path: Path, *args: str, python: bool = True, **env: str):
    """Run train_slurm.sh with stand-ins for srun and sbatch; returns (tool, its arguments, task)."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir(exist_ok=True)
    for tool in ('srun', 'sbatch'):
        (bin_dir / tool).write_text(RECORD)
        (bin_dir / tool).chmod(0o755)
    # Only python3 on PATH when ``python`` is False (Debian's default): the script must find it.
    for name in (('python', 'python3') if python else ('python3',)):
        (bin_dir / name).symlink_to('/bin/true')
    system = ':'.join(p for p in ('/usr/bin', '/bin') if os.path.isdir(p))
    full = {'PATH': f'{bin_dir}:{system}', 'RECORD_DIR': str(tmp_path), **env}
    proc = subprocess.run(['bash', str(REPO / 'train_slurm.sh'), *args], env=full, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    tool = 'sbatch' if (tmp_path / 'sbatch.args').exists() else 'srun'
    task = (tmp_path / f'{tool}.task').read_text()
    return tool, (tmp_path / f'{tool}.args').read_text().splitlines(), shlex.split(task) if task else []


def _opt(argv, name):
    return argv[argv.index(name) + 1] if name in argv else None


def test_cpu_nodes_ask_for_no_gpus_and_no_partition(tmp_path):
    tool, argv, _ = _launch(tmp_path, DEMO_CFG, '4', 'cpu_run', '--batch-size', '8', python=False,
                            GPUS_PER_NODE='0')
    assert tool == 'srun'
    assert not any(a.startswith('--gres') for a in argv) and '--partition' not in argv and '--time' not in argv
    assert _opt(argv, '--ntasks') == '4' and _opt(argv, '--cpus-per-task') == '1'
    assert _opt(argv, '--signal') == 'USR1@120' and '--kill-on-bad-exit=1' in argv
    task = argv[argv.index('-u') - 1:]
    assert task[0].endswith('python3')                         # the python3 fallback
    assert task[2:] == [str(REPO / 'slurm_main.py'), '--cfg', DEMO_CFG, '--tag', 'cpu_run', '--batch-size', '8']
    assert '--amp' not in argv


def test_gpu_defaults_and_documented_overrides(tmp_path):
    _, argv, _ = _launch(tmp_path, DEMO_CFG, '16', 'gpu_run')
    assert _opt(argv, '--gres') == 'gpu:8' and _opt(argv, '--ntasks-per-node') == '8'
    assert _opt(argv, '--cpus-per-task') == '8' and '--amp' in argv and argv[argv.index('-u') - 1].endswith('python')
    other = tmp_path / 'other'
    other.mkdir()
    _, argv, _ = _launch(other, DEMO_CFG, '4', 'gpu_run', PARTITION='a100', GPUS_PER_NODE='4', CPUS_PER_TASK='6',
                         TIME='2:00:00', WARN_SECONDS='300', AMP='0', PYTHON='/opt/py/bin/python',
                         SRUN_ARGS='--account lab --qos high')
    assert _opt(argv, '--partition') == 'a100' and _opt(argv, '--gres') == 'gpu:4'
    assert _opt(argv, '--cpus-per-task') == '6' and _opt(argv, '--time') == '2:00:00'
    assert _opt(argv, '--signal') == 'USR1@300' and '--amp' not in argv
    assert _opt(argv, '--account') == 'lab' and _opt(argv, '--qos') == 'high' and '/opt/py/bin/python' in argv


def test_batch_mode_submits_a_requeueable_job_warned_in_its_batch_shell(tmp_path):
    tool, argv, task = _launch(tmp_path, '--batch', DEMO_CFG, '2', 'batch run', '--opts', 'TRAIN.EPOCHS', '3',
                               GPUS_PER_NODE='0', TIME='10', SBATCH_ARGS='--mail-type END')
    assert tool == 'sbatch'
    assert '--requeue' in argv and '--open-mode=append' in argv and _opt(argv, '--signal') == 'B:USR1@120'
    assert _opt(argv, '--output') == 'slurm-batch run-%j.out' and _opt(argv, '--time') == '10'
    assert _opt(argv, '--job-name') == 'batch run' and _opt(argv, '--mail-type') == 'END'
    assert argv[-1] == str(REPO / 'tools' / 'slurm_batch.sh')
    # The tasks' command travels to the batch script word for word (a tag with a space included).
    assert task[2:] == [str(REPO / 'slurm_main.py'), '--cfg', DEMO_CFG, '--tag', 'batch run', '--opts',
                        'TRAIN.EPOCHS', '3']


@pytest.mark.parametrize('args, env, words', [
    (['x', '2', 'tag'], {}, 'NUM_TASKS must be a positive integer'),
    ([DEMO_CFG, '2', 'tag'], {'GPUS_PER_NODE': 'none'}, 'GPUS_PER_NODE must be a number'),
    ([DEMO_CFG, '2'], {}, 'train_slurm.sh [--batch] CONFIG NUM_TASKS JOB_NAME'),
])
def test_launcher_errors_are_one_line(tmp_path, args, env, words):
    if args[0] == 'x':
        args = [DEMO_CFG, 'x', 'tag']
    proc = subprocess.run(['bash', str(REPO / 'train_slurm.sh'), *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and words in proc.stderr


# ----------------------------------------------------------------------------- resuming, per mode
def test_resume_hint_is_true_for_each_launch_mode():
    from slurm_main import resume_hint
    assert resume_hint(signal.SIGTERM, {}) == 'run the same command again to resume'
    interactive = resume_hint(signal.SIGTERM, {'SLURM_JOB_ID': '7'})
    assert 'interactive srun job, which SLURM cannot requeue' in interactive and 'scontrol requeue' not in interactive
    batch = {'SLURM_JOB_ID': '7', 'ENVIRONMENT': 'BATCH'}
    assert resume_hint(signal.SIGTERM, batch) == \
        "batch job 7 resumes from it when requeued ('scontrol requeue 7'), as does submitting it again"
    ours = {**batch, 'DAT_SLURM_REQUEUE_ON_WARNING': '1'}
    assert 'its batch script requeues it' in resume_hint(signal.SIGUSR1, ours)
    assert 'its batch script requeues it' not in resume_hint(signal.SIGTERM, ours)


def test_warning_during_start_up_is_kept_for_the_training_loop():
    import slurm_main
    before = signal.getsignal(signal.SIGUSR1)
    got = []
    try:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        slurm_main.hold_warning()
        os.kill(os.getpid(), signal.SIGUSR1)           # would end the process under SIG_DFL
        signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
        slurm_main.release_warning()
        assert got == [signal.SIGUSR1]
        slurm_main.release_warning()                   # delivered once
        assert got == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, before)


# ----------------------------------------------------------------------------- stop agreement
def test_agreement_clock_fixes_the_next_step_from_the_slowest_pace(monkeypatch):
    import distributed
    now = [100.0]
    monkeypatch.setattr(distributed.time, 'monotonic', lambda: now[0])
    fast, slow = distributed.AgreementClock(interval=2.0), distributed.AgreementClock(interval=2.0)
    for clock in (fast, slow):
        clock.start(10)
        assert clock.due(10) and not clock.due(9)        # the first step of an epoch agrees
    now[0] += 0.5                                         # step 10 took 0.5 s
    assert fast.proposal(10) == 4 and slow.proposal(10) == 4
    agreed = -max(-fast.proposal(10), -slow.proposal(10))
    for clock in (fast, slow):
        clock.agreed(10, agreed)
        assert clock.next_step == 14 and not clock.due(13) and clock.due(14)
    now[0] += 40.0                                        # 4 steps of 10 s each: one step to the next
    assert fast.proposal(14) == 1
    fast.agreed(14, 0)
    assert fast.next_step == 15                           # never the same step twice


def test_collective_failures_are_told_apart_from_other_errors():
    from distributed import is_collective_failure
    gloo = RuntimeError('[../third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:57011: '
                        'Connection reset by peer')
    assert is_collective_failure(gloo)
    assert not is_collective_failure(RuntimeError('CUDA out of memory'))
    assert not is_collective_failure(ValueError('Connection reset by peer'))


def test_lost_rank_line_names_the_rank_and_the_checkpoint_and_one_rank_prints_it(monkeypatch):
    import distributed
    monkeypatch.setattr(distributed, 'lost_ranks', lambda rank, world: [2])
    error = distributed.rank_lost(1, 4, '/out/ckpt_epoch_3_iter_40.pth')
    assert str(error) == ('rank 2 of 4 died (killed, out of memory, or its node was lost) and the other ranks '
                          'stopped; run the same command again to resume from /out/ckpt_epoch_3_iter_40.pth')
    assert distributed.rank_lost(0, 4, None).report and not error.report      # rank 0 prints, rank 1 not
    assert 'no checkpoint was saved yet' in str(distributed.rank_lost(0, 4, None))
    monkeypatch.setattr(distributed, 'lost_ranks', lambda rank, world: None)   # the store went too
    assert str(distributed.rank_lost(3, 4, None)).startswith('rank 0 (which holds the rendezvous store) of 4 died')
    monkeypatch.setattr(distributed, 'lost_ranks', lambda rank, world: [])     # all there: not a lost rank
    assert distributed.rank_lost(0, 4, None) is None


@pytest.mark.slow
def test_a_warning_while_the_task_starts_is_saved_at_the_first_step(tmp_path, tiny_data):
    """SLURM's SIGUSR1 half a second after a task starts (still importing torch): not fatal; the
    first step is saved and the task exits 0."""
    import re
    import sys
    import time

    from conftest import MODEL_NAME, free_port, subprocess_env, tiny_args
    env = subprocess_env(SLURM_PROCID='0', SLURM_NTASKS='1', SLURM_NODELIST='localhost',
                         MASTER_PORT=str(free_port()))
    cmd = [sys.executable, 'slurm_main.py', '--cfg', DEMO_CFG, '--output', str(tmp_path), '--tag', 'early',
           *tiny_args(tiny_data)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        proc.send_signal(signal.SIGUSR1)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert re.search(r'stop requested \(SIGUSR1\): saving epoch 0 iteration 1\b', out), out[-2000:]
    assert (tmp_path / MODEL_NAME / 'early' / 'ckpt_epoch_0_iter_1.pth').is_file()
