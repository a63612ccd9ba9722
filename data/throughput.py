"""Images per second of the data loaders, per worker: the float pipeline against
``DATA.DEVICE_NORMALIZE`` (uint8 batches normalised on the device), or, with ``--shards``, the
folder source against the same images as WebDataset tar shards (``DATA.FORMAT 'wds'``).

    python -m data.throughput --cfg configs/dat_tiny.yaml --data-path /imagenet --workers 1 2 --batches 50
    python -m data.throughput --cfg configs/dat_tiny.yaml --data-path /imagenet --shards /imagenet-wds

prints one JSON line per (workers, round, pipeline), the pipelines alternating round by round,
then one summary line per worker count: the median images/s of each pipeline and their ratio
(``--shards``: of each source, ``ratio`` = shards / folder).
On a CPU the main process stands in for the device and runs with ``--main-threads`` (default 1)
threads, so that the device's work does not take the cores the workers run on.
:func:`compare_pipelines` is what the benchmark tool calls.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

__all__ = ['compare_pipelines', 'compare_sources', 'loader_throughput', 'sync_device']


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
    return {'pipeline': 'device_normalize' if device_normalize else 'float',
            'source': str(cfg.DATA.FORMAT), 'workers': int(num_workers),
            'device': str(device), 'batch_size': int(cfg.DATA.BATCH_SIZE), 'batches': measured,
            'images_per_s': per_second, 'images_per_s_per_worker': per_second / max(int(num_workers), 1)}


def _alternating(variants: Dict[str, Any], num_workers: int, batches: int, warmup: int, rounds: int,
                 device: Union[str, torch.device, None], train: bool, main_threads: int,
                 on_result: Optional[Callable[[Dict[str, Any]], None]]) -> Tuple[Dict[str, float], Dict[str, Any]]:
    """Time each ``(config, device_normalize)`` of ``variants`` once a round, the order reversed every
    other round so that none always runs first; ``(median images/s per worker by name, last result)``.
    On a CPU the main process (the device's work) runs with ``main_threads`` threads meanwhile."""
    per_worker: Dict[str, List[float]] = {name: [] for name in variants}
    result: Dict[str, Any] = {}
    threads = torch.get_num_threads()
    if torch.device(device if device is not None else 'cpu').type == 'cpu':
        torch.set_num_threads(main_threads)
    try:
        for r in range(rounds):
            for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
                config, device_normalize = variants[name]
                result = loader_throughput(config, device_normalize, num_workers, batches, warmup, device, train)
                result['round'] = r + 1
                per_worker[name].append(result['images_per_s_per_worker'])
                if on_result is not None:
                    on_result(result)
    finally:
        torch.set_num_threads(threads)
    return {name: statistics.median(values) for name, values in per_worker.items()}, result


def compare_pipelines(config: Any, num_workers: int, batches: int = 30, warmup: int = 5, rounds: int = 3,
                      device: Union[str, torch.device, None] = None, train: bool = True, main_threads: int = 1,
                      on_result: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Both pipelines, alternating for ``rounds`` rounds: the median images/s per worker of each,
    ``ratio`` = device-normalised / float, and ``images_timed`` per measurement. On a CPU the
    main process, which does the device's work, runs with ``main_threads`` threads meanwhile, so
    that it does not take the workers' cores. ``on_result`` sees every single measurement."""
    medians, result = _alternating({'float': (config, False), 'device_normalize': (config, True)}, num_workers,
                                   batches, warmup, rounds, device, train, main_threads, on_result)
    return {'workers': int(num_workers), 'device': result['device'], 'batch_size': result['batch_size'],
            'rounds': int(rounds), 'images_timed': result['batches'] * result['batch_size'],
            'float_per_worker': medians['float'], 'device_normalize_per_worker': medians['device_normalize'],
            'ratio': medians['device_normalize'] / medians['float']}


def compare_sources(config: Any, shards_path: str, num_workers: int, batches: int = 30, warmup: int = 5,
                    rounds: int = 3, device: Union[str, torch.device, None] = None, train: bool = True,
                    main_threads: int = 1,
                    on_result: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """The folder source of ``config`` and the WebDataset shards at ``shards_path`` (the same
    images), alternating for ``rounds`` rounds in ``config``'s pipeline: the median images/s per
    worker of each and ``ratio`` = shards / folder."""
    variants = {}
    for name in ('folder', 'wds'):
        cfg = config.clone()
        cfg.defrost()
        cfg.DATA.FORMAT = name
        if name == 'wds':
            cfg.DATA.DATA_PATH = shards_path
        cfg.freeze()
        variants[name] = (cfg, bool(cfg.DATA.DEVICE_NORMALIZE))
    medians, result = _alternating(variants, num_workers, batches, warmup, rounds, device, train, main_threads,
                                   on_result)
    return {'workers': int(num_workers), 'device': result['device'], 'batch_size': result['batch_size'],
            'pipeline': result['pipeline'], 'rounds': int(rounds),
            'images_timed': result['batches'] * result['batch_size'],
            'folder_per_worker': medians['folder'], 'wds_per_worker': medians['wds'],
            'ratio': medians['wds'] / medians['folder']}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from config import ConfigError, load_config

    from .errors import DataError

    parser = argparse.ArgumentParser(prog='python -m data.throughput', description=__doc__.splitlines()[0])
    parser.add_argument('--cfg', required=True)
    parser.add_argument('--data-path', required=True)
    parser.add_argument('--workers', type=int, nargs='+', default=[1, 2])
    parser.add_argument('--batches', type=int, default=30)
    parser.add_argument('--warmup', type=int, default=5)
    parser.add_argument('--rounds', type=int, default=3, help='alternating rounds of the two pipelines (medians)')
    parser.add_argument('--main-threads', type=int, default=1,
                        help="torch threads of the main process when --device is cpu (it does the device's work)")
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--val', action='store_true', help='time the validation loader instead')
    parser.add_argument('--shards', default='',
                        help='WebDataset shards of the same images (tools/prepare_imagenet.py shards): compare '
                             'the two sources instead of the two pipelines')
    parser.add_argument('--opts', nargs='+', default=[])
    args = parser.parse_args(argv)
    try:
        if args.rounds < 1 or args.main_threads < 1:
            raise ValueError(f'--rounds and --main-threads must be >= 1, got {args.rounds} and {args.main_threads}')
        config = load_config(args.cfg, ['DATA.DATA_PATH', args.data_path, *args.opts])
        for workers in args.workers:
            common = dict(train=not args.val, main_threads=args.main_threads,
                          on_result=lambda r: print(json.dumps(r), flush=True))
            if args.shards:
                summary = compare_sources(config, args.shards, workers, args.batches, args.warmup, args.rounds,
                                          args.device, **common)
            else:
                summary = compare_pipelines(config, workers, args.batches, args.warmup, args.rounds, args.device,
                                            **common)
            print(json.dumps({'summary': summary}), flush=True)
    except (ConfigError, DataError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
