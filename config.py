"""Configuration: yacs defaults for every official key and the entry points that build a config
(defaults, then a YAML file with its ``BASE`` chain, then ``--opts`` and command-line flags).

The official YAML files load unchanged. Unlike the official code, ``MODEL.DAT`` is not
open-ended: every constructor keyword is declared here, so a misspelt key fails with
one line that names the key and the file instead of being silently ignored. Reading and
merging files lives in ``config_loading.py``; the valid values and their checks in
``config_checks.py``.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Iterable, Optional

from yacs.config import CfgNode as CN

from config_checks import ALIASES, CHOICES, RANGES, ConfigError, Sources, validate
from config_loading import merge_file, merge_opts, set_key

__all__ = ['ALIASES', 'CHOICES', 'RANGES', 'ConfigError', 'default_config', 'get_config', 'load_config',
           'merge_file', 'merge_opts', 'update_config', 'validate']

_C = CN()
_C.BASE = ['']

# ----------------------------------------------------------------------------- data
_C.DATA = CN()
_C.DATA.BATCH_SIZE = 128          # per GPU / process
_C.DATA.DATA_PATH = ''            # ImageFolder root holding train/ and val/
_C.DATA.DATASET = 'imagenet'
# Where the images come from: 'folder' (an ImageFolder root with train/ and val/), 'wds'
# (WebDataset tar shards, data/shards.py) or 'hf' (a local Hugging Face dataset, data/hf.py).
# For 'wds' / 'hf', the file patterns of each split (brace ranges and globs, relative to DATA_PATH;
# empty: train/*.tar and val/*.tar, or the dataset's own splits) and the class-index file (one
# class name per line; empty: DATA_PATH/classes.txt when present, else the dataset's labels).
_C.DATA.FORMAT = 'folder'
_C.DATA.TRAIN_SHARDS = ''
_C.DATA.VAL_SHARDS = ''
_C.DATA.CLASS_INDEX = ''
_C.DATA.IMG_SIZE = 224
_C.DATA.INTERPOLATION = 'bicubic'
_C.DATA.PIN_MEMORY = True
_C.DATA.NUM_WORKERS = 8
# Unreadable training images tolerated per epoch (skipped), as a fraction of the epoch: more
# stop the run with an error naming the path (a split that stopped yielding images).
_C.DATA.MAX_SKIPPED_FRACTION = 0.1
# Workers ship uint8 NHWC batches; the loader normalises them (and applies random erasing) on the
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
# Neighborhood / deformable attention kernels: 'auto' (on CUDA the fused kernels with the least
# risk, SDPA; reference elsewhere), 'reference' or 'fused' (also flex attention for large maps).
# Fused calls are checked against the reference at start-up (models/kernel_check.py).
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
# Groups with a lower lr (MODEL.DAT.lower_lr_kvs) warm up from WARMUP_LR and decay to MIN_LR as
# the official code does; True scales both by the group's multiplier too.
_C.TRAIN.LR_SCHEDULER.SCALE_WARMUP_MIN = False

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
# --eval of a checkpoint evaluates its EMA weights ('ema') instead of its weights ('model').
_C.TEST.EMA = False

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


# ----------------------------------------------------------------------------- building a config
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
             ('throughput', 'THROUGHPUT_MODE'), ('eval_ema', 'TEST.EMA'), ('eval_ema', 'EVAL_MODE'))


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
        set_key(config, key, value)
        sources[key] = f"--{name.replace('_', '-')}"
    for name, key in _SWITCHES:
        if getattr(args, name, None):
            set_key(config, key, True)
    validate(config, sources)
    config.OUTPUT = os.path.join(config.OUTPUT, config.MODEL.NAME, config.TAG)
    config.freeze()


def get_config(args: argparse.Namespace) -> CN:
    """Defaults updated from the command line; ``OUTPUT`` becomes ``<output>/<MODEL.NAME>/<TAG>``."""
    config = default_config()
    update_config(config, args)
    return config
