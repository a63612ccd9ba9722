"""Write an ImageFolder tree as a local Hugging Face dataset, in the two layouts ``datasets`` produces,
with pyarrow alone (so the tests need no ``datasets`` package):

* ``saved/``: what ``DatasetDict.save_to_disk`` writes (``dataset_dict.json``; per split
  ``data-0000i-of-0000n.arrow`` Arrow IPC streams, ``dataset_info.json``, ``state.json``);
* ``parquet/data/<split>-0000i-of-0000n.parquet``: the hub's parquet files.

Both carry the ``datasets`` features (an ``Image`` and a ``ClassLabel`` with the class names) in
the schema metadata, as ``datasets`` does; ``tests/test_hf.py`` checks the layout against the real
package when it is installed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Sequence, Tuple

from data.discovery import class_folders, find_samples

SPLITS = {'train': 'train', 'val': 'validation'}


def _schema(pa, classes: Sequence[str]):
    features = {'image': {'_type': 'Image'}, 'label': {'names': list(classes), '_type': 'ClassLabel'}}
    return pa.schema([('image', pa.struct([('bytes', pa.binary()), ('path', pa.string())])),
                      ('label', pa.int64())],
                     metadata={'huggingface': json.dumps({'info': {'features': features}})}), features


def _table(pa, rows: List[Tuple[bytes, str, int]], classes):
    schema, _ = _schema(pa, classes)
    return pa.table({'image': [{'bytes': b, 'path': p} for b, p, _ in rows], 'label': [y for _, _, y in rows]},
                    schema=schema)


def split_rows(folder: str, split: str) -> Tuple[List[str], List[Tuple[bytes, str, int]]]:
    classes = class_folders(str(Path(folder) / 'train'))
    samples = find_samples(str(Path(folder) / split), {c: i for i, c in enumerate(classes)})
    return classes, [(Path(p).read_bytes(), Path(p).name, y) for p, y in samples]


def write_hf(folder: str, out: Path, files_per_split: int = 2, row_group_size: int = 5) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    saved, parquet = out / 'saved', out / 'parquet' / 'data'
    parquet.mkdir(parents=True)
    saved.mkdir(parents=True)
    (saved / 'dataset_dict.json').write_text(json.dumps({'splits': list(SPLITS.values())}))
    for split, name in SPLITS.items():
        classes, rows = split_rows(folder, split)
        n = files_per_split
        parts = [rows[i * len(rows) // n:(i + 1) * len(rows) // n] for i in range(n)]
        split_dir = saved / name
        split_dir.mkdir()
        files = []
        for i, part in enumerate(parts):
            table = _table(pa, part, classes)
            file = f'data-{i:05d}-of-{n:05d}.arrow'
            with pa.OSFile(str(split_dir / file), 'wb') as sink, pa.ipc.new_stream(sink, table.schema) as writer:
                for batch in table.to_batches(max_chunksize=4):
                    writer.write_batch(batch)
            files.append({'filename': file})
            pq.write_table(table, str(parquet / f'{name}-{i:05d}-of-{n:05d}.parquet'), row_group_size=row_group_size)
        _, features = _schema(pa, classes)
        (split_dir / 'state.json').write_text(json.dumps({'_data_files': files, '_fingerprint': '0', '_split': None}))
        (split_dir / 'dataset_info.json').write_text(json.dumps({'features': features}))
    return out
