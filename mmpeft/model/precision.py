"""The wrapped model's precision, however it was set: ``wrap_multimodal(base_dtype=)``,
``set_base_dtype``, ``.to(dtype)`` / ``.bfloat16()`` / ``.half()`` on the wrapped model, or a base
model already in bf16 / fp16 when wrapped or loaded.

After any of them :func:`sync_dtype` reads the frozen model's dtype and makes the rest agree: the
compute dtype (inputs cast to it after the stems) is the frozen dtype unless it is float32, and
the trainable tensors are float32 masters on a bf16 / fp16 base (peft's ``autocast_adapter_dtype=True``: the
forward casts them to the compute dtype, their gradients arrive in float32) unless the model's
``autocast_adapter_dtype`` is False (then they take the frozen dtype). ``save_pretrained``
records the compute dtype as ``base_dtype``, so loading restores it.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import MmpeftTypeError

__all__ = ["LOW_PRECISION", "frozen_dtype", "sync_dtype", "check_autocast"]

#: frozen dtypes under which the trainable tensors stay float32 masters by default
LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_autocast(value: Any) -> bool:
    """``value`` if it is a bool; a TypeError naming ``autocast_adapter_dtype`` otherwise."""
    if not isinstance(value, bool):
        raise MmpeftTypeError(
            f"autocast_adapter_dtype must be a bool, got {value!r} (True: trainable tensors stay float32 on a "
            "bf16 / fp16 base, as peft; False: they take the base's dtype)"
        )
    return value


def frozen_dtype(wrapped: Any) -> torch.dtype | None:
    """The dtype of the frozen model's first floating parameter (None: it has none)."""
    own = {id(t) for t in wrapped.trainable_tensors()}
    for t in wrapped.base_model.parameters():
        if id(t) not in own and t.is_floating_point():
            return t.dtype
    return None


@torch.no_grad()
def sync_dtype(wrapped: Any) -> None:
    """Make the compute dtype and the trainable tensors agree with the frozen model's dtype."""
    dt = frozen_dtype(wrapped)
    if dt is None:
        return
    low = dt in LOW_PRECISION
    wrapped._compute_dtype = None if dt == torch.float32 else dt
    keep = torch.float32 if low and wrapped.autocast_adapter_dtype else dt
    for t in wrapped.trainable_tensors():
        if t.is_floating_point() and t.dtype != keep:
            t.data = t.data.to(keep)
