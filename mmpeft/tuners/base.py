"""The layer contract every multimodal method implements (peft's ``BaseTunerLayer`` for N modalities).

A multimodal layer holds the original frozen module as ``base_layer`` and sees its input with the
modality axis riding in the batch: ``x: (M*B', ...)`` modality-major, i.e. ``x.view(M, -1, ...)``
gives one chunk per modality. ``B'`` may be the batch or, deep inside SAM, the batch times the
number of attention windows: window partition keeps the order batch-major, so the chunks stay aligned.

Every piece of state a layer has is a declared attribute (no flags or hooks put on it from outside):

- ``execution``: ``"batched"`` or ``"loop"`` (:func:`set_execution`);
- ``adapters_enabled``: False while adapters are disabled (the layer is its ``base_layer``);
- ``single``: index of the only modality in the batch (:func:`only_modality`), else None;
- ``present`` / ``presence``: the modalities in the batch (indices) and the per-sample (S, B)
  mask (:func:`present_modalities`), None when all are present;
- ``call_check`` / ``called``: the first-forward check of :mod:`mmpeft.runtime.verify`;
- ``batch_factor`` / ``factor_size``: k, the leading size of the layer's input per sample of one
  modality, found by the wrap-time dry run (:mod:`mmpeft.targeting.probe`: 1 for tokens, the number of
  windows in windowed blocks) on an input of spatial size ``factor_size``; None for a layer built
  by hand (no dry run);
- ``batch_size`` / ``input_size``: B, the batch of one modality in the current forward, and its
  input's spatial size (:func:`stacked_batch`, set by the wrapped model around each forward),
  else None. With B known the stacked input's leading size must be S*k*B (or S*B:
  :mod:`mmpeft.runtime.attention` runs SAM's windowed modules on the un-windowed grid) when the input
  has the dry run's size, a multiple of S*B at another size (windows vary with it); without B
  dim 0 must divide by S;
- ``merged``: whether the updates are folded into per-modality weights (methods that can merge).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Literal

import torch
from einops import rearrange
from torch import nn

from ..errors import MmpeftKeyError, MmpeftStateError, MmpeftTypeError, MmpeftValueError
from ..utils import check_modalities
from .fusion import Fusion, apply_mixing
from .outputs import take_input

__all__ = [
    "by_modality",
    "MergeError",
    "mixing_refusal",
    "MultimodalLayer",
    "Execution",
    "set_execution",
    "only_modality",
    "multimodal_layers",
    "present_modalities",
    "stacked_batch",
    "layer_state",
]

Execution = Literal["batched", "loop"]


def _exporting() -> bool:
    """True while ``torch.export`` traces (``torch.compiler.is_exporting``; False where torch lacks it)."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting()) if is_exporting is not None else False


class MergeError(MmpeftValueError):
    """A layer whose update cannot be folded into a weight (the message says why)."""


def mixing_refusal(fusion: Fusion) -> str | None:
    """Why a layer whose rule is ``fusion`` cannot merge (None when the rule does not mix)."""
    if not fusion.mixes:
        return None
    return (
        f"its fusion rule {type(fusion).__name__} mixes modalities: each modality's output adds the other "
        "modalities' updates B_k A_k x_k, computed from *their* inputs, which no weight applied to x_m alone "
        "can express (merge needs fusion='none', e.g. the preset 'lora' or the MMLoRA attention rule)"
    )


class MultimodalLayer(nn.Module):
    """Base class of every multimodal method's layer (``MultimodalLoRA``, ``MultimodalAdapter``).

    Attributes:
        base_layer: the wrapped frozen module (its parameters are never trained).
        modalities: modality names, in the order of the stacked batch.
        execution: ``"batched"`` (default: one frozen pass over the stacked batch, per-modality
            products as one batched matmul) or ``"loop"`` (the same maths, the base layer and every
            per-modality module run on one modality at a time: a reference path and the authors'
            execution scheme).
        adapters_enabled: False while the layer computes its ``base_layer`` alone.
        single, present, presence, call_check, called: see the module docstring.

    :meth:`forward` is the one dispatch of every method; a subclass supplies its steps
    (``_forward_one``, ``_forward_loop``, ``_forward_batched``, and ``_forward_merged`` if it merges).
    """

    #: the method's name in :data:`mmpeft.tuners.METHODS`.
    method: ClassVar[str] = ""

    def __init__(self, base_layer: nn.Module, modalities: Sequence[str]) -> None:
        super().__init__()
        if isinstance(base_layer, MultimodalLayer):
            raise MmpeftValueError("the module is already a multimodal layer; wrapping it twice is not supported")
        self.base_layer = base_layer
        self.modalities: tuple[str, ...] = tuple(check_modalities(modalities))  # distinct names, not a str
        self.execution: Execution = "batched"
        self.adapters_enabled = True
        self.single: int | None = None  # index of the only modality present (see only_modality)
        self.present: tuple[int, ...] | None = None  # indices of the modalities in the batch (None: all)
        self.presence: torch.Tensor | None = None  # (S, B) per-sample presence (None: every sample)
        self.call_check: int | None = None  # the first forward's stacked batch size, while checked
        self.called = False  # whether the checked forward called this layer on the stacked batch
        self.batch_factor: int | None = None  # k: leading size per sample (wrap-time dry run), None: unknown
        self.factor_size: tuple[int, ...] | None = None  # the dry run's input spatial size, for which k holds
        self.batch_size: int | None = None  # B of the current forward (stacked_batch), None: unknown
        self.input_size: tuple[int, ...] | None = None  # its input's spatial size (stacked_batch)
        self.reference: Any = None  # a Lockstep while the per-modality reference runs (mmpeft.interop.reference)

    def __getattr__(self, name: str) -> Any:
        """A plain setting of the wrapped module its host reads (timm Hiera's ``attn.q_stride``,
        ``num_heads``, flags) comes from ``base_layer``. Tensors and modules do not: a host that
        reads ``.weight`` of a wrapped module would bypass the update, and the first forward
        names it (:mod:`mmpeft.runtime.verify`)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self._modules.get("base_layer")
            if base is None or name.startswith("_") or not hasattr(base, name):
                raise
            value = getattr(base, name)
            if isinstance(value, (torch.Tensor, nn.Module)) or callable(value):
                raise
            return value

    @property
    def num_modalities(self) -> int:
        return len(self.modalities)

    # ------------------------------------------------------------------ the contract
    @property
    def disable_adapters(self) -> bool:
        """True while the layer computes its frozen ``base_layer`` alone (peft's name)."""
        return not self.adapters_enabled

    def enable_adapters(self, enabled: bool) -> None:
        """Turn the layer's updates on (True) or off (False: the output is ``base_layer``'s)."""
        if not isinstance(enabled, bool):
            raise MmpeftTypeError(f"enabled must be a bool, got {enabled!r}")
        self.adapters_enabled = enabled

    @property
    def merged(self) -> bool:
        """Whether the updates are folded into per-modality weights (:meth:`merge`)."""
        return False

    def cannot_merge(self) -> str | None:
        """Why this layer's update cannot be folded into a weight (None when it can)."""
        return f"{type(self).__name__} has no weight form of its update"

    def merge(self) -> None:
        """Fold every modality's update into a per-modality copy of the frozen weight."""
        raise MergeError(self.cannot_merge())

    def unmerge(self) -> None:
        """Undo :meth:`merge` (a no-op when not merged)."""

    def get_delta_weight(self, modality: str) -> torch.Tensor:
        """The weight update of ``modality`` (same shape as the base weight), for layers that merge."""
        raise MergeError(self.cannot_merge())

    # ------------------------------------------------------------------ the forward: one dispatch, the method's steps
    def forward(self, x: Any = None, *args: Any, **kwargs: Any) -> Any:
        """x: (M*B', ...) stacked modality-major -> the base layer's output with each modality's update.

        The one dispatch of every method, in order: the first-forward call check, the per-modality
        reference (:mod:`mmpeft.tuners.lockstep`), adapters disabled (``base_layer`` alone), merged
        weights (unless per-sample presence), one modality alone (``single``), then the stacked
        batch in ``"loop"`` or ``"batched"`` execution. A method supplies the steps
        :meth:`_forward_one`, :meth:`_forward_loop`, :meth:`_forward_batched` and, if it merges,
        :meth:`_forward_merged`. Extra arguments go to the base module with ``x``, which may also
        come by the keyword of the module's first parameter (:func:`mmpeft.tuners.outputs.take_input`).
        """
        if x is None:
            x, kwargs = take_input(self.base_layer, x, kwargs)
        self._note_call(x)
        if self.reference is not None:  # the per-modality reference (mmpeft.tuners.lockstep)
            return self.reference.call(self, "forward", x, args, kwargs)
        if not self.adapters_enabled:
            return self.base_layer(x, *args, **kwargs)
        if self.merged and self.presence is None:  # per-sample presence takes the unmerged path
            self._merged_current()
            if self.single is None:
                self._check_stack(x)
            return self._forward_merged(x)
        if self.single is not None:
            return self._forward_one(x, self.modalities[self._check_single()], *args, **kwargs)
        self._check_stack(x)
        if self.execution == "loop":
            return self._forward_loop(x, *args, **kwargs)
        return self._forward_batched(x, *args, **kwargs)

    def _forward_one(self, x: torch.Tensor, modality: str, *args: Any, **kwargs: Any) -> Any:
        """Step: a batch of ``modality`` alone -> its base output plus its own update (no mixing)."""
        raise NotImplementedError

    def _forward_loop(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """Step: the stacked batch, the base layer and each modality's update run one modality at a time."""
        raise NotImplementedError

    def _forward_batched(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """Step: the stacked batch, one frozen pass and every modality's update at once."""
        raise NotImplementedError

    def _forward_merged(self, x: torch.Tensor) -> torch.Tensor:
        """Step of a merged layer: the stacked batch (or ``single``'s) with the per-modality merged weights."""
        raise MergeError(self.cannot_merge())

    def _merged_current(self) -> None:
        """Before a merged forward: refuse training through merged weights, merge again when a
        tensor they come from changed (:class:`mmpeft.tuners.merging.WeightMerging`)."""

    def _check_modality(self, modality: str) -> None:
        """A KeyError naming the known modalities when ``modality`` is not one of them."""
        if modality not in self.modalities:
            raise MmpeftKeyError(f"unknown modality {modality!r}; known: {self.modalities}")

    def _note_call(self, x: torch.Tensor) -> None:
        """Record, during the checked first forward, a call on the stacked batch."""
        if self.call_check is not None and x.dim() > 0 and x.shape[0] % self.call_check == 0:
            self.called = True

    # ------------------------------------------------------------------ modalities in the batch
    def _active(self) -> tuple[str, ...]:
        """The modalities stacked in the current batch, in order (all of them by default)."""
        if self.present is None:
            return self.modalities
        return tuple(self.modalities[i] for i in self.present)

    def _mixing(self) -> torch.Tensor | None:
        """None when every modality and sample is present (the rule's own path), else the
        weights of :meth:`Fusion.present_weights`: (S, S), or (B, S, S) with a presence mask."""
        if self.present is None and self.presence is None:
            return None
        return self._fusion().present_weights(self.present, self.presence)

    def _mix(self, d: torch.Tensor) -> torch.Tensor:
        """d: (S, B', ...) stacked per-modality updates of the present modalities -> mixed."""
        w = self._mixing()
        return self._fusion()(d) if w is None else apply_mixing(w, d)

    def _fused_weights(self) -> tuple[bool, torch.Tensor | None]:
        """Whether the fused nodes of :mod:`mmpeft.tuners.lowrank` apply, and their (M, M) mixing weights
        (None: the identity). They do for a linear rule mixing the whole batch alike; a
        non-linear rule or per-sample presence takes the general path, and so does
        ``torch.export`` (it cannot trace the nodes' ``out=`` products with trainable inputs)."""
        fusion = self._fusion()
        w = self._mixing()
        if not fusion.linear or (w is not None and w.dim() != 2) or _exporting():
            return False, None
        if w is None and fusion.mixes:
            w = fusion.mixing_matrix()
        return True, w  # None: the identity rule over the whole batch

    def _fusion(self) -> Fusion:
        raise NotImplementedError

    def _check_stack(self, x: torch.Tensor) -> int:
        """Return B' = x.shape[0] // S (S modalities present), raising a clear error when the batch
        is not stacked: with ``batch_size`` B and ``batch_factor`` k known dim 0 must be S*k*B (or
        S*B) at the dry run's input size, a multiple of S*B at another; else a multiple of S."""
        mods = self._active()
        m = len(mods)
        n = x.shape[0] if x.dim() > 0 else 0
        k, b = self.batch_factor, self.batch_size
        if b is not None and k is not None:  # k unknown (a layer built by hand): divisibility only
            exact = self.factor_size is not None and self.input_size == self.factor_size
            if (n not in (m * k * b, m * b)) if exact else (n == 0 or n % (m * b) != 0):
                want = (
                    f"{m * k * b} ({m} x {k} x {b}){f' or {m * b}' if k != 1 else ''}"
                    if exact
                    else f"a multiple of {m * b}"
                )
                raise MmpeftValueError(
                    f"{type(self).__name__} (batch_factor={k}) got an input of shape {tuple(x.shape)}; with the {m} "
                    f"modalities {mods} of batch {b} stacked on dim 0 its leading size must be {want}: the "
                    "input does not carry the batch axis"
                )
        if x.dim() == 0 or n % m != 0:
            raise MmpeftValueError(
                f"{type(self).__name__} expects the {m} modalities {mods} stacked on dim 0 "
                f"(M*B, ...), got shape {tuple(x.shape)}; call the model returned by wrap_multimodal"
            )
        return n // m

    def _check_single(self) -> int:
        idx = self.single
        assert idx is not None
        if self._fusion().mixes:
            raise MmpeftStateError(
                f"{type(self).__name__} mixes modalities ({type(self._fusion()).__name__}); "
                "it cannot run on one modality alone"
            )
        return idx

    def extra_repr(self) -> str:
        return f"modalities={self.modalities}, execution={self.execution!r}"


def multimodal_layers(model: nn.Module) -> Iterator[tuple[str, MultimodalLayer]]:
    """All (qualified name, layer) pairs of multimodal layers inside ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, MultimodalLayer):
            yield name, module


def set_execution(model: nn.Module, execution: Execution) -> None:
    """Switch every multimodal layer of ``model`` to ``"batched"`` or ``"loop"`` execution."""
    if execution not in ("batched", "loop"):
        raise MmpeftValueError(f"execution must be 'batched' or 'loop', got {execution!r}")
    for _, layer in multimodal_layers(model):
        layer.execution = execution


@contextlib.contextmanager
def layer_state(model: nn.Module, **values: Any) -> Iterator[None]:
    """Within the block every multimodal layer of ``model`` has the declared state ``values``
    (``single``, ``present``, ``presence``, ``batch_size``, ``input_size``); the values they had
    come back afterwards. One walk over the model, plain attribute writes (run every forward)."""
    layers = [layer for _, layer in multimodal_layers(model)]
    before = [{k: vars(layer)[k] for k in values} for layer in layers]  # KeyError: not a declared state
    for layer in layers:
        vars(layer).update(values)
    try:
        yield
    finally:
        for layer, old in zip(layers, before):
            vars(layer).update(old)


def only_modality(model: nn.Module, modality: str) -> contextlib.AbstractContextManager[None]:
    """Within the block, layers see a batch of the single ``modality`` (not the stacked batch).

    Only layers whose fusion rule does not mix may run this way; a mixing layer raises.
    """
    orders = {layer.modalities for _, layer in multimodal_layers(model)}
    unknown = [o for o in orders if modality not in o]
    if unknown:
        raise MmpeftKeyError(f"unknown modality {modality!r}; known: {unknown[0]}")
    if len(orders) > 1:
        raise MmpeftValueError(f"the layers of this model stack their modalities in different orders: {sorted(orders)}")
    return layer_state(model, single=orders.pop().index(modality) if orders else None)


def present_modalities(
    model: nn.Module, present: Sequence[int] | None, presence: torch.Tensor | None = None
) -> contextlib.AbstractContextManager[None]:
    """Within the block, layers see a batch of the modalities ``present`` (indices into their
    modalities, stacked in that order; None: all) with the optional per-sample ``presence``
    (S, B) bool mask. Fusion rules mix as :meth:`mmpeft.tuners.fusion.Fusion.present_weights` defines."""
    return layer_state(model, present=None if present is None else tuple(present), presence=presence)


def stacked_batch(
    model: nn.Module, batch_size: int, input_size: Sequence[int] | None = None
) -> contextlib.AbstractContextManager[None]:
    """Within the block, layers know the batch of one modality, ``batch_size``, and the input's
    spatial size (their ``batch_size`` / ``input_size``), and check their inputs' leading size
    against them (:meth:`MultimodalLayer._check_stack`)."""
    size = None if input_size is None else tuple(int(s) for s in input_size)
    return layer_state(model, batch_size=int(batch_size), input_size=size)


def by_modality(x: torch.Tensor, m: int) -> torch.Tensor:
    """The stacked (M*B', ..., C) tensor as (M, T, C): one row block per modality, every token of
    it (T = B' times the inner sizes) in a row. A view when ``x`` is contiguous."""
    return rearrange(x, "(m n) ... c -> m (n ...) c", m=m)
