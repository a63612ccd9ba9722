"""ImageNet-style folders that survive bad files, and the collate/loader pair that reports them.

``SafeImageFolder`` is torchvision's ``ImageFolder`` with four changes:

* classes and images are found by :mod:`data.discovery`, the rule :func:`check_data_root` uses
  too: hidden entries are ignored, and each real folder is entered once (symlink loops refused);
* every image is decoded to 8-bit RGB, whatever its mode: grayscale (``L``, ``1``), palette
  (``P``), ``CMYK``, 16/32-bit integer and float grayscale (rescaled, not clipped) and images
  with transparency (``RGBA``, ``LA``, ``PA``, palette or RGB with a transparent colour),
  whose alpha is **composited onto a white background** (so transparent regions become white
  rather than whatever colour the invisible pixels happened to store);
* a file that cannot be decoded (truncated, corrupt, not an image, unreadable) does not raise:
  the sample is a :class:`BadSample` marker holding the path and the reason;
* the root is checked first, and every problem a user can fix is a :class:`DataError` with a
  one-line message naming the problem and the fix.

``SkipBadCollate`` drops the markers from a batch and returns ``(images, targets, n_skipped)``;
``SafeDataLoader`` logs one warning per skipped file (logger ``'dat.data'``) *in the main
process*, so the warning reaches the run's log handlers even when the file was read by a
worker process, and yields ``n_skipped`` as a plain ``int``. A batch in which every file was
bad yields no images (``[0, 3, S, S]``; uint8 ``[0, S, S, 3]`` for the device-normalised
pipeline), ``targets`` of shape ``[0]`` and ``n_skipped > 0``: training loops must skip such a batch.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, get_worker_info
from torch.utils.data._utils.collate import default_collate
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from .discovery import class_folders, find_samples
from .errors import DataError

__all__ = [
    'DataError', 'BadSample', 'SkipCount', 'SafeImageFolder', 'SkipBadCollate', 'SafeDataLoader',
    'pack_images', 'load_rgb', 'to_rgb', 'is_image_file', 'check_data_root', 'DATA_PATH_ENV',
]

_logger = logging.getLogger('dat.data')

# Environment variable the launch scripts use to pass the dataset root.
DATA_PATH_ENV = 'DAT_DATA_PATH'
# At most this many names are listed in an error message.
_MAX_LISTED = 5


class BadSample(NamedTuple):
    """Returned by ``SafeImageFolder`` in place of ``(image, target)`` for an unreadable file."""
    path: str
    reason: str


class SkipCount(int):
    """An ``int`` (the number of skipped files) that also carries their paths and reasons.

    The collate function returns it so the 3-tuple contract holds at every level, while the
    loader can still log *which* files were skipped.
    """
    skipped: Tuple[BadSample, ...]

    def __new__(cls, skipped: Sequence[BadSample] = ()) -> 'SkipCount':
        obj = super().__new__(cls, len(skipped))
        obj.skipped = tuple(skipped)
        return obj

    def __reduce__(self):  # keep the paths when a worker process pickles the batch
        return SkipCount, (self.skipped,)


# ----------------------------------------------------------------------------- decoding
def is_image_file(path: str) -> bool:
    """A file with a known image extension that is not hidden (skips macOS ``._x.jpg`` forks)."""
    name = os.path.basename(path)
    return not name.startswith('.') and name.lower().endswith(IMG_EXTENSIONS)


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or 'transparency' in img.info


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """Rescale a 16/32-bit integer or float grayscale image to 8 bits.

    PIL's own conversion clips such values at 255, which turns most 16-bit images white.
    Integer images are read as 16-bit (the common PNG/TIFF case; larger values saturate),
    float images as [0, 1] when they fit there and as [0, 255] otherwise.
    """
    arr = np.asarray(img)
    if arr.dtype.kind == 'f':
        arr = np.nan_to_num(arr.astype(np.float64))
        scale = 255.0 if arr.size and np.abs(arr).max() <= 1.0 else 1.0
        arr = arr * scale
    else:
        arr = arr.astype(np.float64) / 257.0    # 65535 -> 255
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode='L')


def to_rgb(img: Image.Image) -> Image.Image:
    """Return ``img`` as an 8-bit RGB image (alpha composited onto white; see module docstring)."""
    if img.mode == 'RGB' and 'transparency' not in img.info:
        return img
    if img.mode in ('I', 'F') or img.mode.startswith('I;'):
        return _high_depth_to_l(img).convert('RGB')
    if _has_alpha(img):
        rgba = img.convert('RGBA')
        background = Image.new('RGB', rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel('A'))
        return background
    return img.convert('RGB')


def load_rgb(path: str) -> Image.Image:
    """Decode ``path`` fully (so truncation is detected here, not inside a transform) to RGB."""
    with open(path, 'rb') as f:
        img = Image.open(f)
        img.load()
        return to_rgb(img)


# ----------------------------------------------------------------------------- validation
def _listed(names: Sequence[str]) -> str:
    names = sorted(names)
    shown = ', '.join(names[:_MAX_LISTED])
    return shown + (f' (and {len(names) - _MAX_LISTED} more)' if len(names) > _MAX_LISTED else '')


def _class_dirs(split_dir: str) -> List[str]:
    return class_folders(split_dir)


def check_data_root(root: str, splits: Sequence[str] = ('train', 'val')) -> None:
    """Raise :class:`DataError` unless ``root`` holds every split in ``splits`` with class folders,
    and every split present (among train/val) has the same class folders."""
    if not root:
        raise DataError(f"DATA.DATA_PATH is empty: pass --data-path or set {DATA_PATH_ENV} to the "
                        f"folder holding train/ and val/")
    if not os.path.isdir(root):
        raise DataError(f"data path '{root}' does not exist or is not a folder: pass --data-path or "
                        f"set {DATA_PATH_ENV} to the folder holding train/ and val/")
    for split in splits:
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            raise DataError(f"data path '{root}' has no '{split}/' folder: it must hold train/ and "
                            f"val/, each with one sub-folder per class (ImageNet layout)")
        _require_class_dirs(split_dir)
    present = [s for s in ('train', 'val') if os.path.isdir(os.path.join(root, s))]
    if len(present) == 2:
        train, val = (set(_class_dirs(os.path.join(root, s))) for s in present)
        if train != val:
            parts = []
            if train - val:
                parts.append(f"only in train/: {_listed(train - val)}")
            if val - train:
                parts.append(f"only in val/: {_listed(val - train)}")
            raise DataError(f"class folders differ between '{root}/train' and '{root}/val' "
                            f"({'; '.join(parts)}): both splits need the same class folders")


def _require_class_dirs(split_dir: str) -> None:
    if not _class_dirs(split_dir):
        raise DataError(f"'{split_dir}' has no class folders: put each class's images in "
                        f"'{split_dir}/<class name>/'")


# ----------------------------------------------------------------------------- dataset
class SafeImageFolder(ImageFolder):
    """``ImageFolder`` that decodes to RGB and returns :class:`BadSample` for unreadable files.

    Only decoding is guarded: an exception raised by ``transform`` is a bug and propagates.
    Class folders and images are found by :mod:`data.discovery` (hidden entries ignored, each
    real folder entered once), the rule :func:`check_data_root` applies too. Class folders
    without images are accepted with a warning (they keep their class index); a split without
    any image is a :class:`DataError`.
    """

    def __init__(self, root: str, transform: Optional[Callable] = None,
                 target_transform: Optional[Callable] = None) -> None:
        if not os.path.isdir(root):
            raise DataError(f"'{root}' is not a folder: point DATA.DATA_PATH (--data-path) at the "
                            f"folder holding train/ and val/")
        _require_class_dirs(root)
        super().__init__(root, transform=transform, target_transform=target_transform,
                         loader=load_rgb, is_valid_file=is_image_file, allow_empty=True)
        if not self.samples:
            raise DataError(f"'{root}' has class folders but no images "
                            f"({', '.join(e.lstrip('.') for e in IMG_EXTENSIONS)}): add images to "
                            f"'{root}/<class name>/'")
        counts = np.bincount(np.asarray(self.targets), minlength=len(self.classes))
        empty = [c for c, n in zip(self.classes, counts) if n == 0]
        if empty:
            _logger.warning("%s: %d class folder(s) hold no images: %s", root, len(empty), _listed(empty))

    def find_classes(self, directory: str) -> Tuple[List[str], Dict[str, int]]:
        classes = class_folders(directory)
        return classes, {name: i for i, name in enumerate(classes)}

    @staticmethod
    def make_dataset(directory: str, class_to_idx: Optional[Dict[str, int]] = None,
                     extensions: Any = None, is_valid_file: Optional[Callable[[str], bool]] = None,
                     allow_empty: bool = False) -> List[Tuple[str, int]]:
        if class_to_idx is None:
            class_to_idx = {name: i for i, name in enumerate(class_folders(directory))}
        return find_samples(directory, class_to_idx, is_valid_file or is_image_file)

    def __getitem__(self, index: int) -> Any:
        path, target = self.samples[index]
        try:
            img = self.loader(path)
        except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, struct.error, ...
            return BadSample(path, f'{type(e).__name__}: {e}'.splitlines()[0])
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


# ----------------------------------------------------------------------------- batching
def pack_images(images: Sequence[Image.Image]) -> torch.Tensor:
    """Same-size RGB images as one ``uint8`` NHWC batch, each written once into place.

    Inside a loader worker the batch is made in shared memory, so it reaches the main process
    without another copy (as ``default_collate`` does). Channels-last is the images' own layout:
    no transposing copy in the worker.
    """
    first = images[0]
    for img in images:
        if img.mode != 'RGB' or img.size != first.size:
            raise DataError(f"cannot batch a {img.mode} {img.size[0]}x{img.size[1]} image with a "
                            f"{first.mode} {first.size[0]}x{first.size[1]} one: the uint8 pipeline "
                            f"(DATA.DEVICE_NORMALIZE) needs transforms that end at same-size RGB images")
    width, height = first.size
    batch = torch.empty(len(images), height, width, 3, dtype=torch.uint8)
    if get_worker_info() is not None:
        batch.share_memory_()
    array = batch.numpy()
    for i, img in enumerate(images):
        array[i] = np.asarray(img)
    return batch


class SkipBadCollate:
    """Collate ``(image, target)`` samples into ``(images, targets, n_skipped)``, dropping markers.

    ``n_skipped`` is a :class:`SkipCount`. Tensor images are stacked (``default_collate``); PIL
    images (the ``DATA.DEVICE_NORMALIZE`` transforms end there) become one ``uint8`` NHWC batch
    (:func:`pack_images`). ``image_size`` shapes the empty ``images`` of a batch whose every
    sample was bad: ``[0, 3, S, S]`` float, or ``[0, S, S, 3]`` uint8 with ``uint8=True``.
    """

    def __init__(self, image_size: int = 0, uint8: bool = False) -> None:
        self.image_size = int(image_size)
        self.uint8 = bool(uint8)

    def __call__(self, batch: Sequence[Any]) -> Tuple[torch.Tensor, torch.Tensor, SkipCount]:
        good = [s for s in batch if not isinstance(s, BadSample)]
        skipped = SkipCount([s for s in batch if isinstance(s, BadSample)])
        if not good:
            s = self.image_size
            images = torch.empty(0, s, s, 3, dtype=torch.uint8) if self.uint8 else torch.empty(0, 3, s, s)
            return images, torch.empty(0, dtype=torch.long), skipped
        if isinstance(good[0][0], Image.Image):
            images = pack_images([img for img, _ in good])
            return images, torch.as_tensor([t for _, t in good], dtype=torch.long), skipped
        images, targets = default_collate(good)
        return images, torch.as_tensor(targets, dtype=torch.long), skipped


def _dead_worker(iterator: Any, wait_s: float = 2.0) -> Optional[RuntimeError]:
    """torch's own error for a worker of ``iterator`` that has died (waiting ``wait_s`` for its exit
    to be seen), or None when all are alive."""
    workers = getattr(iterator, '_workers', None) or []
    deadline = time.monotonic() + wait_s
    while True:
        dead = [w for w in workers if w.exitcode not in (None, 0)]
        if dead or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if not dead:
        return None
    code = dead[0].exitcode
    if code < 0:
        return RuntimeError(f"DataLoader worker (pid {dead[0].pid}) is killed by signal: {signal.strsignal(-code)}.")
    return RuntimeError(f"DataLoader worker (pid(s) {', '.join(str(w.pid) for w in dead)}) exited unexpectedly")


class SafeDataLoader(DataLoader):
    """``DataLoader`` yielding ``(images, targets, n_skipped: int)`` that logs skipped files.

    Use it with :class:`SkipBadCollate`. Each iteration first re-seeds ``generator`` (when given)
    from ``seed`` and the sampler's epoch, so the worker processes' random streams (and thus the
    augmentations) depend only on (seed, epoch), not on how many epochs this process has run.
    """

    def __init__(self, *args: Any, seed: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seed = seed
        self._iterations = 0
        self.last_skipped: Optional[BadSample] = None     # the latest unreadable file, for messages

    def _reseed(self) -> None:
        if self.seed is None or self.generator is None:
            return
        epoch = getattr(self.sampler, 'epoch', self._iterations)
        state = np.random.SeedSequence([int(self.seed), int(epoch)]).generate_state(2, dtype=np.uint32)
        self.generator.manual_seed(int(state[0]) << 32 | int(state[1]))

    def __iter__(self):  # type: ignore[override]
        self._reseed()
        self._iterations += 1
        iterator = super().__iter__()
        while True:
            try:
                images, targets, n_skipped = next(iterator)
            except StopIteration:
                return
            except Exception:
                # A worker killed while handing over a batch surfaces as whatever broke in the
                # transfer (ConnectionResetError, EOFError, ...): report the death instead.
                dead = _dead_worker(iterator)
                if dead is None:
                    raise
                raise dead from None
            for bad in getattr(n_skipped, 'skipped', ()):
                _logger.warning("skipped unreadable image %s (%s)", bad.path, bad.reason)
                self.last_skipped = bad
            yield images, targets, int(n_skipped)


def class_counts(dataset: ImageFolder) -> Dict[str, int]:
    """Images per class name (handy for logging a dataset summary)."""
    counts = np.bincount(np.asarray(dataset.targets), minlength=len(dataset.classes))
    return {c: int(n) for c, n in zip(dataset.classes, counts)}
