"""The demo config trains on the demo dataset on the CPU and learns; evaluating its checkpoint
(ours or an official-format ``{'model': ...}`` file) reproduces the accuracy training logged;
a checkpoint trained at 64x64 fine-tunes at 96x96 with every parameter loaded; and
``--throughput`` times forward passes without a dataset."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from conftest import ACC_DETAIL, ACC_LINE, Run, load_ckpt, run_main

pytestmark = pytest.mark.slow       # starts real main.py processes

CHANCE = 25.0           # 4 balanced classes
N_VAL = 128


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory, demo_data) -> Run:
    """``python main.py --cfg configs/demo.yaml --data-path DEMO`` as a user would run it."""
    out = tmp_path_factory.mktemp('demo_train')
    return run_main(['--data-path', demo_data, '--opts', 'TENSORBOARD', 'False'], out, tag='demo',
                    timeout=900).check()


def _last_checkpoint(run: Run):
    epochs = [int(m.group(1)) for p in run.output.glob('ckpt_epoch_*.pth')
              if (m := re.fullmatch(r'ckpt_epoch_(\d+)\.pth', p.name))]
    return run.output / f'ckpt_epoch_{max(epochs)}.pth'


def test_demo_training_learns(demo_run):
    rows = demo_run.metrics()
    assert len(rows) >= 3
    first, last = rows[0], rows[-1]
    print('demo run:', [(r['epoch'], round(r['train_loss'], 3), r['val_acc1']) for r in rows],
          f'{demo_run.seconds:.0f}s')
    assert last['train_loss'] < first['train_loss'] - 0.2
    assert last['val_images'] == N_VAL
    assert last['val_acc1'] >= CHANCE + 25.0
    assert demo_run.accuracies()[-1] == pytest.approx(last['val_acc1'], abs=0.01)


def test_eval_reproduces_the_logged_accuracy(demo_run, tmp_path, demo_data):
    ckpt = _last_checkpoint(demo_run)
    run = run_main(['--eval', '--resume', str(ckpt), '--data-path', demo_data], tmp_path, tag='eval').check()
    # Top-1, top-5, loss and image count as logged by training after its last epoch.
    assert ACC_DETAIL.findall(run.stdout) == ACC_DETAIL.findall(demo_run.stdout)[-1:]
    assert ACC_LINE.findall(run.stdout) == ACC_LINE.findall(demo_run.stdout)[-1:]


def test_official_format_checkpoint_evaluates_the_same(demo_run, tmp_path, demo_data):
    official = tmp_path / 'dat_demo_official.pth'
    torch.save({'model': load_ckpt(_last_checkpoint(demo_run))['model']}, official)
    run = run_main(['--eval', '--resume', str(official), '--data-path', demo_data], tmp_path,
                   tag='official').check()
    assert ACC_DETAIL.findall(run.stdout) == ACC_DETAIL.findall(demo_run.stdout)[-1:]


def test_finetune_at_a_larger_size_loads_every_parameter(demo_run, tmp_path, demo_small):
    pretrained = _last_checkpoint(demo_run)
    # Learning rate 0: the fine-tuned checkpoint then shows exactly what was loaded.
    run = run_main(['--pretrained', str(pretrained), '--data-path', demo_small, '--opts',
                    'DATA.IMG_SIZE', '96', 'MODEL.DAT.img_size', '96', 'TRAIN.EPOCHS', '1',
                    'TRAIN.WARMUP_EPOCHS', '0', 'TRAIN.BASE_LR', '0.0', 'TRAIN.WARMUP_LR', '0.0',
                    'TRAIN.MIN_LR', '0.0', 'TENSORBOARD', 'False', 'TRAIN.EMA.ENABLE', 'True'],
                   tmp_path, tag='ft96').check()
    assert 'loaded pretrained weights' in run.log()
    assert 'Accuracy of the network on the 64 test images' in run.stdout     # demo_small's val set

    before = load_ckpt(pretrained)['model']
    saved = load_ckpt(run.output / 'ckpt_epoch_0.pth')
    after = saved['model']
    assert before.keys() == after.keys()
    # The EMA started from the fine-tuned model's weights, not from a fresh initialisation.
    assert all(torch.equal(saved['ema'][k], v) for k, v in after.items())
    resized = []
    for name, old in before.items():
        new = after[name]
        if old.shape == new.shape:
            assert torch.equal(old, new), f'{name} was not loaded'
            continue
        # Only position tables depend on the resolution: (heads, 2f-1, 2f-1), f = 16 -> 24 in stage 0.
        assert name.endswith('.rpe_table'), f'{name} changed shape {tuple(old.shape)} -> {tuple(new.shape)}'
        assert new.shape[0] == old.shape[0] and new.shape[1] == new.shape[2] == (old.shape[1] + 1) * 3 // 2 - 1
        assert f'resized {name} from' in run.log()
        # The resized table is the old one, interpolated: scaled back it is close to the original.
        back = F.interpolate(new[None], size=old.shape[1:], mode='bilinear', align_corners=True)[0]
        corr = torch.corrcoef(torch.stack([back.flatten(), old.flatten()]))[0, 1]
        assert corr > 0.9, f'{name}: resized table does not follow the pretrained one ({corr:.2f})'
        resized.append(name)
    assert resized, 'no position table needed resizing'


def test_throughput_needs_no_dataset(tmp_path):
    run = run_main(['--throughput', '--opts', 'DATA.BATCH_SIZE', '4'], tmp_path, tag='speed').check()
    (rate,) = re.findall(r'batch_size 4 throughput ([\d.]+) images/s \(cpu\)', run.stdout)
    assert float(rate) > 0
    assert not list(run.output.glob('*.pth'))       # nothing trained, nothing saved
