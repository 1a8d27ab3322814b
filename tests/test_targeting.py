"""Targeting as peft users write it (issue "peft's LoRA menu"): ``targets="all-linear"``,
``exclude``, ``layers`` / ``layers_pattern``, ``rank_pattern`` / ``alpha_pattern``, checked
module by module (name, rank, scaling) against what ``peft.get_peft_model`` builds on the same
timm and Hugging Face ViTs; presets narrowed by them; ``plan_targets``; the errors."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from mmpeft import (
    MultimodalConfig,
    MultimodalLoRA,
    build_config,
    load_multimodal,
    plan_targets,
    wrap_multimodal,
)
from mmpeft.tuners import multimodal_layers
from tests.tiny_models import tiny_timm_vit

peft = pytest.importorskip("peft")
MODS = ("optical", "dsm")


def _hf(model: str = "ViTModel", config: str = "ViTConfig", **extra: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        transformers = pytest.importorskip("transformers")
        torch.manual_seed(0)
        sizes = dict(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=16)
        return getattr(transformers, model)(getattr(transformers, config)(**sizes, **extra)).eval()

    return build


def _timm_vit(num_classes: int = 0) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from timm.models.vision_transformer import VisionTransformer

        torch.manual_seed(0)
        return VisionTransformer(
            img_size=32, patch_size=16, embed_dim=16, depth=3, num_heads=2, num_classes=num_classes
        )

    return build


MODELS = {
    "timm": _timm_vit(),
    "hf_vit": _hf(intermediate_size=32),
    "hf_clip": _hf("CLIPVisionModel", "CLIPVisionConfig", intermediate_size=32),
}
BLOCKS = {"timm": "blocks", "hf_vit": "layers", "hf_clip": "layers"}  # peft's layers_pattern for each


def _peft(base: nn.Module, **kw: Any) -> dict[str, tuple[int, float]]:
    """{module name: (r, scaling)} of the LoRA layers peft puts on a copy of ``base``."""
    kw.setdefault("lora_alpha", 8)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    return {
        n.removeprefix("base_model.model."): (m.r["default"], m.scaling["default"])
        for n, m in model.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }


def _ours(base: nn.Module, **kw: Any) -> dict[str, tuple[int, float]]:
    """The same for mmpeft's multimodal LoRA layers (no mixing: the selection is what is compared)."""
    wrapped = wrap_multimodal(copy.deepcopy(base), MODS, "lora", fusion="none", **kw)
    got = {n: (m.rank, m.scaling) for n, m in multimodal_layers(wrapped.base_model) if isinstance(m, MultimodalLoRA)}
    planned = plan_targets(copy.deepcopy(base), MODS, "lora", fusion="none", **kw)
    assert [p.name for p in planned] == list(got)  # the dry run lists what the wrap patches, in order
    return got


def _same(ours: dict[str, tuple[int, float]], theirs: dict[str, tuple[int, float]]) -> None:
    assert sorted(ours) == sorted(theirs)
    for n, (r, s) in theirs.items():
        assert ours[n][0] == r and ours[n][1] == pytest.approx(s), n


# ---------------------------------------------------------------------- equal to peft
@pytest.mark.parametrize("kind", list(MODELS))
def test_all_linear_selects_what_peft_selects(kind: str) -> None:
    base = MODELS[kind]()
    ours = _ours(base, targets="all-linear", rank=4, alpha=8)
    _same(ours, _peft(base, target_modules="all-linear", r=4))
    assert any(".mlp." in n for n in ours) and len(ours) > 8


def test_all_linear_leaves_out_the_classifier_head() -> None:
    """peft keeps timm's ``head`` and transformers' ``classifier`` (its head rule needs a task
    type); mmpeft always leaves the output head out, as peft does for ``task_type="SEQ_CLS"``."""
    for base, head in ((_timm_vit(5)(), "head"), (_hf("ViTForImageClassification", num_labels=3)(), "classifier")):
        ours = _ours(base, targets="all-linear", alpha=8)
        theirs = _peft(base, target_modules="all-linear", r=4)
        assert head in theirs and head not in ours
        _same(ours, {n: v for n, v in theirs.items() if n != head})
        _same(ours, _peft(base, target_modules="all-linear", r=4, exclude_modules=[head]))


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("exclude", [["fc2", "k_proj"], r".*\.1\..*", ["1.mlp.fc1"]])
def test_exclude_is_peft_exclude_modules(kind: str, exclude: Any) -> None:
    base = MODELS[kind]()
    for targets in ("all-linear", ["qkv", "fc1", "fc2"] if kind == "timm" else ["q_proj", "k_proj", "fc1", "fc2"]):
        _same(
            _ours(base, targets=targets, exclude=exclude, alpha=8, rank=4),
            _peft(base, target_modules=targets, exclude_modules=exclude, r=4),
        )


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("layers", [0, [2], [0, 2]])
def test_layers_is_peft_layers_to_transform(kind: str, layers: Any) -> None:
    base = MODELS[kind]()
    targets = ["qkv", "fc1"] if kind == "timm" else ["q_proj", "v_proj", "fc2"]
    theirs = _peft(base, target_modules=targets, layers_to_transform=layers, layers_pattern=BLOCKS[kind], r=4)
    _same(_ours(base, targets=targets, layers=layers, alpha=8), theirs)  # default pattern: blocks / layers / layer
    _same(_ours(base, targets=targets, layers=layers, layers_pattern=BLOCKS[kind], alpha=8), theirs)
    assert len(theirs) == len(targets) * (1 if isinstance(layers, int) else len(layers))


@pytest.mark.parametrize("kind", list(MODELS))
def test_rank_and_alpha_patterns_are_peft_patterns(kind: str) -> None:
    base = MODELS[kind]()
    ranks = {"fc1": 8, r"(blocks|layers)\.1\.mlp\.fc2": 2}
    alphas = {"fc2": 3.0, r"(attn|self_attn|attention)\.(qkv|v_proj)": 32.0}
    _same(
        _ours(base, targets="all-linear", rank=4, alpha=8, rank_pattern=ranks, alpha_pattern=alphas),
        _peft(base, target_modules="all-linear", r=4, rank_pattern=ranks, alpha_pattern=alphas),
    )
    both = dict(exclude=r".*\.0\..*", layers=[1, 2], rank_pattern={"fc1": 2}, alpha_pattern={"fc1": 6.0})
    targets = ["fc1", "fc2"]
    _same(
        _ours(base, targets=targets, alpha=8, **both),
        _peft(
            base,
            target_modules=targets,
            r=4,
            exclude_modules=both["exclude"],
            layers_to_transform=[1, 2],
            layers_pattern=BLOCKS[kind],
            rank_pattern={"fc1": 2},
            alpha_pattern={"fc1": 6.0},
        ),
    )


# ---------------------------------------------------------------------- presets, config, plan
def test_exclude_and_layers_narrow_a_preset() -> None:
    base = tiny_timm_vit()
    full = plan_targets(base, MODS, preset="mmlora")
    only0 = plan_targets(base, MODS, preset="mmlora", layers=[0])
    assert [p for p in full if p.name.startswith("blocks.0.")] == only0 and len(only0) == 3
    no_fc2 = plan_targets(base, MODS, preset="mmlora", exclude=["mlp.fc2"])
    assert [p for p in full if not p.name.endswith("fc2")] == no_fc2
    assert only0[0].options["slices"] == ["q", "v"] and only0[1].options["fusion"] == "scalar"  # the preset's options
    ranked = plan_targets(
        base, MODS, preset="mmlora", rank_pattern={"fc1": 8}, alpha_pattern={r"blocks\.1\.attn\.qkv": 2.0}
    )
    assert [(p.name, p.options["rank"], p.options["alpha"]) for p in ranked] == [
        ("blocks.0.attn.qkv", 4, 1.0),
        ("blocks.0.mlp.fc1", 8, None),
        ("blocks.0.mlp.fc2", 4, None),
        ("blocks.1.attn.qkv", 4, 2.0),
        ("blocks.1.mlp.fc1", 8, None),
        ("blocks.1.mlp.fc2", 4, None),
    ]
    assert [p.options["slices"] for p in ranked if p.name.endswith("qkv")] == [
        ["q", "v"]
    ] * 2  # the rest is the preset's
    adapters = plan_targets(base, MODS, preset="mmadapter", layers=1)
    assert [p.name for p in adapters] == ["blocks.1.attn", "blocks.1.mlp"] and {p.method for p in adapters} == {
        "adapter"
    }


def test_plan_changes_nothing_and_the_config_round_trips(tmp_path) -> None:
    base = tiny_timm_vit()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    kw: dict[str, Any] = dict(targets="all-linear", layers=[1], rank_pattern={"fc1": 8}, alpha_pattern={"qkv": 2.0})
    plan = plan_targets(base, MODS, "lora", **kw)
    assert not any(True for _ in multimodal_layers(base)) and all(p.requires_grad for p in base.parameters())
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())
    assert [(p.name, p.options["rank"], p.options["alpha"]) for p in plan] == [
        ("blocks.1.attn.qkv", 4, 2.0),
        ("blocks.1.attn.proj", 4, None),
        ("blocks.1.mlp.fc1", 8, None),
        ("blocks.1.mlp.fc2", 4, None),
    ]
    config = build_config(base, MODS, "lora", **kw)
    assert MultimodalConfig.from_json(config.to_json()) == config and len(config.rules) == 3
    assert plan_targets(base, MODS, config=config) == plan
    wrapped = wrap_multimodal(copy.deepcopy(base), MODS, "lora", **kw)
    wrapped.save_pretrained(tmp_path)
    loaded = load_multimodal(tiny_timm_vit(), tmp_path)
    assert [(n, m.rank, m.scaling) for n, m in multimodal_layers(loaded)] == [
        (n, m.rank, m.scaling) for n, m in multimodal_layers(wrapped)
    ]


def test_all_linear_skips_modules_to_save_and_works_for_adapters() -> None:
    base = _timm_vit(5)()
    wrapped = wrap_multimodal(base, MODS, "lora", targets="all-linear", modules_to_save=["norm", "head"])
    assert "head" not in dict(multimodal_layers(wrapped)) and len(list(multimodal_layers(wrapped))) == 12
    adapters = plan_targets(tiny_timm_vit(), MODS, "adapter", targets="all-linear", layers=0, placement="after")
    assert [p.name for p in adapters] == [
        "blocks.0.attn.qkv",
        "blocks.0.attn.proj",
        "blocks.0.mlp.fc1",
        "blocks.0.mlp.fc2",
    ]
    explicit = MultimodalConfig(list(MODS), [build_config(base, MODS, "lora").rules[0].__class__(targets="all-linear")])
    assert len(plan_targets(tiny_timm_vit(), config=explicit)) == 8  # a hand-written "all-linear" rule


def test_torchvision_is_planned_as_prepared_without_changing_it() -> None:
    from torchvision.models import VisionTransformer

    base = VisionTransformer(
        image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=8
    )
    plan = plan_targets(base, MODS, targets="all-linear")
    assert any(isinstance(m, nn.MultiheadAttention) for m in base.modules())  # unchanged
    assert [p.name.split(".")[-2:] for p in plan[:4]] == [
        ["self_attention", "in_proj"],
        ["self_attention", "out_proj"],
        ["mlp", "0"],
        ["mlp", "3"],
    ]
    wrapped = wrap_multimodal(base, MODS, targets="all-linear")
    assert [n for n, _ in multimodal_layers(wrapped.base_model)] == [p.name for p in plan] and len(plan) == 8
    with pytest.raises(ValueError, match="numbered block.*layers_pattern"):
        plan_targets(base, MODS, targets="all-linear", layers=0)


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        (dict(targets="all-linear", exclude=["nothing_here"]), ValueError, r"exclude=\['nothing_here'\] matches none"),
        (dict(preset="mmlora", exclude=["attn.proj"]), ValueError, r"exclude=\['attn.proj'\] matches none"),
        (dict(targets="all-linear", exclude=r".*"), ValueError, r"no module is left.*exclude"),
        (dict(targets=["qkv"], layers=[1, 2]), ValueError, r"layers=\[1, 2\].*block\(s\) \[2\].*blocks 0..1"),
        (dict(targets=["qkv"], layers=-1), ValueError, "layers must be >= 0"),
        (dict(targets=["qkv"], layers=[]), TypeError, "layers must be a block index"),
        (dict(targets=["qkv"], layers=[0], layers_pattern="stages"), ValueError, "numbered block <stages>"),
        (dict(targets=["qkv"], layers_pattern="blocks"), ValueError, "layers_pattern= .* needs layers="),
        (
            dict(targets="all-linear", rank_pattern={"fc9": 8}),
            ValueError,
            r"rank_pattern\['fc9'\] take\(s\) effect on none",
        ),
        (dict(targets=["qkv"], alpha_pattern={"fc1": 8.0}), ValueError, r"alpha_pattern\['fc1'\]"),
        (dict(targets=["qkv"], rank_pattern={"qkv": 0}), ValueError, r"rank_pattern\['qkv'\] must be >= 1"),
        (
            dict(method="adapter", targets="all-linear", rank_pattern={"fc1": 8}),
            TypeError,
            "option 'rank_pattern' sets the 'rank' of lora rules; method 'adapter'",
        ),
        (dict(method="adapter", alpha_pattern={"fc1": 8}), TypeError, "'alpha_pattern'.*method 'adapter'"),
        (dict(method="adapter", exclud=["x"]), TypeError, "unknown option 'exclud'.*'exclude'"),
    ],
)
def test_an_option_that_would_change_nothing_is_an_error_naming_it(kw: dict, error: type, match: str) -> None:
    kw = dict(kw)
    method = kw.pop("method", None)
    with pytest.raises(error, match=match):
        plan_targets(tiny_timm_vit(), MODS, method, **kw)
    with pytest.raises(error, match=match):
        wrap_multimodal(tiny_timm_vit(), MODS, method, **kw)
