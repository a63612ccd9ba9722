"""Data pipeline (data/): demo generator, transforms, samplers, robust folder, loaders, mixup.

Everything runs on real files written under ``tmp_path`` and real ``DataLoader``s (with and
without worker processes); the distributed case runs two real processes over gloo.
"""
import hashlib
import io
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, DistributedSampler

import config as config_module
from data import DataError
from data.build import OddSafeMixup, build_dataset, build_loader, build_mixup, build_transform, eval_resize_size
from data.demo import MANIFEST, SHAPES, class_name, make_demo_dataset
from data.folder import BadSample, SafeDataLoader, SafeImageFolder, SkipBadCollate, load_rgb
from data.samplers import DistributedEvalSampler, ResumableDistributedSampler, eval_indices

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


# ----------------------------------------------------------------------------- helpers
def _cfg(data_path='', **opts):
    flat = ['DATA.DATA_PATH', str(data_path)]
    for key, value in opts.items():
        flat += [key.replace('__', '.'), value]
    return config_module.load_config(opts=flat)


def _save(img, path, fmt=None, **kw):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **kw)
    return str(path)


def _solid(colour, size=(40, 30), mode='RGB'):
    return Image.new(mode, size, colour)


def _digest(root):
    h = {}
    for p in sorted(Path(root).rglob('*')):
        if p.is_file():
            h[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return h


def _denorm(t):
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    return t * std + mean


def _tiny_tree(root, classes=('a', 'b'), per_class=3, splits=('train', 'val')):
    for split in splits:
        for ci, c in enumerate(classes):
            for i in range(per_class):
                _save(_solid((40 * ci, 100, 10 * i)), Path(root) / split / c / f'{i}.jpg')
    return str(root)


@pytest.fixture(scope='module')
def demo_root(tmp_path_factory):
    return make_demo_dataset(str(tmp_path_factory.mktemp('demo') / 'demo'), classes=4,
                             train_per_class=12, val_per_class=5, size=48, seed=3)


# ----------------------------------------------------------------------------- demo generator
def test_demo_counts_layout_and_real_jpegs(demo_root):
    names = [class_name(c) for c in range(4)]
    assert names == ['n0000_hstripes', 'n0001_vstripes', 'n0002_checker', 'n0003_circle']
    for split, per_class in (('train', 12), ('val', 5)):
        assert sorted(os.listdir(Path(demo_root) / split)) == names
        for name in names:
            files = sorted((Path(demo_root) / split / name).iterdir())
            assert len(files) == per_class
            with Image.open(files[0]) as img:
                assert img.format == 'JPEG' and img.size == (48, 48) and img.mode == 'RGB'
    manifest = json.loads((Path(demo_root) / MANIFEST).read_text())
    assert manifest['complete'] and manifest['params']['seed'] == 3


def test_demo_is_byte_deterministic_and_seed_dependent(tmp_path):
    kw = dict(classes=3, train_per_class=4, val_per_class=2, size=32)
    a = _digest(make_demo_dataset(str(tmp_path / 'a'), seed=1, **kw))
    b = _digest(make_demo_dataset(str(tmp_path / 'b'), seed=1, **kw))
    c = _digest(make_demo_dataset(str(tmp_path / 'c'), seed=2, **kw))
    assert a == b
    images = [k for k in a if k.endswith('.JPEG')]
    assert len(images) == 3 * (4 + 2)
    assert all(a[k] != c[k] for k in images)
    # Train and val images are drawn from different streams.
    assert a[f'train/{class_name(0)}/train_0000_00000.JPEG'] != a[f'val/{class_name(0)}/val_0000_00000.JPEG']


def test_demo_is_idempotent_and_regenerates_on_new_arguments(tmp_path):
    out = str(tmp_path / 'd')
    make_demo_dataset(out, classes=2, train_per_class=3, val_per_class=1, size=32)
    first = Path(out) / 'train' / class_name(0) / 'train_0000_00000.JPEG'
    stamp = first.stat().st_mtime_ns
    os.utime(first, ns=(stamp - 10**9, stamp - 10**9))   # a rewrite would move the mtime
    make_demo_dataset(out, classes=2, train_per_class=3, val_per_class=1, size=32)
    assert first.stat().st_mtime_ns == stamp - 10**9

    make_demo_dataset(out, classes=3, train_per_class=2, val_per_class=1, size=32)
    assert sorted(os.listdir(Path(out) / 'train')) == [class_name(c) for c in range(3)]
    assert all(len(os.listdir(Path(out) / 'train' / class_name(c))) == 2 for c in range(3))

    # A deleted file makes the folder incomplete: it is regenerated.
    first.unlink()
    make_demo_dataset(out, classes=3, train_per_class=2, val_per_class=1, size=32)
    assert first.exists()


def test_demo_refuses_foreign_folders_and_bad_arguments(tmp_path):
    foreign = tmp_path / 'mine'
    (foreign / 'train' / 'cats').mkdir(parents=True)
    with pytest.raises(DataError, match='not made by data.demo'):
        make_demo_dataset(str(foreign), classes=2, train_per_class=1, val_per_class=1, size=32)
    assert (foreign / 'train' / 'cats').is_dir()
    with pytest.raises(DataError, match=f'1 to {len(SHAPES)}'):
        make_demo_dataset(str(tmp_path / 'x'), classes=len(SHAPES) + 1)


@pytest.mark.slow       # starts real processes
def test_demo_cli(tmp_path):
    out = tmp_path / 'cli'
    cmd = [sys.executable, '-m', 'data.demo', '--out', str(out), '--classes', '2',
           '--train-per-class', '3', '--val-per-class', '2', '--size', '32', '--seed', '0']
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert 'demo dataset ready' in res.stdout
    assert _digest(out) == _digest(make_demo_dataset(str(tmp_path / 'api'), 2, 3, 2, 32, 0))
    bad = subprocess.run(cmd[:5] + ['--classes', '99'], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith('error: ') and bad.stderr.count('\n') == 1


# ----------------------------------------------------------------------------- transforms
def test_train_transform_recipe_and_shapes():
    cfg = _cfg(DATA__IMG_SIZE=64)
    t = build_transform(True, cfg)
    names = [type(x).__name__ for x in t.transforms]
    assert names[0] == 'RandomResizedCropAndInterpolation'
    assert 'RandAugment' in names and 'RandomErasing' in names
    erasing = t.transforms[names.index('RandomErasing')]
    assert erasing.probability == 0.25 and erasing.mode == 'pixel'
    assert str(t.transforms[0].interpolation).lower().endswith('bicubic')
    for size in ((100, 80), (30, 50)):
        out = t(_solid((200, 10, 10), size))
        assert out.shape == (3, 64, 64) and out.dtype == torch.float32

    plain = build_transform(True, _cfg(DATA__IMG_SIZE=64, AUG__AUTO_AUGMENT='none', AUG__REPROB=0.0))
    plain_names = [type(x).__name__ for x in plain.transforms]
    assert 'RandAugment' not in plain_names and 'ColorJitter' in plain_names


def test_randaugment_posterize_at_full_magnitude_gives_black_not_an_error():
    t = build_transform(True, _cfg(DATA__IMG_SIZE=32))
    ra = next(x for x in t.transforms if type(x).__name__ == 'RandAugment')
    op = next(o for o in ra.ops if o.name == 'PosterizeIncreasing')
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0   # keeps 0 bits
    out = op(_solid((200, 150, 99), (32, 32)))
    assert out.mode == 'RGB' and np.asarray(out).max() == 0
    op.magnitude = 5                                       # keeps 2 bits
    assert tuple(np.asarray(op(_solid((200, 150, 99), (32, 32))))[0, 0]) == (192, 128, 64)


def test_train_transform_small_images_use_padded_random_crop():
    t = build_transform(True, _cfg(DATA__IMG_SIZE=32))
    first = t.transforms[0]
    assert type(first).__name__ == 'RandomCrop' and first.padding == 4
    assert t(_solid((0, 0, 255), (32, 32))).shape == (3, 32, 32)


def _banded_image():
    """200x100: a green band in the leftmost 10%, red up to the middle, blue after."""
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, :100] = (255, 0, 0)
    arr[:, 100:] = (0, 0, 255)
    arr[:, :20] = (0, 255, 0)
    return Image.fromarray(arr)


def test_eval_transform_square_resize_vs_shorter_side_option():
    img = _banded_image()
    crop = build_transform(False, _cfg(DATA__IMG_SIZE=64, TEST__CROP=True))
    plain = build_transform(False, _cfg(DATA__IMG_SIZE=64, TEST__CROP=False))
    swin = build_transform(False, _cfg(DATA__IMG_SIZE=64, TEST__CROP=True, TEST__RESIZE_MODE='shorter_side'))
    assert crop.transforms[0].size == (eval_resize_size(64),) * 2 == (73, 73)
    assert plain.transforms[0].size == (64, 64) and swin.transforms[0].size == 73

    c, p, s = _denorm(crop(img)), _denorm(plain(img)), _denorm(swin(img))
    assert c.shape == p.shape == s.shape == (3, 64, 64)
    # The square resizes squash the whole width in: the green band (10% of the width) survives
    # on the left, also after the centre crop (which cuts 4 of its 7 columns).
    assert p[1, :, 1].mean() > 0.9 and p[0, :, 1].mean() < 0.1
    assert c[1, :, 0].mean() > 0.9 and c[0, :, 0].mean() < 0.1
    # The shorter-side option keeps the aspect ratio: its crop cuts the band away.
    assert s[1].max() < 0.1 and s[0, :, 1].mean() > 0.9 and s[2, :, -2].mean() > 0.9
    # Identical output for a square image that is already the target size, up to normalisation.
    sq = Image.fromarray(np.full((64, 64, 3), 128, np.uint8))
    assert torch.allclose(_denorm(plain(sq)), torch.full((3, 64, 64), 128 / 255), atol=1e-5)


def _official_eval(img, size, crop):
    """The official evaluation pixels, from their definition: PIL bicubic resize to a square
    (``int(256/224*size)`` with the crop, else ``size``), then the centre ``size`` x ``size``."""
    s = int((256 / 224) * size) if crop else size
    arr = np.asarray(img.resize((s, s), Image.BICUBIC))
    top = int(round((s - size) / 2.0))
    return arr[top:top + size, top:top + size]


@pytest.mark.parametrize('crop', [True, False])
def test_eval_transform_equals_official_square_resize_on_jpegs(tmp_path, crop):
    rng = np.random.default_rng(0)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    for size in (32, 50, 64):      # 50: odd margin (57 - 50), rounded as torchvision does
        cfg = _cfg(DATA__IMG_SIZE=size, TEST__CROP=crop)
        as_float, as_uint8 = build_transform(False, cfg), build_transform(False, cfg, uint8=True)
        for w, h in ((97, 61), (50, 133), (300, 200), (64, 64)):      # wider, taller, square
            noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            path = _save(Image.fromarray(noise), tmp_path / f'{w}x{h}.jpg', quality=90)
            img = load_rgb(path)
            expected = torch.from_numpy(_official_eval(img, size, crop).copy()).permute(2, 0, 1)
            assert torch.equal(torch.from_numpy(np.array(as_uint8(img))).permute(2, 0, 1), expected), (size, w, h)
            want = (expected.double() / 255 - mean.double()) / std.double()
            assert torch.allclose(as_float(img).double(), want, atol=1e-6, rtol=0), (size, w, h)


def test_eval_interpolation_follows_the_config():
    bilinear = build_transform(False, _cfg(DATA__IMG_SIZE=64, DATA__INTERPOLATION='bilinear'))
    assert bilinear.transforms[0].interpolation.value == 'bilinear'
    randomised = build_transform(False, _cfg(DATA__IMG_SIZE=64, DATA__INTERPOLATION='random'))
    assert randomised.transforms[0].interpolation.value == 'bicubic'   # 'random' is train-only
    with pytest.raises(config_module.ConfigError, match='DATA.INTERPOLATION'):
        _cfg(DATA__IMG_SIZE=64, DATA__INTERPOLATION='cubic')


# ----------------------------------------------------------------------------- samplers
@pytest.mark.parametrize('world', [1, 2, 3, 4])
@pytest.mark.parametrize('n', [1, 5, 7, 10, 13])
def test_eval_sampler_covers_each_index_once(world, n):
    data = list(range(n))
    parts = [list(DistributedEvalSampler(data, num_replicas=world, rank=r)) for r in range(world)]
    flat = sorted(i for p in parts for i in p)
    assert flat == data
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    for r in range(world):
        sampler = DistributedEvalSampler(data, num_replicas=world, rank=r)
        assert len(sampler) == len(parts[r]) == len(eval_indices(n, r, world))
        assert parts[r] == list(range(r, n, world))


def test_eval_sampler_through_dataloader_counts_every_item_once():
    data = list(range(11))
    seen = []
    for r in range(3):
        loader = DataLoader(data, batch_size=2, sampler=DistributedEvalSampler(data, 3, r),
                            shuffle=False, drop_last=False)
        seen += [int(i) for batch in loader for i in batch]
    assert sorted(seen) == data


@pytest.mark.parametrize('n,world', [(23, 3), (16, 4), (10, 1), (5, 4)])
def test_resumable_sampler_matches_distributed_sampler(n, world):
    data = list(range(n))
    for epoch in (0, 3):
        parts = []
        for r in range(world):
            ours = ResumableDistributedSampler(data, world, r, shuffle=True, seed=7, batch_size=2)
            ref = DistributedSampler(data, world, r, shuffle=True, seed=7)
            ours.set_epoch(epoch)
            ref.set_epoch(epoch)
            parts.append(list(ours))
            assert parts[-1] == list(ref) and len(ours) == len(ref) == math.ceil(n / world)
        flat = [i for p in parts for i in p]
        assert len(flat) == math.ceil(n / world) * world
        assert set(flat) == set(data)   # padding repeats, but nothing is left out


def test_resumable_sampler_same_order_for_every_instance_new_order_per_epoch():
    data = list(range(50))
    a, b = (ResumableDistributedSampler(data, 1, 0, seed=11) for _ in range(2))
    a.set_epoch(4)
    b.set_epoch(4)
    assert list(a) == list(b) and sorted(a) == data
    b.set_epoch(5)
    assert list(a) != list(b)
    unshuffled = ResumableDistributedSampler(data, 2, 1, shuffle=False)
    assert list(unshuffled) == list(range(1, 50, 2))


@pytest.mark.parametrize('world,rank', [(1, 0), (3, 2)])
def test_resume_yields_exactly_the_tail_of_the_epoch(world, rank):
    data = list(range(47))
    bs = 4
    full = ResumableDistributedSampler(data, world, rank, seed=2, batch_size=bs)
    full.set_epoch(6)
    order = list(full)
    full_batches = [b.tolist() for b in DataLoader(data, batch_size=bs, sampler=full, drop_last=True)]
    for k in (0, 1, 3, len(order) // bs):
        resumed = ResumableDistributedSampler(data, world, rank, seed=2, batch_size=bs)
        resumed.set_epoch(6, start_batch=k)
        assert list(resumed) == order[k * bs:]
        assert len(resumed) == len(order) - k * bs
        loader = DataLoader(data, batch_size=bs, sampler=resumed, drop_last=True)
        assert len(loader) == len(full_batches) - k
        assert [b.tolist() for b in loader] == full_batches[k:]
        assert list(resumed) == order[k * bs:]   # the skip holds until the next set_epoch
    resumed.set_epoch(7)
    assert len(resumed) == len(order)
    with pytest.raises(ValueError, match='start_batch'):
        resumed.set_epoch(7, start_batch=len(order) // bs + 1)


def test_samplers_default_to_a_single_process():
    data = list(range(9))
    s = ResumableDistributedSampler(data)
    assert (s.num_replicas, s.rank) == (1, 0) and sorted(s) == data
    e = DistributedEvalSampler(data)
    assert (e.num_replicas, e.rank) == (1, 0) and list(e) == data
    with pytest.raises(ValueError, match='rank'):
        DistributedEvalSampler(data, num_replicas=2, rank=2)


# ----------------------------------------------------------------------------- robust folder
def _corrupt_tree(root):
    """3 good images per class, plus a truncated JPEG, random bytes and an empty PNG."""
    _tiny_tree(root, classes=('a', 'b'), per_class=3, splits=('train',))
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        good, 'JPEG', quality=95)
    bad = {
        Path(root) / 'train' / 'a' / 'truncated.jpg': good.getvalue()[: len(good.getvalue()) // 2],
        Path(root) / 'train' / 'b' / 'random.jpg': np.random.default_rng(1).bytes(500),
        Path(root) / 'train' / 'b' / 'empty.png': b'',
    }
    for path, payload in bad.items():
        path.write_bytes(payload)
    (Path(root) / 'train' / 'a' / '._hidden.jpg').write_bytes(b'resource fork, not an image')
    return sorted(str(p) for p in bad)


@pytest.mark.parametrize('workers', [0, 2])
def test_corrupt_files_are_skipped_counted_and_logged(tmp_path, caplog, workers):
    bad = _corrupt_tree(tmp_path)
    ds = SafeImageFolder(str(tmp_path / 'train'), transform=build_transform(False, _cfg(DATA__IMG_SIZE=32)))
    assert len(ds) == 9   # the hidden file is not a sample
    assert sorted(ds.samples[i][0] for i in range(len(ds)) if isinstance(ds[i], BadSample)) == bad

    loader = SafeDataLoader(ds, batch_size=len(ds), shuffle=False, num_workers=workers,
                            collate_fn=SkipBadCollate(32))
    with caplog.at_level(logging.WARNING, logger='dat.data'):
        batches = list(loader)
    assert len(batches) == 1
    images, targets, n_skipped = batches[0]
    assert type(n_skipped) is int and n_skipped == 3
    assert images.shape == (6, 3, 32, 32) and targets.dtype == torch.long
    assert targets.tolist() == [0, 0, 0, 1, 1, 1]
    logged = [r.getMessage() for r in caplog.records if r.name == 'dat.data']
    assert len(logged) == 3
    for path in bad:
        assert sum(path in m for m in logged) == 1


def test_batch_of_only_corrupt_files_is_empty_with_count(tmp_path):
    root = tmp_path / 'train' / 'a'
    root.mkdir(parents=True)
    for i in range(3):
        (root / f'{i}.jpg').write_bytes(b'\xff\xd8\xff' + bytes(20))
    ds = SafeImageFolder(str(tmp_path / 'train'), transform=build_transform(False, _cfg(DATA__IMG_SIZE=32)))
    (images, targets, n_skipped), = list(SafeDataLoader(ds, batch_size=4, collate_fn=SkipBadCollate(32)))
    assert images.shape == (0, 3, 32, 32) and targets.shape == (0,) and n_skipped == 3
    ds.transform = build_transform(False, _cfg(DATA__IMG_SIZE=32), uint8=True)
    (images, targets, n_skipped), = list(SafeDataLoader(ds, batch_size=4, collate_fn=SkipBadCollate(32, uint8=True)))
    assert images.shape == (0, 32, 32, 3) and images.dtype == torch.uint8 and n_skipped == 3


def test_transform_errors_are_not_swallowed(tmp_path):
    _tiny_tree(tmp_path, per_class=1, splits=('train',))

    def broken(img):
        raise RuntimeError('bug in a transform')
    with pytest.raises(RuntimeError, match='bug in a transform'):
        SafeImageFolder(str(tmp_path / 'train'), transform=broken)[0]


def _mode_images(folder):
    """One file per awkward mode, with the RGB value expected at pixel (0, 0)."""
    folder = Path(folder)
    files = {}
    files[_save(_solid(77, mode='L'), folder / 'gray.jpg', quality=100)] = (77, 77, 77)
    files[_save(_solid((0, 0, 0, 0), mode='CMYK'), folder / 'cmyk.jpg', quality=100)] = (255, 255, 255)
    rgba = Image.new('RGBA', (40, 30), (255, 0, 0, 0))          # transparent at (0, 0)
    rgba.paste((0, 0, 255, 255), (20, 0, 40, 30))
    files[_save(rgba, folder / 'rgba.png')] = (255, 255, 255)
    pal = _solid((0, 200, 0)).convert('P', palette=Image.Palette.ADAPTIVE, colors=4)
    files[_save(pal, folder / 'palette.png')] = (0, 200, 0)
    pal_t = pal.copy()
    pal_t.info['transparency'] = pal_t.getpixel((0, 0))
    files[_save(pal_t, folder / 'palette_transparent.png', transparency=pal_t.getpixel((0, 0)))] = (255, 255, 255)
    files[_save(Image.new('LA', (40, 30), (30, 255)), folder / 'la.png')] = (30, 30, 30)
    sixteen = Image.fromarray(np.full((30, 40), 257 * 100, np.uint16))
    files[_save(sixteen, folder / 'sixteen.png')] = (100, 100, 100)
    files[_save(Image.new('1', (40, 30), 1), folder / 'bilevel.png')] = (255, 255, 255)
    files[_save(_solid((10, 20, 30)), folder / 'plain.bmp')] = (10, 20, 30)
    files[_save(_solid((10, 200, 30)), folder / 'lossless.webp', lossless=True)] = (10, 200, 30)
    files[_save(Image.fromarray(np.full((30, 40), 0.5, np.float32)), folder / 'float.tiff')] = (128, 128, 128)
    return files


def test_every_mode_decodes_to_rgb_with_the_right_colour(tmp_path):
    files = _mode_images(tmp_path / 'train' / 'modes')
    with Image.open(next(p for p in files if p.endswith('sixteen.png'))) as raw:
        assert raw.mode.startswith('I')            # really a 16-bit file
    for path, expected in files.items():
        img = load_rgb(path)
        assert img.mode == 'RGB' and img.size == (40, 30), path
        got = np.asarray(img)[0, 0].astype(int)
        assert np.abs(got - expected).max() <= 3, (path, got, expected)
    rgba = np.asarray(load_rgb(str(tmp_path / 'train' / 'modes' / 'rgba.png')))
    assert tuple(rgba[0, 39]) == (0, 0, 255)       # the opaque half keeps its colour


@pytest.mark.parametrize('workers', [0, 2])
def test_every_mode_arrives_as_a_three_channel_batch(tmp_path, workers):
    files = _mode_images(tmp_path / 'train' / 'modes')
    ds = SafeImageFolder(str(tmp_path / 'train'), transform=build_transform(False, _cfg(DATA__IMG_SIZE=32)))
    assert len(ds) == len(files)
    loader = SafeDataLoader(ds, batch_size=len(ds), num_workers=workers, collate_fn=SkipBadCollate(32))
    (images, targets, n_skipped), = list(loader)
    assert n_skipped == 0 and images.shape == (len(files), 3, 32, 32)
    assert torch.isfinite(images).all()


def test_empty_class_folder_keeps_its_index_and_warns(tmp_path, caplog):
    _tiny_tree(tmp_path, classes=('a', 'c'), per_class=2, splits=('val',))
    (tmp_path / 'val' / 'b').mkdir()
    with caplog.at_level(logging.WARNING, logger='dat.data'):
        ds, num_classes = build_dataset(False, _cfg(tmp_path, DATA__IMG_SIZE=32))
    assert num_classes == 3 and ds.class_to_idx == {'a': 0, 'b': 1, 'c': 2}
    assert sorted(set(ds.targets)) == [0, 2]
    assert any('hold no images: b' in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------- errors
def _error(cfg):
    with pytest.raises(DataError) as info:
        build_loader(cfg)
    message = str(info.value)
    assert '\n' not in message
    return message


def test_error_empty_or_missing_data_path(tmp_path):
    msg = _error(_cfg(''))
    assert 'DATA.DATA_PATH is empty' in msg and '--data-path' in msg and 'DAT_DATA_PATH' in msg
    msg = _error(_cfg(tmp_path / 'nowhere'))
    assert 'does not exist' in msg and str(tmp_path / 'nowhere') in msg and 'DAT_DATA_PATH' in msg


def test_error_missing_split(tmp_path):
    _tiny_tree(tmp_path, splits=('val',))
    msg = _error(_cfg(tmp_path))
    assert "no 'train/' folder" in msg and 'ImageNet layout' in msg
    _tiny_tree(tmp_path / 'other', splits=('train',))
    assert "no 'val/' folder" in _error(_cfg(tmp_path / 'other'))


def test_error_split_without_classes_or_images(tmp_path):
    (tmp_path / 'train').mkdir()
    (tmp_path / 'val').mkdir()
    msg = _error(_cfg(tmp_path))
    assert 'no class folders' in msg and '<class name>' in msg
    for split in ('train', 'val'):
        (tmp_path / split / 'cat').mkdir()
        (tmp_path / split / 'cat' / 'notes.txt').write_text('not an image')
    msg = _error(_cfg(tmp_path))
    assert 'no images' in msg and 'jpg' in msg


def test_error_class_folders_differ(tmp_path):
    _tiny_tree(tmp_path, classes=['shared'] + [f'train_only_{i}' for i in range(7)], per_class=1,
               splits=('train',))
    _tiny_tree(tmp_path, classes=['shared', 'val_only'], per_class=1, splits=('val',))
    msg = _error(_cfg(tmp_path))
    assert 'class folders differ' in msg
    assert 'only in train/' in msg and '(and 2 more)' in msg
    assert sum(f'train_only_{i}' in msg for i in range(7)) == 5
    assert 'only in val/: val_only' in msg


def test_error_more_classes_than_the_model_head(tmp_path):
    _tiny_tree(tmp_path, classes=('a', 'b', 'c'), per_class=2)
    msg = _error(_cfg(tmp_path, MODEL__NUM_CLASSES=2, DATA__BATCH_SIZE=2))
    assert '3 classes' in msg and 'MODEL.NUM_CLASSES 3' in msg


# ----------------------------------------------------------------------------- mixup
def test_mixup_follows_the_recipe_and_turns_off():
    fn = build_mixup(_cfg(MODEL__NUM_CLASSES=10))
    assert isinstance(fn, OddSafeMixup)
    assert (fn.mixup_alpha, fn.cutmix_alpha, fn.switch_prob, fn.label_smoothing, fn.mode) == \
        (0.8, 1.0, 0.5, 0.1, 'batch')
    assert build_mixup(_cfg(AUG__MIXUP=0.0, AUG__CUTMIX=0.0)) is None
    assert build_mixup(_cfg(AUG__MIXUP=0.0, AUG__CUTMIX=0.0, AUG__CUTMIX_MINMAX=[0.2, 0.8])) is not None


@pytest.mark.parametrize('batch,kept', [(6, 6), (5, 4), (1, 0), (0, 0)])
def test_mixup_accepts_odd_batches(batch, kept):
    torch.manual_seed(0)
    fn = build_mixup(_cfg(MODEL__NUM_CLASSES=7))
    x = torch.randn(batch, 3, 8, 8)
    y = torch.randint(0, 7, (batch,))
    xm, ym = fn(x.clone(), y)
    assert xm.shape == (kept, 3, 8, 8) and ym.shape == (kept, 7)
    if kept:
        assert torch.allclose(ym.sum(1), torch.ones(kept))
        # Soft targets only involve the kept samples' labels (and smoothing mass).
        lam_mass = ym.gather(1, y[:kept, None]).squeeze(1) + ym.gather(1, y[:kept].flip(0)[:, None]).squeeze(1)
        assert (lam_mass >= 0.9 - 1e-6).all()


# ----------------------------------------------------------------------------- loaders
def _demo_cfg(root, **opts):
    base = dict(DATA__IMG_SIZE=48, DATA__BATCH_SIZE=8, DATA__NUM_WORKERS=2, MODEL__NUM_CLASSES=4)
    base.update(opts)
    return _cfg(root, **base)


def test_evaluation_loader_reads_val_alone_and_checks_its_classes(demo_root, tmp_path):
    root = tmp_path / 'val_only'
    shutil.copytree(Path(demo_root) / 'val', root / 'val')
    ds_train, ds_val, train, val, mixup = build_loader(_demo_cfg(root), train=False)
    assert ds_train is None and train is None and mixup is None and len(ds_val) == 20
    assert [t for _, ts, _ in val for t in ts.tolist()] == [c for c in range(4) for _ in range(5)]
    shutil.rmtree(root / 'val' / class_name(0))          # positions would shift: 1 -> 0, ...
    with pytest.raises(DataError, match="has 3 classes but the model has MODEL.NUM_CLASSES 4"):
        build_loader(_demo_cfg(root), train=False)


def test_build_loader_end_to_end(demo_root):
    ds_train, ds_val, train, val, mixup = build_loader(_demo_cfg(demo_root))
    assert (len(ds_train), len(ds_val)) == (48, 20)
    assert ds_train.classes == ds_val.classes == [class_name(c) for c in range(4)]
    assert isinstance(train.sampler, ResumableDistributedSampler)
    assert isinstance(val.sampler, DistributedEvalSampler)
    train.sampler.set_epoch(0)
    batches = list(train)
    assert len(batches) == len(train) == 48 // 8
    for images, targets, n_skipped in batches:
        assert images.shape == (8, 3, 48, 48) and targets.dtype == torch.long and n_skipped == 0
    assert sorted(t for _, ts, _ in batches for t in ts.tolist()) == [c for c in range(4) for _ in range(12)]
    val_targets = [t for _, ts, _ in val for t in ts.tolist()]
    assert val_targets == sorted(val_targets) and len(val_targets) == 20   # unshuffled, no padding
    images, targets, _ = batches[0]
    mixed, soft = mixup(images, targets)
    assert mixed.shape == images.shape and soft.shape == (8, 4)


def test_train_loader_is_reproducible_and_resumable(demo_root):
    def first_epoch(cfg, start_batch=0):
        loader = build_loader(cfg)[2]
        loader.sampler.set_epoch(1, start_batch=start_batch)
        return list(loader)

    a = first_epoch(_demo_cfg(demo_root, SEED=5))
    b = first_epoch(_demo_cfg(demo_root, SEED=5))
    c = first_epoch(_demo_cfg(demo_root, SEED=6))
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    assert not all(torch.equal(x[1], y[1]) for x, y in zip(a, c))
    resumed = first_epoch(_demo_cfg(demo_root, SEED=5), start_batch=2)
    assert [t[1].tolist() for t in resumed] == [t[1].tolist() for t in a[2:]]


_DIST_SCRIPT = r'''
import json, os, sys
import torch, torch.distributed as dist
rank, world, store, root, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
dist.init_process_group('gloo', init_method='file://' + store, rank=rank, world_size=world)
import config
from data import build_loader
cfg = config.load_config(opts=['DATA.DATA_PATH', root, 'DATA.IMG_SIZE', '32', 'DATA.BATCH_SIZE', '4',
                               'DATA.NUM_WORKERS', '0', 'MODEL.NUM_CLASSES', '4'])
_, ds_val, train, val, _ = build_loader(cfg)
train.sampler.set_epoch(0)
train_idx = list(train.sampler)
seen = torch.zeros(2, dtype=torch.long)
for images, targets, n in val:
    seen += torch.tensor([targets.numel(), n])
dist.all_reduce(seen)
with open(out, 'w') as f:
    json.dump({'world': train.sampler.num_replicas, 'rank': train.sampler.rank, 'train': train_idx,
               'val': list(val.sampler), 'seen': seen.tolist(), 'n_val': len(ds_val)}, f)
dist.barrier()
# Skip interpreter teardown: gloo's threads occasionally abort ("terminate called without an
# active exception") while being destroyed at exit, which says nothing about the data code.
os._exit(0)
'''


@pytest.mark.slow       # starts real processes
def test_build_loader_under_a_real_process_group(demo_root, tmp_path):
    script = tmp_path / 'worker.py'
    script.write_text(_DIST_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS='1')
    world = 2
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(world), str(tmp_path / 'store'),
                               demo_root, str(tmp_path / f'out{r}.json')], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
    results = [json.loads((tmp_path / f'out{r}.json').read_text()) for r in range(world)]
    assert [(r['world'], r['rank']) for r in results] == [(2, 0), (2, 1)]
    assert sorted(i for r in results for i in r['val']) == list(range(results[0]['n_val']))
    assert all(r['seen'] == [20, 0] for r in results)   # all-reduced counts see every image once
    train = [i for r in results for i in r['train']]
    assert sorted(train) == list(range(48)) and len(results[0]['train']) == 24


@pytest.mark.parametrize('device_normalize', [False, True])
def test_worker_init_fn_reaches_the_worker_processes_loaders(demo_root, device_normalize):
    """The stop-signal guard must be installed on the DataLoaders themselves, also when they are
    wrapped for normalising on the device."""
    def init(worker_id: int) -> None:
        pass

    loaders = build_loader(_demo_cfg(demo_root, DATA__DEVICE_NORMALIZE=device_normalize), worker_init_fn=init)[2:4]
    for loader in loaders:
        inner = getattr(loader, 'loader', loader)
        assert inner.worker_init_fn is init
