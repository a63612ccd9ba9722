"""The training split must keep yielding images: a guard on the unreadable files of an epoch.

A corrupt file now and then is skipped and counted (``data.folder``). A training split that stops
yielding readable images (an unmounted share, a deleted folder) would otherwise train on nothing
and report epochs of loss 0: once more than ``DATA.MAX_SKIPPED_FRACTION`` of an epoch's training
images were unreadable, :meth:`SkipGuard.add` raises a one-line :class:`DataError` naming the
missing path, or the folder and the last file that could not be read.
"""
from __future__ import annotations

import os
from typing import Optional

from .errors import DataError
from .folder import BadSample

__all__ = ['SkipGuard', 'missing_ancestor']


def missing_ancestor(path: str) -> Optional[str]:
    """The highest missing folder on the way to ``path`` (``path`` itself, or a parent that
    vanished with it); None when ``path`` exists."""
    missing = None
    current = os.path.abspath(path)
    while current and not os.path.exists(current):
        missing = current
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return missing


class SkipGuard:
    """Counts one rank's unreadable training images per epoch; ``epoch_images`` is its share of an
    epoch and ``fraction`` the part of it that may be unreadable."""

    def __init__(self, split_dir: str, epoch_images: int, fraction: float) -> None:
        self.split_dir = split_dir
        self.limit = float(fraction) * max(int(epoch_images), 1)
        self.fraction = float(fraction)
        self.epoch_images = int(epoch_images)
        self.count = 0

    def new_epoch(self) -> None:
        self.count = 0

    def add(self, n_skipped: int, epoch: int, last: Optional[BadSample] = None) -> None:
        self.count += int(n_skipped)
        if not n_skipped or self.count <= self.limit:
            return
        what = (f"{self.count} of the {self.epoch_images} training images of epoch {epoch} could not be "
                f"read (more than DATA.MAX_SKIPPED_FRACTION {self.fraction:g} of them)")
        missing = missing_ancestor(self.split_dir)
        if missing is not None:
            raise DataError(f"'{missing}' no longer exists (an unmounted share or a deleted folder?): {what}; "
                            f"make it available again and run the same command to resume from the last "
                            f"checkpoint")
        example = f", the last {last.path} ({last.reason})" if last is not None else ''
        raise DataError(f"{what}{example}: check the files under '{self.split_dir}', or raise "
                        f"DATA.MAX_SKIPPED_FRACTION to train on without them")
