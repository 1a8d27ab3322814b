"""Leaf helpers of the core (imported by everything, importing nothing of mmpeft).

- :func:`check_modalities`: modality names are a sequence of distinct, non-empty identifiers
  (a plain string such as ``"optical"`` is refused rather than read as seven modalities).
- :func:`resolve_dtype`: ``"bf16"`` / ``"fp16"`` / ``"fp32"`` or a torch floating dtype.
- :func:`check_int`, :func:`check_number`: typed, finite option values with the option's name
  in the error.
- :func:`state_mismatches`: readable problems between a model's tensors and a saved state.
- :func:`atomic_write`: write a file under a temporary name and rename it into place.
- :func:`listing`: the items a message names, the first :data:`LISTED` and how many more.
- :func:`register`: the one convention of mmpeft's registries (methods, fusion rules, families).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from .errors import MmpeftTypeError, MmpeftValueError

__all__ = [
    "DTYPES",
    "LISTED",
    "RESERVED_NAMES",
    "atomic_write",
    "check_int",
    "check_modalities",
    "check_number",
    "dtype_name",
    "listing",
    "register",
    "resolve_dtype",
    "state_mismatches",
]

T = TypeVar("T")

#: how many items a message names before saying how many more there are (:func:`listing`)
LISTED = 10

#: Names a modality cannot take: attributes of ``nn.ModuleDict`` / ``nn.ParameterDict`` (and so of
#: ``nn.Module``: ``forward``, ``train``, ``to``, ``state_dict``, ``keys``, ``items``, ``update``, ...).
#: Modalities become keys of such dicts (the stems, LoRA / adapter / fusion weights), and torch
#: refuses a key that shadows an attribute.
RESERVED_NAMES = frozenset(dir(nn.ModuleDict())) | frozenset(dir(nn.ParameterDict()))


def check_modalities(modalities: Any) -> list[str]:
    """``modalities`` as a list of names; ValueError/TypeError unless it is a sequence (not a
    string) of distinct, non-empty identifier strings that do not shadow a module attribute."""
    if isinstance(modalities, (str, bytes)):
        raise MmpeftTypeError(
            f"modalities must be a sequence of names, got the string {modalities!r}; "
            f"write ({modalities!r},) for a single modality"
        )
    if isinstance(modalities, (set, frozenset, Mapping)) or not isinstance(modalities, Iterable):
        raise MmpeftTypeError(
            f"modalities must be an ordered sequence of names (list or tuple), got {type(modalities).__name__}"
        )
    names = list(modalities)
    if not names:
        raise MmpeftValueError("at least one modality is required")
    bad = [m for m in names if not isinstance(m, str) or not m.isidentifier()]
    if bad:
        raise MmpeftValueError(f"modality names must be non-empty identifier strings (no dots or spaces), got {bad}")
    if len(set(names)) != len(names):
        raise MmpeftValueError(f"modality names must be distinct, got {names}")
    reserved = [m for m in names if m in RESERVED_NAMES]
    if reserved:
        raise MmpeftValueError(
            f"modality names {reserved} are attributes of torch's nn.Module / nn.ModuleDict: modalities become "
            f"keys of module dicts (the stems, the per-modality weights), which cannot shadow an attribute; "
            f"rename them, e.g. {[m.strip('_') + '_image' for m in reserved]}"
        )
    return names


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` if it is an int (not a bool) >= ``minimum``, else TypeError / ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise MmpeftTypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise MmpeftValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_number(name: str, value: Any, positive: bool = False) -> float:
    """``value`` as a float if it is a finite real number (not a bool; > 0 when ``positive``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MmpeftTypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise MmpeftValueError(f"{name} must be finite, got {value!r}")
    if positive and value <= 0:
        raise MmpeftValueError(f"{name} must be positive, got {value!r}")
    return float(value)


DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``"bf16"`` / ``"fp16"`` / ``"fp32"`` (or a torch floating dtype, or None) -> the dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
            raise MmpeftValueError(f"base dtype must be a floating dtype, got {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise MmpeftValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)} or a torch dtype")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype | None) -> str | None:
    """The JSON name of a dtype (``torch.bfloat16`` -> ``"bfloat16"``; None stays None)."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


def state_mismatches(
    own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], strict: bool = True
) -> list[str]:
    """Readable problems between a model's tensors ``own`` and a saved ``state``: wrong shapes
    (always), missing and unexpected keys (when ``strict``), each naming the keys."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    problems = []
    if shape:
        problems.append(
            "shape mismatch: "
            + listing((f"{k}: saved {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in shape), sep="; ")
        )
    if strict and missing:
        problems.append(f"missing {len(missing)} keys: {listing(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected {len(unexpected)} keys: {listing(unexpected)}")
    return problems


def listing(items: Iterable[Any], limit: int = LISTED, sep: str = ", ") -> str:
    """``items`` for a message, joined by ``sep``: all of them, or the first ``limit`` and how many
    more (``listing(["a", "b", "c"], limit=2) == "a, b (and 1 more)"``)."""
    texts = [str(item) for item in items]
    more = f" (and {len(texts) - limit} more)" if len(texts) > limit else ""
    return sep.join(texts[:limit]) + more


def register(registry: dict[str, T], name: str, item: T, *, kind: str, replace: bool = False) -> T:
    """Add ``item`` to ``registry`` under ``name`` and return it: the one convention of mmpeft's
    registries (methods, fusion rules, families). A name taken by another item is refused, naming
    it, unless ``replace=True`` (registering the same item again changes nothing)."""
    if not isinstance(name, str) or not name:
        raise MmpeftTypeError(f"a {kind} is registered under a non-empty str name, got {name!r}")
    old = registry.get(name)
    if old is not None and not replace and not (old is item or old == item):
        raise MmpeftValueError(
            f"{kind} {name!r} is already registered; pass replace=True to replace it, or pick another name "
            f"(registered: {listing(sorted(registry))})"
        )
    registry[name] = item
    return item


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp_path)`` and rename the result onto ``path`` (never a half-written file).

    The file gets the permissions of a plainly created one (``0o666 & ~umask``, 0644 under the
    usual umask), whatever mode the writer gave the temporary file (safetensors uses 0600).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(str(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
