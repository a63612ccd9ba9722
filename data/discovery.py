"""Which class folders and image files a split holds: the one rule the root checks, the training
set and the validation set all use.

* Entries whose name starts with ``.`` are ignored, folders and files alike
  (``.ipynb_checkpoints``, ``.DS_Store``, ``.Trash-1000``, macOS ``._x.jpg`` forks).
* Class folders are the split's immediate sub-folders, sorted by name; a class's samples are the
  image files anywhere below its folder, sorted by path (torchvision's order for flat folders).
* Symbolic links are followed, so a split may be assembled from links to other disks, but every
  real folder is entered at most once. A link that leads to a folder already part of the split,
  or to one that contains the split (a loop such as ``class0/up -> ..``, or two links to one
  folder) would label the same images twice or without end: it is a :class:`DataError` naming
  the link.

Only the standard library is imported, so the checks stay cheap.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from .errors import DataError

__all__ = ['is_hidden', 'class_folders', 'find_samples']


def is_hidden(name: str) -> bool:
    return name.startswith('.')


def _entries(folder: str) -> List[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return sorted((e for e in it if not is_hidden(e.name)), key=lambda e: e.name)
    except OSError as e:
        raise DataError(f"cannot list '{folder}' ({type(e).__name__}: {e.strerror or e}): check that "
                        f"it exists and is readable") from None


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()               # follows symlinks; a dangling link is not a folder
    except OSError:
        return False


def class_folders(split_dir: str) -> List[str]:
    """Sorted names of the class folders of ``split_dir`` (visible sub-folders, links followed)."""
    return [e.name for e in _entries(split_dir) if _is_dir(e)]


def _enter(folder: str, split_dir: str, split_real: str, seen: Dict[str, str]) -> None:
    """Mark ``folder`` as visited, or raise if its real path was visited or holds the split."""
    real = os.path.realpath(folder)
    if real in seen or split_real.startswith(real.rstrip(os.sep) + os.sep):
        what = (f"which is already part of the split (as '{seen[real]}')" if real in seen
                else f"which contains '{split_dir}' itself")
        raise DataError(f"'{folder}' leads to '{real}', {what}: a symlink loop or a second link to "
                        f"one folder would count its images twice; remove or replace that link")
    seen[real] = folder


def _walk(folder: str, split_dir: str, split_real: str, seen: Dict[str, str]) -> Iterator[str]:
    """Files below ``folder`` in path order (a folder's files, then its sub-folders)."""
    _enter(folder, split_dir, split_real, seen)
    subfolders = []
    for entry in _entries(folder):
        if _is_dir(entry):
            subfolders.append(entry.path)
        else:
            yield entry.path                # files and dangling links (reported when loaded)
    for sub in subfolders:
        yield from _walk(sub, split_dir, split_real, seen)


def find_samples(split_dir: str, class_to_idx: Dict[str, int],
                 is_valid_file: Optional[Callable[[str], bool]] = None) -> List[Tuple[str, int]]:
    """``(path, class index)`` for every file below the class folders that ``is_valid_file``
    accepts, classes in index order, paths sorted within a class."""
    split_real = os.path.realpath(split_dir)
    seen: Dict[str, str] = {split_real: split_dir}
    samples: List[Tuple[str, int]] = []
    for name, index in sorted(class_to_idx.items(), key=lambda kv: kv[1]):
        for path in _walk(os.path.join(split_dir, name), split_dir, split_real, seen):
            if is_valid_file is None or is_valid_file(path):
                samples.append((path, index))
    return samples


def describe(names: Sequence[str], limit: int = 5) -> str:
    """``a, b, c (and 4 more)``: a short, sorted listing for one-line messages."""
    names = sorted(names)
    shown = ', '.join(names[:limit])
    return shown + (f' (and {len(names) - limit} more)' if len(names) > limit else '')
