"""The model's dtype recorded and restored whichever way it was set; adapters stay float32 masters
on a bf16 / fp16 base unless ``autocast_adapter_dtype=False`` (peft's ``autocast_adapter_dtype``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from mmpeft import MultimodalModel, load_multimodal, wrap_multimodal
from tests.helpers import assert_close
from tests.tiny_models import tiny_timm_vit

MODS = ("optical", "dsm")


def _inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"optical": torch.rand(2, 3, 32, 32, generator=g), "dsm": torch.rand(2, 1, 32, 32, generator=g)}


def _randomise(model: nn.Module, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _dtypes(w: MultimodalModel) -> tuple[set[torch.dtype], set[torch.dtype]]:
    """(dtypes of the trainable tensors, dtypes of the frozen floating tensors)."""
    own = {id(t) for t in w.trainable_tensors()}
    frozen = {t.dtype for t in w.base_model.parameters() if id(t) not in own and t.is_floating_point()}
    return {t.dtype for t in w.trainable_tensors() if t.is_floating_point()}, frozen


def _saved_dtype(directory: Path) -> object:
    return json.loads((directory / "mmpeft_config.json").read_text())["config"]["base_dtype"]


@pytest.mark.parametrize("how", ["to", "bfloat16", "base_dtype", "set_base_dtype", "base_before_wrap"])
def test_a_bf16_base_keeps_float32_adapters_and_is_recorded(how: str, tmp_path: Path) -> None:
    base = tiny_timm_vit()
    if how == "base_before_wrap":
        base = base.to(torch.bfloat16)
    w = wrap_multimodal(base, MODS, preset="mmlora", base_dtype="bf16" if how == "base_dtype" else None)
    if how == "to":
        w = w.to(torch.bfloat16)
    elif how == "bfloat16":
        w = w.bfloat16()
    elif how == "set_base_dtype":
        w.set_base_dtype(torch.bfloat16)
    _randomise(w)
    assert _dtypes(w) == ({torch.float32}, {torch.bfloat16})
    assert w.compute_dtype == torch.bfloat16 and w.status()["compute_dtype"] == "torch.bfloat16"
    x = _inputs()
    out = w(x)  # trains: float32 gradients on the float32 masters
    assert out["dsm"].dtype == torch.bfloat16
    sum(o.float().pow(2).mean() for o in out.values()).backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in w.parameters() if t.requires_grad)
    w.save_pretrained(tmp_path)
    assert _saved_dtype(tmp_path) == "bfloat16"
    again = load_multimodal(tiny_timm_vit(), tmp_path)  # a float32 base: cast as saved
    assert _dtypes(again) == ({torch.float32}, {torch.bfloat16})
    for a, b in zip(w.trainable_tensors(), again.trainable_tensors()):
        assert torch.equal(a, b)  # the saved float32 factors, not rounded
    with torch.no_grad():
        want, got = w.eval()(x), again(x)
    for m in MODS:
        assert torch.equal(got[m], want[m])


def test_loading_onto_a_base_already_in_bf16_builds_float32_adapters(tmp_path: Path) -> None:
    w = wrap_multimodal(tiny_timm_vit(), MODS, preset="mmlora")
    _randomise(w)
    w.save_pretrained(tmp_path)
    assert _saved_dtype(tmp_path) is None
    again = load_multimodal(tiny_timm_vit().to(torch.bfloat16), tmp_path)
    assert _dtypes(again) == ({torch.float32}, {torch.bfloat16}) and again.compute_dtype == torch.bfloat16
    for a, b in zip(w.trainable_tensors(), again.trainable_tensors()):
        assert torch.equal(a, b)
    with torch.no_grad():
        got, want = again(_inputs()), w.eval()(_inputs())
    for m in MODS:
        assert_close(got[m].float(), want[m], rel=0.05)  # bf16 base weights


def test_autocast_adapter_dtype_false_keeps_the_adapters_in_the_base_dtype(tmp_path: Path) -> None:
    w = wrap_multimodal(tiny_timm_vit(), MODS, preset="mmlora", autocast_adapter_dtype=False).to(torch.bfloat16)
    assert _dtypes(w) == ({torch.bfloat16}, {torch.bfloat16}) and not w.autocast_adapter_dtype
    w.set_base_dtype("fp16")
    assert _dtypes(w) == ({torch.float16}, {torch.float16})
    out = w(_inputs())
    out["optical"].float().pow(2).mean().backward()
    w.save_pretrained(tmp_path)
    again = load_multimodal(tiny_timm_vit(), tmp_path, autocast_adapter_dtype=False)
    assert _dtypes(again) == ({torch.float16}, {torch.float16})
    default = load_multimodal(tiny_timm_vit(), tmp_path)
    assert _dtypes(default) == ({torch.float32}, {torch.float16})
    with pytest.raises(TypeError, match="autocast_adapter_dtype must be a bool"):
        wrap_multimodal(tiny_timm_vit(), MODS, preset="mmlora", autocast_adapter_dtype="yes")


def test_back_to_float32_restores_float32_compute() -> None:
    w = wrap_multimodal(tiny_timm_vit(), MODS, preset="lora").to(torch.bfloat16)
    w = w.float()
    assert _dtypes(w) == ({torch.float32}, {torch.float32}) and w.compute_dtype is None
    assert w(_inputs())["optical"].dtype == torch.float32


def test_a_merged_model_moved_to_bf16_merges_again_from_the_float32_masters() -> None:
    w = wrap_multimodal(tiny_timm_vit(), MODS, preset="lora")
    _randomise(w)
    w.eval().merge_adapters()
    w = w.to(torch.bfloat16)
    layer = next(layer for _, layer in w.layers())
    with torch.no_grad():
        w(_inputs())
    want = (layer.base_layer.weight.float() + layer.get_delta_weight("dsm")).to(torch.bfloat16)
    assert torch.equal(layer.merged_weight[1], want)


def test_set_base_dtype_and_to_follow_one_rule() -> None:
    """set_base_dtype(d) and .to(d) leave the same state for every dtype (compute dtype and the
    trainable tensors' dtype), and a no-op .to() after set_base_dtype changes nothing."""
    for dt in (torch.bfloat16, torch.float16, torch.float64, torch.float32):
        a = wrap_multimodal(tiny_timm_vit(), ("optical", "dsm"), "lora")
        b = wrap_multimodal(tiny_timm_vit(), ("optical", "dsm"), "lora")
        a.set_base_dtype(dt)
        b.to(dt)
        state = [(m.compute_dtype, {t.dtype for t in m.trainable_tensors()}) for m in (a, b)]
        assert state[0] == state[1], (dt, state)
        a.to("cpu")
        assert (a.compute_dtype, {t.dtype for t in a.trainable_tensors()}) == state[0], dt
