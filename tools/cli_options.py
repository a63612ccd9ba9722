"""Command-line options the model tools (``flops.py``, ``visualize.py``) share."""
from __future__ import annotations

import argparse


class _ImageSize(argparse.Action):
    """``N`` or ``H W`` -> ``(H, W)``; any other count of values is a usage error."""

    def __call__(self, parser, namespace, values, option_string=None):
        if len(values) not in (1, 2):
            parser.error(f'{option_string} takes N or H W')
        setattr(namespace, self.dest, (values[0], values[-1]))


def add_img_size_option(parser: argparse.ArgumentParser, help: str) -> None:
    """``--img-size N | H W``, parsed to ``(H, W)``; None when not given."""
    parser.add_argument('--img-size', type=int, nargs='+', default=None, action=_ImageSize, help=help)
