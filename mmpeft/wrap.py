"""``wrap_multimodal``: patch a ViT for N modalities with shared frozen weights."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Sequence, Union

import torch
from torch import nn

from .config import AdapterConfig, LoRAConfig, MultimodalConfig, RuleConfig, StemConfig
from .layers import (
    ACTIVATIONS,
    Execution,
    MultimodalAdapter,
    MultimodalLayer,
    MultimodalLoRA,
    multimodal_layers,
    only_modality,
    present_modalities,
    set_execution,
)
from .presence import NonFiniteAction, Presence, masked_presence
from .stems import ModalityStem
from .prepare import check_targets_callable, prepare_backbone
from .targets import detect_family, match_targets, preset_rules
from .verify import cast_inputs, check_modalities, checked_call, input_dtype, install_call_check

__all__ = [
    "MultimodalModel", "wrap_multimodal", "build_config", "TRAINABLE_PREFIXES", "is_trainable_name", "state_mismatches",
    "resolve_dtype",
]

Inputs = Union[Mapping[str, torch.Tensor], Sequence[torch.Tensor]]
TRAINABLE_PREFIXES = ("lora_", "adapter_", "stem_")


def state_mismatches(
    own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], strict: bool = True
) -> list[str]:
    """Readable problems between a model's tensors ``own`` and a saved ``state``: wrong shapes
    (always), missing and unexpected keys (when ``strict``), each naming the keys."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    problems = []
    if shape:
        problems.append(
            "shape mismatch: "
            + "; ".join(f"{k}: saved {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in shape[:10])
            + (f" (+{len(shape) - 10} more)" if len(shape) > 10 else "")
        )
    if strict and missing:
        problems.append(f"missing {len(missing)} keys, e.g. {missing[:5]}")
    if strict and unexpected:
        problems.append(f"unexpected {len(unexpected)} keys, e.g. {unexpected[:5]}")
    return problems


DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}  # fmt: skip


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``"bf16"`` / ``"fp16"`` / ``"fp32"`` (or a torch floating dtype, or None) -> the dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
            raise ValueError(f"base dtype must be a floating dtype, got {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)} or a torch dtype")
    return DTYPES[dtype]


def is_trainable_name(name: str) -> bool:
    """True when a parameter name looks like a mmpeft module's (a segment starts with a prefix):
    for display and grouping only; what trains and is saved is found structurally
    (:meth:`MultimodalModel.trainable_names`)."""
    return any(part.startswith(TRAINABLE_PREFIXES) for part in name.split("."))


class MultimodalModel(nn.Module):
    """A frozen model patched with multimodal layers; one input and one output per modality.

    ``forward(inputs)`` stacks the modalities modality-major on the batch axis, runs the frozen
    model once on ``(M*B, ...)`` and splits every tensor of the output back into M parts.

    Attributes:
        base_model: the patched model (its own weights frozen).
        config: the :class:`MultimodalConfig` it was built from.
        stems: per-modality input stems (``stems[modality]``).
    """

    def __init__(self, base_model: nn.Module, config: MultimodalConfig, in_channels: int | None) -> None:
        super().__init__()
        self.base_model = base_model
        self.config = config
        self.modalities: tuple[str, ...] = tuple(config.modalities)
        self.in_channels = in_channels
        self.stems = nn.ModuleDict({m: ModalityStem(m, config.stem(m), in_channels) for m in self.modalities})
        self._compute_dtype: torch.dtype | None = None
        #: NaN / inf in an input: "error" (default), "absent" (that sample's modality is missing)
        #: or "off" (no check: no host sync, e.g. when the data pipeline checks on the CPU).
        self.nonfinite: NonFiniteAction = "error"

    # ------------------------------------------------------------------ inputs / outputs
    def _gather(self, inputs: Inputs) -> tuple[list[str], list[torch.Tensor]]:
        """The present modalities (model order) and their tensors; absent ones are left out
        of a dict or passed as None in a sequence. At least one must be present."""
        if isinstance(inputs, torch.Tensor):
            raise TypeError(
                f"pass one tensor per modality {self.modalities} (a dict or a sequence), not a single tensor"
            )
        if isinstance(inputs, Mapping):
            unknown = [k for k in inputs if k not in self.modalities]
            if unknown:
                raise KeyError(f"unknown modalities {unknown}; this model was built for {list(self.modalities)}")
            pairs = [(m, inputs[m]) for m in self.modalities if inputs.get(m) is not None]
        else:
            xs = list(inputs)
            if len(xs) != len(self.modalities):
                raise ValueError(
                    f"expected {len(self.modalities)} inputs {list(self.modalities)} (None for a missing one), got {len(xs)}"
                )
            pairs = [(m, x) for m, x in zip(self.modalities, xs) if x is not None]
        if not pairs:
            raise ValueError(f"no modality given; pass at least one of {list(self.modalities)}")
        return [m for m, _ in pairs], [x for _, x in pairs]

    def stack(self, inputs: Inputs) -> torch.Tensor:
        """Validate, apply the stems and stack: S tensors (B, c_m, ...) -> (S*B, C, ...), S the
        modalities present (all of them normally)."""
        return self._prepare(inputs, None)[1]

    def _prepare(
        self, inputs: Inputs, presence: Presence | None, finite_checked: bool = False
    ) -> tuple[list[str], torch.Tensor, torch.Tensor | None]:
        """(present modalities, stacked input (S*B, C, ...), (S, B) presence mask or None)."""
        names, xs = self._gather(inputs)
        for m, x in zip(names, xs):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"input of modality {m!r} is a {type(x).__name__}, not a tensor")
        ref_m, ref = names[0], xs[0]
        for m, x in zip(names, xs):
            if x.dim() != ref.dim() or x.shape[0] != ref.shape[0] or x.shape[2:] != ref.shape[2:]:
                raise ValueError(
                    "all modalities need the same batch and spatial sizes: "
                    + ", ".join(f"{k}={tuple(v.shape)}" for k, v in zip(names, xs))
                    + f" ({m!r} differs from {ref_m!r})"
                )
        mask = self._mask(names, xs, presence, finite_checked)
        xs = cast_inputs(names, xs, input_dtype(self))  # floating, the stems' / model's dtype
        if mask is not None:  # absent samples enter as zeros (a NaN stand-in must not reach the model)
            xs = [torch.where(mask[i].view(-1, *([1] * (x.dim() - 1))), x, 0) for i, x in enumerate(xs)]
        x = torch.cat([self.stems[m](x) for m, x in zip(names, xs)], 0)  # (S*B, C, ...) modality-major
        return names, (x if self._compute_dtype is None else x.to(self._compute_dtype)), mask

    def _mask(
        self, names: Sequence[str], xs: Sequence[torch.Tensor], presence: Presence | None, finite_checked: bool
    ) -> torch.Tensor | None:
        """The (S, B) presence mask of a forward (the one place it is computed; None: all present)."""
        return masked_presence("off" if finite_checked else self.nonfinite, names, xs, presence)

    def presence_mask(self, inputs: Inputs, presence: Presence | None = None) -> torch.Tensor | None:
        """The (S, B) bool presence mask a forward on ``inputs`` would use, over the modalities
        given (model order): ``presence`` combined with the non-finite check of
        :meth:`set_nonfinite`; None when every sample has every given modality. Pass it back as
        ``forward(inputs, presence=mask, finite_checked=True)`` so the check is not run twice."""
        names, xs = self._gather(inputs)
        return self._mask(names, xs, presence, False)

    def set_nonfinite(self, action: NonFiniteAction) -> None:
        """What a NaN / inf in an input does: ``"error"`` (default: raise naming the modality),
        ``"absent"`` (that sample's modality counts as missing) or ``"off"`` (no check, no host
        sync: the data pipeline checks, e.g. on the CPU)."""
        if action not in ("error", "absent", "off"):
            raise ValueError(f"nonfinite must be 'error', 'absent' or 'off', got {action!r}")
        self.nonfinite = action

    def split(self, out: Any, as_dict: bool = True, names: Sequence[str] | None = None) -> Any:
        """Split every tensor of ``out`` (dim 0 = S*B) into one part per modality of ``names``
        (default: all modalities)."""
        names = tuple(self.modalities if names is None else names)
        m = len(names)
        if isinstance(out, torch.Tensor):
            if out.dim() == 0 or out.shape[0] % m != 0:
                raise ValueError(f"cannot split an output of shape {tuple(out.shape)} into {m} modalities")
            parts = out.chunk(m, 0)
            return dict(zip(names, parts)) if as_dict else list(parts)
        if isinstance(out, Mapping):
            per = {k: self.split(v, False, names) for k, v in out.items()}
            res = [{k: v[i] for k, v in per.items()} for i in range(m)]
            return dict(zip(names, res)) if as_dict else res
        if isinstance(out, (list, tuple)):
            per_t = [self.split(v, False, names) for v in out]
            res_t = [type(out)(v[i] for v in per_t) for i in range(m)]
            return dict(zip(names, res_t)) if as_dict else res_t
        raise TypeError(f"cannot split an output of type {type(out).__name__}")

    def forward(
        self, inputs: Inputs, *args: Any, presence: Presence | None = None, finite_checked: bool = False, **kwargs: Any
    ) -> Any:
        """inputs: {modality: (B, c_m, H, W)} or a sequence in modality order.

        Any non-empty subset of the modalities may be given (left out of the dict, or None in the
        sequence): only those run, mixed as the fusion rules define for missing modalities
        (docs/missing_modalities.md). ``presence``: optional per-sample mask ``{modality: (B,)
        bool}`` (training with modality dropout); an absent sample's update is zero, it neither
        gives nor receives mixing, and its output is not meaningful.

        ``finite_checked``: the inputs were already checked for NaN / inf (e.g. ``presence`` comes
        from :meth:`presence_mask`), so the check is skipped.

        Returns ``{modality: output}`` for the present modalities with a dict input, else a list
        in modality order (present ones only).
        """
        return self.call("forward", inputs, *args, presence=presence, finite_checked=finite_checked, **kwargs)

    def call(
        self, method: str, inputs: Inputs, *args: Any, presence: Presence | None = None,
        finite_checked: bool = False, **kwargs: Any,
    ) -> Any:  # fmt: skip
        """Run ``base_model.<method>`` (e.g. ``"forward_features"``) on the stacked inputs."""
        names, x, mask = self._prepare(inputs, presence, finite_checked)
        fn = getattr(self.base_model, method)
        if len(names) == len(self.modalities) and mask is None:  # every modality of every sample
            out = checked_call(self, fn, x, *args, **kwargs)  # mmpeft.verify
        else:
            with present_modalities(self, [self.modalities.index(n) for n in names], mask):
                out = checked_call(self, fn, x, *args, **kwargs)
        return self.split(out, as_dict=isinstance(inputs, Mapping), names=names)

    # ------------------------------------------------------------------ parameters
    def layers(self) -> Iterator[tuple[str, MultimodalLayer]]:
        """(name, layer) of every multimodal layer."""
        return multimodal_layers(self)

    def _own_modules(self) -> Iterator[tuple[str, nn.Module]]:
        """(qualified name, module) of what mmpeft added: the stems and every child of a
        multimodal layer except its ``base_layer``. The one structural source of trainables."""
        yield "stems", self.stems
        for name, layer in self.layers():
            for child_name, child in layer.named_children():
                if child_name != "base_layer":
                    yield f"{name}.{child_name}", child

    def trainable_names(self) -> set[str]:
        """State-dict keys of the tensors mmpeft added, found structurally (:meth:`_own_modules`;
        names are not consulted, so a base submodule called ``adapter_x`` stays frozen and unsaved)."""
        return {f"{prefix}.{k}" for prefix, module in self._own_modules() for k in module.state_dict()}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the tensors mmpeft added (LoRA, adapters, fusion, stems), detached."""
        own = self.trainable_names()
        return {k: v.detach() for k, v in self.state_dict().items() if k in own}

    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Load tensors saved by :meth:`trainable_state_dict`; mismatches raise naming the keys."""
        own = self.trainable_state_dict()
        problems = state_mismatches(own, state, strict)
        if problems:
            raise ValueError("cannot load multimodal weights: " + " | ".join(problems))
        self.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)

    def print_trainable_parameters(self) -> None:
        """peft-style one-line summary of trainable versus all parameters."""
        from .params import trainable_summary

        print(trainable_summary(self))

    # ------------------------------------------------------------------ block features
    def enable_efficient_attention(self, queries: str = "auto", rel_pos: str = "mask") -> list[str]:
        """Run SAM-style blocks padding-free with fused attention (:mod:`mmpeft.attention`; ``queries``
        and ``rel_pos`` as there); returns the names of the blocks affected."""
        from .attention import enable_efficient_attention

        return enable_efficient_attention(self.base_model, queries, rel_pos)

    def disable_efficient_attention(self) -> int:
        """The stock blocks again; returns how many were changed."""
        from .attention import disable_efficient_attention

        return disable_efficient_attention(self.base_model)

    def set_grad_checkpointing(self, enable: bool = True, pattern: str | None = None) -> list[str]:
        """Recompute the frozen blocks' activations in backward (:mod:`mmpeft.checkpointing`).

        ``pattern``: a regex over module names of the base model (default: ``blocks.<i>``).
        Returns the names of the modules checkpointed (empty when disabling).
        """
        from .checkpointing import DEFAULT_PATTERN, disable_gradient_checkpointing, enable_gradient_checkpointing

        if not enable:
            disable_gradient_checkpointing(self.base_model)
            return []
        return enable_gradient_checkpointing(self.base_model, pattern or DEFAULT_PATTERN)

    def compile_blocks(self, **compile_options: Any) -> list[str]:
        """Regional compilation: ``torch.compile`` each repeated block of the frozen model in place.

        Every module in a ``ModuleList`` or ``Sequential`` of two or more modules of one class (a ViT's ``blocks``)
        is compiled with ``nn.Module.compile(**compile_options)``; blocks of one kind share their
        compiled code, so compile time is that of one or two blocks, not of the whole model.
        Returns the names of the compiled blocks. The whole model can instead be compiled with
        ``torch.compile(model)``; both compute the same function as eager (tests).
        """
        names: list[str] = []
        for name, mod in self.base_model.named_modules():
            if any(name.startswith(n + ".") for n in names):
                continue  # inside an already compiled block
            if isinstance(mod, (nn.ModuleList, nn.Sequential)) and len(mod) > 1 and len({type(b) for b in mod}) == 1:
                for i, block in enumerate(mod):
                    block.compile(**compile_options)
                    names.append(f"{name}.{i}" if name else str(i))
        if not names:
            raise ValueError(f"{type(self.base_model).__name__} has no list of repeated blocks to compile")
        return names

    # ------------------------------------------------------------------ precision
    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The dtype inputs are cast to before the frozen model (None: left as given)."""
        return self._compute_dtype

    def set_base_dtype(self, dtype: torch.dtype | str | None) -> None:
        """Keep the frozen model's floating tensors in ``dtype`` (e.g. ``torch.bfloat16``).

        Trainable tensors (multimodal layers, stems) stay float32: they are the master copies
        the optimizer updates, cast to the compute dtype inside the forward (their gradients
        arrive in float32). Inputs are cast to ``dtype`` after the stems, so the frozen model
        runs in ``dtype`` with or without autocast, and autocast finds nothing to re-cast.
        ``None`` or float32 restores float32 everywhere.
        """
        dt = resolve_dtype(dtype)
        own = {id(t) for t in self.trainable_tensors()}
        for t in list(self.base_model.parameters()) + list(self.base_model.buffers()):
            if t.is_floating_point():
                t.data = t.data.to(torch.float32 if id(t) in own else dt or torch.float32)
        self._compute_dtype = None if dt in (None, torch.float32) else dt

    def trainable_tensors(self) -> list[torch.Tensor]:
        """The parameters and buffers mmpeft added (multimodal layers without their base, stems)."""
        return [t for _, module in self._own_modules() for t in (*module.parameters(), *module.buffers())]

    # ------------------------------------------------------------------ execution
    def set_execution(self, execution: Execution) -> None:
        """``"batched"`` (default) or ``"loop"`` (every layer per modality: the reference path)."""
        set_execution(self, execution)

    @contextlib.contextmanager
    def only_modality(self, modality: str) -> Iterator[None]:
        """Within the block the layers see a batch of ``modality`` only (non-mixing layers)."""
        with only_modality(self, modality):
            yield

    def save_pretrained(self, directory: str) -> None:
        """Write the trainable tensors (safetensors) and the config (JSON) to ``directory``."""
        from .io import save_multimodal

        save_multimodal(self, directory)


# ---------------------------------------------------------------------- building


def _infer_in_channels(model: nn.Module) -> int | None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and ("patch_embed" in name or name.endswith("proj")):
            return module.in_channels
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return None


def _slice_ranges(rule: LoRAConfig, layer: nn.Linear, name: str) -> dict[str, tuple[int, int]] | None:
    if rule.slices is None:
        return None
    n = len(rule.split)
    if layer.out_features % n != 0:
        raise ValueError(f"{name}: {layer.out_features} outputs cannot be split into {rule.split}")
    step = layer.out_features // n
    return {s: (rule.split.index(s) * step, (rule.split.index(s) + 1) * step) for s in rule.slices}


def _adapter_dims(module: nn.Module, placement: str, name: str) -> tuple[int, int]:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"cannot infer the channels of {name} ({type(module).__name__}): it holds no nn.Linear")
    out = linears[-1].out_features
    return (linears[0].in_features if placement == "beside" else out), out


def _build_layer(rule: RuleConfig, module: nn.Module, name: str, modalities: Sequence[str]) -> MultimodalLayer:
    if isinstance(rule, LoRAConfig):
        assert isinstance(module, nn.Linear)
        return MultimodalLoRA(
            module, modalities, rank=rule.rank, alpha=rule.alpha, dropout=rule.dropout,
            slices=_slice_ranges(rule, module, name), fusion=rule.fusion, lambda_init=rule.lambda_init,
        )  # fmt: skip
    c_in, c_out = _adapter_dims(module, rule.placement, name)
    return MultimodalAdapter(
        module, modalities, in_features=c_in, out_features=c_out, hidden=max(1, int(c_in * rule.ratio)),
        placement=rule.placement, activation=ACTIVATIONS[rule.activation], bias=rule.bias,
        dropout=rule.dropout, scale=rule.scale, init=rule.init, fusion=rule.fusion, lambda_init=rule.lambda_init,
    )  # fmt: skip


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_rules(model: nn.Module, config: MultimodalConfig) -> list[str]:
    """Freeze ``model`` and swap the targeted modules in place; returns the wrapped names."""
    if isinstance(model, MultimodalModel) or any(True for _ in multimodal_layers(model)):
        raise ValueError("this model is already wrapped by mmpeft; wrap the original model once")
    owner: dict[str, int] = {}
    for i, rule in enumerate(config.rules):
        want = nn.Linear if isinstance(rule, LoRAConfig) else None
        for n in match_targets(model, rule.targets, want):
            if n in owner:
                raise ValueError(f"module {n} is targeted by rule {owner[n]} and rule {i}; each module takes one rule")
            owner[n] = i
    check_targets_callable(model, list(owner))  # nothing inside an nn.MultiheadAttention
    model.requires_grad_(False)
    # deepest first, so a parent wrapper receives its already patched children
    for n in sorted(owner, key=lambda s: s.count("."), reverse=True):
        rule = config.rules[owner[n]]
        _set_submodule(model, n, _build_layer(rule, model.get_submodule(n), n, config.modalities))
    return sorted(owner)


def build_config(
    model: nn.Module,
    modalities: Sequence[str] = ("optical", "dsm"),
    method: str = "lora",
    *,
    preset: str | None = None,
    targets: str | list[str] | None = None,
    **options: Any,
) -> MultimodalConfig:
    """The :class:`MultimodalConfig` ``wrap_multimodal`` would use (see its arguments)."""
    modalities = check_modalities(modalities)  # a sequence of distinct names, never a str
    stems = options.pop("stems", None) or {}
    in_channels = options.pop("in_channels", None)
    if method not in ("lora", "adapter"):
        raise ValueError(f"method must be 'lora' or 'adapter', got {method!r}")
    if targets is not None:
        if preset is not None:
            raise ValueError("pass either preset= or targets=, not both")
        rules: list[RuleConfig] = [(LoRAConfig if method == "lora" else AdapterConfig)(targets=targets)]
    else:
        preset = preset or ("mmlora" if method == "lora" else "mmadapter")
        rules = preset_rules(preset, detect_family(model))
    rules = [_override(r, options, explicit=targets is not None) for r in rules]
    unused = set(options) - _OPTION_NAMES
    if unused:
        raise TypeError(f"unknown options {sorted(unused)}; known: {sorted(_OPTION_NAMES)}")
    stem_cfgs = {k: _stem(v) for k, v in stems.items()}
    return MultimodalConfig(list(modalities), rules, stem_cfgs, in_channels, preset)


_LORA_OPTS = {"rank", "alpha", "dropout", "slices"}
_ADAPTER_OPTS = {"ratio", "activation", "bias", "dropout", "scale", "init", "placement"}
_OPTION_NAMES = _LORA_OPTS | _ADAPTER_OPTS | {"fusion", "lambda_init"}


def _override(rule: RuleConfig, options: dict[str, Any], explicit: bool) -> RuleConfig:
    names = _LORA_OPTS if isinstance(rule, LoRAConfig) else _ADAPTER_OPTS
    updates = {k: v for k, v in options.items() if k in names and v is not None}
    if not explicit:  # presets fix where adapters go and which outputs LoRA updates
        fixed = [k for k in ("placement", "slices") if k in updates and updates[k] != getattr(rule, k, None)]
        if fixed:
            raise ValueError(
                f"the preset fixes {fixed} (a rule on {rule.targets!r} has "
                + ", ".join(f"{k}={getattr(rule, k, None)!r}" for k in fixed)
                + "); pass targets= to choose them yourself"
            )
        updates = {k: v for k, v in updates.items() if k not in ("placement", "slices")}
    # the fusion option sets the cross-modal rule of the mixing parts; "none" disables all mixing
    fusion = options.get("fusion")
    if fusion is not None and (explicit or rule.fusion != "none" or fusion == "none"):
        updates["fusion"] = fusion
    if options.get("lambda_init") is not None:
        updates["lambda_init"] = options["lambda_init"]
    data = {**rule.__dict__, **updates}
    return type(rule)(**data)


def _stem(v: Any) -> StemConfig:
    if isinstance(v, StemConfig):
        return v
    if isinstance(v, str):
        return StemConfig(kind=v)
    if isinstance(v, (tuple, list)):
        return StemConfig(kind=v[0], in_channels=v[1])
    if isinstance(v, Mapping):
        return StemConfig(**v)
    raise TypeError(f"cannot read a stem from {v!r}; use 'repeat', ('conv1x1', channels) or StemConfig")


def wrap_multimodal(
    model: nn.Module,
    modalities: Sequence[str] = ("optical", "dsm"),
    method: str = "lora",
    *,
    preset: str | None = None,
    targets: str | list[str] | None = None,
    config: MultimodalConfig | None = None,
    efficient_attention: bool | str = True,
    base_dtype: torch.dtype | str | None = None,
    **options: Any,
) -> MultimodalModel:
    """Freeze ``model`` and patch it for ``modalities`` with multimodal LoRA or adapters.

    Args:
        model: any ViT (segment-anything ``ImageEncoderViT``, timm ViTs, or your own).
        modalities: modality names, in the order they are stacked on the batch axis.
        method: ``"lora"`` or ``"adapter"``. Without ``targets`` the paper's placement is used
            (``preset`` "mmlora" / "mmadapter"), detected from the module names.
        preset: one of :data:`mmpeft.targets.PRESETS` ("mmlora", "mmadapter", "lora", "adapter",
            "mmadapter_authors", ...).
        targets: modules to patch instead of a preset: a list of names (suffix match) or a regex.
        config: a complete :class:`MultimodalConfig` (overrides everything else).
        efficient_attention: run SAM-style blocks (segment-anything, timm's SAM) without work on
            window padding and with fused attention (:mod:`mmpeft.attention`; same outputs).
            ``True`` chooses the attention calls per device at run time (``"auto"``); ``"real"``
            or ``"all"`` force one (see :func:`mmpeft.attention.enable_efficient_attention`).
            Other blocks are unaffected.
        base_dtype: keep the frozen weights in this dtype (``torch.bfloat16`` or ``"bf16"``):
            no per-step casts of frozen weights under autocast, half their memory. Inputs are
            cast to it; trainable tensors stay float32 (master copies; the optimizer and saved
            files see float32). See :meth:`MultimodalModel.set_base_dtype`.
        **options: ``rank``, ``alpha``, ``dropout``, ``slices`` (LoRA); ``ratio``, ``activation``,
            ``bias``, ``scale``, ``init``, ``placement`` (adapters); ``fusion`` ("scalar", "none",
            "matrix"), ``lambda_init``; ``stems`` ({modality: "repeat" | ("conv1x1", c) | StemConfig});
            ``in_channels`` of the model (inferred from its first conv by default).

    Returns:
        A :class:`MultimodalModel`; call it with ``{modality: tensor}`` or a sequence.
    """
    if config is None:
        config = build_config(model, modalities, method, preset=preset, targets=targets, **options)
    elif options or targets is not None or preset is not None:
        raise ValueError("pass either config= or options/targets/preset, not both")
    prepare_backbone(model)  # called projections, frozen norm statistics (mmpeft.prepare)
    apply_rules(model, config)
    in_channels = config.in_channels if config.in_channels is not None else _infer_in_channels(model)
    wrapped = MultimodalModel(model, config, in_channels)
    p = next(iter(model.parameters()), None)
    if p is not None:
        wrapped.stems.to(p.device)
    if efficient_attention:
        wrapped.enable_efficient_attention("auto" if efficient_attention is True else str(efficient_attention))
    if base_dtype is not None:
        wrapped.set_base_dtype(base_dtype)
    install_call_check(wrapped)  # the first forward verifies every layer ran
    return wrapped
