"""Reading and writing checkpoint files: safe loading (no code runs on opening a file), atomic
writes (temp file, fsync, rename), and the errors that tell damaged bytes from unreadable files.
"""
from __future__ import annotations

import collections
import errno
import os
import re
import secrets
import shutil
import socket
import stat
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn



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
    allowed.setdefault('builtins.set', set)     # CfgNode's own fields; torch 2.5's list lacks it

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
        # an explicit --resume of the wrong path, or a folder in a checkpoint's place in the output
        fix = 'pass the checkpoint file itself; a folder standing in for a checkpoint can be moved elsewhere'
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


