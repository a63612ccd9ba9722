"""``build_model(config)``: the model a config describes."""
from __future__ import annotations

import torch.nn as nn

from .dat import DAT
from .debiformer import DeBiFormer
from .vitaev2_vsa import ViTAEv2VSA


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


def _plain(node) -> dict:
    """A yacs node as plain Python values (nested nodes become dicts)."""
    return {k: _plain(v) if hasattr(v, 'items') else v for k, v in node.items()}


def create_timm_model(config) -> nn.Module:
    """``MODEL.TYPE: timm``: ``timm.create_model(MODEL.TIMM.NAME)`` with the run's classes and drop
    rates (None leaves the model's default), overridden by ``MODEL.TIMM.KWARGS``."""
    import difflib
    import timm
    name = config.MODEL.TIMM.NAME
    if not name or not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3) if name else []
        raise ValueError(f"MODEL.TIMM.NAME {name!r} is not a timm model; " + (
            f"did you mean {', '.join(close)}?" if close else "see timm.list_models()"))
    kwargs = dict(num_classes=config.MODEL.NUM_CLASSES, drop_rate=config.MODEL.TIMM.DROP_RATE,
                  drop_path_rate=config.MODEL.TIMM.DROP_PATH_RATE)
    kwargs.update(_plain(config.MODEL.TIMM.KWARGS))
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        raise ValueError(f"timm model {name!r} rejects its keywords ({e}); fix MODEL.TIMM.KWARGS, or set "
                         f"MODEL.TIMM.DROP_RATE / DROP_PATH_RATE to None for a model without them") from None


def build_model(config) -> nn.Module:
    """Build the model named by ``MODEL.TYPE``: 'dat' (``MODEL.DAT``), 'vitaev2_vsa' (``MODEL.VSA``),
    'debiformer' (``MODEL.DEBI``) or 'timm' (``MODEL.TIMM``)."""
    model_type = config.MODEL.TYPE
    if model_type == 'dat':
        model = DAT(**dat_kwargs(config))
    elif model_type == 'vitaev2_vsa':
        model = ViTAEv2VSA(**_plain(config.MODEL.VSA), attn_impl=config.MODEL.ATTN_IMPL)
    elif model_type == 'debiformer':
        model = DeBiFormer(**debiformer_kwargs(config))
    elif model_type == 'timm':
        model = create_timm_model(config)
    else:
        raise ValueError(f"unknown MODEL.TYPE {model_type!r}; use 'dat', 'vitaev2_vsa', 'debiformer' or 'timm'")
    if config.TRAIN.USE_CHECKPOINT:
        model.set_grad_checkpointing(True)
    return model
