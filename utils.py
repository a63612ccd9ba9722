"""Checkpoint I/O and pretrained loading; reproducibility (deterministic kernels, RNG state, digests).

Checkpoints hold only tensors and plain Python values, so they load with
``torch.load(path, map_location='cpu', weights_only=True)``: opening a checkpoint never runs
code from it. Writes are atomic (temp file, fsync, rename): a crash or a full disk leaves the
previous checkpoint as it was.
"""
from __future__ import annotations

import collections
import errno
import hashlib
import logging
import math
import os
import random
import re
import secrets
import shutil
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    'CheckpointError', 'atomic_save', 'load_checkpoint_file', 'CheckpointManager', 'find_resume',
    'strip_prefixes', 'unwrap_model', 'unwrap_state_dict', 'load_model_state', 'load_pretrained',
    'configure_determinism', 'state_digest', 'get_rng_state', 'set_rng_state',
]

_log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, read or applied; the message is one line with a fix."""


# ============================================================================ names and wrappers
# Prefixes added by DistributedDataParallel / DataParallel ('module.') and torch.compile ('_orig_mod.').
_WRAPPER_PREFIXES = ('module.', '_orig_mod.')


def strip_prefixes(name: str) -> str:
    """``module._orig_mod.stages.0.x`` -> ``stages.0.x``: the name the bare model uses."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                stripped = True
    return name


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, '_orig_mod', None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _list_names(names: Sequence[str], limit: int = 8) -> str:
    shown = ', '.join(names[:limit])
    return shown + (f' ... and {len(names) - limit} more' if len(names) > limit else '')


def _shape(t: torch.Tensor) -> str:
    return '(' + ', '.join(str(s) for s in t.shape) + ')'


# ============================================================================ writing
# Types ``torch.load(weights_only=True)`` accepts; anything else would make the file unloadable.
_PLAIN_LEAVES = (str, bytes, int, float, bool, complex, type(None), torch.dtype, torch.device)
_PLAIN_CONTAINERS = (dict, collections.OrderedDict, list, tuple, set, torch.Size)


def _check_plain(obj: Any, where: str = 'checkpoint') -> None:
    """Raise CheckpointError naming the first value ``weights_only`` loading would reject."""
    if isinstance(obj, torch.Tensor):
        if type(obj) not in (torch.Tensor, nn.Parameter):
            raise CheckpointError(f"{where} is a {type(obj).__name__}; save plain tensors (call .detach() or "
                                  f".to_local() first)")
        return
    kind = type(obj)
    if kind in _PLAIN_LEAVES:
        return
    if kind in (dict, collections.OrderedDict):
        for key, value in obj.items():
            if type(key) not in _PLAIN_LEAVES:
                raise CheckpointError(f"{where} has a key of type {type(key).__name__}; use str or int keys")
            _check_plain(value, f"{where}[{key!r}]")
        return
    if kind in _PLAIN_CONTAINERS:
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
        return
    raise CheckpointError(
        f"{where} is a {kind.__module__}.{kind.__qualname__}; checkpoints hold only tensors and plain "
        f"Python values (convert it, e.g. config.dump() for a config, float() for a numpy number)")


def _fsync_dir(directory: str) -> None:
    """Make a rename durable. Best effort: some file systems cannot fsync a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_failed(path: str, err: OSError) -> CheckpointError:
    reason = err.strerror or str(err) or type(err).__name__
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = 'free disk space or point OUTPUT to a volume with room'
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = 'make the output directory writable or choose another OUTPUT'
    else:
        fix = 'check the output directory and the file system'
    return CheckpointError(f"could not write checkpoint {path}: {reason} (previous checkpoint kept; {fix})")


def _atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Run ``write`` on a temp file beside ``path``, fsync it and rename it onto ``path``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp: Optional[str] = None
    try:
        os.makedirs(directory, exist_ok=True)
        # Same directory, so the final os.replace is a rename within one file system.
        tmp = os.path.join(directory, f'.{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp')
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise _write_failed(path, e) from e
    finally:
        if tmp is not None:
            try:
                os.remove(tmp)
            except OSError:
                pass
    _fsync_dir(directory)


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` that never leaves a partial file at ``path``.

    ``obj`` must hold only tensors and plain Python values. On failure the temp file is
    removed, an existing file at ``path`` is untouched, and CheckpointError is raised.
    """
    _check_plain(obj)
    _atomic_write(path, lambda f: torch.save(obj, f))


def _atomic_link_or_copy(src: str, dst: str) -> None:
    """Make ``dst`` an atomic replica of ``src``: a hard link where possible (no data copied)."""
    directory = os.path.dirname(os.path.abspath(dst))
    tmp = os.path.join(directory, f'.{os.path.basename(dst)}.{os.getpid()}.{secrets.token_hex(4)}.tmp')
    try:
        os.link(src, tmp)
        os.replace(tmp, dst)
        _fsync_dir(directory)
        return
    except OSError:
        if os.path.lexists(tmp):
            os.remove(tmp)

    def copy(f: BinaryIO) -> None:
        with open(src, 'rb') as s:
            shutil.copyfileobj(s, f, length=16 << 20)
    _atomic_write(dst, copy)


# ============================================================================ reading
def _first_line(err: BaseException, limit: int = 160) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= limit else line[:limit] + '...'


def _unsafe_globals(message: str) -> List[str]:
    return sorted(set(re.findall(r'GLOBAL ([\w.]+)', message)))


class PickledConfig(dict):
    """Plain-data stand-in for the yacs ``CfgNode`` that official training checkpoints pickle."""


def _load_with_pickled_config(path: str) -> Any:
    """Load an official training checkpoint that pickles its yacs config, still without running code.

    ``weights_only`` loading rejects ``CfgNode`` (a dict subclass), so this unpickler admits exactly
    torch's weights-only allow-list plus ``CfgNode``, which it rebuilds as a plain ``PickledConfig``.
    """
    import _compat_pickle
    import pickle
    import types
    from torch import _weights_only_unpickler   # the allow-list behind weights_only=True
    allowed = dict(_weights_only_unpickler._get_allowed_globals())

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            # protocol-2 pickles name Python 2 modules ('__builtin__.set'): map them as pickle does
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
            key = f'{module}.{name}'
            if key == 'yacs.config.CfgNode':
                return PickledConfig
            if key in allowed:
                return allowed[key]
            raise pickle.UnpicklingError(f'GLOBAL {key} is not allowed')

    restricted = types.SimpleNamespace(__name__='restricted_pickle', Unpickler=Unpickler,
                                       load=lambda f, **kw: Unpickler(f, **kw).load())
    return torch.load(path, map_location='cpu', weights_only=False, pickle_module=restricted)


def load_checkpoint_file(path: str, mmap: bool = False) -> dict:
    """Load a checkpoint (``.pth`` / ``.pt`` / ``.safetensors``) safely onto the CPU.

    ``mmap=True`` maps tensor data lazily (cheap way to read the small fields of a big file).
    Raises CheckpointError for a missing, unreadable, truncated or corrupt file, and for a file
    that needs unsafe unpickling (arbitrary Python objects), which is refused. Official training
    checkpoints that pickle their yacs config are read through a restricted unpickler.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path} (check the path given with --resume / "
                              f"--pretrained or MODEL.RESUME / MODEL.PRETRAINED)")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint path is a directory: {path} (give a checkpoint file inside it)")
    if path.endswith('.safetensors'):
        try:
            from safetensors.torch import load_file
            return dict(load_file(path, device='cpu'))
        except Exception as e:  # the safetensors reader raises its own error types
            raise CheckpointError(f"checkpoint {path} is not a readable safetensors file ({_first_line(e)})") from e
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except PermissionError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror} (fix its permissions)") from e
    except Exception as e:
        message = str(e)
        if 'CfgNode' in message:          # an official training checkpoint with its config
            try:
                ckpt = _load_with_pickled_config(path)
            except Exception:             # anything beyond CfgNode: refused below
                ckpt = None
            if isinstance(ckpt, dict):
                return ckpt
        unsafe = _unsafe_globals(message)
        if unsafe or 'Unsupported class' in message:
            what = ', '.join(unsafe) if unsafe else 'arbitrary classes'
            raise CheckpointError(
                f"refused to load {path}: it holds Python objects ({what}) that could run code when "
                f"unpickled, so it is refused for safety; if you trust the file, convert it once with "
                f"`python tools/convert_checkpoint.py --in {path} --out <new.pth>` (keeps the model weights) "
                f"and use the new file") from e
        if mmap and 'mmap' in message:
            # Old (non-zip) torch.save format cannot be memory-mapped; read it whole.
            return load_checkpoint_file(path, mmap=False)
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({_first_line(e)}); delete it and use an earlier "
            f"checkpoint, or copy / download it again") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a dict of weights")
    return ckpt


def unwrap_state_dict(ckpt: dict) -> Dict[str, torch.Tensor]:
    """The model state dict inside a checkpoint.

    Accepts this project's checkpoints and official ones (``{'model': sd, ...}``),
    ``{'state_dict': sd}`` files, and bare state dicts.
    """
    for key in ('model', 'state_dict'):
        inner = ckpt.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt
    keys = [str(k) for k in ckpt.keys()]
    raise CheckpointError(
        f"no model weights in checkpoint (top-level keys: {_list_names(keys)}); expected a 'model' or "
        f"'state_dict' entry holding tensors, or a plain state dict")


# ============================================================================ applying weights
def _mismatch_message(prefix: str, missing: Sequence[str], unexpected: Sequence[str],
                      shapes: Sequence[str], fix: str) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing: {_list_names(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {_list_names(unexpected)}")
    if shapes:
        parts.append(f"{len(shapes)} with another shape: {_list_names(shapes)}")
    return f"{prefix}: " + '; '.join(parts) + f"; {fix}"


def load_model_state(model: nn.Module, state_dict: Dict[str, torch.Tensor],
                     strict: bool = True) -> Tuple[List[str], List[str]]:
    """Load ``state_dict`` into ``model`` (wrapper prefixes on either side are ignored).

    Shape mismatches always raise CheckpointError; missing / unexpected names raise it when
    ``strict``. The message lists the names (and shapes) and says what to fix.
    Returns ``(missing, unexpected)`` names, which are empty when ``strict``.
    """
    model = unwrap_model(model)
    sd = {strip_prefixes(k): v for k, v in state_dict.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} checkpoint {_shape(sd[k])} vs model {_shape(own[k])}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if shapes or (strict and (missing or unexpected)):
        raise CheckpointError(_mismatch_message(
            "checkpoint does not fit the model (it is for a different architecture or config)",
            missing if strict else [], unexpected if strict else [], shapes,
            "build the model with the config the checkpoint was trained with"))
    model.load_state_dict(sd, strict=strict)
    return missing, unexpected


# Buffers that depend on the input resolution; a model built for another size keeps its own.
_RESOLUTION_BUFFERS = ('relative_position_index', 'attn_mask')
_HEAD_PREFIX = 'cls_head.'


def _bicubic(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bicubic resize of the last two dims of a (1, C, H, W) tensor, in its own precision
    (float32 at least)."""
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    out = F.interpolate(work, size=tuple(size), mode='bicubic', align_corners=False)
    return out.to(x.dtype)


def _resize_position_table(name: str, value: torch.Tensor, target: torch.Size) -> Optional[torch.Tensor]:
    """``value`` resized to ``target`` when ``name`` is a resizable position table, else None.

    ``rpe_table`` (heads, 2f-1, 2f-1) and ``rpb`` (heads, 2K-1, 2K-1) are images per head;
    ``relative_position_bias_table`` ((2w-1)^2, heads) is one after a reshape.
    """
    leaf = name.rsplit('.', 1)[-1]
    if leaf in ('rpe_table', 'rpb') and value.ndim == 3 and len(target) == 3 and value.shape[0] == target[0]:
        return _bicubic(value.unsqueeze(0), target[1:]).squeeze(0)
    if (leaf == 'relative_position_bias_table' and value.ndim == 2 and len(target) == 2
            and value.shape[1] == target[1]):
        side, new_side = math.isqrt(value.shape[0]), math.isqrt(target[0])
        if side * side != value.shape[0] or new_side * new_side != target[0]:
            return None
        heads = value.shape[1]
        image = value.reshape(side, side, heads).permute(2, 0, 1).unsqueeze(0)
        resized = _bicubic(image, (new_side, new_side))[0]
        return resized.permute(1, 2, 0).reshape(new_side * new_side, heads)
    return None


def _uses_fixed_table(config, name: str) -> bool:
    """True for the ``fixed_pes`` table of a stage: it is bound to its resolution, not an image."""
    match = re.match(r'stages\.(\d+)\.', name)
    fixed = getattr(getattr(config.MODEL, 'DAT', None), 'fixed_pes', None)
    if not match or not fixed:
        return False
    stage = int(match.group(1))
    return stage < len(fixed) and bool(fixed[stage]) and name.endswith('.rpe_table')


def _read_class_index(path: str) -> torch.Tensor:
    """Class indices from a text file (one integer per line) or a file saved with ``torch.save``."""
    if not os.path.isfile(path):
        raise CheckpointError(f"MODEL.MAP_22K_TO_1K file not found: {path} (give a text file with one "
                              f"22K class index per line, or clear the key to train a fresh head)")
    with open(path, 'rb') as f:
        magic = f.read(2)
    if magic == b'PK' or magic[:1] == b'\x80':   # torch zip format / legacy pickle
        try:
            index = torch.as_tensor(torch.load(path, map_location='cpu', weights_only=True))
        except Exception as e:
            raise CheckpointError(f"MODEL.MAP_22K_TO_1K file {path} does not load as a tensor or list of "
                                  f"integers ({_first_line(e)})") from e
    else:
        try:
            with open(path, 'r') as f:
                values = [int(tok) for line in f for tok in line.split('#', 1)[0].split()]
        except (UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"MODEL.MAP_22K_TO_1K file {path} is not a list of integers "
                                  f"({_first_line(e)})") from e
        index = torch.tensor(values)
    if index.ndim != 1 or index.is_floating_point() or index.numel() == 0:
        raise CheckpointError(f"MODEL.MAP_22K_TO_1K file {path} must hold a non-empty 1-D list of integers, "
                              f"got shape {tuple(index.shape)} {index.dtype}")
    return index.long()


def _map_head(sd: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor], config, logger: logging.Logger) -> None:
    """Make the checkpoint's classifier fit the model: select mapped rows or drop it."""
    keys = [k for k in (_HEAD_PREFIX + 'weight', _HEAD_PREFIX + 'bias') if k in sd and k in own]
    if not keys or all(sd[k].shape[0] == own[k].shape[0] for k in keys):
        return
    ckpt_classes, model_classes = sd[keys[0]].shape[0], own[keys[0]].shape[0]
    map_file = getattr(config.MODEL, 'MAP_22K_TO_1K', '') or ''
    if not map_file:
        logger.warning(f"pretrained head has {ckpt_classes} classes, the model {model_classes}: "
                       f"head not loaded, a fresh one is trained (set MODEL.MAP_22K_TO_1K to select classes)")
        for k in keys:
            del sd[k]
        return
    index = _read_class_index(map_file)
    if index.numel() != model_classes or index.min() < 0 or index.max() >= ckpt_classes:
        raise CheckpointError(
            f"MODEL.MAP_22K_TO_1K {map_file} holds {index.numel()} indices in [{int(index.min())}, "
            f"{int(index.max())}]; it needs {model_classes} (MODEL.NUM_CLASSES) indices below {ckpt_classes} "
            f"(the checkpoint's classes)")
    for k in keys:
        sd[k] = sd[k].index_select(0, index)
    logger.info(f"mapped the pretrained {ckpt_classes}-class head to {model_classes} classes with {map_file}")


def load_pretrained(config, model: nn.Module, logger: logging.Logger, path: Optional[str] = None) -> None:
    """Initialise ``model`` from ``MODEL.PRETRAINED`` (or ``path``) for fine-tuning.

    Position tables are resized bicubically to the model's resolution, resolution-dependent
    buffers keep the model's values, and a classifier for another number of classes is mapped
    with ``MODEL.MAP_22K_TO_1K`` or left fresh. Every other tensor of the model must be
    loaded, otherwise CheckpointError is raised.
    """
    path = path or config.MODEL.PRETRAINED
    logger.info(f"loading pretrained weights from {path}")
    model = unwrap_model(model)
    sd = {strip_prefixes(k): v for k, v in unwrap_state_dict(load_checkpoint_file(path)).items()}
    own = model.state_dict()
    params = dict(model.named_parameters())

    kept_buffers = [k for k in own if k.rsplit('.', 1)[-1] in _RESOLUTION_BUFFERS]
    for k in [k for k in sd if k.rsplit('.', 1)[-1] in _RESOLUTION_BUFFERS]:
        del sd[k]

    for k, value in list(sd.items()):
        if k not in params or value.shape == params[k].shape or value.ndim != params[k].ndim:
            continue
        if _uses_fixed_table(config, k):
            raise CheckpointError(
                f"pretrained {k} {_shape(value)} is a fixed position table (fixed_pes) bound to its "
                f"resolution and cannot be resized to {_shape(params[k])}; fine-tune at the pretraining size")
        resized = _resize_position_table(k, value, params[k].shape)
        if resized is not None:
            logger.info(f"resized {k} from {_shape(value)} to {_shape(resized)} (bicubic)")
            sd[k] = resized

    _map_head(sd, own, config, logger)

    shapes = [f"{k} checkpoint {_shape(sd[k])} vs model {_shape(own[k])}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    missing = [k for k in own if k not in sd and k not in kept_buffers and not k.startswith(_HEAD_PREFIX)]
    if shapes or missing:
        raise CheckpointError(_mismatch_message(
            f"pretrained checkpoint {path} does not fit the model (different architecture or config)",
            missing, [], shapes, "use a checkpoint of the same model or fix MODEL.DAT in the config"))
    result = model.load_state_dict(sd, strict=False)
    if result.missing_keys:
        logger.info(f"kept the model's own values for {len(result.missing_keys)} tensors: "
                    f"{_list_names(result.missing_keys)}")
    if result.unexpected_keys:
        logger.warning(f"ignored {len(result.unexpected_keys)} checkpoint tensors the model does not have: "
                       f"{_list_names(result.unexpected_keys)}")
    logger.info(f"loaded pretrained weights from {path}")


# ============================================================================ checkpoint files
_CKPT_NAME = re.compile(r'^ckpt_epoch_(\d+)(?:_iter_(\d+))?\.pth$')
_STALE_TMP = re.compile(r'^\.(ckpt_epoch_\d+(_iter_\d+)?|best)\.pth\..*\.tmp$')
BEST_NAME = 'best.pth'
_EPOCH_END = math.inf   # an epoch-end checkpoint is past every mid-epoch one of that epoch

Progress = Tuple[int, float]


def _progress(epoch: int, iteration: Optional[int]) -> Progress:
    return int(epoch), (_EPOCH_END if iteration is None else int(iteration))


class CheckpointManager:
    """Saves ``ckpt_epoch_{e}.pth`` / ``ckpt_epoch_{e}_iter_{i}.pth`` (+ ``best.pth``) in ``output_dir``,
    prunes old ones, and finds the most advanced loadable checkpoint to resume from.

    Call ``save`` on the main process only. ``keep_last`` epoch checkpoints are kept (``<= 0``
    keeps all); ``best.pth`` is never pruned.
    """

    def __init__(self, output_dir: str, keep_last: int = 3, logger: Optional[logging.Logger] = None):
        self.output_dir = output_dir
        self.keep_last = keep_last
        self.logger = logger or _log
        self._temp_files_checked = False

    # -- naming
    def path_for(self, epoch: int, iteration: Optional[int] = None) -> str:
        name = f'ckpt_epoch_{epoch}.pth' if iteration is None else f'ckpt_epoch_{epoch}_iter_{iteration}.pth'
        return os.path.join(self.output_dir, name)

    def checkpoints(self) -> List[Tuple[Progress, str]]:
        """``(progress, path)`` of the numbered checkpoints on disk, oldest first (from file names)."""
        if not os.path.isdir(self.output_dir):
            return []
        found = []
        for name in os.listdir(self.output_dir):
            match = _CKPT_NAME.match(name)
            if match:
                iteration = None if match.group(2) is None else int(match.group(2))
                found.append((_progress(int(match.group(1)), iteration), os.path.join(self.output_dir, name)))
        return sorted(found)

    # -- writing
    def save(self, state: dict, epoch: int, iteration: Optional[int] = None, is_best: bool = False) -> str:
        """Write ``state`` (plus ``epoch`` and ``iteration`` entries recording the progress) atomically,
        refresh ``best.pth`` when ``is_best``, prune, and return the path written.

        ``iteration`` marks a mid-epoch checkpoint (iterations done in ``epoch``); None marks
        the end of ``epoch``.
        """
        if not self._temp_files_checked:
            self._remove_stale_temp_files()
            self._temp_files_checked = True
        path = self.path_for(epoch, iteration)
        atomic_save({**state, 'epoch': int(epoch), 'iteration': iteration}, path)
        self.logger.info(f"saved checkpoint {path}")
        if is_best:
            _atomic_link_or_copy(path, os.path.join(self.output_dir, BEST_NAME))
            self.logger.info(f"updated {os.path.join(self.output_dir, BEST_NAME)}")
        self.prune(_progress(epoch, iteration))
        return path

    def prune(self, current: Optional[Progress] = None) -> List[str]:
        """Remove checkpoints no longer needed; returns the removed paths.

        Keeps the newest ``keep_last`` epoch checkpoints and the mid-epoch ones newer than the
        newest epoch checkpoint (at most ``keep_last``). With ``current`` (the progress just
        saved), files *ahead* of it are left over from an abandoned run (resumed from an
        earlier point) and are removed too, so that auto-resume cannot jump back to them.
        """
        found = self.checkpoints()
        abandoned: List[str] = []
        if current is not None:
            abandoned = [p for prog, p in found if prog > current]
            found = [(prog, p) for prog, p in found if prog <= current]
        old: List[str] = []
        if self.keep_last > 0:
            epochs = [(prog, p) for prog, p in found if prog[1] == _EPOCH_END]
            old += [p for _, p in epochs[:-self.keep_last]]
            newest_epoch = epochs[-1][0] if epochs else None
            mids = [(prog, p) for prog, p in found if prog[1] != _EPOCH_END]
            old += [p for prog, p in mids if newest_epoch is not None and prog < newest_epoch]
            recent = [p for prog, p in mids if newest_epoch is None or prog > newest_epoch]
            old += recent[:-self.keep_last]
        removed = []
        for p in abandoned + old:
            try:
                os.remove(p)
            except FileNotFoundError:
                continue
            removed.append(p)
            if p in abandoned:
                self.logger.warning(f"removed {p}: it is ahead of the checkpoint just saved (left over from "
                                    f"a run this one was not resumed from)")
            else:
                self.logger.info(f"removed old checkpoint {p}")
        return removed

    def _remove_stale_temp_files(self) -> None:
        """Temp files of writes killed mid-way can be large and are never valid checkpoints.

        Done at the first save, not on construction: other ranks look for a resume point
        with a manager too and must not touch files while the main process writes."""
        if not os.path.isdir(self.output_dir):
            return
        for name in os.listdir(self.output_dir):
            if _STALE_TMP.match(name):
                try:
                    os.remove(os.path.join(self.output_dir, name))
                    self.logger.info(f"removed unfinished checkpoint write {name}")
                except OSError:
                    pass

    # -- reading
    def _recorded_progress(self, path: str, fallback: Optional[Progress]) -> Optional[Progress]:
        """The progress stored in ``path``; None (and a warning) when it does not load."""
        try:
            ckpt = load_checkpoint_file(path, mmap=True)
        except CheckpointError as e:
            self.logger.warning(f"skipping checkpoint that does not load: {e}")
            return None
        if 'epoch' in ckpt and isinstance(ckpt['epoch'], int):
            iteration = ckpt.get('iteration')
            return _progress(ckpt['epoch'], iteration if isinstance(iteration, int) else None)
        return fallback

    def latest(self) -> Optional[str]:
        """Path of the most advanced checkpoint in ``output_dir`` that loads, or None.

        Numbered checkpoints are tried newest first; unreadable ones are skipped with a
        warning. ``best.pth`` stands in when it is at least as far as an unreadable newest
        one (it may be the only intact copy); a ``best.pth`` ahead of every numbered file is
        from an abandoned run and is ignored.
        """
        found = self.checkpoints()
        best_path = os.path.join(self.output_dir, BEST_NAME)
        best = self._recorded_progress(best_path, None) if os.path.isfile(best_path) else None
        if best is not None and found and best > found[-1][0]:
            self.logger.warning(f"ignoring {best_path}: it is ahead of every numbered checkpoint")
            best = None
        for prog, path in reversed(found):
            if best is not None and best > prog:
                break
            recorded = self._recorded_progress(path, prog)
            if recorded is not None:
                return path if best is None or recorded >= best else best_path
        return best_path if best is not None else None


def find_resume(output_dir: str, logger: Optional[logging.Logger] = None) -> Optional[str]:
    """The checkpoint to auto-resume from in ``output_dir`` (see ``CheckpointManager.latest``)."""
    return CheckpointManager(output_dir, logger=logger).latest()


# ============================================================================ reproducibility
def configure_determinism(deterministic: bool) -> None:
    """Reproducible kernels and thread counts when ``deterministic``; fast autotuning otherwise."""
    if deterministic:
        # cuBLAS is only deterministic with a fixed workspace; must be set before its first use.
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
        # grid_sample's CUDA backward has no deterministic kernel: warn there instead of failing.
        torch.use_deterministic_algorithms(True, warn_only=torch.cuda.is_available())
        # Float reductions split over threads depend on the thread count: pin it.
        torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS') or 1))
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.backends.cudnn.benchmark = True


def state_digest(module: nn.Module) -> str:
    """SHA-256 over every parameter and buffer (names, dtypes and bytes): equal digests on two
    ranks mean bit-identical replicas."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b'')
    return h.hexdigest()


def get_rng_state() -> Dict[str, Any]:
    """Python, numpy, torch CPU and CUDA generator states, as tensors and plain values."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        'python': {'version': version, 'state': torch.tensor(internal, dtype=torch.int64),
                   'gauss_next': gauss_next},
        'numpy': {'kind': str(kind), 'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                  'has_gauss': int(has_gauss), 'cached_gaussian': float(cached)},
        'torch': torch.get_rng_state(),
        'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned; parts missing from ``state`` are left alone."""
    if 'python' in state:
        py = state['python']
        random.setstate((py['version'], tuple(int(v) for v in py['state'].tolist()), py['gauss_next']))
    if 'numpy' in state:
        npy = state['numpy']
        np.random.set_state((npy['kind'], npy['keys'].numpy().astype(np.uint32), npy['pos'],
                             npy['has_gauss'], npy['cached_gaussian']))
    if 'torch' in state:
        torch.set_rng_state(state['torch'])
    if state.get('cuda') and torch.cuda.is_available():
        # A run resumed on fewer GPUs restores the devices it has.
        for index, device_state in enumerate(state['cuda'][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, index)
