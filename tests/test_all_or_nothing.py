"""A wrap is all or nothing (issue 31): every check and every placement is decided before the first
module is replaced, and a refusal leaves the model exactly as given (state dict, requires_grad,
module tree and types, hooks), so that a second wrap of the same model then succeeds."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from mmpeft import wrap_multimodal
from mmpeft.errors import MmpeftValueError
from mmpeft.targeting.prepare import unchanged_on_error
from tests.helpers import assert_close

MODS = ("optical", "sar")
D = 16


class FusedAttention(nn.Module):
    """Self-attention with a fused q/k/v projection (out = 3 x in)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, -1)
        return self.proj(torch.softmax(q @ k.transpose(-2, -1) / D**0.5, -1) @ v)


class GlobalQueryAttention(nn.Module):
    """GCViT's global-query attention: ``qkv`` projects only keys and values (64 -> 128 there); the
    query comes from outside the block (a learnt global query here)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(D, 2 * D), nn.Linear(D, D)
        self.q_global = nn.Parameter(torch.randn(1, 1, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, v = self.qkv(x).chunk(2, -1)
        q = self.q_global.expand(x.shape[0], x.shape[1], D)
        return self.proj(torch.softmax(q @ k.transpose(-2, -1) / D**0.5, -1) @ v)


class Block(nn.Module):
    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(D), attn, nn.LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyGCViT(nn.Module):
    """A fused-qkv block, then a kv-only block of the same shape of names (``attn.qkv``)."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, D, 8, 8)
        self.blocks = nn.Sequential(Block(FusedAttention()), Block(GlobalQueryAttention()))
        self.head = nn.Linear(D, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.patch(x).flatten(2).transpose(1, 2))
        return self.head(x.mean(1))


def _record(model: nn.Module) -> dict[str, Any]:
    """Everything a refusal must leave as it was."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()},
        "objects": {k: v for k, v in model.state_dict(keep_vars=True).items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "tree": [(n, type(m)) for n, m in model.named_modules()],
        "ids": [id(m) for m in model.modules()],
        "hooks": [(n, list(m._forward_hooks), list(m._forward_pre_hooks)) for n, m in model.named_modules()],
        "training": [m.training for m in model.modules()],
    }


def _assert_as_before(model: nn.Module, before: dict[str, Any]) -> None:
    after = _record(model)
    assert after["tree"] == before["tree"] and after["ids"] == before["ids"]
    assert after["grad"] == before["grad"]
    assert after["hooks"] == before["hooks"] and after["training"] == before["training"]
    assert list(after["state"]) == list(before["state"])
    for k, v in before["state"].items():
        assert_close(after["state"][k], v, rel=0)  # bit for bit
        assert after["objects"][k] is before["objects"][k]  # the same tensors, not copies


def _model_with_hooks() -> tuple[TinyGCViT, list[str]]:
    torch.manual_seed(0)
    model = TinyGCViT()
    model.blocks[0].attn.qkv.weight.requires_grad_(False)  # a user's own freezing, kept as given
    calls: list[str] = []
    model.blocks[1].attn.register_forward_hook(lambda *_: calls.append("post"))
    model.blocks[0].register_forward_pre_hook(lambda *_: calls.append("pre"))
    return model, calls


def test_a_refusal_part_way_leaves_the_model_as_given_and_a_second_wrap_succeeds() -> None:
    model, calls = _model_with_hooks()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        y0 = model(x)
    before = _record(model)
    # blocks.0.attn.qkv takes q / v slices; blocks.1.attn.qkv (kv only, 16 -> 32) cannot: refused
    with pytest.raises(MmpeftValueError, match=r"blocks\.1\.attn\.qkv \(16 -> 32\) is not a fused q/k/v"):
        wrap_multimodal(model, MODS, "lora", targets=["attn.qkv"], slices=["q", "v"])
    _assert_as_before(model, before)
    # the same model wraps now, with targets that fit both blocks, then with the adapter on a fresh copy
    wrapped = wrap_multimodal(model, MODS, "lora", targets=["attn.qkv"])
    assert sorted(n for n, _ in wrapped.layers()) == ["base_model.blocks.0.attn.qkv", "base_model.blocks.1.attn.qkv"]
    calls.clear()
    with torch.no_grad():
        out = wrapped({m: x for m in MODS})
    assert calls == ["pre", "post"]  # the user's hooks still run, once for the stacked batch
    for m in MODS:
        assert_close(out[m], y0, rel=1e-5)  # identity at init


def test_a_refusal_after_the_layers_are_placed_is_undone() -> None:
    """``modules_to_save`` overlapping an adapted module is found once the layers are in place:
    the model is put back as it was (the guarantee behind the checks that come first)."""
    model, _ = _model_with_hooks()
    before = _record(model)
    with pytest.raises(MmpeftValueError, match=r"modules_to_save selects blocks\.0\.attn, which holds"):
        wrap_multimodal(model, MODS, "lora", targets=["attn.qkv"], modules_to_save=["blocks.0.attn"])
    _assert_as_before(model, before)
    wrapped = wrap_multimodal(model, MODS, "adapter", targets=["blocks.0.mlp", "blocks.1.mlp"], placement="after")
    assert len(list(wrapped.layers())) == 2


def test_unchanged_on_error_restores_classes_attributes_and_parameter_data() -> None:
    model, _ = _model_with_hooks()
    before = _record(model)
    with pytest.raises(RuntimeError, match="late failure"), unchanged_on_error(model):
        model.blocks[0].attn.__class__ = GlobalQueryAttention
        model.blocks[1].attn.flag = True
        model.blocks[1].mlp[0] = nn.Identity()
        model.head.weight.data = model.head.weight.data.double()
        model.requires_grad_(False).train(False)
        model.register_forward_hook(lambda *_: None)
        raise RuntimeError("late failure")
    _assert_as_before(model, before)
    assert type(model.blocks[0].attn) is FusedAttention and not hasattr(model.blocks[1].attn, "flag")


def _torchvision_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32)


@pytest.mark.parametrize(
    "kw",
    [
        dict(exclude=["nonexistent"]),
        dict(autocast_adapter_dtype="yes"),
        dict(rank_pattern={"zzz": 2}),
    ],
)
def test_refusals_after_the_model_is_prepared_leave_its_attention(kw: dict[str, Any]) -> None:
    """Resolving the targets swaps torchvision's nn.MultiheadAttention for its explicit equivalent;
    that ran before the guard, so these refusals left ExplicitMultiheadAttention in the model."""
    model = _torchvision_vit()
    keys = list(model.state_dict())
    with pytest.raises((ValueError, TypeError)):
        wrap_multimodal(model, ("a", "b"), targets="all-linear", **kw)
    assert type(model.encoder.layers[0].self_attention) is nn.MultiheadAttention
    assert list(model.state_dict()) == keys


def test_a_refused_load_leaves_the_base_model_as_given(tmp_path: Any) -> None:
    """load_multimodal onto another base model (its fingerprint differs) is refused; the base model
    had already been wrapped in place (a MultimodalLoRA in it, its weights frozen)."""
    import timm

    from mmpeft import load_multimodal

    def vit(mlp_ratio: float) -> nn.Module:
        torch.manual_seed(0)
        return timm.create_model(
            "vit_tiny_patch16_224", img_size=32, depth=1, embed_dim=32, num_heads=2, mlp_ratio=mlp_ratio
        )

    wrap_multimodal(vit(4.0), ("a", "b")).save_pretrained(tmp_path)
    other = vit(2.0)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="the base model differs"):
        load_multimodal(other, tmp_path)
    assert type(other.blocks[0].attn.qkv) is nn.Linear and all(p.requires_grad for p in other.parameters())
    assert other.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def test_the_plan_prepares_as_the_wrap_does_and_puts_the_model_back() -> None:
    """plan_targets' dry run refused timm BEiT ('not called in a dry run': its attention reads
    qkv.weight until prepared) and listed a module both adapted and saved whole, which the wrap
    refuses; the model comes back from the plan as given."""
    import timm

    from mmpeft import plan_targets

    torch.manual_seed(0)
    beit = timm.create_model("beit_base_patch16_224", img_size=32, depth=1, embed_dim=32, num_heads=2)
    flags = {n: getattr(m, "qkv_bias_separate", None) for n, m in beit.named_modules()}
    plan = [t.name for t in plan_targets(beit, ("a", "b"), "lora")]
    assert plan == [
        n.removeprefix("base_model.") for n, _ in wrap_multimodal(_clone(beit), ("a", "b"), "lora").layers()
    ]
    assert flags == {n: getattr(m, "qkv_bias_separate", None) for n, m in beit.named_modules()}
    with pytest.raises(ValueError, match="modules_to_save selects head"):
        plan_targets(beit, ("a", "b"), "lora", targets=["head", "qkv"], modules_to_save=["head"])


def _clone(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)
