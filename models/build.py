"""Models from configs: ``build_model(config)`` for a yacs config, ``create_from_yaml(path)`` for any YAML.

The official ``MODEL.DAT`` keys are translated here, once: the per-stage booleans ``use_pes``,
``dwc_pes``, ``fixed_pes``, ``log_cpb`` and ``no_offs`` become one named position encoding per
stage (``pos_encs``), and ``ns_per_pts`` (unused by the official model) is dropped. Nothing here
imports the project root: a yacs node, a dict or a YAML file on disk is all it needs.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Mapping, Union

import torch.nn as nn

from .dat import DAT, create_dat, pretrained_cfg_for
from .debiformer import DeBiFormer
from .vitaev2_vsa import ViTAEv2VSA

__all__ = ['build_model', 'dat_kwargs', 'debiformer_kwargs', 'official_dat_kwargs', 'position_encoding',
           'create_from_yaml', 'create_timm_model', 'BUILDERS']

# Official MODEL.DAT keys that this translation consumes or drops.
_POS_KEYS = ('use_pes', 'dwc_pes', 'fixed_pes', 'log_cpb', 'no_offs')
_UNUSED_KEYS = ('ns_per_pts',)


def position_encoding(use_pe: bool, dwc_pe: bool, fixed_pe: bool, log_cpb: bool, no_off: bool) -> str:
    """The deformable position encoding the official booleans select (their precedence: dwc, fixed, log-CPB)."""
    if not use_pe or no_off:
        return 'none'
    if dwc_pe:
        return 'dwc'
    if fixed_pe:
        return 'fixed'
    return 'log_cpb' if log_cpb else 'table'


def official_dat_kwargs(options: Mapping[str, Any]) -> Dict[str, Any]:
    """``DAT`` keywords from official ``MODEL.DAT`` options (plain values; missing keys take the defaults)."""
    kwargs = {}
    for key, value in options.items():
        if hasattr(value, 'items'):                 # yacs CfgNode -> dict (lower_lr_kvs)
            value = dict(value)
        kwargs[key] = value
    for key in _UNUSED_KEYS:
        kwargs.pop(key, None)
    flags = {key: kwargs.pop(key, None) for key in _POS_KEYS}
    if any(v is not None for v in flags.values()):
        per_stage = {k: list(v) if v is not None else [False] * 4 for k, v in flags.items()}
        if any(len(v) != 4 for v in per_stage.values()):
            bad = next(k for k, v in per_stage.items() if len(v) != 4)
            raise ValueError(f"DAT option '{bad}' needs one value per stage (4), got {flags[bad]!r}")
        kwargs['pos_encs'] = [position_encoding(*(bool(per_stage[k][i]) for k in _POS_KEYS[:4]),
                                                bool(per_stage['no_offs'][i])) for i in range(4)]
        kwargs['no_offs'] = [bool(v) for v in per_stage['no_offs']]
    return kwargs


def dat_kwargs(config) -> Dict[str, Any]:
    """``DAT`` keywords of a yacs config: ``MODEL.DAT`` translated, plus ``MODEL.ATTN_IMPL``."""
    kwargs = official_dat_kwargs(config.MODEL.DAT)
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


# MODEL.TYPE -> builder taking the whole config. Add a model family with one entry.
BUILDERS: Dict[str, Callable[[Any], nn.Module]] = {
    'dat': lambda config: DAT(**dat_kwargs(config)),
    'vitaev2_vsa': lambda config: ViTAEv2VSA(**_plain(config.MODEL.VSA), attn_impl=config.MODEL.ATTN_IMPL),
    'debiformer': lambda config: DeBiFormer(**debiformer_kwargs(config)),
    'timm': create_timm_model,
}


def build_model(config) -> nn.Module:
    """Build the model named by ``MODEL.TYPE``; ``TRAIN.USE_CHECKPOINT`` turns on gradient checkpointing."""
    builder = BUILDERS.get(config.MODEL.TYPE)
    if builder is None:
        raise ValueError(f"unknown MODEL.TYPE {config.MODEL.TYPE!r}; known: {', '.join(sorted(BUILDERS))}")
    model = builder(config)
    if config.TRAIN.USE_CHECKPOINT:
        model.set_grad_checkpointing(True)
    return model


# ----------------------------------------------------------------------------- any YAML, without config.py
def _read_yaml(path: str) -> Dict[str, Any]:
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f'config file not found: {path}')
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    merged: Dict[str, Any] = {}
    for base in data.get('BASE') or []:            # official BASE inheritance, relative to the file
        if base:
            merged = _merge(merged, _read_yaml(os.path.join(os.path.dirname(path), base)))
    return _merge(merged, data)


def _merge(a: Dict[str, Any], b: Mapping[str, Any]) -> Dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
        out[key] = _merge(out.get(key) or {}, value) if isinstance(value, Mapping) and key != 'lower_lr_kvs' else value
    return out


def create_from_yaml(cfg_file: Union[str, os.PathLike], pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """A DAT from the ``MODEL.DAT`` of any (official-format) YAML, through timm's builder.

    Evaluation settings come from the YAML (``DATA.IMG_SIZE``, ``TEST.CROP``), ``kwargs`` override
    constructor keywords, and ``pretrained=True`` with ``pretrained_cfg_overlay=dict(file=...)``
    loads a local checkpoint through ``checkpoint_filter_fn``; ``features_only=True`` works as for
    the registered names.
    """
    data = _read_yaml(os.fspath(cfg_file))
    model_cfg = data.get('MODEL') or {}
    if model_cfg.get('TYPE', 'dat') != 'dat':
        raise ValueError(f"{cfg_file}: MODEL.TYPE {model_cfg.get('TYPE')!r} is not 'dat'")
    model_kwargs = official_dat_kwargs(model_cfg.get('DAT') or {})
    if 'ATTN_IMPL' in model_cfg:
        model_kwargs['attn_impl'] = model_cfg['ATTN_IMPL']
    size = int((data.get('DATA') or {}).get('IMG_SIZE', 224))
    crop = bool((data.get('TEST') or {}).get('CROP', True))
    cfg = pretrained_cfg_for(size, 0.875 if crop else 1.0, num_classes=int(model_kwargs.get('num_classes', 1000)))
    cfg.update(kwargs.pop('pretrained_cfg_overlay', None) or {})
    cfg['architecture'] = 'dat_yaml'
    return create_dat('dat_yaml', pretrained, pretrained_cfg=cfg, **{**model_kwargs, **kwargs})
