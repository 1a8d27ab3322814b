"""Checks shared by the methods' configs (targets, fusion rule, lambda_init)."""

from __future__ import annotations

from typing import Any

from ..errors import MmpeftTypeError, MmpeftValueError
from ..utils import check_number
from .fusion import FUSION_RULES

__all__ = ["Targets", "check_targets", "check_fusion"]

#: a list of module names (suffix match) or one regex over the whole qualified name.
Targets = str | list[str]


def check_targets(targets: Any) -> Targets:
    """``targets`` as a regex string or a non-empty list of names."""
    if isinstance(targets, str):
        return targets
    targets = list(targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise MmpeftValueError(f"targets must be a regex string or a non-empty list of module names, got {targets!r}")
    return targets


def check_fusion(fusion: Any, lambda_init: Any) -> float:
    """Validate the fusion rule's name (a rule registered in this process) and its initial value
    (a finite real number: any sign; 0.5 in the paper). Returns ``lambda_init`` as a float."""
    if not isinstance(fusion, str):
        raise MmpeftTypeError(f"fusion must be a fusion rule's name (a str), got {type(fusion).__name__}: {fusion!r}")
    if fusion not in FUSION_RULES:
        raise MmpeftValueError(
            f"unknown fusion rule {fusion!r}; known: {sorted(FUSION_RULES)} (a rule of your own must be "
            "registered with mmpeft.register_fusion before building or loading a config that names it)"
        )
    value = check_number("lambda_init", lambda_init)
    if fusion == "none" and value != 0.5:  # 0.5: the default, given or not
        raise MmpeftValueError(
            f"lambda_init={lambda_init!r} with fusion='none': that rule has no fusion parameters, so lambda_init "
            "would change nothing; drop lambda_init or choose a rule that mixes ('scalar', 'matrix')"
        )
    return value
