"""Interoperability with Hugging Face ``peft``: export non-mixing LoRA for one modality.

A multimodal LoRA layer whose fusion rule does not mix modalities (fusion ``"none"``, or any rule
with a single modality) is, for a chosen modality ``m``, a plain LoRA layer: ``out = W x + b +
s * B_m A_m x``. :func:`export_peft` writes those updates in peft's own directory layout, so that::

    peft_model = peft.PeftModel.from_pretrained(plain_base_model, directory)

computes exactly what ``wrapped(...)[m]`` computes, on the input after the modality's stem (for
the default "auto"/"repeat" stems: the DSM repeated to 3 channels).

Sliced LoRA (e.g. the q and v thirds of a fused qkv) becomes a rank ``S*r`` LoRA on the whole
linear layer: ``A = [A_q; A_v]`` stacked on the rank axis and ``B`` block-structured, ``B[q rows,
:r] = B_q``, ``B[v rows, r:] = B_v`` and zeros elsewhere (the k rows stay untouched). The scaling
``s`` of each layer is kept as peft's ``lora_alpha / r`` (``lora_alpha = s * rank``), using
``rank_pattern`` / ``alpha_pattern`` where modules differ.

What cannot be exported (ValueError): layers that mix modalities (peft computes one update from
one input; cross-modal mixing needs every modality's update inside the same layer at once),
bottleneck adapters (not a peft LoRA), and learnable input stems (outside the base model).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .model import MultimodalModel
from .tuners import MultimodalAdapter, MultimodalLoRA, MultimodalLoRAConv2d
from .utils import atomic_write

__all__ = ["export_peft", "peft_lora_weights", "PEFT_WEIGHTS_NAME", "PEFT_CONFIG_NAME"]

PEFT_WEIGHTS_NAME = "adapter_model.safetensors"  # peft.utils.constants.SAFETENSORS_WEIGHTS_NAME
PEFT_CONFIG_NAME = "adapter_config.json"  # peft.utils.constants.CONFIG_NAME
_BASE = "base_model."  # prefix of the patched model inside MultimodalModel


@dataclass
class _Exported:
    """One module in peft form: A (R, in), B (out, R), peft alpha for scaling alpha / R."""

    path: str
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    alpha: float
    dropout: float

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])


def _own_factor(layer: MultimodalLoRA | MultimodalLoRAConv2d, idx: int, name: str) -> float:
    """The factor the fusion rule puts on modality ``idx``'s own update (1 for "none")."""
    fusion = layer.lora_fusion
    if fusion.mixes:
        raise ValueError(
            f"{name} mixes modalities with fusion {type(fusion).__name__}: its output for one modality "
            "depends on the other modalities' LoRA updates computed from their own inputs in the same "
            "forward. A peft LoRA layer sees a single input and adds a single B A x, so this layer "
            "cannot be expressed in peft. Export a model wrapped with fusion='none' (e.g. preset 'lora') "
            "or with one modality."
        )
    try:
        with torch.no_grad():
            w = fusion.mixing_matrix().detach().float()
    except NotImplementedError:
        raise ValueError(
            f"{name}: fusion {type(fusion).__name__} has no mixing_matrix(), so the factor on each "
            "modality's own update is unknown; cannot export"
        ) from None
    off = w[idx].clone()
    off[idx] = 0.0
    if bool(off.abs().max() > 0):
        raise ValueError(f"{name}: the fusion rule mixes other modalities into this one; cannot export")
    return float(w[idx, idx])


def _export_layer(layer: MultimodalLoRA | MultimodalLoRAConv2d, modality: str, name: str) -> _Exported:
    idx = layer.modalities.index(modality)
    factor = _own_factor(layer, idx, name)
    dropout = layer.lora_dropout.p if isinstance(layer.lora_dropout, torch.nn.Dropout) else 0.0
    r = layer.rank
    path = name[len(_BASE) :] if name.startswith(_BASE) else name
    with torch.no_grad():
        if isinstance(layer, MultimodalLoRAConv2d):  # peft's Conv2d LoRA: A (r, in, kh, kw), B (out, r, 1, 1)
            lora_a, lora_b = layer.lora_A[modality].weight.detach().clone(), layer.lora_B[modality].weight.detach().clone()
        elif layer.slices is None:
            a, b = layer._pair(modality, "all")
            lora_a, lora_b = a.weight.detach().clone(), b.weight.detach().clone()
        else:
            # rank S*r: A = [A_s1; A_s2; ...]; B zero except B[rows of s_i, i*r:(i+1)*r] = B_si
            slices = list(layer.slices.items())
            lora_a = torch.cat([layer._pair(modality, s)[0].weight.detach() for s, _ in slices], 0)
            lora_b = lora_a.new_zeros(layer.out_features, r * len(slices))
            for i, (s, (lo, hi)) in enumerate(slices):
                lora_b[lo:hi, i * r : (i + 1) * r] = layer._pair(modality, s)[1].weight.detach()
    scaling = layer.scaling * factor
    return _Exported(path, lora_a.contiguous(), lora_b.contiguous(), scaling * lora_a.shape[0], dropout)


def _check_exportable(wrapped: MultimodalModel, modality: str, allow_learned_stem: bool) -> None:
    if not isinstance(wrapped, MultimodalModel):
        raise TypeError(f"export_peft takes the MultimodalModel from wrap_multimodal, got {type(wrapped).__name__}")
    if modality not in wrapped.modalities:
        raise ValueError(f"unknown modality {modality!r}; the model has {list(wrapped.modalities)}")
    adapters = [n for n, layer in wrapped.layers() if isinstance(layer, MultimodalAdapter)]
    if adapters:
        raise ValueError(
            f"{len(adapters)} bottleneck adapters (e.g. {adapters[0]}) cannot be exported to peft: "
            "peft LoRA layers add a low-rank B A x to a linear layer, while an adapter is a "
            "Linear -> activation -> Linear module beside or after a block part. Only LoRA exports."
        )
    others = [n for n, layer in wrapped.layers() if not isinstance(layer, (MultimodalLoRA, MultimodalLoRAConv2d))]
    if others:
        raise ValueError(f"only MultimodalLoRA layers can be exported; found {others[:3]}")
    stem = wrapped.stems[modality]
    if any(p.requires_grad for p in stem.parameters()) and not allow_learned_stem:
        raise ValueError(
            f"modality {modality!r} has a learnable {stem.kind!r} stem, which lives outside the base model "
            "and is not part of a peft adapter. Pass allow_learned_stem=True and feed the peft model "
            f"wrapped.stems[{modality!r}](x) yourself."
        )


def peft_lora_weights(wrapped: MultimodalModel, modality: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``{module path in the plain model: (lora_A (R, in), lora_B (out, R), scaling)}`` for ``modality``.

    The effective update of each module is ``scaling * lora_B @ lora_A``; sliced layers are
    expanded to the zero-padded rank ``S*r`` form. Raises ValueError where peft cannot express a layer.
    """
    _check_exportable(wrapped, modality, allow_learned_stem=True)
    out = {}
    for name, layer in wrapped.layers():
        e = _export_layer(layer, modality, name)  # type: ignore[arg-type]
        out[e.path] = (e.lora_a, e.lora_b, e.alpha / e.rank)
    return out


def _pattern_key(path: str) -> str:
    return re.escape(path)


def _saved_modules(wrapped: MultimodalModel) -> dict[str, torch.Tensor]:
    """peft's saved form of the modules to save: ``base_model.model.<path>.<tensor>`` of the trained copy."""
    tensors = {}
    for name, wrapper in wrapped.modules_to_save():
        path = name[len(_BASE) :] if name.startswith(_BASE) else name
        for key, t in wrapper.trained_module.state_dict().items():
            tensors[f"base_model.model.{path}.{key}"] = t.detach().cpu()
    return tensors


def _lora_config(exported: list[_Exported], modules_to_save: list[str] | None = None) -> "object":
    from peft import LoraConfig

    common = Counter((e.rank, e.alpha) for e in exported).most_common(1)[0][0]
    rank_pattern = {_pattern_key(e.path): e.rank for e in exported if e.rank != common[0]}
    alpha_pattern = {_pattern_key(e.path): e.alpha for e in exported if e.alpha != common[1]}
    dropouts = {e.dropout for e in exported}
    if len(dropouts) > 1:
        raise ValueError(f"peft has one lora_dropout per adapter; the layers use {sorted(dropouts)}")
    return LoraConfig(
        r=common[0],
        lora_alpha=common[1],
        target_modules=[e.path for e in exported],  # full names: peft matches a list by suffix
        lora_dropout=dropouts.pop(),
        bias="none",
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        modules_to_save=modules_to_save or None,
        # no hub name: peft would try to look it up online when saving embedding layers
        base_model_name_or_path=None,
    )


def export_peft(
    wrapped: MultimodalModel,
    modality: str,
    directory: str | os.PathLike,
    *,
    allow_learned_stem: bool = False,
) -> None:
    """Write ``modality``'s LoRA as a peft adapter directory for the plain (unwrapped) base model.

    ``peft.PeftModel.from_pretrained(base_model, directory)`` then reproduces ``wrapped``'s output
    for ``modality`` on the input after its stem (the DSM repeated to 3 channels by default).

    Files: ``adapter_config.json`` (``peft.LoraConfig.save_pretrained``) and
    ``adapter_model.safetensors`` with keys ``base_model.model.<module path>.lora_A.weight`` /
    ``.lora_B.weight`` (peft's saved layout, adapter name removed). Modules to save (a trained
    head) go into peft's ``modules_to_save`` with their trained tensors.

    Raises:
        ValueError: a layer mixes modalities (fusion "scalar"/"matrix" with M > 1), the model holds
            adapters, it holds no LoRA layer, or the modality has a learnable stem (unless
            ``allow_learned_stem``).
    """
    _check_exportable(wrapped, modality, allow_learned_stem)
    exported = [_export_layer(layer, modality, name) for name, layer in wrapped.layers()]  # type: ignore[arg-type]
    if not exported:
        raise ValueError("the model has no LoRA layer to export")
    saved = [n[len(_BASE) :] if n.startswith(_BASE) else n for n, _ in wrapped.modules_to_save()]
    config = _lora_config(exported, saved)
    tensors: dict[str, torch.Tensor] = _saved_modules(wrapped)
    for e in exported:
        tensors[f"base_model.model.{e.path}.lora_A.weight"] = e.lora_a.cpu()
        tensors[f"base_model.model.{e.path}.lora_B.weight"] = e.lora_b.cpu()
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(d))  # type: ignore[attr-defined]
    meta = {"format": "pt", "mmpeft_modality": modality, "mmpeft_modalities": json.dumps(list(wrapped.modalities)),
            "mmpeft_base_model": type(wrapped.base_model).__name__}  # fmt: skip
    atomic_write(d / PEFT_WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata=meta))
