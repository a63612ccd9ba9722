"""``build_model(config)``: the model a config describes."""
from __future__ import annotations

import torch.nn as nn

from .dat import DAT
from .debiformer import DeBiFormer


def dat_kwargs(config) -> dict:
    """Constructor keywords from ``MODEL.DAT`` (plain Python values), with run-time kernel choice."""
    kwargs = {}
    for key, value in config.MODEL.DAT.items():
        if hasattr(value, 'items'):            # yacs CfgNode -> dict (lower_lr_kvs)
            value = dict(value)
        kwargs[key] = value
    kwargs['attn_impl'] = config.MODEL.ATTN_IMPL
    return kwargs


def debiformer_kwargs(config) -> dict:
    """DeBiFormer constructor keywords from ``MODEL.DEBI`` plus classes and kernels."""
    kwargs = {key: (list(value) if isinstance(value, (list, tuple)) else value)
              for key, value in config.MODEL.DEBI.items()}
    kwargs.update(num_classes=config.MODEL.NUM_CLASSES, attn_impl=config.MODEL.ATTN_IMPL)
    return kwargs


def build_model(config) -> nn.Module:
    """Build the model named by ``MODEL.TYPE`` ('dat' from ``MODEL.DAT``, 'debiformer' from ``MODEL.DEBI``)."""
    model_type = config.MODEL.TYPE
    if model_type == 'debiformer':
        model = DeBiFormer(**debiformer_kwargs(config))
    elif model_type == 'dat':
        model = DAT(**dat_kwargs(config))
    else:
        raise ValueError(f"unknown MODEL.TYPE {model_type!r}; this codebase builds 'dat' and 'debiformer'")
    if config.TRAIN.USE_CHECKPOINT:
        model.set_grad_checkpointing(True)
    return model
