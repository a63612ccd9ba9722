"""Faults of one rank among several, through ``train.sh`` (real torchrun, 2 CPU ranks, gloo), with
the default ``PRINT_FREQ`` (100) and steps slowed down (``slow_steps/``) so that 100 of them take
far longer than the few seconds a stop may take:

- SIGTERM to one rank only: both ranks agree on it within seconds, mid-epoch, save and exit 0;
- SIGKILL of one rank (what the OOM killer sends): the other stops within seconds, exit status
  5, and the last line names the lost rank and the checkpoint a rerun resumes from; no gloo
  traceback on screen. (The same under SLURM: ``test_slurm.py``.)
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

pytestmark = pytest.mark.slow

SLOW_STEPS = str(Path(__file__).parent / 'slow_steps')
STEP_SLEEP = 0.25           # 100 steps: 25 s
EXIT_RANK_LOST = 5


def _start(tmp_path: Path, tag: str, data: str) -> subprocess.Popen:
    (tmp_path / 'sleep').write_text(str(STEP_SLEEP))
    env = subprocess_env(PORT=str(free_port()), TORCHRUN=f'{sys.executable} -m torch.distributed.run',
                         DAT_TEST_STEP_SLEEP_FILE=str(tmp_path / 'sleep'))
    env['PYTHONPATH'] = os.pathsep.join([SLOW_STEPS, env['PYTHONPATH']])
    cmd = ['bash', str(REPO / 'train.sh'), '2', DEMO_CFG, tag, '--output', str(tmp_path),
           *tiny_args(data, 'TRAIN.EPOCHS', '20', 'PRINT_FREQ', '100')]
    return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=open(tmp_path / 'out', 'w'),
                            stderr=open(tmp_path / 'err', 'w'), start_new_session=True)


def _read(path: Path) -> str:
    return path.read_text(errors='replace') if path.exists() else ''


def _pid(log: Path) -> int:
    return int(re.search(r'\(pid (\d+)\)', _read(log)).group(1))


def _past_first_epoch(log: Path) -> bool:
    text = _read(log)
    return 'ckpt_epoch_0.pth' in text and 'Train: [1/' in text


def test_a_signal_to_one_rank_is_agreed_within_seconds_whatever_print_freq(tmp_path, tiny_data):
    proc = _start(tmp_path, 'agree', tiny_data)
    out_dir = tmp_path / MODEL_NAME / 'agree'
    logs = [out_dir / f'log_rank{r}.txt' for r in (0, 1)]
    try:
        assert wait_for(lambda: _past_first_epoch(logs[0]), timeout=240, proc=proc), _read(tmp_path / 'err')
        time.sleep(3 * STEP_SLEEP)               # mid-epoch: steps 1..5 of 6 never log at PRINT_FREQ 100
        sent = time.time()
        os.kill(_pid(logs[1]), signal.SIGTERM)
        code = proc.wait(timeout=120)
        took = time.time() - sent
    finally:
        kill_group(proc)
    assert code == 0, _read(tmp_path / 'err')[-3000:]
    rank0 = _read(logs[0])
    match = re.search(r'stop requested \(a signal on another rank\): saving epoch (\d+) iteration (\d+)', rank0)
    assert match, rank0[-2000:]
    assert f'stop requested (SIGTERM): saving epoch {match.group(1)} iteration {match.group(2)}' in _read(logs[1])
    assert (out_dir / f'ckpt_epoch_{match.group(1)}_iter_{match.group(2)}.pth').is_file()
    # Agreement every ~2 s, a save and the exit: far less than the 25 s that 100 steps take.
    assert took < 15, took


@pytest.mark.parametrize('victim', [1, 0])
def test_a_killed_rank_ends_the_run_in_seconds_with_one_line(tmp_path, tiny_data, victim):
    proc = _start(tmp_path, 'lost', tiny_data)
    out_dir = tmp_path / MODEL_NAME / 'lost'
    logs = [out_dir / f'log_rank{r}.txt' for r in (0, 1)]
    try:
        assert wait_for(lambda: _past_first_epoch(logs[0]), timeout=240, proc=proc), _read(tmp_path / 'err')
        killed = time.time()
        os.kill(_pid(logs[victim]), signal.SIGKILL)
        code = proc.wait(timeout=120)
        took = time.time() - killed
    finally:
        kill_group(proc)
    stderr, stdout = _read(tmp_path / 'err'), _read(tmp_path / 'out')
    assert code == EXIT_RANK_LOST, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f'error: rank {victim} of 2 died (killed, out of memory, or its node was lost)'), stderr
    assert re.search(r'run the same command again to resume from \S+/ckpt_epoch_\d+(_iter_\d+)?\.pth$', last), last
    screen = stdout + stderr
    assert 'Traceback' not in screen and 'gloo' not in screen and 'ChildFailedError' not in screen, screen[-3000:]
    assert took < 20, took
