"""Normalise on the training device: workers ship uint8 batches, the device does the float work.

Decoding and augmenting is what limits a loader worker; converting to float, normalising and
random erasing on the device frees the workers from that arithmetic and ships a quarter of the
bytes. :class:`DeviceNormalizeLoader` wraps a loader of uint8 NHWC batches (the transforms of
``build_transform(..., uint8=True)`` end at the image, and the collate writes each image once
into the batch in its own channels-last layout) and yields the same ``(images, targets,
n_skipped)`` 3-tuples as the float pipeline (float NCHW), with ``images`` and ``targets`` on
``device``. The result has the distribution of the float pipeline: normalisation is the same
affine map (equal to ~1e-7), and random erasing is timm's ``RandomErasing`` with the same
arguments, applied per image after normalisation exactly as in the float pipeline (only its
random draws come from the main process). Mixup stays where it is: the training loop applies
it to the device batch.

On CUDA the next batch is copied and normalised on a side stream while the current one is
used (timm's ``PrefetchLoader`` idea).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Iterator, Optional, Sequence, Tuple, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.random_erasing import RandomErasing

__all__ = ['DeviceNormalizeLoader', 'normalize_uint8']


def normalize_uint8(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(images / 255 - mean) / std`` as a contiguous float NCHW batch, for uint8 NHWC ``images``;
    ``mean``/``std`` already x255 and shaped ``(1, C, 1, 1)``. The layout changes on the uint8
    bytes, a quarter of the float ones."""
    return images.permute(0, 3, 1, 2).contiguous().float().sub_(mean).div_(std)


class DeviceNormalizeLoader:
    """Wrap ``loader`` (uint8 NHWC batches) so it yields normalised float NCHW batches on ``device``.

    ``re_prob > 0`` adds timm random erasing (``re_mode``, ``re_count``) on the device. Attributes
    other than iteration and ``len`` (``sampler``, ``dataset``, ``batch_size``, ...) are the
    wrapped loader's.
    """

    def __init__(self, loader: Any, device: Union[str, torch.device, None] = None,
                 mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD,
                 re_prob: float = 0.0, re_mode: str = 'pixel', re_count: int = 1) -> None:
        self.loader = loader
        self.device = torch.device(device if device is not None else 'cpu')
        self.mean = torch.tensor([255 * m for m in mean], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor([255 * s for s in std], device=self.device).view(1, 3, 1, 1)
        self.random_erasing = (RandomErasing(re_prob, mode=re_mode, max_count=re_count, device=self.device)
                               if re_prob > 0 else None)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        if name == 'loader':                # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.loader, name)

    def _prepare(self, images: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        channels = self.mean.shape[1]
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != channels:
            raise ValueError(f'DeviceNormalizeLoader takes uint8 NHWC batches with {channels} channels (as '
                             f'SkipBadCollate(uint8=True) packs them), got {images.dtype} {tuple(images.shape)}')
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        images = normalize_uint8(images, self.mean, self.std)
        if self.random_erasing is not None and images.shape[0]:
            images = self.random_erasing(images)
        return images, targets

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor, int]]:
        stream: Optional[torch.cuda.Stream] = (
            torch.cuda.Stream(self.device) if self.device.type == 'cuda' else None)
        pending = None
        for images, targets, n_skipped in self.loader:
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                images, targets = self._prepare(images, targets)
            if stream is None:
                yield images, targets, n_skipped
                continue
            if pending is not None:
                yield pending
            torch.cuda.current_stream(self.device).wait_stream(stream)
            # Made on the side stream, used and freed on the main one: tell the allocator.
            images.record_stream(torch.cuda.current_stream(self.device))
            targets.record_stream(torch.cuda.current_stream(self.device))
            pending = (images, targets, n_skipped)
        if pending is not None:
            yield pending
