"""Hugging Face models as they are (their call signature, their output types, per modality) and
``torch.export`` of a wrapped model with trainable parameters (equal to eager)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mmpeft import wrap_multimodal
from tests.helpers import assert_close
from tests.tiny_models import tiny_timm_vit

MODS = ("optical", "dsm")
HF = {
    "vit": ("ViTModel", "ViTConfig", {"intermediate_size": 32}),
    "clip_vision": ("CLIPVisionModel", "CLIPVisionConfig", {"intermediate_size": 32}),
    "dinov2": ("Dinov2Model", "Dinov2Config", {"mlp_ratio": 2}),
    "siglip_vision": ("SiglipVisionModel", "SiglipVisionConfig", {"intermediate_size": 32}),
}


def _hf(kind: str) -> Any:
    transformers = pytest.importorskip("transformers")
    model, config, extra = HF[kind]
    sizes = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=16)
    torch.manual_seed(0)
    return getattr(transformers, model)(getattr(transformers, config)(**sizes, **extra)).eval()


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {"optical": torch.rand(2, 3, 32, 32, generator=g), "dsm": torch.rand(2, 1, 32, 32, generator=g)}


@pytest.mark.parametrize("kind", sorted(HF))
def test_hugging_face_outputs_keep_their_type_and_keyword_calls_work(kind: str) -> None:
    base = _hf(kind)
    w = wrap_multimodal(base, MODS, preset="mmlora")
    x = _inputs()
    with torch.no_grad():
        out = w(pixel_values=x, output_hidden_states=True)  # the model's own keyword and options
        positional = w(x)
        plain = _hf(kind)(pixel_values=x["optical"], output_hidden_states=True)
    for m in MODS:
        assert type(out[m]) is type(plain)  # e.g. BaseModelOutputWithPooling
        assert out[m].last_hidden_state.shape == plain.last_hidden_state.shape
        assert len(out[m].hidden_states) == len(plain.hidden_states)
        assert torch.equal(out[m].last_hidden_state, positional[m].last_hidden_state)
    # identity at init: the optical output is the plain model's
    assert_close(out["optical"].last_hidden_state, plain.last_hidden_state, rel=1e-5)
    if plain.pooler_output is not None:
        assert_close(out["optical"].pooler_output, plain.pooler_output, rel=1e-5)


def test_a_call_without_inputs_names_the_keyword() -> None:
    w = wrap_multimodal(_hf("vit"), MODS, preset="mmlora")
    with pytest.raises(TypeError, match="pixel_values="):
        w(output_hidden_states=True)


@pytest.mark.parametrize("preset", ["mmlora", "mmadapter"])
def test_torch_export_with_trainable_parameters_equals_eager(preset: str) -> None:
    w = wrap_multimodal(tiny_timm_vit(), MODS, preset=preset)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in (p for p in w.parameters() if p.requires_grad):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (0.5 if p.numel() == 1 else 0.0))
    assert any(p.requires_grad for p in w.parameters())
    x = {"optical": torch.rand(2, 3, 32, 32, generator=g), "dsm": torch.rand(2, 1, 32, 32, generator=g)}
    with torch.no_grad():
        want = w(x)
    exported = torch.export.export(w, (x,))
    with torch.no_grad():
        got = exported.module()(x)
    for m in MODS:
        assert_close(got[m], want[m], rel=1e-5)
