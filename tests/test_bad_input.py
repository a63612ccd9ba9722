"""Mistakes a user can make end in one clear line on stderr (exit status 2; 3 for a diverged
run), never a traceback, and never damage what an earlier run saved in the output folder."""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import List

import pytest
import torch

from conftest import MODEL_NAME, REPO, TINY_OPTS, file_digests, load_ckpt, run_main, tiny_args

sys.path.insert(0, str(REPO))
from checkpoint import LOCK_NAME  # noqa: E402

pytestmark = pytest.mark.slow       # starts real main.py processes

TAG = 'case'


def _copy_tree(src: str, dst: Path, rename_last_val_class: bool = False, drop: str = '') -> str:
    shutil.copytree(src, dst)
    if drop:
        shutil.rmtree(dst / drop)
    if rename_last_val_class:
        last = sorted((dst / 'val').iterdir())[-1]
        last.rename(dst / 'val' / 'n9999_other')
        (dst / 'renamed').write_text(last.name)
    return str(dst)


def _edited_checkpoint(path: Path, good: Path, edit) -> str:
    """A copy of ``good`` with ``edit(model_state_dict)`` applied to its weights."""
    ckpt = load_ckpt(good)
    edit(ckpt['model'])
    torch.save(ckpt, path)
    return str(path)


def _nan_weights(sd):
    sd['cls_head.weight'][0, 0] = float('nan')


def _integer_weights(sd):
    sd['cls_head.weight'] = (sd['cls_head.weight'] * 100).long()


def _file(path: Path) -> str:
    path.write_text('not a folder')
    return str(path)


def _newest_is_a_directory(good: Path, args: List[str]) -> List[str]:
    (good.parent / 'ckpt_epoch_1.pth').mkdir()
    return args


def _unsafe_checkpoint(path: Path, good: Path) -> str:
    # Like the official release files: weights plus a pickled Python object.
    torch.save({'model': load_ckpt(good)['model'], 'args': argparse.Namespace(lr=0.1)}, path)
    return str(path)


# (id, args(tmp_path, tiny_data, saved_checkpoint) -> argv, exit status, words in the message)
CASES: List[tuple] = [
    ('data-path-missing',
     lambda t, d, c: tiny_args(str(t / 'nowhere')), 2,
     ["data path", "nowhere", "does not exist", "--data-path"]),
    ('data-path-unset',
     lambda t, d, c: ['--opts', *TINY_OPTS], 2,
     ["DATA.DATA_PATH is empty", "--data-path", "DAT_DATA_PATH"]),
    ('no-val-folder',
     lambda t, d, c: tiny_args(_copy_tree(d, t / 'noval', drop='val')), 2,
     ["has no 'val/' folder"]),
    ('class-folders-differ',
     lambda t, d, c: tiny_args(_copy_tree(d, t / 'differ', rename_last_val_class=True)), 2,
     ["class folders differ", "only in train/: {renamed}", "only in val/: n9999_other"]),
    ('unknown-config-key',
     lambda t, d, c: tiny_args(d, 'TRAIN.EPOCH', '3'), 2,
     ["unknown config key 'TRAIN.EPOCH'", "did you mean 'TRAIN.EPOCHS'"]),
    ('wrong-value-type',
     lambda t, d, c: tiny_args(d, 'TRAIN.EPOCHS', 'many'), 2,
     ["'TRAIN.EPOCHS' expects int", "'many'"]),
    ('checkpoint-not-found',
     lambda t, d, c: ['--eval', '--resume', str(t / 'missing.pth'), *tiny_args(d)], 2,
     ["checkpoint not found", "missing.pth"]),
    ('checkpoint-other-architecture',   # auto-resume finds the tiny model's checkpoint; the demo model is wider
     lambda t, d, c: ['--data-path', d, '--opts', 'MODEL.NUM_CLASSES', '3', 'MODEL.DAT.num_classes', '3',
                      'DATA.BATCH_SIZE', '4', 'DATA.NUM_WORKERS', '0', 'TENSORBOARD', 'False'], 2,
     ["does not fit the model", "with another shape", "patch_proj.0.weight checkpoint (4, 3, 3, 3) vs model (16, 3, 3, 3)"]),
    ('checkpoint-needs-unpickling',
     lambda t, d, c: ['--eval', '--resume', _unsafe_checkpoint(t / 'official.pth', c), *tiny_args(d)], 2,
     ["refused", "argparse.Namespace", "tools/convert_checkpoint.py"]),
    # -- checkpoints that do not match the run
    ('resume-other-deform-arith',      # auto-resume finds a DAT++ checkpoint; the config asks for v1 arithmetic
     lambda t, d, c: tiny_args(d, 'MODEL.DAT.deform_arith', 'v1'), 2,
     ["ckpt_epoch_0.pth was trained with another model", "MODEL.DAT.deform_arith 'pp' in the checkpoint, 'v1' here",
      "--opts MODEL.DAT.deform_arith pp"]),
    ('eval-other-deform-arith',
     lambda t, d, c: ['--eval', '--resume', str(c), *tiny_args(d, 'MODEL.DAT.deform_arith', 'v1')], 2,
     ["was trained with another model", "MODEL.DAT.deform_arith 'pp' in the checkpoint, 'v1' here"]),
    ('pretrained-other-offset-range',  # same parameter shapes, other deformable offsets
     lambda t, d, c: ['--pretrained', str(c), '--tag', 'finetune',
                      *tiny_args(d, 'MODEL.DAT.offset_range_factor', '[1,2,3,4]')], 2,
     ["pretrained checkpoint", "was trained with another model",
      "MODEL.DAT.offset_range_factor [-1, -1, -1, -1] in the checkpoint, [1, 2, 3, 4] here"]),
    ('eval-nan-weights',
     lambda t, d, c: ['--eval', '--resume', _edited_checkpoint(t / 'nan.pth', c, _nan_weights), *tiny_args(d)], 2,
     ["nan.pth has NaN or inf values in 1 tensors: cls_head.weight", "use an earlier checkpoint"]),
    ('eval-integer-weights',
     lambda t, d, c: ['--eval', '--resume', _edited_checkpoint(t / 'int.pth', c, _integer_weights), *tiny_args(d)], 2,
     ["int.pth has 1 tensors of another kind than the model's: cls_head.weight torch.int64 (model torch.float32)"]),
    ('resume-other-optimizer',
     lambda t, d, c: tiny_args(d, 'TRAIN.OPTIMIZER.NAME', 'sgd'), 2,
     ["saved by optimizer AdamW, this run uses SGD", "--pretrained", "ckpt_epoch_0.pth", "another --tag"]),
    ('unreadable-newest-checkpoint',   # open() fails (EISDIR): not damage, so no fall-back and no pruning
     lambda t, d, c: _newest_is_a_directory(c, tiny_args(d)), 2,
     ["cannot read checkpoint", "ckpt_epoch_1.pth: Is a directory", "nothing was deleted"]),
    ('eval-resume-of-a-folder',        # e.g. the data folder: the fix must not be to delete it
     lambda t, d, c: ['--eval', '--resume', d, *tiny_args(d)], 2,
     ["cannot read checkpoint", "Is a directory", "pass the checkpoint file itself", "nothing was deleted"]),
    # -- output folder
    ('output-is-a-file',
     lambda t, d, c: [*tiny_args(d), '--output', _file(t / 'a_file')], 2,
     ["cannot create output folder", "a_file", "choose another --output"]),
    ('output-under-proc',
     lambda t, d, c: [*tiny_args(d), '--output', '/proc/dat_output'], 2,
     ["cannot create output folder /proc/dat_output/", "choose another --output"]),
    ('input-size-incompatible',        # a stride-16 deformable block on a 16x16 first stage: 1x1 keys
     lambda t, d, c: tiny_args(d, 'MODEL.DAT.strides', '[16,2,2,1]'), 2,
     ["DATA.IMG_SIZE 64", "deformable attention (stride 16) got a 1x1 key grid"]),
    ('loss-diverges',                  # resumes from the good checkpoint, then a huge learning rate
     lambda t, d, c: tiny_args(d, 'TRAIN.BASE_LR', '1e8', 'TRAIN.MAX_NONFINITE_STEPS', '3'), 3,
     ["loss was non-finite for 3 optimizer steps in a row", "stopped without saving",
      "Last good checkpoint:", "ckpt_epoch_0.pth", "Lower TRAIN.BASE_LR"]),
]


@pytest.mark.parametrize('case_id, make_args, status, words', CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_harmless(case_id, make_args, status, words, tmp_path, tiny_data,
                                            tiny_reference):
    # What an earlier run left in the output folder: a good checkpoint (epoch 0 of the tiny run).
    out_dir = tmp_path / 'out' / MODEL_NAME / TAG
    out_dir.mkdir(parents=True)
    good = out_dir / 'ckpt_epoch_0.pth'
    shutil.copy(tiny_reference.output / 'ckpt_epoch_0.pth', good)
    shutil.copy(tiny_reference.output / 'config.yaml', out_dir)
    before = file_digests(out_dir)

    run = run_main(make_args(tmp_path, tiny_data, good), tmp_path / 'out', tag=TAG)

    assert run.returncode == status, run.stderr[-3000:]
    assert 'Traceback' not in run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    message = lines[-1]
    assert message.startswith('error: '), run.stderr[-2000:]
    renamed = tmp_path / 'differ' / 'renamed'
    for word in words:
        word = word.format(renamed=renamed.read_text() if renamed.exists() else '')
        assert word in message, f"{word!r} not in {message!r}"
    # Nothing saved before was changed, and no checkpoint was added. (A run that got as far as
    # training records its own config.yaml; the checkpoints are what must stay untouched.)
    skip = ('config.yaml',) if status == 3 else ()
    skip += (LOCK_NAME,)              # the run lock: taken by a run that got as far as resuming
    assert file_digests(out_dir, skip) == {k: v for k, v in before.items() if k not in skip}
    assert load_ckpt(good)['epoch'] == 0
    assert not [p for p in out_dir.iterdir() if p.name.endswith('.tmp')]


def test_diverged_run_resumes_from_the_kept_checkpoint(tmp_path, tiny_data, tiny_reference):
    """After the stop, the same command with a sane learning rate continues from the kept state."""
    out_dir = tmp_path / MODEL_NAME / TAG
    out_dir.mkdir(parents=True)
    shutil.copy(tiny_reference.output / 'ckpt_epoch_0.pth', out_dir)
    bad = run_main(tiny_args(tiny_data, 'TRAIN.BASE_LR', '1e8', 'TRAIN.MAX_NONFINITE_STEPS', '2',
                             'TRAIN.EPOCHS', '2'), tmp_path, tag=TAG)
    assert bad.returncode == 3
    assert 'non-finite loss at epoch 1' in bad.stdout
    good = run_main(tiny_args(tiny_data, 'TRAIN.EPOCHS', '2'), tmp_path, tag=TAG).check()
    assert 'resumed: epoch 1, iteration 0' in good.log()
    final = load_ckpt(out_dir / 'ckpt_epoch_1.pth')
    assert all(torch.isfinite(t).all() for t in final['model'].values() if t.is_floating_point())
