"""Configuration: yacs defaults for every official key, ``BASE`` inheritance, strict merging.

The official YAML files load unchanged. Unlike the official code, ``MODEL.DAT`` is not
open-ended: every constructor keyword is declared here, so a misspelt key fails with
one line that names the key and the file instead of being silently ignored.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import math
import os
from typing import Any, Dict, Hashable, Iterable, List, NamedTuple, Optional, Sequence, Tuple

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
# Workers ship uint8 images; the loader normalises them (and applies random erasing) on the
# training device, as timm's prefetcher does. Same distribution as the float pipeline.
_C.DATA.DEVICE_NORMALIZE = False

# ----------------------------------------------------------------------------- model
_C.MODEL = CN()
_C.MODEL.TYPE = 'dat'
_C.MODEL.NAME = 'dat_tiny'
_C.MODEL.RESUME = ''
_C.MODEL.NUM_CLASSES = 1000
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

# Keyword arguments of the DeBiFormer constructor (MODEL.TYPE 'debiformer'; debiformer_facts.md
# section 1); defaults are debiformer_tiny. Classes come from MODEL.NUM_CLASSES, the attention
# kernels from MODEL.ATTN_IMPL.
_C.MODEL.DEBI = CN()
_E = _C.MODEL.DEBI
_E.depth = [1, 1, 4, 1]
_E.embed_dim = [64, 128, 256, 512]
_E.mlp_ratios = [3, 3, 3, 3]
_E.param_size = 'tiny'                   # agent constants per width: 'tiny', 'small' or 'base'
_E.drop_rate = 0.0                       # dropout before the classifier
_E.drop_path_rate = 0.0
_E.n_win = 7                             # regions per side
_E.topks = [4, 8, 16, -2]                # per stage: which two attentions each block has
_E.head_dim = 32
_E.side_dwconv = 5
_E.before_attn_dwconv = 3
_E.auto_pad = False                      # zero-pad maps to multiples of n_win (any input size)
del _E

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
# drop_rate=DROP_RATE, drop_path_rate=DROP_PATH_RATE, **KWARGS); KWARGS win, None leaves timm's default.
_C.MODEL.TIMM = CN()
_C.MODEL.TIMM.NAME = ''
_C.MODEL.TIMM.DROP_RATE = 0.0
_C.MODEL.TIMM.DROP_PATH_RATE = 0.0
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
# Evaluation resize: 'square' (official: the image is stretched to a square, then centre-cropped
# with TEST.CROP) or 'shorter_side' (Swin: the shorter side is resized, aspect ratio kept; only
# differs from 'square' with TEST.CROP).
_C.TEST.RESIZE_MODE = 'square'

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


# ----------------------------------------------------------------------------- valid values
class _Range(NamedTuple):
    """Allowed values of a numeric key (every element, for a list): ``lo``/``hi`` bounds (``None``:
    unbounded), open or closed, plus ``extra`` single values (``-1`` meaning "off" or "auto")."""
    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    extra: Tuple[float, ...] = ()

    def admits(self, v: float) -> bool:
        if v in self.extra:
            return True
        if not math.isfinite(v):        # NaN, inf: no key means them
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        if self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi):
            return False
        return True

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None:
            text = f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            text = f"{'>' if self.lo_open else '>='} {self.lo:g}"
        elif self.hi is not None:
            text = f"{'<' if self.hi_open else '<='} {self.hi:g}"
        else:
            text = 'any number'
        return ' or '.join([f'{e:g}' for e in self.extra] + [text])


_POSITIVE_INT = _Range(1)
_NON_NEGATIVE = _Range(0)
_POSITIVE = _Range(0, lo_open=True)
_PROBABILITY = _Range(0, 1)
_RATE = _Range(0, 1, hi_open=True)          # dropout, smoothing, momentum: 1 would drop everything
_AUTO_OR_POSITIVE = _Range(1, extra=(-1,))  # -1: the official "not used / automatic"
_ANY = _Range()

# Every numeric key; a test checks that none is missing. List keys are checked element-wise.
RANGES: Dict[str, _Range] = {
    'DATA.BATCH_SIZE': _POSITIVE_INT,
    'DATA.IMG_SIZE': _POSITIVE_INT,
    'DATA.NUM_WORKERS': _NON_NEGATIVE,
    'MODEL.NUM_CLASSES': _POSITIVE_INT,
    'MODEL.LABEL_SMOOTHING': _RATE,
    'MODEL.DAT.img_size': _POSITIVE_INT,
    'MODEL.DAT.patch_size': _POSITIVE_INT,
    'MODEL.DAT.num_classes': _POSITIVE_INT,
    'MODEL.DAT.expansion': _POSITIVE,
    'MODEL.DAT.dim_stem': _POSITIVE_INT,
    'MODEL.DAT.dims': _POSITIVE_INT,
    'MODEL.DAT.depths': _POSITIVE_INT,
    'MODEL.DAT.heads': _POSITIVE_INT,
    'MODEL.DAT.heads_q': _POSITIVE_INT,
    'MODEL.DAT.window_sizes': _POSITIVE_INT,
    'MODEL.DAT.drop_rate': _RATE,
    'MODEL.DAT.attn_drop_rate': _RATE,
    'MODEL.DAT.drop_path_rate': _RATE,
    'MODEL.DAT.strides': _AUTO_OR_POSITIVE,
    'MODEL.DAT.offset_range_factor': _ANY,        # negative: offsets clamped instead of scaled
    'MODEL.DAT.groups': _AUTO_OR_POSITIVE,
    'MODEL.DAT.sr_ratios': _AUTO_OR_POSITIVE,
    'MODEL.DAT.ns_per_pts': _ANY,                 # unused by the model
    'MODEL.DAT.ksizes': _POSITIVE_INT,
    'MODEL.DAT.ksize_qnas': _POSITIVE_INT,
    'MODEL.DAT.nqs': _POSITIVE_INT,
    'MODEL.DAT.nat_ksizes': _POSITIVE_INT,
    'MODEL.DAT.layer_scale_values': _ANY,         # <= 0: no layer scale
    'TRAIN.START_EPOCH': _NON_NEGATIVE,
    'TRAIN.EPOCHS': _POSITIVE_INT,
    'TRAIN.WARMUP_EPOCHS': _NON_NEGATIVE,
    'TRAIN.WEIGHT_DECAY': _NON_NEGATIVE,
    'TRAIN.BASE_LR': _NON_NEGATIVE,
    'TRAIN.WARMUP_LR': _NON_NEGATIVE,
    'TRAIN.MIN_LR': _NON_NEGATIVE,
    'TRAIN.CLIP_GRAD': _NON_NEGATIVE,             # 0 or null: no clipping
    'TRAIN.ACCUMULATION_STEPS': _POSITIVE_INT,
    'TRAIN.SAVE_ITER_FREQ': _NON_NEGATIVE,
    'TRAIN.KEEP_CHECKPOINTS': _ANY,               # <= 0: keep all
    'TRAIN.MAX_NONFINITE_STEPS': _POSITIVE_INT,
    'TRAIN.LR_SCHEDULER.DECAY_EPOCHS': _POSITIVE,
    'TRAIN.LR_SCHEDULER.DECAY_RATE': _POSITIVE,
    'TRAIN.OPTIMIZER.EPS': _POSITIVE,
    'TRAIN.OPTIMIZER.BETAS': _RATE,
    'TRAIN.OPTIMIZER.MOMENTUM': _RATE,
    'TRAIN.EMA.DECAY': _PROBABILITY,
    'AUG.COLOR_JITTER': _NON_NEGATIVE,
    'AUG.REPROB': _PROBABILITY,
    'AUG.RECOUNT': _POSITIVE_INT,
    'AUG.MIXUP': _NON_NEGATIVE,
    'AUG.CUTMIX': _NON_NEGATIVE,
    'AUG.CUTMIX_MINMAX': _Range(0, 1, lo_open=True),
    'AUG.MIXUP_PROB': _PROBABILITY,
    'AUG.MIXUP_SWITCH_PROB': _PROBABILITY,
    'SAVE_FREQ': _POSITIVE_INT,
    'PRINT_FREQ': _POSITIVE_INT,
    'SEED': _NON_NEGATIVE,
}

CHOICES: Dict[str, Tuple[str, ...]] = {
    'DATA.INTERPOLATION': ('bicubic', 'bilinear', 'nearest', 'lanczos', 'hamming', 'box', 'random'),
    'DATA.DATASET': ('imagenet', 'imagefolder'),
    'MODEL.ATTN_IMPL': ('auto', 'reference', 'fused'),
    'MODEL.DAT.deform_arith': ('pp', 'v1'),
    'MODEL.DAT.qna_activation': ('exp', 'sigmoid', 'linear'),
    'AMP_DTYPE': ('float16', 'bfloat16'),
    'TRAIN.OPTIMIZER.NAME': ('adamw', 'sgd'),
    'TRAIN.LR_SCHEDULER.NAME': ('cosine', 'linear', 'step'),
    'AUG.REMODE': ('pixel', 'rand', 'const'),
    'AUG.MIXUP_MODE': ('batch', 'pair', 'elem'),
    'TEST.RESIZE_MODE': ('square', 'shorter_side'),
}
# Case-insensitive choices (the official code lower-cases these names).
_ANY_CASE = ('TRAIN.OPTIMIZER.NAME', 'TRAIN.LR_SCHEDULER.NAME', 'DATA.DATASET')

# Pairs of keys that hold one value: setting either sets both (the later source wins); one
# source giving both with different values is an error.
ALIASES: Tuple[Tuple[str, str], ...] = (('MODEL.NUM_CLASSES', 'MODEL.DAT.num_classes'),
                                        ('MODEL.NUM_CLASSES', 'MODEL.VSA.num_classes'))

# Keys the official (Swin-derived) config declared but the DAT model never read.
_MOVED = {'MODEL.DROP_RATE': 'MODEL.DAT.drop_rate', 'MODEL.DROP_PATH_RATE': 'MODEL.DAT.drop_path_rate'}


# ----------------------------------------------------------------------------- merging
Sources = Dict[str, str]    # full key -> where its value came from (a file, '--opts', a flag)


def _decode(value: Any) -> Any:
    """Strings that spell Python literals become them (PyYAML reads ``2e-05`` as a string)."""
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
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
    if key in _MOVED:
        leaf = key.rpartition('.')[2]
        return ConfigError(f"{source}: config key '{key}' is not used by DAT; set '{_MOVED[key]}' instead "
                           f"(other families: MODEL.VSA.{leaf.lower()}, MODEL.DEBI.{leaf.lower()}, MODEL.TIMM.{leaf})")
    parent, _, leaf = key.rpartition('.')
    close = difflib.get_close_matches(leaf, list(node.keys()), n=1)
    hint = f"; did you mean '{parent + '.' if parent else ''}{close[0]}'?" if close else ''
    return ConfigError(f"{source}: unknown config key '{key}'{hint}")


def _merge_dict(node: CN, update: dict, source: str, prefix: str = '',
                given: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Merge ``update`` into ``node``; returns ``given``: every leaf key set, with its new value."""
    given = {} if given is None else given
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
            _merge_dict(default, value, source, full + '.', given)
        else:
            node[key] = _coerce(value, default, full, source)
            given[full] = node[key]
    return given


def _get(config: CN, key: str) -> Any:
    node: Any = config
    for part in key.split('.'):
        node = node[part]
    return node


def _set(config: CN, key: str, value: Any) -> None:
    parent, _, leaf = key.rpartition('.')
    (_get(config, parent) if parent else config)[leaf] = value


def _apply(config: CN, given: Dict[str, Any], source: str, sources: Optional[Sources]) -> None:
    """Record where the keys of one source came from and keep aliased keys equal."""
    # Twice, so that a value given through one alias of MODEL.NUM_CLASSES reaches all the others.
    for a, b in ALIASES + ALIASES:
        if a in given and b in given and given[a] != given[b]:
            raise ConfigError(f"{source}: {a} is {given[a]!r} but {b} is {given[b]!r}; they are the "
                              f"same setting: give one of them (the other follows) or both equal")
        for this, other in ((a, b), (b, a)):
            if this in given and other not in given:
                _set(config, other, given[this])
                given[other] = given[this]
    if sources is not None:
        sources.update((k, source) for k in given)


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: Dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice (first on line {seen[key].line + 1})",
                    key_node.start_mark)
            if isinstance(key, Hashable):
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _read_yaml(cfg_file: str) -> dict:
    try:
        with open(cfg_file, 'r', encoding='utf-8') as f:
            data = yaml.load(f, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ''
        problem = getattr(e, 'problem', None) or str(e).splitlines()[0]
        raise ConfigError(f"{cfg_file}{where}: not valid YAML ({problem})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{cfg_file}: cannot be read ({type(e).__name__}: {e})") from None
    if data is None or data == {}:
        raise ConfigError(f"{cfg_file}: the file is empty (no config keys); give the YAML of a model, "
                          f"e.g. configs/dat_tiny.yaml")
    if not isinstance(data, dict):
        raise ConfigError(f"{cfg_file}: the top level must be a mapping of config sections, "
                          f"got a {type(data).__name__}")
    return data


def _base_files(data: dict, cfg_file: str) -> List[str]:
    """The files ``BASE`` names (a list, or one string), relative to ``cfg_file``."""
    bases = data.get('BASE', [''])
    if bases is None:
        bases = []
    elif isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{cfg_file}: BASE must be a file name or a list of file names, got {bases!r}")
    return [os.path.join(os.path.dirname(cfg_file), b) for b in bases if b]


def merge_file(config: CN, cfg_file: str, sources: Optional[Sources] = None,
               _chain: Tuple[str, ...] = ()) -> None:
    """Merge ``cfg_file`` (and, first, the files its ``BASE`` names, relative to it)."""
    if not os.path.isfile(cfg_file):
        included = f" (in BASE of '{_chain[-1]}')" if _chain else ' (pass an existing YAML with --cfg)'
        raise ConfigError(f"config file not found: '{cfg_file}'{included}")
    real = os.path.realpath(cfg_file)
    if real in (os.path.realpath(c) for c in _chain):
        cycle = ' -> '.join(list(_chain) + [cfg_file])
        raise ConfigError(f"{_chain[-1]}: BASE files include each other ({cycle}); remove one of "
                          f"these BASE entries")
    data = _read_yaml(cfg_file)
    for base in _base_files(data, cfg_file):
        merge_file(config, base, sources, _chain + (cfg_file,))
    _apply(config, _merge_dict(config, data, cfg_file), cfg_file, sources)


def merge_opts(config: CN, opts: Sequence[str], sources: Optional[Sources] = None,
               source: str = '--opts') -> None:
    """Apply ``KEY VALUE`` pairs given on the command line (``--opts``)."""
    if len(opts) % 2:
        raise ConfigError(f"--opts needs KEY VALUE pairs, got an odd number of items: {list(opts)}")
    given: Dict[str, Any] = {}
    for key, value in zip(opts[0::2], opts[1::2]):
        node = config
        parts = key.split('.')
        for i, part in enumerate(parts[:-1]):
            if part not in node or not isinstance(node[part], CN):
                raise _unknown_key('.'.join(parts[:i + 1]), node, source)
            node = node[part]
        _merge_dict(node, {parts[-1]: value}, source, '.'.join(parts[:-1]) + '.' if len(parts) > 1 else '',
                    given)
    _apply(config, given, source, sources)


def default_config() -> CN:
    """A fresh, unfrozen copy of the defaults."""
    return _C.clone()


def load_config(cfg_file: Optional[str] = None, opts: Iterable[str] = (), **overrides: Any) -> CN:
    """Defaults + ``cfg_file`` + ``opts``; returns a frozen config (no output-dir rewriting)."""
    config = default_config()
    sources: Sources = {}
    if cfg_file:
        merge_file(config, cfg_file, sources)
    merge_opts(config, list(opts), sources)
    for key, value in overrides.items():
        merge_opts(config, [key, value], sources)
    validate(config, sources)
    config.freeze()
    return config


# Command-line flags of main.py and the key each sets (flags left out, i.e. None, change nothing).
_FLAGS = (('batch_size', 'DATA.BATCH_SIZE'), ('data_path', 'DATA.DATA_PATH'), ('resume', 'MODEL.RESUME'),
          ('pretrained', 'MODEL.PRETRAINED'), ('amp_dtype', 'AMP_DTYPE'), ('print_freq', 'PRINT_FREQ'),
          ('output', 'OUTPUT'), ('tag', 'TAG'))
_SWITCHES = (('amp', 'AMP'), ('use_checkpoint', 'TRAIN.USE_CHECKPOINT'), ('eval', 'EVAL_MODE'),
             ('throughput', 'THROUGHPUT_MODE'))


def update_config(config: CN, args: argparse.Namespace) -> None:
    """Apply a command line (``main.py``'s arguments) to ``config`` like the official scripts."""
    config.defrost()
    sources: Sources = {}
    if getattr(args, 'cfg', None):
        merge_file(config, args.cfg, sources)
    merge_opts(config, list(getattr(args, 'opts', None) or []), sources)
    for name, key in _FLAGS:
        value = getattr(args, name, None)
        if value is None or value == '':       # not given (0 is given: the range check judges it)
            continue
        _set(config, key, value)
        sources[key] = f"--{name.replace('_', '-')}"
    for name, key in _SWITCHES:
        if getattr(args, name, None):
            _set(config, key, True)
    validate(config, sources)
    config.OUTPUT = os.path.join(config.OUTPUT, config.MODEL.NAME, config.TAG)
    config.freeze()


# ----------------------------------------------------------------------------- validation
def _leaves(node: CN, prefix: str = ''):
    for key, value in node.items():
        if isinstance(value, CN):
            yield from _leaves(value, prefix + key + '.')
        else:
            yield prefix + key, value


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fail(key: str, value: Any, expected: str, sources: Optional[Sources]) -> ConfigError:
    where = (sources or {}).get(key, 'default value')
    return ConfigError(f"{where}: config key '{key}' is {value!r}; it must be {expected}")


def validate(config: CN, sources: Optional[Sources] = None) -> None:
    """Value checks the type system cannot express; each failure is one line naming the key and
    where its value came from (file, ``--opts`` or a flag)."""
    for key, allowed in CHOICES.items():
        value = _get(config, key)
        if (value.lower() if key in _ANY_CASE and isinstance(value, str) else value) not in allowed:
            raise _fail(key, value, f"one of {list(allowed)}", sources)
    for key, rule in RANGES.items():
        value = _get(config, key)
        if value is None and _get(_C, key) is None or (key == 'TRAIN.CLIP_GRAD' and value is None):
            continue
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if not all(_is_number(v) for v in values) or not all(rule.admits(v) for v in values):
            expected = rule.describe() + (' for every element' if isinstance(value, (list, tuple)) else '')
            raise _fail(key, value, expected, sources)
    for key, n in (('AUG.CUTMIX_MINMAX', 2), ('TRAIN.OPTIMIZER.BETAS', 2)):
        value = _get(config, key)
        if value is not None and len(value) != n:
            raise _fail(key, value, f"a list of {n} numbers", sources)
    minmax = config.AUG.CUTMIX_MINMAX
    if minmax is not None and not minmax[0] < minmax[1]:
        raise _fail('AUG.CUTMIX_MINMAX', minmax, "[min, max] with min < max", sources)
    for a, b in ALIASES:
        if _get(config, a) != _get(config, b):
            raise ConfigError(f"config keys '{a}' ({_get(config, a)!r}) and '{b}' ({_get(config, b)!r}) "
                              f"disagree; they are the same setting: set one of them")
    # The last stage needs a map of at least one pixel: patch_size * 2**(stages - 1) pixels.
    dat = config.MODEL.DAT
    smallest = dat.patch_size * 2 ** (len(dat.depths) - 1)
    if config.MODEL.TYPE == 'dat' and config.DATA.IMG_SIZE < smallest:
        raise _fail('DATA.IMG_SIZE', config.DATA.IMG_SIZE,
                    f">= {smallest} for this model (patch_size {dat.patch_size}, {len(dat.depths)} stages "
                    f"each halving the map)", sources)
    train = config.TRAIN
    if (not config.EVAL_MODE and not config.THROUGHPUT_MODE
            and train.LR_SCHEDULER.NAME.lower() in ('cosine', 'linear') and train.EPOCHS <= train.WARMUP_EPOCHS):
        def rank(key: str) -> int:          # blame the key given last: flags/--opts, a file, a default
            where = (sources or {}).get(key)
            return 0 if where is None else 2 if where.startswith('--') else 1
        if rank('TRAIN.WARMUP_EPOCHS') >= rank('TRAIN.EPOCHS'):
            raise _fail('TRAIN.WARMUP_EPOCHS', train.WARMUP_EPOCHS,
                        f"< TRAIN.EPOCHS ({train.EPOCHS}) for the {train.LR_SCHEDULER.NAME} schedule", sources)
        raise _fail('TRAIN.EPOCHS', train.EPOCHS, f"> TRAIN.WARMUP_EPOCHS ({train.WARMUP_EPOCHS}) for the "
                    f"{train.LR_SCHEDULER.NAME} schedule", sources)


def get_config(args: argparse.Namespace) -> CN:
    """Defaults updated from the command line; ``OUTPUT`` becomes ``<output>/<MODEL.NAME>/<TAG>``."""
    config = default_config()
    update_config(config, args)
    return config
