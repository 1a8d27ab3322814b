"""Missing modalities: presence masks, modality dropout and the non-finite input check.

A :class:`~mmpeft.model.wrap.MultimodalModel` accepts any non-empty subset of its modalities (only those
are stacked and run) and, for training with missing modalities, a per-sample presence mask
``{modality: (B,) bool}``. The fusion rules define how the present modalities mix
(:meth:`mmpeft.tuners.fusion.Fusion.present_weights`; docs/missing_modalities.md).

- :func:`presence_tensor`: a mask in any accepted form -> (S, B) bool over the present modalities;
  a sample with every modality absent is an error naming it (:func:`refuse_empty`).
- :func:`modality_dropout`: a random presence mask (each modality dropped with its probability,
  at least one modality kept per sample, among those ``available``: e.g. the finite ones).
- :func:`check_finite`: NaN / inf in an input is a :class:`NonFiniteInputError` naming the
  modality, the tile (when known) and the pixel count, or (``action="absent"``) marks those
  samples' modality absent (a sample with no finite modality left is the error, naming it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from ..errors import MmpeftKeyError, MmpeftValueError
from ..utils import listing

__all__ = [
    "NonFiniteInputError",
    "NonFiniteAction",
    "Presence",
    "check_finite",
    "modality_dropout",
    "presence_tensor",
    "dropout_rates",
    "masked_presence",
    "refuse_empty",
]

#: ``"error"``: raise; ``"absent"``: treat the sample's modality as missing; ``"off"``: no check.
NonFiniteAction = Literal["error", "absent", "off"]
#: {modality: (B,) bool} (modalities left out are present in every sample) or an (S, B) bool tensor.
Presence = Mapping[str, torch.Tensor] | torch.Tensor


class NonFiniteInputError(MmpeftValueError):
    """An input holds NaN or inf values (message: modality, tile or sample, pixel count)."""


def _rows(presence: Presence, names: Sequence[str], batch: int) -> torch.Tensor:
    """``presence`` as an (S, B) bool tensor on its own device (a dict of CPU masks stays on the CPU)."""
    if isinstance(presence, torch.Tensor):
        if tuple(presence.shape) != (len(names), batch):
            raise MmpeftValueError(
                f"a presence tensor must have shape (modalities, batch) = ({len(names)}, {batch}) "
                f"for {list(names)}, got {tuple(presence.shape)}"
            )
        return presence.to(torch.bool)
    unknown = [k for k in presence if k not in names]
    if unknown:
        raise MmpeftKeyError(f"presence names modalities {unknown} that are not in the batch {list(names)}")
    given = {n: torch.as_tensor(presence[n]).to(torch.bool).reshape(-1) for n in names if presence.get(n) is not None}
    for name, p in given.items():
        if p.shape[0] != batch:
            raise MmpeftValueError(f"presence of {name!r} has {p.shape[0]} entries for a batch of {batch}")
    dev = next(iter(given.values())).device if given else torch.device("cpu")
    ones = torch.ones(batch, dtype=torch.bool, device=dev)
    return torch.stack([given[n].to(dev) if n in given else ones for n in names])  # (S, B)


def refuse_empty(mask: torch.Tensor, names: Sequence[str], tiles: Sequence[str] | None = None, why: str = "") -> None:
    """ValueError naming every sample (tile) of the (S, B) ``mask`` with no present modality
    (one host sync when ``mask`` is on a device)."""
    empty = ~mask.any(0)
    if not bool(empty.any()):
        return
    where = [_describe(tiles, b) for b in torch.nonzero(empty).flatten().tolist()]
    raise MmpeftValueError(
        f"every modality of {list(names)} is absent in {listing(where)}"
        + (f" ({why})" if why else "")
        + ": a sample needs at least one present modality; leave such samples out of the batch"
    )


def presence_tensor(
    presence: Presence, names: Sequence[str], batch: int, device: torch.device, check: bool = True
) -> torch.Tensor:
    """``presence`` as an (S, B) bool tensor over ``names`` (the modalities in the batch, in order).
    ``check``: a sample with every modality absent is a ValueError naming it (checked on the
    mask's own device, so a CPU mask costs no device sync; skipped while compiling or capturing)."""
    mask = _rows(presence, names, batch)
    if check and not _tracing():
        refuse_empty(mask, names, why="by the presence mask")
    return mask.to(device=device)


def dropout_rates(rates: float | Mapping[str, float], modalities: Sequence[str]) -> dict[str, float]:
    """``p`` for every modality from one float or ``{modality: p}`` (others 0); checked in [0, 1)."""
    if isinstance(rates, Mapping):
        unknown = [k for k in rates if k not in modalities]
        if unknown:
            raise MmpeftValueError(f"modality_dropout names unknown modalities {unknown}; known: {list(modalities)}")
        out = {m: float(rates.get(m, 0.0)) for m in modalities}
    else:
        out = {m: float(rates) for m in modalities}
    bad = {m: p for m, p in out.items() if not 0.0 <= p < 1.0}
    if bad:
        raise MmpeftValueError(f"modality_dropout rates must be in [0, 1), got {bad}")
    return out


def modality_dropout(
    rates: float | Mapping[str, float],
    modalities: Sequence[str],
    batch: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    available: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """A random presence mask ``{modality: (B,) bool}``: each modality of each sample is dropped
    with its rate; a sample that would lose every modality keeps one, drawn uniformly.

    ``available``: ``{modality: (B,) bool}`` of what each sample has (e.g. the finite inputs,
    :func:`check_finite` with ``"absent"``; modalities left out: all samples): only those can be
    kept, and the one a sample keeps is drawn among them. A sample with none is a ValueError."""
    p = dropout_rates(rates, modalities)
    probs = torch.tensor([p[m] for m in modalities])  # (M,)
    keep = torch.rand(len(modalities), batch, generator=generator) >= probs[:, None]  # (M, B)
    if available is None:
        none = ~keep.any(0)  # (B,) samples with nothing left
        if bool(none.any()):
            pick = torch.randint(len(modalities), (batch,), generator=generator)
            keep[pick, torch.arange(batch)] |= none
        return {m: keep[i].to(device) for i, m in enumerate(modalities)}
    avail = _rows(available, modalities, batch).cpu()
    refuse_empty(avail, modalities, why="no modality available to keep")
    keep &= avail
    none = ~keep.any(0)
    if bool(none.any()):  # the largest of uniform draws over the available ones: uniform among them
        pick = (torch.rand(len(modalities), batch, generator=generator) * avail).argmax(0)
        keep[pick, torch.arange(batch)] |= none
    return {m: keep[i].to(device) for i, m in enumerate(modalities)}


def _describe(tiles: Sequence[str] | None, b: int) -> str:
    return f"tile {tiles[b]!r}" if tiles is not None and b < len(tiles) else f"sample {b}"


def check_finite(
    inputs: Mapping[str, torch.Tensor], tiles: Sequence[str] | None = None, action: NonFiniteAction = "error"
) -> dict[str, torch.Tensor] | None:
    """Look for NaN / inf in every input (B, C, H, W).

    ``action="error"``: raise :class:`NonFiniteInputError` naming each modality, tile (``tiles[b]``,
    else the sample index) and count of pixels (positions with a non-finite value in any channel).
    ``action="absent"``: return a presence mask ``{modality: (B,) bool}`` with those samples'
    modality absent (None when every value is finite). One reduction and host sync per modality.
    """
    if action == "off":
        return None
    if action not in ("error", "absent"):
        raise MmpeftValueError(f"non-finite action must be 'error', 'absent' or 'off', got {action!r}")
    bad: dict[str, torch.Tensor] = {}
    for name, x in inputs.items():
        if not x.is_floating_point():
            continue
        flags = ~torch.isfinite(x)
        if bool(flags.any()):  # the host sync; only a failing batch pays the counts below
            px = flags.any(1) if x.dim() > 2 else flags  # (B, H, W): pixels with any bad channel
            bad[name] = px.reshape(x.shape[0], -1).sum(1)  # (B,) bad pixels per sample
    if not bad:
        return None
    if action == "absent":
        _refuse_all_bad(inputs, bad, tiles)
        return {name: counts == 0 for name, counts in bad.items()}
    parts = []
    for name, counts in bad.items():
        x = inputs[name]
        total = x[0, 0].numel() if x.dim() > 2 else x[0].numel()
        for b in torch.nonzero(counts).flatten().tolist():
            parts.append(f"{name} in {_describe(tiles, b)}: {int(counts[b])} of {total} pixels")
    raise NonFiniteInputError(
        "NaN or inf in the inputs: "
        + listing(parts, sep="; ")
        + ". Fix the data, or map such samples to a missing modality (nonfinite='absent')"
    )


def _refuse_all_bad(
    inputs: Mapping[str, torch.Tensor], bad: Mapping[str, torch.Tensor], tiles: Sequence[str] | None
) -> None:
    """NonFiniteInputError naming every sample (tile) whose every input holds NaN / inf."""
    if set(bad) != set(inputs):
        return
    every = torch.stack([bad[n] > 0 for n in inputs]).all(0)  # (B,)
    samples = torch.nonzero(every).flatten().tolist()
    if samples:
        where = [
            f"{_describe(tiles, b)} (" + ", ".join(f"{n}: {int(bad[n][b])} pixels" for n in inputs) + ")"
            for b in samples
        ]
        raise NonFiniteInputError(
            f"every modality holds NaN or inf in {listing(where, sep='; ')}"
            + ": with nonfinite='absent' such a sample has no modality left; fix the data or leave the sample out"
        )


def _tracing() -> bool:
    """True under torch.compile tracing or CUDA-graph capture (no host sync allowed there)."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def masked_presence(
    action: NonFiniteAction,
    names: Sequence[str],
    xs: Sequence[torch.Tensor],
    presence: Presence | None,
    checked: bool = False,
) -> torch.Tensor | None:
    """The (S, B) presence mask of a forward over the modalities ``names`` with inputs ``xs``:
    ``presence`` (if any), with non-finite inputs checked per ``action`` (skipped while compiling
    or capturing a CUDA graph). None when no mask applies (every sample has every modality given).
    ``checked``: ``presence`` was built by this function before (no empty-sample check again: on
    a device mask it would cost a host sync per forward)."""
    batch, device = xs[0].shape[0], xs[0].device
    mask = None if presence is None else presence_tensor(presence, names, batch, device, check=not checked)
    if action == "off" or _tracing():
        return mask
    if mask is not None:  # samples already absent are not checked
        xs = [torch.where(mask[i].view(-1, *([1] * (x.dim() - 1))), x, 0) for i, x in enumerate(xs)]
    found = check_finite(dict(zip(names, xs)), None, action)
    if found is None:
        return mask
    finite = _rows(found, names, batch).to(device)
    if mask is None:
        return finite
    both = mask & finite
    try:
        refuse_empty(both, names, why="absent by the presence mask or holding NaN / inf, with nonfinite='absent'")
    except ValueError as exc:
        raise NonFiniteInputError(str(exc)) from None
    return both
