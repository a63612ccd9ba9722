#!/usr/bin/env python
"""Re-save a trusted checkpoint that holds Python objects as a tensors-only ``{'model': state_dict}``.

The training code reads checkpoints without running code from them: tensors and plain values
only, plus the yacs config that official training checkpoints pickle (rebuilt as a plain dict).
A file that pickles any other Python object (an ``argparse.Namespace``, a model class, ...) is
refused. This tool unpickles such a file fully -- which can run code embedded in it, so use it
only on files from a source you trust -- and writes the model weights alone to a new file that
then loads safely everywhere.

    python tools/convert_checkpoint.py --in dat_tiny_in1k_224.pth --out dat_tiny_weights.pth
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from checkpoint import CheckpointError, atomic_save, strip_prefixes, unwrap_state_dict  # noqa: E402


def convert(src: str, dst: str) -> int:
    """Write the model state dict of ``src`` to ``dst``; returns the number of tensors written."""
    if not os.path.isfile(src):
        raise CheckpointError(f"input checkpoint not found: {src}")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise CheckpointError("--out must differ from --in (the original is kept)")
    # Explicitly requested by the user: full unpickling of a file they trust.
    try:
        ckpt = torch.load(src, map_location='cpu', weights_only=False)
    except Exception as e:  # unpickling can fail in many ways (missing modules, corruption)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"could not unpickle {src}: {reason} (a module the file refers to may be "
                              f"missing, or the file is damaged)") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{src} holds a {type(ckpt).__name__}, not a dict with model weights")
    state_dict = {strip_prefixes(k): v.detach().clone().contiguous()
                  for k, v in unwrap_state_dict(ckpt).items()}
    atomic_save({'model': state_dict}, dst)
    return len(state_dict)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--in', dest='src', required=True, help='trusted checkpoint to convert')
    parser.add_argument('--out', dest='dst', required=True, help='tensors-only checkpoint to write')
    args = parser.parse_args(argv)
    print(f"WARNING: fully unpickling {args.src}; this can run code stored in the file, "
          f"so only convert files you trust", file=sys.stderr)
    try:
        count = convert(args.src, args.dst)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {count} tensors to {args.dst} as {{'model': state_dict}}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
