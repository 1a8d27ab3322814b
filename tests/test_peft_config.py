"""peft's ``LoraConfig`` as mmpeft's options (mmpeft/targeting/peft_config.py, issue 28): on timm's ViT,
Hugging Face's ViT and SAM's encoder, a LoraConfig (plain, DoRA, rsLoRA, rank_pattern) builds the
model the same options spelt the mmpeft way build (outputs bit-identical) and, on one modality,
peft's own model (same weights, 1e-5); every field it cannot honour is an error naming the field."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from mmpeft import build_config, plan_targets, wrap_multimodal
from mmpeft.errors import MmpeftTypeError, MmpeftValueError
from tests.helpers import assert_close, perturb_trainables
from tests.tiny_models import tiny_sam, tiny_timm_vit

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

MODS = ("optical", "dsm")


def tiny_hf_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8, intermediate_size=64
    )
    return transformers.ViTModel(cfg, add_pooling_layer=False).eval()


#: family -> (builder, image size, target_modules)
FAMILIES: dict[str, tuple[Any, int, list[str]]] = {
    "timm_vit": (tiny_timm_vit, 32, ["qkv", "attn.proj", "fc1", "fc2"]),
    "hf_vit": (tiny_hf_vit, 32, ["q_proj", "v_proj", "mlp.fc1"]),  # transformers 5's names
    "sam": (tiny_sam, 64, ["qkv", "attn.proj", "lin1", "lin2"]),
}
#: variant -> (LoraConfig fields, the same in mmpeft's spelling)
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "plain": ({"r": 4, "lora_alpha": 8}, {"rank": 4, "alpha": 8}),
    "dora": ({"r": 4, "lora_alpha": 8, "use_dora": True}, {"rank": 4, "alpha": 8, "use_dora": True}),
    "rslora": ({"r": 4, "lora_alpha": 8, "use_rslora": True}, {"rank": 4, "alpha": 8, "use_rslora": True}),
    "rank_pattern": (
        {"r": 4, "lora_alpha": 8, "rank_pattern": {"qkv": 2, "q_proj": 2}, "alpha_pattern": {"lin1": 3, "fc1": 3}},
        {"rank": 4, "alpha": 8, "rank_pattern": {"qkv": 2, "q_proj": 2}, "alpha_pattern": {"lin1": 3, "fc1": 3}},
    ),
}


def _inputs(size: int, mods=MODS, batch: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {m: torch.rand(batch, 3 if m == "optical" else 1, size, size, generator=g) for m in mods}


def _lora_config(family: str, variant: str) -> Any:
    fields = dict(VARIANTS[variant][0])
    targets = FAMILIES[family][2]
    for key in ("rank_pattern", "alpha_pattern"):  # only the keys this family has (peft ignores the others)
        if key in fields:
            fields[key] = {k: v for k, v in fields[key].items() if any(k in t for t in targets)}
    return peft.LoraConfig(target_modules=list(targets), **fields)


def _mmpeft_options(family: str, variant: str) -> dict[str, Any]:
    options = dict(VARIANTS[variant][1])
    targets = FAMILIES[family][2]
    for key in ("rank_pattern", "alpha_pattern"):
        if key in options:
            options[key] = {k: v for k, v in options[key].items() if any(k in t for t in targets)}
    return options


def _out(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else x.last_hidden_state


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_lora_config_builds_what_the_mmpeft_spelling_builds(family: str, variant: str) -> None:
    build, size, targets = FAMILIES[family]
    torch.manual_seed(0)
    a = wrap_multimodal(build(), MODS, _lora_config(family, variant))
    torch.manual_seed(0)
    b = wrap_multimodal(
        build(), MODS, "lora", targets=sorted(targets), fusion="none", **_mmpeft_options(family, variant)
    )
    assert a.config == b.config  # peft keeps target_modules as a set: sorted
    assert [n for n, _ in a.layers()] == [n for n, _ in b.layers()]
    perturb_trainables(a)
    perturb_trainables(b)
    x = _inputs(size)
    with torch.no_grad():
        got, want = a.eval()(x), b.eval()(x)
    for m in MODS:
        assert_close(_out(got[m]), _out(want[m]), rel=0)


def _copy_into_peft(wrapped: nn.Module, twin: nn.Module) -> None:
    with torch.no_grad():
        for name, layer in wrapped.layers():
            p = twin.base_model.model.get_submodule(name.removeprefix("base_model."))
            assert p.scaling["default"] == pytest.approx(layer.scaling)
            p.lora_A["default"].weight.copy_(layer.lora_A["optical"].weight)
            p.lora_B["default"].weight.copy_(layer.lora_B["optical"].weight)
            if layer.use_dora:
                p.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude_vector["optical"])


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_one_modality_equals_peft_own_model(family: str, variant: str) -> None:
    build, size, _ = FAMILIES[family]
    base = build()
    twin = peft.get_peft_model(copy.deepcopy(base), _lora_config(family, variant)).eval()
    wrapped = wrap_multimodal(base, ("optical",), _lora_config(family, variant)).eval()
    perturb_trainables(wrapped)
    _copy_into_peft(wrapped, twin)
    assert {n.removeprefix("base_model.") for n, _ in wrapped.layers()} == {
        n.removeprefix("base_model.model.") for n, m in twin.named_modules() if hasattr(m, "lora_A")
    }
    x = _inputs(size, ("optical",))["optical"]
    with torch.no_grad():
        got, want = wrapped({"optical": x})["optical"], twin(x)
    assert_close(_out(got), _out(want), rel=1e-5)
    stems = sum(p.numel() for p in wrapped.stems.parameters())
    assert wrapped.get_nb_trainable_parameters()[0] - stems == twin.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"bias": "all"}, "LoraConfig.bias='all'"),
        ({"bias": "lora_only"}, "LoraConfig.bias='lora_only'"),
        ({"fan_in_fan_out": True}, "LoraConfig.fan_in_fan_out=True"),
        ({"init_lora_weights": False}, "LoraConfig.init_lora_weights=False"),
        ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights must be one of"),
        ({"layer_replication": [[0, 1]]}, "LoraConfig.layer_replication"),
        ({"task_type": "SEQ_CLS"}, "LoraConfig.task_type"),
        ({"use_qalora": True}, "LoraConfig.use_qalora=True"),
        ({"trainable_token_indices": [1, 2]}, "LoraConfig.trainable_token_indices"),
        ({"target_parameters": ["blocks.0.mlp.fc1.weight"]}, "LoraConfig.target_parameters"),
        ({"ensure_weight_tying": True}, "LoraConfig.ensure_weight_tying=True"),
    ],
)
def test_an_unsupported_field_is_an_error_naming_it(fields: dict[str, Any], named: str) -> None:
    base = tiny_timm_vit()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    cfg = peft.LoraConfig(target_modules=["qkv"], **fields)
    with pytest.raises(MmpeftValueError, match=named.replace("[", r"\[").replace("(", r"\(")):
        wrap_multimodal(base, MODS, cfg)
    assert not any(type(m).__module__.startswith("mmpeft") for m in base.modules())  # nothing was built
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_what_a_peft_config_cannot_be_given_with() -> None:
    cfg = peft.LoraConfig(target_modules=["qkv"])
    with pytest.raises(MmpeftValueError, match=r"target_modules=None"):
        wrap_multimodal(tiny_timm_vit(), MODS, peft.LoraConfig())  # peft infers it only for language models
    with pytest.raises(MmpeftValueError, match=r"rank \(LoraConfig.r\)"):
        wrap_multimodal(tiny_timm_vit(), MODS, cfg, rank=2)
    with pytest.raises(MmpeftValueError, match=r"\['preset'\] given beside a peft config"):
        wrap_multimodal(tiny_timm_vit(), MODS, cfg, preset="mmlora")
    with pytest.raises(MmpeftTypeError, match="AdaLoraConfig .*ADALORA"):
        wrap_multimodal(tiny_timm_vit(), MODS, peft.AdaLoraConfig(target_modules=["qkv"], total_step=10))


def test_peft_semantics_kept_and_mmpeft_options_beside() -> None:
    """lora_alpha's default 8 is peft's scaling 8 / r (mmpeft's own default is scaling 1); fusion
    is 'none' (peft's LoRA per modality) unless given; peft's sets of names are sorted lists."""
    w = wrap_multimodal(tiny_timm_vit(), MODS, peft.LoraConfig(r=2, target_modules={"qkv", "fc1"}))
    (rule,) = w.config.rules
    assert (rule.rank, rule.alpha, rule.fusion, rule.targets) == (2, 8.0, "none", ["fc1", "qkv"])
    assert next(layer for _, layer in w.layers()).scaling == 4.0
    w = wrap_multimodal(tiny_timm_vit(), MODS, peft_config=peft.LoraConfig(target_modules=["fc1"]), fusion="scalar")
    assert w.config.rules[0].fusion == "scalar"
    w = wrap_multimodal(
        tiny_timm_vit(),
        MODS,
        peft.LoraConfig(
            target_modules=["qkv", "proj", "fc1", "fc2"],  # peft: no layers_to_transform with a regex
            exclude_modules=["attn.proj"],
            layers_to_transform=[1],
            layers_pattern="blocks",
            lora_dropout=0.1,
            lora_bias=True,
            modules_to_save=["head"],
        ),
    )
    names = [n for n, _ in w.layers()]
    assert names == [f"base_model.blocks.1.{m}" for m in ("attn.qkv", "mlp.fc1", "mlp.fc2")]
    rule = w.config.rules[0]
    assert (rule.dropout, rule.lora_bias, w.config.modules_to_save) == (0.1, True, ["head"])
    gaussian = peft.LoraConfig(target_modules=["qkv"], init_lora_weights="gaussian")
    assert wrap_multimodal(tiny_timm_vit(), MODS, gaussian).config.rules[0].init_lora_weights == "gaussian"


def test_inference_mode_freezes_the_set_and_add_adapter_takes_a_config_too() -> None:
    torch.manual_seed(0)
    w = wrap_multimodal(tiny_timm_vit(), MODS, peft.LoraConfig(target_modules=["qkv"], inference_mode=True))
    assert w.trainable_tensors() and not any(t.requires_grad for t in w.trainable_tensors())
    w = wrap_multimodal(tiny_timm_vit(), MODS, peft.LoraConfig(r=2, target_modules=["qkv"]))
    w.add_adapter("b", peft.LoraConfig(r=4, target_modules=["fc1"], use_dora=True))
    w.add_adapter("c", "lora", targets=["fc1"], rank=4, alpha=8, use_dora=True, fusion="none")
    assert w.peft_config["b"] == w.peft_config["c"]
    w.add_adapter("d", peft.LoraConfig(target_modules=["fc1"], inference_mode=True))
    with w._using("d"):
        assert not any(t.requires_grad for t in w.trainable_tensors())
    with pytest.raises(MmpeftValueError, match="LoraConfig.bias"):
        w.add_adapter("e", peft.LoraConfig(target_modules=["fc1"], bias="all"))
    assert w.adapters == ["default", "b", "c", "d"]


def test_every_entry_point_takes_a_peft_config_and_adapter_name() -> None:
    """plan_targets / build_config refused a LoraConfig (a bare TypeError: unhashable LoraConfig) and
    peft_config= / adapter_name= (unknown options) that wrap_multimodal takes: one translation
    (WrapOptions.from_kwargs) for the four."""
    cfg = peft.LoraConfig(r=2, target_modules=["qkv"], layers_to_transform=[1])
    wrapped = wrap_multimodal(tiny_timm_vit(), MODS, cfg, adapter_name="first")
    assert wrapped.active_adapter == "first"
    for config in (build_config(tiny_timm_vit(), MODS, cfg), build_config(tiny_timm_vit(), MODS, peft_config=cfg)):
        assert config.rules == wrapped.config.rules and config.modules_to_save == wrapped.config.modules_to_save
    for plan in (
        plan_targets(tiny_timm_vit(), MODS, cfg),
        plan_targets(tiny_timm_vit(), MODS, peft_config=cfg, adapter_name="first"),
    ):
        assert [("base_model." + t.name, t.options["rank"], t.options["fusion"]) for t in plan] == [
            (n, layer.rank, "none") for n, layer in wrapped.layers()
        ]
    assert build_config(tiny_timm_vit(), MODS, targets=["qkv"], adapter_name="x") == build_config(
        tiny_timm_vit(), MODS, targets=["qkv"]
    )
    with pytest.raises(MmpeftValueError, match="adapter_name must be a folder name"):
        plan_targets(tiny_timm_vit(), MODS, cfg, adapter_name="a/b")
    with pytest.raises(MmpeftValueError, match=r"\['preset'\] given beside a peft config"):
        build_config(tiny_timm_vit(), MODS, cfg, preset="lora")


def test_a_second_set_from_a_lora_config_equals_peft_add_adapter() -> None:
    """peft: get_peft_model(base, c1).add_adapter("b", c2); set_adapter("b"). mmpeft: the same calls."""
    first, second = peft.LoraConfig(r=2, target_modules=["qkv"]), peft.LoraConfig(r=4, target_modules=["fc1", "fc2"])
    base = tiny_timm_vit()
    twin = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(first))
    twin.add_adapter("b", copy.deepcopy(second))
    twin.set_adapter("b")
    w = wrap_multimodal(base, ("optical",), first)
    w.add_adapter("b", second)
    w.set_adapter("b")
    perturb_trainables(w)
    with torch.no_grad():
        for name, layer in w.layers():
            p = twin.base_model.model.get_submodule(name.removeprefix("base_model."))
            p.lora_A["b"].weight.copy_(layer.lora_A["optical"].weight)
            p.lora_B["b"].weight.copy_(layer.lora_B["optical"].weight)
        x = _inputs(32, ("optical",))["optical"]
        assert_close(w.eval()({"optical": x})["optical"], twin.eval()(x), rel=1e-5)


def test_layers_to_transform_without_layers_pattern_differs_from_peft_deliberately() -> None:
    """peft's default layers_pattern finds no block index in timm's 'blocks.1.attn.qkv' and selects
    nothing; mmpeft reads 'blocks' / 'layers' / 'layer' (docs/peft.md, Targeting) and wraps block 1."""
    cfg = peft.LoraConfig(target_modules=["qkv"], layers_to_transform=[1])
    with pytest.raises(ValueError, match="not found in the base model"):
        peft.get_peft_model(tiny_timm_vit(), copy.deepcopy(cfg))
    w = wrap_multimodal(tiny_timm_vit(), MODS, cfg)
    assert [n for n, _ in w.layers()] == ["base_model.blocks.1.attn.qkv"]
