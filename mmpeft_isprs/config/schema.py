"""Typed conversion of nested dicts into the config dataclasses; unknown keys are errors.

Values are checked against the field annotations (ints accepted as floats, dataclasses built
from mappings, YAML 1.1 number strings such as ``5e-4`` read as floats). A key that does not
exist names the closest known keys; a key that was removed names what replaces it
(:data:`REMOVED_KEYS`).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union

__all__ = ["ConfigError", "REMOVED_KEYS", "build_dataclass", "unknown_key", "join_key"]


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key at fault."""


REMOVED_KEYS: dict[str, str] = {
    "data.crop_size": "was removed: the training crop side is model.img_size; set model.img_size instead",
    "eval.window": "was removed: the evaluation window is model.img_size; set model.img_size instead",
    "train.grad_checkpointing": "moved to the model config (one switch); set model.grad_checkpointing instead",
}
"""Keys of earlier versions -> what to use now (reading one is an error saying so)."""


def unknown_key(key: str, known: Sequence[str], where: str) -> ConfigError:
    """The error for ``where.key``: what replaces a removed key, else the closest known keys."""
    full = join_key(where, key)
    if full in REMOVED_KEYS:
        return ConfigError(f"{full} {REMOVED_KEYS[full]}")
    close = difflib.get_close_matches(key.split(".")[-1], list(known), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(join_key(where, c)) for c in close)}?" if close else ""
    return ConfigError(f"unknown config key {full!r}{hint} (known in {where or 'top level'}: {', '.join(known)})")


def join_key(prefix: str, key: str) -> str:
    """``"train", "lr"`` -> ``"train.lr"`` (no dot for the top level)."""
    return f"{prefix}.{key}" if prefix else key


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints accepted as floats, dataclasses from dicts)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(o) for o in options)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp) or (str, Any)
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return build_dataclass(tp, value, key)
    return _scalar(value, tp, key)


def _scalar(value: Any, tp: Any, key: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)  # tile ids such as 1 or 2_10 may be read as numbers
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def build_dataclass(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """Instantiate dataclass ``cls`` from ``values``; unknown keys and bad types are errors."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise unknown_key(str(key), names, where)
        kwargs[key] = _coerce(value, hints[key], join_key(where, key))
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from None
