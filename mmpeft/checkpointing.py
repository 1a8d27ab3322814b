"""Activation (gradient) checkpointing of frozen blocks, for any backbone."""

from __future__ import annotations

import re
from functools import partial
from typing import Any

import torch.utils.checkpoint as cp
from torch import nn

__all__ = ["enable_gradient_checkpointing", "disable_gradient_checkpointing"]

_ORIG = "_mmpeft_orig_forward"


def _checkpointed(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    fwd = getattr(module, _ORIG)
    if not module.training:
        return fwd(*args, **kwargs)
    # non-reentrant: gradients reach the trainable layers inside even when the block input
    # itself does not require grad (frozen patch embedding before the first block)
    return cp.checkpoint(fwd, *args, use_reentrant=False, **kwargs)


def enable_gradient_checkpointing(model: nn.Module, pattern: str = r"(.*\.)?blocks\.\d+") -> list[str]:
    """Recompute the activations of every module whose name fully matches ``pattern`` in backward.

    Module names and state-dict keys are unchanged (the instance's ``forward`` is replaced).
    Only active in training mode. Returns the names of the checkpointed modules.
    """
    names = []
    for name, module in model.named_modules():
        if name and re.fullmatch(pattern, name) and not hasattr(module, _ORIG):
            setattr(module, _ORIG, module.forward)
            module.forward = partial(_checkpointed, module)  # type: ignore[method-assign]
            names.append(name)
    if not names:
        raise ValueError(f"no module name matches {pattern!r}; nothing to checkpoint")
    return names


def disable_gradient_checkpointing(model: nn.Module) -> None:
    """Undo :func:`enable_gradient_checkpointing`."""
    for module in model.modules():
        if hasattr(module, _ORIG):
            orig = getattr(module, _ORIG)
            delattr(module, _ORIG)
            if getattr(orig, "__self__", None) is module and getattr(orig, "__func__", None) is type(module).forward:
                del module.forward  # the class's own forward again, no instance attribute left
            else:
                module.forward = orig  # type: ignore[method-assign]
