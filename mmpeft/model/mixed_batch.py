"""Mixed-batch inference: ``model(inputs, adapter_names=[...])``, one adapter set per sample, as
peft's ``adapter_names=``.

The samples are grouped by set (in the order the names first appear); each group runs as its own
batch under its set (``"__base__"``: adapters off, peft's name for the base model) and the
outputs are put back in the samples' order. Each sample's output is then exactly what running
the samples of its group with :meth:`~mmpeft.MultimodalModel.set_adapter` to that set gives
(the same computation on the same tensors). Refused before any work, as peft: in training mode,
with merged layers, with a name that is not a set, with a list whose length is not the batch
size; and with ``labels=`` (each group's loss would be a mean over its own samples only).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from ..errors import MmpeftKeyError, MmpeftStateError, MmpeftTypeError, MmpeftValueError
from ..runtime.batch import gather
from ..runtime.presence import presence_tensor

__all__ = ["BASE_NAME", "mixed_batch_call"]

BASE_NAME = "__base__"  # peft's name for "no adapter" in adapter_names


def _input_keyword(model: Any, method: str, kwargs: dict[str, Any]) -> str | None:
    """The keyword the per-modality inputs came by (the method's first parameter), or None."""
    params = [p for p in inspect.signature(getattr(model.base_model, method)).parameters.values()]
    name = params[0].name if params else None
    return name if name is not None and kwargs.get(name) is not None else None


def _check(model: Any, names: Any, batch: int, kwargs: Mapping[str, Any]) -> list[str]:
    if isinstance(names, str) or not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
        raise MmpeftTypeError(f"adapter_names must be a list of set names, one per sample, got {names!r}")
    if len(names) != batch:
        raise MmpeftValueError(f"adapter_names has {len(names)} name(s) for a batch of {batch} sample(s)")
    unknown = sorted({n for n in names if n not in model.adapters and n != BASE_NAME})
    if unknown:
        raise MmpeftKeyError(
            f"adapter_names: no adapter set {unknown}; the sets are {model.adapters} ({BASE_NAME!r}: no adapter)"
        )
    if model.training:
        raise MmpeftStateError("adapter_names= is for inference (as peft): call model.eval() first")
    merged = [n for n, layer in model.layers() if layer.merged]
    if merged:
        raise MmpeftStateError(
            f"adapter_names= with merged layers ({merged[0]}, ...): call unmerge_adapters() first (as peft)"
        )
    if "labels" in kwargs:
        raise MmpeftValueError(
            "labels= with adapter_names=: each set's group would get the loss of its own samples only; call "
            "without labels and compute the loss from the outputs"
        )
    return list(names)


@contextlib.contextmanager
def _as_set(model: Any, name: str) -> Iterator[None]:
    """Within the block the model runs as after ``set_adapter(name)`` (``"__base__"``: adapters off);
    the active set, its first-forward check and the adapters' switch are restored after."""
    active, pending, enabled = model.active_adapter, model.call_check_pending, model.adapters_enabled
    try:
        if name == BASE_NAME:
            model.set_adapters_enabled(False)
        elif name != active:
            model.set_adapter(name)
        yield
    finally:
        if model.active_adapter != active:
            model.set_adapter(active)
        model.set_adapters_enabled(enabled)
        model.call_check_pending = pending


def _take(x: Any, index: torch.Tensor) -> Any:
    return None if x is None else x.index_select(0, index.to(x.device))


def _subset(inputs: Any, index: torch.Tensor) -> Any:
    if isinstance(inputs, Mapping):
        return {m: _take(x, index) for m, x in inputs.items()}
    return [_take(x, index) for x in inputs]


def _presence_of(presence: Any, index: torch.Tensor) -> torch.Tensor:
    """The columns ``index`` (samples) of an (S, B) presence mask."""
    return presence.index_select(1, index.to(presence.device))


def _scatter(parts: list[Any], indices: list[torch.Tensor], batch: int, where: str = "output") -> Any:
    """One output from the groups' outputs: every tensor with k rows per sample of its group
    (k = 1: a per-sample axis; k > 1: samples flattened with another axis, as (B*T, C)) put back at
    the samples' places, recursively through dicts, lists, tuples and ``ModelOutput``s; a tensor
    equal in every group is shared (taken once); any other is an error naming ``where``."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return _scatter_tensor(parts, indices, batch, where)
    if isinstance(first, Mapping):
        values = {k: _scatter([p[k] for p in parts], indices, batch, f"{where}[{k!r}]") for k in first}
        return type(first)(**values) if hasattr(first, "to_tuple") else type(first)(values)
    if isinstance(first, (list, tuple)):
        items = [_scatter([p[i] for p in parts], indices, batch, f"{where}[{i}]") for i in range(len(first))]
        return type(first)(*items) if hasattr(first, "_fields") else type(first)(items)
    return first


def _scatter_tensor(parts: list[torch.Tensor], indices: list[torch.Tensor], batch: int, where: str) -> torch.Tensor:
    rows = {p.shape[0] // len(i) if p.dim() and p.shape[0] % len(i) == 0 else 0 for p, i in zip(parts, indices)}
    shared = all(p.shape == parts[0].shape and torch.equal(p, parts[0]) for p in parts[1:])
    if rows == {1} or (not shared and len(rows) == 1 and 0 not in rows):  # per sample first, as before
        k = rows.pop()
        out = parts[0].new_empty((batch * k, *parts[0].shape[1:]))
        for part, index in zip(parts, indices):
            at = (index.to(out.device)[:, None] * k + torch.arange(k, device=out.device)).flatten()
            out.index_copy_(0, at, part)
        return out
    if shared:
        return parts[0]  # not per sample: the same in every group
    raise MmpeftValueError(
        f"adapter_names=: {where} has {[tuple(p.shape) for p in parts]} for groups of {[len(i) for i in indices]} "
        "sample(s): neither rows per sample nor the same in every group, so it cannot be put back together; "
        "run one adapter set at a time (set_adapter) for this model"
    )


def mixed_batch_call(
    model: Any, method: str, inputs: Any, args: tuple, kwargs: dict[str, Any], adapter_names: Any
) -> Any:
    """``model.call(method, inputs, *args, **kwargs)`` with one adapter set per sample (module docstring);
    ``kwargs`` may hold ``presence`` / ``finite_checked`` and the inputs by keyword."""
    keyword = _input_keyword(model, method, kwargs) if inputs is None else None
    given = kwargs.pop(keyword) if keyword is not None else inputs
    if given is None:
        raise MmpeftTypeError("no input given: pass the modalities' inputs by position or by keyword")
    present, xs = gather(model.modalities, given)
    names = _check(model, adapter_names, xs[0].shape[0], kwargs)
    order = list(dict.fromkeys(names))
    indices = [torch.tensor([i for i, n in enumerate(names) if n == s]) for s in order]
    presence = kwargs.pop("presence", None)
    if presence is not None:  # a dict or an (S, B) tensor: as the (S, B) mask the forward makes of it
        presence = presence_tensor(presence, present, len(names), xs[0].device, check=False)
    parts = []
    for name, index in zip(order, indices):
        sub = {} if presence is None else {"presence": _presence_of(presence, index)}
        call_kwargs = {**kwargs, **sub}
        if keyword is not None:
            call_kwargs[keyword] = _subset(given, index)
        with _as_set(model, name):
            parts.append(model.call(method, None if keyword else _subset(given, index), *args, **call_kwargs))
    return _scatter(parts, indices, len(names))
