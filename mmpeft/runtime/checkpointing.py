"""Activation (gradient) checkpointing of frozen blocks, for any backbone."""

from __future__ import annotations

import re

from torch import nn

from ..errors import MmpeftValueError
from .blocks import blocks_with, runner_of, set_block_features

__all__ = ["enable_gradient_checkpointing", "disable_gradient_checkpointing", "checkpointed_blocks"]

DEFAULT_PATTERN = r"(.*\.)?blocks\.\d+"


def enable_gradient_checkpointing(model: nn.Module, pattern: str = DEFAULT_PATTERN) -> list[str]:
    """Recompute the activations of every module whose name fully matches ``pattern`` in backward.

    Module names and state-dict keys are unchanged (a :class:`mmpeft.runtime.blocks.BlockRunner` runs the
    module). Only active in training mode; composes with :mod:`mmpeft.runtime.attention` in either order.
    Returns the names of the checkpointed modules.
    """
    names = []
    for name, module in model.named_modules():
        if name and re.fullmatch(pattern, name):
            runner = runner_of(module)
            if runner is not None and runner.checkpoint:
                continue
            set_block_features(module, checkpoint=True)
            names.append(name)
    if not names and not checkpointed_blocks(model):
        raise MmpeftValueError(f"no module name matches {pattern!r}; nothing to checkpoint")
    return names


def disable_gradient_checkpointing(model: nn.Module) -> int:
    """Undo :func:`enable_gradient_checkpointing`; returns how many modules were changed."""
    count = 0
    for module in model.modules():
        runner = runner_of(module)
        if runner is not None and runner.checkpoint:
            set_block_features(module, checkpoint=False)
            count += 1
    return count


def checkpointed_blocks(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` running with gradient checkpointing."""
    return blocks_with(model, lambda r: r.checkpoint)
