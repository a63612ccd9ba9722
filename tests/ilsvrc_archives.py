"""Small archives with the structure of the official ILSVRC2012 download, for the tests.

``make_archives(folder)`` writes a training tar of per-class tars (``nXXXXXXXX.tar`` of
``nXXXXXXXX_<i>.JPEG``), a flat validation tar and folder of ``ILSVRC2012_val_<8 digits>.JPEG``
and the validation labels in each accepted text form, and returns where everything is.
"""
from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import numpy as np
from PIL import Image


@dataclass
class Archives:
    train_tar: Path              # tar of per-class tars
    train_dir: Path              # the same class tars, unpacked once
    val_tar: Path
    val_dir: Path
    labels: Dict[str, Path]      # form ('wnid', 'index', 'kaggle', 'devkit') -> labels file
    classes: List[str]
    train_files: Dict[str, Dict[str, bytes]] = field(default_factory=dict)   # wnid -> name -> bytes
    val_files: Dict[str, Dict[str, bytes]] = field(default_factory=dict)


def _jpeg(seed: int, size: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, 'JPEG', quality=80)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_archives(folder: Path, classes: int = 4, train_per_class: int = 3, val_per_class: int = 2,
                  size: int = 16) -> Archives:
    folder.mkdir(parents=True, exist_ok=True)
    wnids = [f'n{1000000 + 7919 * i:08d}' for i in range(classes)]
    # Written in another order than sorted, as the real archive lists them.
    order = wnids[::-1]
    arch = Archives(folder / 'ILSVRC2012_img_train.tar', folder / 'train_tars', folder / 'ILSVRC2012_img_val.tar',
                    folder / 'val_flat', {}, sorted(wnids))
    arch.train_dir.mkdir(exist_ok=True)
    seed = 0
    with tarfile.open(arch.train_tar, 'w') as outer:
        for wnid in order:
            files = {}
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode='w') as inner:
                for i in range(train_per_class):
                    name = f'{wnid}_{100 + i}.JPEG'
                    files[name] = _jpeg(seed, size)
                    seed += 1
                    _add(inner, name, files[name])
            arch.train_files[wnid] = files
            _add(outer, f'{wnid}.tar', buf.getvalue())
            (arch.train_dir / f'{wnid}.tar').write_bytes(buf.getvalue())
    arch.val_dir.mkdir(exist_ok=True)
    rows = []
    n = classes * val_per_class
    rng = np.random.default_rng(123)
    val_classes = [arch.classes[i % classes] for i in rng.permutation(n)]
    with tarfile.open(arch.val_tar, 'w') as tar:
        for i, wnid in enumerate(val_classes, 1):
            name = f'ILSVRC2012_val_{i:08d}.JPEG'
            data = _jpeg(10_000 + i, size)
            arch.val_files.setdefault(wnid, {})[name] = data
            _add(tar, name, data)
            (arch.val_dir / name).write_bytes(data)
            rows.append((name, wnid))
    forms = {
        'wnid': ''.join(f'{name} {wnid}\n' for name, wnid in rows),
        'index': ''.join(f'{name} {arch.classes.index(wnid)}\n' for name, wnid in rows),
        'kaggle': 'ImageId,PredictionString\n' + ''.join(
            f'{os.path.splitext(name)[0]},{wnid} 1 2 30 40 {wnid} 5 6 7 8\n' for name, wnid in rows[::-1]),
        'devkit': ''.join(f'{arch.classes.index(wnid) + 1}\n' for _, wnid in rows),
    }
    for form, text in forms.items():
        arch.labels[form] = folder / f'val_labels_{form}.txt'
        arch.labels[form].write_text(text)
    return arch


def tree_files(root: Path) -> Dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes), hidden ones included."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}


def expected_tree(arch: Archives) -> Dict[str, bytes]:
    """The ImageFolder files the archives should become."""
    out = {}
    for split, files in (('train', arch.train_files), ('val', arch.val_files)):
        for wnid, named in files.items():
            for name, data in named.items():
                out[f'{split}/{wnid}/{name}'] = data
    return out
