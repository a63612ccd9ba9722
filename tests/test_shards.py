"""DATA.FORMAT 'wds': WebDataset tar shards as a map-style dataset. The samples, their order and
their labels equal the folder they were written from; every fault of a shard set is a one-line
error at start-up (a corrupt image is skipped and counted); and through ``main.py`` a run from
the shards equals the run from the folder, also on two ranks preempted and resumed."""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import (ACC_DETAIL, MODEL_NAME, REPO, free_port, kill_group, load_ckpt, made_once, main_cmd,
                      run_main, run_torchrun, subprocess_env, tiny_args, wait_for)
from config import ConfigError, load_config
from data import DataError
from data.build import build_loader
from data.folder import SafeImageFolder, load_rgb
from data.samplers import DistributedEvalSampler, ResumableDistributedSampler
from data.shards import TarShardDataset, build_shard_datasets, expand_braces

sys.path.insert(0, str(REPO / 'tools'))
import prepare_imagenet  # noqa: E402


@pytest.fixture(scope='session')
def tiny_shards(tmp_path_factory, tiny_data) -> str:
    """``tiny_data`` written as shards of 5 samples: train 5 shards (24 images), val 2 (9 images)."""
    def make(folder: Path) -> str:
        prepare_imagenet.prepare_shards(tiny_data, str(folder / 'wds'), shard_size=5, shuffle_seed=None)
        return str(folder / 'wds')
    return made_once(tmp_path_factory, 'tiny_shards', make)


def _cfg(path, *opts):
    return load_config(str(REPO / 'configs' / 'demo.yaml'),
                       ['DATA.DATA_PATH', str(path), 'DATA.FORMAT', 'wds', 'MODEL.NUM_CLASSES', '3',
                        'DATA.NUM_WORKERS', '0', 'DATA.BATCH_SIZE', '2', *opts])


def _copy(tiny_shards, tmp_path) -> Path:
    root = tmp_path / 'wds'
    shutil.copytree(tiny_shards, root)
    return root


def _error(root, *opts) -> str:
    with pytest.raises(DataError) as info:
        build_shard_datasets(_cfg(root, *opts), None, None)
    message = str(info.value)
    assert '\n' not in message
    return message


def _rewrite(path: Path, edit) -> None:
    """Rewrite the tar ``path`` with ``edit(name, data)`` -> ``[(name, data), ...]`` per member."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, 'w') as tar:
        for name, data in members:
            for new_name, new_data in edit(name, data):
                info = tarfile.TarInfo(new_name)
                info.size = len(new_data)
                tar.addfile(info, io.BytesIO(new_data))


def _first(field: str, change):
    """An edit for :func:`_rewrite` applying ``change(name, data)`` to the first member of ``field``."""
    done = []

    def edit(name, data):
        if name.endswith('.' + field) and not done:
            done.append(name)
            return change(name, data)
        return [(name, data)]
    return edit


def test_brace_patterns_expand_like_webdataset():
    assert expand_braces('s-{000..002}.tar') == ['s-000.tar', 's-001.tar', 's-002.tar']
    assert expand_braces('{a,b}/x{8..10}') == ['a/x8', 'a/x9', 'a/x10', 'b/x8', 'b/x9', 'b/x10']
    assert expand_braces('plain.tar') == ['plain.tar']


def test_samples_order_and_labels_equal_the_folder(tiny_data, tiny_shards):
    for split in ('train', 'val'):
        folder = SafeImageFolder(os.path.join(tiny_data, split))
        shards = TarShardDataset(sorted(str(p) for p in Path(tiny_shards, split).glob('*.tar')))
        assert len(shards) == len(folder)
        assert shards.targets.tolist() == folder.targets
        for i in range(len(folder)):
            img, target = shards[i]
            assert target == folder.targets[i]
            assert np.array_equal(np.asarray(img), np.asarray(load_rgb(folder.samples[i][0])))
    datasets = build_shard_datasets(_cfg(tiny_shards), None, None)
    assert datasets['train'].classes == datasets['val'].classes == SafeImageFolder(
        os.path.join(tiny_data, 'train')).classes


def test_the_loaders_equal_the_folder_loaders(tiny_data, tiny_shards):
    """Same sampler order, batches, classes: what makes a run from shards equal one from folders."""
    folder = build_loader(load_config(str(REPO / 'configs' / 'demo.yaml'), [
        'DATA.DATA_PATH', tiny_data, 'MODEL.NUM_CLASSES', '3', 'DATA.NUM_WORKERS', '0', 'DATA.BATCH_SIZE', '2']))
    shards = build_loader(_cfg(tiny_shards))
    for loaders in (folder, shards):
        loaders[2].sampler.set_epoch(1, start_batch=3)
    for a, b in ((folder[3], shards[3]), (folder[2], shards[2])):
        assert list(a.sampler) == list(b.sampler)
    torch.manual_seed(0)
    val_a = [(x.clone(), y) for x, y, _ in folder[3]]
    val_b = [(x.clone(), y) for x, y, _ in shards[3]]
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(val_a, val_b))


def test_ranks_are_disjoint_and_eval_counts_every_image_once(tiny_shards):
    ds = build_shard_datasets(_cfg(tiny_shards), None, None)
    for world in (2, 3, 4):
        seen = []
        for rank in range(world):
            seen += list(DistributedEvalSampler(ds['val'], num_replicas=world, rank=rank))
        assert sorted(seen) == list(range(9))
        train = [set(ResumableDistributedSampler(ds['train'], num_replicas=world, rank=r, seed=0, drop_last=True))
                 for r in range(world)]
        assert all(not (a & b) for i, a in enumerate(train) for b in train[i + 1:])


def test_a_corrupt_image_is_skipped_and_counted(tiny_shards, tmp_path, caplog):
    root = _copy(tiny_shards, tmp_path)
    shard = root / 'val' / 'val-000000.tar'
    _rewrite(shard, _first('jpg', lambda name, data: [(name, data[:len(data) // 3])]))
    loader = build_loader(_cfg(root, 'DATA.BATCH_SIZE', '9'))[3]
    with caplog.at_level('WARNING', logger='dat.data'):
        batches = list(loader)
    assert sum(int(s) for _, _, s in batches) == 1
    assert sum(x.shape[0] for x, _, _ in batches) == 8
    assert 'skipped unreadable image' in caplog.text and 'val-000000.tar:' in caplog.text


def test_a_truncated_shard_is_a_one_line_error(tiny_shards, tmp_path):
    root = _copy(tiny_shards, tmp_path)
    shard = root / 'train' / 'train-000002.tar'
    data = shard.read_bytes()
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    for cut in (len(data) // 2, members[4].offset):          # inside a member; at a member boundary
        shard.write_bytes(data[:cut])
        assert 'train-000002.tar' in (message := _error(root)) and 'truncated' in message
    shard.write_bytes(data[:300])
    assert 'truncated' in _error(root)


def test_a_missing_shard_is_a_one_line_error(tiny_shards, tmp_path):
    root = _copy(tiny_shards, tmp_path)
    assert 'no shard matches' in _error(root, 'DATA.VAL_SHARDS', 'nowhere/*.tar')
    (root / 'train' / 'train-000003.tar').unlink()
    message = _error(root)
    assert "train-000003.tar' is missing (1 of the 5 train shards in shards.json)" in message
    message = _error(root, 'DATA.TRAIN_SHARDS', 'train/train-{000000..000004}.tar')
    assert "shard '" in message and "train-000003.tar' (from DATA.TRAIN_SHARDS" in message
    shutil.rmtree(root / 'val')
    assert 'no shards at' in _error(root, 'DATA.TRAIN_SHARDS', 'train/train-00000[0124].tar')


def test_without_the_manifest_a_pattern_selects_the_shards(tiny_shards, tmp_path):
    root = _copy(tiny_shards, tmp_path)
    (root / 'shards.json').unlink()
    ds = build_shard_datasets(_cfg(root, 'DATA.TRAIN_SHARDS', 'train/train-{000000..000004}.tar',
                                   'DATA.VAL_SHARDS', str(root / 'val' / 'val-000001.tar')), None, None)
    assert len(ds['train']) == 24 and len(ds['val']) == 4


def test_a_class_index_that_does_not_match_is_a_one_line_error(tiny_shards, tmp_path):
    root = _copy(tiny_shards, tmp_path)
    classes = (root / 'classes.txt').read_text().split()
    (root / 'classes.txt').write_text('\n'.join(classes[:2]) + '\n')
    message = _error(root)
    assert 'outside the 2 classes of' in message and 'class-index file does not match' in message
    (root / 'classes.txt').write_text('\n'.join(classes + ['extra']) + '\n')
    assert 'says 3 classes' in _error(root)
    (root / 'classes.txt').write_text('a\n\nb\n')
    assert 'blank line 2' in _error(root)
    (root / 'classes.txt').unlink()
    assert 'DATA.CLASS_INDEX' in _error(root, 'DATA.CLASS_INDEX', 'nope.txt')
    (root / 'shards.json').unlink()
    ds = build_shard_datasets(_cfg(root), None, None)      # classes from the labels: 0, 1, 2
    assert ds['train'].classes == ['0', '1', '2']


def test_validation_labels_the_training_split_lacks_are_an_error(tiny_shards, tmp_path):
    root = _copy(tiny_shards, tmp_path)
    (root / 'classes.txt').unlink()
    (root / 'shards.json').unlink()
    _rewrite(root / 'val' / 'val-000001.tar', lambda n, d: [(n, b'7' if n.endswith('.cls') else d)])
    assert 'outside the training labels 0..2' in _error(root)


def test_a_sample_without_a_label_or_copied_twice_is_an_error(tiny_shards, tmp_path):
    root = _copy(tiny_shards, tmp_path)
    (root / 'shards.json').unlink()
    shutil.copy(root / 'train' / 'train-000001.tar', root / 'train' / 'train-000001-copy.tar')
    assert 'a shard copied twice' in _error(root)
    (root / 'train' / 'train-000001-copy.tar').unlink()
    _rewrite(root / 'train' / 'train-000001.tar', _first('cls', lambda n, d: []))
    message = _error(root)
    assert "sample 'n0000_hstripes/train_0000_00005' has no .cls label" in message


def test_num_classes_is_checked_and_the_format_is_a_config_choice(tiny_shards):
    with pytest.raises(DataError, match='set MODEL.NUM_CLASSES 3'):
        build_loader(_cfg(tiny_shards, 'MODEL.NUM_CLASSES', '2'))
    with pytest.raises(ConfigError, match="DATA.FORMAT"):
        _cfg(tiny_shards, 'DATA.FORMAT', 'parquet')
    assert load_config(str(REPO / 'configs' / 'dat_tiny.yaml')).DATA.FORMAT == 'folder'


# ----------------------------------------------------------------------------- end to end
def _digest(text: str) -> str:
    found = re.findall(r'parameter digest \(rank 0\): ([0-9a-f]{64})', text)
    assert found, 'no parameter digest logged'
    return found[-1]


@pytest.mark.slow
def test_a_run_from_shards_equals_the_run_from_the_folder(tmp_path, tiny_shards, tiny_reference):
    run = run_main(tiny_args(tiny_shards, 'TRAIN.KEEP_CHECKPOINTS', '0', 'DATA.FORMAT', 'wds'),
                   tmp_path, tag='wds').check()
    assert run.accuracies() == tiny_reference.accuracies() and len(run.accuracies()) == 4
    assert _digest(run.log()) == _digest(tiny_reference.log())
    evaluated = run_main(['--eval', '--resume', str(run.output / 'ckpt_epoch_3.pth'),
                          *tiny_args(tiny_shards, 'DATA.FORMAT', 'wds')], tmp_path, tag='eval').check()
    assert evaluated.accuracies() == run.accuracies()[-1:]


@pytest.mark.slow
def test_two_ranks_from_shards_preempted_and_resumed_equal_the_folder_run(tmp_path, tiny_data, tiny_shards):
    """torchrun with two ranks on the shards, SIGTERM to the whole group during epoch 1, the same
    command again: the final parameters and accuracies equal an uninterrupted two-rank run from the
    folder; evaluation on two ranks counts the 9 validation images once."""
    opts = ('TRAIN.EPOCHS', '3')
    folder = run_torchrun(2, tiny_args(tiny_data, *opts), tmp_path, tag='folder').check()
    args = tiny_args(tiny_shards, *opts, 'DATA.FORMAT', 'wds')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr', '127.0.0.1',
           '--master_port', str(free_port()), *main_cmd(args, tmp_path, 'wds')]
    out_dir = tmp_path / MODEL_NAME / 'wds'
    log = out_dir / 'log_rank0.txt'
    with open(tmp_path / 'first.out', 'w') as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        assert wait_for(lambda: log.exists() and 'Train: [1/' in log.read_text(), timeout=240, proc=proc), \
            (tmp_path / 'first.out').read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=240)
    finally:
        kill_group(proc)
    first = log.read_text()
    stop = re.search(r'stop requested \(SIGTERM\): saving epoch (\d+) iteration (\d+)', first)
    assert stop, first[-3000:]
    epoch, done = int(stop.group(1)), int(stop.group(2))
    assert 0 < done < 6 and epoch == 1 or epoch == 2, (epoch, done)
    resumed = run_torchrun(2, args, tmp_path, tag='wds').check()
    assert 'resum' in resumed.log().lower()
    assert _digest(resumed.log()) == _digest(folder.log())
    assert resumed.accuracies()[-1] == folder.accuracies()[-1]
    final = load_ckpt(out_dir / 'ckpt_epoch_2.pth')['model']
    reference = load_ckpt(folder.output / 'ckpt_epoch_2.pth')['model']
    assert all(torch.equal(final[k], reference[k]) for k in reference)
    evaluated = run_torchrun(2, ['--eval', '--resume', str(out_dir / 'ckpt_epoch_2.pth'), *args], tmp_path,
                             tag='eval').check()
    detail = ACC_DETAIL.findall(evaluated.stdout + evaluated.log())
    assert detail and int(detail[-1][3]) == 9
    assert evaluated.accuracies()[-1] == folder.accuracies()[-1]


def test_throughput_compares_the_sources_on_the_same_images(tiny_data, tiny_shards, capsys):
    from data.throughput import main as throughput_main
    code = throughput_main(['--cfg', str(REPO / 'configs' / 'demo.yaml'), '--data-path', tiny_data,
                            '--shards', tiny_shards, '--workers', '0', '--batches', '2', '--warmup', '1',
                            '--rounds', '2', '--opts', 'DATA.BATCH_SIZE', '2', 'MODEL.NUM_CLASSES', '3'])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0
    assert [r['source'] for r in lines[:-1]] == ['folder', 'wds', 'wds', 'folder']
    summary = lines[-1]['summary']
    assert summary['ratio'] == pytest.approx(summary['wds_per_worker'] / summary['folder_per_worker'])


def test_indexing_in_worker_processes_gives_the_same_dataset(tiny_shards, tmp_path):
    paths = sorted(str(p) for p in Path(tiny_shards, 'train').glob('*.tar'))
    one, pooled = TarShardDataset(paths), TarShardDataset(paths, workers=3)
    for name in ('keys', 'offsets', 'sizes', 'shard_ids', 'targets'):
        assert np.array_equal(getattr(one, name), getattr(pooled, name)), name
    root = _copy(tiny_shards, tmp_path)
    (root / 'train' / 'train-000003.tar').write_bytes(b'\0' * 100)
    with pytest.raises(DataError, match="train-000003.tar' cannot be read as a tar file"):
        TarShardDataset(sorted(str(p) for p in (root / 'train').glob('*.tar')), workers=3)


def test_resume_with_another_world_size_continues_at_the_same_sample(tiny_shards):
    """Two ranks stop after 2 batches of 2; one rank with batches of 4 continues: every training
    sample of the epoch is seen, none twice (24 = 4 x 2 x 2 + 2 x 4)."""
    from checkpoint import resume_position
    train = build_shard_datasets(_cfg(tiny_shards), None, None)['train']
    before = []
    for rank in range(2):
        sampler = ResumableDistributedSampler(train, num_replicas=2, rank=rank, seed=0, batch_size=2)
        sampler.set_epoch(1)
        before += list(sampler)[:2 * 2]
    epoch, batch, repeated = resume_position({'epoch': 1, 'iteration': 2, 'samples_seen': 8},
                                             iters_per_epoch=24 // 4, global_batch=4)
    sampler = ResumableDistributedSampler(train, num_replicas=1, rank=0, seed=0, batch_size=4)
    sampler.set_epoch(epoch, start_batch=batch)
    after = list(sampler)
    assert (epoch, batch, repeated) == (1, 2, 0)
    assert sorted(before + after) == list(range(24))


def test_evaluation_reads_the_validation_shards_alone(tiny_shards, tmp_path):
    full = build_loader(_cfg(tiny_shards))[3]
    root = _copy(tiny_shards, tmp_path)
    shutil.rmtree(root / 'train')
    train_ds, val_ds, train, val, mixup = build_loader(_cfg(root), train=False)
    assert train_ds is None and train is None and mixup is None
    assert list(val.sampler) == list(full.sampler)
    assert [y.tolist() for _, y, _ in val] == [y.tolist() for _, y, _ in full]
