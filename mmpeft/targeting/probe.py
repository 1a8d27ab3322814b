"""The wrap-time dry run: which targeted modules act on tensors that carry the batch axis.

A multimodal layer splits its input's dim 0 into one chunk per modality, which is only right
when dim 0 is the (stacked) batch, possibly times a constant (SAM's attention windows). Some
modules a preset selects by name are not: timm's ``vit_relpos`` runs ``attn.rel_pos.mlp`` on a
(15, 15, 2) position table that has no batch axis at all. Before any module is swapped,
:func:`probe_batch_factors` runs the frozen model's ``forward`` on a small input at batch 1 and
at batch 2 (``torch.no_grad``, eval mode, hooks on the targeted modules only; every module's
mode is restored and the hooks removed afterwards) and records the leading size of each call's
input. A module *carries the batch axis* when it is called the same number of times at both
sizes and every call's leading size doubles: ``L(2) = 2 L(1)``; its factor ``k = L(1)`` (1 for a
ViT's tokens, the number of windows in SAM's windowed blocks) goes to the layer's declared
``batch_factor`` (:mod:`mmpeft.tuners.base` checks dim 0 against it at run time).

Errors, at wrap time: :class:`ProbeError` when the dry run cannot run (it names the input it
tried), :class:`~mmpeft.runtime.verify.WrapError` naming the targeted modules the forward never calls,
ValueError naming a module whose input does not follow the batch, with its shapes at batch 1
and 2 and the fix (``exclude=`` / ``targets=``); a default selection (a preset) leaves such
modules out instead, with a :class:`ProbeWarning` naming them (timm vit_relpos's and MaxViT's
relative-position MLPs).

Input: the model's own size and channels (:mod:`mmpeft.targeting.inputs`), or ``probe=(H, W)``.
Cost: shapes only. The two calls run on meta tensors (:mod:`mmpeft.targeting.shapes`: each
operation computes its output's shape, no arithmetic); a model that cannot run there (it makes
a CPU tensor of its own, reads a value) is run for real once at batch 1 and once at batch 2, the
reason logged (``logging.getLogger("mmpeft.targeting.probe")``, level INFO).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import MmpeftValueError, MmpeftWarning
from ..runtime.verify import WrapError
from ..utils import listing
from .attention_trace import AttentionTrace
from .geo import input_shape
from .inputs import choose_size
from .shapes import meta_forward
from .structure import warn_structural

__all__ = [
    "PROBE_BATCHES",
    "ProbeError",
    "ProbeWarning",
    "Probed",
    "probe_input",
    "dry_run",
    "probe_batch_factors",
]

#: the two batch sizes of the dry run
PROBE_BATCHES = (1, 2)
_LOG = logging.getLogger(__name__)


class ProbeError(MmpeftValueError, RuntimeError):
    """The wrap-time dry run of the model's forward failed (the message names the input tried)."""


@dataclasses.dataclass(frozen=True)
class Probed:
    """What one module's input looked like in the dry run: ``shapes[i]`` holds the input shape
    of every call at batch ``PROBE_BATCHES[i]``."""

    name: str
    shapes: tuple[tuple[tuple[int, ...], ...], ...]
    outputs: tuple[tuple[tuple[int, ...], ...], ...] = ()

    @property
    def width(self) -> int | None:
        """The last axis of the module's output when every call agrees (an "after" adapter's width)."""
        ends = {o[-1] for calls in self.outputs for o in calls if o}
        return ends.pop() if len(ends) == 1 else None

    @property
    def called(self) -> bool:
        return all(len(s) > 0 for s in self.shapes)

    def follows_batch(self) -> bool:
        """Called alike at both sizes, every call's leading size scaling with the batch."""
        (b1, b2), (s1, s2) = PROBE_BATCHES, self.shapes
        if not self.called or len(s1) != len(s2):
            return False
        return all(len(a) > 0 and len(b) > 0 and a[0] * b2 == b[0] * b1 for a, b in zip(s1, s2))

    @property
    def factor(self) -> int | None:
        """k: the leading size per sample, when every call has the same (else None)."""
        if not self.follows_batch():
            return None
        ks = {s[0] // PROBE_BATCHES[0] for s in self.shapes[0]}
        return ks.pop() if len(ks) == 1 else None

    def describe(self) -> str:
        """Why the module does not carry the batch axis, in words."""
        (b1, b2), (s1, s2) = PROBE_BATCHES, self.shapes
        if len(s1) != len(s2):
            return f"{self.name} is called {len(s1)} time(s) at batch {b1} but {len(s2)} at batch {b2}"
        bad = next(i for i, (a, b) in enumerate(zip(s1, s2)) if not (len(a) and len(b) and a[0] * b2 == b[0] * b1))
        a, b = s1[bad], s2[bad]
        what = "a scalar" if not a else f"a {a} table whose first axis does not follow the batch"
        return f"{self.name} runs on {what} (input shape {a} at batch {b1}, {b} at batch {b2})"


def _leading(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, ...] | None:
    """The shape of a call's input: its first tensor argument, positional first."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return tuple(a.shape)
    return None


def _output_shape(out: Any) -> tuple[int, ...]:
    """The shape of a call's output: the tensor, or the first tensor of a tuple / list."""
    if isinstance(out, (tuple, list)):
        out = next((o for o in out if isinstance(o, torch.Tensor)), None)
    return tuple(out.shape) if isinstance(out, torch.Tensor) else ()


def probe_input(model: nn.Module, in_channels: int = 3) -> tuple[int, int]:
    """(H, W) of the dry run's input (:func:`mmpeft.targeting.inputs.choose_size`): the size the
    model declares, else the first candidate a shape-only run accepts, else 224."""
    return choose_size(model, in_channels)


def _run(model: nn.Module, x: torch.Tensor) -> None:
    try:
        model(x)
    except Exception as err:  # the dry run cannot guess other inputs: say what it tried
        h, w = x.shape[-2:]
        raise ProbeError(
            f"the wrap-time dry run called {type(model).__name__}(x) with x of shape {tuple(x.shape)} "
            f"({x.dtype}, {x.device}) and it failed: {type(err).__name__}: {err}. It checks that every targeted "
            f"module's input carries the batch axis; pass the input size the model takes "
            f"(wrap_multimodal(..., probe=(H, W)), {h}x{w} was tried), in_channels= if the channels are wrong, or "
            "probe=False for a model whose forward needs other inputs"
        ) from err


_Seen = dict[str, list[list[tuple[tuple[int, ...], tuple[int, ...]]]]]


def _hooks(model: nn.Module, names: Sequence[str], seen: _Seen) -> list[Any]:
    def hook(name: str) -> Any:
        def record(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            shape = _leading(args, kwargs)
            seen[name][-1].append((shape if shape is not None else (), _output_shape(out)))

        return record

    return [model.get_submodule(n).register_forward_hook(hook(n), with_kwargs=True) for n in names]


def _shape_run(
    model: nn.Module,
    names: Sequence[str],
    shapes: list[tuple[int, ...]],
    dtype: torch.dtype,
    seen: _Seen,
    trace: AttentionTrace | None,
) -> bool:
    """The dry run on meta tensors; False (and ``seen`` emptied) when the model cannot run there."""
    try:
        meta_forward(model, shapes, dtype, between=lambda _: [seen[n].append([]) for n in names], inner=trace)
        return True
    except Exception as err:
        for n in names:
            seen[n].clear()
        if trace is not None:
            trace.found.clear()
        _LOG.info(
            "shape-only dry run of %s failed (%s: %s); running it for real",
            type(model).__name__,
            type(err).__name__,
            str(err)[:300],
        )
        return False


def dry_run(
    model: nn.Module,
    names: Sequence[str],
    in_channels: int,
    size: tuple[int, int] | None = None,
    shapes_only: bool = True,
    trace: AttentionTrace | None = None,
) -> dict[str, Probed]:
    """Run ``model`` on (b, in_channels, H, W) inputs for b in :data:`PROBE_BATCHES` and return,
    per module of ``names``, the shapes of its inputs and outputs: on meta tensors
    (:mod:`mmpeft.targeting.shapes`) when ``shapes_only`` and the model runs there, else for real
    on random inputs. The model's modes, its hooks and gradient mode are as before afterwards.
    ``trace``: an :class:`~mmpeft.targeting.attention_trace.AttentionTrace` of ``model`` that records
    the modules computing attention in the same forwards (its hooks are removed afterwards)."""
    h, w = size or probe_input(model, in_channels)
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    dtype, device = (p.dtype, p.device) if p is not None else (torch.float32, torch.device("cpu"))
    seen: _Seen = {n: [] for n in names}
    modes = [(m, m.training) for m in model.modules()]
    handles = _hooks(model, names, seen)
    try:
        model.eval()
        # (b, C, H, W), or (b, C, T, H, W) for a model with a time axis (mmpeft.targeting.geo)
        shapes = [input_shape(model, b, in_channels, (h, w)) for b in PROBE_BATCHES]
        if not (shapes_only and _shape_run(model, names, shapes, dtype, seen, trace)):
            gen = torch.Generator(device="cpu").manual_seed(0)
            with torch.no_grad(), trace if trace is not None else contextlib.nullcontext():
                for shape in shapes:
                    for n in names:
                        seen[n].append([])
                    _run(model, torch.rand(shape, generator=gen).to(device=device, dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
        if trace is not None:
            trace.close()
        for m, training in modes:
            m.training = training
    return {n: Probed(n, *_split(seen[n])) for n in names}


def _split(calls: list[list[tuple[tuple[int, ...], tuple[int, ...]]]]) -> tuple[Any, Any]:
    return tuple(tuple(i for i, _ in c) for c in calls), tuple(tuple(o for _, o in c) for c in calls)


def _tail(name: str) -> str:
    """The end of a qualified name after its last block index (what ``exclude=`` matches)."""
    parts = name.split(".")
    idx = [i for i, s in enumerate(parts) if s.isdigit()]
    return ".".join(parts[idx[-1] + 1 :]) if idx and idx[-1] + 1 < len(parts) else name


class ProbeWarning(MmpeftWarning):
    """The default selection left out modules whose input does not carry the batch axis."""


def _not_batched(bad: list[Probed], leave_out: bool) -> None:
    tails = sorted({_tail(r.name) for r in bad})
    more = f" (also {listing(r.name for r in bad[1:])})" if len(bad) > 1 else ""
    if leave_out:
        warn_structural(
            f"left out {len(bad)} module(s) the default selection chose whose input does not carry the batch "
            f"axis (a position table, not tokens): {bad[0].describe()}{more}. Pass targets= to choose modules "
            "yourself",
            ProbeWarning,
        )
        return
    raise MmpeftValueError(
        f"{bad[0].describe()}{more}. A multimodal layer splits its input's first axis into one chunk per "
        f"modality, so it must wrap modules whose input carries the batch; leave these out with "
        f"exclude={tails!r}, or choose the modules with targets="
    )


def probe_batch_factors(
    model: nn.Module,
    names: Sequence[str],
    in_channels: int,
    size: tuple[int, int] | None = None,
    leave_out: bool = False,
    probed: dict[str, Probed] | None = None,
) -> dict[str, int | None]:
    """{module: k} for every module of ``names`` whose input carries the batch (k None: several
    leading sizes per sample, each following the batch). Raises :class:`WrapError` naming modules
    the forward never calls; a module whose input does not carry the batch axis is left out with a
    :class:`ProbeWarning` naming it when ``leave_out`` (a default selection), else ValueError
    naming it with the fix. ``probed``: the dry run's result when already run."""
    probed = probed if probed is not None else dry_run(model, names, in_channels, size)
    unused = [n for n, r in probed.items() if not r.called]
    if unused:
        h, w = size or probe_input(model, in_channels)  # only for the message
        raise WrapError(
            f"{len(unused)} targeted module(s) were not called in a dry run of {type(model).__name__}.forward on a "
            f"({PROBE_BATCHES[0]}, {in_channels}, {h}, {w}) input: {listing(unused)}. "
            "Their updates would never act; leave them out (exclude=...) or target modules the forward calls"
        )
    bad = [r for r in probed.values() if not r.follows_batch()]
    if bad:
        _not_batched(bad, leave_out)
    return {n: r.factor for n, r in probed.items() if r.follows_batch()}
