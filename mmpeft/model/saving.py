"""Building a wrapped model from a config, saving it and loading it back (``MultimodalModel``'s
class methods and ``save_pretrained``); the file format is :mod:`mmpeft.model.io`."""

from __future__ import annotations

import os
from typing import Any, TypeVar

from torch import nn

from .._version import __version__
from ..config import MultimodalConfig
from ..errors import MmpeftTypeError, MmpeftValueError
from ..runtime.norms import frozen_norms
from ..targeting.inject import apply_rules, infer_in_channels, wrap_modules_to_save
from ..targeting.prepare import prepare_backbone, unchanged_on_error
from ..tuners import multimodal_layers
from ..utils import dtype_name, listing
from .geo import watch_band_meaning
from .hub import resolve_adapter_source
from .io import read_adapter, write_adapter
from .merge import check_usable
from .precision import check_autocast, sync_dtype

__all__ = ["Persistence", "check_not_peft"]

T = TypeVar("T", bound="Persistence")


def _fingerprint(model: nn.Module) -> dict[str, list[int]]:
    """Shapes of the frozen weights of every wrapped module (checked again on load)."""
    return {
        f"{name}.base_layer.{pname}": list(p.shape)
        for name, layer in multimodal_layers(model)
        for pname, p in layer.base_layer.named_parameters()
    }


def _check_fingerprint(wrapped: nn.Module, saved: dict[str, list[int]], strict: bool) -> None:
    found = _fingerprint(wrapped)
    bad = [k for k in saved if k in found and found[k] != saved[k]]
    if bad:
        raise MmpeftValueError(
            "the base model differs from the one the adapters were trained on: "
            + "; ".join(f"{k}: saved {tuple(saved[k])} vs model {tuple(found[k])}" for k in bad[:10])
        )
    gone = sorted(set(saved) ^ set(found))
    if gone and strict:
        raise MmpeftValueError(f"the wrapped modules differ from the saved ones, e.g. {gone[:5]}")


def _probe_size(probe: Any) -> tuple[int, int] | None:
    """The (H, W) of ``probe=(H, W)``; None for True / False; else a TypeError naming the value."""
    if isinstance(probe, bool):
        return None
    if isinstance(probe, (tuple, list)) and len(probe) == 2 and all(isinstance(v, int) and v > 0 for v in probe):
        return (int(probe[0]), int(probe[1]))
    raise MmpeftTypeError(f"probe must be True, False or an (H, W) pair of positive ints, got {probe!r}")


def check_not_peft(model: nn.Module) -> None:
    """A TypeError when ``model`` is a peft model or holds peft's layers: mmpeft wraps the plain model."""
    found = next((n for n, m in model.named_modules() if type(m).__module__.split(".")[0] == "peft"), None)
    if found is None:
        return
    where = type(model).__name__ if found == "" else f"{found} ({type(model.get_submodule(found)).__name__})"
    raise MmpeftTypeError(
        f"the model is already a peft model ({where} is peft's): mmpeft wraps the plain model and adds its own "
        "per-modality layers. Unwrap it first: peft_model.merge_and_unload() keeps its LoRA folded into the "
        "weights, peft_model.unload() drops it (get_base_model() alone still holds peft's LoRA layers)"
    )


class Persistence:
    """Construction and persistence of :class:`~mmpeft.MultimodalModel` (mixed into it)."""

    config: MultimodalConfig
    in_channels: int | None

    @classmethod
    def from_config(
        cls: type[T],
        model: nn.Module,
        config: MultimodalConfig,
        efficient_attention: bool | str = True,
        probe: bool | tuple[int, int] = True,
        autocast_adapter_dtype: bool = True,
    ) -> T:
        """Freeze ``model`` and patch it in place as ``config`` says (what ``wrap_multimodal`` does;
        ``probe``: the wrap-time dry run of :func:`mmpeft.targeting.inject.apply_rules`, True, False or its (H, W);
        ``autocast_adapter_dtype``: trainable tensors float32 on a bf16 / fp16 base, :mod:`mmpeft.model.precision`).
        All or nothing: a refusal leaves ``model`` exactly as given (:func:`mmpeft.targeting.prepare.unchanged_on_error`)."""
        with unchanged_on_error(model):
            return cls._from_config(model, config, efficient_attention, probe, autocast_adapter_dtype)

    @classmethod
    def _from_config(
        cls: type[T],
        model: nn.Module,
        config: MultimodalConfig,
        efficient_attention: bool | str,
        probe: bool | tuple[int, int],
        autocast_adapter_dtype: bool,
    ) -> T:
        check_autocast(autocast_adapter_dtype)
        check_not_peft(model)
        requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}  # restored by unload()
        report = prepare_backbone(model)  # called projections, norms to keep in eval (mmpeft.targeting.prepare)
        size = _probe_size(probe)
        # read once, on the model as given, at the dry run's size: the dry run and the stems use it
        in_channels = config.in_channels if config.in_channels is not None else infer_in_channels(model, size)
        adapted = apply_rules(model, config, probe=probe is not False, probe_size=size, in_channels=in_channels)
        if config.modules_to_save is not None:
            wrap_modules_to_save(model, config.modules_to_save, adapted)
        # the norms' names once wrapped (an adapter around a module holding one renames it: LeViT's attn)
        norms = frozen_norms(model) if report["frozen_norms"] else []
        wrapped = cls(model, config, in_channels, norms)  # type: ignore[call-arg]
        wrapped.base_requires_grad = requires_grad  # type: ignore[attr-defined]
        wrapped.autocast_adapter_dtype = autocast_adapter_dtype  # type: ignore[attr-defined]
        p = next(iter(model.parameters()), None)
        if p is not None:
            wrapped.stems.to(p.device)  # type: ignore[attr-defined]
        if efficient_attention:
            wrapped.enable_efficient_attention("auto" if efficient_attention is True else str(efficient_attention))  # type: ignore[attr-defined]
        if config.base_dtype is not None:
            wrapped.set_base_dtype(config.base_dtype)  # type: ignore[attr-defined]
        sync_dtype(wrapped)  # a base already in bf16 / fp16: its dtype is the model's
        return wrapped

    @classmethod
    def from_pretrained(
        cls: type[T],
        base_model: nn.Module,
        directory: str | os.PathLike,
        *,
        is_trainable: bool = False,
        strict: bool = True,
        efficient_attention: bool | str = True,
        probe: bool | tuple[int, int] = True,
        autocast_adapter_dtype: bool = True,
    ) -> T:
        """Wrap a freshly built ``base_model`` as saved in ``directory`` and load the tensors.

        As peft's ``PeftModel.from_pretrained``: for inference unless ``is_trainable`` (eval mode,
        no tensor requires grad); with ``is_trainable`` the adapters and modules to save train
        and the mode is left as the base model's. Raises ValueError naming the keys when the base
        model's size differs from the saved one or tensors are missing, unexpected or misshapen,
        and naming a fusion rule the config uses that this process has not registered. The frozen
        model runs in the saved ``base_dtype``, or in its own dtype when that is bf16 / fp16 and none
        was saved; ``autocast_adapter_dtype`` as in :meth:`from_config`.
        """
        tensors, meta = read_adapter(resolve_adapter_source(directory))  # a directory, or a Hub repo id
        config = MultimodalConfig.from_dict(meta["config"])
        with unchanged_on_error(base_model):  # a refusal below (another base model, tensors that do not fit)
            # leaves the caller's model as given
            wrapped = cls.from_config(base_model, config, efficient_attention, probe, autocast_adapter_dtype)
            _check_fingerprint(wrapped, meta.get("base_fingerprint", {}), strict)  # type: ignore[arg-type]
            wrapped.load_trainable_state_dict(tensors, strict=strict)  # type: ignore[attr-defined]
            watch_band_meaning(wrapped)  # as at wrap time: TerraMind's modalities through their own embeddings
        if not is_trainable:
            wrapped.requires_grad_(False)  # type: ignore[attr-defined]
            wrapped.eval()  # type: ignore[attr-defined]
        return wrapped

    def _save_active_set(self, directory: str | os.PathLike) -> None:
        """Write the active set's trainable tensors (safetensors) and the config (JSON) to ``directory``.

        A parameter that trains but would not be saved is an error naming it (add it to
        ``modules_to_save`` when wrapping, or freeze it): nothing trained is dropped silently."""
        check_usable(self)
        unsaved = self.unsaved_trainables()  # type: ignore[attr-defined]
        if unsaved:
            raise MmpeftValueError(
                f"{len(unsaved)} parameter(s) require grad but are not part of the adapters, so they would not be "
                f"saved: {listing(unsaved)}. Wrap with modules_to_save=[...] naming "
                "their modules (they then train and are saved), or freeze them with requires_grad_(False)"
            )
        dtype: Any = self.compute_dtype  # type: ignore[attr-defined]
        config = MultimodalConfig.from_dict({**self.config.to_dict(), "base_dtype": dtype_name(dtype)})
        meta = {
            "version": __version__,
            "config": config.to_dict(),
            "in_channels": self.in_channels,
            "base_fingerprint": _fingerprint(self),  # type: ignore[arg-type]
        }
        write_adapter(directory, self.trainable_state_dict(), meta)  # type: ignore[attr-defined]
