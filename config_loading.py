"""Reading config files and command-line overrides into a config: ``BASE`` chains, strict YAML
(a key given twice is an error), values converted to the defaults' types, aliased keys kept
equal, and one-line errors that name the file (and line) or the misspelt key.
"""
from __future__ import annotations

import ast
import difflib
import os
from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple

import yaml
from yacs.config import CfgNode as CN

from config_checks import ALIASES, ConfigError, Sources, get_key

# Keys the official (Swin-derived) config declared but the DAT model never read.
_MOVED = {'MODEL.DROP_RATE': 'MODEL.DAT.drop_rate', 'MODEL.DROP_PATH_RATE': 'MODEL.DAT.drop_path_rate'}


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


def set_key(config: CN, key: str, value: Any) -> None:
    """Set a dotted key, e.g. ``set_key(config, 'DATA.BATCH_SIZE', 64)``."""
    parent, _, leaf = key.rpartition('.')
    (get_key(config, parent) if parent else config)[leaf] = value


def _apply(config: CN, given: Dict[str, Any], source: str, sources: Optional[Sources]) -> None:
    """Record where the keys of one source came from and keep aliased keys equal."""
    # Twice, so that a value given through one alias of MODEL.NUM_CLASSES reaches all the others.
    for a, b in ALIASES + ALIASES:
        if a in given and b in given and given[a] != given[b]:
            raise ConfigError(f"{source}: {a} is {given[a]!r} but {b} is {given[b]!r}; they are the "
                              f"same setting: give one of them (the other follows) or both equal")
        for this, other in ((a, b), (b, a)):
            if this in given and other not in given:
                set_key(config, other, given[this])
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
