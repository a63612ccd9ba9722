"""The one-line reports behind the faults of ``test_faults.py``, in process: a dead DataLoader
worker, names that are not UTF-8, a training split that stops yielding images, a changed
schedule or resolution on resume, and stop signals after the run."""
from __future__ import annotations

import io
import logging
import os
import signal

import pytest

from config import load_config
from data.errors import DataError
from data.folder import BadSample
from data.skips import SkipGuard, missing_ancestor


def test_worker_death_is_told_apart_from_other_runtime_errors():
    from preemption import worker_death
    killed = worker_death(RuntimeError('DataLoader worker (pid 4242) is killed by signal: Killed. '))
    assert killed.startswith('a DataLoader worker (pid 4242) was killed by SIGKILL (the out-of-memory killer')
    assert 'DATA.NUM_WORKERS' in killed and 'resume' in killed
    gone = worker_death(RuntimeError('DataLoader worker (pid(s) 12, 13) exited unexpectedly'))
    assert gone.startswith('a DataLoader worker (pid 12, 13) exited unexpectedly')
    assert worker_death(RuntimeError('CUDA out of memory')) is None
    assert worker_death(ValueError('DataLoader worker (pid 1) exited unexpectedly')) is None


def test_names_that_are_not_utf8_are_escaped_in_text_and_logs():
    from logger import create_logger, safe_text
    name = os.fsdecode(b'caf\xe9')
    assert safe_text(name) == 'caf\\xe9' and safe_text('café') == 'café'
    assert safe_text('\ud800') == '\\ud800'
    stream = io.StringIO()
    logger = create_logger(None, name='dat.test_fault_messages')
    handler = logger.handlers[0]
    handler.setStream(stream)
    logger.warning("skipped unreadable image %s (%s)", f'/data/train/{name}/x.jpg', 'OSError')
    assert 'caf\\xe9/x.jpg' in stream.getvalue()


def test_skip_guard_names_the_missing_path_or_the_last_bad_file(tmp_path):
    split = tmp_path / 'share' / 'train'
    split.mkdir(parents=True)
    guard = SkipGuard(str(split), epoch_images=100, fraction=0.1)
    guard.add(10, epoch=3)                                  # at the limit: skipped and counted
    with pytest.raises(DataError, match=r"11 of the 100 training images of epoch 3 .* the last /x/b.jpg "
                                        r"\(OSError: truncated\).*DATA.MAX_SKIPPED_FRACTION"):
        guard.add(1, epoch=3, last=BadSample('/x/b.jpg', 'OSError: truncated'))
    guard.new_epoch()
    guard.add(10, epoch=4)
    (tmp_path / 'share' / 'train').rename(tmp_path / 'share' / 'gone')
    with pytest.raises(DataError, match=f"^'{split}' no longer exists"):
        guard.add(5, epoch=4)
    assert missing_ancestor(str(tmp_path / 'nothing' / 'train')) == str(tmp_path / 'nothing')
    assert missing_ancestor(str(tmp_path)) is None
    strict = SkipGuard(str(tmp_path), epoch_images=100, fraction=0.0)
    strict.add(0, epoch=0)
    with pytest.raises(DataError):
        strict.add(1, epoch=0)


def test_schedule_and_resolution_changes_are_read_from_the_saved_config():
    from checkpoint import saved_img_size, schedule_changes
    old = load_config(opts=['TRAIN.EPOCHS', '2', 'TRAIN.WARMUP_EPOCHS', '1', 'DATA.IMG_SIZE', '64'])
    new = load_config(opts=['TRAIN.EPOCHS', '3', 'TRAIN.WARMUP_EPOCHS', '1', 'TRAIN.LR_SCHEDULER.NAME', 'linear'])
    ckpt = {'config': old.dump()}
    assert schedule_changes(ckpt, new) == ['TRAIN.EPOCHS 2 -> 3', 'TRAIN.LR_SCHEDULER.NAME cosine -> linear']
    assert schedule_changes(ckpt, old) == [] and schedule_changes({}, new) == []
    assert saved_img_size(ckpt) == 64 and saved_img_size({'model': {}}) is None
    assert saved_img_size({'config': {'DATA': {'IMG_SIZE': 384}}}) == 384     # official files: a dict


def test_stop_signals_are_ignored_once_the_run_has_settled():
    from preemption import STOP_SIGNALS, StopRequest
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    stop = StopRequest()
    stop.install()
    try:
        stop.settle()
        assert all(signal.getsignal(sig) is signal.SIG_IGN for sig in STOP_SIGNALS)
        os.kill(os.getpid(), signal.SIGTERM)                # would end the process with -15 otherwise
        assert stop.signum is None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Suicidal:
    """A dataset whose worker is SIGKILLed (as by the out-of-memory killer) at item 5."""

    def __len__(self):
        return 40

    def __getitem__(self, index):
        import torch
        if index == 5:
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.zeros(3), 0


def test_a_killed_worker_is_reported_as_a_worker_death_by_the_loader():
    import torch
    from data.folder import SafeDataLoader
    from preemption import worker_death
    loader = SafeDataLoader(_Suicidal(), batch_size=2, num_workers=2,
                            collate_fn=lambda b: (torch.stack([x for x, _ in b]), torch.zeros(len(b)), 0))
    with pytest.raises(RuntimeError) as info:
        for _ in loader:
            pass
    assert worker_death(info.value) is not None, info.value
