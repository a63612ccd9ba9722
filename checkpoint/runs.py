"""A run folder's checkpoints: naming, saving, pruning and finding the most advanced one; the
run-folder lock; the output folder checks. The resume policy is in ``resume.py``.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import re
import socket
import time
from typing import Dict, List, Optional, Tuple

from .files import (_HOST, CheckpointCorrupt, CheckpointError, CheckpointUnreadable, OutputFolderError,
                    _atomic_link_or_copy, _remove_quietly, atomic_save, load_checkpoint_file)

_log = logging.getLogger(__name__)


# ============================================================================ run-folder lock
LOCK_NAME = '.run.lock'


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_HELD_LOCKS: Dict[str, int] = {}     # lock file -> descriptor, for the locks this process holds


class RunLock:
    """An exclusive ``flock`` on ``<run folder>/.run.lock``, taken by the process that writes the
    checkpoints. The kernel drops it when that process ends, however it ends, so the lock of a
    dead process never blocks; the file's text (pid, host, start time) only names the holder.
    Acquiring a folder this process already holds is a no-op. On a file system without locking
    the lock is skipped and ``unsupported`` says why."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, LOCK_NAME)
        self.unsupported: Optional[str] = None

    @property
    def _key(self) -> str:
        return os.path.realpath(self.path)

    @property
    def held(self) -> bool:
        return self._key in _HELD_LOCKS

    def acquire(self) -> 'RunLock':
        if self.held:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputFolderError(f"cannot create the run lock {self.path}: {e.strerror}; make the output "
                                    f"folder writable or choose another --output") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = self._holder(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                self.unsupported = e.strerror or str(e)
                return self
            raise OutputFolderError(
                f"output folder {os.path.dirname(self.path)} is in use by another run ({holder}); two runs "
                f"in one folder would overwrite each other's checkpoints: wait for it to end, or give this "
                f"run another --tag or --output") from None
        record = json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                             'started': time.strftime('%Y-%m-%d %H:%M:%S')}) + '\n'
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, record.encode(), 0)
        except OSError:
            pass            # the lock holds without its description
        _HELD_LOCKS[self._key] = fd
        return self

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode() or '{}')
            return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return 'holder unknown'

    def release(self) -> None:
        fd = _HELD_LOCKS.pop(self._key, None)
        if fd is not None:
            os.close(fd)              # closing the descriptor drops the flock


# ============================================================================ checkpoint files
_CKPT_NAME = re.compile(r'^ckpt_epoch_(\d+)(?:_iter_(\d+))?\.pth$')
# '.<target>.<host>.<pid>.<random>.tmp'; files of older versions have no host part.
_TEMP_NAME = re.compile(r'^\.(?:ckpt_epoch_\d+(?:_iter_\d+)?|best)\.pth\.(?:(?P<host>[A-Za-z0-9-]+)\.)?'
                        r'(?P<pid>\d+)\.[0-9a-f]+\.tmp$')
BEST_NAME = 'best.pth'
_EPOCH_END = math.inf   # an epoch-end checkpoint is past every mid-epoch one of that epoch

Progress = Tuple[int, float]


def _progress(epoch: int, iteration: Optional[int]) -> Progress:
    return int(epoch), (_EPOCH_END if iteration is None else int(iteration))


class CheckpointManager:
    """Saves ``ckpt_epoch_{e}.pth`` / ``ckpt_epoch_{e}_iter_{i}.pth`` (+ ``best.pth``) in ``output_dir``,
    prunes old ones, and finds the most advanced loadable checkpoint to resume from.

    Call ``lock`` then ``save`` on the main process only. ``keep_last`` epoch checkpoints are
    kept (``<= 0`` keeps all); ``best.pth`` is never pruned.
    """

    def __init__(self, output_dir: str, keep_last: int = 3, logger: Optional[logging.Logger] = None):
        self.output_dir = output_dir
        self.keep_last = keep_last
        self.logger = logger or _log
        self._temp_files_checked = False
        self._lock = RunLock(output_dir)

    def lock(self) -> None:
        """Take the run folder's lock (OutputFolderError naming the holder when another run has it)."""
        self._lock.acquire()
        if self._lock.unsupported:
            self.logger.warning(f"cannot lock {self._lock.path} ({self._lock.unsupported}): a second run "
                                f"started into this folder would not be detected")

    def unlock(self) -> None:
        self._lock.release()

    # -- naming
    def path_for(self, epoch: int, iteration: Optional[int] = None) -> str:
        name = f'ckpt_epoch_{epoch}.pth' if iteration is None else f'ckpt_epoch_{epoch}_iter_{iteration}.pth'
        return os.path.join(self.output_dir, name)

    def checkpoints(self) -> List[Tuple[Progress, str]]:
        """``(progress, path)`` of the numbered checkpoints on disk, oldest first (from file names)."""
        if not os.path.isdir(self.output_dir):
            return []
        found = []
        for name in os.listdir(self.output_dir):
            match = _CKPT_NAME.match(name)
            if match:
                iteration = None if match.group(2) is None else int(match.group(2))
                found.append((_progress(int(match.group(1)), iteration), os.path.join(self.output_dir, name)))
        return sorted(found)

    # -- writing
    def save(self, state: dict, epoch: int, iteration: Optional[int] = None, is_best: bool = False) -> str:
        """Write ``state`` (plus ``epoch`` and ``iteration`` entries recording the progress) atomically,
        refresh ``best.pth`` when ``is_best``, prune, and return the path written.

        ``iteration`` marks a mid-epoch checkpoint (iterations done in ``epoch``); None marks
        the end of ``epoch``.
        """
        if not self._temp_files_checked:
            self._remove_stale_temp_files()
            self._temp_files_checked = True
        path = self.path_for(epoch, iteration)
        atomic_save({**state, 'epoch': int(epoch), 'iteration': iteration}, path)
        self.logger.info(f"saved checkpoint {path}")
        if is_best:
            _atomic_link_or_copy(path, os.path.join(self.output_dir, BEST_NAME))
            self.logger.info(f"updated {os.path.join(self.output_dir, BEST_NAME)}")
        self.prune(_progress(epoch, iteration))
        return path

    def prune(self, current: Optional[Progress] = None) -> List[str]:
        """Remove checkpoints no longer needed; returns the removed paths.

        Keeps the newest ``keep_last`` epoch checkpoints and the mid-epoch ones newer than the
        newest epoch checkpoint (at most ``keep_last``). With ``current`` (the progress just
        saved), loadable files *ahead* of it are left over from an abandoned run (resumed from an
        earlier point) and are removed too, so that auto-resume cannot jump back to them; files
        ahead that do not load are left alone (auto-resume skips them; they may be evidence).
        A file that cannot be removed is reported and kept.
        """
        found = self.checkpoints()
        abandoned: List[str] = []
        if current is not None:
            abandoned = [p for prog, p in found if prog > current and self._loads(p)]
            found = [(prog, p) for prog, p in found if prog <= current]
        old: List[str] = []
        if self.keep_last > 0:
            epochs = [(prog, p) for prog, p in found if prog[1] == _EPOCH_END]
            old += [p for _, p in epochs[:-self.keep_last]]
            newest_epoch = epochs[-1][0] if epochs else None
            mids = [(prog, p) for prog, p in found if prog[1] != _EPOCH_END]
            old += [p for prog, p in mids if newest_epoch is not None and prog < newest_epoch]
            recent = [p for prog, p in mids if newest_epoch is None or prog > newest_epoch]
            old += recent[:-self.keep_last]
        removed = []
        for p in abandoned + old:
            try:
                os.remove(p)
            except FileNotFoundError:
                continue
            except OSError as e:
                self.logger.warning(f"could not remove old checkpoint {p}: {e.strerror}; it is kept")
                continue
            removed.append(p)
            if p in abandoned:
                self.logger.warning(f"removed {p}: it is ahead of the checkpoint just saved (left over from "
                                    f"a run this one was not resumed from)")
            else:
                self.logger.info(f"removed old checkpoint {p}")
        return removed

    def _loads(self, path: str) -> bool:
        try:
            load_checkpoint_file(path, mmap=True)
        except CheckpointCorrupt:
            self.logger.warning(f"kept {path} although it is ahead of the checkpoint just saved: it does not "
                                f"load (auto-resume skips it); delete it when it is no longer needed")
            return False
        except CheckpointError:
            return False
        return True

    def _remove_stale_temp_files(self) -> None:
        """Temp files of writes killed mid-way can be large and are never valid checkpoints.

        Only files of this process or of processes on this host that no longer exist are
        removed: a live writer's temp file is never touched. Done at the first save, not on
        construction: other ranks look for a resume point with a manager too."""
        if not os.path.isdir(self.output_dir):
            return
        for name in os.listdir(self.output_dir):
            match = _TEMP_NAME.match(name)
            if not match:
                continue
            host, pid = match.group('host'), int(match.group('pid'))
            if host not in (None, _HOST) or (pid != os.getpid() and _pid_alive(pid)):
                continue
            try:
                os.remove(os.path.join(self.output_dir, name))
                self.logger.info(f"removed unfinished checkpoint write {name}")
            except OSError:
                pass

    # -- reading
    def _recorded_progress(self, path: str, fallback: Optional[Progress]) -> Optional[Progress]:
        """The progress stored in ``path``; None (and a warning) when it is corrupt.

        A file the system refuses to read (CheckpointUnreadable) stops the search: falling back
        past it would make the run continue from an older state and later prune the newer files."""
        try:
            ckpt = load_checkpoint_file(path, mmap=True)
        except CheckpointCorrupt as e:
            self.logger.warning(f"skipping checkpoint that does not load: {e}")
            return None
        except CheckpointUnreadable:
            raise
        except CheckpointError as e:
            self.logger.warning(f"skipping checkpoint that does not load: {e}")
            return None
        if 'epoch' in ckpt and isinstance(ckpt['epoch'], int):
            iteration = ckpt.get('iteration')
            return _progress(ckpt['epoch'], iteration if isinstance(iteration, int) else None)
        return fallback

    def latest(self) -> Optional[str]:
        """Path of the most advanced checkpoint in ``output_dir`` that loads, or None.

        Numbered checkpoints are tried newest first; corrupt ones are skipped with a warning,
        one the system cannot read raises CheckpointUnreadable. ``best.pth`` stands in when it is
        at least as far as a corrupt newest one (it may be the only intact copy); a ``best.pth``
        ahead of every numbered file is from an abandoned run and is ignored.
        """
        found = self.checkpoints()
        best_path = os.path.join(self.output_dir, BEST_NAME)
        best = self._recorded_progress(best_path, None) if os.path.lexists(best_path) else None
        if best is not None and found and best > found[-1][0]:
            self.logger.warning(f"ignoring {best_path}: it is ahead of every numbered checkpoint")
            best = None
        for prog, path in reversed(found):
            if best is not None and best > prog:
                break
            recorded = self._recorded_progress(path, prog)
            if recorded is not None:
                return path if best is None or recorded >= best else best_path
        return best_path if best is not None else None


def find_resume(output_dir: str, logger: Optional[logging.Logger] = None) -> Optional[str]:
    """The checkpoint to auto-resume from in ``output_dir`` (see ``CheckpointManager.latest``)."""
    return CheckpointManager(output_dir, logger=logger).latest()


# ============================================================================ output folder
def prepare_output_dir(path: str, need_write: bool = True) -> bool:
    """Create the run's output folder and check that it can be written; returns whether it can.

    Raises OutputFolderError (one line) when it is a file, or, with ``need_write``, cannot be
    created or written. Evaluation passes ``need_write=False``: it only reads checkpoints, so a
    folder it cannot create or write just means logging to the console only.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputFolderError(f"output folder {path} exists and is not a folder; remove it or choose "
                                f"another --output / --tag")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        if not need_write:
            return False
        where = e.filename or path
        raise OutputFolderError(f"cannot create output folder {path}: {e.strerror} ({where}); choose "
                                f"another --output") from None
    probe = os.path.join(path, f'.write_test.{_HOST}.{os.getpid()}')
    try:
        with open(probe, 'wb') as f:
            f.write(b'x')
        os.remove(probe)
    except OSError as e:
        _remove_quietly(probe)
        if need_write:
            raise OutputFolderError(f"output folder {path} is not writable: {e.strerror}; make it writable or "
                                    f"choose another --output") from None
        return False
    return True
