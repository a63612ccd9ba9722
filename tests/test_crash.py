"""Crash safety: a training process killed at arbitrary moments (SIGKILL: no chance to clean up)
leaves only loadable checkpoints and auto-resume reaches the uninterrupted run's exact state;
SIGTERM (preemption) saves the current step and exits with status 0."""
from __future__ import annotations

import random
import re
import signal
import time

import pytest
import torch

from conftest import (MODEL_NAME, TINY_EPOCHS, assert_same_training_state, checkpoint_files,
                      final_checkpoint, load_ckpt, run_main, start_main, tiny_args, wait_for)

pytestmark = pytest.mark.slow       # starts real main.py processes

KILLS = 10
STEPS_PER_EPOCH = 12


def _train_lines(path) -> int:
    return len(re.findall(r'Train: \[', path.read_text())) if path.exists() else 0


def _all_checkpoints_load(out_dir) -> int:
    files = checkpoint_files(out_dir)
    for path in files:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
        assert {'model', 'optimizer', 'lr_scheduler', 'rng', 'epoch', 'iteration'} <= ckpt.keys(), path
    return len(files)


def test_sigkill_at_random_moments_then_resume_is_exact(tmp_path, tiny_data, tiny_reference):
    rng = random.Random(20240229)
    args = tiny_args(tiny_data, 'TRAIN.SAVE_ITER_FREQ', '1')
    out_dir = tmp_path / MODEL_NAME / 'crash'
    moments = []
    started = time.time()
    for kill in range(KILLS):
        proc = start_main(args, tmp_path, tag='crash')
        stdout = tmp_path / f'proc{kill}.out'
        try:
            if kill % 3 == 2:
                # Some kills land during start-up / resume (imports, data, model, checkpoint
                # loading), at the latest when the first step is logged.
                delay = rng.uniform(0.5, 5.0)
                wait_for(lambda: _train_lines(stdout) >= 1, timeout=delay, proc=proc)
                moments.append(f'start-up, <= {delay:.2f}s')
            else:
                # Most land during training: after 0-2 further logged steps plus a random fraction
                # of a step, i.e. anywhere in a step, including the per-step checkpoint write.
                steps = rng.randint(0, 2)
                assert wait_for(lambda: _train_lines(stdout) >= 1 + steps, timeout=120, proc=proc), \
                    f'kill {kill}: the process ended before training ({proc.poll()})'
                delay = rng.uniform(0.0, 0.08)
                time.sleep(delay)
                moments.append(f'{steps} steps + {delay * 1000:.0f}ms')
            assert proc.poll() is None, f'kill {kill}: the run finished before it could be killed'
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        # Whatever the moment, every checkpoint file on disk must load safely.
        _all_checkpoints_load(out_dir)

    final = run_main(args, tmp_path, tag='crash').check()
    assert 'resumed: epoch' in final.log()
    assert _all_checkpoints_load(out_dir) >= 1
    assert_same_training_state(final_checkpoint(tiny_reference.output), final_checkpoint(out_dir))
    print(f'{KILLS} kills at {moments}; {time.time() - started:.0f}s in all')


def test_sigterm_saves_current_step_and_exits_zero(tmp_path, tiny_data, tiny_reference):
    args = tiny_args(tiny_data)                  # no periodic mid-epoch checkpoints
    proc = start_main(args, tmp_path, tag='term')
    stdout = tmp_path / 'proc0.out'
    try:
        assert wait_for(lambda: 'Train: [1/' in stdout.read_text(), timeout=120, proc=proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.wait()
    log = stdout.read_text()
    match = re.search(r'stop requested \(SIGTERM\): saving epoch (\d+) iteration (\d+)', log)
    assert match, log[-2000:]
    epoch, done = int(match.group(1)), int(match.group(2))
    # The step in flight when the signal came was finished and is the last one logged.
    last = re.findall(rf'Train: \[{epoch}/{TINY_EPOCHS}\]\[(\d+)/{STEPS_PER_EPOCH}\]', log)
    assert int(last[-1]) + 1 == done
    out_dir = tmp_path / MODEL_NAME / 'term'
    ckpt = load_ckpt(out_dir / f'ckpt_epoch_{epoch}_iter_{done}.pth')
    assert (ckpt['epoch'], ckpt['iteration']) == (epoch, done)

    # The saved state is the exact state of that step: resuming ends where the straight run did.
    run = run_main(args, tmp_path, tag='term').check()
    assert f'resumed: epoch {epoch}, iteration {done}' in run.log()
    assert_same_training_state(final_checkpoint(tiny_reference.output), final_checkpoint(out_dir))
