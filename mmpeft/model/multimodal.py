"""``MultimodalModel``: a frozen model patched with multimodal layers, its features as methods.

What state a wrapped model is in is held in declared attributes: ``nonfinite`` (the NaN / inf
action), ``adapters_enabled``, ``call_check_pending`` (the first forward verifies every layer
ran), ``frozen_norms`` (kept in eval mode), ``compute_dtype``; each layer's own state is
described in :mod:`mmpeft.tuners.base`; block features in :mod:`mmpeft.runtime.blocks`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..config import MultimodalConfig
from ..errors import MmpeftTypeError, MmpeftValueError
from ..runtime.batch import Inputs, check_sizes, gather, inputs_by_keyword, module_call, split_output
from ..runtime.labels import as_output, check_presence, computes_losses, take_labels, with_losses
from ..runtime.presence import NonFiniteAction, Presence, masked_presence
from ..runtime.stems import ModalityStem, check_stem_inputs
from ..runtime.verify import cast_inputs, checked_call, input_dtype
from ..targeting.inject import ModuleToSave
from ..tuners import Execution, MultimodalLayer, multimodal_layers, only_modality, set_execution
from ..tuners.base import layer_state
from ..utils import state_mismatches
from . import merge as _merge
from .adapter_sets import AdapterSets
from .features import BlockFeatures
from .hub import HubMixin
from .mixed_batch import mixed_batch_call
from .params import trainable_summary
from .peft_names import PeftNames
from .precision import sync_dtype
from .saving import Persistence

__all__ = ["MultimodalModel"]


class MultimodalModel(PeftNames, AdapterSets, Persistence, BlockFeatures, HubMixin, nn.Module):
    """A frozen model patched with multimodal layers; one input and one output per modality.

    ``forward(inputs)`` stacks the modalities modality-major on the batch axis, runs the frozen
    model once on ``(M*B, ...)`` and splits every tensor of the output back into M parts. Build
    one with :func:`~mmpeft.wrap_multimodal` or :meth:`from_pretrained` (:mod:`mmpeft.model.saving`: also
    ``from_config`` and ``save_pretrained``).

    Attributes:
        base_model: the patched model (its own weights frozen).
        config: the :class:`MultimodalConfig` it was built from.
        stems: per-modality input stems (``stems[modality]``).
        nonfinite: what a NaN / inf input does (:meth:`set_nonfinite`).
        adapters_enabled: False inside :meth:`disable_adapters`.
        call_check_pending: the next forward verifies that every multimodal layer runs.
        frozen_norms: names of the running-statistics norms kept in eval mode (:mod:`mmpeft.runtime.norms`).
    """

    def __init__(
        self, base_model: nn.Module, config: MultimodalConfig, in_channels: int | None, frozen_norms: Sequence[str] = ()
    ) -> None:
        super().__init__()
        self.base_model = base_model
        self.config = config
        self.modalities: tuple[str, ...] = tuple(config.modalities)
        self.in_channels = in_channels
        self.stems = nn.ModuleDict({m: ModalityStem(m, config.stem(m), in_channels) for m in self.modalities})
        self._compute_dtype: torch.dtype | None = None
        self.nonfinite: NonFiniteAction = "error"
        self.adapters_enabled = True
        self.call_check_pending = True
        # the norms themselves, not their names: adapter sets swap modules (and names) later
        self._frozen_norm_modules: list[nn.Module] = [base_model.get_submodule(n) for n in frozen_norms]
        self.unloaded: str | None = None  # the call that took the base model out in place (unusable after)
        self.base_requires_grad: dict[str, bool] = {}  # the base's parameters' flags before wrapping (unload)
        self.autocast_adapter_dtype = True  # trainable tensors stay float32 on a bf16 / fp16 base

    # ------------------------------------------------------------------ inputs / outputs
    def stack(self, inputs: Inputs, finite_checked: bool = False) -> torch.Tensor:
        """Validate, apply the stems and stack: S tensors (B, c_m, ...) -> (S*B, C, ...), S the
        modalities present (all of them normally). ``finite_checked``: skip the NaN / inf check."""
        return self._prepare(inputs, None, finite_checked)[1]

    def _prepare(
        self, inputs: Inputs, presence: Presence | None, finite_checked: bool = False
    ) -> tuple[list[str], torch.Tensor, torch.Tensor | None]:
        """(present modalities, stacked input (S*B, C, ...), (S, B) presence mask or None)."""
        names, xs = gather(self.modalities, inputs)
        check_sizes(names, xs)
        stems: Any = self.stems  # {modality: ModalityStem}
        check_stem_inputs(stems, names, xs, positional=not isinstance(inputs, Mapping))  # before any work
        mask = self._mask(names, xs, presence, finite_checked)
        xs = cast_inputs(names, xs, input_dtype(self))  # floating, the stems' / model's dtype
        if mask is not None:  # absent samples enter as zeros (a NaN stand-in must not reach the model)
            xs = [torch.where(mask[i].view(-1, *([1] * (x.dim() - 1))), x, 0) for i, x in enumerate(xs)]
        x = torch.cat([stems[m].map_checked(x) for m, x in zip(names, xs)], 0)  # (S*B, C, ...) modality-major
        x = x if self._compute_dtype is None else x.to(self._compute_dtype)
        if self._needs_input_grads() and not x.requires_grad:
            x.requires_grad_(True)  # reentrant checkpointing passes gradients only to inputs that need them
        return names, x, mask

    def _needs_input_grads(self) -> bool:
        """True while training under the host's own gradient checkpointing (Hugging Face's
        ``is_gradient_checkpointing``, timm's ``grad_checkpointing``), which may be reentrant."""
        if not (self.training and torch.is_grad_enabled()):
            return False
        base = self.base_model
        for attr in ("is_activation_checkpointing", "is_gradient_checkpointing", "grad_checkpointing"):
            if hasattr(type(base), attr) or attr in vars(base):  # the first the host has (no deprecated one)
                return bool(getattr(base, attr))
        return False

    def _mask(
        self, names: Sequence[str], xs: Sequence[torch.Tensor], presence: Presence | None, finite_checked: bool
    ) -> torch.Tensor | None:
        """The (S, B) presence mask of a forward (the one place it is computed; None: all present)."""
        return masked_presence("off" if finite_checked else self.nonfinite, names, xs, presence, checked=finite_checked)

    def presence_mask(self, inputs: Inputs, presence: Presence | None = None) -> torch.Tensor | None:
        """The (S, B) bool presence mask a forward on ``inputs`` would use, over the modalities
        given (model order): ``presence`` combined with the non-finite check of
        :meth:`set_nonfinite`; None when every sample has every given modality. Pass it back as
        ``forward(inputs, presence=mask, finite_checked=True)`` so the check is not run twice."""
        names, xs = gather(self.modalities, inputs)
        return self._mask(names, xs, presence, False)

    def set_nonfinite(self, action: NonFiniteAction) -> None:
        """What a NaN / inf in an input does: ``"error"`` (default: raise naming the modality),
        ``"absent"`` (that sample's modality counts as missing) or ``"off"`` (no check, no host
        sync: the data pipeline checks, e.g. on the CPU)."""
        if action not in ("error", "absent", "off"):
            raise MmpeftValueError(f"nonfinite must be 'error', 'absent' or 'off', got {action!r}")
        self.nonfinite = action

    def split(self, out: Any, as_dict: bool = True, names: Sequence[str] | None = None) -> Any:
        """Split every tensor of ``out`` (dim 0 = S*B) into one part per modality of ``names``
        (default: all modalities)."""
        return split_output(out, tuple(self.modalities if names is None else names), as_dict)

    def forward(
        self,
        inputs: Inputs | None = None,
        *args: Any,
        pixel_values: Inputs | None = None,
        labels: Any = None,
        presence: Presence | None = None,
        finite_checked: bool = False,
        **kwargs: Any,
    ) -> Any:
        """inputs: {modality: (B, c_m, H, W)} or a sequence in modality order, given by position
        or by the keyword of the base model's own first parameter (``pixel_values=`` for a
        Hugging Face model); other arguments go to the base model unchanged. ``pixel_values``
        and ``labels`` are named so that Hugging Face's ``Trainer`` (which reads this signature)
        keeps those columns and finds the labels; they go on as any keyword.

        Any non-empty subset of the modalities may be given (left out of the dict, or None in the
        sequence): only those run, mixed as the fusion rules define for missing modalities
        (docs/missing_modalities.md). ``presence``: optional per-sample mask ``{modality: (B,)
        bool}`` (training with modality dropout); an absent sample's update is zero, it neither
        gives nor receives mixing, and its output is not meaningful. ``finite_checked``: the
        inputs were already checked for NaN / inf (``presence`` from :meth:`presence_mask`).

        Returns ``{modality: output}`` for the present modalities with a dict input, else a list
        in modality order (present ones only); each output of the base model's own type (a
        Hugging Face ``ModelOutput`` stays one, with its fields). ``labels=`` to a Hugging Face
        ``*ForImageClassification`` model gives each modality's output the loss of its own
        logits, and a dict input a :class:`~mmpeft.runtime.labels.MultimodalOutput` with the
        mean of those losses as ``"loss"`` (:mod:`mmpeft.runtime.labels`; other heads are
        refused naming the way).
        """
        named = {k: v for k, v in (("pixel_values", pixel_values), ("labels", labels)) if v is not None}
        return self.call("forward", inputs, *args, presence=presence, finite_checked=finite_checked, **named, **kwargs)

    @property
    def accepts_loss_kwargs(self) -> bool:
        """Read by Hugging Face's ``Trainer``: True when ``num_items_in_batch=`` reaches the loss
        (a Hugging Face ``*ForImageClassification`` head, whose loss mmpeft computes per modality),
        so the Trainer leaves the accumulation scaling to it; False otherwise (the keyword would
        reach a base model that takes no loss arguments)."""
        return computes_losses(self.base_model)

    def activation_checkpointing_enable(
        self,
        activation_checkpointing_kwargs: dict[str, Any] | None = None,
        every_n_layers: int = 1,
        offload: bool = False,
    ) -> None:
        """What Hugging Face's ``Trainer`` calls for ``activation_checkpointing=True`` (peft passes
        it to the base model too): the Hugging Face base model's own checkpointing, which trains
        every LoRA tensor (the stacked input requires grad while the host checkpoints). Another
        base model is a TypeError naming mmpeft's own, :meth:`set_grad_checkpointing`."""
        _merge.check_usable(self)
        enable = getattr(self.base_model, "activation_checkpointing_enable", None)
        if enable is None:
            raise MmpeftTypeError(
                f"{type(self.base_model).__name__} has no activation_checkpointing_enable (a Hugging Face model's): "
                "checkpoint its blocks with wrapped.set_grad_checkpointing() and leave activation_checkpointing off"
            )
        enable(
            activation_checkpointing_kwargs=activation_checkpointing_kwargs,
            every_n_layers=every_n_layers,
            offload=offload,
        )

    def call(
        self,
        method: str,
        inputs: Inputs | None,
        *args: Any,
        presence: Presence | None = None,
        finite_checked: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Run ``base_model.<method>`` (e.g. ``"forward_features"``) on the stacked inputs;
        ``adapter_names=[set per sample]``: :mod:`mmpeft.model.mixed_batch`."""
        _merge.check_usable(self)
        names = kwargs.pop("adapter_names", None)
        if names is not None:  # one adapter set per sample, as peft
            kwargs.update(presence=presence, finite_checked=finite_checked)
            return mixed_batch_call(self, method, inputs, args, kwargs, names)
        fn = getattr(self.base_model, method)
        labels = take_labels(self.base_model, fn, kwargs)  # a Hugging Face head's: a loss per modality
        if method == "forward":  # called as a module: hooks the user put on the base model run
            fn = module_call(self.base_model, fn)
        if inputs is None:  # given by the keyword of the method's first parameter
            fn, inputs = inputs_by_keyword(fn, kwargs)
        names, x, mask = self._prepare(inputs, presence, finite_checked)
        check_presence(labels, mask, names)  # before the run
        # the layers check their inputs' leading size against the batch; a subset of the
        # modalities or a presence mask changes how they mix
        state: dict[str, Any] = {"batch_size": x.shape[0] // len(names), "input_size": tuple(x.shape[2:])}
        if len(names) != len(self.modalities) or mask is not None:
            state.update(present=tuple(self.modalities.index(n) for n in names), presence=mask)
        with layer_state(self, **state):
            out = self._run(fn, x, *args, **kwargs)
        out = self.split(out, as_dict=isinstance(inputs, Mapping), names=names)
        return as_output(self.base_model, out) if labels is None else with_losses(self.base_model, out, labels)

    def _run(self, fn: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not self.call_check_pending or torch.compiler.is_compiling():
            return fn(x, *args, **kwargs)
        out = checked_call(list(self.layers()), fn, x, *args, **kwargs)  # mmpeft.runtime.verify
        self.call_check_pending = False
        return out

    def skip_call_check(self) -> None:
        """Do not verify on the first forward that every layer runs (e.g. a wrapped module is
        used by another method of the base model than the one called)."""
        self.call_check_pending = False

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        """nn.Module's ``_apply`` (``.to()``, ``.bfloat16()``, ``.half()``, ``.cuda()``), then the
        compute dtype and the trainable tensors made to agree with the frozen model's new dtype
        (:mod:`mmpeft.model.precision`: float32 masters on a bf16 / fp16 base by default)."""
        _merge.check_usable(self)  # unloaded: the base model is the caller's now, not moved through here
        result = super()._apply(fn, recurse)
        if recurse:
            sync_dtype(self)
            for _, layer in self.layers():  # merged copies from the moved tensors, whatever objects now hold them
                if layer.merged:
                    layer.merge()
        return result

    @property
    def frozen_norms(self) -> tuple[str, ...]:
        """Names of the running-statistics norms kept in eval mode, where they sit now."""
        where = {id(m): n for n, m in self.base_model.named_modules()}
        return tuple(where[id(m)] for m in self._frozen_norm_modules if id(m) in where)

    def train(self, mode: bool = True) -> MultimodalModel:
        """nn.Module's ``train``, keeping :attr:`frozen_norms` in eval mode."""
        super().train(mode)
        for norm in self._frozen_norm_modules:
            norm.eval()
        return self

    # ------------------------------------------------------------------ parameters
    def layers(self) -> Iterator[tuple[str, MultimodalLayer]]:
        """(name, layer) of every multimodal layer."""
        _merge.check_usable(self)
        return multimodal_layers(self)

    def modules_to_save(self) -> Iterator[tuple[str, ModuleToSave]]:
        """(name, wrapper) of every module that trains in full (``modules_to_save``)."""
        _merge.check_usable(self)
        return ((n, m) for n, m in self.named_modules() if isinstance(m, ModuleToSave))

    def _own_modules(self) -> Iterator[tuple[str, nn.Module]]:
        """(qualified name, module) of what mmpeft added: the stems, every child of a multimodal
        layer except its ``base_layer``, the trained copies of the modules to save. The one
        structural source of trainables."""
        _merge.check_usable(self)
        yield "stems", self.stems
        for name, layer in self.layers():
            for child_name, child in layer.named_children():
                if child_name != "base_layer":
                    yield f"{name}.{child_name}", child
        for name, wrapper in self.modules_to_save():
            yield f"{name}.trained_module", wrapper.trained_module

    def trainable_names(self) -> set[str]:
        """State-dict keys of the tensors mmpeft added, found structurally (:meth:`_own_modules`;
        names are not consulted, so a base submodule called ``adapter_x`` stays frozen and unsaved)."""
        return {f"{prefix}.{k}" for prefix, module in self._own_modules() for k in module.state_dict()}

    def trainable_tensors(self) -> list[torch.Tensor]:
        """The parameters and buffers mmpeft added (multimodal layers without their base, stems)."""
        return [t for _, module in self._own_modules() for t in (*module.parameters(), *module.buffers())]

    def trainable_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """Only the tensors mmpeft added (LoRA, adapters, fusion, stems, modules to save), detached;
        of the set ``adapter_name`` (default: the active one) without switching to it, under the
        keys it has when active (peft's ``get_peft_model_state_dict(model, adapter_name=)``)."""
        _merge.check_usable(self)
        with self._using(self._known(adapter_name or self.active_adapter)):
            own = self.trainable_names()
            return {k: v.detach() for k, v in self.state_dict().items() if k in own}

    def unsaved_trainables(self) -> list[str]:
        """Names of parameters that require grad but would not be saved (e.g. a head unfrozen by
        hand instead of through ``modules_to_save``)."""
        own = self.trainable_names()
        return [n for n, p in self.named_parameters() if p.requires_grad and n not in own]

    def load_trainable_state_dict(
        self, state: Mapping[str, torch.Tensor], strict: bool = True, adapter_name: str | None = None
    ) -> None:
        """Load tensors saved by :meth:`trainable_state_dict` (in place: the same parameter objects);
        mismatches raise naming the keys. ``adapter_name``: into that set, without switching to it
        (peft's ``set_peft_model_state_dict(model, state, adapter_name=)``)."""
        _merge.check_usable(self)
        name = self._known(adapter_name or self.active_adapter)
        if name != self.active_adapter:
            with self._using(name):
                return self.load_trainable_state_dict(state, strict)
        own = self.trainable_state_dict()
        problems = state_mismatches(own, state, strict)
        if problems:
            raise MmpeftValueError("cannot load multimodal weights: " + " | ".join(problems))
        merged = _merge.unmerge_layers(self)
        self.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        for name in merged:  # merged weights follow the new LoRA weights
            layer: Any = self.get_submodule(name)
            layer.merge()

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters), as peft's method of that name."""
        _merge.check_usable(self)
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        """peft-style one-line summary of trainable versus all parameters."""
        _merge.check_usable(self)
        print(trainable_summary(self))

    # ------------------------------------------------------------------ execution
    def set_execution(self, execution: Execution) -> None:
        """``"batched"`` (default) or ``"loop"`` (every layer per modality: the reference path)."""
        _merge.check_usable(self)
        set_execution(self, execution)

    @contextlib.contextmanager
    def only_modality(self, modality: str) -> Iterator[None]:
        """Within the block the layers see a batch of ``modality`` only (non-mixing layers)."""
        _merge.check_usable(self)
        with only_modality(self, modality):
            yield

    def status(self) -> dict[str, Any]:
        """What state the model is in, in one place: mode, adapters on or off, merged layers,
        execution per layer kind, the NaN action, the compute dtype, block features, locked
        norms, modules to save, and whether the first-forward check is still pending; after an
        in-place unload only ``{"unloaded": the call}`` (every other accessor refuses)."""
        if self.unloaded is not None:
            return {"unloaded": self.unloaded}
        layers = list(self.layers())
        return {
            "training": self.training,
            "adapters_enabled": self.adapters_enabled,
            "merged": [n for n, layer in layers if layer.merged],
            "execution": sorted({layer.execution for _, layer in layers}),
            "nonfinite": self.nonfinite,
            "compute_dtype": None if self.compute_dtype is None else str(self.compute_dtype),
            **self.block_features(),
            "frozen_norms": list(self.frozen_norms),
            "modules_to_save": [n for n, _ in self.modules_to_save()],
            "call_check_pending": self.call_check_pending,
            **self.adapter_status(),  # the named sets (mmpeft.model.adapter_sets)
            "unloaded": self.unloaded,
        }

    # ------------------------------------------------------------------ adapters
    def set_adapters_enabled(self, enabled: bool) -> None:
        """Turn every multimodal layer and module to save on (True) or off (False: the model
        computes the frozen model's function on the stems' outputs)."""
        _merge.check_usable(self)
        if not isinstance(enabled, bool):
            raise MmpeftTypeError(f"enabled must be a bool, got {enabled!r}")
        _merge.set_enabled(self, enabled)
        self.adapters_enabled = enabled

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Within the block the model computes the frozen model (adapters and modules to save off)."""
        before = self.adapters_enabled
        self.set_adapters_enabled(False)
        try:
            yield
        finally:
            self.set_adapters_enabled(before)

    def merge_adapters(self) -> list[str]:
        """Fold every LoRA update into per-modality copies of its frozen weight (:mod:`mmpeft.model.merge`);
        raises naming each layer that cannot merge and why. Returns the merged layers' names. Merged
        weights follow every later change torch tracks of the tensors they come from (loading,
        in-place edits, dtype / device moves): merged again at load or at the next forward. An
        edit through ``param.data`` (or inside ``torch.compile``) is not seen: merging is a snapshot
        for it, refreshed by calling this again (docs/concepts.md, "Merging")."""
        _merge.check_usable(self)
        return _merge.merge_layers(self)

    def unmerge_adapters(self) -> list[str]:
        """Undo :meth:`merge_adapters` (the frozen weights were never written). Returns the names."""
        _merge.check_usable(self)
        return _merge.unmerge_layers(self)

    def merge_and_unload(self, modality: str, inplace: bool = False) -> nn.Module:
        """A plain model of the base class computing this model's output for ``modality`` (on the
        input after the modality's stem), with no mmpeft module: every update merged into the
        weights. A copy unless ``inplace`` (the wrapper then refuses every use). Raises naming what
        cannot merge."""
        return _merge.merge_and_unload(self, modality, inplace)

    def unload(self) -> nn.Module:
        """peft's ``unload()``: the base model back with every adapter dropped and nothing merged:
        the module objects it held before wrapping, with their parameters' ``requires_grad`` as
        they were. In place: the wrapper refuses every use afterwards."""
        return _merge.unload(self)
