"""``DATA.DEVICE_NORMALIZE``: uint8 batches normalised (and randomly erased) by the loader on the
device give what the float pipeline gives: equal values for evaluation and for training without
random erasing (same random draws), the same distribution with it."""
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import config as config_module
from data.build import build_loader, build_transform
from data.demo import make_demo_dataset
from data.device import DeviceNormalizeLoader, normalize_uint8
from data.folder import BadSample, DataError, SafeDataLoader, SkipBadCollate
from data.throughput import compare_pipelines, loader_throughput
from data.throughput import main as throughput_main

torch.set_num_threads(1)


@pytest.fixture(scope='module')
def root(tmp_path_factory):
    return make_demo_dataset(str(tmp_path_factory.mktemp('dn') / 'data'), classes=2, train_per_class=16,
                             val_per_class=5, size=40, seed=5)


def _cfg(root, device_normalize, *opts):
    return config_module.load_config(opts=[
        'DATA.DATA_PATH', root, 'DATA.IMG_SIZE', '32', 'DATA.BATCH_SIZE', '8', 'DATA.NUM_WORKERS', '0',
        'MODEL.NUM_CLASSES', '2', 'DATA.DEVICE_NORMALIZE', str(device_normalize), *opts])


def _batches(cfg, train, seed=0):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    _, _, loader_train, loader_val, _ = build_loader(cfg)
    loader = loader_train if train else loader_val
    if train:
        loader.sampler.set_epoch(0)
    return [(x, y, n) for x, y, n in loader]


def test_transforms_end_at_the_image_without_normalising_or_erasing(root):
    img = Image.new('RGB', (50, 40), (250, 3, 128))
    for train in (True, False):
        out = build_transform(train, _cfg(root, True, 'AUG.REPROB', '1.0', 'AUG.AUTO_AUGMENT', 'none',
                                          'AUG.COLOR_JITTER', '0.0', 'DATA.IMG_SIZE', '48'))(img)
        assert isinstance(out, Image.Image) and out.mode == 'RGB' and out.size == (48, 48)
        assert np.unique(np.asarray(out).reshape(-1, 3), axis=0).tolist() == [[250, 3, 128]]   # nothing erased


@pytest.mark.parametrize('workers', [0, 2])
def test_collate_packs_images_into_one_nhwc_batch(workers):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (6, 5, 3), dtype=np.uint8) for _ in range(4)]
    samples = [(Image.fromarray(a), i) for i, a in enumerate(arrays)] + [BadSample('x.jpg', 'truncated')]
    loader = SafeDataLoader(samples, batch_size=len(samples), num_workers=workers,
                            collate_fn=SkipBadCollate(6, uint8=True))
    (images, targets, n_skipped), = list(loader)
    assert images.dtype == torch.uint8 and images.shape == (4, 6, 5, 3) and images.is_contiguous()
    assert torch.equal(images, torch.from_numpy(np.stack(arrays))) and targets.tolist() == [0, 1, 2, 3]
    assert n_skipped == 1
    mean, std = torch.tensor([10.0, 20.0, 30.0]).view(1, 3, 1, 1), torch.tensor([2.0, 4.0, 8.0]).view(1, 3, 1, 1)
    out = normalize_uint8(images, mean, std)
    assert out.shape == (4, 3, 6, 5) and out.is_contiguous()
    assert torch.equal(out, (images.permute(0, 3, 1, 2).float() - mean) / std)


def test_collate_names_images_it_cannot_batch():
    samples = [(Image.new('RGB', (4, 4)), 0), (Image.new('RGB', (5, 4)), 0)]
    with pytest.raises(DataError, match=r'cannot batch a RGB 5x4 image with a RGB 4x4 one'):
        SkipBadCollate(4, uint8=True)(samples)


def test_eval_batches_equal_the_float_pipeline(root):
    ref, dev = _batches(_cfg(root, False), train=False), _batches(_cfg(root, True), train=False)
    assert len(ref) == len(dev) == 2
    for (x, y, n), (xd, yd, nd) in zip(ref, dev):
        assert xd.dtype == torch.float32 and torch.equal(y, yd) and n == nd == 0
        assert torch.allclose(x, xd, atol=2e-6, rtol=0)


def test_train_batches_equal_without_random_erasing(root):
    opts = ('AUG.REPROB', '0.0')        # RandAugment, colour jitter and crops draw the same numbers
    ref, dev = _batches(_cfg(root, False, *opts), True), _batches(_cfg(root, True, *opts), True)
    assert len(ref) == len(dev) == 4
    for (x, y, _), (xd, yd, _) in zip(ref, dev):
        assert torch.equal(y, yd) and torch.allclose(x, xd, atol=2e-6, rtol=0)


COLOUR = (120, 60, 200)


@pytest.fixture(scope='module')
def solid_root(tmp_path_factory):
    """Images of one solid colour: every pixel that differs from it after the pipeline was erased."""
    root = tmp_path_factory.mktemp('solid')
    for split, n in (('train', 32), ('val', 2)):
        for c in ('a', 'b'):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new('RGB', (40 + i, 36), COLOUR).save(root / split / c / f'{i}.png')
    return str(root)


def _erasing_stats(batches):
    """Mean erased fraction per image; per-channel mean and std of the erased pixels."""
    clean = ((torch.tensor(COLOUR) / 255 - torch.tensor(IMAGENET_DEFAULT_MEAN)) /
             torch.tensor(IMAGENET_DEFAULT_STD)).view(1, 3, 1, 1)
    fractions, erased = [], []
    for x, _, _ in batches:
        diff = (x - clean).abs().amax(dim=1) > 1e-3                  # [B, H, W]
        fractions += diff.flatten(1).float().mean(1).tolist()
        erased.append(x.permute(1, 0, 2, 3)[:, diff])                # [3, erased pixels]
    erased = torch.cat(erased, 1)
    return float(np.mean(fractions)), erased.mean(1), erased.std(1)


def test_train_random_erasing_has_the_same_distribution(solid_root):
    # Erasing always, 'pixel' mode: rectangles of N(0, 1) noise (normalised units) covering 2% to
    # 1/3 of the image; applied once, in the worker (float) or on the device (uint8).
    opts = ('AUG.AUTO_AUGMENT', 'none', 'AUG.COLOR_JITTER', '0.0', 'AUG.REPROB', '1.0',
            'DATA.IMG_SIZE', '48')      # above 32, where a zero-padded random crop is used
    stats = {}
    for dn in (False, True):
        batches = [b for s in range(3) for b in _batches(_cfg(solid_root, dn, *opts), True, seed=s)]
        assert len(batches) == 24
        stats[dn] = _erasing_stats(batches)
    (f0, m0, s0), (f1, m1, s1) = stats[False], stats[True]
    # 192 images each: the mean erased fraction (about 0.16) agrees to within ~4 standard errors.
    assert 0.1 < f0 < 0.25 and 0.1 < f1 < 0.25 and abs(f0 - f1) < 0.03, (f0, f1)
    for m, s in ((m0, s0), (m1, s1)):
        assert torch.allclose(m, torch.zeros(3), atol=0.03) and torch.allclose(s, torch.ones(3), atol=0.03)


def test_wrapper_keeps_the_loader_interface(root):
    cfg = _cfg(root, True)
    _, _, loader_train, loader_val, _ = build_loader(cfg, device='cpu')
    assert isinstance(loader_train, DeviceNormalizeLoader) and isinstance(loader_val, DeviceNormalizeLoader)
    assert len(loader_train) == 4 and loader_train.batch_size == 8
    loader_train.sampler.set_epoch(1, start_batch=3)                 # resume inside an epoch
    batches = list(loader_train)
    assert len(batches) == 1 and isinstance(batches[0][2], int)
    empty = DeviceNormalizeLoader([(torch.zeros(0, 32, 32, 3, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), 2)],
                                  re_prob=1.0)
    (x, y, n), = list(empty)
    assert x.shape == (0, 3, 32, 32) and x.dtype == torch.float32 and n == 2


@pytest.mark.parametrize('images', [torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(2, 32, 32, 3)])
def test_wrapper_refuses_batches_it_would_misread(images):
    loader = DeviceNormalizeLoader([(images, torch.zeros(2, dtype=torch.long), 0)])
    with pytest.raises(ValueError, match='takes uint8 NHWC batches with 3 channels'):
        list(loader)


@pytest.mark.parametrize('device_normalize', [False, True])
def test_loader_throughput_reports_images_per_second_per_worker(root, device_normalize):
    result = loader_throughput(_cfg(root, False), device_normalize, num_workers=0, batches=2, warmup=1)
    assert result['pipeline'] == ('device_normalize' if device_normalize else 'float')
    assert result['batches'] == 2 and result['images_per_s'] > 0
    assert result['images_per_s_per_worker'] == result['images_per_s']     # 0 workers count as one


def test_pipelines_compared_in_alternating_rounds(root):
    seen = []
    summary = compare_pipelines(_cfg(root, False), num_workers=0, batches=2, warmup=1, rounds=2, on_result=seen.append)
    assert [(r['round'], r['pipeline']) for r in seen] == [
        (1, 'float'), (1, 'device_normalize'), (2, 'device_normalize'), (2, 'float')]
    floats = [r['images_per_s_per_worker'] for r in seen if r['pipeline'] == 'float']
    assert summary['float_per_worker'] == sum(floats) / 2 and summary['images_timed'] == 16
    assert summary['ratio'] == summary['device_normalize_per_worker'] / summary['float_per_worker']


def test_throughput_command_refuses_zero_rounds(root, capsys):
    assert throughput_main(['--cfg', 'configs/dat_tiny.yaml', '--data-path', root, '--rounds', '0']) == 2
    assert '--rounds and --main-threads must be >= 1' in capsys.readouterr().err
