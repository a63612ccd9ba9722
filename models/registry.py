"""timm registration of the DAT / DAT++ models.

``import models`` registers the names below, after which the usual timm calls work::

    model = timm.create_model('dat_pp_tiny', num_classes=100)
    backbone = timm.create_model('dat_pp_small', features_only=True, out_indices=(1, 2, 3))
    model = timm.create_model('dat_pp_base', pretrained=True,
                              pretrained_cfg_overlay=dict(file='/ckpts/dat_pp_b_in1k_224.pth'))
    model = timm.create_model('dat_custom', cfg_file='configs/demo.yaml')   # any YAML config

The architecture of every name is read from its YAML file in ``configs/`` (the same file
training uses), so there is one definition of each model. Weights are only ever read from
a local file (``pretrained_cfg_overlay=dict(file=...)``, or the released file name in the
current directory): nothing is downloaded. Accepted files: official ``{'model': sd}`` files
(convert those that pickle Python objects with ``tools/convert_checkpoint.py``), this project's
checkpoints (their ``'model'`` weights; export EMA weights with ``tools/export_safetensors.py
--ema``) and ``.safetensors``. Position tables are resized to the model being built.

``features_only=True`` returns the four stage maps (see ``DAT.forward_intermediates``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg

from .build import dat_kwargs
from .dat import DAT
from .dat_blocks import DAttention

__all__ = ['VARIANTS', 'CONFIG_DIR', 'checkpoint_filter_fn', 'create_dat', 'variant_kwargs']

CONFIG_DIR = Path(__file__).resolve().parents[1] / 'configs'

# Buffers derived from the construction resolution; a model built for another size keeps its own.
_RESOLUTION_BUFFERS = ('relative_position_index', 'attn_mask')


@dataclass(frozen=True)
class Variant:
    """A registered model: its YAML config, the released checkpoint's file name and eval settings."""
    cfg: str                    # file name in configs/
    file: Optional[str]         # released ImageNet-1K checkpoint (None: no release)
    img_size: int = 224         # evaluation resolution (DATA.IMG_SIZE of the YAML)
    crop_pct: float = 0.875     # 224/256 with TEST.CROP, 1.0 without
    paper: str = 'arXiv:2309.01430'


VARIANTS: Dict[str, Variant] = {
    # DAT++ (arXiv 2309.01430)
    'dat_pp_tiny': Variant('dat_tiny.yaml', 'dat_pp_t_in1k_224.pth'),
    'dat_pp_small': Variant('dat_small.yaml', 'dat_pp_s_in1k_224.pth'),
    'dat_pp_base': Variant('dat_base.yaml', 'dat_pp_b_in1k_224.pth'),
    'dat_pp_base_384': Variant('dat_base_384.yaml', 'dat_pp_b_in1k_384.pth', 384, 1.0),
    # DAT+ (DAT++ tiny without LPU, DWC-MLP and conv stem): no released weights.
    'dat_plus_tiny': Variant('dat_p.yaml', None),
    # DAT v1 (CVPR 2022, arXiv 2201.00520), with the v1 deformable arithmetic.
    'dat_v1_tiny': Variant('dat_v1_tiny.yaml', 'dat_tiny_in1k_224.pth', paper='arXiv:2201.00520'),
    'dat_v1_small': Variant('dat_v1_small.yaml', 'dat_small_in1k_224.pth', paper='arXiv:2201.00520'),
    'dat_v1_base': Variant('dat_v1_base.yaml', 'dat_base_in1k_224.pth', paper='arXiv:2201.00520'),
    'dat_v1_base_384': Variant('dat_v1_base_384.yaml', 'dat_base_in1k_384.pth', 384, 1.0,
                               paper='arXiv:2201.00520'),
}


def _cfg(variant: Variant) -> Dict[str, Any]:
    cfg = dict(
        num_classes=1000, input_size=(3, variant.img_size, variant.img_size),
        pool_size=(variant.img_size // 32, variant.img_size // 32), crop_pct=variant.crop_pct,
        interpolation='bicubic', mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        first_conv='patch_proj.0', classifier='cls_head', license='apache-2.0',
        paper_ids=variant.paper, origin_url='https://github.com/LeapLabTHU/DAT',
    )
    if variant.file:
        cfg['file'] = variant.file    # a local path; there is deliberately no url / hf_hub_id
    return cfg


default_cfgs = generate_default_cfgs({f'{name}.in1k': _cfg(v) for name, v in VARIANTS.items()})
# The generic entry point: architecture from any YAML, no released weights.
default_cfgs.update(generate_default_cfgs({'dat_custom': dict(
    num_classes=1000, input_size=(3, 224, 224), crop_pct=0.875, interpolation='bicubic',
    mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, first_conv='patch_proj.0', classifier='cls_head')}))


# ----------------------------------------------------------------------------- kwargs from YAML
def _yaml_kwargs(cfg_path: str) -> Dict[str, Any]:
    """``MODEL.DAT`` of a YAML (plus ``MODEL.ATTN_IMPL``) as DAT keywords; read afresh on every call."""
    return dat_kwargs(_load_config(cfg_path))


def _load_config(cfg_path: str):
    from config import load_config   # lazily: config.py lives at the repository root
    return load_config(cfg_path)


def variant_kwargs(name: str) -> Dict[str, Any]:
    """DAT constructor keywords of a registered name, read from its YAML in ``configs/``."""
    if name not in VARIANTS:
        raise KeyError(f"unknown DAT variant {name!r}; registered: {', '.join(VARIANTS)}")
    path = CONFIG_DIR / VARIANTS[name].cfg
    if not path.is_file():
        raise FileNotFoundError(f"config {path} for timm model {name!r} is missing; restore configs/ from the repo")
    return _yaml_kwargs(str(path))


# ----------------------------------------------------------------------------- checkpoints
def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Make an official or project checkpoint fit ``model`` (timm's ``pretrained_filter_fn``).

    Accepts ``{'model': sd}`` / ``{'state_dict': sd}`` files and bare state dicts; strips
    ``module.`` / ``_orig_mod.``; replaces resolution-bound buffers (``relative_position_index``,
    ``attn_mask``) of another shape by the model's own; resizes position tables (``rpe_table``,
    ``relative_position_bias_table``, ``rpb``) bicubically to the model's shape. The classifier
    is left alone: timm drops it when ``num_classes`` differs from the checkpoint's.
    """
    from utils import _resize_position_table, strip_prefixes, unwrap_state_dict

    sd = {strip_prefixes(k): v for k, v in unwrap_state_dict(state_dict).items()}
    own = model.state_dict()
    for name, value in own.items():
        if name.rsplit('.', 1)[-1] in _RESOLUTION_BUFFERS and (name not in sd or sd[name].shape != value.shape):
            sd[name] = value.clone()

    wrong = []
    for name, value in list(sd.items()):
        if name not in own or value.shape == own[name].shape or name.startswith('cls_head.'):
            continue
        if _is_fixed_table(model, name):
            raise ValueError(f'{name} {tuple(value.shape)} is a fixed_pes position table bound to the resolution '
                             f'it was trained at and cannot be resized to {tuple(own[name].shape)}; build the '
                             f'model with that img_size')
        resized = _resize_position_table(name, value, own[name].shape)
        if resized is None:
            wrong.append(f'{name} {tuple(value.shape)} vs model {tuple(own[name].shape)}')
        else:
            sd[name] = resized
    if wrong:
        shown = ', '.join(wrong[:4]) + (f' ... and {len(wrong) - 4} more' if len(wrong) > 4 else '')
        raise ValueError(f'checkpoint does not fit the model: {shown}; build the variant (config) the '
                         f'checkpoint was trained as')
    return sd


def _is_fixed_table(model: nn.Module, name: str) -> bool:
    """True for a ``fixed_pes`` table: it indexes queries x keys and cannot be resized like an image."""
    module_name, _, leaf = name.rpartition('.')
    if leaf != 'rpe_table':
        return False
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return False
    return isinstance(module, DAttention) and module.fixed_pe


def _check_pretrained_file(variant: str, pretrained_cfg: Any, overlay: Optional[dict]) -> None:
    """Fail early, in one line, when pretrained weights are asked for but no readable local file is given."""
    from utils import load_checkpoint_file

    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=overlay)
    if cfg.state_dict is not None:
        return
    if not cfg.file:
        raise RuntimeError(f"{variant}: pretrained=True needs a local checkpoint (nothing is downloaded); pass "
                           f"pretrained_cfg_overlay=dict(file='/path/to/checkpoint.pth')")
    if not os.path.isfile(cfg.file):
        raise FileNotFoundError(f"{variant}: pretrained checkpoint '{cfg.file}' not found; pass its path with "
                                f"pretrained_cfg_overlay=dict(file='/path/to/{os.path.basename(cfg.file)}')")
    # A weights-only read (memory-mapped, cheap): refuses pickled Python objects with a hint to convert.
    load_checkpoint_file(cfg.file, mmap=True)


# ----------------------------------------------------------------------------- building
def create_dat(variant: str, model_kwargs: Dict[str, Any], pretrained: bool = False, **kwargs: Any) -> DAT:
    """Build ``DAT(**model_kwargs, **kwargs)`` through timm (pretrained loading, features_only, cfgs)."""
    in_chans = kwargs.pop('in_chans', 3)
    if in_chans != 3:
        raise ValueError(f'DAT takes RGB input; in_chans={in_chans} is not supported')
    kwargs.pop('cache_dir', None)    # weights come from local files only
    if pretrained:
        _check_pretrained_file(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
    return build_model_with_cfg(
        DAT, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        # DAT's forward interleaves stages and down-projections, so features come from
        # forward_intermediates rather than from running children in order.
        feature_cfg=dict(feature_cls='getter', out_indices=(0, 1, 2, 3)),
        kwargs_filter=('in_chans',),
        **{**model_kwargs, **kwargs})


def _create_variant(name: str, pretrained: bool, **kwargs: Any) -> DAT:
    return create_dat(name, variant_kwargs(name), pretrained, **kwargs)


@register_model
def dat_pp_tiny(pretrained: bool = False, **kwargs: Any) -> DAT:
    """DAT++ tiny (configs/dat_tiny.yaml): 24.0M params, 4.3 GFLOPs at 224."""
    return _create_variant('dat_pp_tiny', pretrained, **kwargs)


@register_model
def dat_pp_small(pretrained: bool = False, **kwargs: Any) -> DAT:
    """DAT++ small (configs/dat_small.yaml): 53.1M params, 9.4 GFLOPs at 224."""
    return _create_variant('dat_pp_small', pretrained, **kwargs)


@register_model
def dat_pp_base(pretrained: bool = False, **kwargs: Any) -> DAT:
    """DAT++ base (configs/dat_base.yaml): 93.7M params, 16.6 GFLOPs at 224."""
    return _create_variant('dat_pp_base', pretrained, **kwargs)


@register_model
def dat_pp_base_384(pretrained: bool = False, **kwargs: Any) -> DAT:
    """DAT++ base fine-tuned at 384 (configs/dat_base_384.yaml): 49.7 GFLOPs at 384."""
    return _create_variant('dat_pp_base_384', pretrained, **kwargs)


@register_model
def dat_plus_tiny(pretrained: bool = False, **kwargs: Any) -> DAT:
    """DAT+ tiny (configs/dat_p.yaml): DAT++ tiny without LPU, DWC-MLP and conv stem."""
    return _create_variant('dat_plus_tiny', pretrained, **kwargs)


@register_model
def dat_v1_tiny(pretrained: bool = False, **kwargs: Any) -> DAT:
    """DAT v1 tiny (configs/dat_v1_tiny.yaml), CVPR 2022."""
    return _create_variant('dat_v1_tiny', pretrained, **kwargs)


@register_model
def dat_v1_small(pretrained: bool = False, **kwargs: Any) -> DAT:
    """DAT v1 small (configs/dat_v1_small.yaml), CVPR 2022."""
    return _create_variant('dat_v1_small', pretrained, **kwargs)


@register_model
def dat_v1_base(pretrained: bool = False, **kwargs: Any) -> DAT:
    """DAT v1 base (configs/dat_v1_base.yaml), CVPR 2022."""
    return _create_variant('dat_v1_base', pretrained, **kwargs)


@register_model
def dat_v1_base_384(pretrained: bool = False, **kwargs: Any) -> DAT:
    """DAT v1 base at 384 (configs/dat_v1_base_384.yaml), CVPR 2022."""
    return _create_variant('dat_v1_base_384', pretrained, **kwargs)


@register_model
def dat_custom(pretrained: bool = False, cfg_file: Optional[str] = None, **kwargs: Any) -> DAT:
    """Any DAT described by a YAML config: ``timm.create_model('dat_custom', cfg_file='my.yaml')``."""
    if not cfg_file:
        raise ValueError("dat_custom needs cfg_file='path/to/config.yaml' (a config with MODEL.DAT)")
    config = _load_config(cfg_file)
    # Its checkpoints are the YAML's: same classes and evaluation size (explicit overlays win).
    size = config.DATA.IMG_SIZE
    overlay = dict(num_classes=config.MODEL.DAT.num_classes, input_size=(3, size, size),
                   pool_size=(size // 32, size // 32), crop_pct=0.875 if config.TEST.CROP else 1.0)
    overlay.update(kwargs.pop('pretrained_cfg_overlay', None) or {})
    return create_dat('dat_custom', dat_kwargs(config), pretrained, pretrained_cfg_overlay=overlay, **kwargs)
