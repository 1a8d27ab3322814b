"""Parameter accounting: trainable and frozen parameters by group."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from ..errors import MmpeftKeyError, MmpeftValueError
from ..tuners import METHODS

__all__ = ["ParamGroup", "ParamReport", "count_parameters", "trainable_summary", "kind_of", "is_trainable_name"]


def _prefixes() -> dict[str, str]:
    """{name prefix: group}: each registered method's (``lora_``, ``adapter_``) and the stems'."""
    return {**{f"{name}_": name for name in METHODS}, "stem_": "stem"}


def is_trainable_name(name: str) -> bool:
    """True when a parameter name looks like a mmpeft module's (a segment starts with a method's
    prefix, ``stem_``, or is a module to save's ``trained_module``): for display and grouping only;
    what trains and is saved is found structurally (``MultimodalModel.trainable_names``)."""
    return kind_of(name) != "base"


@dataclass
class ParamGroup:
    """Parameter counts of one group."""

    name: str
    trainable: int = 0
    frozen: int = 0

    @property
    def total(self) -> int:
        return self.trainable + self.frozen


@dataclass
class ParamReport:
    """Per-group counts plus totals; ``str(report)`` is a Markdown table."""

    groups: list[ParamGroup] = field(default_factory=list)

    @property
    def trainable(self) -> int:
        return sum(g.trainable for g in self.groups)

    @property
    def frozen(self) -> int:
        return sum(g.frozen for g in self.groups)

    @property
    def total(self) -> int:
        return self.trainable + self.frozen

    def __getitem__(self, name: str) -> ParamGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise MmpeftKeyError(f"no parameter group {name!r}; groups: {[g.name for g in self.groups]}")

    def to_dict(self) -> dict[str, dict[str, int]]:
        d = {g.name: {"trainable": g.trainable, "frozen": g.frozen} for g in self.groups}
        d["total"] = {"trainable": self.trainable, "frozen": self.frozen}
        return d

    def __str__(self) -> str:
        rows = ["| group | trainable | frozen |", "|---|---:|---:|"]
        rows += [f"| {g.name} | {g.trainable:,} | {g.frozen:,} |" for g in self.groups]
        rows.append(f"| **total** | **{self.trainable:,}** | **{self.frozen:,}** |")
        return "\n".join(rows)


def kind_of(name: str) -> str:
    """Group of a parameter by the mmpeft prefix in its name (lora, adapter, fusion, stem,
    modules_to_save, base)."""
    parts = name.split(".")
    if any(p.endswith("_fusion") and p.removesuffix("_fusion") in METHODS for p in parts):
        return "fusion"
    for prefix, kind in _prefixes().items():
        if any(p.startswith(prefix) for p in parts):
            return kind
    if "trained_module" in parts:
        return "modules_to_save"
    return "base"


def count_parameters(model: nn.Module, by: str | Callable[[str], str] = "kind", depth: int = 1) -> ParamReport:
    """Count trainable (requires_grad) and frozen parameters of ``model`` by group.

    Args:
        by: ``"kind"`` (lora / adapter / fusion / stem / base), ``"module"`` (the first ``depth``
            components of the name) or a function mapping a parameter name to its group.
        depth: name components used by ``"module"``.

    Shared parameters are counted once. Works on the meta device.
    """
    if by == "kind":
        group_of: Callable[[str], str] = kind_of
    elif by == "module":
        group_of = lambda n: ".".join(n.split(".")[:depth])  # noqa: E731
    elif callable(by):
        group_of = by
    else:
        raise MmpeftValueError(f"by must be 'kind', 'module' or a callable, got {by!r}")
    groups: dict[str, ParamGroup] = {}
    for name, p in model.named_parameters():  # named_parameters de-duplicates shared tensors
        g = groups.setdefault(group_of(name), ParamGroup(group_of(name)))
        if p.requires_grad:
            g.trainable += p.numel()
        else:
            g.frozen += p.numel()
    return ParamReport(list(groups.values()))


def trainable_summary(model: nn.Module) -> str:
    """peft-style line: ``trainable params: T || all params: A || trainable%: P``."""
    rep = count_parameters(model)
    pct = 100.0 * rep.trainable / max(rep.total, 1)
    return f"trainable params: {rep.trainable:,} || all params: {rep.total:,} || trainable%: {pct:.4f}"
