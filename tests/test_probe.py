"""The wrap-time dry run (mmpeft.targeting.probe): modules whose input has no batch axis are refused by name,
every layer learns its batch factor, and the stacked forward checks the leading size exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mmpeft import wrap_multimodal
from mmpeft.runtime.verify import WrapError
from mmpeft.targeting.inject import apply_rules
from mmpeft.targeting.probe import ProbeError, ProbeWarning, dry_run, probe_batch_factors
from mmpeft.tuners import MultimodalLoRA
from mmpeft.tuners.base import stacked_batch
from tests.helpers import close
from tests.tiny_models import tiny_custom, tiny_sam, tiny_timm_vit

MODS3 = ("optical", "dsm", "sar")
REL = ["rel_pos.mlp.fc1", "rel_pos.mlp.fc2"]


def _relpos() -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model(
        "vit_relpos_small_patch16_224", img_size=32, depth=2, embed_dim=32, num_heads=2, num_classes=0
    ).eval()


def _randomise(wrapped: nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in (p for p in wrapped.parameters() if p.requires_grad):
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)


def _inputs(mods: tuple[str, ...], size: int = 32, b: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {m: torch.rand(b, 3, size, size, generator=g) for m in mods}


@pytest.mark.parametrize("mods", [("optical", "dsm"), MODS3])
def test_relpos_position_mlp_left_out_by_default_refused_when_named(mods: tuple[str, ...]) -> None:
    with pytest.warns(
        ProbeWarning, match=r"left out 4 module.*blocks\.0\.attn\.rel_pos\.mlp\.fc1 runs on a \(3, 3, 2\)"
    ):
        wrapped = wrap_multimodal(_relpos(), mods)
    names = [n for n, _ in wrapped.layers()]
    assert "base_model.blocks.0.attn.qkv" in names and not any("rel_pos" in n for n in names)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.rel_pos\.mlp\.fc1 runs on a \(3, 3, 2\) table") as err:
        wrap_multimodal(_relpos(), mods, targets=["attn.qkv", "mlp.fc1"])  # explicit targets: an error
    assert "exclude=" in str(err.value) and "at batch 2" in str(err.value)


def test_relpos_with_exclude_keeps_each_modality_its_own() -> None:
    wrapped = wrap_multimodal(_relpos(), MODS3, fusion="none", exclude=REL).eval()
    assert not any("rel_pos" in n for n, _ in wrapped.layers())
    assert {layer.batch_factor for _, layer in wrapped.layers()} == {1}
    _randomise(wrapped)
    x = _inputs(MODS3)
    with torch.no_grad():
        stacked = wrapped(x)
        for m in MODS3:
            alone = wrapped({m: x[m]})[m]
            assert close(stacked[m], alone, rel=1e-5), m


def test_exact_stack_check_names_layer_shape_and_expected_size() -> None:
    wrapped = wrap_multimodal(tiny_timm_vit(), MODS3, "lora", preset="lora")
    name, layer = next(iter(wrapped.layers()))
    assert isinstance(layer, MultimodalLoRA) and layer.batch_factor == 1
    x = torch.rand(9, 5, layer.in_features)  # divides by 3 modalities, but the batch is 2: 6 rows
    assert layer.factor_size == (32, 32)
    with (
        stacked_batch(wrapped, 2, (32, 32)),
        pytest.raises(ValueError, match=r"MultimodalLoRA.*\(9, 5, 32\).*must be 6"),
    ):
        layer(x)
    with stacked_batch(wrapped, 2, (64, 64)):  # another input size: windows may vary, a multiple of S*B
        assert layer(torch.rand(12, 5, layer.in_features)).shape == (12, 5, layer.out_features)
        with pytest.raises(ValueError, match="must be a multiple of 6"):
            layer(x)
    assert layer.batch_size is None  # cleared after the block
    assert layer(x).shape == (9, 5, layer.out_features)  # no batch known: divisibility only
    by_hand = MultimodalLoRA(nn.Linear(4, 4), MODS3, rank=2)
    assert by_hand.batch_factor is None
    with stacked_batch(by_hand, 2):
        assert by_hand(torch.rand(9, 4)).shape == (9, 4)  # k unknown: divisibility only
        with pytest.raises(ValueError, match="stacked on dim 0"):
            by_hand(torch.rand(8, 4))


@pytest.mark.parametrize("efficient", [True, False])
def test_sam_windows_factor_and_forward(efficient: bool) -> None:
    base = tiny_sam()
    wrapped = wrap_multimodal(copy.deepcopy(base), ("optical", "dsm"), efficient_attention=efficient).eval()
    factors = {n: layer.batch_factor for n, layer in wrapped.layers()}
    assert factors["base_model.blocks.0.attn.qkv"] == 4  # grid 4x4 padded to 6x6: 2x2 windows of 3
    assert factors["base_model.blocks.1.attn.qkv"] == 1  # global attention
    _randomise(wrapped)
    g = torch.Generator().manual_seed(2)
    x = {"optical": torch.rand(2, 3, 64, 64, generator=g), "dsm": torch.rand(2, 3, 64, 64, generator=g)}
    with torch.no_grad():
        out = wrapped(x)
        wrapped.set_execution("loop")
        loop = wrapped(x)
    for m in x:
        assert out[m].shape == (2, 16, 4, 4) and close(out[m], loop[m], rel=1e-5)


def _hf_vit() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=16, intermediate_size=32
    )
    return transformers.ViTModel(cfg).eval()


@pytest.mark.parametrize("build", [tiny_timm_vit, _hf_vit, tiny_custom])
def test_plain_vits_keep_working(build) -> None:  # type: ignore[no-untyped-def]
    base = build()
    wrapped = wrap_multimodal(copy.deepcopy(base), ("optical", "dsm"), "lora", targets="all-linear").eval()
    assert {layer.batch_factor for _, layer in wrapped.layers()} == {1}
    x = _inputs(("optical", "dsm"), size=32)
    with torch.no_grad():
        out = wrapped(x)
        ref = base(x["optical"])
    first = lambda o: o if isinstance(o, torch.Tensor) else o[0]  # noqa: E731
    assert close(first(out["optical"]), first(ref), rel=1e-5)  # LoRA starts at zero


def test_probe_restores_modes_hooks_and_grad_mode() -> None:
    model = _relpos()
    model.blocks[1].train()  # mixed modes must come back as they were
    modes = {n: m.training for n, m in model.named_modules()}
    hooks = {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()}
    names = ["blocks.0.attn.qkv", "blocks.0.attn.rel_pos.mlp.fc1"]
    probed = dry_run(model, names, 3)
    assert probed["blocks.0.attn.qkv"].factor == 1 and probed["blocks.0.attn.qkv"].shapes[1] == (
        (2, 4, 32),
    )  # 4 tokens, no class token
    assert not probed["blocks.0.attn.rel_pos.mlp.fc1"].follows_batch()
    with pytest.raises(ValueError, match="rel_pos"):
        probe_batch_factors(model, names, 3)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()} == hooks
    assert torch.is_grad_enabled()


class _NeedsText(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 8, 8)
        self.fc = nn.Linear(8, 8)
        self.unused = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        if text is None:
            raise TypeError("text is required")
        return self.fc(self.patch(x).flatten(2).transpose(1, 2)) + text


class _Unused(_NeedsText):
    def forward(self, x: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc(self.patch(x).flatten(2).transpose(1, 2))


def test_failed_dry_run_and_unused_module_are_named() -> None:
    with pytest.raises(ProbeError, match=r"_NeedsText\(x\) with x of shape \(1, 3, 224, 224\).*text is required"):
        wrap_multimodal(_NeedsText(), ("optical", "dsm"), "lora", targets=["fc"])
    with pytest.raises(WrapError, match=r"input: \[?'?unused'?\]?\. Their updates"):
        wrap_multimodal(_Unused(), ("optical", "dsm"), "lora", targets=["fc", "unused"])
    # without the probe: wrapped, the layers keep the divisibility check
    from mmpeft.config import MultimodalConfig
    from mmpeft.model.wrap import build_config

    model = _NeedsText()
    config: MultimodalConfig = build_config(model, ("optical", "dsm"), "lora", targets=["fc"])
    with pytest.raises(ValueError, match=r"probe_size=\(8, 8\) needs probe=True"):
        apply_rules(model, config, probe=False, probe_size=(8, 8))  # a size no dry run would use
    assert apply_rules(model, config, probe=False) == ["fc"]
    assert model.fc.batch_factor is None
    # a model whose size the probe cannot read: the dry run's input size is an option
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    with pytest.raises(ProbeError, match=r"\(1, 3, 224, 224\)"):
        apply_rules(copy.deepcopy(net), build_config(net, ("optical", "dsm"), "lora", targets=["0", "2"]))
    assert apply_rules(net, build_config(net, ("optical", "dsm"), "lora", targets=["0", "2"]), probe_size=(8, 8))
    assert net[0].batch_factor == 1 and net[2].batch_factor == 1


@pytest.mark.parametrize("probe", ["yes", (64,), (0, 64), 1])
def test_a_probe_value_that_cannot_be_honoured_is_named(probe: object) -> None:
    with pytest.raises(TypeError, match="probe must be True, False or an \\(H, W\\) pair"):
        wrap_multimodal(tiny_timm_vit(), ("optical", "dsm"), "lora", targets=["mlp.fc1"], probe=probe)
