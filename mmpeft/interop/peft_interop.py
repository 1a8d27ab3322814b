"""Interoperability with Hugging Face ``peft``: export non-mixing LoRA for one modality.

A multimodal LoRA layer whose fusion rule does not mix modalities (fusion ``"none"``, or any rule
with a single modality) is, for a chosen modality ``m``, a plain LoRA layer: ``out = W x + b +
s * B_m A_m x``. :func:`export_peft` writes those updates in peft's own directory layout, so that::

    peft_model = peft.PeftModel.from_pretrained(plain_base_model, directory)

computes exactly what ``wrapped(...)[m]`` computes, on the input after the modality's stem (for
the default "auto"/"repeat" stems: the DSM repeated to 3 channels). Where wrapping's preparation
of the host changes a module peft would adapt (EVA02's qkv, torchvision's attention), the export
maps it onto the plain model or refuses it, naming why (:mod:`mmpeft.interop.peft_families`);
``for_prepared_base=True`` writes the adapter for ``prepare_for_peft(plain_base_model)`` instead.

Sliced LoRA (e.g. the q and v thirds of a fused qkv) becomes a rank ``S*r`` LoRA on the whole
linear layer: ``A = [A_q; A_v]`` stacked on the rank axis and ``B`` block-structured, ``B[q rows,
:r] = B_q``, ``B[v rows, r:] = B_v`` and zeros elsewhere (the k rows stay untouched). The scaling
``s`` of each layer is kept as peft's ``lora_alpha / r`` (``lora_alpha = s * rank``), using
``rank_pattern`` / ``alpha_pattern`` where modules differ.

The LoRA variants export as peft's: rsLoRA through the scaling, ``lora_bias`` as ``lora_B.bias``,
DoRA as ``lora_magnitude_vector`` (over every row: the factor is 1 outside the slices), PiSSA /
OLoRA as one more rank block ``[A_0; -B_0]`` holding the frozen offset (exact in inference; with
dropout in training peft would drop out the offset's input too). A conv LoRA exports as peft's
Conv2d LoRA (its DoRA magnitude as peft's (1, out, 1, 1); ``lora_bias`` is refused when a conv
LoRA is exported, as it has none). Modules to save go into peft's ``modules_to_save``.

What cannot be exported (ValueError): layers that mix modalities (peft computes one update from
one input; cross-modal mixing needs every modality's update inside the same layer at once),
bottleneck adapters (not a peft LoRA), and learnable input stems (outside the base model).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import MmpeftTypeError, MmpeftValueError
from ..model.multimodal import MultimodalModel
from ..tuners import MultimodalAdapter, MultimodalLoRA, MultimodalLoRAConv2d
from ..utils import atomic_write
from .peft_families import Exported as _Exported
from .peft_families import PlainModelError, place, prepare_for_peft, to_plain  # noqa: F401  (re-exported)

__all__ = ["export_peft", "peft_lora_weights", "PEFT_WEIGHTS_NAME", "PEFT_CONFIG_NAME"]

PEFT_WEIGHTS_NAME = "adapter_model.safetensors"  # peft.utils.constants.SAFETENSORS_WEIGHTS_NAME
PEFT_CONFIG_NAME = "adapter_config.json"  # peft.utils.constants.CONFIG_NAME
_BASE = "base_model."  # prefix of the patched model inside MultimodalModel


def _own_factor(layer: MultimodalLoRA | MultimodalLoRAConv2d, idx: int, name: str) -> float:
    """The factor the fusion rule puts on modality ``idx``'s own update (1 for "none")."""
    fusion = layer.lora_fusion
    if fusion.mixes:
        raise MmpeftValueError(
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
        raise MmpeftValueError(
            f"{name}: fusion {type(fusion).__name__} has no mixing_matrix(), so the factor on each "
            "modality's own update is unknown; cannot export"
        ) from None
    off = w[idx].clone()
    off[idx] = 0.0
    if bool(off.abs().max() > 0):
        raise MmpeftValueError(f"{name}: the fusion rule mixes other modalities into this one; cannot export")
    return float(w[idx, idx])


def _export_layer(layer: MultimodalLoRA | MultimodalLoRAConv2d, modality: str, name: str) -> _Exported:
    idx = layer.modalities.index(modality)
    factor = _own_factor(layer, idx, name)
    dropout = layer.lora_dropout.p if isinstance(layer.lora_dropout, torch.nn.Dropout) else 0.0
    r = layer.rank
    path = name[len(_BASE) :] if name.startswith(_BASE) else name
    with torch.no_grad():
        if isinstance(layer, MultimodalLoRAConv2d):  # peft's Conv2d LoRA: A (r, in, kh, kw), B (out, r, 1, 1)
            lora_a = layer.lora_A[modality].weight.detach().clone()
            lora_b = layer.lora_B[modality].weight.detach().clone()
            mag = None
            if layer.use_dora:  # peft's conv magnitude is (1, out, 1, 1)
                mag = layer.lora_magnitude_vector[modality].detach().float().view(1, -1, 1, 1)
            return _Exported(path, lora_a, lora_b, layer.scaling * factor * r, dropout, None, mag)
        lora_a, lora_b, bias = _linear_pieces(layer, modality)
        magnitude = _full_magnitude(layer, modality, lora_a, lora_b) if getattr(layer, "use_dora", False) else None
    scaling = layer.scaling * factor
    return _Exported(path, lora_a, lora_b, scaling * lora_a.shape[0], dropout, bias, magnitude)


def _linear_pieces(layer: MultimodalLoRA, modality: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A (R, in), B (out, R) and the B bias (out,) or None of ``modality``'s update as one peft LoRA.

    Each slice's pair sits in its own rank block, B only in the slice's rows (rank S*r for sliced
    qkv); a PiSSA / OLoRA layer adds its frozen offset as a second block ``[A_0; -B_0]`` (rank
    2r per slice): ``s (B A - B_0 A_0) x``, exact without dropout (inference)."""
    factors = layer.factors(modality)
    pieces: list[tuple[torch.Tensor, torch.Tensor, slice]] = []
    for f in factors:
        pieces.append((f.lora_A.weight.detach(), f.lora_B.weight.detach(), f.rows))
        if f.offset is not None:
            pieces.append((f.offset[0].detach(), -f.offset[1].detach(), f.rows))
    lora_a = torch.cat([a for a, _, _ in pieces], 0).float()
    lora_b = lora_a.new_zeros(layer.out_features, lora_a.shape[0])
    col = 0
    for a, b, rows in pieces:
        lora_b[rows, col : col + a.shape[0]] = b.float()
        col += a.shape[0]
    bias = None
    if layer.lora_bias:
        bias = lora_a.new_zeros(layer.out_features)
        for f in factors:
            bias[f.rows] = f.lora_B.bias.detach().float()
    return lora_a.contiguous(), lora_b.contiguous(), bias


def _full_magnitude(layer: MultimodalLoRA, modality: str, lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """(out,) DoRA magnitude over every row: the layer's own in its slices' rows and, elsewhere,
    the row norms of ``W + delta`` (DoRA's factor 1 there, as in the layer)."""
    w = layer.base_layer.weight.detach().float()
    full = torch.linalg.norm(w + layer.scaling * lora_b @ lora_a, dim=1)
    rows = [i for f in layer.factors(modality) for i in range(f.rows.start, f.rows.stop)]  # the magnitude's order
    full[rows] = layer.lora_magnitude_vector[modality].detach().float()
    return full


def _plain_norms(wrapped: MultimodalModel, e: _Exported) -> torch.Tensor:
    """Row norms of ``W + delta`` of a layer without DoRA: peft's DoRA factor is then 1 (for a
    convolution per output channel, peft's (1, out, 1, 1))."""
    w = wrapped.base_model.get_submodule(e.path).base_layer.weight.detach().float()
    b, a = e.lora_b.float().flatten(1), e.lora_a.float().flatten(1)  # (out, r), (r, in * kh * kw)
    norms = torch.linalg.norm(w.flatten(1) + (e.alpha / e.rank) * b @ a, dim=1)
    return norms.view(1, -1, 1, 1) if w.dim() == 4 else norms


def _check_exportable(wrapped: MultimodalModel, modality: str, allow_learned_stem: bool) -> None:
    if not isinstance(wrapped, MultimodalModel):
        raise MmpeftTypeError(
            f"export_peft takes the MultimodalModel from wrap_multimodal, got {type(wrapped).__name__}"
        )
    if modality not in wrapped.modalities:
        raise MmpeftValueError(f"unknown modality {modality!r}; the model has {list(wrapped.modalities)}")
    adapters = [n for n, layer in wrapped.layers() if isinstance(layer, MultimodalAdapter)]
    if adapters:
        raise MmpeftValueError(
            f"{len(adapters)} bottleneck adapters (e.g. {adapters[0]}) cannot be exported to peft: "
            "peft LoRA layers add a low-rank B A x to a linear layer, while an adapter is a "
            "Linear -> activation -> Linear module beside or after a block part. Only LoRA exports."
        )
    others = [n for n, layer in wrapped.layers() if not isinstance(layer, (MultimodalLoRA, MultimodalLoRAConv2d))]
    if others:
        raise MmpeftValueError(f"only MultimodalLoRA layers can be exported; found {others[:3]}")
    stem = wrapped.stems[modality]
    if any(p.requires_grad for p in stem.parameters()) and not allow_learned_stem:
        raise MmpeftValueError(
            f"modality {modality!r} has a learnable {stem.kind!r} stem, which lives outside the base model "
            "and is not part of a peft adapter. Pass allow_learned_stem=True and feed the peft model "
            f"wrapped.stems[{modality!r}](x) yourself."
        )


def peft_lora_weights(wrapped: MultimodalModel, modality: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``{module path in the prepared base model: (lora_A (R, in), lora_B (out, R), scaling)}`` for ``modality``.

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


def _lora_config(exported: list[_Exported], modules_to_save: list[str] | None = None) -> object:
    from peft import LoraConfig

    targets = [e for e in exported if e.target]  # not: the out_proj of peft's MultiheadAttention LoRA
    common = Counter((e.rank, e.alpha) for e in targets).most_common(1)[0][0]
    rank_pattern = {_pattern_key(e.path): e.rank for e in targets if e.rank != common[0]}
    alpha_pattern = {_pattern_key(e.path): e.alpha for e in targets if e.alpha != common[1]}
    bias = any(e.bias is not None for e in exported)
    dora = any(e.magnitude is not None for e in exported)
    if bias and any(e.lora_a.dim() == 4 for e in exported):
        raise MmpeftValueError("peft's lora_bias applies to every layer, and a conv LoRA here has none; cannot export")
    if bias and dora:
        raise MmpeftValueError(
            "peft does not support lora_bias together with use_dora; this model uses both, so it cannot be exported"
        )
    dropouts = {e.dropout for e in exported}
    if len(dropouts) > 1:
        raise MmpeftValueError(f"peft has one lora_dropout per adapter; the layers use {sorted(dropouts)}")
    return LoraConfig(
        r=common[0],
        lora_alpha=common[1],
        target_modules=[e.path for e in targets],  # full names: peft matches a list by suffix
        lora_dropout=dropouts.pop(),
        bias="none",
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        modules_to_save=modules_to_save or None,
        lora_bias=bias,
        use_dora=dora,
        # no hub name: peft would try to look it up online when saving embedding layers
        base_model_name_or_path=None,
    )


def export_peft(
    wrapped: MultimodalModel,
    modality: str,
    directory: str | os.PathLike,
    *,
    allow_learned_stem: bool = False,
    for_prepared_base: bool = False,
) -> None:
    """Write ``modality``'s LoRA as a peft adapter directory for the plain (unwrapped) base model.

    ``peft.PeftModel.from_pretrained(base_model, directory)`` then reproduces ``wrapped``'s output
    for ``modality`` on the input after its stem (the DSM repeated to 3 channels by default).

    Wrapping prepares some hosts (:mod:`mmpeft.interop.peft_families`). torchvision's ViT: the LoRA of its
    attention's ``in_proj`` / ``out_proj`` becomes peft's own LoRA for ``nn.MultiheadAttention``.
    timm EVA02 (q/v biases): the plain model never calls ``attn.qkv``, so an adapter holding it is
    refused unless ``for_prepared_base``; with it the adapter keeps the wrapped model's paths and
    is exact on the plain model prepared as wrapping prepares it::

        export_peft(wrapped, "dsm", directory, for_prepared_base=True)
        peft.PeftModel.from_pretrained(mmpeft.interop.peft_families.prepare_for_peft(plain_model), directory)

    Files: ``adapter_config.json`` (``peft.LoraConfig.save_pretrained``) and
    ``adapter_model.safetensors`` with keys ``base_model.model.<module path>.lora_A.weight`` /
    ``.lora_B.weight`` (peft's saved layout, adapter name removed). Modules to save (a trained
    head) go into peft's ``modules_to_save`` with their trained tensors.

    Raises:
        ValueError: a layer mixes modalities (fusion "scalar"/"matrix" with M > 1), the model holds
            adapters, it holds no LoRA layer, or the modality has a learnable stem (unless
            ``allow_learned_stem``); :class:`mmpeft.interop.peft_families.PlainModelError` (a ValueError)
            naming a module the plain model would not hold or not call (without ``for_prepared_base``).
    """
    _check_exportable(wrapped, modality, allow_learned_stem)
    exported = [_export_layer(layer, modality, name) for name, layer in wrapped.layers()]  # type: ignore[arg-type]
    if not exported:
        raise MmpeftValueError("the model has no LoRA layer to export")
    saved = [n[len(_BASE) :] if n.startswith(_BASE) else n for n, _ in wrapped.modules_to_save()]
    for path in saved:
        place(wrapped.base_model, path, for_prepared_base, saved=True)
    exported = to_plain(wrapped.base_model, exported, for_prepared_base)
    config = _lora_config(exported, saved)
    tensors: dict[str, torch.Tensor] = _saved_modules(wrapped)
    for e in exported:
        key = f"base_model.model.{e.path}"
        tensors[f"{key}.lora_A.weight"] = e.lora_a.cpu()
        tensors[f"{key}.lora_B.weight"] = e.lora_b.cpu()
        if config.lora_bias:  # type: ignore[attr-defined]  # every layer: zeros where it has none
            bias = e.bias if e.bias is not None else e.lora_b.new_zeros(e.lora_b.shape[0])
            tensors[f"{key}.lora_B.bias"] = bias.cpu()
        if config.use_dora:  # type: ignore[attr-defined]  # factor 1 where a layer has no DoRA
            mag = e.magnitude if e.magnitude is not None else _plain_norms(wrapped, e)
            tensors[f"{key}.lora_magnitude_vector"] = mag.cpu()
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(d))  # type: ignore[attr-defined]
    meta = {
        "format": "pt",
        "mmpeft_modality": modality,
        "mmpeft_modalities": json.dumps(list(wrapped.modalities)),
        "mmpeft_base_model": type(wrapped.base_model).__name__,
        "mmpeft_prepared_base": json.dumps(for_prepared_base),
    }
    atomic_write(d / PEFT_WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata=meta))
