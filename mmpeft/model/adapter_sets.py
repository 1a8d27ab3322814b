"""Several named adapter sets on one frozen model, as peft's ``add_adapter`` / ``set_adapter`` /
``delete_adapter`` (mixed into :class:`~mmpeft.MultimodalModel`).

A set is everything one wrap trains: its multimodal layers (per-modality LoRA / adapters with
their fusion parameters) at its target sites, its input stems, its trained copies of the modules
to save, and its :class:`~mmpeft.MultimodalConfig`. One set is active: its modules sit in the
model's module tree, so ``state_dict()``, ``parameters()``, optimizers, the forward and the
single-set file format are those of a model wrapped with that set alone. The other sets are kept
outside the tree (a plain dict); ``set_adapter`` swaps the layers at the target sites (a site the
new set does not adapt gets its frozen module back), the stems and the trained copies, by object
reference (a site inside another set's wrapped module is found through its parent module, not its
name). The frozen modules are shared by every set, never copied. A model that never calls
``add_adapter`` holds no inactive set: its forward and files are exactly as before.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import MultimodalConfig
from ..errors import MmpeftKeyError, MmpeftTypeError, MmpeftValueError
from ..runtime.blocks import runner_of
from ..runtime.stems import ModalityStem
from ..targeting.inject import ModuleToSave, apply_rules, check_saved_apart
from ..tuners import MultimodalLayer, set_execution
from .build import DEFAULT_ADAPTER, WrapOptions, check_set_name
from .combine import weighted_lora_set
from .hub import resolve_adapter_source
from .io import CONFIG_NAME, read_adapter
from .merge import check_usable
from .params import ParamReport, count_parameters
from .saving import _check_fingerprint, _probe_size

__all__ = ["AdapterSet", "AdapterSets", "DEFAULT_ADAPTER"]

Site = tuple[nn.Module, str, MultimodalLayer]  # (parent module, attribute, layer)


@dataclass
class AdapterSet:
    """One named set outside the module tree: its config, layers at their sites, stems, and the
    trained copy of each module to save (``(wrapper, trained module)``)."""

    config: MultimodalConfig
    sites: list[Site]
    stems: nn.ModuleDict
    trained: list[tuple[ModuleToSave, nn.Module]]

    def own_modules(self) -> list[nn.Module]:
        """What the set trains: every child of its layers but the frozen ``base_layer``, its stems
        and trained copies."""
        kids = [c for _, _, layer in self.sites for n, c in layer.named_children() if n != "base_layer"]
        return [*kids, self.stems, *(t for _, t in self.trained)]


def _sites(root: nn.Module) -> list[Site]:
    """Every multimodal layer of ``root`` with the module that holds it and the attribute name."""
    return [(p, a, c) for p in root.modules() for a, c in p._modules.items() if isinstance(c, MultimodalLayer)]


def _wrappers(root: nn.Module) -> list[tuple[nn.Module, str, ModuleToSave]]:
    return [(p, a, c) for p in root.modules() for a, c in p._modules.items() if isinstance(c, ModuleToSave)]


def _like(modules: Sequence[nn.Module], ref: torch.Tensor | None) -> None:
    """Move ``modules`` to the device of ``ref`` and their floating tensors to its dtype."""
    if ref is not None:
        for m in modules:
            m.to(device=ref.device, dtype=ref.dtype)


class AdapterSets:
    """Named adapter sets of :class:`~mmpeft.MultimodalModel` (see the module docstring)."""

    base_model: nn.Module
    config: MultimodalConfig
    stems: nn.ModuleDict
    modalities: tuple[str, ...]
    in_channels: int | None
    adapters_enabled: bool
    call_check_pending: bool
    training: bool
    _active_name: str = DEFAULT_ADAPTER
    _names: tuple[str, ...] = (DEFAULT_ADAPTER,)
    _inactive: dict[str, AdapterSet] | None = None  # created by the first add_adapter
    _applying_sets = False

    # ------------------------------------------------------------------ names
    @property
    def active_adapter(self) -> str:
        """The name of the active set (``"default"`` for a wrapped or loaded model)."""
        return self._active_name

    @property
    def active_adapters(self) -> list[str]:
        """``[active_adapter]`` (peft's list form; one set is active at a time)."""
        return [self._active_name]

    @property
    def adapters(self) -> list[str]:
        """The names of every set, in the order they were added."""
        return list(self._names)

    def _known(self, name: str) -> str:
        if not isinstance(name, str):
            raise MmpeftTypeError(f"adapter_name must be a str (one set is active at a time), got {name!r}")
        if name not in self._names:
            raise MmpeftKeyError(
                f"no adapter set {name!r}; the sets are {list(self._names)} (add_adapter / load_adapter)"
            )
        return name

    def _new_name(self, name: str) -> str:
        check_set_name(name)
        if name in self._names:
            raise MmpeftValueError(
                f"an adapter set {name!r} exists already; delete_adapter({name!r}) first or pick another name"
            )
        return name

    # ------------------------------------------------------------------ swapping
    def _capture(self) -> AdapterSet:
        """The active set, as it sits in the module tree."""
        trained = [(w, w.trained_module) for _, _, w in _wrappers(self.base_model)]
        return AdapterSet(self.config, _sites(self.base_model), self.stems, trained)

    def _activate(self, s: AdapterSet) -> None:
        for parent, attr, layer in s.sites:
            setattr(parent, attr, layer)
        for wrapper, trained in s.trained:
            wrapper.trained_module = trained
        self.stems, self.config = s.stems, s.config

    def _switch(self, name: str) -> None:
        """Make ``name`` the active set (no checks: :meth:`set_adapter` is the public way)."""
        store = self._inactive if self._inactive is not None else {}
        current, new = self._capture(), store.pop(name)
        for parent, attr, layer in current.sites:
            setattr(parent, attr, layer.base_layer)
        self._activate(new)
        store[self._active_name] = current
        self._inactive, self._active_name = store, name

    @contextlib.contextmanager
    def _using(self, name: str) -> Iterator[None]:
        """Within the block ``name`` is the active set (saving, loading and counting one set)."""
        before = self._active_name
        if name == before:
            yield
            return
        self._switch(name)
        try:
            yield
        finally:
            self._switch(before)

    @contextlib.contextmanager
    def _bare(self) -> Iterator[None]:
        """Within the block the base model is as it was before wrapping: every site holds its frozen
        module, every module to save its original, every block its stock forward (the wrap-time
        dry run reads the windowed batch factors off it). Where a new set is planned and built."""
        active, wrappers = self._capture(), _wrappers(self.base_model)
        for parent, attr, layer in active.sites:
            setattr(parent, attr, layer.base_layer)
        for parent, attr, w in wrappers:
            setattr(parent, attr, w.original_module)
        features = [(m, vars(m).pop("forward")) for m in self.base_model.modules() if runner_of(m) is not None]
        try:
            yield
        finally:
            for parent, attr, layer in _sites(self.base_model):  # what a failed build left behind
                setattr(parent, attr, layer.base_layer)
            for module, runner in features:
                module.forward = runner
            for parent, attr, w in wrappers:
                setattr(parent, attr, w)
            self._activate(active)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        """nn.Module's ``_apply`` (``.to()``, ``.cuda()``, ``.double()``), then the same for every
        inactive set, run as the active one so that it is treated exactly alike."""
        result = super()._apply(fn, recurse)  # type: ignore[misc]
        if recurse and self._inactive and not self._applying_sets:
            self._applying_sets = True
            try:
                for name in list(self._inactive):
                    with self._using(name):
                        self._apply(fn, recurse)
            finally:
                self._applying_sets = False
        return result

    # ------------------------------------------------------------------ the public methods
    def add_adapter(
        self,
        adapter_name: str,
        method: str | None = None,
        *,
        preset: str | None = None,
        targets: Any = None,
        config: MultimodalConfig | None = None,
        probe: bool | tuple[int, int] = True,
        **options: Any,
    ) -> None:
        """Add a new set named ``adapter_name`` on the same frozen model, built as
        ``wrap_multimodal(model, modalities, method, preset=, targets=, config=, probe=, **options)``
        would (its own layers, fusion parameters, stems and copies of the modules to save). It is not
        made active (:meth:`set_adapter`, as peft). ``stems`` default to the model's stem configs;
        ``in_channels``, ``modules_to_save`` and ``base_dtype`` are the model's, shared by every set
        (a different value is an error)."""
        check_usable(self)
        name = self._new_name(adapter_name)
        opts = WrapOptions.for_set(self.config, method, preset=preset, targets=targets, config=config, **options)
        with self._bare():  # planned and built on the plain model, as a first wrap is (a refusal undone)
            cfg = opts.resolve(self.base_model, in_place=True)
            apply_rules(self.base_model, cfg, probe=probe is not False, probe_size=_probe_size(probe))
            if cfg.modules_to_save is not None:  # no layer at, around or in a module trained in full, as at wrap
                adapted = [n for n, m in self.base_model.named_modules() if isinstance(m, MultimodalLayer)]
                check_saved_apart(self.base_model, cfg.modules_to_save, adapted)
            sites = _sites(self.base_model)
            for parent, attr, layer in sites:
                setattr(parent, attr, layer.base_layer)
        new = AdapterSet(cfg, sites, self._new_stems(cfg), self._new_trained())
        self._like_active(new)
        for module in new.own_modules() if opts.inference_mode else ():  # LoraConfig(inference_mode=True), as peft
            module.requires_grad_(False)
        self._inactive = {**(self._inactive or {}), name: new}
        self._names = (*self._names, name)

    def _new_stems(self, config: MultimodalConfig) -> nn.ModuleDict:
        return nn.ModuleDict({m: ModalityStem(m, config.stem(m), self.in_channels) for m in self.modalities})

    def _new_trained(self) -> list[tuple[ModuleToSave, nn.Module]]:
        """A fresh trainable copy of every module to save (its frozen original's weights)."""
        pairs = []
        for _, _, wrapper in _wrappers(self.base_model):
            trained = copy.deepcopy(wrapper.trained_module)
            trained.load_state_dict(wrapper.original_module.state_dict())
            pairs.append((wrapper, trained.requires_grad_(True)))
        return pairs

    def _like_active(self, new: AdapterSet) -> None:
        """The new set's trainable tensors on the active set's device and in its dtype (float32
        masters on a low-precision base), its layers with the wrap-time dry run's batch factors
        of the layers already on the same frozen modules."""
        own = [t for m in self._capture().own_modules() for t in m.parameters() if t.is_floating_point()]
        _like(new.own_modules(), own[0] if own else next(self.base_model.parameters(), None))
        known = {id(layer.base_layer): layer for s in self._all_sets() for _, _, layer in s.sites}
        for _, _, layer in new.sites:
            if id(layer.base_layer) in known:
                layer.batch_factor = known[id(layer.base_layer)].batch_factor
                layer.factor_size = known[id(layer.base_layer)].factor_size

    def _all_sets(self) -> list[AdapterSet]:
        return [self._capture(), *(self._inactive or {}).values()]

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the active set: its layers, stems and trained copies go into the
        model (the frozen model and the other sets are not touched). The mode (train / eval),
        adapters on or off and the layers' execution carry over; build the optimizer over
        ``parameters()`` after switching (only the active set's tensors are parameters). A merged
        active set must be unmerged first (its merged weights would stay in use)."""
        check_usable(self)
        name = self._known(adapter_name)
        if name == self._active_name:
            return
        merged = [n for n, layer in _named_layers(self) if layer.merged]
        if merged:
            raise MmpeftValueError(
                f"set_adapter({name!r}): the active set {self._active_name!r} is merged ({len(merged)} layer(s), "
                f"e.g. {merged[0]}); call unmerge_adapters() first"
            )
        executions = {layer.execution for _, layer in _named_layers(self)}
        if len(executions) > 1:
            raise MmpeftValueError(
                f"set_adapter({name!r}): the active set's layers run in several executions {sorted(executions)}, "
                "which cannot carry over to another set's layers; call mmpeft.set_execution(model, ...) first"
            )
        self._switch(name)
        if executions:
            set_execution(self, executions.pop())  # type: ignore[arg-type]
        self.set_adapters_enabled(self.adapters_enabled)  # type: ignore[attr-defined]
        self.train(self.training)  # type: ignore[attr-defined]  # keeps the frozen norms in eval
        self.call_check_pending = True  # the first forward verifies the new layers run

    def delete_adapter(self, adapter_name: str) -> None:
        """Drop the set ``adapter_name`` (its layers, stems and copies). The active set cannot be
        deleted: :meth:`set_adapter` to another first (a model always holds one set)."""
        check_usable(self)
        name = self._known(adapter_name)
        if name == self._active_name:
            others = [n for n in self._names if n != name]
            hint = f"set_adapter({others[0]!r}) first" if others else "it is the only one (use the base model itself)"
            raise MmpeftValueError(f"cannot delete the active adapter set {name!r}: {hint}")
        assert self._inactive is not None
        del self._inactive[name]
        self._names = tuple(n for n in self._names if n != name)

    def add_weighted_adapter(
        self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str, combination_type: str = "cat"
    ) -> None:
        """Add set ``adapter_name`` whose update is ``sum_i weights[i] * (update of adapters[i])``,
        as peft's ``add_weighted_adapter(combination_type="cat")``: exact for LoRA sets that do not
        mix modalities (rank = the sum of the ranks); sets with mixing rules, adapters, DoRA,
        ``lora_bias``, PiSSA / OLoRA, learnable stems or modules to save are refused naming why
        (:mod:`mmpeft.model.combine`). Not made active."""
        weighted_lora_set(self, adapters, weights, adapter_name, combination_type)

    def count_adapter_parameters(self, adapter_name: str | None = None, by: str = "kind") -> ParamReport:
        """:func:`~mmpeft.count_parameters` of the model with set ``adapter_name`` active (default:
        the active one): that set's trainables by group beside the frozen model."""
        check_usable(self)
        with self._using(self._known(adapter_name or self._active_name)):
            return count_parameters(self, by=by)  # type: ignore[arg-type]

    def adapter_status(self) -> dict[str, Any]:
        """``{"active_adapter": name, "adapters": {name: {"layers": n, "trainable": n}}}``."""
        check_usable(self)
        sets = dict(zip([self._active_name, *(self._inactive or {})], self._all_sets()))
        return {
            "active_adapter": self._active_name,
            "adapters": {
                n: {
                    "layers": len(sets[n].sites),
                    "trainable": sum(p.numel() for m in sets[n].own_modules() for p in m.parameters()),
                }
                for n in self._names
            },
        }

    # ------------------------------------------------------------------ saving and loading
    def save_pretrained(
        self,
        directory: str | os.PathLike,
        selected_adapters: Sequence[str] | None = None,
        *,
        push_to_hub: bool = False,
        repo_id: str | None = None,
        **hub_options: Any,
    ) -> Any:
        """Write every set (or ``selected_adapters``) as peft lays them out: ``"default"`` in
        ``directory`` itself (the single-set format), every other set in ``directory/<name>``.
        ``push_to_hub``: then upload ``directory`` with a model card to ``repo_id`` (default: the
        directory's name) with :meth:`push_to_hub`'s options (:mod:`mmpeft.model.hub`)."""
        if (repo_id is not None or hub_options) and not push_to_hub:
            raise MmpeftTypeError(f"repo_id / {sorted(hub_options)} are options of push_to_hub=True")
        repo = self._push_target(directory, repo_id, hub_options) if push_to_hub else None  # type: ignore[attr-defined]
        names = self.adapters if selected_adapters is None else [self._known(n) for n in selected_adapters]
        for name in names:
            with self._using(name):
                target = Path(directory) if name == DEFAULT_ADAPTER else Path(directory) / name
                self._save_active_set(target)  # type: ignore[attr-defined]
        return self._push_saved(directory, repo, hub_options) if repo else None  # type: ignore[attr-defined]

    def load_adapter(
        self,
        directory: str | Path,
        adapter_name: str,
        *,
        is_trainable: bool = False,
        strict: bool = True,
        probe: bool | tuple[int, int] = True,
        hotswap: bool = False,
    ) -> None:
        """Add the set saved in ``directory/<adapter_name>`` (or in ``directory`` itself when it has
        no such folder) under ``adapter_name``, not made active. For inference unless
        ``is_trainable`` (its tensors frozen). Errors as :meth:`from_pretrained`'s. ``hotswap``:
        copy the saved weights into the loaded set ``adapter_name`` instead (``hotswap_adapter``)."""
        if hotswap:
            if is_trainable:
                raise MmpeftValueError("hotswap=True keeps the set's requires_grad flags: drop is_trainable")
            return self.hotswap_adapter(resolve_adapter_source(directory), adapter_name)  # type: ignore[attr-defined]
        directory = resolve_adapter_source(directory)  # a directory, or a Hub repo id (mmpeft.model.hub)
        path = Path(directory) / adapter_name
        tensors, meta = read_adapter(path if (path / CONFIG_NAME).is_file() else directory)
        self.add_adapter(adapter_name, config=MultimodalConfig.from_dict(meta["config"]), probe=probe)
        try:
            with self._using(adapter_name):
                _check_fingerprint(self, meta.get("base_fingerprint", {}), strict)  # type: ignore[arg-type]
                self.load_trainable_state_dict(tensors, strict=strict)  # type: ignore[attr-defined]
        except Exception:
            self.delete_adapter(adapter_name)
            raise
        if not is_trainable:
            assert self._inactive is not None
            for module in self._inactive[adapter_name].own_modules():
                module.requires_grad_(False)


def _named_layers(model: Any) -> list[tuple[str, MultimodalLayer]]:
    return list(model.layers())
