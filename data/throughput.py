"""Images per second of the data loaders, per worker: the float pipeline against
``DATA.DEVICE_NORMALIZE`` (uint8 batches normalised on the device).

    python -m data.throughput --cfg configs/dat_tiny.yaml --data-path /imagenet --workers 1 2 --batches 50

prints one JSON line per (pipeline, workers). :func:`loader_throughput` is the function the
benchmark tool calls.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Dict, Optional, Sequence, Union

import torch

__all__ = ['loader_throughput', 'sync_device']


def sync_device(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op off CUDA), so that a clock read after it is fair."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def loader_throughput(config: Any, device_normalize: bool, num_workers: int, batches: int = 30,
                      warmup: int = 5, device: Union[str, torch.device, None] = None,
                      train: bool = True) -> Dict[str, Any]:
    """Time ``batches`` batches of the training (or validation) loader built from ``config`` with
    ``DATA.DEVICE_NORMALIZE = device_normalize`` and ``DATA.NUM_WORKERS = num_workers``, after
    ``warmup`` batches (worker start-up). Batches arrive normalised on ``device`` in both
    pipelines, so the two numbers compare like for like; the float pipeline's copy to the
    device is counted too."""
    from .build import build_loader

    device = torch.device(device if device is not None else 'cpu')
    cfg = config.clone()
    cfg.defrost()
    cfg.DATA.DEVICE_NORMALIZE = bool(device_normalize)
    cfg.DATA.NUM_WORKERS = int(num_workers)
    cfg.freeze()
    _, _, loader_train, loader_val, _ = build_loader(cfg, device=device)
    loader = loader_train if train else loader_val
    if train:
        loader.sampler.set_epoch(0)
    it = iter(loader)
    images_seen = measured = 0
    start = None
    for i, (images, targets, _) in enumerate(it):
        images = images.to(device, non_blocking=True)
        if i == warmup:
            sync_device(device)
            start = time.perf_counter()
        elif i > warmup:
            images_seen += images.shape[0]
            measured += 1
            if measured == batches:
                break
    if start is None or measured == 0:
        raise ValueError(f"the loader has {len(loader)} batches; need more than warmup={warmup}")
    sync_device(device)
    elapsed = time.perf_counter() - start
    per_second = images_seen / elapsed
    return {'pipeline': 'device_normalize' if device_normalize else 'float', 'workers': int(num_workers),
            'device': str(device), 'batch_size': int(cfg.DATA.BATCH_SIZE), 'batches': measured,
            'images_per_s': per_second, 'images_per_s_per_worker': per_second / max(int(num_workers), 1)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from config import ConfigError, load_config

    from .errors import DataError

    parser = argparse.ArgumentParser(prog='python -m data.throughput', description=__doc__.splitlines()[0])
    parser.add_argument('--cfg', required=True)
    parser.add_argument('--data-path', required=True)
    parser.add_argument('--workers', type=int, nargs='+', default=[1, 2])
    parser.add_argument('--batches', type=int, default=30)
    parser.add_argument('--warmup', type=int, default=5)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--val', action='store_true', help='time the validation loader instead')
    parser.add_argument('--opts', nargs='+', default=[])
    args = parser.parse_args(argv)
    try:
        config = load_config(args.cfg, ['DATA.DATA_PATH', args.data_path, *args.opts])
        for workers in args.workers:
            for device_normalize in (False, True):
                result = loader_throughput(config, device_normalize, workers, args.batches, args.warmup,
                                           args.device, train=not args.val)
                print(json.dumps(result), flush=True)
    except (ConfigError, DataError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
