"""Helpers shared by the test files: tolerant comparison, seeded trainables, one-thread runs.

**Tolerances are relative to the magnitudes compared.** Two float32 computations of the same
value that sum in another order (another CPU's SIMD width, another thread count, a batched
against a looped path) differ by a few units of float32's epsilon (1.2e-7) times the magnitude
of what is summed, growing with the reduction length; an absolute bound such as ``1e-5`` holds
on maps of magnitude ~1 and fails on maps of magnitude ~10 on another CPU. Every comparison here
scales its bound by the largest magnitude of the two tensors::

    max |actual - expected| <= rel * max(max |actual|, max |expected|)

``rel=1e-5`` (about 84 epsilons) is the default for two float32 paths of the same computation;
``rel`` of ``1e-2``-``5e-2`` for bf16 / fp16 paths; ``rel=0`` means bit-identical. Tests never
use a bare absolute ``atol`` (``tests/test_tolerances.py`` checks the suite for it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = [
    "assert_close",
    "close",
    "grad_scale",
    "one_thread",
    "perturb_trainables",
    "randomise_trainables",
    "rel_diff",
]


def _as_tensor(x: Any) -> torch.Tensor:
    """A tensor from a tensor, a model output with ``last_hidden_state`` / ``logits``, or a tuple's first."""
    if isinstance(x, torch.Tensor):
        return x
    for name in ("last_hidden_state", "logits", "feature_maps"):
        value = getattr(x, name, None)
        if value is not None:
            return _as_tensor(value)
    if isinstance(x, list | tuple) and x:
        return _as_tensor(x[0])
    raise TypeError(f"cannot compare an object of type {type(x).__name__}")


def rel_diff(actual: Any, expected: Any, scale: float | None = None) -> float:
    """``max |actual - expected|`` divided by the larger of the two tensors' largest magnitudes,
    or by ``scale`` when given (the magnitude of a whole family of tensors, e.g. every gradient of
    a model, for a tensor that is itself only rounding noise); 0.0 when equal, ``inf`` when they
    differ and the scale is 0."""
    a, b = _as_tensor(actual).detach().double(), _as_tensor(expected).detach().double()
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.numel() == 0:
        return 0.0
    diff = float((a - b).abs().max())
    if scale is None:
        scale = max(float(a.abs().max()), float(b.abs().max()))
    if diff == 0.0:
        return 0.0
    return diff / scale if scale > 0 else float("inf")


def close(actual: Any, expected: Any, rel: float = 1e-5, scale: float | None = None) -> bool:
    """Whether the two tensors agree within ``rel`` of their largest magnitude (or of ``scale``)."""
    return rel_diff(actual, expected, scale) <= rel


def assert_close(
    actual: Any, expected: Any, rel: float = 1e-5, msg: str | None = None, scale: float | None = None
) -> None:
    """Assert the two tensors agree within ``rel`` of their largest magnitude (or of ``scale``);
    the message gives the relative and absolute differences and the scale."""
    got = rel_diff(actual, expected, scale)
    if got > rel:
        a, b = _as_tensor(actual).detach().double(), _as_tensor(expected).detach().double()
        absolute = float((a - b).abs().max())
        if scale is None:
            scale = max(float(a.abs().max()), float(b.abs().max()))
        where = f"{msg}: " if msg else ""
        raise AssertionError(
            f"{where}relative difference {got:.3g} > {rel:.3g} (max abs {absolute:.3g}, scale {scale:.3g})"
        )


def grad_scale(*grads: dict[str, torch.Tensor]) -> float:
    """The largest gradient magnitude over dicts of gradients: the scale against which one
    tensor's gradient (possibly only rounding noise) is compared."""
    return max(float(g.detach().abs().max()) for d in grads for g in d.values() if g.numel())


def randomise_trainables(model: nn.Module, seed: int = 5) -> nn.Module:
    """Give every trainable tensor seeded random values (LoRA ``B`` and adapters start at zero,
    so outputs would not depend on them): fusion weights uniform in [0.2, 0.9], the rest
    N(0, 0.05); stems and frozen tensors (e.g. DINOv2's layer-scale lambda1) stay as built."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if "_fusion." in name:
                p.uniform_(0.2, 0.9, generator=g)
            elif "stem" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def perturb_trainables(model: nn.Module, seed: int = 5) -> None:
    """Seeded noise N(0, 0.1) on every trainable tensor: added to DoRA magnitudes and fusion
    weights (their values at init matter), copied over the rest (LoRA factors, adapters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g) * 0.1
                p.add_(noise) if "magnitude" in name or "lam" in name else p.copy_(noise)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the body with one torch thread (restoring the count after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
