"""Checkpoint files: safe reading, atomic writing, the run-folder lock, and the resume policy.

Checkpoints hold only tensors and plain Python values, so they load with
``torch.load(path, map_location='cpu', weights_only=True)``: opening a checkpoint never runs
code from it. Writes are atomic (temp file, fsync, rename): a crash or a full disk leaves the
earlier checkpoints as they were. A file that does not load is told apart by cause: damaged
bytes (:class:`CheckpointCorrupt`, auto-resume falls back to an earlier file) or a file the
system would not let us read (:class:`CheckpointUnreadable`, the run stops and deletes nothing).

Every error is a :class:`CheckpointError` whose message is one line naming the file and the fix.
"""
from __future__ import annotations

import collections
import errno
import fcntl
import json
import logging
import math
import os
import re
import secrets
import shutil
import socket
import stat
import time
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = [
    'CheckpointError', 'CheckpointCorrupt', 'CheckpointUnreadable', 'OutputFolderError',
    'atomic_save', 'load_checkpoint_file', 'unwrap_state_dict', 'strip_prefixes', 'unwrap_model',
    'load_model_state', 'check_tensors', 'model_config', 'saved_model_config', 'check_model_config',
    'check_optimizer', 'resume_position', 'CheckpointManager', 'find_resume', 'RunLock',
    'prepare_output_dir', 'BEST_NAME', 'LOCK_NAME',
]

_log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, read or applied; the message is one line with a fix."""


class CheckpointCorrupt(CheckpointError):
    """The file was read but its bytes are not a valid checkpoint (truncated, damaged, empty)."""


class CheckpointUnreadable(CheckpointError):
    """The system refused to read the file (permissions, I/O error, not a regular file)."""


class OutputFolderError(CheckpointError):
    """The output folder cannot be created or written."""


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


def _first_line(err: BaseException, limit: int = 160) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= limit else line[:limit] + '...'


def _os_error_in(err: BaseException) -> Optional[OSError]:
    """The OSError behind ``err``: torch reports a failed read or write of its zip container as a
    RuntimeError ('unexpected pos', 'iostream error') raised while the OSError is handled."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno is not None:
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


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


def _disk_is_full(directory: str) -> bool:
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


def _write_failed(path: str, err: BaseException) -> CheckpointError:
    """One line for any failure of a checkpoint write: OSError, torch's zip-writer RuntimeError, ..."""
    os_err = _os_error_in(err)
    code = os_err.errno if os_err is not None else None
    if code is None:        # writers in other languages (safetensors: Rust) name the errno in the text
        found = re.search(r'os error (\d+)', str(err))
        code = int(found.group(1)) if found else None
    if code is None and _disk_is_full(os.path.dirname(os.path.abspath(path))):
        code = errno.ENOSPC
    if os_err is not None:
        reason = os_err.strerror or str(os_err)
    else:
        reason = os.strerror(code) if code is not None else _first_line(err)
    if code in (errno.ENOSPC, errno.EDQUOT):
        fix = 'free disk space or point --output to a volume with room'
    elif code == errno.EFBIG:
        fix = "the file size limit (ulimit -f) or the file system's maximum file size is too small for it"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = 'make the output folder writable or choose another --output'
    else:
        fix = 'check the output folder and its file system'
    return CheckpointError(f"could not write checkpoint {path}: {reason} (earlier checkpoints kept; {fix})")


_HOST = re.sub(r'[^A-Za-z0-9-]', '-', socket.gethostname()) or 'host'


def _temp_path(path: str) -> str:
    """``.<name>.<host>.<pid>.<random>.tmp`` beside ``path``: host and pid say whose write it is."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f'.{name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp')


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Run ``write`` on a temp file beside ``path``, fsync it and rename it onto ``path``.

    Any failure (OSError, torch's RuntimeError from its zip writer, ...) becomes one
    CheckpointError; the temp file is removed and ``path`` is untouched. Cleanup never replaces
    the first error. KeyboardInterrupt and SystemExit pass through, after the cleanup.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp: Optional[str] = None
    try:
        os.makedirs(directory, exist_ok=True)
        # Same directory, so the final os.replace is a rename within one file system.
        tmp = _temp_path(path)
        f = open(tmp, 'xb')
        try:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            try:
                f.close()           # flushing the rest of the buffer fails again on a full disk
            except Exception:
                pass
            raise
        f.close()
        os.replace(tmp, path)
        tmp = None
    except Exception as e:
        raise _write_failed(path, e) from e
    finally:
        if tmp is not None:
            _remove_quietly(tmp)
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
    tmp = _temp_path(dst)
    try:
        os.link(src, tmp)
        os.replace(tmp, dst)
        _fsync_dir(os.path.dirname(os.path.abspath(dst)))
        return
    except OSError:
        _remove_quietly(tmp)

    def copy(f: BinaryIO) -> None:
        with open(src, 'rb') as s:
            shutil.copyfileobj(s, f, length=16 << 20)
    _atomic_write(dst, copy)


# ============================================================================ reading
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


def _unreadable(path: str, err: OSError) -> CheckpointUnreadable:
    reason = err.strerror or str(err)
    if err.errno in (errno.EACCES, errno.EPERM):
        fix = 'fix its permissions (or run as its owner)'
    elif err.errno == errno.EISDIR:
        fix = 'remove or rename that directory'
    else:
        fix = 'check the file and its storage'
    return CheckpointUnreadable(f"cannot read checkpoint {path}: {reason}; {fix}, then run again "
                                f"(nothing was deleted)")


def _probe_readable(path: str) -> None:
    """Raise CheckpointUnreadable unless ``path`` is a regular file this process may read.

    Done before parsing, so that permission and I/O errors are never mistaken for damage."""
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if not stat.S_ISREG(mode):      # a FIFO or device: opening it could block
            raise CheckpointUnreadable(f"cannot read checkpoint {path}: not a regular file; replace it "
                                       f"with the checkpoint file, then run again (nothing was deleted)")
        with open(path, 'rb') as f:
            f.read(1)
    except OSError as e:
        raise _unreadable(path, e) from e


def load_checkpoint_file(path: str, mmap: bool = False) -> dict:
    """Load a checkpoint (``.pth`` / ``.pt`` / ``.safetensors``) safely onto the CPU.

    ``mmap=True`` maps tensor data lazily (cheap way to read the small fields of a big file).
    Raises CheckpointError: not found; CheckpointUnreadable when the system refuses to read it;
    CheckpointCorrupt for truncated or damaged bytes; and a plain CheckpointError for a file that
    needs unsafe unpickling (arbitrary Python objects), which is refused. Official training
    checkpoints that pickle their yacs config are read through a restricted unpickler.
    """
    path = os.fspath(path)
    if not os.path.lexists(path):
        raise CheckpointError(f"checkpoint not found: {path} (check the path given with --resume / "
                              f"--pretrained or MODEL.RESUME / MODEL.PRETRAINED)")
    _probe_readable(path)
    if path.endswith('.safetensors'):
        try:
            from safetensors.torch import load_file
            return dict(load_file(path, device='cpu'))
        except Exception as e:  # the safetensors reader raises its own error types
            os_err = _os_error_in(e)
            if os_err is not None:
                raise _unreadable(path, os_err) from e
            raise CheckpointCorrupt(f"checkpoint {path} is not a readable safetensors file "
                                    f"({_first_line(e)})") from e
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except Exception as e:
        os_err = _os_error_in(e)
        if os_err is not None:
            raise _unreadable(path, os_err) from e
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
        raise CheckpointCorrupt(
            f"checkpoint {path} is truncated or corrupt ({_first_line(e)}); delete it and use an earlier "
            f"checkpoint, or copy / download it again") from e
    if not isinstance(ckpt, dict):
        raise CheckpointCorrupt(f"checkpoint {path} holds a {type(ckpt).__name__}, not a dict of weights")
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


def _kind(t: torch.Tensor) -> str:
    if t.is_complex():
        return 'complex'
    if t.is_floating_point():
        return 'float'
    return 'bool' if t.dtype == torch.bool else 'integer'


def check_tensors(state_dict: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor], source: str) -> None:
    """Refuse tensors ``load_state_dict`` would cast quietly to another kind (integer or complex
    into float, float into integer) and float tensors holding NaN or inf."""
    kinds = [f"{k} {v.dtype} (model {own[k].dtype})" for k, v in state_dict.items()
             if k in own and _kind(v) != _kind(own[k])]
    if kinds:
        raise CheckpointError(f"{source} has {len(kinds)} tensors of another kind than the model's: "
                              f"{_list_names(kinds, 4)}; it was not saved from this model, or was converted "
                              f"wrongly: use the original checkpoint")
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and v.numel()
           and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{source} has NaN or inf values in {len(bad)} tensors: {_list_names(bad, 4)}; "
                              f"it is from a diverged run or damaged: use an earlier checkpoint")


def load_model_state(model: nn.Module, state_dict: Dict[str, torch.Tensor], strict: bool = True,
                     source: str = 'checkpoint') -> Tuple[List[str], List[str]]:
    """Load ``state_dict`` into ``model`` (wrapper prefixes on either side are ignored).

    Shape mismatches always raise CheckpointError; missing / unexpected names raise it when
    ``strict``; so do tensors of another kind and non-finite values (:func:`check_tensors`).
    The message lists the names (and shapes) and says what to fix. Returns ``(missing,
    unexpected)`` names, which are empty when ``strict``.
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
            f"{source} does not fit the model (it is for a different architecture or config)",
            missing if strict else [], unexpected if strict else [], shapes,
            "build the model with the config the checkpoint was trained with"))
    check_tensors(sd, own, source)
    model.load_state_dict(sd, strict=strict)
    return missing, unexpected


# ============================================================================ model config
# Keys of a family's MODEL.<TYPE> node that do not change what trained weights compute:
# regularisation, initial values, the class count and input size (which the state dict's shapes
# check, and which fine-tuning changes on purpose), optimizer-only settings.
NON_ARITHMETIC_KEYS = frozenset({
    'img_size', 'num_classes', 'drop_rate', 'attn_drop_rate', 'drop_path_rate', 'layer_scale_values',
    'lower_lr_kvs', 'ns_per_pts',
})


def _plain(value: Any) -> Any:
    """Config value as plain dicts / lists (yacs nodes, tuples), for saving and comparing."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def model_config(config) -> Dict[str, Any]:
    """``config.MODEL`` as a plain dict, as stored in checkpoints (``'model_config'``)."""
    return _plain(config.MODEL)


def saved_model_config(ckpt: dict) -> Optional[Dict[str, Any]]:
    """The MODEL node a checkpoint was trained with, or None when it records none.

    Ours store ``'model_config'`` (and ``'config'``, the YAML dump); official training files
    pickle their yacs config (read as a dict); release files carry no config."""
    node = ckpt.get('model_config')
    if isinstance(node, dict):
        return node
    config = ckpt.get('config')
    if isinstance(config, str):
        import yaml
        try:
            config = yaml.safe_load(config)
        except yaml.YAMLError:
            return None
    if isinstance(config, dict) and isinstance(config.get('MODEL'), dict):
        return _plain(config['MODEL'])
    return None


def arithmetic_differences(saved: Dict[str, Any], current: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
    """``(key, saved value, current value)`` of the MODEL keys that change the computation.

    Compares MODEL.TYPE and the family's node (MODEL.DAT for 'dat') except NON_ARITHMETIC_KEYS;
    a key present on one side only (a config of another version) is not compared.
    """
    kind_saved, kind_now = saved.get('TYPE'), current.get('TYPE')
    if kind_saved is not None and kind_now is not None and str(kind_saved).lower() != str(kind_now).lower():
        return [('MODEL.TYPE', kind_saved, kind_now)]
    family = str(kind_now or kind_saved or '').upper()
    a, b = saved.get(family), current.get(family)
    if not isinstance(a, dict) or not isinstance(b, dict):
        return []
    return [(f'MODEL.{family}.{key}', a[key], b[key]) for key in sorted(set(a) & set(b))
            if key not in NON_ARITHMETIC_KEYS and _plain(a[key]) != _plain(b[key])]


def _opts_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    text = repr(_plain(value)).replace(' ', '')
    return f'"{text}"' if any(c in text for c in '[]\'"') else text


def check_model_config(ckpt: dict, config, source: str) -> None:
    """Raise CheckpointError when ``ckpt`` records a model config whose arithmetic differs from
    ``config``'s (e.g. MODEL.DAT.deform_arith 'v1' weights in a 'pp' model: same shapes, other
    results). A checkpoint without a config passes (only the state-dict check applies)."""
    saved = saved_model_config(ckpt)
    if saved is None:
        return
    diffs = arithmetic_differences(saved, model_config(config))
    if not diffs:
        return
    shown = '; '.join(f"{k} {a!r} in the checkpoint, {b!r} here" for k, a, b in diffs[:3])
    more = f" ... and {len(diffs) - 3} more" if len(diffs) > 3 else ''
    key, value, _ = diffs[0]
    fix = ('use the config it was trained with' if key == 'MODEL.TYPE'
           else f"use the config it was trained with (e.g. --opts {key} {_opts_value(value)})")
    raise CheckpointError(f"{source} was trained with another model: {shown}{more}; {fix}")


# ============================================================================ resume policy
_VERSION_FLAGS = frozenset({'foreach', 'maximize', 'capturable', 'differentiable', 'fused',
                            'decoupled_weight_decay', 'initial_lr'})


def check_optimizer(ckpt: dict, optimizer: torch.optim.Optimizer, source: str) -> None:
    """Refuse optimizer state saved by another optimizer (type or parameter groups)."""
    saved = ckpt.get('optimizer')
    fix = (f"its state cannot carry over; to start a new run from its weights, pass --pretrained {source} "
           f"with another --tag (or --output)")
    name = ckpt.get('optimizer_name')
    if name is not None and name != type(optimizer).__name__:
        raise CheckpointError(f"{source} was saved by optimizer {name}, this run uses "
                              f"{type(optimizer).__name__}: {fix}")
    if not isinstance(saved, dict) or not isinstance(saved.get('param_groups'), list):
        raise CheckpointError(f"{source} has no readable optimizer state: {fix}")
    groups, own = saved['param_groups'], optimizer.param_groups
    sizes, own_sizes = [len(g.get('params', ())) for g in groups], [len(g['params']) for g in own]
    if sizes != own_sizes:
        raise CheckpointError(f"{source} has optimizer parameter groups of sizes {sizes}, this run {own_sizes} "
                              f"(another optimizer or weight-decay grouping): {fix}")
    if name is not None:
        return
    # Without the name (Swin / official files) the settings tell optimizers apart; flags that
    # torch versions add or drop do not.
    keys = sorted((set(groups[0]) ^ set(own[0])) - _VERSION_FLAGS) if groups and own else []
    if keys:
        raise CheckpointError(f"{source} was saved by another optimizer (settings {', '.join(keys)} differ): "
                              f"{fix}")


def resume_position(ckpt: dict, iters_per_epoch: int, global_batch: int) -> Tuple[int, int, int]:
    """``(epoch, batch, repeated)``: where a run with ``global_batch`` images per iteration (all
    ranks together) continues from ``ckpt``, and how many images of the resumed epoch it sees twice.

    Our checkpoints record ``epoch``, ``iteration`` (batches done, None once the epoch ended) and
    ``samples_seen`` (images of that epoch consumed by all ranks). The samplers deal a fixed
    per-epoch permutation out in order, so after ``k`` batches of ``b`` images on ``w`` ranks the
    first ``k * b * w`` images of that permutation are done, whatever ``b`` and ``w`` were: the
    position is kept in images and converted to this run's batches. When it is not a whole
    number of this run's batches, the run restarts at the batch holding that image (``repeated``
    images are seen twice; none is skipped). Swin / official files record the last finished epoch.
    """
    epoch = int(ckpt['epoch'])
    if 'iteration' not in ckpt:
        return epoch + 1, 0, 0
    iteration = ckpt['iteration']
    if iteration is None:
        return epoch + 1, 0, 0
    samples = ckpt.get('samples_seen')
    if not isinstance(samples, int) or samples < 0:
        samples = max(int(iteration), 0) * global_batch      # older files: assume the batch is unchanged
    batch = min(samples // global_batch, iters_per_epoch)
    repeated = samples - batch * global_batch if batch < iters_per_epoch else 0
    return epoch, batch, repeated


# ============================================================================ run-folder lock
LOCK_NAME = '.run.lock'


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_HELD_LOCKS: Dict[str, int] = {}     # lock file -> descriptor, for the locks this process holds


class RunLock:
    """An exclusive ``flock`` on ``<run folder>/.run.lock``, taken by the process that writes the
    checkpoints. The kernel drops it when that process ends, however it ends, so the lock of a
    dead process never blocks; the file's text (pid, host, start time) only names the holder.
    Acquiring a folder this process already holds is a no-op. On a file system without locking
    the lock is skipped and ``unsupported`` says why."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, LOCK_NAME)
        self.unsupported: Optional[str] = None

    @property
    def _key(self) -> str:
        return os.path.realpath(self.path)

    @property
    def held(self) -> bool:
        return self._key in _HELD_LOCKS

    def acquire(self) -> 'RunLock':
        if self.held:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputFolderError(f"cannot create the run lock {self.path}: {e.strerror}; make the output "
                                    f"folder writable or choose another --output") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = self._holder(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                self.unsupported = e.strerror or str(e)
                return self
            raise OutputFolderError(
                f"output folder {os.path.dirname(self.path)} is in use by another run ({holder}); two runs "
                f"in one folder would overwrite each other's checkpoints: wait for it to end, or give this "
                f"run another --tag or --output") from None
        record = json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                             'started': time.strftime('%Y-%m-%d %H:%M:%S')}) + '\n'
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, record.encode(), 0)
        except OSError:
            pass            # the lock holds without its description
        _HELD_LOCKS[self._key] = fd
        return self

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode() or '{}')
            return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return 'holder unknown'

    def release(self) -> None:
        fd = _HELD_LOCKS.pop(self._key, None)
        if fd is not None:
            os.close(fd)              # closing the descriptor drops the flock


# ============================================================================ checkpoint files
_CKPT_NAME = re.compile(r'^ckpt_epoch_(\d+)(?:_iter_(\d+))?\.pth$')
# '.<target>.<host>.<pid>.<random>.tmp'; files of older versions have no host part.
_TEMP_NAME = re.compile(r'^\.(?:ckpt_epoch_\d+(?:_iter_\d+)?|best)\.pth\.(?:(?P<host>[A-Za-z0-9-]+)\.)?'
                        r'(?P<pid>\d+)\.[0-9a-f]+\.tmp$')
BEST_NAME = 'best.pth'
_EPOCH_END = math.inf   # an epoch-end checkpoint is past every mid-epoch one of that epoch

Progress = Tuple[int, float]


def _progress(epoch: int, iteration: Optional[int]) -> Progress:
    return int(epoch), (_EPOCH_END if iteration is None else int(iteration))


class CheckpointManager:
    """Saves ``ckpt_epoch_{e}.pth`` / ``ckpt_epoch_{e}_iter_{i}.pth`` (+ ``best.pth``) in ``output_dir``,
    prunes old ones, and finds the most advanced loadable checkpoint to resume from.

    Call ``lock`` then ``save`` on the main process only. ``keep_last`` epoch checkpoints are
    kept (``<= 0`` keeps all); ``best.pth`` is never pruned.
    """

    def __init__(self, output_dir: str, keep_last: int = 3, logger: Optional[logging.Logger] = None):
        self.output_dir = output_dir
        self.keep_last = keep_last
        self.logger = logger or _log
        self._temp_files_checked = False
        self._lock = RunLock(output_dir)

    def lock(self) -> None:
        """Take the run folder's lock (OutputFolderError naming the holder when another run has it)."""
        self._lock.acquire()
        if self._lock.unsupported:
            self.logger.warning(f"cannot lock {self._lock.path} ({self._lock.unsupported}): a second run "
                                f"started into this folder would not be detected")

    def unlock(self) -> None:
        self._lock.release()

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
        saved), loadable files *ahead* of it are left over from an abandoned run (resumed from an
        earlier point) and are removed too, so that auto-resume cannot jump back to them; files
        ahead that do not load are left alone (auto-resume skips them; they may be evidence).
        A file that cannot be removed is reported and kept.
        """
        found = self.checkpoints()
        abandoned: List[str] = []
        if current is not None:
            abandoned = [p for prog, p in found if prog > current and self._loads(p)]
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
            except OSError as e:
                self.logger.warning(f"could not remove old checkpoint {p}: {e.strerror}; it is kept")
                continue
            removed.append(p)
            if p in abandoned:
                self.logger.warning(f"removed {p}: it is ahead of the checkpoint just saved (left over from "
                                    f"a run this one was not resumed from)")
            else:
                self.logger.info(f"removed old checkpoint {p}")
        return removed

    def _loads(self, path: str) -> bool:
        try:
            load_checkpoint_file(path, mmap=True)
        except CheckpointCorrupt:
            self.logger.warning(f"kept {path} although it is ahead of the checkpoint just saved: it does not "
                                f"load (auto-resume skips it); delete it when it is no longer needed")
            return False
        except CheckpointError:
            return False
        return True

    def _remove_stale_temp_files(self) -> None:
        """Temp files of writes killed mid-way can be large and are never valid checkpoints.

        Only files of this process or of processes on this host that no longer exist are
        removed: a live writer's temp file is never touched. Done at the first save, not on
        construction: other ranks look for a resume point with a manager too."""
        if not os.path.isdir(self.output_dir):
            return
        for name in os.listdir(self.output_dir):
            match = _TEMP_NAME.match(name)
            if not match:
                continue
            host, pid = match.group('host'), int(match.group('pid'))
            if host not in (None, _HOST) or (pid != os.getpid() and _pid_alive(pid)):
                continue
            try:
                os.remove(os.path.join(self.output_dir, name))
                self.logger.info(f"removed unfinished checkpoint write {name}")
            except OSError:
                pass

    # -- reading
    def _recorded_progress(self, path: str, fallback: Optional[Progress]) -> Optional[Progress]:
        """The progress stored in ``path``; None (and a warning) when it is corrupt.

        A file the system refuses to read (CheckpointUnreadable) stops the search: falling back
        past it would make the run continue from an older state and later prune the newer files."""
        try:
            ckpt = load_checkpoint_file(path, mmap=True)
        except CheckpointCorrupt as e:
            self.logger.warning(f"skipping checkpoint that does not load: {e}")
            return None
        except CheckpointUnreadable:
            raise
        except CheckpointError as e:
            self.logger.warning(f"skipping checkpoint that does not load: {e}")
            return None
        if 'epoch' in ckpt and isinstance(ckpt['epoch'], int):
            iteration = ckpt.get('iteration')
            return _progress(ckpt['epoch'], iteration if isinstance(iteration, int) else None)
        return fallback

    def latest(self) -> Optional[str]:
        """Path of the most advanced checkpoint in ``output_dir`` that loads, or None.

        Numbered checkpoints are tried newest first; corrupt ones are skipped with a warning,
        one the system cannot read raises CheckpointUnreadable. ``best.pth`` stands in when it is
        at least as far as a corrupt newest one (it may be the only intact copy); a ``best.pth``
        ahead of every numbered file is from an abandoned run and is ignored.
        """
        found = self.checkpoints()
        best_path = os.path.join(self.output_dir, BEST_NAME)
        best = self._recorded_progress(best_path, None) if os.path.lexists(best_path) else None
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


# ============================================================================ output folder
def prepare_output_dir(path: str, need_write: bool = True) -> bool:
    """Create the run's output folder and check that it can be written; returns whether it can.

    Raises OutputFolderError (one line) when it is a file, or, with ``need_write``, cannot be
    created or written. Evaluation passes ``need_write=False``: it only reads checkpoints, so a
    folder it cannot create or write just means logging to the console only.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputFolderError(f"output folder {path} exists and is not a folder; remove it or choose "
                                f"another --output / --tag")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        if not need_write:
            return False
        where = e.filename or path
        raise OutputFolderError(f"cannot create output folder {path}: {e.strerror} ({where}); choose "
                                f"another --output") from None
    probe = os.path.join(path, f'.write_test.{_HOST}.{os.getpid()}')
    try:
        with open(probe, 'wb') as f:
            f.write(b'x')
        os.remove(probe)
    except OSError as e:
        _remove_quietly(probe)
        if need_write:
            raise OutputFolderError(f"output folder {path} is not writable: {e.strerror}; make it writable or "
                                    f"choose another --output") from None
        return False
    return True
