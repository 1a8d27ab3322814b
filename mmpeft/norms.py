"""Running-statistics norms in a frozen backbone: locked in eval mode, never mixing modalities.

A BatchNorm in training mode normalises with statistics over the whole batch. On the stacked
``(M*B, ...)`` batch that would mix the modalities (the optical output would depend on the DSM)
and update running statistics that belong to the frozen model. ``wrap_multimodal`` therefore
locks every ``_BatchNorm`` (BatchNorm1d/2d/3d, SyncBatchNorm and subclasses such as timm's
``BatchNormAct2d``) and every InstanceNorm that tracks running statistics in eval mode: they
normalise with their frozen running statistics whatever ``model.train()`` says, exactly as the
frozen model in ``eval()``. A BatchNorm without running statistics has nothing to freeze and
always mixes the batch: wrapping refuses it.
"""

from __future__ import annotations

import types

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

__all__ = ["MixingNormError", "freeze_norm_statistics", "is_frozen_norm"]


class MixingNormError(ValueError):
    """A norm of the frozen model would compute statistics over all modalities together."""


def _eval_only_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """``train()`` of a locked norm: it (and anything inside it) stays in eval mode."""
    return nn.Module.train(self, False)


def is_frozen_norm(module: nn.Module) -> bool:
    """True when ``module`` is a norm locked in eval mode by :func:`freeze_norm_statistics`."""
    return getattr(module, "_mmpeft_eval_locked", False)


def freeze_norm_statistics(model: nn.Module) -> list[str]:
    """Lock the running-statistics norms of ``model`` in eval mode, in place; returns their names.

    Raises :class:`MixingNormError` naming a BatchNorm without running statistics.
    """
    locked = []
    for name, module in model.named_modules():
        if isinstance(module, _InstanceNorm) and not module.track_running_stats:
            continue  # per-sample statistics: never mixes samples
        if not isinstance(module, (_BatchNorm, _InstanceNorm)):
            continue
        if module.running_mean is None or module.running_var is None:
            raise MixingNormError(
                f"{name or type(model).__name__} ({type(module).__name__}) has no running statistics: it "
                "always normalises over the whole stacked batch, i.e. over all modalities together. "
                "Give it running statistics (track_running_stats=True) or replace it before wrapping"
            )
        module.train = types.MethodType(_eval_only_train, module)  # type: ignore[method-assign]
        module._mmpeft_eval_locked = True  # type: ignore[assignment]
        module.eval()
        locked.append(name)
    return locked
