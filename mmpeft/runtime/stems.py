"""Per-modality input stems: bring each modality to the backbone's input channels.

Each modality's channel count is fixed: declared (``StemConfig(in_channels=1)``, ``("repeat", 1)``,
``("conv1x1", 1)``) or recorded from its first input (:attr:`ModalityStem.in_channels`, written into
the modality's :class:`~mmpeft.config.StemConfig`, so it is saved with the model). An input with
another count is an error naming both counts; :func:`check_stem_inputs` checks all the inputs of a
call before any work and, for a sequence given in the wrong order, says which modality each input
looks like.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..config import StemConfig
from ..errors import MmpeftValueError

__all__ = ["ModalityStem", "check_stem_inputs", "adapted_band_mix"]


def _shape(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def _channels(c: int) -> str:
    return f"{c} channel" + ("" if c == 1 else "s")


class ModalityStem(nn.Module):
    """Maps one modality's (B, c, H, W) input to (B, C_model, H, W).

    Kinds: "identity" (c must equal C_model), "repeat" (C_model must be a multiple of c; the
    paper repeats the 1-channel DSM to 3), "auto" (identity when c == C_model, else repeat),
    "conv1x1" (learnable; initialised to the repeat pattern when C_model % c == 0, else to the
    channel mean, so it starts as a sensible fixed mapping), "adapt" (c bands through the frozen
    RGB patch embedding adapted as timm adapts ``in_chans``, see :func:`adapted_band_mix`).

    Attributes:
        modality: the modality's name.
        config: its :class:`StemConfig` (shared with the model's config: a count recorded at
            first use is saved).
        in_channels: the modality's channel count, declared or recorded (None before its first input).
        channels_origin: ``"declared"`` (given in the config, or saved with it) or ``"first use"``.
        input_dims: the number of dimensions of the modality's inputs, recorded at first use.
    """

    def __init__(self, modality: str, config: StemConfig, model_channels: int | None) -> None:
        super().__init__()
        self.modality, self.kind, self.config = modality, config.kind, config
        self.model_channels = model_channels
        self.channels_origin: str | None = None if config.in_channels is None else "declared"
        self.input_dims: int | None = 4 if config.kind == "conv1x1" else None
        if config.kind == "adapt":  # fixed: a buffer rebuilt from the config, not saved
            self.register_buffer(
                "band_mix", adapted_band_mix(modality, int(config.in_channels), model_channels), persistent=False
            )
        if config.kind == "conv1x1":
            if model_channels is None:
                raise MmpeftValueError("a 'conv1x1' stem needs the model's input channels (pass in_channels=)")
            c_in = int(config.in_channels)  # type: ignore[arg-type]
            self.stem_conv = nn.Conv2d(c_in, model_channels, 1)
            with torch.no_grad():
                w = torch.zeros(model_channels, c_in)
                if model_channels % c_in == 0:
                    w[torch.arange(model_channels), torch.arange(model_channels) % c_in] = 1.0
                else:
                    w.fill_(1.0 / c_in)
                self.stem_conv.weight.copy_(w[:, :, None, None])
                self.stem_conv.bias.zero_()  # type: ignore[union-attr]

    @property
    def in_channels(self) -> int | None:
        """The modality's channel count (the config's, declared or recorded at first use)."""
        return self.config.in_channels

    def problem(self, x: torch.Tensor) -> str | None:
        """Why ``x`` cannot enter this stem (None: it can). Changes nothing."""
        m, shape = self.modality, _shape(x)
        if x.dim() < 3:
            return f"the input of {m!r} has shape {shape}: a modality's input needs (batch, channels, spatial...)"
        if self.input_dims is not None and x.dim() != self.input_dims:
            single = x.dim() == self.input_dims - 1
            hint = " (a single sample? add the batch axis: x[None] or x.unsqueeze(0))" if single else ""
            return f"the input of {m!r} has shape {shape}, {x.dim()} dimensions; its stem takes {self.input_dims}{hint}"
        c, target = x.shape[1], self.model_channels
        if self.in_channels is not None and c != self.in_channels:
            origin = "declared in its StemConfig" if self.channels_origin == "declared" else "fixed at its first use"
            return f"modality {m!r} takes {_channels(self.in_channels)} ({origin}), got {c} (input shape {shape})"
        if self.kind == "repeat" and target is None:
            return f"modality {m!r}: a 'repeat' stem needs the model's in_channels (pass in_channels=)"
        if (
            self.kind not in ("conv1x1", "adapt")
            and target is not None
            and c != target
            and (self.kind == "identity" or target % c)
        ):
            hint = " If it is a single sample (channels, H, W), add the batch axis: x[None]." if x.dim() == 3 else ""
            return (
                f"modality {m!r} has {c} channels (shape {shape}) but the model expects {target}; use a 'repeat' stem "
                f"(needs {target} divisible by {c}) or a 'conv1x1' stem.{hint}"
            )
        return None

    def record(self, x: torch.Tensor) -> None:
        """Fix the channel count and number of dimensions at the modality's first input."""
        if self.input_dims is None:
            self.input_dims = x.dim()
        if self.config.in_channels is None:
            self.config.in_channels, self.channels_origin = int(x.shape[1]), "first use"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, c, ...) -> (B, C_model, ...), after :meth:`problem` (an error naming it)."""
        problem = self.problem(x)
        if problem is not None:
            raise MmpeftValueError(
                f"{problem.rstrip('.')}. If the inputs come as a sequence, check their order (or pass a dict)"
            )
        return self.map_checked(x)

    def map_checked(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` for an input :func:`check_stem_inputs` has already checked."""
        self.record(x)
        c, target = x.shape[1], self.model_channels
        if self.kind == "conv1x1":
            return self.stem_conv(x)
        if self.kind == "adapt":  # (C_model, c) band mix: (B, c, ...) -> (B, C_model, ...)
            return torch.einsum("kc,bc...->bk...", self.band_mix.to(x.dtype), x)
        if target is None or c == target:
            return x
        reps = [1, target // c] + [1] * (x.dim() - 2)
        return x.repeat(*reps)  # channel tiling: c -> target

    def extra_repr(self) -> str:
        return f"{self.modality!r}, kind={self.kind!r}, in={self.in_channels}, out={self.model_channels}"


def adapted_band_mix(modality: str, bands: int, model_channels: int | None) -> torch.Tensor:
    """The (model_channels, bands) mix M for which ``patch_embed(M x)`` equals a patch embedding
    whose weight timm's ``adapt_input_conv(bands, W)`` adapted (what ``timm.create_model(...,
    in_chans=bands)`` loads from RGB weights): 1 band sums W over its channels, N bands take
    W[:, i % 3] * 3 / N. The helper is linear in W's input-channel axis, so applied to the
    identity it gives M (W_N = W M); the frozen patch embedding stays one, shared by the stacked
    modalities, and no adapted copy of W is kept. ValueError naming the modality when timm's
    helper cannot adapt the model's channels."""
    from timm.models import adapt_input_conv  # timm's helper (import deferred: timm loads slowly)

    if model_channels is None:
        raise MmpeftValueError(
            f"modality {modality!r}: an 'adapt' stem needs the model's input channels (pass in_channels=)"
        )
    eye = torch.eye(model_channels)[:, :, None, None]  # (C_model, C_model, 1, 1): W = identity
    try:
        mix = adapt_input_conv(bands, eye)  # (C_model, bands, 1, 1)
    except (NotImplementedError, AssertionError) as exc:
        raise MmpeftValueError(
            f"modality {modality!r}: timm's adapt_input_conv cannot adapt a {model_channels}-channel patch embedding "
            f"to {bands} bands ({exc or type(exc).__name__}); use a 'conv1x1' stem"
        ) from None
    return mix[:, :, 0, 0].contiguous()


def _order_hint(stems: Mapping[str, ModalityStem], names: Sequence[str], xs: Sequence[torch.Tensor]) -> str:
    """For a sequence input: which modality each mismatching input looks like, by its channels."""
    looks = []
    for m, x in zip(names, xs):
        c = x.shape[1] if x.dim() > 1 else None
        if stems[m].in_channels is not None and c == stems[m].in_channels:
            continue
        like = [o for o, s in stems.items() if o != m and s.in_channels is not None and s.in_channels == c]
        if like:
            looks.append(f"the input in the place of {m!r} has {_channels(c)}, as {'/'.join(map(repr, like))}")
    if not looks:
        return ""
    order = tuple(stems)
    return f"; {', '.join(looks)}: a sequence is read in the model's order {order} (None for a missing one), or pass a dict"


def check_stem_inputs(
    stems: Mapping[str, ModalityStem], names: Sequence[str], xs: Sequence[torch.Tensor], positional: bool = False
) -> None:
    """Check every input of a call against its modality's stem (dimensions, channel count)
    before any work, recording nothing; ``positional``: the inputs came as a sequence (the
    error then says which modality a misplaced input looks like). ValueError naming each."""
    problems = []
    for m, x in zip(names, xs):  # a plain loop: torch.compile traces it (not a walrus in a comprehension)
        problem = stems[m].problem(x)
        if problem is not None:
            problems.append(problem)
    if problems:
        hint = _order_hint(stems, names, xs) if positional else ""
        raise MmpeftValueError("; ".join(problems) + hint)
    if positional:
        _check_order_knowable(stems, names, xs)


def _check_order_knowable(stems: Mapping[str, ModalityStem], names: Sequence[str], xs: Sequence[torch.Tensor]) -> None:
    """A sequence in which modalities with no channel count yet get inputs of different channel
    counts: swapping two of them would run (repeating a 1-channel DSM into the optical slot) and
    fix the wrong counts, so it is refused until the counts are known. (A swap with a modality
    whose count is known fails that modality's check.)"""
    unknown = [m for m in names if stems[m].in_channels is None]
    if len({int(x.shape[1]) for m, x in zip(names, xs) if m in unknown}) > 1:
        given = ", ".join(f"{m}={tuple(x.shape)}" for m, x in zip(names, xs))
        raise MmpeftValueError(
            f"a sequence is read in the model's order {tuple(stems)}, and nothing tells a swapped order apart "
            f"while {unknown} have no channel count ({given}): pass a dict ({{modality: tensor}}), or declare "
            "the counts (stems={'dsm': ('repeat', 1)}); after a first call the counts are known and a sequence works"
        )
