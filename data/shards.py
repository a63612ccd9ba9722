"""WebDataset tar shards read as a map-style dataset: every sample indexed once, then read by offset.

Streaming readers (``webdataset``, timm's ``wds/``) cannot start an epoch at a given sample or
split one exactly between ranks. Indexing the shards once (member headers only; the tiny ``.cls``
labels are read) gives a dataset of fixed length and order, so the samplers of
:mod:`data.samplers` apply unchanged: the same per-epoch permutation as a folder of the same
images, exact resume at the same sample after preemption or a change of world size, disjoint
ranks, and evaluation that counts every validation image once.

Layout (see :mod:`data.shard_format`): samples are the members sharing a key, an image field
(:data:`~data.shard_format.IMAGE_FIELDS`) and a ``.cls`` class index. Shards are read in the
order of their sorted paths, samples in the order of the tar. Classes come from one rule for both
splits: the class-index file (``classes.txt``; line i names class i) when there is one, else the
labels themselves (``0 .. max training label``); a validation label the training split does not
have is a :class:`DataError`.

Faults: a missing shard (named by a brace pattern, or listed in ``shards.json``), a truncated or
unreadable shard, a sample without an image or a label, a label outside the class-index file and
a sample count differing from ``shards.json`` are one-line :class:`DataError` at start-up; an
image that does not decode is skipped and counted like a corrupt file in a folder.
"""
from __future__ import annotations

import glob
import io
import json
import logging
import multiprocessing
import os
import re
import signal
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .errors import DataError
from .folder import BadSample, to_rgb
from .shard_format import CLASSES_FILE, IMAGE_FIELDS, LABEL_FIELD, MANIFEST, read_classes, split_member

__all__ = ['TarShardDataset', 'expand_braces', 'shard_paths', 'build_shard_datasets', 'apply_classes']

_logger = logging.getLogger('dat.data')
_BRACE = re.compile(r'\{([^{}]*)\}')


def expand_braces(pattern: str) -> List[str]:
    """``a{00..02}b`` -> ``a00b a01b a02b`` (zero padding kept), ``{x,y}`` -> both; nested left to right."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    rng = re.fullmatch(r'(\d+)\.\.(\d+)', body)
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        width = len(rng.group(1)) if rng.group(1).startswith('0') else 0
        options = [str(i).zfill(width) for i in range(lo, hi + 1)]
    else:
        options = body.split(',')
    return [p for option in options for p in expand_braces(head + option + tail)]


def shard_paths(pattern: str, key: str) -> List[str]:
    """The shard files of ``pattern`` (braces expanded, then globs), sorted; a named file that is
    missing, or a glob matching nothing, is a :class:`DataError` naming ``key``."""
    paths: List[str] = []
    for part in expand_braces(os.path.expanduser(pattern)):
        if glob.has_magic(part):
            matched = sorted(glob.glob(part))
            if not matched:
                raise DataError(f"{key} '{pattern}': no shard matches '{part}': check the path, or pass "
                                f"--opts {key} PATTERN")
            paths += matched
        elif not os.path.isfile(part):
            raise DataError(f"shard '{part}' (from {key} '{pattern}') is missing: copy it back or fix the pattern")
        else:
            paths.append(part)
    if len(set(paths)) != len(paths):
        raise DataError(f"{key} '{pattern}' names a shard twice: its samples would be counted twice")
    return sorted(paths)


def _index_shard(path: str) -> Tuple[List[str], List[int], List[int], List[int], List[str]]:
    """``(keys, image offsets, image sizes, labels, image fields)`` of the samples in ``path``."""
    try:
        size = os.path.getsize(path)
        with open(path, 'rb') as f, tarfile.open(fileobj=f, mode='r:') as tar:
            images: Dict[str, Tuple[int, int, str]] = {}
            labels: Dict[str, int] = {}
            order: List[str] = []
            for member in tar:
                if not member.isfile():
                    continue
                if member.offset_data + member.size > size:
                    raise DataError(f"shard '{path}' is truncated ('{member.name}' ends past the end of the "
                                    f"file): copy it again")
                key, field = split_member(member.name)
                if field in IMAGE_FIELDS:
                    if key in images:
                        raise DataError(f"shard '{path}' holds two images for sample '{key}': rewrite the shard")
                    images[key] = (member.offset_data, member.size, field)
                    if key not in labels:
                        order.append(key)
                elif field == LABEL_FIELD:
                    text = tar.extractfile(member).read().strip()
                    if not text.isdigit():
                        raise DataError(f"shard '{path}': the label of '{key}' is {text[:20]!r}, not a class "
                                        f"index: rewrite the shard")
                    labels[key] = int(text)
                    if key not in images:
                        order.append(key)
            # tarfile takes a file cut at a member boundary for a shorter archive; a whole tar
            # ends with zero blocks after its last member.
            f.seek(tar.offset)
            end = f.read(512)
            if len(end) < 512 or end.count(0) != 512:
                raise DataError(f"shard '{path}' is truncated (no end-of-archive block after its last member, "
                                f"'{tar.members[-1].name if tar.members else '-'}'): copy it again")
    except (tarfile.TarError, EOFError, OSError) as e:
        reason = ' '.join(str(e).split()) or type(e).__name__
        raise DataError(f"shard '{path}' cannot be read as a tar file ({reason}): it is truncated or damaged; "
                        f"copy it again") from None
    for key in order:
        if key not in images or key not in labels:
            what = 'image' if key not in images else f'.{LABEL_FIELD} label'
            raise DataError(f"shard '{path}': sample '{key}' has no {what}: every sample needs an image and a "
                            f".{LABEL_FIELD} class index")
    return (order, [images[k][0] for k in order], [images[k][1] for k in order], [labels[k] for k in order],
            [images[k][2] for k in order])


def decoded_sample(dataset: Any, index: int, read: Callable[[int], Optional[bytes]]) -> Any:
    """``(transformed RGB image, class index)`` of sample ``index`` whose encoded bytes ``read``
    returns; a :class:`BadSample` naming it (``dataset.name``) when reading or decoding fails.
    Only decoding is guarded: an exception raised by ``dataset.transform`` is a bug and propagates."""
    try:
        data = read(index)
        if not data:
            raise ValueError('the sample has no image bytes')
        img = Image.open(io.BytesIO(data))
        img.load()
        img = to_rgb(img)
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, struct.error, ...
        return BadSample(dataset.name(index), f'{type(e).__name__}: {e}'.splitlines()[0])
    if dataset.transform is not None:
        img = dataset.transform(img)
    return img, int(dataset.targets[index])


def _quiet_worker() -> None:
    # Stop signals are the training process's to act on (it saves and exits); a pool worker
    # killed by one would only turn the stop into an error.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def _index_all(shards: Sequence[str], workers: int) -> List[Tuple]:
    """:func:`_index_shard` of every shard, in order; in ``workers`` processes when more than one
    (tar headers are parsed in Python: about 40-80 us a sample on one core)."""
    if workers <= 1 or len(shards) <= 1:
        return [_index_shard(p) for p in shards]
    # Not multiprocessing.Pool: its exit terminates the workers with SIGTERM, which they ignore.
    pool = ProcessPoolExecutor(min(workers, len(shards)), mp_context=multiprocessing.get_context('fork'),
                               initializer=_quiet_worker)
    try:
        return list(pool.map(_index_shard, shards))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class TarShardDataset(Dataset):
    """The samples of tar ``shards`` as ``(image, class index)``; :class:`BadSample` when an image
    does not decode. ``classes`` names the classes (``targets`` index into it)."""

    def __init__(self, shards: Sequence[str], transform: Optional[Callable] = None,
                 expected_counts: Optional[Dict[str, int]] = None, workers: int = 0) -> None:
        self.shards = list(shards)
        self.transform = transform
        keys: List[str] = []
        offsets: List[int] = []
        sizes: List[int] = []
        shard_ids: List[int] = []
        targets: List[int] = []
        first_shard: Dict[str, int] = {}
        start = time.perf_counter()
        for i, (path, (k, o, s, y, _)) in enumerate(zip(self.shards, _index_all(self.shards, workers))):
            expected = (expected_counts or {}).get(os.path.basename(path))
            if expected is not None and expected != len(k):
                raise DataError(f"shard '{path}' holds {len(k)} samples, {MANIFEST} says {expected}: it is "
                                f"truncated or was replaced; copy it again")
            for key in k:
                j = first_shard.setdefault(key, i)
                if j != i:
                    raise DataError(f"sample '{key}' is in shards '{self.shards[j]}' and '{path}': a shard "
                                    f"copied twice would count its images twice")
            keys += k
            offsets += o
            sizes += s
            targets += y
            shard_ids += [i] * len(k)
        if not keys:
            raise DataError(f"the shards ({', '.join(self.shards[:3])}) hold no samples")
        _logger.info("indexed %d samples in %d shard(s) in %.1f s", len(keys), len(self.shards),
                     time.perf_counter() - start)
        # numpy arrays: no per-sample Python objects for the loader workers to copy.
        self.keys = np.array([k.encode() for k in keys], dtype=np.bytes_)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.shard_ids = np.asarray(shard_ids, dtype=np.int32)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.classes: List[str] = []
        self._files: Dict[int, int] = {}
        self._pid = -1

    def set_classes(self, classes: Sequence[str]) -> None:
        self.classes = list(classes)

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():        # a loader worker: its own descriptors, not the parent's
            self._files, self._pid = {}, os.getpid()
        fd = self._files.get(shard)
        if fd is None:
            fd = self._files[shard] = os.open(self.shards[shard], os.O_RDONLY)
        return fd

    def name(self, index: int) -> str:
        return f"{self.shards[self.shard_ids[index]]}:{self.keys[index].decode()}"

    def _read(self, index: int) -> bytes:
        shard, size = int(self.shard_ids[index]), int(self.sizes[index])
        data = os.pread(self._fd(shard), size, int(self.offsets[index]))
        if len(data) != size:
            raise OSError(f'read {len(data)} of {size} bytes (the shard shrank after indexing)')
        return data

    def __getitem__(self, index: int) -> Any:
        return decoded_sample(self, index, self._read)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state['_files'], state['_pid'] = {}, -1      # descriptors do not travel to spawned workers
        return state


def apply_classes(datasets: Dict[str, Any], classes: Sequence[str], source: Optional[str], fix: str,
                  what: str) -> None:
    """Hold every split of ``datasets`` (``targets`` arrays, ``name(i)``) to one class list: labels
    inside ``classes`` (named by ``source``; None: the training labels), validation classes among
    the training ones; then set ``classes`` on each. Classes without training samples are a warning."""
    for split, ds in datasets.items():
        bad = np.flatnonzero((ds.targets >= len(classes)) | (ds.targets < 0))
        if bad.size:
            i = int(bad[0])
            where = source or f"the training labels 0..{len(classes) - 1}"
            reason = fix if source else f"the validation {what} do not match the training {what}"
            if int(ds.targets[i]) < 0:
                reason = 'a split without labels (such as a test split) cannot be trained or evaluated on'
            raise DataError(f"{split} sample '{ds.name(i)}' has label {int(ds.targets[i])}, outside {where}: {reason}")
        ds.set_classes(classes)
    if 'train' not in datasets:         # evaluation alone: the labels are explicit indices
        return
    in_train = np.bincount(datasets['train'].targets, minlength=len(classes)) > 0
    if 'val' in datasets:
        missing = np.setdiff1d(np.unique(datasets['val'].targets), np.flatnonzero(in_train))
        if missing.size:
            names = ', '.join(classes[i] for i in missing[:5])
            raise DataError(f"the validation {what} hold classes the training {what} do not ({names}"
                            f"{' ...' if missing.size > 5 else ''}): both splits need the same classes")
    empty = [classes[i] for i in np.flatnonzero(~in_train)]
    if empty:
        _logger.warning("%d class(es) have no training samples: %s", len(empty), ', '.join(empty[:5]))


def class_index_file(config: Any, root: str) -> str:
    """``DATA.CLASS_INDEX`` (relative to ``root``), else ``root/classes.txt`` when present, else ''."""
    class_file = os.path.expanduser(str(config.DATA.CLASS_INDEX or ''))
    if class_file and not os.path.isabs(class_file):
        class_file = os.path.join(root, class_file)
    if not class_file and os.path.isfile(os.path.join(root, CLASSES_FILE)):
        class_file = os.path.join(root, CLASSES_FILE)
    if class_file and not os.path.isfile(class_file):
        raise DataError(f"DATA.CLASS_INDEX '{class_file}' does not exist: give the class-index file (one class "
                        f"name per line), or leave it empty to take the classes from the dataset's labels")
    return class_file


def _manifest(root: str) -> Optional[dict]:
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding='utf-8') as f:
            manifest = json.load(f)
        for split in ('train', 'val'):
            {e['name']: int(e['samples']) for e in manifest.get(split, [])}
        return manifest
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"cannot read the shard manifest '{path}' ({type(e).__name__}: {e}): rewrite it with "
                        f"tools/prepare_imagenet.py shards, or remove it") from None


def _split(root: str, pattern: str, key: str, split: str, manifest: Optional[dict],
           transform: Optional[Callable], workers: int) -> TarShardDataset:
    default = not pattern
    pattern = pattern or os.path.join(split, '*.tar')
    if not os.path.isabs(os.path.expanduser(pattern)):
        pattern = os.path.join(root, pattern)
    if default and not glob.glob(pattern):
        raise DataError(f"no shards at '{pattern}': DATA.DATA_PATH must hold {split}/*.tar (as "
                        f"tools/prepare_imagenet.py shards writes them), or pass --opts {key} PATTERN")
    paths = shard_paths(pattern, key)
    expected = None
    if default and manifest is not None:
        expected = {e['name']: int(e['samples']) for e in manifest.get(split, [])}
        found = {os.path.basename(p) for p in paths}
        missing = sorted(set(expected) - found)
        if missing:
            raise DataError(f"shard '{os.path.join(root, split, missing[0])}' is missing ({len(missing)} of the "
                            f"{len(expected)} {split} shards in {MANIFEST}): copy it back")
    return TarShardDataset(paths, transform=transform, expected_counts=expected, workers=workers)


def build_shard_datasets(config: Any, transform_train: Optional[Callable], transform_val: Optional[Callable],
                         splits: Sequence[str] = ('train', 'val')) -> Dict[str, TarShardDataset]:
    """The datasets of ``DATA.FORMAT 'wds'`` for ``splits``, classes set by the one rule of the module
    docstring (the validation split alone, for evaluation, is held to the class-index file only)."""
    root = os.path.expanduser(str(config.DATA.DATA_PATH or ''))
    if not root or not os.path.isdir(root):
        raise DataError(f"data path '{root}' is not a folder: DATA.FORMAT 'wds' needs DATA.DATA_PATH (--data-path) "
                        f"holding train/*.tar and val/*.tar (or DATA.TRAIN_SHARDS / DATA.VAL_SHARDS patterns "
                        f"relative to it)")
    manifest = _manifest(root)
    class_file = class_index_file(config, root)
    classes = read_classes(class_file) if class_file else None
    patterns = {'train': ('DATA.TRAIN_SHARDS', str(config.DATA.TRAIN_SHARDS or ''), transform_train),
                'val': ('DATA.VAL_SHARDS', str(config.DATA.VAL_SHARDS or ''), transform_val)}
    # Indexing runs in the loader workers' share of the cores (DATA.NUM_WORKERS processes).
    workers = int(config.DATA.NUM_WORKERS)
    datasets = {s: _split(root, patterns[s][1], patterns[s][0], s, manifest, patterns[s][2], workers)
                for s in splits}
    if classes is None:
        labelled = datasets.get('train', datasets.get('val'))     # the training labels name the classes
        classes = [str(i) for i in range(int(labelled.targets.max()) + 1)]
    apply_classes(datasets, classes, f"the {len(classes)} classes of '{class_file}'" if class_file else None,
                  'the class-index file does not match the shards', 'shards')
    if manifest is not None and manifest.get('classes') not in (None, len(classes)):
        raise DataError(f"{MANIFEST} in '{root}' says {manifest['classes']} classes, the class-index file "
                        f"'{class_file or '(none)'}' gives {len(classes)}: the label file does not match the shards")
    return {s: datasets[s] for s in splits}
