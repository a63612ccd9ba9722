"""Valid config values: the range of every numeric key, the choices of every named option, the
keys that hold one setting between them, and :func:`validate`, which checks a merged config.

Each failure is a :class:`ConfigError` with a one-line message naming the key, its value, where
the value came from (a file, ``--opts`` or a command-line flag) and what is allowed.
"""
from __future__ import annotations

import math
from typing import Any, Dict, NamedTuple, Optional, Tuple

from yacs.config import CfgNode as CN


class ConfigError(ValueError):
    """A config file or override that cannot be applied; the message is one line."""


Sources = Dict[str, str]    # full key -> where its value came from (a file, '--opts', a flag)


def get_key(config: CN, key: str) -> Any:
    """The value of a dotted key, e.g. ``'TRAIN.OPTIMIZER.EPS'``."""
    node: Any = config
    for part in key.split('.'):
        node = node[part]
    return node


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
    'DATA.MAX_SKIPPED_FRACTION': _PROBABILITY,
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
# Numeric keys that may be null: no cutmix bounds (AUG.CUTMIX alone), no gradient clipping.
NULLABLE = ('AUG.CUTMIX_MINMAX', 'TRAIN.CLIP_GRAD')

CHOICES: Dict[str, Tuple[str, ...]] = {
    'DATA.INTERPOLATION': ('bicubic', 'bilinear', 'nearest', 'lanczos', 'hamming', 'box', 'random'),
    'DATA.DATASET': ('imagenet', 'imagefolder'),
    'DATA.FORMAT': ('folder', 'wds', 'hf'),
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
_ANY_CASE = ('TRAIN.OPTIMIZER.NAME', 'TRAIN.LR_SCHEDULER.NAME', 'DATA.DATASET', 'DATA.FORMAT')

# Pairs of keys that hold one value: setting either sets both (the later source wins); one
# source giving both with different values is an error.
ALIASES: Tuple[Tuple[str, str], ...] = (('MODEL.NUM_CLASSES', 'MODEL.DAT.num_classes'),
                                        ('MODEL.NUM_CLASSES', 'MODEL.VSA.num_classes'))



def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fail(key: str, value: Any, expected: str, sources: Optional[Sources]) -> ConfigError:
    where = (sources or {}).get(key, 'default value')
    return ConfigError(f"{where}: config key '{key}' is {value!r}; it must be {expected}")


def validate(config: CN, sources: Optional[Sources] = None) -> None:
    """Value checks the type system cannot express; each failure is one line naming the key and
    where its value came from (file, ``--opts`` or a flag)."""
    for key, allowed in CHOICES.items():
        value = get_key(config, key)
        if (value.lower() if key in _ANY_CASE and isinstance(value, str) else value) not in allowed:
            raise _fail(key, value, f"one of {list(allowed)}", sources)
    for key, rule in RANGES.items():
        value = get_key(config, key)
        if value is None and key in NULLABLE:
            continue
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if not all(_is_number(v) for v in values) or not all(rule.admits(v) for v in values):
            expected = rule.describe() + (' for every element' if isinstance(value, (list, tuple)) else '')
            raise _fail(key, value, expected, sources)
    for key, n in (('AUG.CUTMIX_MINMAX', 2), ('TRAIN.OPTIMIZER.BETAS', 2)):
        value = get_key(config, key)
        if value is not None and len(value) != n:
            raise _fail(key, value, f"a list of {n} numbers", sources)
    minmax = config.AUG.CUTMIX_MINMAX
    if minmax is not None and not minmax[0] < minmax[1]:
        raise _fail('AUG.CUTMIX_MINMAX', minmax, "[min, max] with min < max", sources)
    for a, b in ALIASES:
        if get_key(config, a) != get_key(config, b):
            raise ConfigError(f"config keys '{a}' ({get_key(config, a)!r}) and '{b}' ({get_key(config, b)!r}) "
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
