"""The wrapped model's block features and precision, as methods (mixed into ``MultimodalModel``).

Efficient attention (:mod:`mmpeft.runtime.attention`), gradient checkpointing (:mod:`mmpeft.runtime.checkpointing`)
and regional compilation change how the frozen model's blocks run; ``set_base_dtype`` keeps the
frozen weights in a low precision while the trainable tensors stay float32 masters.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import MmpeftValueError
from ..runtime.attention import disable_efficient_attention, efficient_attention_blocks, enable_efficient_attention
from ..runtime.checkpointing import (
    DEFAULT_PATTERN,
    checkpointed_blocks,
    disable_gradient_checkpointing,
    enable_gradient_checkpointing,
)
from ..utils import resolve_dtype
from .precision import sync_dtype

__all__ = ["BlockFeatures"]


class BlockFeatures:
    """Methods of :class:`~mmpeft.MultimodalModel` over its ``base_model``'s blocks and dtype."""

    base_model: nn.Module
    _compute_dtype: torch.dtype | None

    def enable_efficient_attention(self, queries: str = "auto", rel_pos: str = "mask") -> list[str]:
        """Run SAM-style blocks padding-free with fused attention (:mod:`mmpeft.runtime.attention`; ``queries``
        and ``rel_pos`` as there); returns the names of the blocks affected."""
        return enable_efficient_attention(self.base_model, queries, rel_pos)

    def disable_efficient_attention(self) -> int:
        """The stock blocks again; returns how many were changed."""
        return disable_efficient_attention(self.base_model)

    def set_grad_checkpointing(self, enable: bool = True, pattern: str | None = None) -> list[str]:
        """Recompute the frozen blocks' activations in backward (:mod:`mmpeft.runtime.checkpointing`).

        ``pattern``: a regex over module names of the base model (default: ``blocks.<i>``).
        Returns the names of the modules checkpointed (empty when disabling).
        """
        if not enable:
            disable_gradient_checkpointing(self.base_model)
            return []
        return enable_gradient_checkpointing(self.base_model, pattern or DEFAULT_PATTERN)

    def compile_blocks(self, **compile_options: Any) -> list[str]:
        """Regional compilation: ``torch.compile`` each repeated block of the frozen model in place.

        Every module in a ``ModuleList`` or ``Sequential`` of two or more modules of one class (a ViT's
        ``blocks``) is compiled with ``nn.Module.compile(**compile_options)``; blocks of one kind share
        their compiled code, so compile time is that of one or two blocks, not of the whole model.
        Returns the names of the compiled blocks. The whole model can instead be compiled with
        ``torch.compile(model)``; both compute the same function as eager (tests).
        """
        names: list[str] = []
        for name, mod in self.base_model.named_modules():
            if any(name.startswith(n + ".") for n in names):
                continue  # inside an already compiled block
            if isinstance(mod, (nn.ModuleList, nn.Sequential)) and len(mod) > 1 and len({type(b) for b in mod}) == 1:
                for i, block in enumerate(mod):
                    block.compile(**compile_options)
                    names.append(f"{name}.{i}" if name else str(i))
        if not names:
            raise MmpeftValueError(f"{type(self.base_model).__name__} has no list of repeated blocks to compile")
        return names

    def block_features(self) -> dict[str, list[str]]:
        """The blocks running with each feature: ``efficient_attention``, ``checkpointing``."""
        return {
            "efficient_attention": efficient_attention_blocks(self.base_model),
            "checkpointing": checkpointed_blocks(self.base_model),
        }

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The dtype inputs are cast to before the frozen model (None: left as given)."""
        return self._compute_dtype

    def set_base_dtype(self, dtype: torch.dtype | str | None) -> None:
        """Keep the frozen model's floating tensors in ``dtype`` (e.g. ``torch.bfloat16``).

        On a bf16 / fp16 base the trainable tensors (multimodal layers, stems, modules to save) stay
        float32: they are the master copies the optimizer updates, cast to the compute dtype inside
        the forward (their gradients arrive in float32); with the model's ``autocast_adapter_dtype``
        False, or another dtype (float64), they take ``dtype`` too. Inputs are cast to ``dtype`` after
        the stems, so the frozen model runs in ``dtype`` with or without autocast. ``None`` or float32
        restores float32. The same rule as ``.to(dtype)`` (:func:`mmpeft.model.precision.sync_dtype`).
        """
        dt = resolve_dtype(dtype) or torch.float32
        own = {id(t) for t in self.trainable_tensors()}  # type: ignore[attr-defined]  # MultimodalModel's
        for t in list(self.base_model.parameters()) + list(self.base_model.buffers()):
            if t.is_floating_point() and id(t) not in own:
                t.data = t.data.to(dt)
        sync_dtype(self)  # the compute dtype and the trainable tensors: one rule (mmpeft.model.precision)
