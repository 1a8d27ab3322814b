"""Float32 matmul precision: detected at wrap time, said when reduced.

``torch.set_float32_matmul_precision("high" | "medium")`` lets float32 matrix products run in
TF32 or bfloat16 (a CPU with bf16 units, an Ampere+ GPU). Some libraries set it on import:
``import terratorch`` sets ``"medium"``. Outputs then differ from float32 products at about 1e-3
relative, so mmpeft's equivalence guarantees (a wrapped model at init equal to the base model, the
stacked batch equal to each modality alone, merged equal to unmerged) hold at ``"highest"`` only:
:func:`warn_reduced_matmul_precision` says so at wrap time with a :class:`MatmulPrecisionWarning`.
"""

from __future__ import annotations

import warnings

import torch

from ..errors import MmpeftWarning

__all__ = ["MatmulPrecisionWarning", "warn_reduced_matmul_precision"]


class MatmulPrecisionWarning(MmpeftWarning):
    """float32 matrix products run at a reduced precision (``torch.get_float32_matmul_precision()``
    is not ``"highest"``): mmpeft's equivalences hold to about 1e-3 only."""


def warn_reduced_matmul_precision() -> str:
    """Warn (:class:`MatmulPrecisionWarning`) when float32 matmuls run below ``"highest"``
    precision; returns the precision read."""
    precision = torch.get_float32_matmul_precision()
    if precision != "highest":
        warnings.warn(
            f'torch.get_float32_matmul_precision() is "{precision}" (another library may have set it: '
            'import terratorch sets "medium"): float32 matrix products may run in TF32 / bfloat16, so the '
            "wrapped model matches the base model, and the stacked batch each modality alone, to about 1e-3 "
            'only; the equivalence guarantees hold at "highest": torch.set_float32_matmul_precision("highest")',
            MatmulPrecisionWarning,
            stacklevel=3,
        )
    return precision
