"""Checkpoint safety through the real entry point: a full disk, a folder two runs share, a newest
checkpoint the system will not let us read, a read-only output folder and a resume with another
batch size. Each failure is one line on stderr (exit 2, no traceback) and leaves the checkpoints
saved before byte-identical."""
from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import pytest
import torch

from conftest import (MODEL_NAME, REPO, Run, file_digests, kill_group, load_ckpt, main_cmd, mounted_tmpfs,
                      run_main, start_main, subprocess_env, tiny_args, wait_for)

pytestmark = pytest.mark.slow

TAG = 'case'
# Root ignores file permissions through these two capabilities; without them (still uid 0) a mode
# 000 file or a mode 555 folder is refused by the kernel as it is for any user.
NO_DAC = ['setpriv', '--bounding-set', '-dac_override,-dac_read_search']


def _run(args: Sequence[str], output: Path, prefix: Sequence[str] = (), preexec_fn=None, timeout: float = 300) -> Run:
    cmd = [*prefix, sys.executable, *main_cmd(args, output, TAG)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=preexec_fn)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise
    return Run(proc.returncode, out, err, output / MODEL_NAME / TAG, 0.0)


def _one_line_error(run: Run, *words: str) -> str:
    assert run.returncode == 2, f"exit {run.returncode}\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
    assert 'Traceback' not in run.stderr, run.stderr[-3000:]
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: '), run.stderr[-3000:]
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    return lines[0]


def _folder_with_checkpoint(root: Path, reference: Run, epoch: int = 0) -> Path:
    out_dir = root / MODEL_NAME / TAG
    out_dir.mkdir(parents=True)
    shutil.copy(reference.output / f'ckpt_epoch_{epoch}.pth', out_dir)
    return out_dir


def _checkpoint_digests(out_dir: Path) -> dict:
    return {k: v for k, v in file_digests(out_dir).items() if k.endswith('.pth')}


def _no_temp_files(out_dir: Path) -> bool:
    return not [p.name for p in out_dir.iterdir() if p.name.endswith('.tmp')]


# ----------------------------------------------------------------------------- a full disk
def _file_size_limit(limit: int):
    def apply() -> None:
        # A process that ignores SIGXFSZ gets EFBIG from write(), as one on a full disk gets ENOSPC.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_failing_checkpoint_write_is_one_line_with_tensorboard_on(tmp_path, tiny_data, tiny_reference):
    # Logs, config and TensorBoard events stay below the limit; the 1.2 MB checkpoint does not.
    out_dir = _folder_with_checkpoint(tmp_path, tiny_reference)
    before = _checkpoint_digests(out_dir)
    assert (out_dir / 'ckpt_epoch_0.pth').stat().st_size > 600_000
    run = _run(tiny_args(tiny_data, 'TRAIN.EPOCHS', '2', 'TENSORBOARD', 'True'), tmp_path,
               preexec_fn=_file_size_limit(600_000))
    _one_line_error(run, f"could not write checkpoint {out_dir / 'ckpt_epoch_1.pth'}: File too large",
                    "earlier checkpoints kept")
    assert 'resumed: epoch 1' in run.stdout and (out_dir / 'tensorboard').is_dir()
    assert _checkpoint_digests(out_dir) == before and _no_temp_files(out_dir)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1.8 MB tmpfs: room for one tiny checkpoint and the logs, not for a second checkpoint."""
    with mounted_tmpfs(tmp_path / 'disk', '1800k', '; the file-size-limit test covers the same path') as mount:
        yield mount


def test_full_disk_is_one_line_and_keeps_earlier_checkpoints(small_tmpfs, tiny_data, tiny_reference):
    out_dir = _folder_with_checkpoint(small_tmpfs, tiny_reference)
    before = _checkpoint_digests(out_dir)
    run = _run(tiny_args(tiny_data, 'TRAIN.EPOCHS', '2', 'TENSORBOARD', 'True'), small_tmpfs)
    _one_line_error(run, f"could not write checkpoint {out_dir / 'ckpt_epoch_1.pth'}: No space left on device",
                    "earlier checkpoints kept", "free disk space")
    assert _checkpoint_digests(out_dir) == before and _no_temp_files(out_dir)


# ----------------------------------------------------------------------------- unreadable newest
def _can_drop_dac() -> Optional[str]:
    if os.geteuid() != 0:
        return 'needs root (as another user, chmod alone makes a file unreadable; not tested here)'
    if shutil.which('setpriv') is None:
        return 'setpriv is not installed'
    probe = subprocess.run([*NO_DAC, 'true'], capture_output=True, text=True)
    return None if probe.returncode == 0 else f'setpriv cannot drop capabilities: {probe.stderr.strip()}'


needs_no_dac = pytest.mark.skipif(_can_drop_dac() is not None, reason=str(_can_drop_dac()))


@needs_no_dac
def test_permission_denied_on_newest_checkpoint_stops_and_deletes_nothing(tmp_path, tiny_data, tiny_reference):
    out_dir = _folder_with_checkpoint(tmp_path, tiny_reference, epoch=0)
    shutil.copy(tiny_reference.output / 'ckpt_epoch_1.pth', out_dir)
    newest = out_dir / 'ckpt_epoch_1.pth'
    newest.chmod(0)
    before = _checkpoint_digests(out_dir)
    try:
        run = _run(tiny_args(tiny_data), tmp_path, prefix=NO_DAC)
        _one_line_error(run, f"cannot read checkpoint {newest}: Permission denied", "nothing was deleted")
        assert 'resumed' not in run.stdout and 'Train:' not in run.stdout
    finally:
        newest.chmod(0o644)
    assert _checkpoint_digests(out_dir) == before


# ----------------------------------------------------------------------------- read-only output folder
@needs_no_dac
def test_read_only_output_folder_refuses_training_and_allows_eval(tmp_path, tiny_data, tiny_reference):
    out_dir = _folder_with_checkpoint(tmp_path, tiny_reference, epoch=3)
    before = file_digests(out_dir)
    out_dir.chmod(0o555)
    try:
        train = _run(tiny_args(tiny_data), tmp_path, prefix=NO_DAC)
        _one_line_error(train, f"output folder {out_dir} is not writable: Permission denied")
        evaluate = _run(['--eval', *tiny_args(tiny_data)], tmp_path, prefix=NO_DAC)
        throughput = _run(['--throughput', *tiny_args(tiny_data)], tmp_path, prefix=NO_DAC)
    finally:
        out_dir.chmod(0o755)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert f"evaluating {out_dir / 'ckpt_epoch_3.pth'}" in evaluate.stdout
    assert evaluate.accuracies() == tiny_reference.accuracies()[-1:]
    assert 'not writable: logging to the console only' in evaluate.stdout
    assert throughput.returncode == 0 and 'images/s' in throughput.stdout, throughput.stderr[-3000:]
    assert file_digests(out_dir) == before and sorted(p.name for p in out_dir.iterdir()) == ['ckpt_epoch_3.pth']


# ----------------------------------------------------------------------------- two runs, one folder
def test_second_run_into_a_busy_folder_is_refused_and_a_killed_holder_is_not(tmp_path, tiny_data):
    args = tiny_args(tiny_data, 'TRAIN.EPOCHS', '100')
    holder = start_main(args, tmp_path, tag=TAG)
    out_dir = tmp_path / MODEL_NAME / TAG
    try:
        assert wait_for(lambda: 'Train: [0/' in (tmp_path / 'proc0.out').read_text(), timeout=120, proc=holder)
        second = run_main(args, tmp_path, tag=TAG)
        _one_line_error(second, f"output folder {out_dir} is in use by another run (pid {holder.pid} on host",
                        "another --tag or --output")
        assert holder.poll() is None, 'the first run stopped'
        assert 'Train:' not in second.stdout
        # refused before writing anything there, not even a line of the holder's log
        assert (out_dir / 'log_rank0.txt').read_text().count('rank 0 of 1 on cpu') == 1
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The holder died without releasing anything: its lock does not outlive it.
    third = run_main(tiny_args(tiny_data, 'TRAIN.EPOCHS', '2'), tmp_path, tag=TAG).check()
    pid = int(re.findall(r'\(pid (\d+)\)', third.log())[-1])
    assert json.loads((out_dir / '.run.lock').read_text())['pid'] == pid


# ----------------------------------------------------------------------------- another batch size
def _mid_epoch_checkpoint(out_dir: Path, reference: Run, iteration: int, batch: int) -> Path:
    """Epoch 0's state, recorded as ``iteration`` batches of ``batch`` images into epoch 1."""
    ckpt = load_ckpt(reference.output / 'ckpt_epoch_0.pth')
    ckpt.update(epoch=1, iteration=iteration, samples_seen=iteration * batch)
    out_dir.mkdir(parents=True)
    path = out_dir / f'ckpt_epoch_1_iter_{iteration}.pth'
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize('batch, start, repeated', [(4, 2, 0), (3, 2, 2)])
def test_resume_with_another_batch_size_continues_at_the_same_image(tmp_path, tiny_data, tiny_reference,
                                                                     batch, start, repeated):
    # 4 batches of 2 images done (8 images); this run takes `batch` images per step.
    _mid_epoch_checkpoint(tmp_path / MODEL_NAME / TAG, tiny_reference, iteration=4, batch=2)
    run = _run(tiny_args(tiny_data, 'TRAIN.EPOCHS', '2', 'DATA.BATCH_SIZE', str(batch)), tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f'resumed: epoch 1, iteration {start}' in run.stdout
    steps = 24 // batch
    assert re.search(rf'Train: \[1/2\]\[{start}/{steps}\]', run.stdout), run.stdout[-3000:]
    assert not re.search(rf'Train: \[1/2\]\[{start - 1}/{steps}\]', run.stdout)
    if repeated:
        assert f'resuming at batch {start}, so {repeated} images of it are seen a second time' in run.stdout
    else:
        assert 'a second time' not in run.stdout
