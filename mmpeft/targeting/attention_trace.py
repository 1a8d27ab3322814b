"""Attention found by what a module computes, not by its class name.

A module *computes attention* when its own ``forward`` (not a child's) calls
``F.scaled_dot_product_attention``, or multiplies two tensors that both depend on the input
(``q @ k^T`` of softmax attention, ConViT's GPSA, XCiT's cross-covariance ``q^T k``, the
``k^T v`` of linear attention as EfficientViT's LiteMLA): a product of projections of the
features, where a convolution or an MLP only multiplies features by weights. Channel attention
(ResNeSt's, SK's softmax over weights pooled from the features) multiplies no two activations and
is not counted.

:class:`AttentionTrace` is a ``TorchFunctionMode`` run around one forward (the wrap-time dry run,
on meta tensors or real ones): every tensor computed from the model's input is marked, every
module call is tracked, and each such product is credited to the innermost module running.
:func:`traced_attention` runs one shape-only forward for it (a real one at batch 1 when the model
cannot run on meta tensors); :func:`mmpeft.targeting.coverage.attention_modules` joins it to the
names.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["AttentionTrace", "traced_attention"]

_LOG = logging.getLogger(__name__)

#: products of two operands (``a @ b``); einsum's operands follow its equation
_PRODUCTS = {
    torch.matmul,
    torch.bmm,
    torch.Tensor.matmul,
    torch.Tensor.bmm,
    torch.Tensor.__matmul__,
    torch.Tensor.__rmatmul__,
    torch.baddbmm,
    torch.Tensor.baddbmm,
}


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


class AttentionTrace(TorchFunctionMode):
    """Records, during the forwards run inside it, the modules of ``model`` that compute attention
    (:attr:`found`: their names, in the order first seen) and what feeds each one's products
    (:attr:`roles`: ``{module: {"q" | "k" | "v": projection names}}``, the ``nn.Linear`` /
    ``nn.Conv2d`` whose outputs reach the operands: the left and right of a product of two
    projections are q and k, the operand multiplied with a product's result is v; SDPA's three
    arguments are q, k, v). Hooks on every module follow the calls; :meth:`close` removes them.
    Enter it innermost (:func:`mmpeft.targeting.shapes.meta_forward`'s ``inner``), so it sees every
    call before another mode answers it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.found: dict[str, str] = {}  # name: what was seen ("sdpa" / "product")
        self.roles: dict[str, dict[str, set[str]]] = {}
        self.fed_by: dict[str, frozenset[str]] = {}  # projection: the projections its input comes from
        self._stack: list[str] = []
        self._marked: dict[int, tuple[weakref.ref[torch.Tensor], frozenset[str]]] = {}
        self._handles = [
            h
            for n, m in model.named_modules()
            for h in (
                m.register_forward_pre_hook(
                    self._enter(n, m is model, isinstance(m, (nn.Linear, nn.Conv2d))), with_kwargs=True
                ),
                m.register_forward_hook(self._leave(n, isinstance(m, (nn.Linear, nn.Conv2d))), always_call=True),
            )
        ]

    def _enter(self, name: str, root: bool, projection: bool) -> Any:
        def pre(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if root and not self._stack:  # the model's input: what every activation derives from
                for t in _tensors((args, kwargs)):
                    self._mark(t, frozenset())
            if projection:
                srcs = [s for t in _tensors((args, kwargs)) if (s := self._sources(t)) is not None]
                self.fed_by.setdefault(name, frozenset().union(*srcs))
            self._stack.append(name)

        return pre

    def _leave(self, name: str, projection: bool) -> Any:
        def post(_: nn.Module, args: Any, out: Any = None) -> None:
            if self._stack and self._stack[-1] == name:
                self._stack.pop()
            if projection:  # what it returns comes from this projection (and no earlier one)
                for t in _tensors(out):
                    if self._sources(t) is not None:
                        self._mark(t, frozenset({name}))

        return post

    def _mark(self, t: torch.Tensor, sources: frozenset[str]) -> None:
        self._marked[id(t)] = (weakref.ref(t), sources)

    def _sources(self, t: torch.Tensor) -> frozenset[str] | None:
        """The projections ``t`` derives from (None: not computed from the input)."""
        entry = self._marked.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [(t, src) for t in _tensors((args, kwargs)) if (src := self._sources(t)) is not None]
        if not inputs:
            return out
        where = self._stack[-1] if self._stack else None
        product = func in _PRODUCTS or func is torch.einsum
        sources = frozenset().union(*(src for _, src in inputs))
        if where is not None and (func is F.scaled_dot_product_attention or (product and len(inputs) >= 2)):
            self.found.setdefault(where, "sdpa" if func is F.scaled_dot_product_attention else "product")
            self._roles(where, [src for _, src in inputs], func is F.scaled_dot_product_attention)
            sources = sources | {"@" + where}
        for t in _tensors(out):
            self._mark(t, sources)
        return out

    def _roles(self, where: str, operands: list[frozenset[str]], sdpa: bool) -> None:
        roles = self.roles.setdefault(where, {"q": set(), "k": set(), "v": set()})
        own = [{n for n in src if not n.startswith("@")} for src in operands]
        if sdpa:
            for role, names in zip("qkv", own):
                roles[role] |= names
            return
        flagged = ["@" + where in src for src in operands]
        if any(flagged):  # a product's result times an operand: the values
            roles["v"] |= set().union(*(n for n, f in zip(own, flagged) if not f))
        else:
            roles["q"] |= own[0]
            roles["k"] |= set().union(*own[1:])

    def close(self) -> None:
        """Remove the hooks (the mode can be entered again until then)."""
        for h in self._handles:
            h.remove()
        self._handles = []


def traced_attention(model: nn.Module, in_channels: int, size: tuple[int, int]) -> list[str]:
    """The modules of ``model`` that compute attention in one forward on a (1, in_channels, H, W)
    input: shapes only (:func:`mmpeft.targeting.shapes.meta_forward`), else a real forward under
    ``torch.no_grad`` in eval mode (modes restored). Empty when the model cannot run on that input
    (the reason logged)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    trace = AttentionTrace(model)
    try:  # the hooks removed and the modes restored on every path
        return _trace(model, trace, in_channels, size)
    finally:
        trace.close()
        for m, training in modes:
            m.training = training


def _trace(model: nn.Module, trace: AttentionTrace, in_channels: int, size: tuple[int, int]) -> list[str]:
    from .shapes import meta_forward

    try:
        meta_forward(model, [(1, in_channels, *size)], _dtype(model), inner=trace)
        return list(trace.found)
    except Exception as err:
        _LOG.info("shape-only attention trace of %s failed (%s); running it for real", type(model).__name__, err)
        trace.found.clear()
    try:
        p = next((t for t in model.parameters() if t.is_floating_point()), None)
        x = torch.rand(1, in_channels, *size, device=p.device if p is not None else None, dtype=_dtype(model))
        with torch.no_grad(), trace:
            model(x)
        return list(trace.found)
    except Exception as err:
        _LOG.info("attention trace of %s failed (%s: %s)", type(model).__name__, type(err).__name__, err)
        return []


def _dtype(model: nn.Module) -> torch.dtype:
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    return p.dtype if p is not None else torch.float32
