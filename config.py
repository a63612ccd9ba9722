"""Configuration: yacs defaults for every official key, ``BASE`` inheritance, strict merging.

The official YAML files load unchanged. Unlike the official code, ``MODEL.DAT`` is not
open-ended: every constructor keyword is declared here, so a misspelt key fails with
one line that names the key and the file instead of being silently ignored.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import os
from typing import Any, Iterable, Optional, Sequence

import yaml
from yacs.config import CfgNode as CN


class ConfigError(ValueError):
    """A config file or override that cannot be applied; the message is one line."""


_C = CN()
_C.BASE = ['']

# ----------------------------------------------------------------------------- data
_C.DATA = CN()
_C.DATA.BATCH_SIZE = 128          # per GPU / process
_C.DATA.DATA_PATH = ''            # ImageFolder root holding train/ and val/
_C.DATA.DATASET = 'imagenet'
_C.DATA.IMG_SIZE = 224
_C.DATA.INTERPOLATION = 'bicubic'
_C.DATA.PIN_MEMORY = True
_C.DATA.NUM_WORKERS = 8

# ----------------------------------------------------------------------------- model
_C.MODEL = CN()
_C.MODEL.TYPE = 'dat'
_C.MODEL.NAME = 'dat_tiny'
_C.MODEL.RESUME = ''
_C.MODEL.NUM_CLASSES = 1000
_C.MODEL.DROP_RATE = 0.0
_C.MODEL.DROP_PATH_RATE = 0.1
_C.MODEL.LABEL_SMOOTHING = 0.1
_C.MODEL.PRETRAINED = None
# Index file (one 22K class index per line, or a saved tensor) mapping a 22K head to 1K classes.
_C.MODEL.MAP_22K_TO_1K = ''
# Neighborhood / deformable attention kernels: 'auto' (fused on CUDA, reference elsewhere),
# 'reference' or 'fused'.
_C.MODEL.ATTN_IMPL = 'auto'

# Keyword arguments of the DAT constructor, with the official defaults (dat_facts.md §1).
_C.MODEL.DAT = CN()
_D = _C.MODEL.DAT
_D.img_size = 224
_D.patch_size = 4
_D.num_classes = 1000
_D.expansion = 4
_D.dim_stem = 96
_D.dims = [96, 192, 384, 768]
_D.depths = [2, 2, 6, 2]
_D.heads = [3, 6, 12, 24]
_D.heads_q = [6, 12, 24, 48]
_D.window_sizes = [7, 7, 7, 7]
_D.drop_rate = 0.0
_D.attn_drop_rate = 0.0
_D.drop_path_rate = 0.0
_D.strides = [-1, -1, -1, -1]
_D.offset_range_factor = [1, 2, 3, 4]
_D.stage_spec = [['L', 'D'], ['L', 'D'], ['L', 'D', 'L', 'D', 'L', 'D'], ['L', 'D']]
_D.groups = [-1, -1, 3, 6]
_D.use_pes = [False] * 4
_D.dwc_pes = [False] * 4
_D.sr_ratios = [8, 4, 2, 1]
_D.lower_lr_kvs = CN(new_allowed=True)   # {name keyword: lr multiplier}, at most one entry
_D.fixed_pes = [False] * 4
_D.no_offs = [False] * 4
_D.ns_per_pts = [4] * 4                  # accepted for compatibility; unused by the official code
_D.use_dwc_mlps = [False] * 4
_D.use_conv_patches = False
_D.ksizes = [9, 7, 5, 3]
_D.ksize_qnas = [3] * 4
_D.nqs = [2] * 4
_D.qna_activation = 'exp'
_D.nat_ksizes = [3] * 4
_D.layer_scale_values = [-1] * 4
_D.use_lpus = [False] * 4
_D.log_cpb = [False] * 4
# Deformable-attention arithmetic: 'pp' (DAT++, default) or 'v1' (CVPR 2022 release).
_D.deform_arith = 'pp'
del _D

# MODEL.TYPE 'vitaev2_vsa': keyword arguments of the official ViTAE_VSA_basic constructor, with
# its defaults written out per stage (vsa_facts.md section 1); norm_layer stays LayerNorm(eps 1e-6).
_C.MODEL.VSA = CN()
_V = _C.MODEL.VSA
_V.img_size = 224
_V.in_chans = 3
_V.stages = 4
_V.embed_dims = [64, 64, 64, 64]
_V.wide_pcm = True
_V.token_dims = [64, 128, 256, 512]
_V.downsample_ratios = [4, 2, 2, 2]
_V.kernel_size = [7, 3, 3, 3]
_V.RC_heads = [1, 1, 1, 1]
_V.NC_heads = [4, 4, 4, 4]
_V.dilations = [[1, 2, 3, 4], [1, 2, 3], [1, 2], [1, 2]]
_V.RC_op = 'cat'
_V.RC_tokens_type = ['VSA'] * 4
_V.NC_tokens_type = ['VSA'] * 4
_V.RC_group = [1, 1, 1, 1]
_V.NC_group = [1, 32, 64, 64]
_V.NC_depth = [2, 2, 6, 2]
_V.mlp_ratio = 4.0
_V.qkv_bias = True              # no effect in VSA models (official)
_V.qk_scale = None              # no effect
_V.drop_rate = 0.0
_V.attn_drop_rate = 0.0         # no effect
_V.drop_path_rate = 0.0
_V.num_classes = 1000
_V.window_size = 7
_V.relative_pos = False         # no effect (the bias is always on)
_V.cpe = False
_V.num_deform = None            # unused
del _V

# MODEL.TYPE 'timm': any timm architecture, timm.create_model(NAME, num_classes=MODEL.NUM_CLASSES,
# drop_rate=MODEL.DROP_RATE, drop_path_rate=MODEL.DROP_PATH_RATE, **KWARGS); KWARGS win.
_C.MODEL.TIMM = CN()
_C.MODEL.TIMM.NAME = ''
_C.MODEL.TIMM.KWARGS = CN(new_allowed=True)

# ----------------------------------------------------------------------------- training
_C.TRAIN = CN()
_C.TRAIN.START_EPOCH = 0
_C.TRAIN.EPOCHS = 300
_C.TRAIN.WARMUP_EPOCHS = 20
_C.TRAIN.WEIGHT_DECAY = 0.05
_C.TRAIN.BASE_LR = 5e-4
_C.TRAIN.WARMUP_LR = 5e-7
_C.TRAIN.MIN_LR = 5e-6
_C.TRAIN.CLIP_GRAD = 5.0
_C.TRAIN.AUTO_RESUME = True
_C.TRAIN.USE_CHECKPOINT = False
_C.TRAIN.ACCUMULATION_STEPS = 1
# Also checkpoint every N iterations inside an epoch (0: only at epoch ends).
_C.TRAIN.SAVE_ITER_FREQ = 0
# Epoch checkpoints kept on disk (the newest ones; <= 0 keeps all); best.pth is always kept.
_C.TRAIN.KEEP_CHECKPOINTS = 3
# Non-finite losses in a row tolerated (each step skipped) before training stops.
_C.TRAIN.MAX_NONFINITE_STEPS = 10
# torch.compile the model (off until proven on the target stack).
_C.TRAIN.COMPILE = False

_C.TRAIN.LR_SCHEDULER = CN()
_C.TRAIN.LR_SCHEDULER.NAME = 'cosine'
_C.TRAIN.LR_SCHEDULER.DECAY_EPOCHS = 30
_C.TRAIN.LR_SCHEDULER.DECAY_RATE = 0.1

_C.TRAIN.OPTIMIZER = CN()
_C.TRAIN.OPTIMIZER.NAME = 'adamw'
_C.TRAIN.OPTIMIZER.EPS = 1e-8
_C.TRAIN.OPTIMIZER.BETAS = (0.9, 0.999)
_C.TRAIN.OPTIMIZER.MOMENTUM = 0.9

# Exponential moving average of the weights (timm ModelEmaV2 semantics).
_C.TRAIN.EMA = CN()
_C.TRAIN.EMA.ENABLE = False
_C.TRAIN.EMA.DECAY = 0.9998

# ----------------------------------------------------------------------------- augmentation
_C.AUG = CN()
_C.AUG.COLOR_JITTER = 0.4
_C.AUG.AUTO_AUGMENT = 'rand-m9-mstd0.5-inc1'
_C.AUG.REPROB = 0.25
_C.AUG.REMODE = 'pixel'
_C.AUG.RECOUNT = 1
_C.AUG.MIXUP = 0.8
_C.AUG.CUTMIX = 1.0
_C.AUG.CUTMIX_MINMAX = None
_C.AUG.MIXUP_PROB = 1.0
_C.AUG.MIXUP_SWITCH_PROB = 0.5
_C.AUG.MIXUP_MODE = 'batch'

# ----------------------------------------------------------------------------- testing
_C.TEST = CN()
_C.TEST.CROP = True

# ----------------------------------------------------------------------------- misc
_C.AMP = False
_C.AMP_DTYPE = 'float16'          # 'float16' (with a grad scaler) or 'bfloat16'
_C.OUTPUT = ''
_C.TAG = 'default'
_C.SAVE_FREQ = 1
_C.PRINT_FREQ = 100
_C.SEED = 0
_C.DETERMINISTIC = False          # deterministic kernels and single-threaded data order
_C.TENSORBOARD = True
_C.EVAL_MODE = False
_C.THROUGHPUT_MODE = False
_C.LOCAL_RANK = 0


# ----------------------------------------------------------------------------- merging
def _decode(value: Any) -> Any:
    """Strings that spell Python literals become them (PyYAML reads ``2e-05`` as a string)."""
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return value


def _coerce(value: Any, default: Any, key: str, source: str) -> Any:
    """Return ``value`` converted to the type of ``default``, or raise a one-line ConfigError."""
    value = _decode(value)
    if default is None or value is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        if isinstance(default, bool) and isinstance(value, bool):
            return value
    elif isinstance(default, float) and isinstance(value, (int, float)):
        return float(value)
    elif isinstance(default, int) and isinstance(value, int):
        return value
    elif isinstance(default, str) and isinstance(value, str):
        return value
    elif isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    if isinstance(default, str) and isinstance(value, (int, float)):
        return str(value)
    raise ConfigError(
        f"{source}: key '{key}' expects {type(default).__name__} (default {default!r}), "
        f"got {type(value).__name__} {value!r}")


def _unknown_key(key: str, node: CN, source: str) -> ConfigError:
    parent, _, leaf = key.rpartition('.')
    close = difflib.get_close_matches(leaf, list(node.keys()), n=1)
    hint = f"; did you mean '{parent + '.' if parent else ''}{close[0]}'?" if close else ''
    return ConfigError(f"{source}: unknown config key '{key}'{hint}")


def _merge_dict(node: CN, update: dict, source: str, prefix: str = '') -> None:
    for raw_key, value in update.items():
        key = str(raw_key)
        full = prefix + key
        if full == 'BASE':
            continue
        if key not in node:
            if node.is_new_allowed():
                node[key] = CN(value, new_allowed=True) if isinstance(value, dict) else _decode(value)
                continue
            raise _unknown_key(full, node, source)
        default = node[key]
        if isinstance(default, CN):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: key '{full}' is a section and needs a mapping, got {value!r}")
            _merge_dict(default, value, source, full + '.')
        else:
            node[key] = _coerce(value, default, full, source)


def merge_file(config: CN, cfg_file: str) -> None:
    """Merge ``cfg_file`` (and, first, the files its ``BASE`` names, relative to it)."""
    if not os.path.isfile(cfg_file):
        raise ConfigError(f"config file not found: '{cfg_file}' (pass an existing YAML with --cfg)")
    with open(cfg_file, 'r') as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0]
            raise ConfigError(f"{cfg_file}: not valid YAML ({first})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{cfg_file}: the top level must be a mapping of config sections")
    for base in data.get('BASE', ['']) or ['']:
        if base:
            merge_file(config, os.path.join(os.path.dirname(cfg_file), base))
    _merge_dict(config, data, cfg_file)


def merge_opts(config: CN, opts: Sequence[str]) -> None:
    """Apply ``KEY VALUE`` pairs given on the command line (``--opts``)."""
    if len(opts) % 2:
        raise ConfigError(f"--opts needs KEY VALUE pairs, got an odd number of items: {list(opts)}")
    for key, value in zip(opts[0::2], opts[1::2]):
        node = config
        parts = key.split('.')
        for i, part in enumerate(parts[:-1]):
            if part not in node or not isinstance(node[part], CN):
                raise _unknown_key('.'.join(parts[:i + 1]), node, '--opts')
            node = node[part]
        nested: dict = {parts[-1]: value}
        _merge_dict(node, nested, '--opts', '.'.join(parts[:-1]) + '.' if len(parts) > 1 else '')


def default_config() -> CN:
    """A fresh, unfrozen copy of the defaults."""
    return _C.clone()


def load_config(cfg_file: Optional[str] = None, opts: Iterable[str] = (), **overrides: Any) -> CN:
    """Defaults + ``cfg_file`` + ``opts``; returns a frozen config (no output-dir rewriting)."""
    config = default_config()
    if cfg_file:
        merge_file(config, cfg_file)
    merge_opts(config, list(opts))
    for key, value in overrides.items():
        merge_opts(config, [key, value])
    validate(config)
    config.freeze()
    return config


def update_config(config: CN, args: argparse.Namespace) -> None:
    """Apply a command line (``main.py``'s arguments) to ``config`` like the official scripts."""
    config.defrost()
    if getattr(args, 'cfg', None):
        merge_file(config, args.cfg)
    merge_opts(config, list(getattr(args, 'opts', None) or []))

    def given(name: str) -> Any:
        return getattr(args, name, None)

    if given('batch_size'):
        config.DATA.BATCH_SIZE = args.batch_size
    if given('data_path'):
        config.DATA.DATA_PATH = args.data_path
    if given('resume'):
        config.MODEL.RESUME = args.resume
    if given('pretrained'):
        config.MODEL.PRETRAINED = args.pretrained
    if given('amp'):
        config.AMP = True
    if given('amp_dtype'):
        config.AMP_DTYPE = args.amp_dtype
    if given('use_checkpoint'):
        config.TRAIN.USE_CHECKPOINT = True
    if given('print_freq'):
        config.PRINT_FREQ = args.print_freq
    if given('output'):
        config.OUTPUT = args.output
    if given('tag'):
        config.TAG = args.tag
    if given('eval'):
        config.EVAL_MODE = True
    if given('throughput'):
        config.THROUGHPUT_MODE = True
    if given('local_rank') is not None:
        config.LOCAL_RANK = args.local_rank
    validate(config)
    config.OUTPUT = os.path.join(config.OUTPUT, config.MODEL.NAME, config.TAG)
    config.freeze()


def validate(config: CN) -> None:
    """Value checks the type system cannot express; each failure is one line."""
    choices = {
        'MODEL.ATTN_IMPL': ('auto', 'reference', 'fused'),
        'MODEL.DAT.deform_arith': ('pp', 'v1'),
        'AMP_DTYPE': ('float16', 'bfloat16'),
        'TRAIN.OPTIMIZER.NAME': ('adamw', 'sgd'),
        'TRAIN.LR_SCHEDULER.NAME': ('cosine', 'linear', 'step'),
    }
    for key, allowed in choices.items():
        node: Any = config
        for part in key.split('.'):
            node = node[part]
        value = node.lower() if key.startswith('TRAIN.') else node
        if value not in allowed:
            raise ConfigError(f"config key '{key}' is {node!r}; expected one of {list(allowed)}")


def get_config(args: argparse.Namespace) -> CN:
    """Defaults updated from the command line; ``OUTPUT`` becomes ``<output>/<MODEL.NAME>/<TAG>``."""
    config = default_config()
    update_config(config, args)
    return config
