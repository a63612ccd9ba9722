"""tools/prepare_imagenet.py on small archives with the official structure: the ImageFolder tree
it makes (each accepted input and labels form), its refusals (one line, exit 2), reruns after it
finished or was interrupted, and the tar shards it writes."""
from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import REPO, kill_group, mounted_tmpfs, subprocess_env, wait_for
from ilsvrc_archives import expected_tree, make_archives, tree_files

sys.path.insert(0, str(REPO / 'tools'))
import prepare_imagenet  # noqa: E402

TOOL = str(REPO / 'tools' / 'prepare_imagenet.py')


@pytest.fixture(scope='module')
def arch(tmp_path_factory):
    return make_archives(tmp_path_factory.mktemp('ilsvrc'))


def _folder_args(arch, out, labels='wnid', train=None, val=None, *extra):
    return ['folder', '--train', str(train or arch.train_tar), '--val', str(val or arch.val_tar),
            '--val-labels', str(arch.labels[labels]), '--out', str(out), '--any-size', *extra]


def _run(capsys, args):
    code = prepare_imagenet.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def _error(capsys, args) -> str:
    code, _, err = _run(capsys, args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), err
    return lines[0]


def _tree(out: Path):
    return {k: v for k, v in tree_files(out).items() if not k.startswith('.')}


@pytest.mark.parametrize('labels', ['wnid', 'index', 'kaggle'])
@pytest.mark.parametrize('source', ['tars', 'folders'])
def test_archives_become_the_imagefolder_tree(tmp_path, capsys, arch, labels, source):
    out = tmp_path / 'imagenet'
    train, val = (arch.train_tar, arch.val_tar) if source == 'tars' else (arch.train_dir, arch.val_dir)
    code, stdout, err = _run(capsys, _folder_args(arch, out, labels, train, val))
    assert code == 0, err
    assert _tree(out) == expected_tree(arch)
    marker = json.loads((out / prepare_imagenet.FOLDER_MARKER).read_text())
    assert (marker['classes'], marker['train_images'], marker['val_images']) == (4, 12, 8)
    assert sorted(p.name for p in out.iterdir()) == ['.prepare_imagenet.json', 'train', 'val']


def test_the_counts_are_checked(tmp_path, capsys, arch):
    args = _folder_args(arch, tmp_path / 'o', 'wnid')[:-1]          # without --any-size
    assert 'training classes: found 4, expected 1000' in _error(capsys, args)
    assert 'training images: found 12, expected 13' in _error(
        capsys, args + ['--expect-classes', '4', '--expect-train', '13'])
    assert 'validation images: found 8, expected 9' in _error(
        capsys, args + ['--expect-classes', '4', '--expect-train', '12', '--expect-val', '9'])
    code, _, err = _run(capsys, args + ['--expect-classes', '4', '--expect-train', '12', '--expect-val', '8'])
    assert code == 0, err


def test_a_finished_tree_is_never_overwritten(tmp_path, capsys, arch):
    out = tmp_path / 'o'
    assert _run(capsys, _folder_args(arch, out))[0] == 0
    before = tree_files(out)
    code, stdout, _ = _run(capsys, _folder_args(arch, out))            # the same command: a no-op
    assert code == 0 and 'already complete' in stdout
    assert 'made from other inputs' in _error(capsys, _folder_args(arch, out, 'index'))
    assert tree_files(out) == before
    foreign = tmp_path / 'foreign'
    (foreign / 'train' / 'cls').mkdir(parents=True)
    assert 'this tool did not make' in _error(capsys, _folder_args(arch, foreign))
    assert [p.name for p in foreign.iterdir()] == ['train']


def test_the_output_is_a_folder_outside_every_input(tmp_path, capsys, arch):
    train, val = tmp_path / 'train_tars', tmp_path / 'val_flat'
    shutil.copytree(arch.train_dir, train)
    shutil.copytree(arch.val_dir, val)
    (tmp_path / 'afile').write_text('')
    before = tree_files(tmp_path)
    for out, flag in ((val / 'out', 'is inside --val'), (val, 'is --val'), (train / 'x', 'is inside --train')):
        assert flag in _error(capsys, _folder_args(arch, out, 'wnid', train, val))
    assert 'is a file' in _error(capsys, _folder_args(arch, tmp_path / 'afile', 'wnid', train, val))
    assert tree_files(tmp_path) == before                                # nothing written anywhere
    tree = tmp_path / 'tree'
    assert _run(capsys, _folder_args(arch, tree, 'wnid', train, val))[0] == 0
    assert 'is inside --folder train/' in _error(capsys, ['shards', '--folder', str(tree), '--out', str(tree / 'train' / 's')])
    assert _run(capsys, ['shards', '--folder', str(tree), '--out', str(tree / 'shards')])[0] == 0


def test_labels_that_do_not_match_are_one_line_errors(tmp_path, capsys, arch):
    assert 'meta.mat' in _error(capsys, _folder_args(arch, tmp_path / 'a', 'devkit'))
    bad = {
        'unknown': ('ILSVRC2012_val_00000001.JPEG n09999999\n', 'is not among the 4 training classes'),
        'index': ('ILSVRC2012_val_00000001.JPEG 4\n', 'class index 4 but the training archive has 4'),
        'twice': ('ILSVRC2012_val_00000001.JPEG 0\nILSVRC2012_val_00000001 1\n', 'two classes'),
        'missing': ('ILSVRC2012_val_00000001.JPEG 0\n', "has no line in --val-labels"),
        'garbled': ('ILSVRC2012_val_00000001.JPEG\n', "is not 'FILE WNID'"),
    }
    for name, (text, message) in bad.items():
        arch.labels[name] = tmp_path / f'{name}.txt'
        arch.labels[name].write_text(text)
        assert message in _error(capsys, _folder_args(arch, tmp_path / name, name)), name
        assert not (tmp_path / name / 'val').exists()
    # Labels for images the validation set lacks: refused when the counts are checked.
    arch.labels['extra'] = tmp_path / 'extra.txt'
    arch.labels['extra'].write_text(arch.labels['wnid'].read_text() + f'ILSVRC2012_val_00000099.JPEG {arch.classes[0]}\n')
    strict = _folder_args(arch, tmp_path / 'extra', 'extra')[:-1] + [
        '--expect-classes', '4', '--expect-train', '12', '--expect-val', '8']
    assert 'names 1 images that are not among the validation images' in _error(capsys, strict)


def test_damaged_archives_are_one_line_errors(tmp_path, capsys, arch):
    data = arch.train_tar.read_bytes()
    cut = tmp_path / 'cut.tar'
    cut.write_bytes(data[:len(data) // 2 + 100])
    message = _error(capsys, _folder_args(arch, tmp_path / 'a', train=cut))
    assert 'truncated' in message and 're-download' in message
    other = tmp_path / 'other.tar'
    with tarfile.open(other, 'w') as tar:
        tar.add(arch.labels['wnid'], arcname='README.txt')
    assert 'not a per-class tar' in _error(capsys, _folder_args(arch, tmp_path / 'b', train=other))


def test_member_names_cannot_escape_the_class_folder(tmp_path, capsys, arch):
    evil_dir = tmp_path / 'evil_tars'
    evil_dir.mkdir()
    for wnid in arch.classes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode='w') as inner:
            for name in ('../../escaped.JPEG', f'/abs/{wnid}_1.JPEG'):
                info = tarfile.TarInfo(name)
                info.size = 3
                inner.addfile(info, io.BytesIO(b'abc'))
        (evil_dir / f'{wnid}.tar').write_bytes(buf.getvalue())
    out = tmp_path / 'o'
    assert _run(capsys, _folder_args(arch, out, train=evil_dir))[0] == 0
    assert sorted(p.name for p in (out / 'train' / arch.classes[0]).iterdir()) == [
        'escaped.JPEG', f'{arch.classes[0]}_1.JPEG']
    escaped = sorted(tmp_path.glob('**/escaped.JPEG'))
    assert escaped == sorted(out / 'train' / wnid / 'escaped.JPEG' for wnid in arch.classes)


def test_an_interrupted_run_continues_where_it_stopped(tmp_path, capsys, arch, monkeypatch):
    out = tmp_path / 'o'
    real_copy = prepare_imagenet._copy_to
    calls = {'n': 0}

    def dying_copy(src, path):
        calls['n'] += 1
        if calls['n'] == 17:                    # inside the validation images
            raise KeyboardInterrupt
        real_copy(src, path)

    monkeypatch.setattr(prepare_imagenet, '_copy_to', dying_copy)
    with pytest.raises(KeyboardInterrupt):
        prepare_imagenet.main(_folder_args(arch, out))
    assert (out / 'train').is_dir() and (out / 'val.partial').is_dir() and not (out / 'val').exists()
    assert not (out / prepare_imagenet.FOLDER_MARKER).exists()
    monkeypatch.setattr(prepare_imagenet, '_copy_to', real_copy)
    assert 'made from other inputs' not in _run(capsys, _folder_args(arch, out, 'index'))[2]
    code, _, err = _run(capsys, _folder_args(arch, out))
    assert code == 0, err
    assert _tree(out) == expected_tree(arch)


def test_shards_hold_every_image_with_its_label(tmp_path, capsys, arch):
    out, shards = tmp_path / 'o', tmp_path / 'wds'
    assert _run(capsys, _folder_args(arch, out, 'wnid', None, None, '--shards', str(shards),
                                     '--shard-size', '5'))[0] == 0
    assert (shards / 'classes.txt').read_text().split() == arch.classes
    manifest = json.loads((shards / 'shards.json').read_text())
    assert [e['samples'] for e in manifest['train']] == [5, 5, 2]
    assert [e['samples'] for e in manifest['val']] == [5, 3]
    for split, files in (('train', arch.train_files), ('val', arch.val_files)):
        found = {}
        for path in sorted((shards / split).glob('*.tar')):
            with tarfile.open(path) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
            for name, data in members.items():
                if name.endswith('.jpg'):
                    key = name[:-4]
                    found[key] = (data, int(members[key + '.cls']))
        expected = {f'{wnid}/{name[:-5]}': (data, arch.classes.index(wnid))
                    for wnid, named in files.items() for name, data in named.items()}
        assert found == expected
    before = tree_files(shards)
    code, stdout, _ = _run(capsys, ['shards', '--folder', str(out), '--out', str(shards), '--shard-size', '5'])
    assert code == 0 and 'already complete' in stdout
    assert 'made from other inputs' in _error(capsys, ['shards', '--folder', str(out), '--out', str(shards),
                                                       '--shard-size', '4'])
    assert tree_files(shards) == before


@pytest.mark.slow
def test_killed_mid_run_then_rerun_gives_the_same_tree(tmp_path):
    """SIGKILL to the real script's process group part-way, then the same command again."""
    arch = make_archives(tmp_path / 'arch', classes=30, train_per_class=40, val_per_class=5, size=32)
    out, shards = tmp_path / 'o', tmp_path / 'wds'
    cmd = [sys.executable, TOOL, *_folder_args(arch, out, 'index', None, None, '--shards', str(shards),
                                               '--shard-size', '64')]
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        done = out / 'train.partial'
        assert wait_for(lambda: done.is_dir() and len([p for p in done.iterdir() if p.name.startswith('n')]) >= 3,
                        timeout=120, interval=0.005, proc=proc)
        assert proc.poll() is None, 'the run finished before it could be interrupted'
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        kill_group(proc)
    assert not (out / prepare_imagenet.FOLDER_MARKER).exists() and not (out / 'train').exists()
    rerun = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert _tree(out) == expected_tree(arch)
    assert sum(1 for p in (out / 'train').iterdir()) == 30
    # The shards equal those of an uninterrupted run, byte for byte.
    fresh = tmp_path / 'wds_fresh'
    again = subprocess.run([sys.executable, TOOL, 'shards', '--folder', str(out), '--out', str(fresh),
                            '--shard-size', '64'], cwd=REPO, env=subprocess_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert {k: v for k, v in tree_files(shards).items() if k != 'shards.json'} == \
        {k: v for k, v in tree_files(fresh).items() if k != 'shards.json'}
    final = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert final.returncode == 0 and final.stdout.count('already complete') == 2, final.stdout


@pytest.fixture
def small_disk(tmp_path):
    """A 600 kB tmpfs (a real full filesystem), enlarged by the test with ``mount -o remount``."""
    with mounted_tmpfs(tmp_path / 'disk', '600k') as mount:
        yield mount


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_rerun_continues(tmp_path, small_disk):
    arch = make_archives(tmp_path / 'arch', classes=6, train_per_class=60, val_per_class=4)
    out = small_disk / 'imagenet'
    cmd = [sys.executable, TOOL, *_folder_args(arch, out, 'wnid', None, None, '--shards', str(small_disk / 'wds'))]
    full = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert full.returncode == 2, full.stderr
    lines = full.stderr.strip().splitlines()
    assert len(lines) == 1 and 'No space left on device' in lines[0] and 'rerun the same command' in lines[0]
    assert not (out / 'train').exists() and not list(out.rglob('*.part'))
    grown = subprocess.run(['mount', '-o', 'remount,size=20m', str(small_disk)], capture_output=True, text=True)
    assert grown.returncode == 0, grown.stderr
    rerun = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert _tree(out) == expected_tree(arch)
    assert (small_disk / 'wds' / 'shards.json').is_file()


def test_shuffled_shards_hold_the_same_samples_in_a_fixed_order(tmp_path, capsys, arch):
    out = tmp_path / 'o'
    assert _run(capsys, _folder_args(arch, out))[0] == 0

    def members(shards):
        names = []
        for path in sorted((shards / 'train').glob('*.tar')):
            with tarfile.open(path) as tar:
                names += [m.name for m in tar.getmembers() if m.name.endswith('.jpg')]
        return names
    runs = []
    for name, seed in (('a', '3'), ('b', '3'), ('plain', None)):
        args = ['shards', '--folder', str(out), '--out', str(tmp_path / name), '--shard-size', '5']
        assert _run(capsys, args + (['--shuffle-seed', seed] if seed else []))[0] == 0
        runs.append(members(tmp_path / name))
    assert runs[0] == runs[1] != runs[2] and sorted(runs[0]) == sorted(runs[2]) == runs[2]
    assert 'shard-size must be >= 1' in _error(capsys, ['shards', '--folder', str(out), '--out',
                                                        str(tmp_path / 'z'), '--shard-size', '0'])
