"""The one build path (mmpeft.model.build): wrap arguments parsed once into WrapOptions, used by
wrap_multimodal, build_config, plan_targets and add_adapter alike."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from mmpeft import MultimodalModel, StemConfig, build_config, plan_targets, wrap_multimodal
from mmpeft.model.build import ModelOptions, WrapOptions
from mmpeft.targeting.selection import Selection
from tests.tiny_models import tiny_custom, tiny_timm_vit

ROOT = Path(__file__).resolve().parents[1]


def test_from_kwargs_splits_the_options_once() -> None:
    opts = WrapOptions.from_kwargs(
        ("optical", "dsm"),
        "lora",
        targets=["qkv"],
        base_dtype="bf16",
        rank=3,
        stems={"dsm": ("conv1x1", 1)},
        in_channels=3,
        exclude=["blocks.1.attn.qkv"],
    )
    assert opts.modalities == ("optical", "dsm") and opts.method == "lora" and opts.targets == ["qkv"]
    assert opts.base_dtype == "bfloat16"
    assert dict(opts.method_options) == {"rank": 3}
    assert opts.model == ModelOptions({"dsm": StemConfig("conv1x1", 1)}, 3, None)
    assert opts.selection == Selection(exclude=["blocks.1.attn.qkv"])


def test_the_public_functions_build_the_same_config() -> None:
    kw = dict(method="lora", targets=["qkv", "fc1"], rank=2, exclude=["blocks.0.attn.qkv"])
    expected = WrapOptions.from_kwargs(("optical", "dsm"), **kw).resolve(tiny_timm_vit())
    assert build_config(tiny_timm_vit(), ("optical", "dsm"), **kw) == expected
    assert wrap_multimodal(tiny_timm_vit(), ("optical", "dsm"), **kw).config.rules == expected.rules
    planned = [t.name for t in plan_targets(tiny_timm_vit(), ("optical", "dsm"), **kw)]
    assert planned == ["blocks.0.mlp.fc1", "blocks.1.attn.qkv", "blocks.1.mlp.fc1"]


def test_a_string_of_modalities_is_refused_at_the_entrance() -> None:
    """build_config(model, "optical") built a config for the seven modalities o, p, t, i, c, a, l."""
    with pytest.raises(TypeError, match="got the string 'optical'"):
        build_config(tiny_timm_vit(), "optical", targets=["qkv"])  # type: ignore[arg-type]


def test_a_selection_option_left_at_none_is_not_given() -> None:
    """exclude=None (as peft's default exclude_modules) was refused as an unknown option."""
    config = build_config(tiny_timm_vit(), ("optical",), "lora", targets=["qkv"], exclude=None, layers=None)
    assert config == build_config(tiny_timm_vit(), ("optical",), "lora", targets=["qkv"])


def test_refusals_before_the_model_is_read() -> None:
    with pytest.raises(ValueError, match="either config= or"):
        WrapOptions.from_kwargs(config=build_config(tiny_custom(), targets=["in_proj"]), rank=2)
    with pytest.raises(ValueError, match="either preset= or targets="):
        WrapOptions.from_kwargs(preset="mmlora", targets=["qkv"])
    with pytest.raises(ValueError, match="unknown method 'lorra'"):
        WrapOptions.from_kwargs(method="lorra")
    with pytest.raises(TypeError, match=r"stems must be a \{modality: stem\} dict"):
        WrapOptions.from_kwargs(stems="repeat")


def test_modalities_beside_a_config_must_be_its_own() -> None:
    """wrap_multimodal(m, ("rgb", "sar", "ir"), config=cfg) wrapped cfg's ("optical", "dsm") silently."""
    cfg = build_config(tiny_timm_vit(), ("rgb", "sar"), preset="lora")
    with pytest.raises(ValueError, match=r"modalities=\['rgb', 'sar', 'ir'\] but config.modalities=\['rgb', 'sar'\]"):
        wrap_multimodal(tiny_timm_vit(), ("rgb", "sar", "ir"), config=cfg)
    with pytest.raises(ValueError, match="config.modalities"):
        plan_targets(tiny_timm_vit(), ("optical", "dsm"), config=cfg)  # the old default, given explicitly
    assert wrap_multimodal(tiny_timm_vit(), config=cfg).modalities == ("rgb", "sar")
    assert wrap_multimodal(tiny_timm_vit(), ["rgb", "sar"], config=cfg).modalities == ("rgb", "sar")
    assert build_config(tiny_timm_vit(), preset="lora").modalities == ["optical", "dsm"]  # the default


def test_a_set_shares_the_model_options() -> None:
    wrapped = wrap_multimodal(tiny_timm_vit(), ("optical", "dsm"), stems={"dsm": ("conv1x1", 1)})
    opts = WrapOptions.for_set(wrapped.config, "adapter")
    assert opts.model.stems == wrapped.config.stems and opts.model.in_channels == wrapped.config.in_channels
    with pytest.raises(ValueError, match="in_channels is the model's"):
        WrapOptions.for_set(wrapped.config, in_channels=4)
    with pytest.raises(TypeError, match=r"stems must be a \{modality: stem\} dict"):
        WrapOptions.for_set(wrapped.config, stems="repeat")
    wrapped.add_adapter("second", "adapter")
    assert wrapped.set_adapter("second") is None and wrapped.config.stems["dsm"] == StemConfig("conv1x1", 1)


def test_fusion_on_a_preset_that_mixes_nothing_is_refused() -> None:
    """build_config(preset="lora", fusion="scalar") was accepted and its rules kept fusion="none"."""
    for preset in ("lora", "adapter"):
        with pytest.raises(ValueError, match=f"fusion='scalar': preset '{preset}' mixes no modalities"):
            build_config(tiny_timm_vit(), ("optical", "dsm"), preset=preset, fusion="scalar")
    assert build_config(tiny_timm_vit(), preset="lora", fusion="none") == build_config(tiny_timm_vit(), preset="lora")
    mixing = build_config(tiny_timm_vit(), preset="mmlora", fusion="matrix")  # a preset that mixes takes it
    assert "matrix" in {r.fusion for r in mixing.rules}


def test_a_set_takes_the_model_base_dtype_by_any_name() -> None:
    """add_adapter(base_dtype=torch.float32) on a model wrapped at base_dtype="float32" was refused."""
    import torch

    wrapped = wrap_multimodal(tiny_timm_vit(), ("optical", "dsm"), preset="lora", base_dtype="float32")
    for same in (torch.float32, "fp32", "float32"):
        assert WrapOptions.for_set(wrapped.config, base_dtype=same).base_dtype == "float32"
    with pytest.raises(ValueError, match="base_dtype is the model's"):
        WrapOptions.for_set(wrapped.config, base_dtype=torch.bfloat16)
    wrapped.add_adapter("two", preset="lora", base_dtype=torch.float32)
    assert wrapped.adapters == ["default", "two"]


def test_no_function_is_assigned_onto_a_class_from_outside() -> None:
    """The sets module reads the build path directly (wrap.py set MultimodalModel.build_set_config)."""
    assert not hasattr(MultimodalModel, "build_set_config")
    for path in sorted((ROOT / "mmpeft").rglob("*.py")):
        tree = ast.parse(path.read_text())
        defined = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else []
            for t in targets:
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id[:1].isupper():
                    assert t.value.id in defined, f"{path.relative_to(ROOT)}:{node.lineno} sets {t.value.id}.{t.attr}"


@pytest.mark.parametrize(
    ("kind", "method"),
    [("gcvit_kv", "lora"), ("shvit", "lora"), ("mobilevit", "lora"), ("volo", "adapter"), ("vit_relpos", "lora")],
)
def test_the_plan_is_what_the_wrap_does(kind: str, method: str) -> None:
    """plan_targets decides as the wrap does (mmpeft.targeting.inject.place_rules), the model left
    bit-identical: it showed q / v thirds where GCViT's key-value projections get their v half,
    and modules the wrap leaves out (placeholders, position MLPs, nested in an adapter)."""
    import warnings

    import torch

    from tests.family_zoo import build

    model = build(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = plan_targets(model, ("optical", "dsm"), method)
        wrapped = wrap_multimodal(build(kind), ("optical", "dsm"), method)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    layers = {n.removeprefix("base_model."): layer for n, layer in wrapped.layers()}
    assert [t.name for t in plan] == list(layers)
    for t in plan:
        assert t.method == layers[t.name].method
        if method == "lora":  # the slices the plan names are those the layer holds ({name: (start, end)})
            got = getattr(layers[t.name], "slices", None)
            assert list(got or []) == list(t.options["slices"] or []), t.name
