"""``labels=`` to a wrapped Hugging Face head: each modality's output carries the loss of its own
logits, the loss the plain model computes for that modality alone; other heads are refused by name."""

from __future__ import annotations

import pytest
import torch

from mmpeft import wrap_multimodal
from tests.helpers import assert_close
from tests.hf_zoo import vit_classifier

transformers = pytest.importorskip("transformers")

MODS = ("optical", "dsm")


def _classifier() -> torch.nn.Module:
    return vit_classifier().eval()


def _randomise(model: torch.nn.Module, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _inputs() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = {"optical": torch.rand(3, 3, 32, 32, generator=g), "dsm": torch.rand(3, 1, 32, 32, generator=g)}
    return x, torch.tensor([0, 3, 1])


def test_each_modality_gets_the_loss_the_plain_model_computes_alone() -> None:
    w = wrap_multimodal(_classifier(), MODS, preset="lora")  # no mixing: each modality a plain model
    _randomise(w)
    x, y = _inputs()
    out = w(pixel_values=x, labels=y)
    for m in MODS:
        assert type(out[m]).__name__ == "ImageClassifierOutput" and out[m].loss.dim() == 0
        plain = w.merge_and_unload(m)
        with torch.no_grad():
            want = plain(pixel_values=x[m].expand(-1, 3, -1, -1), labels=y)
        assert_close(out[m].loss, want.loss, rel=1e-5)
        assert_close(out[m].logits, want.logits, rel=1e-5)
        assert out[m].to_tuple()[0] is out[m].loss  # first, as Hugging Face orders it
    assert list(out) == ["loss", *MODS]  # the combined loss first, then each modality's output
    assert_close(out.loss, (out["optical"].loss + out["dsm"].loss) / 2, rel=1e-6)
    out.loss.backward()
    assert all(p.grad is not None for n, p in w.named_parameters() if p.requires_grad and "lora_" in n)


def test_a_mixing_wrap_and_a_sequence_input() -> None:
    w = wrap_multimodal(_classifier(), MODS, preset="mmlora", stems={"dsm": ("repeat", 1)})
    _randomise(w)
    x, y = _inputs()
    with torch.no_grad():
        out = w([x["optical"], x["dsm"]], labels=y)
    for o in out:
        assert_close(o.loss, torch.nn.functional.cross_entropy(o.logits, y), rel=1e-5)
    with pytest.raises(ValueError, match="labels= with a presence mask"):
        w(pixel_values=x, labels=y, presence={"dsm": torch.tensor([True, False, True])})


def test_a_head_that_computes_its_loss_inline_is_refused_naming_the_way() -> None:
    torch.manual_seed(0)
    cfg = transformers.SegformerConfig(
        num_encoder_blocks=1,
        depths=[1],
        sr_ratios=[1],
        hidden_sizes=[16],
        patch_sizes=[4],
        strides=[4],
        num_attention_heads=[1],
        mlp_ratios=[2],
        decoder_hidden_size=16,
        num_labels=3,
    )
    seg = transformers.SegformerForSemanticSegmentation(cfg).eval()
    w = wrap_multimodal(seg, MODS, "lora", targets=["attention.q_proj", "attention.v_proj"], probe=(32, 32))
    x, _ = _inputs()
    with torch.no_grad():
        out = w(pixel_values=x)  # without labels: each modality's logits
    assert out["dsm"].logits.shape[:2] == (3, 3)
    with pytest.raises(ValueError, match="SegformerForSemanticSegmentation.*ForSemanticSegmentationLoss"):
        w(pixel_values=x, labels=torch.zeros(3, 32, 32, dtype=torch.long))


def test_labels_of_a_model_of_ones_own_go_to_it_unchanged() -> None:
    class Conditioned(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Conv2d(3, 4, 8, 8)

        def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
            y = self.proj(x).flatten(1)
            return y if labels is None else y + labels[:, None]  # labels stacked by the caller

    w = wrap_multimodal(Conditioned(), MODS, "lora", targets=["proj"], probe=(16, 16))
    x = {m: torch.rand(2, 3, 16, 16) for m in MODS}
    with torch.no_grad():
        out = w(x, labels=torch.ones(4))
        plain = w(x)
    for m in MODS:
        assert_close(out[m], plain[m] + 1, rel=1e-5)


def test_a_modality_named_loss_is_refused_with_labels_before_the_run() -> None:
    """The combined loss is the output's ``"loss"`` entry: a modality of that name is refused, before any work."""
    w = wrap_multimodal(_classifier(), ("optical", "loss"), preset="lora", stems={"loss": ("repeat", 1)})
    x, y = _inputs()
    with pytest.raises(ValueError, match="modality named 'loss'"):
        w(pixel_values={"optical": x["optical"], "loss": x["dsm"]}, labels=y)
    assert w.call_check_pending  # the model did not run
    with torch.no_grad():
        assert set(w(pixel_values={"optical": x["optical"], "loss": x["dsm"]})) == {"optical", "loss"}
