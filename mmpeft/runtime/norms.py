"""Running-statistics norms in a frozen backbone: locked in eval mode, never mixing modalities.

A BatchNorm in training mode normalises with statistics over the whole batch. On the stacked
``(M*B, ...)`` batch that would mix the modalities (the optical output would depend on the DSM)
and update running statistics that belong to the frozen model. :func:`frozen_norms` lists every
``_BatchNorm`` (BatchNorm1d/2d/3d, SyncBatchNorm and subclasses such as timm's ``BatchNormAct2d``)
and every InstanceNorm that tracks running statistics; the wrapped model keeps them in eval mode
(``MultimodalModel.train`` puts them back after every mode change): they normalise with their
frozen running statistics whatever ``model.train()`` says, exactly as the frozen model in ``eval()``. A BatchNorm without running statistics has nothing to freeze and
always mixes the batch: wrapping refuses it.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ..errors import MmpeftValueError

__all__ = ["MixingNormError", "frozen_norms"]


class MixingNormError(MmpeftValueError):
    """A norm of the frozen model would compute statistics over all modalities together."""


def frozen_norms(model: nn.Module) -> list[str]:
    """Names of the running-statistics norms of ``model`` (to keep in eval mode), each set to eval now.

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
        module.eval()
        locked.append(name)
    return locked
