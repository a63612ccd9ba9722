"""Data pipeline: ImageNet-layout folders, WebDataset tar shards and local Hugging Face datasets
(``DATA.FORMAT``), transforms, samplers, loaders and mixup.

See :mod:`data.build` for the loader contract: every loader yields 3-tuples
``(images, targets, n_skipped)``. Names are imported lazily, so ``python -m data.demo`` does
not pay for importing torch and timm.
"""
from importlib import import_module
from typing import Any

from .errors import DataError

_EXPORTS = {
    'build_loader': 'build', 'build_dataset': 'build', 'build_datasets': 'build', 'build_transform': 'build',
    'TarShardDataset': 'shards', 'HFImageDataset': 'hf',
    'build_mixup': 'build', 'OddSafeMixup': 'build',
    'SafeImageFolder': 'folder', 'SafeDataLoader': 'folder', 'SkipBadCollate': 'folder',
    'load_rgb': 'folder', 'to_rgb': 'folder', 'check_data_root': 'folder',
    'ResumableDistributedSampler': 'samplers', 'DistributedEvalSampler': 'samplers',
    'eval_indices': 'samplers',
    'make_demo_dataset': 'demo',
    'eval_resize': 'build', 'DeviceNormalizeLoader': 'device',
    'class_folders': 'discovery', 'find_samples': 'discovery',
    'loader_throughput': 'throughput',
}

__all__ = ['DataError'] + list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f'.{_EXPORTS[name]}', __name__), name)
    raise AttributeError(f"module 'data' has no attribute '{name}'")


def __dir__():
    return sorted(__all__)
