"""Evaluation reads the validation split alone: ``--eval`` and ``evaluate.sh`` of a checkpoint on a
data root holding only ``val/`` (or only the validation shards) give the accuracy of the full root,
and a ``val/`` with other class folders than the model's classes is refused (its labels would be
positions in another class list)."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from conftest import ACC_LINE, REPO, TINY_EPOCHS, free_port, run_main, run_process, subprocess_env, tiny_args

pytestmark = pytest.mark.slow       # real main.py / evaluate.sh processes

sys.path.insert(0, str(REPO / 'tools'))
import prepare_imagenet  # noqa: E402


def _val_only(tiny_data: str, root: Path, drop: int = 0) -> str:
    classes = sorted(Path(tiny_data, 'val').iterdir())
    for folder in classes[:len(classes) - drop]:
        shutil.copytree(folder, root / 'val' / folder.name)
    return str(root)


def test_eval_needs_only_the_validation_split(tiny_reference, tiny_data, tmp_path):
    ckpt = str(tiny_reference.output / f'ckpt_epoch_{TINY_EPOCHS - 1}.pth')
    expected = ACC_LINE.findall(tiny_reference.stdout)[-1]

    alone = _val_only(tiny_data, tmp_path / 'val_only')
    single = run_main(['--eval', '--resume', ckpt, *tiny_args(alone)], tmp_path, tag='single').check()
    assert ACC_LINE.findall(single.stdout) == [expected]

    env = subprocess_env(PORT=str(free_port()), TORCHRUN=f'{sys.executable} -m torch.distributed.run')
    dist = run_process(['bash', str(REPO / 'evaluate.sh'), '2', str(REPO / 'configs' / 'demo.yaml'), ckpt,
                        '--output', str(tmp_path), '--tag', 'dist', *tiny_args(alone)], tmp_path, env, 300)
    assert dist.returncode == 0, dist.stdout[-3000:] + dist.stderr[-3000:]
    assert ACC_LINE.findall(dist.stdout) == [expected]           # 9 images, each counted once

    shards = tmp_path / 'wds'
    prepare_imagenet.prepare_shards(tiny_data, str(shards), shard_size=5, shuffle_seed=None)
    shutil.rmtree(shards / 'train')
    wds = run_main(['--eval', '--resume', ckpt, *tiny_args(str(shards), 'DATA.FORMAT', 'wds')], tmp_path,
                   tag='wds').check()
    assert ACC_LINE.findall(wds.stdout) == [expected]


def test_a_val_folder_with_other_classes_than_the_model_is_refused(tiny_reference, tiny_data, tmp_path):
    ckpt = str(tiny_reference.output / f'ckpt_epoch_{TINY_EPOCHS - 1}.pth')
    fewer = _val_only(tiny_data, tmp_path / 'fewer', drop=1)
    run = run_main(['--eval', '--resume', ckpt, *tiny_args(fewer)], tmp_path, tag='fewer')
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == (
        f"error: '{fewer}/val' has 2 classes but the model has MODEL.NUM_CLASSES 3: evaluate on the split the "
        f"model was trained for (every class folder), or put its train/ beside val/")
    assert 'Traceback' not in run.stderr
