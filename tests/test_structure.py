"""Placement by structure (mmpeft.targeting.structure): a transformer of no known family gets the presets'
modules from its module tree; the choice equals the known families' on their models; an
ambiguous structure is refused saying what was found."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable

import pytest
import torch
from torch import nn

from mmpeft import FAMILIES, detect_family, wrap_multimodal
from mmpeft.model.wrap import plan_targets
from mmpeft.targeting.structure import StructuralFamilyWarning, StructureError, find_structure
from mmpeft.targeting.targets import BackboneFamily, match_targets, structural_family
from tests.helpers import close
from tests.tiny_models import CustomBlock, tiny_custom, tiny_sam, tiny_timm_sam, tiny_timm_vit

MODS = ("optical", "dsm")


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"optical": torch.rand(2, 3, 32, 32, generator=g), "dsm": torch.rand(2, 1, 32, 32, generator=g)}


def _wrap(method: str, base: nn.Module | None = None):  # type: ignore[no-untyped-def]
    with pytest.warns(StructuralFamilyWarning, match=r"CustomViT.*fused qkv in_proj.*ffn\.0.*ffn\.2"):
        return wrap_multimodal(base if base is not None else tiny_custom(), MODS, method)


def _selected(model: nn.Module, fam: BackboneFamily) -> dict[str, list[str]]:
    parts = {
        "attention": [p for p in (fam.qkv, fam.q, fam.v, fam.kv) if p],
        "mlp": fam.mlp_linears(),
        "after": [fam.attn],
        "beside": [fam.mlp],
    }
    return {k: match_targets(model, fam.targets(*v)) for k, v in parts.items()}


def test_custom_vit_structure_and_summary() -> None:
    s = find_structure(tiny_custom())
    assert (s.qkv, s.q, s.v, s.out_proj) == ("in_proj", None, None, "out_proj")
    assert (s.mlp_in, s.mlp_out, s.mlp_gate, s.mlp) == ("ffn.0", "ffn.2", None, "ffn")
    assert s.attn == "out_proj"  # the smallest module holding in_proj and out_proj is the block itself
    assert (s.scope, s.n_blocks, s.width, s.hidden) == (r"layers\.\d+", 2, 24, 48)
    fam = structural_family(tiny_custom())
    assert fam.name == "structural" and fam.adapter_refused is None
    with pytest.warns(StructuralFamilyWarning, match="plan_targets"):
        assert detect_family(tiny_custom()) == fam


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        (
            "lora",
            {
                f"layers.{i}.{n}": k
                for i in (0, 1)
                for n, k in (("in_proj", "lora"), ("ffn.0", "lora"), ("ffn.2", "lora"))
            },
        ),
        ("adapter", {f"layers.{i}.{n}": "adapter" for i in (0, 1) for n in ("out_proj", "ffn")}),
    ],
)
def test_custom_vit_plan(method: str, expected: dict[str, str]) -> None:
    with pytest.warns(StructuralFamilyWarning):
        plan = plan_targets(tiny_custom(), MODS, method)
    assert {p.name: p.method for p in plan} == expected
    opts = {p.name: p.options for p in plan}
    if method == "lora":
        assert opts["layers.0.in_proj"]["slices"] == ["q", "v"] and opts["layers.1.ffn.2"]["fusion"] == "scalar"
    else:
        assert opts["layers.0.out_proj"]["placement"] == "after" and opts["layers.0.ffn"]["placement"] == "beside"


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_custom_vit_identity_gradients_and_loop(method: str) -> None:
    base = tiny_custom()
    wrapped = _wrap(method, copy.deepcopy(base))
    x = _inputs()
    with torch.no_grad():
        out = wrapped(x)
    assert close(out["optical"], base(x["optical"]), rel=1e-5)
    assert close(out["dsm"], base(x["dsm"].repeat(1, 3, 1, 1)), rel=1e-5)
    g = torch.Generator().manual_seed(5)
    trainable = {n: p for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable
    with torch.no_grad():
        for p in trainable.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (0.5 if p.numel() == 1 else 0.0))
    wrapped.train()
    sum(o.square().mean() for o in wrapped(x).values()).backward()
    no_grad = [n for n, p in trainable.items() if p.grad is None or not p.grad.any()]
    assert not no_grad, no_grad
    wrapped.eval()
    with torch.no_grad():
        batched = wrapped(x)
        wrapped.set_execution("loop")
        looped = wrapped(x)
    assert not close(batched["optical"], base(x["optical"]), rel=1e-4)  # the trainables act
    for m in MODS:
        assert close(batched[m], looped[m], rel=1e-5)


@pytest.mark.parametrize(
    ("build", "family"), [(tiny_timm_vit, "timm"), (tiny_timm_sam, "timm"), (tiny_sam, "segment_anything")]
)
def test_structure_chooses_what_the_known_family_chooses(build: Callable[[], nn.Module], family: str) -> None:
    model = build()
    assert detect_family(model).name == family  # known: no structural fallback, no warning
    assert _selected(model, structural_family(model)) == _selected(model, FAMILIES[family])


class _TwoMLPBlock(CustomBlock):
    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.ffn2 = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))


class _NoAttentionBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mix, self.ffn = (
            nn.Linear(dim, dim),
            nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)),
        )


def _stack(block: Callable[[int], nn.Module]) -> nn.Module:
    model = nn.Module()
    model.embed, model.layers = nn.Conv2d(3, 8, 4, 4), nn.ModuleList(block(8) for _ in range(2))
    return model


@pytest.mark.parametrize(
    ("model", "found"),
    [
        (nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.Flatten(), nn.Linear(8, 4)), r"no repeated blocks"),
        (
            _stack(_TwoMLPBlock),
            r"in block layers\.0 \(_TwoMLPBlock\): two or more candidate MLP pairs \['ffn\.0 -> ffn\.2', 'ffn2\.0 -> ffn2\.2'\]",
        ),
        (_stack(_NoAttentionBlock), r"no attention before the MLP.*found \['mix \(8 -> 8\)'\]"),
    ],
)
def test_ambiguous_structure_is_refused_saying_what_was_found(model: nn.Module, found: str) -> None:
    with pytest.raises(StructureError, match=found) as why:
        find_structure(model)
    with pytest.raises(ValueError) as err:
        detect_family(model)
    assert len(str(err.value)) < 400  # one sentence, not the list of every family
    if isinstance(model, nn.Sequential):  # no attention module, no q / k / v anywhere
        assert re.fullmatch(
            r"\w+ has no attention \(.*\): nothing for the presets to adapt \(a CNN or a modulation network\); pass targets=.*",
            str(err.value),
        )
    else:
        start = "cannot tell which ViT family Module belongs to, nor place the presets by structure ("
        assert str(err.value).startswith(start + str(why.value)[:100])


def test_a_single_block_with_attention_is_not_called_a_cnn() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.Flatten(2), CustomBlock(8))
    with pytest.raises(ValueError, match=r"cannot tell which ViT family Sequential.*no repeated blocks.*pass targets="):
        detect_family(model)


def test_blocks_that_differ_are_refused() -> None:
    model = _stack(CustomBlock)
    model.layers[1].qkv_renamed = model.layers[1].in_proj  # the second block's fused qkv renamed
    del model.layers[1].in_proj
    with pytest.raises(StructureError, match=r"the blocks differ: layers\.1 has no nn\.Linear \['in_proj'\]"):
        find_structure(model)
