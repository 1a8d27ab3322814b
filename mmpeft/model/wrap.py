"""``wrap_multimodal`` / ``load_multimodal``: patch a ViT for N modalities with shared frozen weights.

The public face: each function parses its arguments once (:class:`mmpeft.model.build.WrapOptions`)
and builds the config there; the wrapped model is :class:`~mmpeft.model.multimodal.MultimodalModel`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from ..config import MultimodalConfig
from ..runtime.matmul import warn_reduced_matmul_precision
from ..targeting.geo import refuse_separate_encoders
from ..targeting.inject import check_saved_apart, infer_in_channels, place_rules
from ..targeting.prepare import prepare_backbone, unchanged_after, unchanged_on_error
from ..tuners.options import Targets
from .adapter_sets import check_set_name
from .build import WrapOptions
from .geo import watch_band_meaning
from .hub import HUB_OPTIONS, resolve_adapter_source
from .multimodal import MultimodalModel
from .peft_names import set_folder
from .saving import _probe_size

__all__ = ["wrap_multimodal", "build_config", "plan_targets", "PlannedTarget", "load_multimodal", "save_multimodal"]


def build_config(
    model: nn.Module,
    modalities: Sequence[str] | None = None,
    method: str | None = None,
    *,
    preset: str | None = None,
    targets: Targets | None = None,
    base_dtype: torch.dtype | str | None = None,
    **options: Any,
) -> MultimodalConfig:
    """The :class:`MultimodalConfig` ``wrap_multimodal`` would use (see its arguments); ``model``
    is not changed. With ``"all-linear"`` or a selection option the rules name their modules."""
    opts = WrapOptions.from_kwargs(modalities, method, preset=preset, targets=targets, base_dtype=base_dtype, **options)
    return opts.resolve(model, in_place=False)


class PlannedTarget(NamedTuple):
    """One module a wrap would patch: its name, the method and the rule's options."""

    name: str
    method: str
    options: dict[str, Any]


def plan_targets(
    model: nn.Module,
    modalities: Sequence[str] | None = None,
    method: str | None = None,
    *,
    config: MultimodalConfig | None = None,
    preset: str | None = None,
    targets: Targets | None = None,
    base_dtype: torch.dtype | str | None = None,
    probe: bool | tuple[int, int] = True,
    **options: Any,
) -> list[PlannedTarget]:
    """The modules ``wrap_multimodal`` called with the same arguments would patch, in the model's
    order, without changing ``model`` (a dry run): ``[(name, method, {option: value})]``, the
    options as the wrap applies them (the v half of a key-value projection, a convolution whole,
    modules the dry run leaves out), from the same decisions
    (:func:`mmpeft.targeting.inject.place_rules`) and with the same warnings."""
    opts = WrapOptions.from_kwargs(
        modalities, method, preset=preset, targets=targets, config=config, base_dtype=base_dtype, **options
    )
    with unchanged_after(model):  # prepared in place as the wrap prepares it, then put back (no copy)
        config = opts.resolve(model, in_place=True)
        prepare_backbone(model)  # as MultimodalModel.from_config: called projections, explicit attention
        size = _probe_size(probe)
        in_channels = config.in_channels if config.in_channels is not None else infer_in_channels(model, size)
        rules = place_rules(model, config, probe=probe is not False, probe_size=size, in_channels=in_channels).rules
        if config.modules_to_save is not None:
            check_saved_apart(model, config.modules_to_save, list(rules))
        names = [n for n, _ in model.named_modules() if n in rules]
    return [
        PlannedTarget(n, rules[n].kind, {k: v for k, v in rules[n].__dict__.items() if k not in ("targets", "kind")})
        for n in names
    ]


def wrap_multimodal(
    model: nn.Module,
    modalities: Sequence[str] | None = None,
    method: str | None = None,
    *,
    preset: str | None = None,
    targets: Targets | None = None,
    config: MultimodalConfig | None = None,
    efficient_attention: bool | str = True,
    base_dtype: torch.dtype | str | None = None,
    probe: bool | tuple[int, int] = True,
    autocast_adapter_dtype: bool = True,
    **options: Any,
) -> MultimodalModel:
    """Freeze ``model`` and patch it for ``modalities`` with multimodal LoRA or adapters.

    Args:
        model: any ViT (segment-anything ``ImageEncoderViT``, timm ViTs, or your own).
        modalities: modality names, in the order they are stacked on the batch axis (default None:
            ``config.modalities`` with ``config=``, where other modalities are an error; else
            ``("optical", "dsm")``).
        method: a registered method, ``"lora"`` (default) or ``"adapter"``. Without ``targets``
            the method's paper placement is used (preset "mmlora" / "mmadapter"), detected from
            the model; with ``preset`` the method is the preset's (a different one is an error).
        preset: one of :data:`mmpeft.targeting.targets.PRESETS` ("mmlora", "mmadapter", "lora", "adapter",
            "mmadapter_authors", ...).
        targets: modules to patch instead of a preset: a list of names (suffix match), a regex, or
            ``"all-linear"`` (peft's shorthand: every ``nn.Linear`` but the output head, see
            :func:`mmpeft.targeting.selection.all_linear`).
        config: a complete :class:`MultimodalConfig` (overrides everything else).
        efficient_attention: run SAM-style blocks (segment-anything, timm's SAM) without work on
            window padding and with fused attention (:mod:`mmpeft.runtime.attention`; same outputs).
            ``True`` chooses the attention calls per device at run time (``"auto"``); ``"real"``
            or ``"all"`` force one (see :func:`mmpeft.runtime.attention.enable_efficient_attention`).
        probe: first run the model on a small random input at batch 1 and 2 (:mod:`mmpeft.targeting.probe`):
            a targeted module never called, or whose input does not carry the batch axis (a
            position table), is an error naming it. ``(H, W)``: the dry run's input size (default:
            read off the model, else 224); ``False`` for a model whose forward takes no image batch.
        base_dtype: keep the frozen weights in this dtype (``torch.bfloat16`` or ``"bf16"``; inputs
            cast to it, trainable tensors float32 masters; recorded in the config); a base in bf16 /
            fp16 or ``.to(dtype)`` alike (:mod:`mmpeft.model.precision`).
        autocast_adapter_dtype: trainable tensors float32 on a bf16 / fp16 base (peft's); False: the base's dtype.
        **options: the method's options, i.e. its config's fields (:class:`LoRAConfig`: ``rank``,
            ``alpha``, ``dropout``, ``slices``, ``split``, and peft's variants ``use_rslora``,
            ``init_lora_weights``, ``lora_bias``, ``use_dora`` (docs/peft.md); on ``nn.Linear``
            and ``nn.Conv2d`` modules; :class:`AdapterConfig`: ``placement``,
            ``ratio``, ``activation``, ``bias``, ``dropout``, ``scale``, ``init``; both:
            ``fusion``, ``lambda_init``); an option the method does not take is an error naming
            it. For the model: ``stems`` ({modality: "repeat" | ("conv1x1", c) | StemConfig}),
            ``in_channels`` (inferred from the first conv by default) and ``modules_to_save``
            (modules that train in full and are saved with the adapters: names or a regex).
            Selection, as peft (narrowing a preset too; see :mod:`mmpeft.targeting.selection`, and
            :func:`plan_targets` for a dry run): ``exclude`` (names or a regex), ``layers`` (block
            indices), ``layers_pattern`` (block list names, default "blocks", "layers", "layer")
            and, for LoRA, ``rank_pattern`` / ``alpha_pattern`` ({key: value}, a key matching the
            end of a module name). An option that would change nothing is an error naming it.

    Returns:
        A :class:`MultimodalModel`; call it with ``{modality: tensor}`` or a sequence.
    """
    warn_reduced_matmul_precision()  # "medium" set by another library (terratorch): said, see docs/backbones.md
    opts = WrapOptions.from_kwargs(  # a peft LoraConfig translated there, adapter_name= read there
        modalities, method, preset=preset, targets=targets, config=config, base_dtype=base_dtype, **options
    )
    if opts.targets is None and opts.config is None:  # CROMA's pair: one encoder per modality, refused with that reason
        refuse_separate_encoders(model)
    with unchanged_on_error(model):  # resolving prepares the model (torchvision's attention): undone on a refusal
        config = opts.resolve(model, in_place=True)
        wrapped = MultimodalModel.from_config(model, config, efficient_attention, probe, autocast_adapter_dtype)
        wrapped._after_wrap(opts.adapter_name, opts.inference_mode)
        watch_band_meaning(wrapped)  # a stem tiling SAR into a model's named bands (Prithvi's HLS): warned (geo.py)
    return wrapped


def load_multimodal(
    base_model: nn.Module,
    directory: str | os.PathLike,
    *,
    is_trainable: bool = False,
    strict: bool = True,
    **options: Any,
) -> MultimodalModel:
    """:meth:`MultimodalModel.from_pretrained`: for inference (eval mode, frozen) unless
    ``is_trainable``; ``options``: its ``efficient_attention``, ``probe``, ``autocast_adapter_dtype``.
    ``directory``: a local directory, or a Hub repo id ``owner/name`` (:mod:`mmpeft.model.hub`; with
    the options ``revision``, ``token``, ``cache_dir``, ``local_files_only``)."""
    hub = {k: options.pop(k) for k in HUB_OPTIONS if k in options}
    directory = resolve_adapter_source(directory, **hub)  # an existing path is returned as it is
    adapter_name = check_set_name(options.pop("adapter_name", "default"))  # peft's: the set's name, its folder
    directory = set_folder(directory, adapter_name)
    wrapped = MultimodalModel.from_pretrained(
        base_model, directory, is_trainable=is_trainable, strict=strict, **options
    )
    wrapped._after_wrap(adapter_name, False)
    return wrapped


def save_multimodal(wrapped: MultimodalModel, directory: str | os.PathLike) -> None:
    """:meth:`MultimodalModel.save_pretrained`."""
    wrapped.save_pretrained(directory)
