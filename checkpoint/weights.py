"""Putting checkpoint weights into a model: strict loading with one-line mismatch messages, tensor
checks (kind, finiteness), and the comparison of the model config a checkpoint was trained with.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .files import CheckpointError, _list_names, _shape, strip_prefixes, unwrap_model


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


