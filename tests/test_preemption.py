"""Stopping the way schedulers and terminals deliver it: a signal to the whole process group of
``train.sh``, to a bare torchrun (alone, or with its ranks and their DataLoader workers as Ctrl-C
does), or Ctrl-C to a bare ``main.py`` with DataLoader workers. The current step is saved and the
exit status says why; a failing ``train.sh`` / ``evaluate.sh`` ends with ``main.py``'s one-line
error and exit status."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import (DEMO_CFG, MODEL_NAME, REPO, free_port, kill_group, load_ckpt, main_cmd, run_process,
                      subprocess_env, tiny_args, wait_for)

WORKERS = ('DATA.NUM_WORKERS', '2', 'DATA.PIN_MEMORY', 'False')


def _script_env(**extra: str):
    return subprocess_env(PORT=str(free_port()), TORCHRUN=f'{sys.executable} -m torch.distributed.run', **extra)


def _start(cmd, cwd: Path, env, name: str) -> subprocess.Popen:
    """Start ``cmd`` as the leader of a new process group (as a scheduler's job step would be)."""
    out, err = open(cwd / f'{name}.out', 'w'), open(cwd / f'{name}.err', 'w')
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True)


def _stop_during_epoch_1(proc: subprocess.Popen, log: Path, send) -> int:
    try:
        assert wait_for(lambda: log.exists() and 'Train: [1/' in log.read_text(), timeout=240, proc=proc), \
            f'training did not reach epoch 1 (exit {proc.poll()})'
        send()
        return proc.wait(timeout=240)
    finally:
        kill_group(proc)


def _saved_step(out_dir: Path, signame: str):
    log = (out_dir / 'log_rank0.txt').read_text()
    match = re.search(rf'stop requested \({signame}\): saving epoch (\d+) iteration (\d+)', log)
    assert match, log[-2000:]
    epoch, done = int(match.group(1)), int(match.group(2))
    ckpt = load_ckpt(out_dir / f'ckpt_epoch_{epoch}_iter_{done}.pth')
    assert (ckpt['epoch'], ckpt['iteration']) == (epoch, done)
    return epoch, done


@pytest.mark.slow
def test_sigterm_to_the_process_group_of_train_sh_saves_and_exits_zero(tmp_path, tiny_data):
    cmd = ['bash', str(REPO / 'train.sh'), '1', DEMO_CFG, 'group', '--output', str(tmp_path),
           *tiny_args(tiny_data, *WORKERS)]
    proc = _start(cmd, tmp_path, _script_env(), 'train_sh')
    out_dir = tmp_path / MODEL_NAME / 'group'
    code = _stop_during_epoch_1(proc, out_dir / 'log_rank0.txt', lambda: os.killpg(proc.pid, signal.SIGTERM))
    stderr = (tmp_path / 'train_sh.err').read_text()
    assert code == 0, stderr[-3000:]
    _saved_step(out_dir, 'SIGTERM')
    assert 'DataLoader worker' not in stderr and 'Traceback' not in stderr


@pytest.mark.slow
@pytest.mark.parametrize('signame, to_group', [('SIGTERM', False), ('SIGINT', True)])
def test_signal_to_a_bare_torchrun_saves(tmp_path, tiny_data, signame, to_group):
    """``kill <torchrun>``: torchrun passes SIGTERM on to its ranks, which save before it gives up on
    them. Ctrl-C in its terminal reaches the ranks twice (from the terminal and from torchrun) and
    the DataLoader workers too: still one save. torchrun itself then exits non-zero, which train.sh
    hides."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '1', '--master_port',
           str(free_port()), *main_cmd(tiny_args(tiny_data, *WORKERS), tmp_path, 'torchrun')]
    proc = _start(cmd, REPO, subprocess_env(), str(tmp_path / 'torchrun'))
    out_dir = tmp_path / MODEL_NAME / 'torchrun'
    sig = getattr(signal, signame)
    send = (lambda: os.killpg(proc.pid, sig)) if to_group else (lambda: os.kill(proc.pid, sig))
    _stop_during_epoch_1(proc, out_dir / 'log_rank0.txt', send)
    _saved_step(out_dir, signame)
    assert 'DataLoader worker' not in (tmp_path / 'torchrun.err').read_text()


@pytest.mark.slow
def test_ctrl_c_to_main_py_with_workers_saves_and_exits_130(tmp_path, tiny_data):
    """SIGINT to the process group, as a terminal sends it: DataLoader workers included."""
    cmd = [sys.executable, *main_cmd(tiny_args(tiny_data, *WORKERS), tmp_path, 'ctrl_c')]
    proc = _start(cmd, REPO, subprocess_env(), str(tmp_path / 'main'))
    out_dir = tmp_path / MODEL_NAME / 'ctrl_c'
    code = _stop_during_epoch_1(proc, out_dir / 'log_rank0.txt', lambda: os.killpg(proc.pid, signal.SIGINT))
    stderr = (tmp_path / 'main.err').read_text()
    assert code == 130, stderr[-3000:]
    _saved_step(out_dir, 'SIGINT')
    assert 'Traceback' not in stderr and 'KeyboardInterrupt' not in stderr


@pytest.mark.slow
def test_failing_train_sh_ends_with_the_one_line_error(tmp_path, tiny_data):
    """evaluate.sh ends the same way: both go through tools/launch.sh (tested below without torchrun)."""
    args = ['1', DEMO_CFG, 'bad', '--output', str(tmp_path), *tiny_args(tiny_data, 'TRAIN.EPOCHZ', '3')]
    proc = run_process(['bash', str(REPO / 'train.sh'), *args], tmp_path, _script_env(), timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "error: --opts: unknown config key 'TRAIN.EPOCHZ'; did you mean 'TRAIN.EPOCHS'?"
    assert 'Traceback' not in proc.stdout + proc.stderr and 'ChildFailedError' not in proc.stderr


# ----------------------------------------------------------------------------- launch.sh's verdict
FAKE_TORCHRUN = """#!/usr/bin/env bash
# Stands in for torchrun: each rank's (exit code, message) comes from FAKE_RANKS "code:message;...".
IFS=';' read -ra ranks <<< "$FAKE_RANKS"
for i in "${!ranks[@]}"; do
    [ "${ranks[$i]}" = - ] && continue
    printf '%s\\n%s\\n' "${ranks[$i]%%:*}" "${ranks[$i]#*:}" > "$DAT_RESULT_DIR/rank$i"
done
echo "torchrun's own report" >&2
exit "$FAKE_STATUS"
"""


@pytest.mark.parametrize('ranks, status, code, last', [
    ('0:;0:', 0, 0, None),                                       # success
    ('0:;130:error: interrupted', 1, 130, 'error: interrupted'),  # Ctrl-C wins over success
    ('130:x;2:error: bad data', 1, 2, 'error: bad data'),         # an error wins over Ctrl-C
    ('2:error: first;3:error: second', 1, 2, 'error: first'),     # the first error
    ('0:;-', 1, 1, "torchrun's own report"),                      # a rank that could not report
    ('-;-', 7, 7, "torchrun's own report"),
])
def test_launch_reports_what_the_ranks_said(tmp_path, ranks, status, code, last):
    fake = tmp_path / 'fake_torchrun.sh'
    fake.write_text(FAKE_TORCHRUN)
    env = {**os.environ, 'TORCHRUN': f'bash {fake}', 'FAKE_RANKS': ranks, 'FAKE_STATUS': str(status),
           'TMPDIR': str(tmp_path)}
    proc = subprocess.run(['bash', str(REPO / 'tools' / 'launch.sh'), str(ranks.count(';') + 1), '--cfg', 'x'],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert (lines[-1] if lines else None) == last
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('dat-launch')]     # cleaned up


def test_launch_without_torch_says_which_environment_to_activate(tmp_path):
    """No torchrun on PATH and no python3 that imports torch: one line and exit 2, not 'command not found'."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    for tool in ('bash', 'mktemp', 'rm', 'dirname', 'seq', 'find', 'wc', 'sed', 'head', 'cat'):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    env = {'PATH': str(bin_dir), 'TMPDIR': str(tmp_path)}
    proc = subprocess.run(['bash', str(REPO / 'tools' / 'launch.sh'), '1', '--cfg', 'x'], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        'error: torchrun not found: activate the Python environment that has torch (e.g. . .venv/bin/activate)']


# ----------------------------------------------------------------------------- the signal handler
def test_stop_request_records_the_first_signal_and_a_second_ctrl_c_does_not_wait():
    from preemption import STOP_SIGNALS, StopRequest, exit_code, ignore_stop_signals
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    stop = StopRequest()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.name == 'SIGTERM' and exit_code(stop.signum) == 0
        os.kill(os.getpid(), signal.SIGUSR1)          # a later signal changes nothing
        assert stop.signum == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGINT)           # at once: torchrun passing on the same Ctrl-C
        stop._since -= StopRequest.REPEAT_S + 0.1
        with pytest.raises(KeyboardInterrupt):        # later: a second Ctrl-C does not wait
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.uninstall()
    assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == before
    assert exit_code(signal.SIGINT) == 130 and exit_code(None) == 0
    try:
        ignore_stop_signals(0)
        assert all(signal.getsignal(sig) is signal.SIG_IGN for sig in STOP_SIGNALS)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
