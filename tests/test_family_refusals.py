"""Issue 24's special cases beyond the family conformance (tests/test_families.py): what a preset
leaves out and says so, CaiT's adapter width, and the families refused in one sentence."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmpeft
from mmpeft import wrap_multimodal
from mmpeft.targeting.coverage import CoverageWarning
from mmpeft.targeting.probe import ProbeWarning
from tests.family_zoo import build
from tests.helpers import close

MODS = ("optical", "dsm")


def _wrap(kind: str, method: str, **kw: object) -> tuple[mmpeft.MultimodalModel, list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = wrap_multimodal(build(kind), MODS, method, **kw)
    return wrapped, [w for w in caught if issubclass(w.category, (ProbeWarning, CoverageWarning))]


def test_cait_after_adapter_takes_the_attention_output_width() -> None:
    wrapped, _ = _wrap("cait", "adapter")
    attn = wrapped.base_model.blocks[0].attn
    assert attn.in_features == attn.out_features == 32  # not proj_w's heads x heads (2 -> 2)
    assert attn.base_layer.proj_w.out_features == 2
    with torch.no_grad():
        assert wrapped({m: torch.rand(2, 3, 32, 32) for m in MODS})["dsm"].shape == (2, 32)


def test_cait_class_attention_without_an_update_is_named() -> None:
    _, caught = _wrap("cait", "lora")
    (w,) = [w for w in caught if w.category is CoverageWarning]
    assert re.search(
        r"leaves 1 of the model's 3 attention modules without an update \(ClassAttn: \[?'?blocks_token_only\.0\.attn'?\]?\)",
        str(w.message),
    )
    covered, caught = _wrap("cait", "lora", targets=["attn.qkv", "attn.q", "attn.v"])
    assert not caught and "base_model.blocks_token_only.0.attn.q" in dict(covered.layers())


def test_position_mlps_left_out_by_default_with_a_warning() -> None:
    wrapped, caught = _wrap("maxvit_rmlp", "lora")
    assert not any("rel_pos" in n for n, _ in wrapped.layers()) and len(dict(wrapped.layers())) == 12
    (w,) = caught
    assert w.category is ProbeWarning and "attn.rel_pos.mlp.fc1 runs on a (7, 7, 2) table" in str(w.message)
    with pytest.raises(ValueError, match=r"rel_pos\.mlp\.fc1 runs on a \(7, 7, 2\) table.*exclude="):
        wrap_multimodal(build("maxvit_rmlp"), MODS, "lora", targets=["attn.qkv", "rel_pos.mlp.fc1"])


def test_mobilevit_identity_attn_placeholders_left_out() -> None:
    wrapped, caught = _wrap("mobilevit", "adapter")
    assert "base_model.stages.0.0.attn" not in dict(wrapped.layers())
    assert any("nn.Identity placeholder" in str(w.message) and "stages.0.0.attn" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match=r"cannot infer the channels of stages\.0\.0\.attn \(Identity\)"):
        wrap_multimodal(build("mobilevit"), MODS, "adapter", targets=["stages.0.0.attn"], placement="after")


def test_volo_adapter_not_nested_inside_the_outlook_attention() -> None:
    wrapped, caught = _wrap("volo", "adapter")
    names = dict(wrapped.layers())
    assert "base_model.network.0.0.attn" in names and "base_model.network.0.0.attn.base_layer.attn" not in names
    assert any("inside a module an adapter already wraps" in str(w.message) for w in caught)


@pytest.mark.parametrize("kind", ["convnext", "hgnet"])
def test_a_cnn_is_refused_in_one_sentence(kind: str) -> None:
    with pytest.raises(ValueError) as err:
        wrap_multimodal(build(kind), MODS, "lora")
    assert re.fullmatch(
        r"\w+ has no attention \([^)]*\): nothing for the presets to adapt \(a CNN or a modulation network\); pass targets=[^.]*",
        str(err.value),
    )


def test_tnt_tunes_the_q_half_of_its_fused_qk() -> None:
    wrapped, caught = _wrap("tnt", "lora")
    assert wrapped.base_model.blocks[0].attn_out.qk.slices == {"q": (0, 32)}
    assert any("blocks.0.attn_in" in str(w.message) for w in caught)  # the inner (pixel) attention: named


@pytest.mark.parametrize("kind", ["visformer", "mobilevitv2", "efficientformer", "fastvit", "efficientformerv2"])
def test_convolutional_attention_gets_conv_lora_and_no_adapter(kind: str) -> None:
    wrapped = wrap_multimodal(build(kind), MODS, "lora")
    assert any(type(layer).__name__ == "MultimodalLoRAConv2d" for _, layer in wrapped.layers())
    qkv = [layer for n, layer in wrapped.layers() if n.endswith(("attn.qkv", "attn.qkv_proj"))]
    assert all(layer.lora_B["dsm"].weight.shape[0] == layer.base_layer.out_channels for layer in qkv)  # whole
    with pytest.raises(ValueError, match=r"adapter presets cannot be placed .*1x1 convolutions on \(N, C, H, W\) maps"):
        wrap_multimodal(build(kind), MODS, "adapter")


class _ConvAttention(nn.Module):
    """Attention computed on (N, C, H, W) maps with 1x1 convolutions (no family knows it)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Conv2d(dim, dim, 1) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (f(x).flatten(2).transpose(1, 2) for f in (self.q, self.k, self.v))
        return x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape)


def test_unknown_convolutional_attention_is_refused_naming_its_projections() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 4, 4), _ConvAttention(8), _ConvAttention(8))
    with pytest.raises(ValueError) as err:
        wrap_multimodal(model, MODS, "lora")
    assert str(err.value).startswith("Sequential's attention projects with 1x1 convolutions (1.q, 1.k), not nn.Linear")
    assert len(str(err.value)) < 400 and "pass targets=" in str(err.value)
    wrapped = wrap_multimodal(model, MODS, "lora", targets=["q", "v"])
    assert {type(layer).__name__ for _, layer in wrapped.layers()} == {"MultimodalLoRAConv2d"}


def test_convolutional_attention_by_explicit_targets_is_exact() -> None:
    wrapped = wrap_multimodal(build("visformer"), MODS, "lora", targets=["attn.qkv", "attn.proj"], fusion="none")
    assert {type(layer).__name__ for _, layer in wrapped.layers()} == {"MultimodalLoRAConv2d"}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (p for p in wrapped.parameters() if p.requires_grad):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        x = {m: torch.rand(2, 3, 64, 64, generator=g) for m in MODS}
        together = wrapped(x)
        for m in MODS:
            assert close(together[m], wrapped({m: x[m]})[m], rel=1e-5)


def test_vitmae_reference_says_its_forward_is_random() -> None:
    wrapped = wrap_multimodal(build("vitmae"), MODS, "lora")
    x = {m: torch.rand(2, 3, 32, 32) for m in MODS}
    with torch.no_grad():
        wrapped.base_model.layers[0].mlp.fc2.lora_B["dsm"].weight.normal_()
        with pytest.raises(RuntimeError, match=r"ViTMAEModel's forward is random .*pass a fixed noise="):
            mmpeft.reference_forward(wrapped, x)
        ref = mmpeft.reference_forward(wrapped, x, noise=torch.arange(16).expand(2, -1))
        out = wrapped(x, noise=torch.arange(16).expand(4, -1))
    for m in MODS:
        assert close(ref[m].last_hidden_state, out[m].last_hidden_state, rel=1e-5)
