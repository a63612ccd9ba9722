"""DATA.FORMAT 'hf': a local Hugging Face dataset (a save_to_disk folder or the hub's parquet files)
read with pyarrow. Samples, order and labels equal the folder they were written from; faults are
one-line errors at start-up (a corrupt image is skipped and counted); through ``main.py`` a run
from it, preempted and resumed, equals the uninterrupted run from the folder."""
from __future__ import annotations

import builtins
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip('pyarrow')

from conftest import (MODEL_NAME, REPO, kill_group, made_once, main_cmd, run_main, subprocess_env,  # noqa: E402
                      tiny_args, wait_for)
from config import load_config  # noqa: E402
from data import DataError  # noqa: E402
from data.build import build_loader  # noqa: E402
from data.folder import SafeImageFolder, load_rgb  # noqa: E402
from data.hf import build_hf_datasets  # noqa: E402
from hf_files import write_hf  # noqa: E402
from test_shards import _digest  # noqa: E402

LAYOUTS = ('saved', 'parquet')


@pytest.fixture(scope='session')
def tiny_hf(tmp_path_factory, tiny_data) -> str:
    """``tiny_data`` as a saved DatasetDict (``saved/``) and as hub parquet files (``parquet/``)."""
    return made_once(tmp_path_factory, 'tiny_hf', lambda folder: str(write_hf(tiny_data, folder / 'hf')))


def _cfg(path, *opts):
    return load_config(str(REPO / 'configs' / 'demo.yaml'),
                       ['DATA.DATA_PATH', str(path), 'DATA.FORMAT', 'hf', 'MODEL.NUM_CLASSES', '3',
                        'DATA.NUM_WORKERS', '0', 'DATA.BATCH_SIZE', '2', *opts])


def _error(root, *opts) -> str:
    with pytest.raises(DataError) as info:
        build_hf_datasets(_cfg(root, *opts), None, None)
    assert '\n' not in str(info.value)
    return str(info.value)


def _copy(tiny_hf, tmp_path, layout) -> Path:
    shutil.copytree(Path(tiny_hf) / layout, tmp_path / layout)
    return tmp_path / layout


def _same_as_folder(datasets, tiny_data):
    for split in ('train', 'val'):
        folder = SafeImageFolder(os.path.join(tiny_data, split))
        ds = datasets[split]
        assert ds.targets.tolist() == folder.targets and ds.classes == folder.classes
        for i in range(len(folder)):
            img, target = ds[i]
            assert target == folder.targets[i]
            assert np.array_equal(np.asarray(img), np.asarray(load_rgb(folder.samples[i][0])))


@pytest.mark.parametrize('layout', LAYOUTS)
def test_samples_order_and_labels_equal_the_folder(tiny_data, tiny_hf, layout):
    _same_as_folder(build_hf_datasets(_cfg(Path(tiny_hf) / layout), None, None), tiny_data)


@pytest.mark.parametrize('layout', LAYOUTS)
def test_loader_workers_read_the_files_themselves(tiny_hf, layout):
    loader = build_loader(_cfg(Path(tiny_hf) / layout, 'DATA.NUM_WORKERS', '2', 'DATA.PIN_MEMORY', 'False'))[3]
    batches = list(loader)
    assert sum(x.shape[0] for x, _, _ in batches) == 9
    assert [t for _, y, _ in batches for t in y.tolist()] == loader.dataset.targets.tolist()


def test_files_written_by_the_datasets_package_read_the_same(tmp_path, tiny_data):
    datasets = pytest.importorskip('datasets')
    from hf_files import split_rows
    features = None
    parts = {}
    for split, name in (('train', 'train'), ('val', 'validation')):
        classes, rows = split_rows(tiny_data, split)
        features = datasets.Features({'image': datasets.Image(), 'label': datasets.ClassLabel(names=classes)})
        parts[name] = datasets.Dataset.from_dict(
            {'image': [{'bytes': b, 'path': p} for b, p, _ in rows], 'label': [y for _, _, y in rows]},
            features=features)
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / 'saved'), num_shards={'train': 2, 'validation': 1})
    (tmp_path / 'parquet' / 'data').mkdir(parents=True)
    for name, ds in parts.items():
        ds.to_parquet(str(tmp_path / 'parquet' / 'data' / f'{name}-00000-of-00001.parquet'))
    for layout in LAYOUTS:
        _same_as_folder(build_hf_datasets(_cfg(tmp_path / layout), None, None), tiny_data)


def test_a_corrupt_image_is_skipped_and_counted(tiny_hf, tmp_path, caplog):
    import pyarrow.parquet as pq
    root = _copy(tiny_hf, tmp_path, 'parquet')
    path = root / 'data' / 'validation-00000-of-00002.parquet'
    table = pq.read_table(path)
    images = table.column('image').to_pylist()
    images[1]['bytes'] = images[1]['bytes'][:100]
    images[2]['bytes'] = None
    table = table.set_column(0, table.schema.field('image'), pa.array(images, type=table.schema.field('image').type))
    pq.write_table(table, path)
    loader = build_loader(_cfg(root, 'DATA.BATCH_SIZE', '9'))[3]
    with caplog.at_level('WARNING', logger='dat.data'):
        batches = list(loader)
    assert sum(int(s) for _, _, s in batches) == 2 and sum(x.shape[0] for x, _, _ in batches) == 7
    assert 'validation-00000-of-00002.parquet:row 1' in caplog.text and 'no image bytes' in caplog.text


@pytest.mark.parametrize('layout', LAYOUTS)
def test_a_truncated_file_is_a_one_line_error(tiny_hf, tmp_path, layout):
    root = _copy(tiny_hf, tmp_path, layout)
    path = sorted((root / ('train' if layout == 'saved' else 'data')).glob('train-*' if layout == 'parquet'
                                                                          else 'data-*'))[1]
    data = path.read_bytes()
    cuts = [len(data) // 2]
    if layout == 'saved':                       # also exactly after a record batch: only the marker is gone
        cuts.append(len(data) - 8)
    for cut in cuts:
        path.write_bytes(data[:cut])
        message = _error(root)
        assert path.name in message and ('truncated' in message), message


def test_a_missing_file_or_split_is_a_one_line_error(tiny_hf, tmp_path):
    root = _copy(tiny_hf, tmp_path, 'saved')
    (root / 'train' / 'data-00001-of-00002.arrow').unlink()
    assert "data-00001-of-00002.arrow' (listed in" in _error(root)
    shutil.rmtree(root / 'validation')
    shutil.rmtree(root / 'train')
    assert 'no train split' in _error(root)
    root = _copy(tiny_hf, tmp_path, 'parquet')
    for p in (root / 'data').glob('validation-*'):
        p.unlink()
    assert 'no validation/val/valid split' in _error(root)
    assert "validation-00000-of-00002.parquet' (from DATA.VAL_SHARDS" in _error(
        root, 'DATA.VAL_SHARDS', 'data/validation-{00000..00001}-of-00002.parquet')


def test_labels_that_do_not_match_are_one_line_errors(tiny_hf, tmp_path):
    import pyarrow.parquet as pq
    root = _copy(tiny_hf, tmp_path, 'parquet')
    (root / 'classes.txt').write_text('a\nb\n')
    assert "label 2, outside the classes of" in _error(root)
    (root / 'classes.txt').unlink()
    path = root / 'data' / 'validation-00001-of-00002.parquet'
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b'huggingface'])
    meta['info']['features']['label']['names'] = ['x', 'y', 'z']
    renamed = table.replace_schema_metadata({'huggingface': json.dumps(meta)})
    pq.write_table(renamed, path)
    assert 'names other classes' in _error(root)
    unlabeled = table.set_column(1, 'label', pa.array([-1] * table.num_rows, type=pa.int64()))
    pq.write_table(unlabeled, path)
    assert 'has label -1' in (message := _error(root)) and 'test split' in message


def test_without_pyarrow_the_error_names_the_install(tiny_hf, monkeypatch):
    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.split('.')[0] == 'pyarrow':
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, '__import__', no_pyarrow)
    assert 'pip install pyarrow' in _error(Path(tiny_hf) / 'saved')


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_a_preempted_and_resumed_run_from_hf_equals_the_folder_run(tmp_path, tiny_hf, tiny_reference):
    args = tiny_args(str(Path(tiny_hf) / 'saved'), 'DATA.FORMAT', 'hf')
    out_dir = tmp_path / MODEL_NAME / 'hf'
    log = out_dir / 'log_rank0.txt'
    with open(tmp_path / 'first.out', 'w') as out:
        proc = subprocess.Popen([sys.executable, *main_cmd(args, tmp_path, 'hf')], cwd=REPO, env=subprocess_env(),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert wait_for(lambda: log.exists() and 'Train: [1/' in log.read_text(), timeout=240, proc=proc), \
            (tmp_path / 'first.out').read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=240) == 0
    finally:
        kill_group(proc)
    assert re.search(r'stop requested \(SIGTERM\): saving epoch \d+ iteration \d+', log.read_text())
    resumed = run_main(args, tmp_path, tag='hf').check()
    assert _digest(resumed.log()) == _digest(tiny_reference.log())
    assert resumed.accuracies()[-1] == tiny_reference.accuracies()[-1]
    evaluated = run_main(['--eval', '--resume', str(out_dir / 'ckpt_epoch_3.pth'), *args], tmp_path,
                         tag='eval').check()
    assert evaluated.accuracies() == tiny_reference.accuracies()[-1:]


def test_evaluation_reads_the_validation_split_alone(tiny_hf, tmp_path):
    full = build_loader(_cfg(Path(tiny_hf) / 'parquet'))[3]
    root = tmp_path / 'parquet'
    shutil.copytree(Path(tiny_hf) / 'parquet', root)
    for f in root.rglob('train-*.parquet'):
        f.unlink()
    train_ds, val_ds, _, val, _ = build_loader(_cfg(root), train=False)
    assert train_ds is None and len(val_ds) == len(full.dataset)
    assert [y.tolist() for _, y, _ in val] == [y.tolist() for _, y, _ in full]
