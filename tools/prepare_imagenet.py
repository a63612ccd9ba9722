#!/usr/bin/env python
"""Turn the official ILSVRC2012 archives into the ImageFolder layout, and a tree into tar shards.

    # archives -> OUT/train/<wnid>/*.JPEG and OUT/val/<wnid>/*.JPEG
    python tools/prepare_imagenet.py folder --train ILSVRC2012_img_train.tar \\
        --val ILSVRC2012_img_val.tar --val-labels LOC_val_solution.csv --out /data/imagenet
    # an ImageFolder tree -> WebDataset tar shards (classes.txt, shards.json, train/, val/)
    python tools/prepare_imagenet.py shards --folder /data/imagenet --out /data/imagenet-wds

``--train`` is the training tar of 1,000 per-class tars (``n01440764.tar`` ...) or a folder
holding those per-class tars. ``--val`` is the validation tar or a folder of its 50,000 flat
JPEGs. ``--val-labels`` gives each validation image its class, in one of three text forms
(recognised from the file itself; images are matched by file name, extension optional):

* ``ILSVRC2012_val_00000001.JPEG n01751748`` -- file name and WordNet id, one pair per line;
* ``ILSVRC2012_val_00000001.JPEG 65`` -- file name and class index, 0-based, into the training
  classes sorted by WordNet id (Caffe's ``val.txt``);
* Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``: the first WordNet id of the
  prediction string is the class).

The devkit's ``ILSVRC2012_validation_ground_truth.txt`` (bare ILSVRC2012_IDs, mapped to WordNet
ids only by ``meta.mat``) is recognised and refused with these alternatives.

Both commands are idempotent and resumable: work goes into ``*.partial`` folders and temp names
that are renamed into place when whole, and a marker (``.prepare_imagenet.json``, ``shards.json``)
is written last. Rerunning the same command after an interruption continues; rerunning it after
it finished says so and exits 0; a finished or foreign tree is never overwritten. The counts are
checked (1,000 classes, 1,281,167 training and 50,000 validation images unless ``--expect-*`` or
``--any-size`` say otherwise), and so are the validation classes against the training classes.
Every problem is one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import sys
import tarfile
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.discovery import class_folders, find_samples  # noqa: E402
from data.errors import DataError  # noqa: E402
from data.shard_format import (CLASSES_FILE, MANIFEST, dump_json, image_field, write_atomic,  # noqa: E402
                               write_shard)

FOLDER_MARKER = '.prepare_imagenet.json'
FOLDER_PARTIAL = '.prepare_imagenet.partial.json'
SHARDS_PARTIAL = 'shards.partial.json'
IMAGENET_COUNTS = {'classes': 1000, 'train': 1281167, 'val': 50000}
_WNID_TAR = re.compile(r'^(n\d{8})\.tar$')
_CHUNK = 1 << 20


class PrepareError(DataError):
    """A problem with the inputs or the output folder; one line naming it and the fix."""


# ----------------------------------------------------------------------------- small helpers
def _source_id(path: str) -> dict:
    """What identifies an input: its real path and, for a file, its size."""
    real = os.path.realpath(path)
    return {'path': real, 'size': os.path.getsize(real) if os.path.isfile(real) else None}


def _safe_name(name: str, where: str) -> str:
    """The file name of an archive member, refusing names that could land outside the target."""
    base = name.replace('\\', '/').rstrip('/').rpartition('/')[2]
    if not base or base in ('.', '..') or base.startswith('.') or '\0' in base:
        raise PrepareError(f"{where} holds a member named '{name}' that is not a plain image name: the "
                           f"archive is not the official one; check it")
    return base


def _copy_to(src, path: str) -> None:
    """Write the stream ``src`` to ``path`` through a temp name (a file there is always whole)."""
    tmp = path + '.part'
    try:
        with open(tmp, 'wb') as out:
            shutil.copyfileobj(src, out, _CHUNK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise PrepareError(f"cannot read '{path}' ({type(e).__name__}: {e}): delete it and rerun") from None


def _begin(out: str, marker: str, partial: str, options: dict, outputs: Sequence[str], what: str) -> bool:
    """Check ``out`` against a finished or unfinished earlier run; False when already finished.

    Refuses a finished run made with other options, an unfinished one with other options, and
    outputs that exist without either record (a tree this tool did not make)."""
    done = _read_json(os.path.join(out, marker))
    if done is not None:
        if done.get('options') == options:
            with contextlib.suppress(FileNotFoundError):   # killed between the marker and this removal
                os.remove(os.path.join(out, partial))
            return False
        raise PrepareError(f"'{out}' already holds a finished {what} made from other inputs or options (see "
                           f"{os.path.join(out, marker)}): it is never overwritten; choose another --out, or "
                           f"delete it first")
    started = _read_json(os.path.join(out, partial))
    if started is not None and started.get('options') != options:
        raise PrepareError(f"'{out}' holds an unfinished {what} started with other inputs or options (see "
                           f"{os.path.join(out, partial)}): rerun that command to finish it, or delete '{out}'")
    if started is None:
        present = [name for name in outputs if os.path.lexists(os.path.join(out, name))]
        if present:
            raise PrepareError(f"'{out}' already has {', '.join(present)} that this tool did not make (no "
                               f"{marker}): it is never overwritten; choose another --out")
        os.makedirs(out, exist_ok=True)
        dump_json(os.path.join(out, partial), {'options': options})
    return True


def _finish(out: str, marker: str, partial: str, record: dict) -> None:
    dump_json(os.path.join(out, marker), record)
    os.remove(os.path.join(out, partial))


def _check_count(what: str, found: int, expected: Optional[int], fix: str) -> None:
    if expected is not None and found != expected:
        raise PrepareError(f"{what}: found {found}, expected {expected}: {fix}, or pass --expect-* / "
                           f"--any-size for a subset")


# ----------------------------------------------------------------------------- training archive
def _class_tars(train: str) -> Iterator[Tuple[str, str, object]]:
    """``(wnid, where, opener)`` per class tar of the training archive (a tar of tars or a folder)."""
    if os.path.isdir(train):
        names = sorted(n for n in os.listdir(train) if not n.startswith('.'))
        for name in names:
            m = _WNID_TAR.match(name)
            if not m:
                raise PrepareError(f"'{train}' holds '{name}', not a per-class tar (nXXXXXXXX.tar): --train "
                                   f"takes the training tar or a folder of its 1,000 class tars")
            path = os.path.join(train, name)
            yield m.group(1), path, lambda p=path: tarfile.open(p, 'r|*')
        return
    try:
        outer = tarfile.open(train, 'r:*')
        members = outer.getmembers()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise PrepareError(f"cannot read the training archive '{train}' ({type(e).__name__}: {e}): it is "
                           f"truncated or not a tar; re-download it") from None
    with outer:
        entries = []
        for member in members:
            if member.isdir():
                continue
            m = _WNID_TAR.match(member.name.rpartition('/')[2])
            if not m or not member.isfile():
                raise PrepareError(f"the training archive '{train}' holds '{member.name}', not a per-class tar "
                                   f"(nXXXXXXXX.tar): it is not ILSVRC2012_img_train.tar")
            entries.append((m.group(1), member))
        for wnid, member in sorted(entries, key=lambda e: e[0]):
            yield (wnid, f"'{member.name}' in '{train}'",
                   lambda m=member: tarfile.open(fileobj=outer.extractfile(m), mode='r|'))


def _extract_class(opener, where: str, target: str) -> int:
    """Extract the images of one class tar into ``target`` (a fresh folder); returns their count."""
    names = set()
    try:
        with opener() as inner:
            for member in inner:
                if member.isdir():
                    continue
                if not member.isfile():
                    raise PrepareError(f"{where} holds '{member.name}', which is not a regular file: the "
                                       f"archive is not the official one")
                name = _safe_name(member.name, where)
                if name in names:
                    raise PrepareError(f"{where} holds '{name}' twice: the archive is damaged; re-download it")
                names.add(name)
                _copy_to(inner.extractfile(member), os.path.join(target, name))
    except (tarfile.TarError, EOFError, OSError) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise PrepareError(f"writing '{target}' failed ({e.strerror}): free space or fix permissions, then "
                               f"rerun the same command to continue") from None
        raise PrepareError(f"cannot read {where} ({type(e).__name__}: {e}): the archive is truncated or "
                           f"damaged; re-download it") from None
    return len(names)


def extract_train(train: str, out: str) -> Dict[str, int]:
    """``OUT/train.partial/<wnid>/`` from the training archive, class by class (each class written to
    a temp folder and renamed when whole, so a rerun skips the finished ones); images per class.
    Reads ``OUT/train`` instead when it is already there."""
    final = os.path.join(out, 'train')
    if os.path.isdir(final):
        return {c: len(os.listdir(os.path.join(final, c))) for c in class_folders(final)}
    work = os.path.join(out, 'train.partial')
    os.makedirs(work, exist_ok=True)
    counts: Dict[str, int] = {}
    for wnid, where, opener in _class_tars(train):
        if wnid in counts:
            raise PrepareError(f"the training archive holds class {wnid} twice: it is damaged; re-download it")
        done = os.path.join(work, wnid)
        if os.path.isdir(done):
            counts[wnid] = len(os.listdir(done))
            continue
        tmp = os.path.join(work, f'.{wnid}.tmp')
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        counts[wnid] = _extract_class(opener, where, tmp)
        os.rename(tmp, done)
        print(f"train: {wnid} {counts[wnid]} images ({len(counts)} classes done)", flush=True)
    if not counts:
        raise PrepareError(f"the training archive '{train}' holds no class tars: it is not "
                           f"ILSVRC2012_img_train.tar")
    return counts


# ----------------------------------------------------------------------------- validation labels
def _stem(name: str) -> str:
    base = name.strip().rpartition('/')[2]
    return base.rsplit('.', 1)[0] if '.' in base else base


def read_val_labels(path: str, classes: Sequence[str]) -> Dict[str, str]:
    """``{image stem: wnid}`` from a labels file in one of the forms of the module docstring."""
    try:
        with open(path, encoding='utf-8-sig') as f:
            lines = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise PrepareError(f"cannot read --val-labels '{path}' ({type(e).__name__}: {e})") from None
    if not lines:
        raise PrepareError(f"--val-labels '{path}' is empty")
    if all(re.fullmatch(r'\d+', line) for line in lines[:10]):
        raise PrepareError(f"--val-labels '{path}' holds bare class ids (the devkit's "
                           f"ILSVRC2012_validation_ground_truth.txt, whose ids map to classes only through "
                           f"meta.mat): give a 'FILE WNID' or 'FILE INDEX' text file or Kaggle's "
                           f"LOC_val_solution.csv instead")
    csv = ',' in lines[0]
    if csv and lines[0].replace(' ', '').lower().startswith('imageid,'):
        lines = lines[1:]
    index = {c: i for i, c in enumerate(classes)}
    labels: Dict[str, str] = {}
    for number, line in enumerate(lines, 1 + csv):
        fields = line.split(',', 1) if csv else line.split()
        value = fields[1].split()[0] if len(fields) == 2 and fields[1].split() else None
        if value is None or (not csv and len(fields) != 2):
            raise PrepareError(f"--val-labels '{path}' line {number} ('{line[:60]}') is not 'FILE WNID', "
                               f"'FILE INDEX' or 'ImageId,PredictionString'")
        if value.isdigit():
            i = int(value)
            if i >= len(classes):
                raise PrepareError(f"--val-labels '{path}' line {number}: class index {i} but the training "
                                   f"archive has {len(classes)} classes (indices are 0-based into the sorted "
                                   f"WordNet ids): the labels file does not match the training classes")
            wnid = classes[i]
        elif value in index:
            wnid = value
        else:
            raise PrepareError(f"--val-labels '{path}' line {number}: class '{value}' is not among the "
                               f"{len(classes)} training classes: the labels file does not match the "
                               f"training archive")
        stem = _stem(fields[0])
        if labels.setdefault(stem, wnid) != wnid:
            raise PrepareError(f"--val-labels '{path}' gives '{stem}' two classes ({labels[stem]} and {wnid}): "
                               f"the file is damaged")
    return labels


# ----------------------------------------------------------------------------- validation images
def _val_images(val: str) -> Iterator[Tuple[str, object]]:
    """``(file name, opener of its bytes)`` for every validation image (a flat folder or tar)."""
    if os.path.isdir(val):
        for name in sorted(n for n in os.listdir(val) if not n.startswith('.')):
            path = os.path.join(val, name)
            if not os.path.isfile(path):
                raise PrepareError(f"'{val}' holds '{name}', which is not a file: --val takes the flat "
                                   f"folder (or tar) of the 50,000 validation images")
            yield name, lambda p=path: open(p, 'rb')
        return
    try:
        tar = tarfile.open(val, 'r:*')
        members = [m for m in tar.getmembers() if not m.isdir()]
    except (tarfile.TarError, OSError, EOFError) as e:
        raise PrepareError(f"cannot read the validation archive '{val}' ({type(e).__name__}: {e}): it is "
                           f"truncated or not a tar; re-download it") from None
    with tar:
        for member in sorted(members, key=lambda m: m.name):
            if not member.isfile():
                raise PrepareError(f"the validation archive '{val}' holds '{member.name}', not an image file")
            yield _safe_name(member.name, f"'{val}'"), lambda m=member: tar.extractfile(m)


def extract_val(val: str, labels: Dict[str, str], classes: Sequence[str], out: str,
                strict: bool) -> Dict[str, int]:
    """``OUT/val.partial/<wnid>/`` from the validation images and their labels (each file written
    under a temp name and renamed, so a rerun skips those already there); images per class. Reads
    ``OUT/val`` instead when it is already there."""
    final = os.path.join(out, 'val')
    if os.path.isdir(final):
        return {c: len(os.listdir(os.path.join(final, c))) for c in class_folders(final)}
    work = os.path.join(out, 'val.partial')
    for wnid in classes:
        os.makedirs(os.path.join(work, wnid), exist_ok=True)
    counts = {c: 0 for c in classes}
    seen = set()
    try:
        for name, opener in _val_images(val):
            stem = _stem(name)
            if stem not in labels:
                raise PrepareError(f"validation image '{name}' has no line in --val-labels: the labels file "
                                   f"does not match the validation images")
            if stem in seen:
                raise PrepareError(f"the validation images hold '{stem}' twice: the archive is damaged")
            seen.add(stem)
            wnid = labels[stem]
            target = os.path.join(work, wnid, name)
            if not os.path.exists(target):          # whole by construction (temp name, rename)
                with opener() as src:
                    _copy_to(src, target)
            counts[wnid] += 1
    except (tarfile.TarError, EOFError) as e:
        raise PrepareError(f"cannot read the validation archive '{val}' ({type(e).__name__}: {e}): it is "
                           f"truncated or damaged; re-download it") from None
    except OSError as e:
        raise PrepareError(f"writing '{work}' failed ({e.strerror or e}): free space or fix permissions, then "
                           f"rerun the same command to continue") from None
    unused = len(set(labels) - seen)
    if unused and strict:
        raise PrepareError(f"--val-labels names {unused} images that are not among the validation images: the "
                           f"validation archive is incomplete or the labels file is for another one")
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        raise PrepareError(f"no validation images of {len(empty)} training classes ({', '.join(empty[:5])}"
                           f"{' ...' if len(empty) > 5 else ''}): the labels file or the validation images "
                           f"do not match the training archive")
    return counts


def _publish(out: str, split: str) -> None:
    """Rename the checked ``split.partial`` into place (a no-op when a rerun found it there)."""
    work = os.path.join(out, f'{split}.partial')
    if os.path.isdir(work):
        os.rename(work, os.path.join(out, split))


def _check_out(out: str, inputs: Sequence[Tuple[str, str]]) -> None:
    """``out`` must be a folder (or not exist yet) outside every input folder: writing into an input
    would change what is being read."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise PrepareError(f"--out '{out}' is a file, not a folder: give a folder to write into")
    real = os.path.realpath(out)
    for flag, path in inputs:
        if os.path.isdir(path):
            source = os.path.realpath(path)
            if real == source or real.startswith(source.rstrip(os.sep) + os.sep):
                where = 'is' if real == source else 'is inside'
                raise PrepareError(f"--out '{out}' {where} {flag} '{path}': write the output somewhere else")


def prepare_folder(train: str, val: str, val_labels: str, out: str,
                   expect: Dict[str, Optional[int]]) -> bool:
    """Archives -> ``out/train`` and ``out/val``; False when ``out`` was already finished."""
    for flag, path in (('--train', train), ('--val', val), ('--val-labels', val_labels)):
        if not os.path.exists(path):
            raise PrepareError(f"{flag} '{path}' does not exist")
    _check_out(out, (('--train', train), ('--val', val)))
    options = {'train': _source_id(train), 'val': _source_id(val), 'val_labels': _source_id(val_labels)}
    if not _begin(out, FOLDER_MARKER, FOLDER_PARTIAL, options, ('train', 'val'), 'ImageFolder tree'):
        print(f"'{out}' is already complete (made by an identical command): nothing to do")
        return False
    # Cheap checks first: the class list and the labels file, before hours of extraction.
    classes = sorted(wnid for wnid, _, _ in _class_tars(train))
    if len(set(classes)) != len(classes):
        raise PrepareError(f"the training archive '{train}' holds a class tar twice: it is damaged; re-download it")
    if not classes:
        raise PrepareError(f"the training archive '{train}' holds no class tars: it is not ILSVRC2012_img_train.tar")
    _check_count('training classes', len(classes), expect['classes'], 're-download the training archive')
    labels = read_val_labels(val_labels, classes)
    train_counts = extract_train(train, out)
    if sorted(train_counts) != classes:
        raise PrepareError(f"'{out}/train' holds other classes than the training archive: delete '{out}' and rerun")
    _check_count('training images', sum(train_counts.values()), expect['train'],
                 're-download the training archive (a class tar is short)')
    _publish(out, 'train')
    val_counts = extract_val(val, labels, classes, out, strict=expect['val'] is not None)
    if sorted(val_counts) != classes:
        raise PrepareError(f"'{out}/val' and '{out}/train' have different classes: delete '{out}/val' and rerun")
    _check_count('validation images', sum(val_counts.values()), expect['val'],
                 're-download the validation archive')
    _publish(out, 'val')
    _finish(out, FOLDER_MARKER, FOLDER_PARTIAL, {
        'options': options, 'classes': len(classes), 'train_images': sum(train_counts.values()),
        'val_images': sum(val_counts.values()), 'train_per_class': train_counts})
    print(f"done: {len(classes)} classes, {sum(train_counts.values())} training and {sum(val_counts.values())} "
          f"validation images in '{out}'")
    return True


# ----------------------------------------------------------------------------- shards
def _shard_keys(samples: Sequence[Tuple[str, int]], classes: Sequence[str], root: str) -> List[str]:
    """A WebDataset key per sample: ``<class>/<file stem>``, with dots replaced (a dot ends the key)."""
    keys = []
    for path, label in samples:
        stem = os.path.splitext(os.path.relpath(path, os.path.join(root, classes[label])))[0]
        keys.append(f"{classes[label]}/{stem.replace('.', '_').replace(os.sep, '_')}")
    if len(set(keys)) != len(keys):
        raise PrepareError(f"two images under '{root}' map to one shard key (names that differ only in dots or "
                           f"sub-folders): rename them")
    return keys


def _write_split(split: str, samples: List[Tuple[str, int]], keys: List[str], out: str,
                 shard_size: int) -> List[dict]:
    final = os.path.join(out, split)
    n_shards = (len(samples) + shard_size - 1) // shard_size
    names = [f'{split}-{i:06d}.tar' for i in range(n_shards)]
    entries = [{'name': name, 'samples': len(samples[i * shard_size:(i + 1) * shard_size])}
               for i, name in enumerate(names)]
    if os.path.isdir(final):
        return entries
    work = os.path.join(out, f'{split}.partial')
    os.makedirs(work, exist_ok=True)
    for i, name in enumerate(names):
        path = os.path.join(work, name)
        if os.path.exists(path):                    # whole by construction; its content is deterministic
            continue
        part = slice(i * shard_size, (i + 1) * shard_size)
        try:
            try:
                write_shard(path + '.part', [(k, p, y) for k, (p, y) in zip(keys[part], samples[part])])
                os.replace(path + '.part', path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.remove(path + '.part')
                raise
        except OSError as e:
            raise PrepareError(f"writing shard '{path}' failed ({type(e).__name__}: {e.strerror or e}): free "
                               f"space or fix the input, then rerun the same command to continue") from None
        print(f"{split}: {name} ({i + 1}/{n_shards})", flush=True)
    os.rename(work, final)
    return entries


def prepare_shards(folder: str, out: str, shard_size: int, shuffle_seed: Optional[int]) -> bool:
    """An ImageFolder tree -> WebDataset shards in ``out``; False when ``out`` was already finished."""
    if shard_size < 1:
        raise PrepareError(f"--shard-size must be >= 1, got {shard_size}")
    for split in ('train', 'val'):
        if not os.path.isdir(os.path.join(folder, split)):
            raise PrepareError(f"--folder '{folder}' has no {split}/ folder: give the root holding train/ and val/")
    _check_out(out, tuple((f'--folder {split}/', os.path.join(folder, split)) for split in ('train', 'val')))
    classes = class_folders(os.path.join(folder, 'train'))
    if not classes or class_folders(os.path.join(folder, 'val')) != classes:
        raise PrepareError(f"'{folder}/train' and '{folder}/val' need the same, non-empty class folders")
    options = {'folder': os.path.realpath(folder), 'shard_size': shard_size, 'shuffle_seed': shuffle_seed,
               'classes': len(classes)}
    if not _begin(out, MANIFEST, SHARDS_PARTIAL, options, ('train', 'val', CLASSES_FILE), 'shard set'):
        print(f"'{out}' is already complete (made by an identical command): nothing to do")
        return False
    write_atomic(os.path.join(out, CLASSES_FILE), ''.join(f'{c}\n' for c in classes))
    index = {c: i for i, c in enumerate(classes)}
    manifest = {'options': options, 'classes': len(classes), 'format': 'webdataset', 'fields': ['image', 'cls']}
    for split in ('train', 'val'):
        root = os.path.join(folder, split)
        samples = find_samples(root, index)
        samples = [(p, y) for p, y in samples if image_field(p) in ('jpg', 'png', 'webp', 'ppm', 'bmp', 'tif',
                                                                    'tiff')]
        keys = _shard_keys(samples, classes, root)
        if split == 'train' and shuffle_seed is not None:
            order = list(range(len(samples)))
            random.Random(shuffle_seed).shuffle(order)
            samples, keys = [samples[i] for i in order], [keys[i] for i in order]
        manifest[split] = _write_split(split, samples, keys, out, shard_size)
    _finish(out, MANIFEST, SHARDS_PARTIAL, manifest)
    print(f"done: {len(classes)} classes, "
          + ', '.join(f"{split} {sum(e['samples'] for e in manifest[split])} images in {len(manifest[split])} "
                      f"shards" for split in ('train', 'val')) + f" in '{out}'")
    return True


# ----------------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='tools/prepare_imagenet.py', description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog='\n'.join(__doc__.splitlines()[2:7]))
    sub = parser.add_subparsers(dest='command', required=True)
    f = sub.add_parser('folder', help='official archives -> OUT/train/<wnid>/, OUT/val/<wnid>/')
    f.add_argument('--train', required=True, help='ILSVRC2012_img_train.tar, or a folder of its class tars')
    f.add_argument('--val', required=True, help='ILSVRC2012_img_val.tar, or the flat folder of its images')
    f.add_argument('--val-labels', required=True,
                   help="'FILE WNID' or 'FILE INDEX' lines (0-based index into the sorted WordNet ids), or "
                        "Kaggle's LOC_val_solution.csv")
    f.add_argument('--out', required=True, help='folder to write train/ and val/ into')
    f.add_argument('--shards', default='', help='also write WebDataset tar shards of the result into this folder')
    for split, n in IMAGENET_COUNTS.items():
        f.add_argument(f'--expect-{split}', type=int, default=n, help=f'expected {split} count (default {n})')
    f.add_argument('--any-size', action='store_true', help='skip the count checks (small or test archives)')
    s = sub.add_parser('shards', help='an ImageFolder tree -> WebDataset tar shards')
    s.add_argument('--folder', required=True, help='root holding train/ and val/')
    s.add_argument('--out', required=True, help='folder to write classes.txt, shards.json, train/, val/ into')
    for p in (f, s):
        p.add_argument('--shard-size', type=int, default=1000, help='images per shard (default 1000)')
        p.add_argument('--shuffle-seed', type=int, default=None,
                       help='shuffle the training images across shards with this seed (for streaming readers; '
                            "this project's reader does not need it)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == 'folder':
            expect = {k: None if args.any_size else getattr(args, f'expect_{k}') for k in IMAGENET_COUNTS}
            prepare_folder(args.train, args.val, args.val_labels, args.out, expect)
            if args.shards:
                prepare_shards(args.out, args.shards, args.shard_size, args.shuffle_seed)
        else:
            prepare_shards(args.folder, args.out, args.shard_size, args.shuffle_seed)
    except DataError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except OSError as e:
        print(f'error: {e.strerror or e}: {e.filename or ""} (rerun the same command to continue once fixed)',
              file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
