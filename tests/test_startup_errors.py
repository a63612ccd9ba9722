"""Start-up checks through the real entry point: every bad option, config file and dataset
layout below ends ``main.py`` with exit status 2 and one line on stderr, before any work.

The error cases share one process (``main.py`` run as ``__main__`` once per case, as
``python main.py ARGS`` does, so each start costs no interpreter and torch import); the cases
that must train (hidden folders, the advice of the class-count error) run ``python main.py``.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from conftest import DEMO_CFG, EXACT_OPTS, REPO, TINY_OPTS, run_main, run_process, subprocess_env

pytestmark = pytest.mark.slow

# Runs each argv list as `python main.py ARGV` would, in this one process; prints a JSON list of
# {rc, stderr}. An exception escaping main.py is printed as Python prints it (a traceback, rc 1).
DRIVER = r'''
import contextlib, io, json, runpy, sys, traceback
results = []
for argv in json.loads(sys.argv[1]):
    err, out = io.StringIO(), io.StringIO()
    sys.argv = ['main.py', *argv]
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            runpy.run_path('main.py', run_name='__main__')
            rc = 0
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            rc = 1
    results.append({'rc': rc, 'stderr': err.getvalue()})
print(json.dumps(results))
'''


def _yaml(folder: Path, name: str, text: str) -> str:
    path = folder / name
    path.write_text(text)
    return str(path)


def _with_link(src: str, dst: Path) -> str:
    shutil.copytree(src, dst)
    first = sorted((dst / 'train').iterdir())[0]
    (first / 'up').symlink_to('..', target_is_directory=True)
    return str(dst)


def _cases(t: Path, data: str):
    """(id, argv, words the one stderr line must hold)."""
    demo = ['--cfg', DEMO_CFG, '--output', str(t / 'out'), '--data-path', data]
    tiny = [*demo, '--opts', *TINY_OPTS, *EXACT_OPTS]
    (t / 'a.yaml').write_text("BASE: ['b.yaml']\nSEED: 1\n")
    (t / 'b.yaml').write_text("BASE: ['a.yaml']\nSEED: 2\n")
    return [
        ('batch-size-0', [*demo, '--batch-size', '0'], ["--batch-size: config key 'DATA.BATCH_SIZE' is 0", '>= 1']),
        ('batch-size-negative', [*demo, '--opts', 'DATA.BATCH_SIZE', '-2'], ["'DATA.BATCH_SIZE' is -2"]),
        ('save-freq-0', [*demo, '--opts', 'SAVE_FREQ', '0'], ["--opts: config key 'SAVE_FREQ' is 0; it must be >= 1"]),
        ('print-freq-0', [*demo, '--print-freq', '0'], ["--print-freq: config key 'PRINT_FREQ' is 0"]),
        ('accumulation-0', [*demo, '--opts', 'TRAIN.ACCUMULATION_STEPS', '0'], ["'TRAIN.ACCUMULATION_STEPS' is 0"]),
        ('num-workers-negative', [*demo, '--opts', 'DATA.NUM_WORKERS', '-1'], ["'DATA.NUM_WORKERS' is -1; it must be >= 0"]),
        ('image-too-small', [*demo, '--opts', 'DATA.IMG_SIZE', '16'], ["'DATA.IMG_SIZE' is 16; it must be >= 32 for this model"]),
        ('probability-above-1', [*demo, '--opts', 'AUG.REPROB', '2.0'], ["'AUG.REPROB' is 2.0; it must be in [0, 1]"]),
        ('warmup-not-below-epochs', [*demo, '--opts', 'TRAIN.EPOCHS', '1'], ["'TRAIN.EPOCHS' is 1; it must be > TRAIN.WARMUP_EPOCHS (1)"]),
        ('classes-disagree', [*demo, '--opts', 'MODEL.NUM_CLASSES', '3', 'MODEL.DAT.num_classes', '5'],
         ["MODEL.NUM_CLASSES is 3 but MODEL.DAT.num_classes is 5", 'give one of them']),
        ('unused-drop-path-key', [*demo, '--opts', 'MODEL.DROP_PATH_RATE', '0.3'], ["set 'MODEL.DAT.drop_path_rate'"]),
        ('base-cycle', ['--cfg', str(t / 'a.yaml'), '--data-path', data], ['BASE files include each other', 'a.yaml -> ', 'b.yaml -> ']),
        ('base-as-a-string', ['--cfg', _yaml(t, 'child.yaml', 'BASE: parent.yaml\nSEED: 1\n'), '--data-path', data],
         [_yaml(t, 'parent.yaml', 'SAVE_FREQ: 0\n') + ": config key 'SAVE_FREQ' is 0"]),   # the base was read
        ('yaml-error', ['--cfg', _yaml(t, 'broken.yaml', 'TRAIN:\n  EPOCHS: [3\n'), '--data-path', data],
         ['broken.yaml, line 3, column 1: not valid YAML']),
        ('yaml-duplicate-key', ['--cfg', _yaml(t, 'twice.yaml', 'SEED: 1\nSEED: 2\n'), '--data-path', data],
         ["twice.yaml, line 2, column 1", "key 'SEED' appears twice (first on line 1)"]),
        ('empty-yaml', ['--cfg', _yaml(t, 'empty.yaml', '# nothing yet\n'), '--data-path', data],
         ['empty.yaml: the file is empty', 'configs/dat_tiny.yaml']),
        ('symlink-loop', ['--cfg', DEMO_CFG, '--output', str(t / 'out'), '--data-path',
                          _with_link(data, t / 'looped'), '--opts', *TINY_OPTS, *EXACT_OPTS, 'MODEL.NUM_CLASSES', '3'],
         ["/up' leads to ", 'already part of the split', 'remove or replace that link']),
        ('more-classes-than-head', [*tiny, 'MODEL.NUM_CLASSES', '2'],
         ['the dataset has 3 classes but MODEL.NUM_CLASSES is 2', '--opts MODEL.NUM_CLASSES 3']),
    ]


def test_startup_errors_are_one_line_exit_2(tmp_path, tiny_data):
    cases = _cases(tmp_path, tiny_data)
    proc = run_process([sys.executable, '-c', DRIVER, json.dumps([argv for _, argv, _ in cases])], REPO,
                       subprocess_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    failures = []
    for (case_id, _, words), result in zip(cases, results):
        lines = [line for line in result['stderr'].splitlines() if line.strip()]
        ok = (result['rc'] == 2 and 'Traceback' not in result['stderr'] and len(lines) == 1
              and lines[0].startswith('error: ') and all(w in lines[0] for w in words))
        if not ok:
            failures.append(f"{case_id}: rc {result['rc']}, stderr {result['stderr'][-800:]!r}")
    assert not failures, '\n'.join(failures)
    assert not list((tmp_path / 'out').rglob('*.pth'))            # nothing was trained or saved


def test_hidden_folders_and_the_class_count_advice_train(tmp_path, tiny_data):
    """`.ipynb_checkpoints` in train/ and val/ is no class; following the class-count error's
    advice (only MODEL.NUM_CLASSES, while the config file sets MODEL.DAT.num_classes 4) trains."""
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data)
    for split in ('train', 'val'):
        hidden = data / split / '.ipynb_checkpoints'
        hidden.mkdir()
        shutil.copy(next((data / split).glob('*/*.JPEG')), hidden / 'copy.JPEG')
    run = run_main(['--data-path', str(data), '--opts', *TINY_OPTS, *EXACT_OPTS, 'TRAIN.EPOCHS', '2',
                    'MODEL.NUM_CLASSES', '3'], tmp_path / 'out').check()
    assert 'in 3 classes' in run.log() and 'Traceback' not in run.stderr
    assert len(run.accuracies()) == 2
