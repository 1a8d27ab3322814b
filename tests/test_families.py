"""The families found by structure beyond plain ViTs (BEiT, Hiera, SAM2's Hiera, MViTv2, PVTv2,
timm Swin V2, torchvision Swin v1 / v2, transformers Swin / Swinv2 / Segformer) on tiny random
models: detection, identity at init, batched equal to loop, modalities independent without
fusion, gradients, frozen weights, presence masks, save / load; and each family's special case
(timm's qkv_bias_separate, torchvision Swin's explicit attention, Hiera's adapter placement,
PVTv2's kv half, transformers Swin's refused adapter)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import mmpeft
from mmpeft import detect_family, wrap_multimodal
from tests.backbone_cases import FAMILY_CASES, FAMILY_MODELS, MODS, train_and_check, tv_swin
from tests.backbone_cases import main_tensor as _tensor
from tests.backbone_cases import randomise_family_trainables as _randomise_trainables
from tests.helpers import close

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread is fastest


SPLIT = {"lora": "lora", "adapter": "adapter"}  # the presets of each method without cross-modal mixing


def _build(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return FAMILY_MODELS[kind][0]().eval()


def _inputs(kind: str, batch: int = 2) -> dict[str, torch.Tensor]:
    s = FAMILY_MODELS[kind][1]
    g = torch.Generator().manual_seed(3)
    return {"optical": torch.rand(batch, 3, s, s, generator=g), "dsm": torch.rand(batch, 1, s, s, generator=g)}


def _close(a: Any, b: Any, rel: float = 1e-5) -> bool:
    return close(_tensor(a), _tensor(b), rel=rel)


@pytest.mark.parametrize("kind", FAMILY_MODELS)
def test_detected(kind: str) -> None:
    assert detect_family(_build(kind)).name == FAMILY_MODELS[kind][2]


@pytest.mark.parametrize(("kind", "method"), FAMILY_CASES)
def test_identity_at_init(kind: str, method: str) -> None:
    base = _build(kind)
    wrapped = wrap_multimodal(copy.deepcopy(base), MODS, method)  # mmlora / mmadapter: zero-initialised updates
    x = _inputs(kind)
    with torch.no_grad():
        out = wrapped(x)
        assert _close(out["optical"], base(x["optical"]))
        assert _close(out["dsm"], base(x["dsm"].repeat(1, 3, 1, 1)))


@pytest.mark.parametrize(("kind", "method"), FAMILY_CASES)
def test_batched_equals_loop_and_modalities_independent(kind: str, method: str) -> None:
    wrapped = wrap_multimodal(_build(kind), MODS, method)  # with the presets' mixing
    _randomise_trainables(wrapped)
    x = _inputs(kind)
    with torch.no_grad():
        batched = wrapped(x)
        wrapped.set_execution("loop")
        looped = wrapped(x)
    assert all(_close(batched[m], looped[m]) for m in MODS)
    split = wrap_multimodal(_build(kind), MODS, preset=SPLIT[method])  # fusion "none"
    _randomise_trainables(split)
    with torch.no_grad():
        together = split(x)
        for m in MODS:
            assert _close(together[m], split({m: x[m]})[m]), m  # each modality as if run alone


@pytest.mark.parametrize(("kind", "method"), FAMILY_CASES)
def test_training_step_touches_only_trainables(kind: str, method: str) -> None:
    if kind == "nextvit":  # its tiny random model's attention gradients are ~1e-31: no Adam step moves them
        pytest.skip("NextViT's random-init gradients vanish (1e-31) in the last stages; the other checks hold")
    if kind == "iformer":  # its tiny random model's q gradients are ~1e-19 (v_gate's 1e-9): Adam does not move them
        pytest.skip("IFormer's random-init q gradients vanish (1e-19); the other checks hold")
    train_and_check(wrap_multimodal(_build(kind), MODS, method), _inputs(kind))


@pytest.mark.parametrize(("kind", "method"), FAMILY_CASES)
def test_presence_mask_and_save_load(kind: str, method: str, tmp_path: Any) -> None:
    wrapped = wrap_multimodal(_build(kind), MODS, preset=SPLIT[method])
    _randomise_trainables(wrapped)
    x = _inputs(kind)
    with torch.no_grad():
        full = wrapped(x)
        masked = wrapped(x, presence={"dsm": torch.tensor([True, False])})
    assert _close(masked["optical"], full["optical"])  # no mixing: the optical branch never sees the DSM
    assert _close(_tensor(masked["dsm"])[:1], _tensor(full["dsm"])[:1])  # the present DSM sample
    wrapped.save_pretrained(tmp_path)
    loaded = mmpeft.load_multimodal(_build(kind), tmp_path)
    with torch.no_grad():
        again = loaded(x)
    assert all(close(_tensor(again[m]), _tensor(full[m]), rel=1e-5) for m in MODS)


# ---------------------------------------------------------------------- special cases


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("size", [32, 40])  # 40: a 10x10 grid padded to 12x12 windows
def test_torchvision_swin_explicit_attention_is_the_same_function(v2: bool, size: int) -> None:
    from mmpeft.backbones.torchvision_swin import make_swin_attention_explicit

    torch.manual_seed(0)
    base = tv_swin(v2=v2)().eval()
    with torch.no_grad():  # non-zero biases everywhere (v2's key bias too: torchvision drops it)
        for n, p in base.named_parameters():
            if n.endswith("bias"):
                p.normal_(0.0, 0.1)
    swapped = copy.deepcopy(base)
    names = make_swin_attention_explicit(swapped)
    assert names == ["features.1.0.attn", "features.1.1.attn", "features.3.0.attn"]
    assert list(swapped.state_dict()) == list(base.state_dict())
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        assert close(swapped(x), base(x), rel=1e-5)
    wrapped = wrap_multimodal(copy.deepcopy(base), MODS, "lora", preset="lora")
    with torch.no_grad():
        wrapped.base_model.features[1][1].attn.qkv.lora_B["dsm"]["v"].weight.normal_(0.0, 0.5)
        out = wrapped({"optical": x, "dsm": x[:, :1]})
    assert close(out["optical"], base(x), rel=1e-5)  # the update reaches the dsm output only
    assert not close(out["dsm"], base(x[:, :1].repeat(1, 3, 1, 1)), rel=1e-5)


def test_timm_qkv_bias_separate_switched_for_beit_and_swinv2() -> None:
    from mmpeft.targeting.prepare import prepare_backbone

    for kind, attn in (("timm_beit", "blocks.0.attn"), ("timm_swinv2", "layers.0.blocks.0.attn")):
        base = _build(kind)
        assert not base.get_submodule(attn).qkv_bias_separate
        prepared = copy.deepcopy(base)
        assert attn in prepare_backbone(prepared)["eva_qkv_bias"]
        x = _inputs(kind)["optical"]
        with torch.no_grad():
            assert close(prepared(x), base(x), rel=1e-5)


def test_hiera_adapter_follows_the_attention_projection() -> None:
    wrapped = wrap_multimodal(_build("timm_hiera"), MODS, "adapter")
    names = [n for n, _ in wrapped.layers()]
    assert "base_model.blocks.1.attn.proj" in names and "base_model.blocks.1.attn" not in names
    assert wrapped.base_model.blocks[1].attn.q_stride > 1  # HieraBlock reads it: the attention stays itself


def test_pvt_v2_lora_tunes_q_and_the_v_half_of_kv() -> None:
    wrapped = wrap_multimodal(_build("timm_pvt_v2"), MODS, "lora")
    attn = wrapped.base_model.stages[0].blocks[0].attn
    assert attn.kv.slices == {"v": (16, 32)} and attn.q.slices is None


def test_transformers_swin_adapter_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="no module holding the whole MLP"):
        wrap_multimodal(_build("hf_swinv2"), MODS, "adapter")
    after = wrap_multimodal(_build("hf_swinv2"), MODS, "adapter", targets=["attention.output.dense"], placement="after")
    assert len(dict(after.layers())) == 3
