"""Datasets, transforms, loaders and mixup built from the config (Swin / official DAT recipe).

Loader contract: every loader from :func:`build_loader` yields 3-tuples
``(images, targets, n_skipped)``:

* ``images``: float ``Tensor[B, 3, S, S]`` (``S = DATA.IMG_SIZE``), ImageNet-normalised (with
  ``DATA.DEVICE_NORMALIZE`` already on the ``device`` given to :func:`build_loader`);
* ``targets``: ``LongTensor[B]`` of class indices (mixup is *not* applied by the loader: call
  ``mixup_fn(images, targets)`` in the training loop, as in Swin);
* ``n_skipped``: ``int``, the number of unreadable files dropped from this batch (each is
  logged once as a warning on logger ``'dat.data'``). ``B`` is the batch size minus
  ``n_skipped`` and can be 0, in which case the loop must skip the batch.

The training loader drops its last incomplete batch and uses
:class:`~data.samplers.ResumableDistributedSampler`: call ``sampler.set_epoch(epoch)`` every
epoch, or ``sampler.set_epoch(epoch, start_batch=k)`` to resume inside an epoch. The
validation loader uses :class:`~data.samplers.DistributedEvalSampler` (no padding), so
callers must all-reduce correct counts and totals across ranks.

Reproducibility: sample order depends only on ``SEED`` and the epoch. Augmentation randomness
in worker processes depends only on ``SEED``, the rank and the epoch (``SafeDataLoader``
re-seeds per epoch); a mid-epoch resume therefore repeats the order exactly but not the
random crops of the resumed batches. With ``DATA.NUM_WORKERS 0`` augmentations draw from the
main process's global RNGs.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, List, Optional, Tuple, Union

import torch
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.data.auto_augment import AugmentOp
from timm.data.transforms import MaybePILToTensor
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from .folder import DataError, SafeDataLoader, SafeImageFolder, SkipBadCollate, check_data_root
from .device import DeviceNormalizeLoader
from .samplers import DistributedEvalSampler, ResumableDistributedSampler, dist_info

__all__ = ['build_transform', 'build_dataset', 'build_datasets', 'build_loader', 'build_mixup', 'OddSafeMixup',
           'eval_resize_size', 'eval_resize']

_logger = logging.getLogger('dat.data')

_INTERPOLATIONS = {
    'bicubic': InterpolationMode.BICUBIC,
    'bilinear': InterpolationMode.BILINEAR,
    'nearest': InterpolationMode.NEAREST,
    'lanczos': InterpolationMode.LANCZOS,
    'hamming': InterpolationMode.HAMMING,
    'box': InterpolationMode.BOX,
}


def _eval_interpolation(name: str) -> InterpolationMode:
    """Interpolation for evaluation; timm's training-only 'random' falls back to bicubic."""
    if name == 'random':
        return InterpolationMode.BICUBIC
    if name not in _INTERPOLATIONS:
        raise DataError(f"DATA.INTERPOLATION '{name}' is not supported: use one of "
                        f"{sorted(_INTERPOLATIONS) + ['random']}")
    return _INTERPOLATIONS[name]


def eval_resize_size(img_size: int) -> int:
    """Resize before the centre crop (``TEST.CROP``): ``int(256 / 224 * img_size)`` (official)."""
    return int((256 / 224) * img_size)


def eval_resize(config: Any) -> List[Any]:
    """The evaluation resize (and crop), as the official pipeline does it.

    ``TEST.RESIZE_MODE 'square'`` (default): resize to a square ``(s, s)`` (the image is stretched,
    its aspect ratio is not kept), ``s = int(256/224 * size)`` with ``TEST.CROP`` then a centre
    crop of ``size``, or ``s = size`` without. The released checkpoints were measured this way.
    ``'shorter_side'`` (Swin's way): with ``TEST.CROP`` the shorter side goes to ``s`` (aspect
    ratio kept) before the centre crop; without ``TEST.CROP`` it is the square resize too.
    """
    size = int(config.DATA.IMG_SIZE)
    interpolation = _eval_interpolation(config.DATA.INTERPOLATION)
    if not config.TEST.CROP:
        return [transforms.Resize((size, size), interpolation=interpolation)]
    s = eval_resize_size(size)
    shorter_side = str(config.TEST.RESIZE_MODE) == 'shorter_side'
    return [transforms.Resize(s if shorter_side else (s, s), interpolation=interpolation),
            transforms.CenterCrop(size)]


# ----------------------------------------------------------------------------- transforms
def posterize_compat(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize with the 0-bit case of older Pillow (an all-black image).

    RandAugment 'inc1' maps magnitude 10 (reached by m9 + mstd0.5 about 2% of the time) to
    keeping 0 bits; recent Pillow (13 here) rejects that with a ValueError that kills the loader.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


def _augment_ops(transform: Any):
    """Every timm ``AugmentOp`` inside RandAugment / AutoAugment / AugMix of ``transform``."""
    for t in getattr(transform, 'transforms', [transform]):
        ops = list(getattr(t, 'ops', []))
        for sub_policy in getattr(t, 'policy', []):
            ops += list(sub_policy)
        yield from (op for op in ops if isinstance(op, AugmentOp))


def build_transform(is_train: bool, config: Any, uint8: Optional[bool] = None) -> transforms.Compose:
    """Training: timm's RandAugment pipeline (RandomCrop with padding 4 for ``IMG_SIZE <= 32``;
    posterize patched by :func:`posterize_compat`).
    Evaluation: :func:`eval_resize`, tensor, ImageNet normalisation.

    ``uint8`` (default: ``DATA.DEVICE_NORMALIZE``) ends both at the augmented RGB image instead:
    no tensor conversion, normalisation or random erasing in the worker. The collate packs the
    images into one uint8 batch (:func:`~data.folder.pack_images`) and
    :class:`DeviceNormalizeLoader` does the rest on the device.
    """
    size = int(config.DATA.IMG_SIZE)
    uint8 = bool(config.DATA.DEVICE_NORMALIZE) if uint8 is None else uint8
    if is_train:
        aug = config.AUG
        transform = create_transform(
            input_size=size,
            is_training=True,
            color_jitter=aug.COLOR_JITTER if aug.COLOR_JITTER > 0 else None,
            auto_augment=aug.AUTO_AUGMENT if aug.AUTO_AUGMENT != 'none' else None,
            re_prob=aug.REPROB,
            re_mode=aug.REMODE,
            re_count=aug.RECOUNT,
            interpolation=config.DATA.INTERPOLATION,
            use_prefetcher=uint8,
        )
        for op in _augment_ops(transform):
            if op.name.startswith('Posterize'):
                op.aug_fn = posterize_compat
        if size <= 32:
            # At CIFAR scale a random-resized crop destroys too much of the image.
            transform.transforms[0] = transforms.RandomCrop(size, padding=4)
        if uint8:
            # timm's prefetcher pipeline ends at a CHW tensor; the collate wants the image itself.
            last = transform.transforms.pop()
            if not isinstance(last, MaybePILToTensor):
                raise RuntimeError(f'timm prefetcher transforms end at {last!r}, expected MaybePILToTensor')
        return transform

    if uint8:
        return transforms.Compose(eval_resize(config))
    return transforms.Compose(eval_resize(config) + [
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


# ----------------------------------------------------------------------------- datasets
def _data_root(config: Any) -> str:
    return os.path.expanduser(str(config.DATA.DATA_PATH or ''))


def data_format(config: Any) -> str:
    """``DATA.FORMAT``, lower-cased: 'folder', 'wds' or 'hf'."""
    return str(getattr(config.DATA, 'FORMAT', 'folder') or 'folder').lower()


def _check_dataset_name(config: Any) -> None:
    dataset_name = str(config.DATA.DATASET).lower()
    if dataset_name not in ('imagenet', 'imagefolder'):
        raise DataError(f"DATA.DATASET '{config.DATA.DATASET}' is not supported: use 'imagenet' "
                        f"(any ImageFolder layout with train/ and val/)")


def _source_builder(config: Any) -> Callable:
    """The ``build_*_datasets(config, transform_train, transform_val, splits)`` of a non-folder source."""
    if data_format(config) == 'hf':
        from .hf import build_hf_datasets
        return build_hf_datasets
    from .shards import build_shard_datasets
    return build_shard_datasets


def build_dataset(is_train: bool, config: Any) -> Tuple[Any, int]:
    """``(dataset, num_classes)`` for the training or validation split of ``DATA.FORMAT``:
    ``DATA.DATA_PATH/train`` or ``/val`` (ImageNet layout), the split's tar shards (:mod:`data.shards`)
    or its Hugging Face files (:mod:`data.hf`)."""
    _check_dataset_name(config)
    split = 'train' if is_train else 'val'
    if data_format(config) != 'folder':
        dataset = _source_builder(config)(config, build_transform(True, config) if is_train else None,
                                          None if is_train else build_transform(False, config), splits=(split,))[split]
        return dataset, len(dataset.classes)
    root = _data_root(config)
    check_data_root(root, splits=(split,))
    dataset = SafeImageFolder(os.path.join(root, split), transform=build_transform(is_train, config))
    return dataset, len(dataset.classes)


def build_datasets(config: Any) -> Tuple[Any, Any, int]:
    """``(train, val, num_classes)``, both splits held to one class list (``DATA.FORMAT``)."""
    _check_dataset_name(config)
    if data_format(config) != 'folder':
        datasets = _source_builder(config)(config, build_transform(True, config), build_transform(False, config))
        return datasets['train'], datasets['val'], len(datasets['train'].classes)
    check_data_root(_data_root(config), splits=('train', 'val'))
    dataset_train, num_classes = build_dataset(is_train=True, config=config)
    dataset_val, _ = build_dataset(is_train=False, config=config)
    return dataset_train, dataset_val, num_classes


# ----------------------------------------------------------------------------- mixup
class OddSafeMixup(Mixup):
    """timm ``Mixup`` that accepts odd batches by dropping their last sample.

    timm pairs sample ``i`` with sample ``B-1-i`` and asserts an even ``B``; after corrupt files
    are skipped a batch can be odd. Dropping one sample (images and targets alike) is cheaper
    than padding and biases nothing. A batch of fewer than two samples comes back empty, with
    soft targets of shape ``[0, num_classes]``.
    """

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0] - x.shape[0] % 2
        if n == 0:
            return x[:0], torch.zeros(0, self.num_classes, device=x.device)
        if n != x.shape[0]:
            x, target = x[:n], target[:n]
        return super().__call__(x, target)


def build_mixup(config: Any) -> Optional[OddSafeMixup]:
    """Mixup/CutMix from ``AUG.*`` with ``MODEL.LABEL_SMOOTHING``, or None when both are off."""
    aug = config.AUG
    active = aug.MIXUP > 0 or aug.CUTMIX > 0 or aug.CUTMIX_MINMAX is not None
    if not active:
        return None
    return OddSafeMixup(
        mixup_alpha=aug.MIXUP, cutmix_alpha=aug.CUTMIX, cutmix_minmax=aug.CUTMIX_MINMAX,
        prob=aug.MIXUP_PROB, switch_prob=aug.MIXUP_SWITCH_PROB, mode=aug.MIXUP_MODE,
        label_smoothing=config.MODEL.LABEL_SMOOTHING, num_classes=config.MODEL.NUM_CLASSES)


# ----------------------------------------------------------------------------- loaders
def _pin_memory(config: Any) -> bool:
    # Pinning without an accelerator only produces a warning per loader iteration.
    return bool(config.DATA.PIN_MEMORY) and torch.cuda.is_available()


def _check_class_count(config: Any, num_classes: int, val_alone: str = '') -> None:
    """The dataset's classes against ``MODEL.NUM_CLASSES``: more is an error, fewer a warning; for a
    ``val/`` folder read without its ``train/`` (``val_alone``) any other count is an error, since
    folder labels are positions in the sorted class folders and would label images wrongly."""
    wanted = int(config.MODEL.NUM_CLASSES)
    if val_alone and num_classes != wanted:
        raise DataError(f"'{val_alone}' has {num_classes} classes but the model has MODEL.NUM_CLASSES {wanted}: "
                        f"evaluate on the split the model was trained for (every class folder), or put its "
                        f"train/ beside val/")
    if num_classes > wanted:
        raise DataError(f"the dataset has {num_classes} classes but MODEL.NUM_CLASSES is {wanted}: set "
                        f"MODEL.NUM_CLASSES {num_classes} (--opts MODEL.NUM_CLASSES {num_classes})")
    if num_classes < wanted:
        _logger.warning("the dataset has %d classes, fewer than MODEL.NUM_CLASSES=%d", num_classes, wanted)


def _val_loader(config: Any, dataset_val: Any, device: Union[str, torch.device, None], common: dict):
    """Every validation image exactly once across ranks, in order."""
    num_replicas, rank = dist_info()
    loader = SafeDataLoader(dataset_val, sampler=DistributedEvalSampler(dataset_val, num_replicas=num_replicas,
                                                                        rank=rank),
                            batch_size=int(config.DATA.BATCH_SIZE), shuffle=False, drop_last=False, **common)
    return DeviceNormalizeLoader(loader, device=device) if config.DATA.DEVICE_NORMALIZE else loader


def build_loader(config: Any, device: Union[str, torch.device, None] = None,
                 worker_init_fn: Optional[Callable[[int], None]] = None, train: bool = True):
    """``(dataset_train, dataset_val, data_loader_train, data_loader_val, mixup_fn)``; with
    ``train=False`` (evaluation) only the validation split is read and the training entries are None.

    ``worker_init_fn`` runs in every loader worker process (the training side passes one that
    leaves stop signals to the main process).

    Works with and without an initialised process group. See the module docstring for what
    the loaders yield and how to resume. With ``DATA.DEVICE_NORMALIZE`` the workers ship uint8
    images and both loaders are :class:`DeviceNormalizeLoader` wrappers that normalise (and, for
    training, randomly erase) on ``device`` (default: the CPU).
    """
    collate = SkipBadCollate(image_size=int(config.DATA.IMG_SIZE), uint8=bool(config.DATA.DEVICE_NORMALIZE))
    common = dict(num_workers=int(config.DATA.NUM_WORKERS), pin_memory=_pin_memory(config),
                  collate_fn=collate, worker_init_fn=worker_init_fn)
    num_replicas, rank = dist_info()
    root = _data_root(config)
    if not train:
        dataset_val, num_classes = build_dataset(is_train=False, config=config)
        _logger.info("rank %d/%d: %d val images in %d classes from %s (%s)", rank, num_replicas,
                     len(dataset_val), num_classes, root, data_format(config))
        alone = data_format(config) == 'folder' and not os.path.isdir(os.path.join(root, 'train'))
        _check_class_count(config, num_classes, os.path.join(root, 'val') if alone else '')
        return None, dataset_val, None, _val_loader(config, dataset_val, device, common), None
    dataset_train, dataset_val, num_classes = build_datasets(config)
    _logger.info("rank %d/%d: %d train and %d val images in %d classes from %s (%s)", rank, num_replicas,
                 len(dataset_train), len(dataset_val), num_classes, root, data_format(config))
    _check_class_count(config, num_classes)

    batch_size = int(config.DATA.BATCH_SIZE)
    if len(dataset_train) < batch_size * num_replicas:
        raise DataError(f"{len(dataset_train)} training images cannot fill one batch of "
                        f"{batch_size} on each of {num_replicas} process(es): lower DATA.BATCH_SIZE "
                        f"(--batch-size) or add images")
    sampler_train = ResumableDistributedSampler(
        dataset_train, num_replicas=num_replicas, rank=rank, shuffle=True,
        seed=int(config.SEED), batch_size=batch_size)
    data_loader_train = SafeDataLoader(
        dataset_train, sampler=sampler_train, batch_size=batch_size, drop_last=True,
        generator=torch.Generator(), seed=int(config.SEED) + rank, **common)
    if config.DATA.DEVICE_NORMALIZE:
        aug = config.AUG
        data_loader_train = DeviceNormalizeLoader(
            data_loader_train, device=device, re_prob=aug.REPROB, re_mode=aug.REMODE, re_count=aug.RECOUNT)
    data_loader_val = _val_loader(config, dataset_val, device, common)
    return dataset_train, dataset_val, data_loader_train, data_loader_val, build_mixup(config)
