"""peft's names on :class:`~mmpeft.MultimodalModel` (mixed into it), as the same operations:
``disable_adapter()``, ``get_base_model()``, ``peft_config``, ``active_peft_config``,
``merge_adapter()`` / ``unmerge_adapter()``, ``hotswap_adapter`` (peft's
``peft.utils.hotswap.hotswap_adapter``). docs/peft.md ("Model methods, peft vs mmpeft") lists
each with what differs and why; ``tests/test_peft_vocabulary.py`` shows each difference.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import MultimodalConfig
from ..errors import MmpeftKeyError, MmpeftValueError
from .io import CONFIG_NAME, read_adapter
from .merge import check_usable

__all__ = ["PeftNames", "config_differences", "set_folder"]


def set_folder(directory: str | os.PathLike, adapter_name: str) -> str | os.PathLike:
    """Where set ``adapter_name`` is saved under ``directory``: ``directory/<adapter_name>`` when it
    holds a saved set (peft's layout for a set not named "default"), else ``directory``."""
    sub = Path(directory) / adapter_name
    return sub if (sub / CONFIG_NAME).is_file() else directory


def config_differences(saved: MultimodalConfig, loaded: MultimodalConfig) -> list[str]:
    """``"field: saved X, set Y"`` for every field where two configs build different sets (the
    recorded ``base_dtype`` aside: the tensors are cast to the set's dtype on loading)."""
    a, b = _known_channels(saved.to_dict(), loaded.to_dict()), _known_channels(loaded.to_dict(), saved.to_dict())
    out = []
    for key in sorted((set(a) | set(b)) - {"base_dtype"}):
        va, vb = a.get(key), b.get(key)
        if key == "rules" and isinstance(va, list) and isinstance(vb, list) and len(va) == len(vb):
            out += [
                f"rules[{i}].{f}: saved {ra.get(f)!r}, set {rb.get(f)!r}"
                for i, (ra, rb) in enumerate(zip(va, vb))
                for f in sorted(set(ra) | set(rb))
                if ra.get(f) != rb.get(f)
            ]
        elif va != vb:
            out.append(f"{key}: saved {va!r}, set {vb!r}")
    return out


def _known_channels(config: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """``config`` with an "auto" stem's ``in_channels`` (filled in by the first forward) taken from
    ``other`` where one side has not run yet: a set saved before any forward fits a model after one."""
    stems, others = config.get("stems") or {}, other.get("stems") or {}
    fixed = {}
    for m, stem in stems.items():
        theirs = others.get(m)
        if isinstance(stem, dict) and isinstance(theirs, dict) and stem.get("kind") == theirs.get("kind") == "auto":
            if stem.get("in_channels") is None or theirs.get("in_channels") is None:
                stem = {**stem, "in_channels": None}
        fixed[m] = stem
    return {**config, "stems": fixed} if stems else config


class PeftNames:
    """peft's names of :class:`~mmpeft.MultimodalModel`'s operations (see the module docstring)."""

    base_model: nn.Module
    config: MultimodalConfig
    adapters: list[str]
    active_adapter: str
    _active_name: str
    _names: tuple[str, ...]

    def get_base_model(self) -> nn.Module:
        """peft's ``get_base_model()``: the patched model (its frozen modules with mmpeft's layers in
        it), which computes one modality's stacked batch; :meth:`unload` gives the plain one back."""
        check_usable(self)
        return self.base_model

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """peft's name of :meth:`disable_adapters` (a context manager in both): within the block
        the model computes the frozen model on the stems' outputs."""
        check_usable(self)
        with self.disable_adapters():  # type: ignore[attr-defined]
            yield

    @property
    def peft_config(self) -> dict[str, MultimodalConfig]:
        """``{set name: its MultimodalConfig}`` over every set, in the order added (peft's dict of
        ``LoraConfig``; a set built from a ``LoraConfig`` holds the mmpeft config it became)."""
        check_usable(self)
        sets = {self.active_adapter: self.config, **{n: s.config for n, s in (self._inactive or {}).items()}}  # type: ignore[attr-defined]
        return {n: sets[n] for n in self.adapters}

    @property
    def active_peft_config(self) -> MultimodalConfig:
        """The active set's :class:`MultimodalConfig` (peft's ``active_peft_config``)."""
        check_usable(self)
        return self.config

    def _only_active(self, call: str, adapter_names: Sequence[str] | None) -> None:
        if adapter_names is None:
            return
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            if name not in self.adapters:
                raise MmpeftKeyError(f"{call}: no adapter set {name!r}; the sets are {self.adapters}")
        others = [n for n in names if n != self.active_adapter]
        if others:
            raise MmpeftValueError(
                f"{call}(adapter_names={names}): only the active set {self.active_adapter!r} merges (one set is "
                f"active at a time); set_adapter({others[0]!r}) first"
            )

    def merge_adapter(self, adapter_names: Sequence[str] | None = None) -> list[str]:
        """peft's ``merge_adapter()``: :meth:`merge_adapters` of the active set (``adapter_names``:
        the active set's name or None; another set is an error naming it)."""
        check_usable(self)
        self._only_active("merge_adapter", adapter_names)
        return self.merge_adapters()  # type: ignore[attr-defined, no-any-return]

    def unmerge_adapter(self) -> list[str]:
        """peft's ``unmerge_adapter()``: :meth:`unmerge_adapters`."""
        return self.unmerge_adapters()  # type: ignore[attr-defined, no-any-return]

    def hotswap_adapter(self, directory: str | os.PathLike, adapter_name: str = "default") -> None:
        """Copy the weights saved in ``directory`` (or ``directory/<adapter_name>``) into the loaded
        set ``adapter_name`` in place, without rebuilding anything (peft's ``hotswap_adapter``): the
        same parameter objects, so an optimizer or a compiled model keeps them; the set's
        ``requires_grad`` flags and active / inactive state stay. Refused, with nothing copied, when
        the saved config builds another set (a field named: rank, alpha, targets, ...; peft allows
        another alpha) or a tensor's key or shape differs (named)."""
        check_usable(self)
        if adapter_name not in self.adapters:
            raise MmpeftKeyError(
                f"hotswap: no adapter set {adapter_name!r} to swap into; the sets are {self.adapters} (load_adapter "
                "adds a new one)"
            )
        tensors, meta = read_adapter(set_folder(directory, adapter_name))
        own = self.trainable_state_dict(adapter_name=adapter_name)  # type: ignore[attr-defined]
        bad = [f"{k}: missing from the file" for k in own if k not in tensors]
        bad += [f"{k}: not in the set" for k in tensors if k not in own]
        bad += [
            f"{k}: saved {tuple(v.shape)}, set {tuple(own[k].shape)}"
            for k, v in tensors.items()
            if k in own and v.shape != own[k].shape
        ]
        bad = bad or config_differences(MultimodalConfig.from_dict(meta["config"]), self.peft_config[adapter_name])
        if bad:
            raise MmpeftValueError(
                f"hotswap into {adapter_name!r} refused, nothing copied: {'; '.join(bad[:4])}. A hot swap replaces "
                "weights of the same shapes and options only: load_adapter(directory, new_name) adds a set of its own"
            )
        with torch.no_grad():
            self.load_trainable_state_dict(tensors, adapter_name=adapter_name)  # type: ignore[attr-defined]

    def _name_first_set(self, adapter_name: str) -> None:
        """Name the only set ``adapter_name`` (peft's ``adapter_name=`` of ``get_peft_model`` and
        ``PeftModel.from_pretrained``; ``"default"`` otherwise)."""
        if adapter_name == self.active_adapter:
            return
        self._new_name(adapter_name)  # type: ignore[attr-defined]  # a folder name, not taken
        if len(self.adapters) != 1:
            raise MmpeftValueError(f"adapter_name={adapter_name!r}: only a model's first set is named this way")
        self._active_name, self._names = adapter_name, (adapter_name,)

    def _after_wrap(self, adapter_name: str, inference_mode: bool) -> None:
        """What ``wrap_multimodal``'s peft arguments ask once the model is built: the set's name
        (``adapter_name=``) and, for a ``LoraConfig(inference_mode=True)``, its tensors frozen."""
        self._name_first_set(adapter_name)
        if inference_mode:
            for t in self.trainable_tensors():  # type: ignore[attr-defined]
                t.requires_grad_(False)
