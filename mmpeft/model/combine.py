"""peft's ``add_weighted_adapter(..., combination_type="cat")`` for named LoRA sets: exact, or refused
naming why (:meth:`~mmpeft.MultimodalModel.add_weighted_adapter`).

Set ``i`` adds ``s_i B_i A_i x_m`` to a LoRA layer's output for modality ``m`` (per output slice).
The weighted sum over the sets is one LoRA of rank ``sum_i r_i`` and scaling 1::

    sum_i w_i s_i B_i A_i = [B_1 ... B_n] [w_1 s_1 A_1; ...; w_n s_n A_n]

``A = cat(w_i s_i A_i)`` on the rank axis and ``B = cat(B_i)`` (peft's "cat"), per modality; a site
that only some sets adapt takes those sets' blocks. Nothing else is exact, so nothing else is built:

- a fusion rule that mixes modalities: each set mixes its updates with its *own* lambdas, and one
  rule over the concatenation would mix every set's updates with the same ones;
- bottleneck adapters: an activation between the projections, so updates do not add;
- DoRA (rows of ``W + delta`` renormalised), ``lora_bias`` and PiSSA / OLoRA's frozen offset (not
  carried, as peft's "cat" carries no bias);
- learnable stems and modules to save: whole trained modules, not additive updates.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..config import LoRAConfig, MultimodalConfig
from ..errors import MmpeftValueError
from ..targeting.inject import rule_owners
from ..tuners import MultimodalLayer, MultimodalLoRA, MultimodalLoRAConv2d, multimodal_layers

__all__ = ["combination_refusal", "weighted_lora_set"]

Piece = tuple[float, MultimodalLayer, LoRAConfig]  # (weight * scaling, layer, its rule)


def combination_refusal(layer: MultimodalLayer) -> str | None:
    """Why ``layer``'s update cannot enter a weighted sum of sets exactly (None: it can)."""
    if not isinstance(layer, (MultimodalLoRA, MultimodalLoRAConv2d)):
        return f"a {type(layer).__name__} puts an activation between its projections: adapter updates do not add"
    if layer.lora_fusion.mixes:
        return (
            f"its fusion rule {type(layer.lora_fusion).__name__} mixes modalities with this set's own lambdas; a "
            "weighted sum of lambda-mixed updates is no single set's mixing (combine sets wrapped with fusion='none')"
        )
    if getattr(layer, "use_dora", False):
        return "DoRA renormalises each row of W + delta, which is not linear in the update"
    if getattr(layer, "lora_bias", False):
        return "its lora_bias is not carried by the 'cat' combination (nor by peft's)"
    if getattr(layer, "lora_offset", None) is not None:
        return "PiSSA / OLoRA subtract a frozen initial pair from the update, which the combination does not carry"
    return None


def _check_arguments(model: Any, adapters: Sequence[str], weights: Sequence[float], combination_type: str) -> None:
    if combination_type != "cat":
        raise MmpeftValueError(
            f"combination_type={combination_type!r}: only 'cat' is offered (exact: rank = sum of the ranks); peft's "
            "'svd', 'linear', 'ties', 'dare_*' and 'magnitude_prune' approximate the sum"
        )
    if isinstance(adapters, str) or not adapters or len(set(adapters)) != len(adapters):
        raise MmpeftValueError(f"adapters must be a non-empty list of distinct set names, got {adapters!r}")
    if len(weights) != len(adapters) or not all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights
    ):
        raise MmpeftValueError(
            f"weights must be {len(adapters)} finite numbers, one per set of {list(adapters)}; got {weights!r}"
        )
    for name in adapters:
        model._known(name)


def _set_pieces(model: Any, name: str, weight: float) -> dict[str, Piece]:
    """{site: (weight * scaling, layer, rule)} of set ``name``, refusing what cannot combine."""
    with model._using(name):
        where = f"add_weighted_adapter cannot combine set {name!r}"
        if any(True for _ in model.modules_to_save()):
            raise MmpeftValueError(
                f"{where}: its modules to save are whole trained modules, whose weighted sum is not additive"
            )
        learned = [m for m in model.modalities if any(True for _ in model.stems[m].parameters())]
        if learned:
            raise MmpeftValueError(f"{where}: the stems of {learned} are learnable modules outside the LoRA updates")
        with model._bare():
            owner = rule_owners(model.base_model, model.config)
        pieces = {}
        for site, layer in multimodal_layers(model.base_model):
            reason = combination_refusal(layer)
            if reason is not None:
                raise MmpeftValueError(f"{where}: layer {site}: {reason}")
            pieces[site] = (float(weight) * layer.scaling, layer, model.config.rules[owner[site]])
        return pieces


def _pairs(layer: MultimodalLoRA | MultimodalLoRAConv2d) -> dict[tuple[str, str], tuple[nn.Module, nn.Module]]:
    """{(modality, slice): (A, B) modules}; the rank is dim 0 of A's weight and dim 1 of B's."""
    return {(m, f.name): (f.lora_A, f.lora_B) for m in layer.modalities for f in layer.factors(m)}


def _rules(sites: dict[str, list[Piece]]) -> list[LoRAConfig]:
    """One rule per kind of site: rank = the sum of the sets' ranks there, scaling 1 (alpha = rank)."""
    groups: dict[tuple[Any, ...], list[str]] = {}
    for site, pieces in sites.items():
        first = pieces[0][2]
        if len({tuple(p[2].slices or ()) for p in pieces}) > 1:
            raise MmpeftValueError(
                f"add_weighted_adapter: the sets tune different slices of {site}; they cannot be concatenated"
            )
        if len({p[2].dropout for p in pieces}) > 1:
            raise MmpeftValueError(
                f"add_weighted_adapter: the sets use different dropout at {site} "
                f"({sorted({p[2].dropout for p in pieces})}); the combined set has one: combine sets of the same dropout"
            )
        rank = sum(p[1].rank for p in pieces)
        key = (rank, tuple(first.slices or ()), tuple(first.split), first.dropout)
        groups.setdefault(key, []).append(site)
    rules = []
    for (rank, slices, split, dropout), names in groups.items():
        sliced = {"slices": list(slices), "split": list(split)} if slices else {}
        rules.append(LoRAConfig(targets=names, rank=rank, alpha=float(rank), dropout=dropout, fusion="none", **sliced))
    return rules


def weighted_lora_set(
    model: Any, adapters: Sequence[str], weights: Sequence[float], adapter_name: str, combination_type: str = "cat"
) -> None:
    """Add set ``adapter_name`` to ``model`` (a :class:`~mmpeft.MultimodalModel`) computing
    ``sum_i weights[i] * update of adapters[i]`` exactly (module docstring); not made active."""
    model._new_name(adapter_name)
    _check_arguments(model, adapters, weights, combination_type)
    sites: dict[str, list[Piece]] = {}
    for name, weight in zip(adapters, weights):
        for site, piece in _set_pieces(model, name, weight).items():
            sites.setdefault(site, []).append(piece)
    with model._using(adapters[0]):
        first: MultimodalConfig = model.config
    stems = {m: dataclasses.replace(first.stem(m)) for m in first.modalities}
    config = dataclasses.replace(first, rules=_rules(sites), stems=stems, preset=None)
    model.add_adapter(adapter_name, config=config, probe=False)  # batch factors from the sets' layers
    with model._using(adapter_name), torch.no_grad():
        for site, layer in multimodal_layers(model.base_model):
            for key, (a, b) in _pairs(layer).items():
                blocks = [(factor, _pairs(old)[key]) for factor, old, _ in sites[site]]
                a.weight.copy_(torch.cat([f * pa.weight.float() for f, (pa, _) in blocks], 0))
                b.weight.copy_(torch.cat([pb.weight.float() for _, (_, pb) in blocks], 1))
