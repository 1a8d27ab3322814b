"""Making a host model's wrapped modules visible before wrapping (run by ``wrap_multimodal``).

Some backbones read a projection's ``.weight`` instead of calling the module, which would bypass
(or crash on) a multimodal layer put in its place. :func:`prepare_backbone` turns each known case
into an equivalent model whose projections are called, and lists the running-statistics norms
to keep in eval mode (:mod:`mmpeft.runtime.norms`). Every change keeps the model's function and its state-dict keys.

- timm attentions with q/v biases and a ``qkv_bias_separate`` switch (``EvaAttention`` of
  EVA02, BEiT's ``Attention``, Swin V2's ``WindowAttention``) compute
  ``F.linear(x, self.qkv.weight, qkv_bias)``; timm's own ``qkv_bias_separate = True`` makes them
  call ``self.qkv(x)`` and add the bias after (the same sum, rounding aside).
- torchvision's ``EncoderBlock.self_attention`` (``nn.MultiheadAttention``) becomes
  :class:`mmpeft.backbones.torchvision_vit.ExplicitMultiheadAttention`.
- torchvision's Swin ``ShiftedWindowAttention`` / ``V2`` get a forward calling ``qkv`` and ``proj``
  (:mod:`mmpeft.backbones.torchvision_swin`; the module's class changes, nothing else).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..errors import MmpeftValueError
from ..runtime.norms import frozen_norms

__all__ = ["BypassError", "check_targets_callable", "prepare_backbone", "unchanged_on_error", "unchanged_after"]


class BypassError(MmpeftValueError):
    """A targeted module would be read by its parent (``.weight``) rather than called."""


def _separate_qkv_bias(model: nn.Module) -> list[str]:
    """timm attentions (Eva, BEiT, Swin V2) that read ``qkv.weight`` when they have q/v biases:
    switched to timm's ``qkv_bias_separate`` path, which calls ``qkv``."""
    changed = []
    for name, m in model.named_modules():
        if type(m).__module__.startswith("timm.") and hasattr(m, "qkv_bias_separate"):
            if getattr(m, "qkv", None) is not None and getattr(m, "q_bias", None) is not None:
                m.qkv_bias_separate = True
                changed.append(name)
    return changed


def prepare_backbone(model: nn.Module) -> dict[str, list[str]]:
    """Make ``model``'s projections called modules and lock its norms, in place.

    Returns the names of the modules changed, per kind of change (``"eva_qkv_bias"``: every timm
    attention switched to ``qkv_bias_separate``, EVA's or not; ``"explicit_attention"``,
    ``"explicit_window_attention"``, ``"frozen_norms"``).
    """
    report = {"eva_qkv_bias": _separate_qkv_bias(model), "explicit_attention": [], "explicit_window_attention": []}
    if any(type(m).__module__.startswith("torchvision.") for m in model.modules()):
        from ..backbones.torchvision_swin import make_swin_attention_explicit
        from ..backbones.torchvision_vit import make_attention_explicit

        report["explicit_attention"] = make_attention_explicit(model)
        report["explicit_window_attention"] = make_swin_attention_explicit(model)
    report["frozen_norms"] = frozen_norms(model)
    return report


def check_targets_callable(model: nn.Module, names: list[str]) -> None:
    """Raise :class:`BypassError` when a target lives inside an ``nn.MultiheadAttention`` (which
    reads its ``out_proj.weight`` directly): wrapping it could never take effect."""
    for name in names:
        parts = name.split(".")
        for i in range(len(parts) - 1, -1, -1):
            parent = model.get_submodule(".".join(parts[:i]))
            if isinstance(parent, nn.MultiheadAttention):
                raise BypassError(
                    f"{name} is part of the nn.MultiheadAttention {'.'.join(parts[:i]) or '<model>'}, which reads "
                    "its projections' weights directly, so a multimodal layer there would be bypassed. Target "
                    "the attention module itself (adapter 'after'), or swap it for "
                    "mmpeft.backbones.torchvision_vit.ExplicitMultiheadAttention.from_torch(...) first"
                )


def _module_state(module: nn.Module) -> tuple[type, dict[str, Any], dict[str, dict[Any, Any]]]:
    """(class, attributes, copies of the dict attributes: children, parameters, buffers, hooks)."""
    attrs = dict(module.__dict__)
    return type(module), attrs, {k: dict(v) for k, v in attrs.items() if isinstance(v, dict)}


@contextlib.contextmanager
def unchanged_on_error(model: nn.Module) -> Iterator[None]:
    """Run the block; on any exception put ``model`` back exactly as it was and re-raise.

    Every module's class, attributes, children, parameters, buffers and hooks, and every
    parameter's ``requires_grad`` and data are recorded (references, no tensor is copied) and
    restored: the wrap refuses without a trace even when a check fails after a change (the
    checks come first; this is the guarantee behind them)."""
    restore = _snapshot(model)
    try:
        yield
    except BaseException:
        restore()
        raise


@contextlib.contextmanager
def unchanged_after(model: nn.Module) -> Iterator[None]:
    """Run the block and put ``model`` back exactly as it was afterwards, whatever happened (a dry
    run that prepares the model in place, as the wrap would, without copying its tensors)."""
    restore = _snapshot(model)
    try:
        yield
    finally:
        restore()


def _snapshot(model: nn.Module) -> Any:
    """A function putting ``model`` back as it is now (:func:`unchanged_on_error`)."""
    modules = {id(m): (m, _module_state(m)) for m in model.modules()}
    params = [(p, p.requires_grad, p.data) for p in model.parameters()]

    def restore() -> None:
        for m, (cls, attrs, dicts) in modules.values():
            if type(m) is not cls:
                m.__class__ = cls
            for k in [k for k in m.__dict__ if k not in attrs]:
                del m.__dict__[k]
            for k, v in attrs.items():
                if k in dicts:
                    v.clear()
                    v.update(dicts[k])
                m.__dict__[k] = v
        with torch.no_grad():
            for p, flag, data in params:
                if p.data is not data:
                    p.data = data
                p.requires_grad_(flag)

    return restore
