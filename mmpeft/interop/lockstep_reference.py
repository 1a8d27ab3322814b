"""``reference_forward``: any wrapped model run modality by modality through its own forward.

The independent reference for every family: the batched path stacks the modalities on the batch
axis and runs every module once; this runs the host model's own ``forward`` once per modality on
that modality's batch alone, so a module that wrongly treats the stacked batch (a table cut into
"modalities", statistics over the batch) shows up as a difference. Mixing layers exchange the
other modalities' updates through :class:`mmpeft.tuners.lockstep.Lockstep` (passes until the
recorded inputs repeat; at most one more than the number of mixing calls).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import MmpeftStateError, MmpeftValueError
from ..model.geo_arguments import per_modality_modules
from ..model.multimodal import MultimodalModel
from ..runtime.batch import Inputs
from ..tuners.lockstep import Lockstep

__all__ = ["reference_forward"]


def reference_forward(
    wrapped: MultimodalModel, inputs: Inputs, *args: Any, max_passes: int | None = None, **kwargs: Any
) -> dict[str, Any]:
    """``{modality: output}`` of ``wrapped`` computed one modality at a time (every modality given).

    The same function as ``wrapped(inputs, *args, **kwargs)`` up to float rounding, for any host
    model. Cost: (number of passes) x M forwards of the frozen model; a model without mixing
    layers needs one pass. Raises RuntimeError when ``max_passes`` (default: mixing calls + 2)
    are not enough to repeat the recorded inputs exactly.
    """
    hooked = per_modality_modules(wrapped)
    if hooked:
        raise MmpeftStateError(
            f"reference_forward runs the base model once per modality, where the per-modality arguments of "
            f"set_modality_arguments on {hooked} do not act (each modality would be embedded as the model's own "
            "bands): compare with wrapped(inputs), or remove them first (the handle's remove())"
        )
    mods = wrapped.modalities
    xs = wrapped.stack(inputs).chunk(len(mods), 0)  # validated, stems applied; (B, C, ...) each
    if len(xs) != len(mods):
        raise MmpeftValueError(f"the reference needs every modality {list(mods)}; got {len(xs)}")
    layers = [layer for _, layer in wrapped.layers()]
    state = Lockstep(len(mods))
    for layer in layers:
        layer.reference = state
    try:
        return dict(zip(mods, _passes(wrapped, xs, state, max_passes, args, kwargs)))
    finally:
        for layer in layers:
            layer.reference = None


def _passes(
    wrapped: MultimodalModel,
    xs: tuple[torch.Tensor, ...],
    state: Lockstep,
    max_passes: int | None,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> list[Any]:
    limit = max_passes
    n = 0
    while True:
        outs = []
        state.mixing_calls = 0
        for i, x in enumerate(xs):
            state.begin(i)
            outs.append(wrapped.base_model(x, *args, **kwargs))
        n += 1
        if limit is None:
            limit = state.mixing_calls // len(xs) + 2
        if state.end_pass() or state.mixing_calls == 0:
            return outs
        if n >= limit:
            raise MmpeftStateError(f"the per-modality reference did not settle in {n} passes: {_why(wrapped)}")


def _why(wrapped: MultimodalModel) -> str:
    """Why the mixing layers' inputs changed between passes, and what to do."""
    if any(callable(getattr(m, "random_masking", None)) for m in wrapped.base_model.modules()):
        return (
            f"{type(wrapped.base_model).__name__}'s forward is random (it masks and shuffles the tokens with fresh "
            "noise on every call, as ViTMAE does), so no two passes see the same inputs; pass a fixed noise=: "
            "torch.arange(num_patches).expand(B, -1) here and .expand(M * B, -1) to the wrapped model (the "
            "modalities stacked), which keeps the first tokens in order"
        )
    return (
        "the inputs of the mixing layers changed from pass to pass, so the model's forward is not a function of its "
        "input (dropout in training mode, random token masking or shuffling): call it in eval mode and fix its "
        "randomness (a seed or a noise= argument)"
    )
