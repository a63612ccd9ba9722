"""Auto-resume continues the exact trajectory: a run resumed from an epoch-end or a mid-epoch
checkpoint ends with parameters and optimizer state bit-identical to an uninterrupted run
(CPU, DETERMINISTIC, augmentations in the main process)."""
from __future__ import annotations

import re
import shutil
import signal

import pytest

from conftest import (MODEL_NAME, TINY_EPOCHS, assert_same_training_state, final_checkpoint,
                      load_ckpt, run_main, start_main, tiny_args, wait_for)

pytestmark = pytest.mark.slow       # starts real main.py processes


def _resumed_from(log: str):
    match = re.search(r'resumed: epoch (\d+), iteration (\d+)', log)
    assert match, 'the run did not resume'
    return int(match.group(1)), int(match.group(2))


def test_epoch_boundary_resume_is_exact(tmp_path, tiny_data, tiny_reference):
    # The state after epoch 0 of the straight run, alone in a fresh output folder.
    out_dir = tmp_path / MODEL_NAME / 'resumed'
    out_dir.mkdir(parents=True)
    shutil.copy(tiny_reference.output / 'ckpt_epoch_0.pth', out_dir)

    run = run_main(tiny_args(tiny_data), tmp_path, tag='resumed').check()
    assert _resumed_from(run.log()) == (1, 0)
    # Only epochs 1.. were trained here.
    assert 'Train: [0/' not in run.stdout and f'Train: [{TINY_EPOCHS - 1}/' in run.stdout

    straight, resumed = final_checkpoint(tiny_reference.output), final_checkpoint(run.output)
    assert_same_training_state(straight, resumed)
    assert straight['lr_scheduler'] == resumed['lr_scheduler']
    assert straight['max_accuracy'] == resumed['max_accuracy']
    assert run.accuracies() == tiny_reference.accuracies()[1:]


def test_mid_epoch_resume_is_exact(tmp_path, tiny_data, tiny_reference):
    # Mid-epoch checkpoints every 4 iterations; the process dies right after one of epoch 1.
    proc = start_main(tiny_args(tiny_data, 'TRAIN.SAVE_ITER_FREQ', '4'), tmp_path, tag='mid')
    out_dir = tmp_path / MODEL_NAME / 'mid'
    try:
        assert wait_for(lambda: (out_dir / 'ckpt_epoch_1_iter_4.pth').exists(), timeout=120, proc=proc,
                        interval=0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    mids = sorted(out_dir.glob('ckpt_epoch_1_iter_*.pth'), key=lambda p: int(p.stem.rsplit('_', 1)[1]))
    assert mids, 'no mid-epoch checkpoint of epoch 1 on disk'
    assert not (out_dir / 'ckpt_epoch_1.pth').exists(), 'the process finished the epoch before the kill'
    newest = load_ckpt(mids[-1])
    assert newest['epoch'] == 1 and newest['iteration'] % 4 == 0

    run = run_main(tiny_args(tiny_data, 'TRAIN.SAVE_ITER_FREQ', '4'), tmp_path, tag='mid').check()
    assert _resumed_from(run.log()) == (1, newest['iteration'])
    assert_same_training_state(final_checkpoint(tiny_reference.output), final_checkpoint(run.output))
    assert run.accuracies() == tiny_reference.accuracies()[1:]


def test_rerunning_a_finished_run_says_so(tmp_path, tiny_data, tiny_reference):
    out_dir = tmp_path / MODEL_NAME / 'done'
    out_dir.mkdir(parents=True)
    shutil.copy(tiny_reference.output / f'ckpt_epoch_{TINY_EPOCHS - 1}.pth', out_dir)
    run = run_main(tiny_args(tiny_data), tmp_path, tag='done').check()
    assert 'training is already finished' in run.stdout and 'Train: [' not in run.stdout
    assert sorted(p.name for p in out_dir.glob('*.pth')) == [f'ckpt_epoch_{TINY_EPOCHS - 1}.pth']
