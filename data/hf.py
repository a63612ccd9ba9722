"""A local Hugging Face image dataset (``DATA.FORMAT 'hf'``): a ``save_to_disk`` folder or the
hub's parquet files, read with ``pyarrow`` (``pip install pyarrow``; the ``datasets`` package is not
needed, and nothing is downloaded).

``DATA.DATA_PATH`` holds either

* a saved ``DatasetDict`` (``dataset_dict.json``, and per split ``state.json`` naming its
  ``data-*.arrow`` files): the Arrow files are memory-mapped, each image read in place; or
* parquet files as the hub ships them: ``data/<split>-*.parquet`` (or ``<split>-*.parquet``,
  ``<split>/*.parquet``). Parquet is read a row group at a time; shuffled training reads a whole
  row group per image, so for training at scale prefer a saved folder or tar shards.

The training split is ``train``, the validation split ``validation`` (or ``val``).
``DATA.TRAIN_SHARDS`` / ``DATA.VAL_SHARDS`` name other files (brace ranges and globs of
``.arrow`` or ``.parquet`` files, relative to the data path). The image column is the feature of
type ``Image`` (bytes and path), the label the ``ClassLabel`` one; class names come from
``DATA.CLASS_INDEX`` when given, else from the ``ClassLabel`` names, which both splits must share.
Rows are in file order, files in the order of the split's ``state.json`` (else sorted): a
map-style dataset of fixed length and order, for the samplers of :mod:`data.samplers`. An image
that does not decode (or has no bytes) is skipped and counted; a missing or damaged file, a label
outside the classes, a validation class the training split lacks and unlabelled rows (``-1``,
such as the hub's ImageNet test split) are one-line :class:`DataError` at start-up.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import Dataset

from .errors import DataError
from .shard_format import read_classes
from .shards import apply_classes, class_index_file, decoded_sample, shard_paths

__all__ = ['HFImageDataset', 'build_hf_datasets']

_SPLITS = {'train': ('train',), 'val': ('validation', 'val', 'valid')}
_INSTALL = "DATA.FORMAT 'hf' needs pyarrow: pip install pyarrow (or pip install 'dat-pp[hf]')"


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(_INSTALL) from None
    return pa, pq


def _features(schema) -> dict:
    """The ``datasets`` features recorded in an Arrow schema ({} when absent)."""
    meta = (schema.metadata or {}).get(b'huggingface')
    if not meta:
        return {}
    try:
        return json.loads(meta).get('info', {}).get('features', {}) or {}
    except ValueError:
        return {}


def _columns(schema, features: dict, path: str) -> Tuple[str, str, Optional[List[str]]]:
    """``(image column, label column, class names or None)`` of one file."""
    pa, _ = _pyarrow()
    image = next((k for k, f in features.items() if isinstance(f, dict) and f.get('_type') == 'Image'), None)
    label = next((k for k, f in features.items() if isinstance(f, dict) and f.get('_type') == 'ClassLabel'), None)
    names = schema.names
    image = image or next((n for n in ('image', 'img') if n in names), None)
    label = label or next((n for n in ('label', 'labels') if n in names), None)
    if image is None or label is None or image not in names or label not in names:
        raise DataError(f"'{path}' has no image and label columns (columns: {', '.join(names)}): DATA.FORMAT 'hf' "
                        f"reads image classification datasets (an Image feature and a ClassLabel feature)")
    kind = schema.field(image).type
    if not (pa.types.is_struct(kind) and kind.get_field_index('bytes') >= 0) and not pa.types.is_binary(kind):
        raise DataError(f"'{path}': column '{image}' is {kind}, not an image (struct of bytes and path)")
    class_names = features.get(label, {}).get('names') if isinstance(features.get(label), dict) else None
    return image, label, class_names


def _split_files(root: str, split: str) -> List[str]:
    """The data files of ``split`` in a saved DatasetDict or a folder of hub parquet files."""
    for name in _SPLITS[split]:
        folder = os.path.join(root, name)
        state = os.path.join(folder, 'state.json')
        if os.path.isfile(state):
            try:
                with open(state, encoding='utf-8') as f:
                    files = [os.path.join(folder, e['filename']) for e in json.load(f)['_data_files']]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise DataError(f"cannot read '{state}' ({type(e).__name__}: {e}): save the dataset again") from None
            missing = [p for p in files if not os.path.isfile(p)]
            if missing:
                raise DataError(f"'{missing[0]}' (listed in {state}) is missing: copy it back or save the dataset again")
            return files
        for pattern in (os.path.join(root, 'data', f'{name}-*.parquet'), os.path.join(root, f'{name}-*.parquet'),
                        os.path.join(folder, '*.parquet'), os.path.join(folder, 'data-*.arrow')):
            files = sorted(glob.glob(pattern))
            if files:
                return files
    raise DataError(f"no {'/'.join(_SPLITS[split])} split in '{root}': DATA.FORMAT 'hf' needs a saved DatasetDict "
                    f"(dataset_dict.json) or parquet files data/{_SPLITS[split][0]}-*.parquet; or name the files "
                    f"with --opts DATA.{'TRAIN' if split == 'train' else 'VAL'}_SHARDS PATTERN")


class _File:
    """One data file: its row count, labels and image column, opened lazily per process."""

    def __init__(self, path: str) -> None:
        pa, pq = _pyarrow()
        self.path = path
        try:
            if path.endswith('.parquet'):
                meta = pq.ParquetFile(path)
                schema = meta.schema_arrow
                self.row_groups = np.cumsum([0] + [meta.metadata.row_group(i).num_rows
                                                   for i in range(meta.metadata.num_row_groups)])
                table = None
            else:
                table = self._arrow(path)
                schema = table.schema
            self.features = _features(schema)
            self.image, self.label, self.class_names = _columns(schema, self.features, path)
            labels = (pq.read_table(path, columns=[self.label]) if table is None else table).column(self.label)
            self.labels = np.asarray(labels.fill_null(-1).to_numpy(), dtype=np.int64)
        except DataError:
            raise
        except (pa.ArrowException, OSError, ValueError) as e:
            raise DataError(f"'{path}' cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:200]}): it is "
                            f"truncated or damaged; copy it again") from None
        self._pid = -1
        self._state: Any = None

    @staticmethod
    def _arrow(path: str):
        pa, _ = _pyarrow()
        with open(path, 'rb') as f:
            f.seek(max(os.path.getsize(path) - 8, 0))
            tail = f.read(8)
        if tail != b'\xff\xff\xff\xff\x00\x00\x00\x00' and not tail.endswith(b'ARROW1'):
            # Arrow readers take a stream cut between record batches for a shorter one.
            raise DataError(f"'{path}' is truncated (no end-of-stream marker): copy it again or save the dataset "
                            f"again")
        source = pa.memory_map(path)
        try:
            return pa.ipc.open_stream(source).read_all()          # what save_to_disk writes
        except pa.ArrowInvalid:
            return pa.ipc.open_file(source).read_all()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def _cell(self, column) -> Optional[bytes]:
        value = column.as_py()
        if isinstance(value, dict):
            value = value.get('bytes')
        return value

    def image_bytes(self, row: int) -> Optional[bytes]:
        if self._pid != os.getpid():        # a loader worker opens (maps) the file itself
            self._pid, self._state = os.getpid(), None
        if not self.path.endswith('.parquet'):
            if self._state is None:
                self._state = self._arrow(self.path).column(self.image)
            return self._cell(self._state[row])
        _, pq = _pyarrow()
        group = int(np.searchsorted(self.row_groups, row, side='right') - 1)
        if self._state is None or self._state[0] != group:
            if self._state is None:
                self._file = pq.ParquetFile(self.path)
            self._state = (group, self._file.read_row_group(group, columns=[self.image]).column(self.image))
        return self._cell(self._state[1][row - int(self.row_groups[group])])

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state['_pid'], state['_state'] = -1, None
        state.pop('_file', None)
        return state


class HFImageDataset(Dataset):
    """The rows of Hugging Face data ``files`` as ``(image, class index)``; :class:`BadSample` when an
    image does not decode."""

    def __init__(self, files: Sequence[str], transform: Optional[Callable] = None) -> None:
        self.files = [_File(p) for p in files]
        self.transform = transform
        self.starts = np.cumsum([0] + [len(f) for f in self.files])
        if self.starts[-1] == 0:
            raise DataError(f"the Hugging Face files ({', '.join(files[:3])}) hold no rows")
        self.targets = np.concatenate([f.labels for f in self.files])
        self.classes: List[str] = []

    def set_classes(self, classes: Sequence[str]) -> None:
        self.classes = list(classes)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _locate(self, index: int) -> Tuple[_File, int]:
        i = int(np.searchsorted(self.starts, index, side='right') - 1)
        return self.files[i], index - int(self.starts[i])

    def name(self, index: int) -> str:
        file, row = self._locate(index)
        return f'{file.path}:row {row}'

    def _read(self, index: int) -> Optional[bytes]:
        file, row = self._locate(index)
        return file.image_bytes(row)

    def __getitem__(self, index: int) -> Any:
        return decoded_sample(self, index, self._read)


def build_hf_datasets(config: Any, transform_train: Optional[Callable], transform_val: Optional[Callable],
                      splits: Sequence[str] = ('train', 'val')) -> Dict[str, HFImageDataset]:
    """The datasets of ``DATA.FORMAT 'hf'`` (see the module docstring), both held to one class list."""
    _pyarrow()
    root = os.path.expanduser(str(config.DATA.DATA_PATH or ''))
    if not root or not os.path.isdir(root):
        raise DataError(f"data path '{root}' is not a folder: DATA.FORMAT 'hf' needs DATA.DATA_PATH (--data-path) "
                        f"holding a saved DatasetDict or the dataset's parquet files")
    patterns = {'train': ('DATA.TRAIN_SHARDS', str(config.DATA.TRAIN_SHARDS or ''), transform_train),
                'val': ('DATA.VAL_SHARDS', str(config.DATA.VAL_SHARDS or ''), transform_val)}
    datasets: Dict[str, HFImageDataset] = {}
    for split in splits:
        key, pattern, transform = patterns[split]
        if pattern:
            full = pattern if os.path.isabs(os.path.expanduser(pattern)) else os.path.join(root, pattern)
            files = shard_paths(full, key)
        else:
            files = _split_files(root, split)
        datasets[split] = HFImageDataset(files, transform=transform)
    class_file = class_index_file(config, root)
    if class_file:
        classes, source = read_classes(class_file), f"the classes of '{class_file}'"
    else:
        found = {split: [f.class_names for f in ds.files] for split, ds in datasets.items()}
        names = [n for lists in found.values() for n in lists]
        if any(n is None for n in names):
            labelled = datasets.get('train', datasets.get('val'))     # the training labels name the classes
            classes, source = [str(i) for i in range(int(labelled.targets.max()) + 1)], None
        else:
            first = next(iter(datasets.values())).files[0].path
            for split, lists in found.items():
                for f, n in zip(datasets[split].files, lists):
                    if n != names[0]:
                        raise DataError(f"'{f.path}' names other classes ({len(n)}) than "
                                        f"'{first}' ({len(names[0])}): the splits' label "
                                        f"features do not match; both splits need one ClassLabel")
            classes, source = list(names[0]), f"the {len(names[0])} ClassLabel names"
    apply_classes(datasets, classes, source and f'{source}', 'the class list does not match the labels', 'files')
    return {s: datasets[s] for s in splits}
