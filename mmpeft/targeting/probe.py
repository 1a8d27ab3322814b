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
and 2 and the fix (``exclude=`` / ``targets=``).

Cost: one forward at batch 1 and one at batch 2 at the model's own input size (3 images).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ..runtime.verify import WrapError

__all__ = ["PROBE_BATCHES", "ProbeError", "Probed", "probe_input", "dry_run", "probe_batch_factors"]

#: the two batch sizes of the dry run
PROBE_BATCHES = (1, 2)
_FALLBACK_SIZE = 224


class ProbeError(RuntimeError):
    """The wrap-time dry run of the model's forward failed (the message names the input tried)."""


@dataclasses.dataclass(frozen=True)
class Probed:
    """What one module's input looked like in the dry run: ``shapes[i]`` holds the input shape
    of every call at batch ``PROBE_BATCHES[i]``."""

    name: str
    shapes: tuple[tuple[tuple[int, ...], ...], ...]

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
        return (
            f"{self.name} runs on {what} (input shape {a} at batch {b1}, {b} at batch {b2})"
        )


def _token_grid_size(model: nn.Module) -> Any:
    """(H, W) from a token grid and its patch stride: timm's Hiera (``tokens_spatial_shape`` x
    ``patch_stride``), timm's MViTv2 (``stages[0].feat_size`` x ``patch_embed.proj.stride``)."""
    grid, stride = getattr(model, "tokens_spatial_shape", None), getattr(model, "patch_stride", None)
    if grid is None:
        stages = getattr(model, "stages", None)
        first = stages[0] if isinstance(stages, (nn.Sequential, nn.ModuleList)) and len(stages) else None
        grid = getattr(first, "feat_size", None)
        stride = getattr(getattr(getattr(model, "patch_embed", None), "proj", None), "stride", None)
    if isinstance(grid, (tuple, list)) and isinstance(stride, (tuple, list)) and len(grid) == len(stride) >= 2:
        return tuple(int(g) * int(s) for g, s in zip(grid[-2:], stride[-2:]))
    return None


def probe_input(model: nn.Module) -> tuple[int, int]:
    """(H, W) the model accepts: timm's ``patch_embed.img_size``, SAM's ``img_size``, Hugging Face's
    ``config.image_size``, a token grid times its patch stride (timm's Hiera, MViTv2), timm's
    ``default_cfg["input_size"]``; else 224."""
    pe = getattr(model, "patch_embed", None)
    for v in (
        getattr(pe, "img_size", None), getattr(model, "img_size", None), getattr(model, "image_size", None),
        getattr(getattr(model, "config", None), "image_size", None), _token_grid_size(model),
        (getattr(model, "default_cfg", None) or {}).get("input_size", (None,))[-2:],
    ):  # fmt: skip
        if isinstance(v, int) and v > 0:
            return v, v
        if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(s, int) and s > 0 for s in v):
            return int(v[0]), int(v[1])
    return _FALLBACK_SIZE, _FALLBACK_SIZE


def _leading(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, ...] | None:
    """The shape of a call's input: its first tensor argument, positional first."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return tuple(a.shape)
    return None


def _modes(model: nn.Module) -> Iterator[tuple[nn.Module, bool]]:
    return ((m, m.training) for m in model.modules())


def _run(model: nn.Module, x: torch.Tensor) -> None:
    try:
        model(x)
    except Exception as err:  # the dry run cannot guess other inputs: say what it tried
        raise ProbeError(
            f"the wrap-time dry run called {type(model).__name__}(x) with x of shape {tuple(x.shape)} "
            f"({x.dtype}, {x.device}) and it failed: {type(err).__name__}: {err}. It checks that every targeted "
            "module's input carries the batch axis; pass in_channels= if the channels are wrong, the input size "
            "(apply_rules(..., probe_size=(H, W))) if the size is, or turn the probe off (probe=False) for a "
            "model that needs other inputs"
        ) from err


def dry_run(
    model: nn.Module, names: Sequence[str], in_channels: int, size: tuple[int, int] | None = None
) -> dict[str, Probed]:
    """Run ``model`` on random (b, in_channels, H, W) inputs for b in :data:`PROBE_BATCHES` and
    return, per module of ``names``, the shapes of its inputs. The model's modes, its hooks and
    gradient mode are as before afterwards."""
    h, w = size or probe_input(model)
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    dtype, device = (p.dtype, p.device) if p is not None else (torch.float32, torch.device("cpu"))
    seen: dict[str, list[list[tuple[int, ...]]]] = {n: [] for n in names}

    def hook(name: str) -> Any:
        def record(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            shape = _leading(args, kwargs)
            seen[name][-1].append(shape if shape is not None else ())

        return record

    modes = list(_modes(model))
    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n), with_kwargs=True) for n in names]
    try:
        model.eval()
        gen = torch.Generator(device="cpu").manual_seed(0)
        with torch.no_grad():
            for b in PROBE_BATCHES:
                for n in names:
                    seen[n].append([])
                x = torch.rand(b, in_channels, h, w, generator=gen).to(device=device, dtype=dtype)
                _run(model, x)
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes:
            m.training = training
    return {n: Probed(n, tuple(tuple(calls) for calls in seen[n])) for n in names}


def _tail(name: str) -> str:
    """The end of a qualified name after its last block index (what ``exclude=`` matches)."""
    parts = name.split(".")
    idx = [i for i, s in enumerate(parts) if s.isdigit()]
    return ".".join(parts[idx[-1] + 1 :]) if idx and idx[-1] + 1 < len(parts) else name


def probe_batch_factors(
    model: nn.Module, names: Sequence[str], in_channels: int, size: tuple[int, int] | None = None
) -> dict[str, int | None]:
    """{module: k} for every module of ``names`` (k None: several leading sizes per sample, each
    following the batch). Raises :class:`WrapError` naming modules the forward never calls, and
    ValueError naming those whose input does not carry the batch axis, with the fix."""
    probed = dry_run(model, names, in_channels, size)
    h, w = size or probe_input(model)
    unused = [n for n, r in probed.items() if not r.called]
    if unused:
        raise WrapError(
            f"{len(unused)} targeted module(s) were not called in a dry run of {type(model).__name__}.forward on a "
            f"({PROBE_BATCHES[0]}, {in_channels}, {h}, {w}) input: {unused[:8]}{' ...' if len(unused) > 8 else ''}. "
            "Their updates would never act; leave them out (exclude=...) or target modules the forward calls"
        )
    bad = [r for r in probed.values() if not r.follows_batch()]
    if bad:
        tails = sorted({_tail(r.name) for r in bad})
        more = f" ({len(bad) - 1} more: {[r.name for r in bad[1:6]]})" if len(bad) > 1 else ""
        raise ValueError(
            f"{bad[0].describe()}{more}. A multimodal layer splits its input's first axis into one chunk per "
            f"modality, so it must wrap modules whose input carries the batch; leave these out with "
            f"exclude={tails!r}, or choose the modules with targets="
        )
    return {n: r.factor for n, r in probed.items()}
