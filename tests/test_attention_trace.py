"""Attention found by what a module computes (issue 31): attention left without an update is named
whatever its class is called (ConViT's GPSA, XCiT's class attention beside its XCA), no model with
attention is called a CNN, and GCViT's kv-only blocks get LoRA on their v half (said)."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

from mmpeft import wrap_multimodal
from mmpeft.targeting.attention_trace import traced_attention
from mmpeft.targeting.coverage import CoverageWarning, has_attention
from mmpeft.targeting.structure import StructuralFamilyWarning
from tests.family_zoo import ZOO, build
from tests.helpers import assert_close, randomise_trainables

MODS = ("optical", "dsm")


def _wrap(kind: str, method: str = "lora") -> tuple[object, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = wrap_multimodal(build(kind), MODS, method)
    return wrapped, [str(w.message) for w in caught if w.category in (CoverageWarning, StructuralFamilyWarning)]


class Products(nn.Module):
    """Two activations multiplied (attention) and a channel softmax over pooled weights (not)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.gate = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = (self.q(x) @ self.k(x).transpose(-2, -1)).softmax(-1) @ x
        return a * torch.softmax(self.gate(x.mean(1, keepdim=True)), -1)  # SK-style channel attention: no product


class Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = Products(), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x.flatten(2).transpose(1, 2)))


def test_trace_credits_the_module_that_multiplies_two_activations() -> None:
    assert traced_attention(Wrapper(), 8, (4, 4)) == ["body"]
    assert traced_attention(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Softmax(1)), 3, (4, 4)) == []


@pytest.mark.parametrize(
    ("kind", "classes", "left"),
    [("convit", "GPSA", ["blocks.0.attn"]), ("xcit", "ClassAttn", ["cls_attn_blocks.0.attn"])],
)
def test_attention_without_an_update_is_named_whatever_its_class(kind: str, classes: str, left: list[str]) -> None:
    _, caught = _wrap(kind)
    (msg,) = [m for m in caught if "without an update" in m]
    assert re.search(rf"leaves {len(left)} of the model's \d+ attention modules without an update \({classes}: ", msg)
    assert all(n in msg for n in left)


@pytest.mark.parametrize("kind", ["shvit", "iformer", "efficientvit_mit"])
def test_convolutional_attention_is_not_called_a_cnn(kind: str) -> None:
    assert has_attention(build(kind))
    try:
        wrap_multimodal(build(kind), MODS, "lora")
    except ValueError as err:
        assert "nothing for the presets to adapt (a CNN" not in str(err)


def test_gcvit_kv_only_blocks_take_lora_on_their_v_half() -> None:
    wrapped, caught = _wrap("gcvit_kv")
    layers = dict(wrapped.layers())
    kv = layers["base_model.stages.0.blocks.1.attn.qkv"]
    assert kv.slices == {"v": (16, 32)} and layers["base_model.stages.0.blocks.0.attn.qkv"].slices == {
        "q": (0, 16),
        "v": (32, 48),
    }
    assert any("hold only keys and values" in m and "stages.0.blocks.1.attn.qkv" in m for m in caught)
    x = torch.rand(1, 3, ZOO["gcvit_kv"][1], ZOO["gcvit_kv"][1])
    with torch.no_grad():
        out = wrapped({m: x for m in MODS})
        ref = build("gcvit_kv")(x)
    assert_close(out["dsm"], ref, rel=1e-5)  # identity at init


@pytest.mark.parametrize(
    ("kind", "lora"),
    [
        (
            "shvit",
            ["stages.1.blocks.0.mixer.m.qkv.c", "stages.1.blocks.0.ffn.m.pw1.c", "stages.1.blocks.0.ffn.m.pw2.c"],
        ),
        ("iformer", ["stages.2.blocks.1.mixer.module.q.c", "stages.2.blocks.1.mixer.module.v_gate.c"]),
        ("efficientvit_mit", ["stages.2.blocks.1.context_module.main.qkv.conv"]),
    ],
)
def test_convolutional_attention_placed_by_what_it_feeds(kind: str, lora: list[str]) -> None:
    wrapped, caught = _wrap(kind)
    names = {n.removeprefix("base_model.") for n, _ in wrapped.layers()}
    assert set(lora) <= names
    assert not any(n.endswith(("k.c", "proj.c", "proj.conv")) for n in names)  # k alone and outputs left
    assert any("placed by what its attention computes" in m for m in caught)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\) maps with convolution projections"):
        wrap_multimodal(build(kind), MODS, "adapter")


def test_coat_parallel_blocks_placed_by_what_their_attention_computes() -> None:
    """The registered CoaT (serial and parallel blocks, crpe modules shared between them: tied
    tensors, which the shape-only run takes once) has no one block class: placed by the trace."""
    wrapped, caught = _wrap("coat_parallel")
    layers = {n.removeprefix("base_model."): m for n, m in wrapped.layers()}
    assert layers["parallel_blocks.1.factoratt_crpe4.qkv"].slices == {"q": (0, 32), "v": (64, 96)}
    assert "parallel_blocks.1.mlp2.fc1" in layers and "serial_blocks1.0.mlp.fc2" in layers
    assert not any("without an update" in m for m in caught)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        out = wrapped({m: x for m in MODS})
        ref = build("coat_parallel")(x)
    assert_close(out["optical"], ref, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("halonet_h1", "HaloAttn"),  # 1x1 q and kv convolutions, bottleneck 1x1s around them
        ("swiftformer_xs", "EfficientAdditiveAttention"),  # additive attention: no product of two activations
        ("efficientvit_m0", "CascadedGroupAttention"),
        ("lowformer_b0", "ConvAttention"),
        ("edgenext_xx_small", "CrossCovarianceAttn"),
        ("caformer_s18", "Attention"),  # MetaFormer: attention in its last stages only
    ],
)
def test_registered_models_with_attention_placed_by_what_it_computes(name: str, kind: str) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0).eval()
    size = model.pretrained_cfg["input_size"][-2:]  # halonet_h1 takes 256 px
    x = torch.rand(1, 3, *size)
    with torch.no_grad():
        ref = model(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = wrap_multimodal(model, MODS, "lora")
    assert any(f"attention modules ({kind})" in str(w.message) for w in caught)
    with torch.no_grad():
        out = wrapped({m: x for m in MODS})
    assert_close(out["dsm"], ref, rel=1e-5)


@pytest.mark.slow
def test_coatnet_conv_qkv_takes_a_whole_conv_lora_said() -> None:
    timm = pytest.importorskip("timm")
    from mmpeft.tuners.lora import MultimodalLoRAConv2d

    torch.manual_seed(0)
    model = timm.create_model("coatnet_nano_rw_224", pretrained=False, num_classes=0).eval()
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        ref = model(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = wrap_multimodal(model, MODS, "lora")
    assert isinstance(wrapped.base_model.stages[2].blocks[0].attn.qkv, MultimodalLoRAConv2d)
    assert any("are convolutions, which a Conv2d LoRA takes whole" in str(w.message) for w in caught)
    with torch.no_grad():
        assert_close(wrapped({m: x for m in MODS})["dsm"], ref, rel=1e-5)


class PerSampleQuery(nn.Module):
    """Windows ``(B*nW, N, C)`` attended by a query per image ``(B, N, C)`` (GCViT's global query,
    repeated image-major), plus a table shared by every sample (rotary-like)."""

    def __init__(self) -> None:
        super().__init__()
        self.kv, self.proj = nn.Linear(8, 16), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, q: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        k, v = self.kv(x).chunk(2, -1)
        q = q.repeat_interleave(x.shape[0] // q.shape[0], 0) + table
        return self.proj((q @ k.transpose(-2, -1)).softmax(-1) @ v)


class Host(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Module()])
        self.blocks[0].attn = PerSampleQuery()
        self.table = nn.Parameter(torch.randn(4, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 4 windows, 4 tokens, 8)
        b = x.shape[0]
        q = x.mean(1)  # (B, 4, 8): one query per image
        return self.blocks[0].attn(x.flatten(0, 1), q, self.table).view(b, 4, 4, 8)


@pytest.mark.parametrize("kind", ["gcvit_kv", "host"])
def test_adapter_loop_equals_batched_with_a_per_sample_argument(kind: str) -> None:
    """An adapter wrapping a module called with a further tensor (GCViT's global query) ran that
    module once per modality with the whole query, silently mixing images (6e-3 relative on
    gcvit_kv before): the frozen module now runs on the stacked batch, the adapters per modality."""
    torch.manual_seed(0)
    if kind == "host":
        model: nn.Module = Host()
        wrapped = wrap_multimodal(model, MODS, "adapter", targets=["blocks.0.attn"], placement="after", probe=False)
        x = {m: torch.rand(2, 4, 4, 8) for m in MODS}
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped = wrap_multimodal(build(kind), MODS, "adapter")
        x = {m: torch.rand(2, 3, 64, 64) for m in MODS}
    randomise_trainables(wrapped)
    with torch.no_grad():
        batched = wrapped(x)
        wrapped.set_execution("loop")
        looped = wrapped(x)
    for m in MODS:
        assert_close(looped[m], batched[m], rel=1e-5, msg=m)


def test_the_trace_leaves_no_hook_and_the_modes_as_they_were() -> None:
    """A shape-only trace that succeeded returned before removing its hooks and restoring the
    training modes (a refused CNN was left in eval mode with two hooks on every module)."""
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(2048, 4))
    cnn.train()
    assert traced_attention(cnn, 3, (16, 16)) == []
    assert all(m.training for m in cnn.modules())
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in cnn.modules()) == 0


def test_tinyvit_qkv_laid_out_per_head_is_tuned_whole() -> None:
    """TinyViT's attn.qkv holds q, k, v per head (``view(B, N, heads, -1).split``): the timm
    family's q / v thirds tuned k in two heads and missed q and v in others, silently. Its own
    family tunes the projection whole; identity at init."""
    import timm

    from mmpeft.targeting.targets import detect_family

    torch.manual_seed(0)
    kw = dict(embed_dims=(16, 32, 32, 32), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2), window_sizes=(2, 2, 2, 2))
    model = timm.create_model("tiny_vit_5m_224", pretrained=False, num_classes=0, **kw).eval()
    assert detect_family(model).name == "timm_tiny_vit"
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        wrapped = wrap_multimodal(model, MODS, "lora")
        out = wrapped({m: x for m in MODS})
    qkv = [layer for n, layer in wrapped.layers() if n.endswith("attn.qkv")]
    assert qkv and all(layer.slices is None for layer in qkv)
    assert_close(out["optical"], ref, rel=1e-5)
