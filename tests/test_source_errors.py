"""The faults of the tar-shard and Hugging Face sources through the real ``main.py``: one line on
stderr, exit status 2, no traceback; a corrupt image inside a shard is skipped and counted."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import REPO, made_once, run_main, subprocess_env, tiny_args
from test_shards import _first, _rewrite, tiny_shards  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slow       # starts real main.py processes

TOOL = str(REPO / 'tools' / 'prepare_imagenet.py')


@pytest.fixture
def hf_saved(tmp_path_factory, tiny_data) -> Path:
    """``tiny_data`` as a saved DatasetDict (test_hf.py's ``tiny_hf``, made once per session)."""
    pytest.importorskip('pyarrow')
    from hf_files import write_hf
    return Path(made_once(tmp_path_factory, 'tiny_hf', lambda folder: str(write_hf(tiny_data, folder / 'hf')))) / 'saved'


def _truncate(root: Path) -> None:
    shard = root / 'train' / 'train-000002.tar'
    shard.write_bytes(shard.read_bytes()[:3000])


def _missing(root: Path) -> None:
    (root / 'val' / 'val-000001.tar').unlink()


def _classes(root: Path) -> None:
    (root / 'classes.txt').write_text('a\nb\n')


def _hf_truncate(root: Path) -> None:
    path = root / 'train' / 'data-00000-of-00002.arrow'
    path.write_bytes(path.read_bytes()[:-8])


def _no_pyarrow(root: Path) -> None:
    fake = root.parent / 'no_pyarrow' / 'pyarrow'
    fake.mkdir(parents=True)
    (fake / '__init__.py').write_text("raise ImportError('No module named pyarrow')\n")


CASES = {
    'truncated shard': ('wds', _truncate, ["shard '", "train-000002.tar'", 'truncated', 'copy it again']),
    'missing shard': ('wds', _missing, ["val-000001.tar' is missing", 'shards.json']),
    'class index': ('wds', _classes, ['outside the 2 classes of', 'class-index file does not match']),
    'hf truncated': ('hf', _hf_truncate, ["data-00000-of-00002.arrow' is truncated"]),
    'hf without pyarrow': ('hf', _no_pyarrow, ["DATA.FORMAT 'hf' needs pyarrow: pip install pyarrow"]),
}


@pytest.mark.parametrize('case', list(CASES))
def test_source_faults_are_one_line_errors(case, tmp_path, tiny_shards, request):
    fmt, damage, words = CASES[case]
    if fmt == 'wds':
        root = tmp_path / 'wds'
        shutil.copytree(tiny_shards, root)
    else:
        root = tmp_path / 'saved'
        shutil.copytree(request.getfixturevalue('hf_saved'), root)
    damage(root)
    env = subprocess_env()
    if case == 'hf without pyarrow':
        env['PYTHONPATH'] = f"{tmp_path / 'no_pyarrow'}:{env['PYTHONPATH']}"
    run = run_main(tiny_args(str(root), 'DATA.FORMAT', fmt), tmp_path, tag='case', env=env)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stderr[-3000:]
    assert len(lines) == 1 and 'Traceback' not in run.stderr, run.stderr[-3000:]
    for word in words:
        assert word in lines[0], lines[0]


def test_a_corrupt_image_in_a_shard_is_skipped_and_counted(tmp_path, tiny_shards):
    root = tmp_path / 'wds'
    shutil.copytree(tiny_shards, root)
    _rewrite(root / 'val' / 'val-000001.tar', _first('jpg', lambda name, data: [(name, data[:len(data) // 3])]))
    run = run_main(tiny_args(str(root), 'DATA.FORMAT', 'wds', 'TRAIN.EPOCHS', '2'), tmp_path, tag='corrupt').check()
    assert 'skipped unreadable image' in run.log() and 'val-000001.tar:' in run.log()
    assert '(8 images, 1 corrupt skipped)' in run.log()


def test_prepare_imagenet_refusals_are_one_line(tmp_path):
    """Through the real script: a devkit ground-truth file, a foreign tree in --out, --out inside the
    flat validation folder (nothing extracted into it) and --out naming a file."""
    from ilsvrc_archives import make_archives
    arch = make_archives(tmp_path / 'arch')
    (tmp_path / 'foreign' / 'val').mkdir(parents=True)
    (tmp_path / 'a_file').write_text('')
    val_before = sorted(p.name for p in arch.val_dir.iterdir())
    cases = (('devkit', arch.val_tar, tmp_path / 'o', 'meta.mat'),
             ('wnid', arch.val_tar, tmp_path / 'foreign', 'did not make'),
             ('wnid', arch.val_dir, arch.val_dir / 'out', 'is inside --val'),
             ('wnid', arch.val_tar, tmp_path / 'a_file', 'is a file'))
    for labels, val, out, word in cases:
        proc = subprocess.run([sys.executable, TOOL, 'folder', '--train', str(arch.train_tar), '--val',
                               str(val), '--val-labels', str(arch.labels[labels]), '--out', str(out),
                               '--any-size'], cwd=REPO, env=subprocess_env(), capture_output=True, text=True)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and word in lines[0], proc.stderr
    assert sorted(p.name for p in arch.val_dir.iterdir()) == val_before
    with tarfile.open(arch.train_tar) as tar:
        assert len(tar.getmembers()) == 4
