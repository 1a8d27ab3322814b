"""One mechanism for the features that change how a block of the frozen model runs.

Efficient attention (:mod:`mmpeft.runtime.attention`) replaces a SAM-style block's function by an
equivalent one; gradient checkpointing (:mod:`mmpeft.runtime.checkpointing`) recomputes a block's
activations in backward. Both are settings of one :class:`BlockRunner` installed as the block's
instance ``forward`` (names and state-dict keys unchanged, like timm's ``set_grad_checkpointing``):
the runner composes them (checkpointing wraps whichever function computes the block) and the
block gets its class's own ``forward`` back when no feature is left.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.utils.checkpoint as cp
from torch import nn

from ..errors import MmpeftValueError

__all__ = ["BlockRunner", "runner_of", "set_block_features", "blocks_with"]

#: ``efficient(block, *args, **kwargs)``: an equivalent implementation of the block's forward.
BlockFn = Callable[..., Any]


class BlockRunner:
    """The instance ``forward`` of a block with mmpeft features.

    Attributes:
        block: the block it runs.
        efficient: an equivalent implementation of the block's forward, or None (the class's).
        checkpoint: recompute the block's activations in backward (training mode only).
    """

    def __init__(self, block: nn.Module) -> None:
        self.block = block
        self.efficient: BlockFn | None = None
        self.checkpoint = False

    def _function(self) -> Callable[..., Any]:
        if self.efficient is not None:
            efficient = self.efficient
            return lambda *a, **k: efficient(self.block, *a, **k)
        return type(self.block).forward.__get__(self.block)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fn = self._function()
        if self.checkpoint and self.block.training:
            # non-reentrant: gradients reach the trainable layers inside even when the block
            # input itself does not require grad (frozen patch embedding before the first block)
            return cp.checkpoint(fn, *args, use_reentrant=False, **kwargs)
        return fn(*args, **kwargs)

    @property
    def active(self) -> bool:
        return self.efficient is not None or self.checkpoint


def runner_of(block: nn.Module) -> BlockRunner | None:
    """The :class:`BlockRunner` installed on ``block``, or None."""
    fwd = vars(block).get("forward")
    return fwd if isinstance(fwd, BlockRunner) else None


_UNSET: Any = object()


def set_block_features(
    block: nn.Module, *, efficient: BlockFn | None = _UNSET, checkpoint: bool | None = None
) -> BlockRunner | None:
    """Set (or clear, with ``None`` / ``False``) the features of ``block``; returns its runner,
    or None once no feature is left (the block runs its class's forward again)."""
    runner = runner_of(block)
    if runner is None:
        if "forward" in vars(block):
            raise MmpeftValueError(f"{type(block).__name__} already has an instance forward set by other code")
        runner = BlockRunner(block)
    if efficient is not _UNSET:
        runner.efficient = efficient
    if checkpoint is not None:
        runner.checkpoint = checkpoint
    if runner.active:
        block.forward = runner
        return runner
    vars(block).pop("forward", None)
    return None


def blocks_with(model: nn.Module, feature: Callable[[BlockRunner], bool]) -> list[str]:
    """Names of the modules of ``model`` whose runner has ``feature`` (e.g. ``lambda r: r.checkpoint``)."""
    return [n for n, m in model.named_modules() if (r := runner_of(m)) is not None and feature(r)]
