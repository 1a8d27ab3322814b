"""Persistence of the trainable tensors and the parameter counts of the paper's Table VI."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from mmpeft import count_parameters, load_multimodal, trainable_summary, wrap_multimodal
from mmpeft.model.io import CONFIG_NAME, WEIGHTS_NAME
from tests.helpers import randomise_trainables as _randomise_trainables
from tests.tiny_models import tiny_sam, tiny_timm_sam


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_save_rebuild_load_reproduces_outputs(tmp_path, images, method: str) -> None:
    wrapped = wrap_multimodal(tiny_sam(), method=method, stems={"dsm": ("conv1x1", 1)})
    _randomise_trainables(wrapped)
    with torch.no_grad():
        expected = wrapped(images)
    wrapped.save_pretrained(str(tmp_path))
    saved = load_file(str(tmp_path / WEIGHTS_NAME))
    assert saved and all(("lora_" in k or "adapter_" in k or "stem_" in k) for k in saved)
    n_trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    assert sum(v.numel() for v in saved.values()) == n_trainable  # only what trains, all of it
    loaded = load_multimodal(tiny_sam(), tmp_path)  # a freshly built base model
    with torch.no_grad():
        got = loaded(images)
    for m in expected:
        assert torch.equal(got[m], expected[m])


def test_load_onto_wrong_base_names_keys(tmp_path) -> None:
    wrap_multimodal(tiny_sam(), method="lora").save_pretrained(str(tmp_path))
    from segment_anything.modeling import ImageEncoderViT

    bigger = ImageEncoderViT(
        img_size=64,
        patch_size=16,
        embed_dim=48,
        depth=2,
        num_heads=2,
        out_chans=16,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=3,
        global_attn_indexes=(1,),
    )
    with pytest.raises(
        ValueError, match=r"blocks\.0\.attn\.qkv\.base_layer\.weight: saved \(96, 32\) vs model \(144, 48\)"
    ):
        load_multimodal(bigger, tmp_path)


def test_load_with_different_config_names_keys(tmp_path) -> None:
    wrapped = wrap_multimodal(tiny_sam(), method="lora")
    wrapped.save_pretrained(str(tmp_path))
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    meta["config"]["rules"][1]["rank"] = 8
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(
        ValueError, match=r"shape mismatch: .*lin1\.lora_A\.optical\.weight: saved \(4, 32\) vs model \(8, 32\)"
    ):
        load_multimodal(tiny_sam(), tmp_path)
    meta["config"]["rules"][1]["rank"] = 4
    meta["config"]["rules"][1]["fusion"] = "none"
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"unexpected .*lora_fusion\.lam"):
        load_multimodal(tiny_sam(), tmp_path)
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        load_multimodal(tiny_sam(), tmp_path / "nothing")


def test_timm_save_load(tmp_path, images) -> None:
    wrapped = wrap_multimodal(tiny_timm_sam(), method="adapter", fusion="matrix")
    _randomise_trainables(wrapped)
    wrapped.save_pretrained(str(tmp_path))
    loaded = load_multimodal(tiny_timm_sam(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(images)["dsm"], wrapped(images)["dsm"])


SAM_SIZES = {
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}
TABLE_VI = {
    ("vit_b", "lora"): 1_032_240,
    ("vit_l", "lora"): 2_752_608,
    ("vit_h", "lora"): 4_587_648,
    ("vit_b", "adapter"): 14_201_880,
    ("vit_l", "adapter"): 50_454_576,
    ("vit_h", "adapter"): 105_062_464,
}


@pytest.mark.parametrize("size,method", sorted(TABLE_VI))
@pytest.mark.parametrize("impl", ["segment_anything", "timm"])
def test_table_vi_trainable_counts_exactly(size: str, method: str, impl: str) -> None:
    dim, depth, heads, glob = SAM_SIZES[size]
    sizes = dict(img_size=256, embed_dim=dim, depth=depth, num_heads=heads, global_attn_indexes=glob, use_rel_pos=True)
    with torch.device("meta"):
        if impl == "timm":
            from timm.models.vision_transformer_sam import VisionTransformerSAM

            enc: nn.Module = VisionTransformerSAM(**sizes, num_classes=0, global_pool="")
        else:
            from segment_anything.modeling import ImageEncoderViT

            enc = ImageEncoderViT(
                **sizes,
                window_size=14,
                norm_layer=partial(nn.LayerNorm, eps=1e-6),
            )
        frozen = sum(p.numel() for p in enc.parameters())
        wrapped = wrap_multimodal(enc, method=method)
    rep = count_parameters(wrapped)
    assert rep.trainable == TABLE_VI[(size, method)]
    assert rep.frozen == frozen
    expect_fusion = depth * (4 if method == "lora" else 2)
    assert rep["fusion"].trainable == expect_fusion
    assert "trainable params: " + f"{TABLE_VI[(size, method)]:,}" in trainable_summary(wrapped)
