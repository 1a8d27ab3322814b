"""Finding modules by name, backbone families and the paper's placement presets.

A :class:`BackboneFamily` names, for one family of ViTs, the modules the presets target: the
attention's query and value projections (a fused qkv ``nn.Linear`` tuned on its q and v thirds,
or separate q / v linears), the two MLP linears, the module an "after" adapter follows (the
attention, or its output projection where the attention returns a tuple) and the MLP a
"beside" adapter runs parallel to. :func:`detect_family` picks the first family of
:data:`FAMILIES` whose marker classes (if any) and module names are present. docs/backbones.md
lists what each family supports and how to add one.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from ..config import AdapterConfig, LoRAConfig, RuleConfig, Targets
from ..errors import MmpeftTypeError, MmpeftValueError
from ..utils import listing
from .coverage import conv_projections, has_attention
from .family import FAMILIES, BackboneFamily, register_family
from .hybrid import HYBRID_FAMILIES
from .structure import StructureError, find_structure, warn_structural
from .traced import traced_placement

__all__ = [
    "BackboneFamily",
    "FAMILIES",
    "PRESETS",
    "detect_family",
    "match_targets",
    "preset_rules",
    "register_family",
    "structural_family",
]


_HF_SCOPE = r"(.*\.)?layers?\.\d+"  # transformers' encoder layers (not e.g. SigLIP's pooling head)
_HF_BLOCKS = r"(.*\.)?blocks\.\d+"  # transformers' Swin / Segformer blocks (stages hold `blocks`)
_TV_SWIN = "torchvision.models.swin_transformer.ShiftedWindowAttention"
_MM_SWIN = "mmpeft.backbones.torchvision_swin.ExplicitShiftedWindowAttention"
_HF_SWIN_NO_ADAPTER = (
    "transformers' Swin layers have no module holding the whole MLP (the layer calls `intermediate` "
    "then `output` itself), so no 'beside' adapter can run parallel to it; use the LoRA presets, or "
    "pass targets= (e.g. targets=['attention.output.dense'], placement='after')"
)

_BUILT_IN = (  # the families mmpeft knows, registered below
    # timm's Eva / EVA02 (rotary): fused qkv whose bias timm adds inside F.linear reading
    # qkv.weight; mmpeft.targeting.prepare switches it to timm's own `qkv_bias_separate` so qkv is called
    BackboneFamily(
        name="timm_eva",
        qkv="attn.qkv",
        mlp_in="mlp.fc1",
        mlp_out="mlp.fc2",
        attn="attn",
        mlp="mlp",
        classes=("timm.models.eva.EvaAttention",),
        note="timm Eva / EVA02 tiny / small (fused qkv)",
    ),
    BackboneFamily(
        name="timm_eva_swiglu",
        qkv=None,
        mlp_in="mlp.fc1_x",
        mlp_out="mlp.fc2",
        attn="attn",
        mlp="mlp",
        q="attn.q_proj",
        v="attn.v_proj",
        mlp_gate="mlp.fc1_g",
        classes=("timm.models.eva.EvaAttention",),
        note="timm EVA02 base / large: separate q, k, v and a SwiGLU MLP",
    ),
    BackboneFamily(
        name="timm_eva_split",
        qkv=None,
        mlp_in="mlp.fc1",
        mlp_out="mlp.fc2",
        attn="attn",
        mlp="mlp",
        q="attn.q_proj",
        v="attn.v_proj",
        classes=("timm.models.eva.EvaAttention",),
        note="timm Eva with qkv_fused=False",
    ),
    # torchvision's VisionTransformer: nn.MultiheadAttention is swapped (mmpeft.targeting.prepare) for an
    # equivalent with an explicit `in_proj` nn.Linear and the same state-dict keys
    BackboneFamily(
        name="torchvision",
        qkv="self_attention.in_proj",
        mlp_in="mlp.0",
        mlp_out="mlp.3",
        attn="self_attention.out_proj",
        mlp="mlp",
        classes=("torchvision.models.vision_transformer.EncoderBlock",),
        prepared=True,
        note="torchvision VisionTransformer (vit_b_16, ...)",
    ),
    # timm's Hiera: HieraBlock reads `attn.q_stride`, so the "after" adapter follows the
    # attention's output projection (its last operation) instead of replacing the attention
    BackboneFamily(
        name="timm_hiera",
        qkv="attn.qkv",
        mlp_in="mlp.fc1",
        mlp_out="mlp.fc2",
        attn="attn.proj",
        mlp="mlp",
        classes=("timm.models.hiera.MaskUnitAttention",),
        note="timm Hiera (hiera_tiny_224, ...); adapter after attn.proj",
    ),
    # timm's PVTv2: separate q, fused kv (LoRA on its v half), spatial-reduction keys
    BackboneFamily(
        name="timm_pvt_v2",
        qkv=None,
        q="attn.q",
        kv="attn.kv",
        mlp_in="mlp.fc1",
        mlp_out="mlp.fc2",
        attn="attn",
        mlp="mlp",
        classes=("timm.models.pvt_v2.Attention",),
        note="timm PVTv2 (pvt_v2_b0, ...): q and the v half of kv",
    ),
    # torchvision's Swin (v1, v2): the attention reads qkv.weight / proj.weight in a function;
    # mmpeft.targeting.prepare gives it a forward that calls them (same module, same state-dict keys). The
    # "after" adapter follows attn.proj (v2's attention ends its nn.Linear list with cpb_mlp's)
    BackboneFamily(
        name="torchvision_swin",
        qkv="attn.qkv",
        mlp_in="mlp.0",
        mlp_out="mlp.3",
        attn="attn.proj",
        mlp="mlp",
        classes=(_TV_SWIN, _TV_SWIN + "V2", _MM_SWIN, _MM_SWIN + "V2"),
        note="torchvision swin_t / swin_v2_t, ...",
    ),
    # transformers' Swinv2Model (and SwinModel of transformers 4): blocks.j.attention.self.{query,
    # key,value}, the attention's output dense, intermediate.dense / output.dense; no MLP module
    BackboneFamily(
        name="hf_swinv2",
        qkv=None,
        mlp_in="intermediate.dense",
        mlp_out="output.dense",
        attn="attention.output.dense",
        mlp="intermediate",
        q="attention.self.query",
        v="attention.self.value",
        scope=_HF_BLOCKS,
        adapter_refused=_HF_SWIN_NO_ADAPTER,
        classes=(
            "transformers.models.swin.modeling_swin.SwinSelfAttention",
            "transformers.models.swinv2.modeling_swinv2.Swinv2SelfAttention",
        ),
        note="transformers Swinv2Model (SwinModel of transformers 4): LoRA presets only",
    ),
    # transformers 5's SwinModel and SegformerModel: stages' blocks.j.attention.{q,k,v,o}_proj, mlp.fc1 / fc2
    BackboneFamily(
        name="hf_swin_segformer",
        qkv=None,
        mlp_in="mlp.fc1",
        mlp_out="mlp.fc2",
        attn="attention.o_proj",
        mlp="mlp",
        q="attention.q_proj",
        v="attention.v_proj",
        scope=_HF_BLOCKS,
        classes=(
            "transformers.models.swin.modeling_swin.SwinAttention",
            "transformers.models.segformer.modeling_segformer.SegformerAttention",
        ),
        note="transformers 5 SwinModel, SegformerModel (the MiT encoder)",
    ),
    # segment-anything's ImageEncoderViT: blocks.i.attn.qkv, blocks.i.mlp.lin1 / lin2
    BackboneFamily(
        name="segment_anything",
        qkv="attn.qkv",
        mlp_in="mlp.lin1",
        mlp_out="mlp.lin2",
        attn="attn",
        mlp="mlp",
        note="segment-anything ImageEncoderViT",
    ),
    # timm's VisionTransformer (ViT, DeiT, DINOv2), VisionTransformerSAM, Swin: attn.qkv, mlp.fc1 / fc2
    BackboneFamily(
        name="timm",
        qkv="attn.qkv",
        mlp_in="mlp.fc1",
        mlp_out="mlp.fc2",
        attn="attn",
        mlp="mlp",
        note="timm ViT, DeiT, DINOv2, SAM ViT, Swin",
    ),
    # transformers' ViTModel, Dinov2Model: layers.i.attention.{q,k,v,o}_proj, mlp.fc1 / fc2;
    # the attention returns a tuple, so the "after" adapter follows its output projection
    BackboneFamily(
        name="hf_vit",
        qkv=None,
        mlp_in="mlp.fc1",
        mlp_out="mlp.fc2",
        attn="attention.o_proj",
        mlp="mlp",
        q="attention.q_proj",
        v="attention.v_proj",
        scope=_HF_SCOPE,
        note="transformers ViTModel, Dinov2Model",
    ),
    # transformers' CLIPVisionModel, SiglipVisionModel: layers.i.self_attn.{q,k,v,out}_proj
    BackboneFamily(
        name="hf_clip",
        qkv=None,
        mlp_in="mlp.fc1",
        mlp_out="mlp.fc2",
        attn="self_attn.out_proj",
        mlp="mlp",
        q="self_attn.q_proj",
        v="self_attn.v_proj",
        scope=_HF_SCOPE,
        note="transformers CLIPVisionModel, SiglipVisionModel",
    ),
)

# through register_family, as a user's family: those with marker classes are tried before those
# detected by names alone, each group in the order registered (the hybrid families after the others)
for _family in (*_BUILT_IN, *HYBRID_FAMILIES):
    register_family(_family)


def _matches(name: str, targets: Targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _names(types: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))


def match_targets(
    model: nn.Module, targets: Targets, want: type[nn.Module] | tuple[type[nn.Module], ...] | None = None
) -> list[str]:
    """Qualified names of the modules of ``model`` selected by ``targets`` (peft semantics).

    Raises ValueError listing what exists when nothing matches, and TypeError naming the module
    when a match is not of type ``want``.
    """
    names = [n for n, _ in model.named_modules() if n and _matches(n, targets)]
    if not names:
        candidates = [n for n, m in model.named_modules() if n and (want is None or isinstance(m, want))]
        suffixes = sorted({".".join(n.split(".")[-2:]) for n in candidates})
        raise MmpeftValueError(
            f"targets {targets!r} match no module of {type(model).__name__}. "
            f"Module name endings that exist{' (' + _names(want) + ')' if want else ''}: "
            f"{listing(suffixes)}"
        )
    if want is not None:
        modules = dict(model.named_modules())
        wrong = [n for n in names if not isinstance(modules[n], want)]
        if wrong:
            raise MmpeftTypeError(
                f"targets {targets!r} select {wrong[0]} of type {type(modules[wrong[0]]).__name__}, "
                f"but this method needs {_names(want)} modules"
            )
    return names


def _class_names(model: nn.Module) -> set[str]:
    return {f"{type(m).__module__}.{type(m).__qualname__}" for m in model.modules()}


def _fits(fam: BackboneFamily, names: list[str], classes: set[str]) -> bool:
    if fam.classes and not classes.intersection(fam.classes):
        return False
    if fam.prepared:
        return True
    return all(any(_matches(n, fam.targets(part)) for n in names) for part in fam.required())  # as the presets match


def structural_family(model: nn.Module) -> BackboneFamily:
    """The family ``"structural"``: the presets' modules found from ``model``'s structure by
    :func:`mmpeft.targeting.structure.find_structure` (names inside the repeated blocks, ``scope`` their
    list). Raises :class:`~mmpeft.targeting.structure.StructureError` saying what was found when ambiguous."""
    return BackboneFamily("structural", **find_structure(model).family_fields())


def detect_family(model: nn.Module) -> BackboneFamily:
    """The first :class:`BackboneFamily` of :data:`FAMILIES` that ``model`` belongs to: one of its
    marker classes is present (when it has any) and its attention and MLP names exist. Else the
    placement found from the structure (:func:`structural_family`), announced by a
    :class:`~mmpeft.targeting.structure.StructuralFamilyWarning` naming the chosen modules."""
    names = [n for n, _ in model.named_modules() if n]
    classes = _class_names(model)
    for fam in FAMILIES.values():
        if _fits(fam, names, classes):
            return fam
    try:
        structure = find_structure(model)
    except StructureError as err:
        traced = traced_placement(model)  # convolutional attention, found by what it computes
        if traced is None:
            raise MmpeftValueError(_unplaced(model, err)) from None
        return traced
    warn_structural(structure.summary(type(model).__name__))
    return BackboneFamily("structural", **structure.family_fields())


def _unplaced(model: nn.Module, err: StructureError) -> str:
    """Why no preset applies to ``model``, in one sentence (under 400 characters)."""
    name = type(model).__name__
    if not has_attention(model):
        return (
            f"{name} has no attention (no attention module, no q / k / v projection): nothing for the presets to "
            "adapt (a CNN or a modulation network); pass targets= to put LoRA on its convolutions or linears"
        )
    convs = conv_projections(model)
    if convs:
        return (
            f"{name}'s attention projects with 1x1 convolutions ({', '.join(convs[:2])}), not nn.Linear: the presets "
            "place q / v LoRA on linear projections only; pass targets= naming them (method='lora' wraps nn.Conv2d "
            "per modality)"
        )
    why = str(err) if len(str(err)) <= 160 else str(err)[:157] + "..."
    return (
        f"cannot tell which ViT family {name} belongs to, nor place the presets by structure ({why}); pass targets= "
        "or register a BackboneFamily (mmpeft.register_family)"
    )


def _attention_lora(f: BackboneFamily) -> list[RuleConfig]:
    # q and v, per modality, scaling alpha / r = 1 / 4, no cross-modal mixing
    if f.qkv is not None:
        slices = None if f.qkv_whole else ["q", "v"]
        return [LoRAConfig(targets=f.targets(f.qkv), rank=4, alpha=1.0, slices=slices, fusion="none")]
    if f.qk is not None:  # fused qk: its q half, and v
        assert f.v is not None
        return [
            LoRAConfig(targets=f.targets(f.qk), rank=4, alpha=1.0, slices=["q"], split=["q", "k"], fusion="none"),
            LoRAConfig(targets=f.targets(f.v), rank=4, alpha=1.0, fusion="none"),
        ]
    assert f.q is not None
    if f.kv is not None:  # separate q, fused kv: its v half
        return [
            LoRAConfig(targets=f.targets(f.q), rank=4, alpha=1.0, fusion="none"),
            LoRAConfig(targets=f.targets(f.kv), rank=4, alpha=1.0, slices=["v"], split=["k", "v"], fusion="none"),
        ]
    assert f.v is not None
    return [LoRAConfig(targets=f.targets(f.q, f.v), rank=4, alpha=1.0, fusion="none")]


def _mmlora(f: BackboneFamily) -> list[RuleConfig]:
    return [
        *_attention_lora(f),
        # both MLP linears, lambda-mixed, unscaled (eqs. 9-12)
        LoRAConfig(targets=f.targets(*f.mlp_linears()), rank=4, alpha=None, fusion="scalar"),
    ]


def _mmadapter(f: BackboneFamily, init: str = "zeros") -> list[RuleConfig]:
    if f.adapter_refused is not None:
        raise MmpeftValueError(f"the adapter presets cannot be placed in family {f.name!r}: {f.adapter_refused}")
    return [
        # per-modality adapter after the attention, with its own skip
        AdapterConfig(targets=f.targets(f.attn), placement="after", ratio=0.25, fusion="none", init=init),  # type: ignore[arg-type]
        # lambda-mixed adapter beside the MLP, on the norm2 output (eqs. 5-6)
        AdapterConfig(targets=f.targets(f.mlp), placement="beside", ratio=0.25, fusion="scalar", init=init),  # type: ignore[arg-type]
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
        raise MmpeftValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name](family)
