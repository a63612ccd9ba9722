"""Training observability: TensorBoard scalars on disk, and EMA weights that train, save and
resume exactly."""
from __future__ import annotations

import shutil

import pytest
import torch

from conftest import MODEL_NAME, load_ckpt, run_main, tiny_args

pytestmark = pytest.mark.slow       # starts real main.py processes

EPOCHS = 2
EMA_OPTS = ('TRAIN.EMA.ENABLE', 'True', 'TRAIN.EMA.DECAY', '0.9', 'TRAIN.EPOCHS', str(EPOCHS),
            'TRAIN.KEEP_CHECKPOINTS', '0')


def _scalar_tags(log_dir) -> set:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return set(acc.Tags()['scalars'])


def test_tensorboard_scalars_and_ema(tmp_path, tiny_data):
    run = run_main(tiny_args(tiny_data, 'TENSORBOARD', 'True', *EMA_OPTS), tmp_path, tag='obs').check()
    events = list((run.output / 'tensorboard').glob('events.out.tfevents.*'))
    assert events, 'no TensorBoard event file written'
    tags = _scalar_tags(run.output / 'tensorboard')
    expected = {'train/loss', 'train/lr', 'train/grad_norm', 'train/throughput', 'train/memory_mb',
                'val/acc1', 'val/acc5', 'val/loss', 'val_ema/acc1'}
    assert expected <= tags, f'missing scalars: {sorted(expected - tags)}'

    ckpt = load_ckpt(run.output / f'ckpt_epoch_{EPOCHS - 1}.pth')
    assert ckpt['ema'].keys() == ckpt['model'].keys()
    differs = [k for k, v in ckpt['model'].items() if v.is_floating_point() and not torch.equal(v, ckpt['ema'][k])]
    assert differs, 'EMA weights equal the live weights after training'


def test_ema_resumes_exactly(tmp_path, tiny_data):
    straight = run_main(tiny_args(tiny_data, *EMA_OPTS), tmp_path, tag='straight').check()
    resumed_dir = tmp_path / MODEL_NAME / 'resumed'
    resumed_dir.mkdir(parents=True)
    shutil.copy(straight.output / 'ckpt_epoch_0.pth', resumed_dir)
    resumed = run_main(tiny_args(tiny_data, *EMA_OPTS), tmp_path, tag='resumed').check()
    assert 'resumed: epoch 1' in resumed.log()
    a = load_ckpt(straight.output / f'ckpt_epoch_{EPOCHS - 1}.pth')
    b = load_ckpt(resumed.output / f'ckpt_epoch_{EPOCHS - 1}.pth')
    for k in a['ema']:
        assert torch.equal(a['ema'][k], b['ema'][k]), f'EMA tensor {k} differs after resume'
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), f'model tensor {k} differs after resume'
