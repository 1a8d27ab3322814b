"""Finding modules by name, backbone families and the paper's placement presets."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from torch import nn

from .config import AdapterConfig, LoRAConfig, RuleConfig, Targets

__all__ = [
    "BackboneFamily",
    "FAMILIES",
    "PRESETS",
    "detect_family",
    "match_targets",
    "preset_rules",
]


@dataclass(frozen=True)
class BackboneFamily:
    """Module-name suffixes of the parts the presets target in one family of ViTs."""

    name: str
    qkv: str
    mlp_in: str
    mlp_out: str
    attn: str
    mlp: str


FAMILIES: dict[str, BackboneFamily] = {
    # segment-anything's ImageEncoderViT: blocks.i.attn.qkv, blocks.i.mlp.lin1 / lin2
    "segment_anything": BackboneFamily("segment_anything", "attn.qkv", "mlp.lin1", "mlp.lin2", "attn", "mlp"),
    # timm's VisionTransformer / VisionTransformerSAM: blocks.i.attn.qkv, blocks.i.mlp.fc1 / fc2
    "timm": BackboneFamily("timm", "attn.qkv", "mlp.fc1", "mlp.fc2", "attn", "mlp"),
}


def _matches(name: str, targets: Targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def match_targets(model: nn.Module, targets: Targets, want: type[nn.Module] | None = None) -> list[str]:
    """Qualified names of the modules of ``model`` selected by ``targets`` (peft semantics).

    Raises ValueError listing what exists when nothing matches, and TypeError naming the module
    when a match is not of type ``want``.
    """
    names = [n for n, _ in model.named_modules() if n and _matches(n, targets)]
    if not names:
        candidates = [n for n, m in model.named_modules() if n and (want is None or isinstance(m, want))]
        suffixes = sorted({".".join(n.split(".")[-2:]) for n in candidates})
        raise ValueError(
            f"targets {targets!r} match no module of {type(model).__name__}. "
            f"Module name endings that exist{' (' + want.__name__ + ')' if want else ''}: "
            f"{suffixes[:40]}{' ...' if len(suffixes) > 40 else ''}"
        )
    if want is not None:
        modules = dict(model.named_modules())
        wrong = [n for n in names if not isinstance(modules[n], want)]
        if wrong:
            raise TypeError(
                f"targets {targets!r} select {wrong[0]} of type {type(modules[wrong[0]]).__name__}, "
                f"but this method needs {want.__name__} modules"
            )
    return names


def detect_family(model: nn.Module) -> BackboneFamily:
    """The :class:`BackboneFamily` whose qkv and MLP names exist in ``model``."""
    names = [n for n, _ in model.named_modules()]
    for fam in FAMILIES.values():
        if any(_matches(n, [fam.qkv]) for n in names) and any(_matches(n, [fam.mlp_in]) for n in names):
            return fam
    raise ValueError(
        f"cannot tell which ViT family {type(model).__name__} belongs to (looked for "
        f"{[(f.qkv, f.mlp_in) for f in FAMILIES.values()]}); pass `targets=` explicitly"
    )


def _mmlora(f: BackboneFamily) -> list[RuleConfig]:
    return [
        # q and v of the fused qkv, per modality, scaling alpha / r = 1 / 4, no cross-modal mixing
        LoRAConfig(targets=[f.qkv], rank=4, alpha=1.0, slices=["q", "v"], fusion="none"),
        # both MLP linears, lambda-mixed, unscaled (eqs. 9-12)
        LoRAConfig(targets=[f.mlp_in, f.mlp_out], rank=4, alpha=None, fusion="scalar"),
    ]


def _mmadapter(f: BackboneFamily, init: str = "zeros") -> list[RuleConfig]:
    return [
        # per-modality adapter after the attention, with its own skip
        AdapterConfig(targets=[f.attn], placement="after", ratio=0.25, fusion="none", init=init),  # type: ignore[arg-type]
        # lambda-mixed adapter beside the MLP, on the norm2 output (eqs. 5-6)
        AdapterConfig(targets=[f.mlp], placement="beside", ratio=0.25, fusion="scalar", init=init),  # type: ignore[arg-type]
    ]


def _no_mixing(rules: list[RuleConfig]) -> list[RuleConfig]:
    for r in rules:
        r.fusion = "none"
    return rules


PRESETS: dict[str, Callable[[BackboneFamily], list[RuleConfig]]] = {
    # the paper's MMLoRA (identical in the authors' code)
    "mmlora": _mmlora,
    "mmlora_authors": _mmlora,
    # the paper's MMAdapter placement; up projection zero-initialised (identity at init)
    "mmadapter": _mmadapter,
    # the authors' code: PyTorch default init of both projections (not identity at init)
    "mmadapter_authors": lambda f: _mmadapter(f, init="default"),
    # standard per-modality tuning at the same places (Table IV baselines)
    "lora": lambda f: _no_mixing(_mmlora(f)),
    "adapter": lambda f: _no_mixing(_mmadapter(f)),
    "adapter_authors": lambda f: _no_mixing(_mmadapter(f, init="default")),
    # nothing trains in the encoder (the "without Adapter" baseline of Table IV)
    "frozen": lambda f: [],
}


def preset_rules(name: str, family: BackboneFamily) -> list[RuleConfig]:
    """Fresh rule configs of preset ``name`` for ``family``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name](family)
