"""One family of vision transformers: the module names the presets target (:class:`BackboneFamily`),
and the registry of families (:data:`FAMILIES`, :func:`register_family`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..config import Targets
from ..errors import MmpeftTypeError, MmpeftValueError
from ..utils import register

__all__ = ["BackboneFamily", "FAMILIES", "register_family"]


@dataclass(frozen=True)
class BackboneFamily:
    """Module-name suffixes of the parts the presets target in one family of ViTs.

    Attributes:
        name: the family's key in :data:`FAMILIES`.
        qkv: the fused qkv ``nn.Linear`` (LoRA on its q and v thirds); None when the family has
            separate ``q`` and ``v`` projections.
        mlp_in, mlp_out: the MLP's two linears.
        attn: the module an "after" adapter follows: the attention, or its output projection.
        mlp: the MLP, which a "beside" adapter runs parallel to.
        q, v: separate query / value ``nn.Linear`` names (when ``qkv`` is None).
        kv: a fused key-value ``nn.Linear`` (PVTv2's ``attn.kv``, rows k then v) used with ``q``
            instead of ``v``: LoRA on its v half.
        scope: regex of the block names the presets are limited to (None: every name match);
            with a scope the rules' targets are regexes, else name lists.
        mlp_gate: a second first-layer MLP linear (SwiGLU's gate, e.g. timm's ``mlp.fc1_g``),
            tuned like ``mlp_in``.
        classes: class names (``module.qualname``) of which one must be present (checked
            first; empty: detection by names only).
        prepared: the targeted names exist only once :func:`mmpeft.targeting.prepare.prepare_backbone`
            has run (``wrap_multimodal`` runs it): detection by ``classes`` alone.
        adapter_refused: why the adapter presets cannot place their adapters in this family
            (None: they can); wrapping with one raises ValueError with this reason.
        note: one line on what the family is and what the presets do differently.
        qkv_whole: LoRA on the whole fused ``qkv`` instead of its q and v slices (a 1x1
            ``nn.Conv2d`` takes no slices: Visformer, MobileViT v2).
        qk: a fused query-key ``nn.Linear`` (TNT's ``attn_out.qk``, rows q then k) used with ``v``
            instead of ``q``: LoRA on its q half.
    """

    name: str
    qkv: str | None
    mlp_in: str
    mlp_out: str
    attn: str
    mlp: str
    q: str | None = None
    v: str | None = None
    scope: str | None = None
    mlp_gate: str | None = None
    classes: tuple[str, ...] = ()
    prepared: bool = False
    kv: str | None = None
    adapter_refused: str | None = None
    note: str = ""
    qkv_whole: bool = False
    qk: str | None = None

    def __post_init__(self) -> None:
        split = ((self.q is None) != (self.qk is None)) and ((self.v is None) != (self.kv is None))
        if (self.qkv is None) != split or (self.qkv is not None and any((self.q, self.qk, self.v, self.kv))):
            raise MmpeftValueError(f"family {self.name!r}: give either qkv, or one of q / qk and one of v / kv")

    def targets(self, *parts: str) -> Targets:
        """Targets selecting ``parts`` (name suffixes), within :attr:`scope` when set."""
        if self.scope is None:
            return list(parts)
        return rf"{self.scope}\.({'|'.join(re.escape(p) for p in parts)})"

    def required(self) -> list[str]:
        """Name suffixes that must exist in a model of this family (after preparation)."""
        attn = [self.qkv] if self.qkv is not None else [self.q or self.qk, self.v or self.kv]
        return [n for n in (*attn, *self.mlp_linears()) if n is not None]

    def mlp_linears(self) -> list[str]:
        """The MLP's linears the LoRA presets tune (gate, input, output)."""
        return [n for n in (self.mlp_gate, self.mlp_in, self.mlp_out) if n is not None]


#: ``{name: BackboneFamily}`` in detection order (:func:`mmpeft.targeting.targets.detect_family`
#: takes the first that fits); the built-in ones are registered by :mod:`mmpeft.targeting.targets`.
FAMILIES: dict[str, BackboneFamily] = {}


def register_family(family: BackboneFamily, *, replace: bool = False) -> BackboneFamily:
    """Add ``family`` to :data:`FAMILIES` under its name and return it; a name taken by another
    family is an error naming it unless ``replace=True`` (:func:`mmpeft.utils.register`).

    Detection order: a family with marker ``classes`` is tried before every family detected by
    names alone, each group in the order registered (a replaced family keeps its place)."""
    if not isinstance(family, BackboneFamily):
        raise MmpeftTypeError(f"register_family takes a BackboneFamily, got {type(family).__name__}")
    register(FAMILIES, family.name, family, kind="backbone family", replace=replace)
    ordered = sorted(FAMILIES.values(), key=lambda f: not f.classes)  # stable: registration order kept
    FAMILIES.clear()
    FAMILIES.update((f.name, f) for f in ordered)
    return family
