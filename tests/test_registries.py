"""One registry convention for methods, fusion rules and backbone families (mmpeft.utils.register):
keyword arguments, a duplicate name refused naming it unless ``replace=True``, the registered
thing used by the wrap; and the one listing helper of messages (mmpeft.utils.listing)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from mmpeft import (
    FAMILIES,
    FUSION_RULES,
    METHODS,
    MmpeftValueError,
    detect_family,
    register_family,
    register_fusion,
    register_method,
    wrap_multimodal,
)
from mmpeft.targeting.targets import BackboneFamily
from mmpeft.tuners.fusion import ScalarFusion
from mmpeft.utils import LISTED, listing
from tests.tiny_models import tiny_custom, tiny_timm_vit

CUSTOM = BackboneFamily(
    name="custom_vit",
    qkv="in_proj",
    mlp_in="ffn.0",
    mlp_out="ffn.2",
    attn="out_proj",
    mlp="ffn",
    classes=("tests.tiny_models.CustomBlock",),
    note="tests' CustomViT",
)


@pytest.fixture(autouse=True)
def _registries_as_found() -> Iterator[None]:
    saved = [(r, dict(r)) for r in (METHODS, FUSION_RULES, FAMILIES)]
    yield
    for registry, items in saved:
        registry.clear()
        registry.update(items)


def test_a_duplicate_name_is_refused_naming_it_in_every_registry() -> None:
    other_lora = dataclasses.replace(METHODS["lora"], preset="lora")
    other_timm = dataclasses.replace(FAMILIES["timm"], note="another")
    refusals = [
        (lambda: register_method(other_lora), "method 'lora'"),
        (lambda: register_fusion("scalar", lambda modalities, init=0.5, device=None: None), "fusion rule 'scalar'"),
        (lambda: register_family(other_timm), "backbone family 'timm'"),
    ]
    for register, name in refusals:
        with pytest.raises(MmpeftValueError, match=f"{name} is already registered; pass replace=True"):
            register()
    assert METHODS["lora"] != other_lora and FUSION_RULES["scalar"] is ScalarFusion
    assert FAMILIES["timm"] != other_timm


def test_registering_the_same_thing_again_changes_nothing() -> None:
    order = list(FAMILIES)
    assert register_method(METHODS["lora"]) is METHODS["lora"]
    assert register_fusion("scalar", ScalarFusion) is ScalarFusion
    assert register_family(FAMILIES["timm"]) is FAMILIES["timm"] and list(FAMILIES) == order


def test_replace_registers_the_new_method_and_the_wrap_uses_it() -> None:
    lora = METHODS["lora"]
    built: list[str] = []

    def build(rule, module, name, modalities):
        built.append(name)
        return lora.build(rule, module, name, modalities)

    register_method(dataclasses.replace(lora, build=build), replace=True)
    wrap_multimodal(tiny_timm_vit(), ("optical", "dsm"), "lora", targets=["qkv"])
    assert built == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]


def test_a_registered_fusion_rule_is_used_and_replace_swaps_it() -> None:
    class Halves(ScalarFusion):
        pass

    class Thirds(ScalarFusion):
        pass

    register_fusion("halves", Halves)
    with pytest.raises(MmpeftValueError, match="'halves' is already registered"):
        register_fusion("halves", Thirds)
    register_fusion("halves", Thirds, replace=True)
    wrapped = wrap_multimodal(tiny_timm_vit(), ("optical", "dsm"), "lora", targets=["qkv"], fusion="halves")
    assert {type(layer.lora_fusion) for _, layer in wrapped.layers()} == {Thirds}


def test_a_registered_family_is_detected_before_the_families_found_by_names() -> None:
    with pytest.warns(UserWarning, match="no known ViT family matches CustomViT"):
        assert detect_family(tiny_custom()).name == "structural"
    assert register_family(CUSTOM) is CUSTOM
    order = list(FAMILIES)
    assert order.index("custom_vit") < order.index("segment_anything")  # the first found by names alone
    assert order.index("custom_vit") > order.index("timm_tnt")  # after the built-ins with marker classes
    assert detect_family(tiny_custom()) is CUSTOM
    wrapped = wrap_multimodal(tiny_custom(), ("optical", "dsm"), preset="lora")
    assert sorted(n for n, _ in wrapped.layers())[:2] == ["base_model.layers.0.ffn.0", "base_model.layers.0.ffn.2"]
    replaced = dataclasses.replace(CUSTOM, note="replaced")
    register_family(replaced, replace=True)
    assert FAMILIES["custom_vit"] is replaced and list(FAMILIES) == order  # keeps its place


def test_registries_take_what_they_hold() -> None:
    with pytest.raises(TypeError, match="register_family takes a BackboneFamily"):
        register_family("timm")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="register_method takes a Method"):
        register_method("lora")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="the factory must be callable"):
        register_fusion("one", 1)  # type: ignore[arg-type]


def test_listing_names_the_first_items_and_how_many_more() -> None:
    assert listing([]) == "" and listing(["a"]) == "a" and listing(["a", "b", "c"]) == "a, b, c"
    assert LISTED == 10
    assert listing(range(LISTED)) == ", ".join(map(str, range(LISTED)))
    assert listing(range(LISTED + 3)) == ", ".join(map(str, range(LISTED))) + " (and 3 more)"
    assert listing(["a", "b", "c"], limit=2) == "a, b (and 1 more)"
    assert listing(["x: (1, 2)", "y: (3,)"], sep="; ") == "x: (1, 2); y: (3,)"
