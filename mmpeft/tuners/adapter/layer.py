"""Multimodal bottleneck adapter beside or after a frozen module."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from ...errors import MmpeftValueError
from ...utils import check_int
from ..base import MultimodalLayer, by_modality
from ..fusion import Fusion, build_fusion, lowrank_mix
from ..lowrank import mixed_up, stacked_linear
from ..outputs import cat_rests, chunk_args, first_output, only_x, with_first

__all__ = ["MultimodalAdapter"]

Placement = Literal["beside", "after"]


class MultimodalAdapter(MultimodalLayer):
    """Per-modality bottleneck adapters ``up_m(act(down_m(z_m)))``, mixed by a fusion rule.

    Placement ``"beside"`` (parallel, e.g. the MLP; ``z = x``)::

        out_m = base_layer(x_m) + scale * fusion(adapter(x))_m

    Placement ``"after"`` (sequential with its own skip, e.g. the attention; ``z = base_layer(x)``)::

        a_m = base_layer(x_m);  out_m = a_m + scale * fusion(adapter(a))_m

    With fusion ``"scalar"``, two modalities and placement ``"beside"`` around the MLP this is
    eqs. (5)-(6) of MFNet. Parameters: ``adapter_down.<modality>`` (Linear in -> hidden) and
    ``adapter_up.<modality>`` (Linear hidden -> out).

    Args:
        base_layer: the frozen module (any module mapping (..., in) to (..., out)).
        modalities: modality names in stacked order.
        in_features: channels of the adapter input (the module's input for "beside", its output
            for "after").
        out_features: channels of the module's output (defaults to ``in_features``).
        placement: ``"beside"`` or ``"after"``.
        hidden: bottleneck width (e.g. ``in_features // 4``).
        activation: activation class (``nn.GELU`` in the authors' code, ReLU in the paper's text).
        bias: biases on both projections.
        dropout: dropout after the activation.
        scale: factor on the adapter output (the paper's s; the authors' code uses 1).
        init: ``"zeros"`` zero-initialises the up projection (the wrapped model starts equal to the
            base model) or ``"default"`` keeps PyTorch's default init (the authors' code).
        fusion, lambda_init: the fusion rule and its initial value.
    """

    method = "adapter"

    def __init__(
        self,
        base_layer: nn.Module,
        modalities: Sequence[str],
        in_features: int,
        hidden: int,
        out_features: int | None = None,
        placement: Placement = "beside",
        activation: type[nn.Module] = nn.GELU,
        bias: bool = True,
        dropout: float = 0.0,
        scale: float = 1.0,
        init: Literal["zeros", "default"] = "zeros",
        fusion: str = "scalar",
        lambda_init: float = 0.5,
    ) -> None:
        super().__init__(base_layer, modalities)
        if placement not in ("beside", "after"):
            raise MmpeftValueError(f"placement must be 'beside' or 'after', got {placement!r}")
        if init not in ("zeros", "default"):
            raise MmpeftValueError(f"init must be 'zeros' or 'default', got {init!r}")
        out_features = in_features if out_features is None else out_features
        if placement == "after" and out_features != in_features:
            raise MmpeftValueError("an adapter placed 'after' a module maps its output to itself: in == out")
        check_int("hidden (the adapter's bottleneck width)", hidden)
        self.in_features, self.out_features, self.hidden = in_features, out_features, hidden
        self.placement: Placement = placement
        self.scale = scale
        p = next(iter(base_layer.parameters()), None)
        dev = p.device if p is not None else None
        dt = p.dtype if p is not None else None
        self.adapter_down = nn.ModuleDict(
            {m: nn.Linear(in_features, hidden, bias=bias, device=dev, dtype=dt) for m in self.modalities}
        )
        self.adapter_up = nn.ModuleDict(
            {m: nn.Linear(hidden, out_features, bias=bias, device=dev, dtype=dt) for m in self.modalities}
        )
        self.adapter_act = activation()
        self.adapter_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.adapter_fusion = build_fusion(fusion, self.modalities, lambda_init, device=dev)
        if init == "zeros":
            for up in self.adapter_up.values():
                nn.init.zeros_(up.weight)
                if up.bias is not None:
                    nn.init.zeros_(up.bias)

    def _fusion(self) -> Fusion:
        return self.adapter_fusion

    def cannot_merge(self) -> str | None:
        return (
            "a bottleneck adapter computes up(act(down(z))): the activation between its projections is not "
            "linear, so no weight matrix equals it (only LoRA layers merge)"
        )

    # ------------------------------------------------------------------ the forward's steps (MultimodalLayer.forward)
    # Extra arguments (e.g. timm's ``attn_mask=None``) go to the base module unchanged. When the
    # module returns a tuple (an attention's ``(output, weights)``) the first element is adapted
    # and the rest passed through (:mod:`mmpeft.tuners.outputs`).
    def _forward_one(self, x: torch.Tensor, modality: str, *args: Any, **kwargs: Any) -> Any:
        y, rest = first_output(self.base_layer(x, *args, **kwargs))
        return with_first(y + self.scale * self._adapt(x if self.placement == "beside" else y, modality), rest)

    def _forward_batched(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        y, rest = first_output(self.base_layer(x, *args, **kwargs))  # (M*B', ..., out)
        return with_first(self._adapter_update(x if self.placement == "beside" else y, y), rest)

    def _adapter_update(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + (mixed) adapter(z), batched over modalities.

        z: (M*B', ..., in), y: (M*B', ..., out) -> (M*B', ..., out).
        """
        mods = self._active()  # the modalities in the batch (all, unless some are missing)
        m = len(mods)
        downs = [self.adapter_down[k] for k in mods]
        ups = [self.adapter_up[k] for k in mods]
        bias = downs[0].bias is not None
        h = stacked_linear(z, m, [d.weight for d in downs], [d.bias for d in downs] if bias else None)
        g = self.adapter_dropout(self.adapter_act(h))  # (M, T, hid)
        fused, w = self._fused_weights()
        if fused:  # up projections, biases and mixing in one node (a new tensor: for an "after"
            # adapter y is also the input z its backward needs)
            b_up = [u.bias for u in ups] if bias else None
            return mixed_up(y, g, w, [u.weight for u in ups], biases=b_up, scale=self.scale)
        wu = torch.stack([u.weight for u in ups]).to(g.dtype)  # (M, out, hid)
        if bias:
            bu = torch.stack([u.bias for u in ups])[:, :, None].to(g.dtype)  # (M, out, 1)
            # fold the up bias into the GEMM: [g, 1] @ [U, b]^T = U g + b
            g = torch.cat([g, torch.ones_like(g[..., :1])], -1)  # (M, T, hid+1)
            wu = torch.cat([wu, bu], -1)  # (M, out, hid+1)
        if self.scale != 1.0:
            g = g * self.scale
        return lowrank_mix(self.adapter_fusion, g, wu, by_modality(y, m), weights=self._mixing()).view(y.shape)

    def _adapt(self, z: torch.Tensor, modality: str) -> torch.Tensor:
        h = self.adapter_dropout(self.adapter_act(self.adapter_down[modality](z)))
        return self.adapter_up[modality](h)

    def _forward_loop(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        m = len(self._active())
        if not only_x(x, args, kwargs):  # a further tensor (GCViT's global query) may be per sample or
            # shared: the frozen module runs once on the stacked batch, as batched; the adapters loop
            y, rest = first_output(self.base_layer(x, *args, **kwargs))
            xs, ys = x.chunk(m, 0), y.chunk(m, 0)
            return with_first(self._loop_update(xs if self.placement == "beside" else ys, ys), rest)
        parts = chunk_args(x, args, kwargs, m)  # x, and arguments that are x, split per modality
        xs = tuple(xm for xm, _, _ in parts)
        # the frozen module once per modality
        ys, rests = zip(*(first_output(self.base_layer(xm, *a, **kw)) for xm, a, kw in parts))
        return with_first(self._loop_update(xs if self.placement == "beside" else ys, ys), cat_rests(rests))

    def _loop_update(self, zs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> torch.Tensor:
        a = self._mix(torch.stack([self._adapt(z, k) for z, k in zip(zs, self._active())]))
        return torch.cat([y + self.scale * am for y, am in zip(ys, a)], 0)

    def adapt_output(self, y: torch.Tensor) -> torch.Tensor:
        """``y + scale * fusion(adapter(y))`` for an adapter placed ``"after"`` its module, given
        the module's output ``y`` (M*B', ..., out) computed elsewhere.

        The same function as ``self(x)`` with ``y = self.base_layer(x)``, in every execution mode;
        used by code that runs the wrapped module's internals itself (e.g.
        :func:`mmpeft.runtime.attention.enable_efficient_attention`).
        """
        if self.placement != "after":
            raise MmpeftValueError("adapt_output applies to adapters placed 'after' a module")
        self._note_call(y)
        if self.reference is not None:
            return self.reference.call(self, "adapt_output", y, (), {})
        if not self.adapters_enabled:
            return y
        if self.single is not None:
            return y + self.scale * self._adapt(y, self.modalities[self._check_single()])
        self._check_stack(y)
        if self.execution == "loop":
            ys = y.chunk(len(self._active()), 0)
            return self._loop_update(ys, ys)
        return self._adapter_update(y, y)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, placement={self.placement!r}, "
            f"{self.in_features}->{self.hidden}->{self.out_features}, scale={self.scale:g}"
        )
