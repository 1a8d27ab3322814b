"""export_peft: a non-mixing multimodal LoRA, loaded by peft onto the plain model, is exact."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from mmpeft import wrap_multimodal
from mmpeft.interop.peft_families import PlainModelError, place, prepare_for_peft
from mmpeft.interop.peft_interop import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, export_peft, peft_lora_weights
from tests.backbone_cases import BACKBONES
from tests.backbone_cases import backbone_inputs as _family_inputs
from tests.backbone_cases import build_backbone as _build
from tests.backbone_cases import main_tensor as _tensor
from tests.backbone_cases import randomise_family_trainables as _randomise_family
from tests.helpers import assert_close, close, rel_diff
from tests.helpers import randomise_trainables as _randomise_trainables
from tests.tiny_models import tiny_sam, tiny_timm_vit

peft = pytest.importorskip("peft")


pytestmark = pytest.mark.usefixtures("single_thread")


def _inputs(size: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {"optical": torch.rand(2, 3, size, size, generator=g), "dsm": torch.rand(2, 1, size, size, generator=g)}


@pytest.mark.parametrize("modality", ["dsm", "optical"])
def test_exported_lora_loads_in_peft_and_matches(tmp_path, modality: str) -> None:
    wrapped = wrap_multimodal(tiny_sam(), ("optical", "dsm"), preset="lora")  # fusion none everywhere
    _randomise_trainables(wrapped)
    export_peft(wrapped, modality, tmp_path)
    assert (tmp_path / PEFT_CONFIG_NAME).is_file() and (tmp_path / PEFT_WEIGHTS_NAME).is_file()

    peft_model = peft.PeftModel.from_pretrained(tiny_sam(), str(tmp_path))  # fresh, unwrapped base
    x = _inputs()
    with torch.no_grad():
        expected = wrapped(x)[modality]
        got = peft_model(x[modality].repeat(1, 3 // x[modality].shape[1], 1, 1))
        plain = tiny_sam()(x[modality].repeat(1, 3 // x[modality].shape[1], 1, 1))
    assert rel_diff(expected, plain) > 1e-3  # the LoRA matters ...
    assert close(got, expected, rel=1e-5), rel_diff(got, expected)  # ... and peft has it

    # the saved keys are exactly what peft itself saves for this model
    from peft.utils import get_peft_model_state_dict

    saved = load_file(str(tmp_path / PEFT_WEIGHTS_NAME))
    own = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    assert sorted(saved) == sorted(own)
    assert "base_model.model.blocks.0.attn.qkv.lora_A.weight" in saved
    cfg = json.loads((tmp_path / PEFT_CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 4.0  # MLP: scaling 1
    assert cfg["rank_pattern"] == {r"blocks\.0\.attn\.qkv": 8, r"blocks\.1\.attn\.qkv": 8}
    assert peft_model.base_model.model.blocks[0].attn.qkv.scaling["default"] == 0.25  # 2 / 8


def test_sliced_qkv_becomes_block_structured_rank_2r() -> None:
    wrapped = wrap_multimodal(tiny_sam(), ("optical", "dsm"), preset="lora")
    _randomise_trainables(wrapped)
    weights = peft_lora_weights(wrapped, "dsm")
    a, b, scaling = weights["blocks.0.attn.qkv"]
    qkv = wrapped.base_model.blocks[0].attn.qkv
    assert a.shape == (8, 32) and b.shape == (96, 8) and scaling == 0.25
    assert torch.equal(a[:4], qkv.lora_A["dsm"]["q"].weight) and torch.equal(a[4:], qkv.lora_A["dsm"]["v"].weight)
    assert torch.equal(b[:32, :4], qkv.lora_B["dsm"]["q"].weight) and torch.equal(
        b[64:, 4:], qkv.lora_B["dsm"]["v"].weight
    )
    assert not b[32:64].any() and not b[:32, 4:].any() and not b[64:, :4].any()  # k rows, cross blocks
    assert weights["blocks.1.mlp.lin1"][2] == 1.0


def test_single_modality_scalar_fusion_exports_on_timm(tmp_path) -> None:
    """With one modality the paper's rule has nothing to mix: mmlora exports (timm ViT, custom rank)."""
    wrapped = wrap_multimodal(tiny_timm_vit(), ("dsm",), preset="mmlora", rank=2)
    _randomise_trainables(wrapped)
    export_peft(wrapped, "dsm", tmp_path)
    peft_model = peft.PeftModel.from_pretrained(tiny_timm_vit(), str(tmp_path))
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert close(peft_model(x.repeat(1, 3, 1, 1)), wrapped([x])[0], rel=1e-5)


def test_mixing_layers_raise(tmp_path) -> None:
    wrapped = wrap_multimodal(tiny_sam(), ("optical", "dsm"), preset="mmlora")
    with pytest.raises(ValueError, match="mixes modalities .*cannot be expressed in peft"):
        export_peft(wrapped, "dsm", tmp_path)
    wrapped = wrap_multimodal(tiny_sam(), ("optical", "dsm"), preset="mmlora", fusion="matrix")
    with pytest.raises(ValueError, match="mixes modalities"):
        export_peft(wrapped, "optical", tmp_path)
    assert not (tmp_path / PEFT_WEIGHTS_NAME).exists()


def test_adapters_stems_and_names_raise(tmp_path) -> None:
    with pytest.raises(ValueError, match="adapters .* cannot be exported to peft"):
        export_peft(wrap_multimodal(tiny_sam(), preset="adapter"), "dsm", tmp_path)
    learned = wrap_multimodal(tiny_sam(), preset="lora", stems={"dsm": ("conv1x1", 1)})
    with pytest.raises(ValueError, match="learnable 'conv1x1' stem"):
        export_peft(learned, "dsm", tmp_path)
    export_peft(learned, "dsm", tmp_path, allow_learned_stem=True)
    export_peft(learned, "optical", tmp_path / "optical")  # its stem is fixed
    with pytest.raises(ValueError, match="unknown modality 'sar'"):
        export_peft(learned, "sar", tmp_path)
    with pytest.raises(ValueError, match="no LoRA layer"):
        export_peft(wrap_multimodal(tiny_sam(), preset="frozen"), "dsm", tmp_path)


def test_modules_to_save_export_to_peft(tmp_path) -> None:
    """A trained head (modules_to_save) travels into peft's modules_to_save: the peft model is exact."""
    wrapped = wrap_multimodal(tiny_timm_vit(), ("optical", "dsm"), preset="lora", modules_to_save=["head"])
    _randomise_trainables(wrapped)
    export_peft(wrapped, "optical", tmp_path)
    assert json.loads((tmp_path / PEFT_CONFIG_NAME).read_text())["modules_to_save"] == ["head"]
    peft_model = peft.PeftModel.from_pretrained(tiny_timm_vit(), str(tmp_path))
    x = _inputs(32)
    with torch.no_grad():
        expected = wrapped(x)["optical"]
        got = peft_model(x["optical"])
        plain = tiny_timm_vit()(x["optical"])
    assert rel_diff(expected, plain) > 1e-3
    assert_close(got, expected, rel=1e-5)


def test_conv_lora_on_the_patch_embedding_exports_to_peft(tmp_path) -> None:
    wrapped = wrap_multimodal(
        tiny_timm_vit(),
        ("optical", "dsm"),
        "lora",
        targets=["patch_embed.proj", "attn.qkv"],
        fusion="none",
        rank=2,
        alpha=4.0,
    )
    peft_model, expected, got, _ = _dsm_through_peft(wrapped, tmp_path)
    assert type(peft_model.base_model.model.patch_embed.proj).__name__ == "Conv2d"  # peft's LoRA Conv2d layer
    assert_close(got, expected, rel=1e-5)


def _dsm_through_peft(wrapped, tmp_path) -> tuple:
    """Randomise, export the dsm's LoRA, load it in peft onto a fresh tiny timm ViT; returns
    (peft model, wrapped output, peft output, plain model output) on the same dsm input."""
    _randomise_trainables(wrapped)
    export_peft(wrapped, "dsm", tmp_path)
    peft_model = peft.PeftModel.from_pretrained(tiny_timm_vit(), str(tmp_path))
    x = _inputs(32)
    dsm3 = x["dsm"].repeat(1, 3, 1, 1)
    with torch.no_grad():
        return peft_model, wrapped(x)["dsm"], peft_model(dsm3), tiny_timm_vit()(dsm3)


@pytest.mark.parametrize(
    "options",
    [
        {"use_rslora": True, "alpha": 4.0},
        {"init_lora_weights": "pissa"},
        {"init_lora_weights": "olora"},
        {"lora_bias": True},
        {"use_dora": True},
        {"init_lora_weights": "gaussian"},
    ],
)
@pytest.mark.parametrize("targets", [["attn.qkv"], ["mlp.fc1", "mlp.fc2"]])
def test_lora_variants_export_to_peft_exactly(tmp_path, options: dict, targets: list[str]) -> None:
    """Every variant: the peft adapter on the plain model computes the wrapped model's output
    (sliced qkv: the q/v blocks; PiSSA / OLoRA: the frozen offset as a second rank block)."""
    slices = ["q", "v"] if targets == ["attn.qkv"] else None
    wrapped = wrap_multimodal(
        tiny_timm_vit(), ("optical", "dsm"), "lora", targets=targets, fusion="none", rank=2, slices=slices, **options
    )
    _, expected, got, plain = _dsm_through_peft(wrapped, tmp_path)
    assert rel_diff(expected, plain) > 1e-4
    assert_close(got, expected, rel=1e-5)


# ---------------------------------------------------------------------- every backbone family


def _peft_output(kind: str, directory, x: torch.Tensor, prepared: bool) -> tuple[torch.Tensor, object]:
    plain = _build(kind)  # a fresh plain model: the same seed, the same frozen weights
    peft_model = peft.PeftModel.from_pretrained(prepare_for_peft(plain) if prepared else plain, str(directory)).eval()
    with torch.no_grad():
        return _tensor(peft_model(x.repeat(1, 3 // x.shape[1], 1, 1))), peft_model


@pytest.mark.parametrize("kind", BACKBONES)
def test_every_family_exports_exactly_or_refuses_naming_why(tmp_path, kind: str) -> None:
    """Preset "lora" (fusion none) on each family: the peft adapter on a fresh plain model computes
    ``wrapped(x)[m]`` to 1e-5; EVA02's qkv is refused (the plain model never calls it) and exact
    on the prepared plain model (for_prepared_base). torchvision: peft's MultiheadAttention LoRA."""
    wrapped = wrap_multimodal(_build(kind), ("optical", "dsm"), preset="lora")
    _randomise_family(wrapped)  # the trainables only (test_wrap's also sets DINOv2's frozen lambda1)
    x = _family_inputs(kind)
    with torch.no_grad():
        expected = _tensor(wrapped(x)["dsm"])
        plain = _tensor(_build(kind)(x["dsm"].repeat(1, 3, 1, 1)))
    assert rel_diff(expected, plain) > 1e-4  # the LoRA matters
    if kind == "timm_eva02":
        with pytest.raises(
            PlainModelError, match=r"blocks\.0\.attn\.qkv: .*never calls its qkv.*for_prepared_base=True"
        ):
            export_peft(wrapped, "dsm", tmp_path / "plain")
        assert not (tmp_path / "plain").exists()
    else:
        export_peft(wrapped, "dsm", tmp_path / "plain")
        got, peft_model = _peft_output(kind, tmp_path / "plain", x["dsm"], prepared=False)
        assert_close(got, expected, rel=1e-5)
        if kind == "torchvision":
            attn = peft_model.base_model.model.encoder.layers[0].self_attention
            assert type(attn).__name__ == "MultiheadAttention" and type(attn).__module__.startswith("peft.")
    export_peft(wrapped, "dsm", tmp_path / "prepared", for_prepared_base=True)
    got, _ = _peft_output(kind, tmp_path / "prepared", x["dsm"], prepared=True)
    assert_close(got, expected, rel=1e-5)
    with safe_open(str(tmp_path / "prepared" / PEFT_WEIGHTS_NAME), "pt") as f:
        assert f.metadata()["mmpeft_prepared_base"] == "true"


def test_torchvision_attention_maps_onto_peft_and_out_proj_is_refused(tmp_path) -> None:
    """in_proj alone (q, v slices, rank 3): peft's MultiheadAttention LoRA with a zero out_proj
    pair, exact. An out_proj update is refused (peft 0.21 adds it twice), exact when prepared."""
    wrapped = wrap_multimodal(
        _build("torchvision"),
        ("optical", "dsm"),
        "lora",
        fusion="none",
        rank=3,
        alpha=6.0,
        targets=["self_attention.in_proj"],
        slices=["q", "v"],
    )
    _randomise_family(wrapped)
    export_peft(wrapped, "optical", tmp_path)
    saved = load_file(str(tmp_path / PEFT_WEIGHTS_NAME))
    key = "base_model.model.encoder.layers.encoder_layer_0.self_attention"
    assert saved[f"{key}.lora_A.weight"].shape == (6, 16) and saved[f"{key}.lora_B.weight"].shape == (48, 6)
    assert not saved[f"{key}.base_layer.out_proj.lora_B.weight"].any()
    x = _family_inputs("torchvision")
    with torch.no_grad():
        expected = wrapped(x)["optical"]
    got, peft_model = _peft_output("torchvision", tmp_path, x["optical"], prepared=False)
    from peft.utils import get_peft_model_state_dict

    assert sorted(saved) == sorted(get_peft_model_state_dict(peft_model))
    assert_close(got, expected, rel=1e-5)

    both = wrap_multimodal(
        _build("torchvision"),
        ("optical", "dsm"),
        "lora",
        fusion="none",
        rank=3,
        targets=["self_attention.in_proj", "self_attention.out_proj"],
        rank_pattern={"out_proj": 2},
    )
    _randomise_family(both)
    with pytest.raises(
        PlainModelError, match=r"encoder_layer_0\.self_attention\.out_proj: .*adds its out_proj update twice"
    ):
        export_peft(both, "dsm", tmp_path / "both")
    export_peft(both, "dsm", tmp_path / "both", for_prepared_base=True)
    with torch.no_grad():
        expected = both(x)["dsm"]
    got, _ = _peft_output("torchvision", tmp_path / "both", x["dsm"], prepared=True)
    assert_close(got, expected, rel=1e-5)


def test_torchvision_dora_is_refused_unless_for_the_prepared_model(tmp_path) -> None:
    wrapped = wrap_multimodal(_build("torchvision"), ("optical", "dsm"), preset="lora", use_dora=True)
    _randomise_family(wrapped)
    with pytest.raises(
        PlainModelError, match=r"self_attention\.in_proj uses lora_bias or DoRA.*for_prepared_base=True"
    ):
        export_peft(wrapped, "dsm", tmp_path / "plain")
    export_peft(wrapped, "dsm", tmp_path, for_prepared_base=True)
    x = _family_inputs("torchvision")
    with torch.no_grad():
        expected = wrapped(x)["dsm"]
    got, _ = _peft_output("torchvision", tmp_path, x["dsm"], prepared=True)
    assert_close(got, expected, rel=1e-5)


def test_paths_only_mmpeft_creates_are_named() -> None:
    """A module inside one of mmpeft's own modules cannot exist in the plain model; the parts of
    an ExplicitMultiheadAttention map onto peft's attention LoRA, other modules inside it do not."""
    from mmpeft import MultimodalLoRA

    host = nn.Sequential(MultimodalLoRA(nn.Linear(4, 4), ("optical", "dsm")))
    with pytest.raises(PlainModelError, match=r"0\.base_layer: 0 is mmpeft's MultimodalLoRA"):
        place(host, "0.base_layer", prepared=True)
    tv = prepare_for_peft(_build("torchvision"))
    attn = "encoder.layers.encoder_layer_1.self_attention"
    assert place(tv, f"{attn}.in_proj", prepared=False).part == "in_proj"
    assert place(tv, f"{attn}.in_proj", prepared=True).path == f"{attn}.in_proj"
    with pytest.raises(
        PlainModelError, match=r"out_proj: .*ExplicitMultiheadAttention, which exists only after.*nn.MultiheadAttention"
    ):
        place(tv, f"{attn}.out_proj", prepared=False, saved=True)  # a module to save there: no mapping


def test_any_timm_attention_reading_qkv_weight_is_named() -> None:
    """BEiT's attention (q/v biases): once wrapping switched qkv_bias_separate on, the plain model
    (switch off) would read qkv.weight; refused unless the adapter is for the prepared model."""
    import timm

    beit = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=32, depth=1, embed_dim=16, num_heads=1)
    beit.blocks[0].attn.qkv_bias_separate = True  # what mmpeft.targeting.prepare does to it
    with pytest.raises(PlainModelError, match=r"blocks\.0\.attn\.qkv: the plain timm Attention .*F\.linear"):
        place(beit, "blocks.0.attn.qkv", prepared=False)
    assert place(beit, "blocks.0.attn.qkv", prepared=True).path == "blocks.0.attn.qkv"
    assert place(beit, "blocks.0.attn.proj", prepared=False).path == "blocks.0.attn.proj"
