"""``MODEL.TYPE: timm``: any timm architecture through the training pipeline; the DaViT configs."""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config import load_config  # noqa: E402
from conftest import (DEMO_CFG, EXACT_OPTS, REPO, Run, assert_same_training_state, free_port, load_ckpt,  # noqa: E402
                      run_main, run_process, subprocess_env)
from models import build_model  # noqa: E402
from tools.flops import count_flops  # noqa: E402

DAVIT = {   # davit_facts.md: timm's parameter counts, README GFLOPs and top-1
    'davit_tiny': (28_360_168, 4.5, 82.8),
    'davit_small': (49_745_896, 8.8, 84.2),
    'davit_base': (87_954_408, 15.5, 84.6),
}


def timm_config(*opts: str):
    return load_config(DEMO_CFG, opts=['MODEL.TYPE', 'timm', *opts])


# ----------------------------------------------------------------------------- building
def test_run_settings_reach_the_timm_model() -> None:
    model = build_model(timm_config('MODEL.TIMM.NAME', 'test_resnet', 'MODEL.NUM_CLASSES', '3',
                                    'MODEL.TIMM.DROP_PATH_RATE', '0.2'))
    assert model.num_classes == 3 and model.get_classifier().out_features == 3
    assert max(getattr(m, 'drop_prob', 0.0) for m in model.modules()) == pytest.approx(0.2)


def test_kwargs_reach_the_model_and_win() -> None:
    config = timm_config('MODEL.TIMM.NAME', 'test_vit', 'MODEL.TIMM.KWARGS.img_size', '64',
                         'MODEL.TIMM.KWARGS.num_classes', '7', 'MODEL.TIMM.DROP_PATH_RATE', 'None')
    assert dict(config.MODEL.TIMM.KWARGS) == {'img_size': 64, 'num_classes': 7}
    model = build_model(config)
    assert model.num_classes == 7
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 7)


@pytest.mark.parametrize('opts,message', [
    (['MODEL.TIMM.NAME', 'davit_tinyy'], r"'davit_tinyy' is not a timm model; did you mean davit_tiny"),
    (['MODEL.TIMM.NAME', ''], r"'' is not a timm model; see timm.list_models"),
    (['MODEL.TIMM.NAME', 'test_resnet', 'MODEL.TIMM.KWARGS.depth_typo', '3'], r"rejects its keywords.*depth_typo"),
])
def test_bad_timm_settings_fail_in_one_line(opts, message) -> None:
    with pytest.raises(ValueError, match=message):
        build_model(timm_config(*opts))


# ----------------------------------------------------------------------------- DaViT
@pytest.mark.parametrize('name', sorted(DAVIT))
def test_davit_configs(name: str) -> None:
    config = load_config(str(ROOT / 'configs' / f'{name}.yaml'))
    assert (config.MODEL.TYPE, config.MODEL.TIMM.NAME, config.MODEL.NAME) == ('timm', name, name)
    # the official recipe, with learning rates per 512 images (main.py scales by the global batch)
    t = config.TRAIN
    assert (t.EPOCHS, t.WARMUP_EPOCHS, t.BASE_LR, t.WARMUP_LR, t.MIN_LR) == (300, 5, 5e-4, 5e-7, 5e-6)
    assert (t.WEIGHT_DECAY, t.CLIP_GRAD, t.EMA.ENABLE, config.MODEL.TIMM.DROP_PATH_RATE) == (0.05, 1.0, False, 0.1)
    assert config.DATA.BATCH_SIZE * 8 == 1024 and config.AUG.AUTO_AUGMENT == 'rand-m9-mstd0.5-inc1'
    with torch.device('meta'):
        model = build_model(config)
    assert sum(p.numel() for p in model.parameters()) == DAVIT[name][0]


def test_davit_gmacs_match_the_readme() -> None:
    with torch.device('meta'):
        model = build_model(load_config(str(ROOT / 'configs' / 'davit_tiny.yaml')))
    result = count_flops(model, 224)
    assert abs(result['gmacs'] - 4.5) / 4.5 < 0.01


# ----------------------------------------------------------------------------- real runs
TIMM_OPTS = ['MODEL.TYPE', 'timm', 'MODEL.TIMM.NAME', 'test_vit', 'MODEL.TIMM.KWARGS.img_size', '64',
             'MODEL.NUM_CLASSES', '3', 'DATA.BATCH_SIZE', '2', 'TRAIN.EPOCHS', '2', 'TRAIN.WARMUP_EPOCHS', '1',
             'TRAIN.EMA.ENABLE', 'True', 'TRAIN.EMA.DECAY', '0.9', 'TRAIN.KEEP_CHECKPOINTS', '0',
             'AUG.MIXUP', '0.2', 'PRINT_FREQ', '1', 'TENSORBOARD', 'False', *EXACT_OPTS]


def _same_ema(a: dict, b: dict) -> None:
    assert a['ema'].keys() == b['ema'].keys()
    assert all(torch.equal(a['ema'][k], b['ema'][k]) for k in a['ema'])


@pytest.mark.slow
def test_timm_model_trains_and_resumes_exactly_through_main(tmp_path: Path, tiny_data: str) -> None:
    """A tiny timm ViT through ``main.py`` (demo config + --opts): 2 epochs straight, and 1 epoch
    checkpoint + auto-resume, end bit-identical (model, optimizer, EMA)."""
    args = ['--data-path', tiny_data, '--opts', *TIMM_OPTS]
    straight = run_main(args, tmp_path / 'a', tag='straight').check()
    assert 'creating model timm/' in straight.log()
    assert len(straight.accuracies()) == 2

    resumed_dir = tmp_path / 'b' / 'dat_demo' / 'resumed'
    resumed_dir.mkdir(parents=True)
    shutil.copy(straight.output / 'ckpt_epoch_0.pth', resumed_dir)
    resumed = run_main(args, tmp_path / 'b', tag='resumed').check()
    assert 'resumed: epoch 1, iteration 0' in resumed.log()
    a, b = load_ckpt(straight.output / 'ckpt_epoch_1.pth'), load_ckpt(resumed_dir / 'ckpt_epoch_1.pth')
    assert_same_training_state(a, b)
    _same_ema(a, b)
    assert resumed.accuracies() == straight.accuracies()[1:]


@pytest.mark.slow
def test_unknown_timm_name_ends_main_with_one_line(tmp_path: Path, tiny_data: str) -> None:
    run = run_main(['--data-path', tiny_data, '--opts', 'MODEL.TYPE', 'timm', 'MODEL.TIMM.NAME', 'davit_tinyy',
                    'MODEL.NUM_CLASSES', '3', 'DATA.BATCH_SIZE', '2'], tmp_path)
    assert run.returncode == 2
    last = run.stderr.strip().splitlines()[-1]
    assert "'davit_tinyy' is not a timm model; did you mean davit_tiny" in last


def _train_sh(args, cwd: Path) -> Run:
    env = subprocess_env(PORT=str(free_port()), TORCHRUN=f'{sys.executable} -m torch.distributed.run')
    start = time.time()
    proc = run_process(['bash', str(REPO / 'train.sh'), *args], cwd, env, timeout=600)
    return Run(proc.returncode, proc.stdout, proc.stderr, cwd, time.time() - start)


@pytest.mark.slow
def test_davit_config_trains_and_resumes_through_train_sh(tmp_path: Path, tiny_data: str) -> None:
    """``train.sh 1 configs/davit_tiny.yaml`` on the CPU (the DaViT recipe; a narrow, shallow DaViT
    at 64 px so that it runs in seconds): straight vs. resumed from the epoch-0 checkpoint."""
    shrink = ['MODEL.TIMM.KWARGS.embed_dims', '(16,32,64,128)', 'MODEL.TIMM.KWARGS.depths', '(1,1,1,1)',
              'MODEL.TIMM.KWARGS.num_heads', '(1,2,4,8)', 'MODEL.NUM_CLASSES', '3', 'DATA.IMG_SIZE', '64',
              'DATA.BATCH_SIZE', '4', 'TRAIN.EPOCHS', '2', 'TRAIN.WARMUP_EPOCHS', '1',
              'TRAIN.KEEP_CHECKPOINTS', '0', 'TENSORBOARD', 'False', *EXACT_OPTS]

    def train(tag: str) -> Run:
        run = _train_sh(['1', str(ROOT / 'configs' / 'davit_tiny.yaml'), tag, '--output', str(tmp_path),
                         '--data-path', tiny_data, '--opts', *shrink], tmp_path)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        run.output = tmp_path / 'davit_tiny' / tag
        return run

    straight = train('straight')
    log = straight.log()
    assert 'creating model timm/davit_tiny' in log
    (tmp_path / 'davit_tiny' / 'resumed').mkdir()
    shutil.copy(straight.output / 'ckpt_epoch_0.pth', tmp_path / 'davit_tiny' / 'resumed')
    resumed = train('resumed')
    assert 'resumed: epoch 1, iteration 0' in resumed.log()
    assert_same_training_state(load_ckpt(straight.output / 'ckpt_epoch_1.pth'),
                               load_ckpt(resumed.output / 'ckpt_epoch_1.pth'))
