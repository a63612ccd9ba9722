#!/usr/bin/env python
"""Export the model weights of a checkpoint to a ``.safetensors`` file.

    python tools/export_safetensors.py --ckpt output/dat_tiny/default/best.pth --out dat_tiny.safetensors
    python tools/export_safetensors.py --ckpt ckpt_epoch_299.pth --out dat_tiny_ema.safetensors --ema

Only weights are written (no optimizer, scheduler or RNG state): the model state dict, or with
``--ema`` the checkpoint's EMA weights. Names lose ``module.`` / ``_orig_mod.`` prefixes,
tensors are made contiguous and unshared, and the written file is read back and compared
tensor by tensor before it is renamed into place. The result loads with
``safetensors.torch.load_file``, as ``--pretrained`` for fine-tuning (the checkpoint loaders
read ``.safetensors``), and through timm with ``timm.create_model('dat_pp_tiny',
pretrained=True, pretrained_cfg_overlay=dict(file='dat_tiny.safetensors'))``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from checkpoint import CheckpointError, load_checkpoint_file, strip_prefixes, unwrap_state_dict  # noqa: E402
from checkpoint.files import _remove_quietly, _temp_path, _write_failed  # noqa: E402


def extract_weights(ckpt: dict, ema: bool = False, source: str = 'checkpoint') -> Dict[str, torch.Tensor]:
    """The weights to export from a loaded checkpoint: contiguous, unshared, prefix-free."""
    if ema:
        state = ckpt.get('ema')
        if not isinstance(state, dict) or not state:
            raise CheckpointError(f"{source} has no 'ema' weights (it was trained without TRAIN.EMA.ENABLE); "
                                  f"drop --ema to export the model weights")
    else:
        state = unwrap_state_dict(ckpt)
    weights = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: entry {name!r} is a {type(value).__name__}, not a tensor")
        # clone(): safetensors refuses tensors sharing storage (views, tied weights).
        weights[strip_prefixes(name)] = value.detach().cpu().contiguous().clone()
    return weights


def verify(path: str, expected: Dict[str, torch.Tensor]) -> None:
    """Read ``path`` back; raise CheckpointError unless names, dtypes, shapes and values are identical."""
    from safetensors.torch import load_file

    loaded = load_file(path, device='cpu')
    if set(loaded) != set(expected):
        missing, extra = sorted(set(expected) - set(loaded)), sorted(set(loaded) - set(expected))
        raise CheckpointError(f"round-trip check of {path} failed: missing {missing[:4]}, extra {extra[:4]}")
    for name, value in expected.items():
        got = loaded[name]
        if got.dtype != value.dtype or got.shape != value.shape or not torch.equal(got, value):
            raise CheckpointError(f"round-trip check of {path} failed at {name!r}: the written tensor differs")


def export(ckpt_path: str, out_path: str, ema: bool = False) -> Dict[str, torch.Tensor]:
    """Write the weights of ``ckpt_path`` to ``out_path`` atomically and verify them; returns them."""
    from safetensors.torch import save_file

    if not out_path.endswith('.safetensors'):
        raise CheckpointError(f"--out should end with .safetensors, got {out_path}")
    if os.path.abspath(ckpt_path) == os.path.abspath(out_path):
        raise CheckpointError("--out must differ from --ckpt")
    weights = extract_weights(load_checkpoint_file(ckpt_path), ema, ckpt_path)
    tmp: Optional[str] = None
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        tmp = _temp_path(out_path)
        save_file(weights, tmp, metadata={'format': 'pt', 'weights': 'ema' if ema else 'model',
                                          'source': os.path.basename(ckpt_path)})
        verify(tmp, weights)
        os.replace(tmp, out_path)     # only a verified file ever appears under the final name
        tmp = None
    except CheckpointError:
        raise
    except Exception as e:            # a full disk, a read-only folder, the safetensors writer's errors
        raise _write_failed(out_path, e) from e
    finally:
        if tmp is not None:
            _remove_quietly(tmp)
    return weights


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description='Export checkpoint weights to safetensors.')
    parser.add_argument('--ckpt', required=True, help='checkpoint (.pth) to read, weights-only')
    parser.add_argument('--out', required=True, help='.safetensors file to write')
    parser.add_argument('--ema', action='store_true', help="export the checkpoint's 'ema' weights")
    args = parser.parse_args(argv)
    try:
        weights = export(args.ckpt, args.out, args.ema)
    except CheckpointError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    count = sum(t.numel() for t in weights.values())
    print(f"wrote {len(weights)} tensors ({count:,} values, {'EMA' if args.ema else 'model'} weights) "
          f"to {args.out}; round-trip check passed")
    return 0


if __name__ == '__main__':
    sys.exit(main())
