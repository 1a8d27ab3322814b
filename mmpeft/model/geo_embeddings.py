"""Each modality through the model's own patch embedding for it (TerraMind).

TerraMind (TerraTorch's ``TerraMindViT``) holds one patch embedding per modality
(``encoder_embeddings["untok_sen2l2a@224"]``, ``["untok_sen1grd@224"]``, ...; ``mod_name_mapping``
maps its modality keys ``"S2L2A"`` / ``"S1GRD"`` to them) before one shared transformer. Called with
one tensor, it embeds it as its first modality. A wrapped model calls it with the modalities stacked
on the batch axis, so without routing a 2-band SAR input would be tiled into the 12 optical slots of
the first embedding. Here:

- :func:`route_by_name` (at ``wrap_multimodal`` / ``load_multimodal``): a wrapped modality named
  after one of the model's keys or embeddings (``("S2L2A", "S1GRD")``, case aside) goes through that
  embedding (:func:`mmpeft.set_modality_arguments` with the embedding as its module); the
  transformer after it runs on the stacked batch, with each modality's LoRA. A modality with no
  embedding and no mapping is refused at its first forward, naming it, the model's keys and the
  fixes: never tiled into another modality's embedding.
- :func:`set_modality_embeddings`: the mapping given (``{"optical": "S2L2A", "sar": "S1GRD"}``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import MmpeftKeyError, MmpeftValueError
from .geo_arguments import set_modality_arguments

__all__ = ["embedding_holder", "set_modality_embeddings", "route_by_name"]

#: stems that pass a modality's own bands on (tiled): those a per-modality embedding must take
_BAND_KEEPING = ("auto", "repeat", "identity")


def embedding_holder(model: nn.Module) -> tuple[str, nn.Module] | None:
    """(qualified name, module) of the first module of ``model`` with one patch embedding per modality:
    an ``encoder_embeddings`` ``ModuleDict``, a ``mod_name_mapping`` {key: embedding name} and its
    ``modalities`` list (TerraMind); None when there is none."""
    for name, module in model.named_modules():
        table, mapping = getattr(module, "encoder_embeddings", None), getattr(module, "mod_name_mapping", None)
        if isinstance(table, nn.ModuleDict) and isinstance(mapping, dict) and getattr(module, "modalities", None):
            return name, module
    return None


def _keys(holder: nn.Module) -> dict[str, str]:
    """Every name a modality may be given by: the model's keys and its embeddings' names -> embedding."""
    return {**{e: e for e in holder.encoder_embeddings}, **dict(holder.mod_name_mapping)}


def _embedding(holder: nn.Module, modality: str, key: str) -> str:
    """The embedding ``key`` names (a modality key or an embedding name), checked: one taking raw bands."""
    keys = _keys(holder)
    if key not in keys or keys[key] not in holder.encoder_embeddings:
        raise MmpeftKeyError(
            f"set_modality_embeddings: {modality!r} -> {key!r}: {type(holder).__name__} has no embedding {key!r}; "
            f"its modality keys: {list(holder.mod_name_mapping)} (embeddings {list(holder.encoder_embeddings)})"
        )
    name = keys[key]
    if name in getattr(holder, "tokenizer", {}) or not isinstance(
        getattr(holder.encoder_embeddings[name], "num_channels", None), int
    ):
        raise MmpeftValueError(
            f"set_modality_embeddings: {modality!r} -> {key!r}: the embedding {name!r} does not take a modality's "
            "bands (a tokenised or sequence modality); route it to an image embedding"
        )
    return name


def _by_name(holder: nn.Module, modality: str) -> str | None:
    """The embedding a modality's own name names (exactly, or one key alike but for case), else None."""
    keys = _keys(holder)
    if modality in keys:
        return keys[modality]
    alike = {v for k, v in keys.items() if k.lower() == modality.lower()}
    return alike.pop() if len(alike) == 1 else None


def _routes(wrapped: Any, holder: nn.Module, mapping: Mapping[str, str]) -> dict[str, str]:
    """{modality: embedding name} for the modalities mapped or named after a key; checked first."""
    unknown = [m for m in mapping if m not in wrapped.modalities]
    if unknown:
        raise MmpeftKeyError(f"set_modality_embeddings: unknown modality {unknown}; the model's: {wrapped.modalities}")
    routes = {}
    for m in wrapped.modalities:
        if m in mapping or wrapped.stems[m].kind in _BAND_KEEPING:
            name = _embedding(holder, m, mapping[m]) if m in mapping else _by_name(holder, m)
            if name is not None:
                routes[m] = name
    return routes


def _install(wrapped: Any, path: str, holder: nn.Module, routes: dict[str, str]) -> RemovableHandle | None:
    """Route ``routes`` through their embeddings (the one the model calls for a tensor, its first
    modality's, is the hooked one), replacing a previous routing; refuse the others at their first forward."""
    previous = getattr(wrapped, "_embedding_routing", None)
    if previous is not None:
        previous.remove()
        for m in getattr(wrapped, "_embedding_routes", {}):
            wrapped._modality_arguments.pop(m, None)
    prefix = f"{path}.encoder_embeddings." if path else "encoder_embeddings."
    default = prefix + holder.mod_name_mapping[holder.modalities[0]]
    spec = {m: {"module": prefix + name} for m, name in routes.items()}
    handle = set_modality_arguments(wrapped, default, spec) if spec else None
    wrapped._embedding_routing, wrapped._embedding_routes = handle, dict(routes)
    if getattr(wrapped, "_embedding_refusal", None) is None:
        wrapped._embedding_refusal = wrapped.register_forward_pre_hook(
            _RefuseUnrouted(wrapped, holder), with_kwargs=True
        )
    return handle


def route_by_name(wrapped: Any) -> bool:
    """At wrap / load: for a base model with per-modality embeddings (:func:`embedding_holder`), route
    each modality named after one of its keys through that embedding and refuse, at their first
    forward, those with a band-keeping stem and no embedding. False (nothing done) for other models."""
    found = embedding_holder(wrapped.base_model)
    if found is None:
        return False
    path, holder = found
    _install(wrapped, path, holder, _routes(wrapped, holder, {}))
    return True


def set_modality_embeddings(wrapped: Any, mapping: Mapping[str, str] | None = None) -> RemovableHandle | None:
    """Route each modality of ``wrapped`` through the base model's own patch embedding for it
    (TerraMind): ``mapping`` {wrapped modality: the model's modality key or embedding name}, e.g.
    ``{"optical": "S2L2A", "sar": "S1GRD"}``; modalities not in it go through the embedding their own
    name names, as at wrap time. Replaces the routing set before; checked before anything changes
    (unknown modality or key, an embedding that takes no bands). Not saved with the adapters: call
    it again after loading (a modality left without an embedding is refused at its forward)."""
    found = embedding_holder(wrapped.base_model)
    if found is None:
        raise MmpeftValueError(
            f"set_modality_embeddings: {type(wrapped.base_model).__name__} has no per-modality patch embeddings "
            "(an encoder_embeddings table with mod_name_mapping, as TerraMind's); for a model whose embedding "
            "takes per-modality arguments (DOFA's wavelengths) use mmpeft.set_modality_arguments"
        )
    path, holder = found
    mapping = dict(mapping or {})
    routes = _routes(wrapped, holder, mapping)
    return _install(wrapped, path, holder, routes)


class _RefuseUnrouted:
    """Forward pre-hook of a wrapped model with per-modality embeddings: a modality in the input
    whose stem passes its bands on and that has no embedding of its own is refused, before any work."""

    def __init__(self, wrapped: Any, holder: nn.Module) -> None:
        self.wrapped, self.holder = wrapped, holder

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        wrapped, inputs = self.wrapped, args[0] if args else kwargs.get("inputs", kwargs.get("pixel_values"))
        given = (
            list(inputs)
            if isinstance(inputs, Mapping)
            else [m for m, x in zip(wrapped.modalities, inputs or ()) if x is not None]
        )
        routed = getattr(wrapped, "_embedding_routes", {})
        for m in given:
            if m in wrapped.stems and wrapped.stems[m].kind in _BAND_KEEPING and m not in routed:
                raise MmpeftKeyError(self._message(m))

    def _message(self, m: str) -> str:
        holder = self.holder
        keys = list(holder.mod_name_mapping)
        return (
            f"modality {m!r} has no patch embedding of its own in {type(holder).__name__} (its modality keys: "
            f"{keys}; embeddings {list(holder.encoder_embeddings)}) and no mapping: its {self.wrapped.stems[m].kind!r} "
            f"stem would feed its bands into the {keys[0]!r} embedding's slots, read as {keys[0]} bands. Name the "
            f"modality after one of the keys (wrap_multimodal(model, {tuple(keys)!r}, ...)), map it to the key of its "
            f"bands: mmpeft.set_modality_embeddings(wrapped, {{{m!r}: '<key>'}}), or give it a learnable stem "
            f"(stems={{{m!r}: ('conv1x1', <its bands>)}}), which learns its way into the {keys[0]!r} embedding"
        )
