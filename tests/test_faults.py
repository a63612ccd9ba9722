"""Faults a user meets through the real entry points (``main.py``, ``train.sh``): a DataLoader
worker killed, a second stop signal during shutdown, a training split that vanishes, class
folders with names that are not UTF-8, a resolution change on resume, ``--eval`` of EMA
weights, and raising ``TRAIN.EPOCHS`` on a finished run."""
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

from conftest import (DEMO_CFG, MODEL_NAME, REPO, free_port, kill_group, load_ckpt, main_cmd, run_main,
                      subprocess_env, tiny_args, wait_for)

pytestmark = pytest.mark.slow       # starts real main.py / train.sh processes

WORKERS = ('DATA.NUM_WORKERS', '2', 'DATA.PIN_MEMORY', 'False')


def _start(cmd, cwd: Path, name: str, env=None) -> subprocess.Popen:
    """Start ``cmd`` as the leader of a new process group, output to ``cwd/name.out|err``."""
    out, err = open(cwd / f'{name}.out', 'w'), open(cwd / f'{name}.err', 'w')
    return subprocess.Popen(cmd, cwd=REPO, env=env or subprocess_env(), stdout=out, stderr=err,
                            start_new_session=True)


def _children(pid: int):
    try:
        with open(f'/proc/{pid}/task/{pid}/children') as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _log(out_dir: Path) -> str:
    path = out_dir / 'log_rank0.txt'
    return path.read_text(errors='replace') if path.exists() else ''


def _copy_data(src: str, dst: Path) -> str:
    shutil.copytree(src, dst)
    return str(dst)


# ----------------------------------------------------------------------------- a worker killed
def test_a_killed_dataloader_worker_ends_the_run_in_one_line_and_it_resumes(tmp_path, tiny_data):
    from main import EXIT_WORKER_DIED
    args = tiny_args(tiny_data, *WORKERS)
    proc = _start([sys.executable, *main_cmd(args, tmp_path, 'oom')], tmp_path, 'main')
    out_dir = tmp_path / MODEL_NAME / 'oom'
    try:
        assert wait_for(lambda: 'Train: [1/' in _log(out_dir), timeout=240, proc=proc), \
            f'training did not reach epoch 1 (exit {proc.poll()})'
        workers = _children(proc.pid)
        assert workers, 'no DataLoader worker found'
        os.kill(workers[0], signal.SIGKILL)          # as the out-of-memory killer does
        code = proc.wait(timeout=120)                 # before: hangs forever
    finally:
        kill_group(proc)
    stderr = (tmp_path / 'main.err').read_text()
    assert code == EXIT_WORKER_DIED, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith('error: a DataLoader worker') and 'SIGKILL' in last and 'DATA.NUM_WORKERS' in last, last
    assert 'Traceback' not in stderr, stderr[-3000:]
    assert not any(os.path.exists(f'/proc/{p}') and 'Z' not in open(f'/proc/{p}/stat').read().split()[2]
                   for p in workers[1:]), 'a worker outlived the run'

    run = run_main(args, tmp_path, tag='oom').check()
    assert 'resuming from' in run.log()


# ----------------------------------------------------------------------------- a second SIGTERM
def test_sigterm_again_during_shutdown_keeps_exit_code_zero(tmp_path, tiny_data):
    proc = _start([sys.executable, *main_cmd(tiny_args(tiny_data), tmp_path, 'twice')], tmp_path, 'main')
    out_dir = tmp_path / MODEL_NAME / 'twice'
    sent = 0
    try:
        assert wait_for(lambda: 'Train: [1/' in _log(out_dir), timeout=240, proc=proc)
        proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: 'stop requested' in _log(out_dir), timeout=120, proc=proc)
        # Schedulers and impatient users send more: keep sending until the process has gone.
        while proc.poll() is None and sent < 3000:
            proc.send_signal(signal.SIGTERM)
            sent += 1
            time.sleep(0.01)
        code = proc.wait(timeout=60)
    finally:
        kill_group(proc)
    assert code == 0, (code, sent, (tmp_path / 'main.err').read_text()[-2000:])
    assert sent > 10 and 'state saved' in _log(out_dir)


# ----------------------------------------------------------------------------- the data vanishes
@pytest.mark.parametrize('vanish', ['train', 'root'])
def test_data_vanishing_mid_run_is_an_error_naming_the_missing_path(tmp_path, tiny_data, vanish):
    data = _copy_data(tiny_data, tmp_path / 'share')
    gone = Path(data) / 'train' if vanish == 'train' else Path(data)
    proc = _start([sys.executable, *main_cmd(tiny_args(data), tmp_path, 'gone')], tmp_path, 'main')
    out_dir = tmp_path / MODEL_NAME / 'gone'
    try:
        assert wait_for(lambda: 'Train: [1/' in _log(out_dir), timeout=240, proc=proc)
        gone.rename(gone.with_name(gone.name + '.unmounted'))      # val/ stays for vanish='train'
        code = proc.wait(timeout=240)          # before: trains on nothing, loss 0.0000, exit 0
    finally:
        kill_group(proc)
    stderr = (tmp_path / 'main.err').read_text()
    assert code == 2, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: '{gone}' no longer exists") and 'DATA.MAX_SKIPPED_FRACTION' in last, last
    assert 'Traceback' not in stderr
    metrics = [line for line in (out_dir / 'metrics.jsonl').read_text().splitlines()] \
        if (out_dir / 'metrics.jsonl').exists() else []
    assert len(metrics) <= 1                  # epoch 0 only: nothing was recorded for the empty epoch


def test_max_skipped_fraction_is_range_checked(tmp_path, tiny_data):
    run = run_main(tiny_args(tiny_data, 'DATA.MAX_SKIPPED_FRACTION', '1.5'), tmp_path, tag='range')
    assert run.returncode == 2
    assert 'DATA.MAX_SKIPPED_FRACTION' in run.stderr.strip().splitlines()[-1] and '[0, 1]' in run.stderr


# ----------------------------------------------------------------------------- names not UTF-8
LATIN1 = b'caf\xe9'           # 'café' in Latin-1, as old archives hold it


def _latin1_data(tmp_path: Path, tiny_data: str, only_train: bool = False) -> str:
    data = _copy_data(tiny_data, tmp_path / 'latin1')
    first = sorted(os.listdir(Path(data) / 'train'))[0]
    for split in ('train',) if only_train else ('train', 'val'):
        os.rename(os.fsencode(Path(data) / split / first), os.fsencode(Path(data) / split) + b'/' + LATIN1)
    if only_train:
        return data
    with open(os.fsencode(Path(data) / 'train') + b'/' + LATIN1 + b'/bad.jpg', 'wb') as f:
        f.write(b'not an image')
    return data


def test_a_class_folder_name_that_is_not_utf8_is_logged_safely(tmp_path, tiny_data):
    data = _latin1_data(tmp_path, tiny_data)
    run = run_main(tiny_args(data, 'TRAIN.EPOCHS', '2'), tmp_path, tag='latin1')
    assert run.returncode == 0, run.stderr[-3000:]
    assert 'Logging error' not in run.stdout + run.stderr, run.stderr[-3000:]
    assert 'UnicodeEncodeError' not in run.stdout + run.stderr
    assert 'skipped unreadable image' in run.log() and 'caf\\xe9/bad.jpg' in run.log()


def test_train_sh_ends_with_the_one_line_error_naming_a_folder_that_is_not_utf8(tmp_path, tiny_data):
    data = _latin1_data(tmp_path, tiny_data, only_train=True)
    env = subprocess_env(PORT=str(free_port()), TORCHRUN=f'{sys.executable} -m torch.distributed.run')
    cmd = ['bash', str(REPO / 'train.sh'), '1', DEMO_CFG, 'latin1', '--output', str(tmp_path), *tiny_args(data)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, timeout=300)
    stderr = proc.stderr.decode('utf-8', 'replace')
    assert proc.returncode == 2, stderr[-3000:]      # before: 'exit: : numeric argument required' (status 2 by accident)
    last = stderr.strip().splitlines()[-1]
    assert last.startswith('error: class folders differ') and 'caf\\xe9' in last, last
    assert 'numeric argument required' not in stderr and 'Logging error' not in stderr


# ----------------------------------------------------------------------------- another resolution
def test_resume_at_another_img_size_says_so_and_keeps_best_per_size(tmp_path, tiny_data):
    first = run_main(tiny_args(tiny_data, 'TRAIN.EPOCHS', '2', 'TRAIN.WARMUP_EPOCHS', '0'), tmp_path, tag='res').check()
    assert (first.output / 'best.pth').exists()
    old_best = load_ckpt(first.output / 'best.pth')
    run = run_main(tiny_args(tiny_data, 'TRAIN.EPOCHS', '3', 'TRAIN.WARMUP_EPOCHS', '0', 'DATA.IMG_SIZE', '96'),
                   tmp_path, tag='res').check()
    lines = [line for line in run.log().splitlines() if 'resuming at DATA.IMG_SIZE 96' in line]
    assert len(lines) == 1 and 'trained at 64' in lines[0] and 'best_64px.pth' in lines[0], run.log()[-3000:]
    kept = load_ckpt(first.output / 'best_64px.pth')
    assert kept['epoch'] == old_best['epoch'] and kept['max_accuracy'] == old_best['max_accuracy']
    # The epoch at 96 px is compared with nothing at 64 px: it is the new size's best.
    last = run.metrics()[-1]
    assert last['epoch'] == 2 and last['max_accuracy'] == last['val_acc1']
    assert load_ckpt(first.output / 'best.pth')['epoch'] == 2


# ----------------------------------------------------------------------------- --eval and EMA weights
def test_eval_says_which_weights_and_eval_ema_evaluates_the_ema_copy(tmp_path, tiny_data):
    train = run_main(tiny_args(tiny_data, 'TRAIN.EPOCHS', '2', 'TRAIN.WARMUP_EPOCHS', '0',
                               'TRAIN.EMA.ENABLE', 'True', 'TRAIN.EMA.DECAY', '0.9'), tmp_path, tag='ema').check()
    ckpt = str(train.output / 'ckpt_epoch_1.pth')
    logged_raw = train.accuracies()[-1]
    logged_ema = float(re.findall(r'EMA accuracy: ([\d.]+)%', train.stdout)[-1])

    raw = run_main(['--eval', '--resume', ckpt, *tiny_args(tiny_data)], tmp_path, tag='eval_raw').check()
    assert f"evaluating {ckpt}: its weights ('model'); it also holds EMA weights ('ema'), which --eval-ema " \
           f"evaluates" in raw.stdout, raw.stdout[-2000:]
    assert raw.accuracies() == [logged_raw]

    ema = run_main(['--eval-ema', '--resume', ckpt, *tiny_args(tiny_data)], tmp_path, tag='eval_ema').check()
    assert f"evaluating {ckpt}: its EMA weights ('ema')" in ema.stdout, ema.stdout[-2000:]
    assert ema.accuracies() == [pytest.approx(logged_ema, abs=0.006)]      # logged with 2 decimals

    plain = run_main(tiny_args(tiny_data, 'TRAIN.EPOCHS', '2', 'TRAIN.WARMUP_EPOCHS', '0'), tmp_path, tag='plain').check()
    none = run_main(['--eval-ema', '--resume', str(plain.output / 'ckpt_epoch_1.pth'), *tiny_args(tiny_data)],
                    tmp_path, tag='eval_none')
    assert none.returncode == 2
    assert 'holds no EMA weights' in none.stderr.strip().splitlines()[-1]


# ----------------------------------------------------------------------------- more epochs after the end
def test_raising_epochs_on_a_finished_run_warns_once_that_the_lr_rises(tmp_path, tiny_data):
    run_main(tiny_args(tiny_data, 'TRAIN.EPOCHS', '2', 'TRAIN.WARMUP_EPOCHS', '0'), tmp_path, tag='more').check()
    again = run_main(tiny_args(tiny_data, 'TRAIN.EPOCHS', '2', 'TRAIN.WARMUP_EPOCHS', '0'), tmp_path, tag='more').check()
    assert 'training is already finished' in again.stdout
    run = run_main(tiny_args(tiny_data, 'TRAIN.EPOCHS', '3', 'TRAIN.WARMUP_EPOCHS', '0'), tmp_path, tag='more').check()
    warnings = [line for line in run.stdout.splitlines() if 'learning-rate schedule differs' in line]
    assert len(warnings) == 1, run.stdout[-3000:]
    assert 'TRAIN.EPOCHS 2 -> 3' in warnings[0] and 'at epoch 2 iteration 0' in warnings[0]
    assert 'it rises again' in warnings[0]
    before, after = (float(x) for x in re.search(r'goes from (\S+) to (\S+?) ', warnings[0]).groups())
    assert before == pytest.approx(run.metrics()[1]['lr'], rel=1e-2) and after > 10 * before   # epoch 1's end
    # Epoch 2 ran on the new, longer cosine: its first step at the new schedule's (higher) rate.
    first_step = float(re.search(r'Train: \[2/3\]\[0/12\].*? lr (\S+)', run.stdout).group(1))
    assert first_step == pytest.approx(after, abs=1e-5)          # logged with 6 decimals
