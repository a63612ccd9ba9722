"""The WebDataset tar-shard layout this project writes and reads (standard library only).

A shard is a plain tar file. Members that share a *key* form one sample: the key is the member's
path up to the first ``.`` of its file name (WebDataset's rule), and the rest is the field, e.g.
``n01440764/n01440764_10026.jpg`` and ``n01440764/n01440764_10026.cls`` (the class index as
ASCII digits). A dataset folder made by ``tools/prepare_imagenet.py shards`` holds::

    classes.txt            one class name per line; line i names class index i
    shards.json            manifest, written last: samples per shard of each split
    train/train-000000.tar ...
    val/val-000000.tar ...

The reader (:mod:`data.shards`) also accepts shards from other writers (any image field among
:data:`IMAGE_FIELDS`, a ``.cls`` label), with or without ``classes.txt`` and ``shards.json``.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from typing import Iterable, Tuple

__all__ = ['IMAGE_FIELDS', 'LABEL_FIELD', 'CLASSES_FILE', 'MANIFEST', 'split_member', 'image_field',
           'write_shard', 'read_classes', 'write_atomic']

IMAGE_FIELDS = ('jpg', 'jpeg', 'png', 'webp', 'ppm', 'bmp', 'tif', 'tiff')
LABEL_FIELD = 'cls'
CLASSES_FILE = 'classes.txt'
MANIFEST = 'shards.json'


def split_member(name: str) -> Tuple[str, str]:
    """``(key, field)`` of a member name: ``'a/b.c.jpg'`` -> ``('a/b', 'c.jpg')`` (field lower-cased)."""
    folder, _, base = name.rpartition('/')
    stem, dot, field = base.partition('.')
    key = f'{folder}/{stem}' if folder else stem
    return key, field.lower() if dot else ''


def image_field(path: str) -> str:
    """The field an image file is stored under: its extension, lower-cased, ``jpeg`` as ``jpg``."""
    ext = os.path.splitext(path)[1].lower().lstrip('.')
    return 'jpg' if ext == 'jpeg' else ext


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0                       # byte-identical shards for the same input
    return info


def write_shard(path: str, samples: Iterable[Tuple[str, str, int]]) -> int:
    """Write ``(key, image file, class index)`` samples to the tar ``path``; returns their count."""
    n = 0
    with tarfile.open(path, 'w', format=tarfile.PAX_FORMAT) as tar:
        for key, image, label in samples:
            with open(image, 'rb') as f:
                data = f.read()
            tar.addfile(_member(f'{key}.{image_field(image)}', len(data)), io.BytesIO(data))
            cls = str(int(label)).encode('ascii')
            tar.addfile(_member(f'{key}.{LABEL_FIELD}', len(cls)), io.BytesIO(cls))
            n += 1
    return n


def read_classes(path: str) -> list:
    """Class names of a ``classes.txt`` (one per line, in index order; blank lines are errors)."""
    from .errors import DataError
    try:
        with open(path, encoding='utf-8') as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read the class-index file '{path}' ({type(e).__name__}: {e}): check it, or "
                        f"remove it to take the classes from the labels in the shards") from None
    names = [line.strip() for line in lines]
    blank = [i + 1 for i, name in enumerate(names) if not name]
    if blank or not names or len(set(names)) != len(names):
        what = f'blank line {blank[0]}' if blank else 'no lines' if not names else 'a class name twice'
        raise DataError(f"the class-index file '{path}' has {what}: it needs one distinct class name per "
                        f"line, line i naming class index i")
    return names


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and a rename (never half-written)."""
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w', encoding='utf-8') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def dump_json(path: str, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + '\n')
