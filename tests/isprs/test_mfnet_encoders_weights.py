"""Local weights of MFNet's SAM2 / ViT encoders (files written by the tests in the official layouts),
and ``model.backbone`` validation."""

from __future__ import annotations

import pytest
import torch

from mmpeft_isprs.model import MFNetConfig, build_mfnet, load_mfnet, save_mfnet
from mmpeft_isprs.model.encoder_weights import EncoderCheckpointError
from mmpeft_isprs.model.sam2_weights import sam2_to_timm_state_dict, timm_to_sam2_state_dict
from tests.helpers import close
from tests.isprs.encoders import DINO, HIERA, S, base_encoder, inputs

#: keys of an official SAM2 file outside the trunk (dropped on purpose, reported)
OTHER_SAM2 = ("image_encoder.neck.convs.0.conv.weight", "sam_mask_decoder.iou_token.weight", "maskmem_tpos_enc")


def write_sam2(path, trunk_state: dict[str, torch.Tensor]) -> None:
    """An official-layout SAM2 file: {"model": {image_encoder.trunk.*, neck, decoder, ...}}."""
    state = timm_to_sam2_state_dict(trunk_state)
    state.update({k: torch.zeros(2) for k in OTHER_SAM2})
    torch.save({"model": state}, path)


def sam2_file(tmp_path, seed: int = 7):
    cfg = MFNetConfig(**HIERA, img_size=S)
    source = base_encoder(cfg, seed=seed)
    path = tmp_path / "sam2_hiera_tiny.pt"
    write_sam2(path, source.trunk.state_dict())
    return path, source


def test_key_map_is_timms_and_its_inverse() -> None:
    trunk = base_encoder(MFNetConfig(**HIERA, img_size=S)).trunk
    official = timm_to_sam2_state_dict(trunk.state_dict())
    assert "image_encoder.trunk.blocks.1.mlp.layers.0.weight" in official
    assert "image_encoder.trunk.blocks.1.proj.weight" in official  # the pooled-query block's skip projection
    assert not [k for k in official if ".fc1." in k or ".fc2." in k or not k.startswith("image_encoder.trunk.")]
    back, dropped = sam2_to_timm_state_dict({**official, "image_encoder.neck.convs.0.conv.weight": torch.zeros(1)})
    assert dropped == ["image_encoder.neck.convs.0.conv.weight"]
    assert back.keys() == trunk.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in trunk.state_dict().items())


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_official_sam2_file_reproduces_the_unwrapped_encoder(tmp_path, method: str) -> None:
    path, source = sam2_file(tmp_path)
    torch.manual_seed(0)  # another random trunk: only the file can make the outputs equal
    model = build_mfnet(**HIERA, img_size=S, method=method, checkpoint=str(path)).eval()
    report = model.load_report
    assert report.missing == [] and report.unexpected == [] and sorted(report.dropped) == sorted(OTHER_SAM2)
    assert set(report.loaded) == set(source.trunk.state_dict())
    x = inputs(seed=4)
    with torch.no_grad():
        feats = model.encoder(x)
        for m, xm in x.items():
            want = source(xm.repeat(1, 3 // xm.shape[1], 1, 1))
            assert all(close(a, b, rel=1e-5) for a, b in zip(feats[m], want))


def test_saved_mfnet_reloads_its_sam2_file(tmp_path) -> None:
    path, _ = sam2_file(tmp_path)
    model = build_mfnet(**HIERA, img_size=S, method="lora", checkpoint=str(path))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and "lora_B" in n:
                p.normal_(0, 0.1)
    model.eval()
    x = inputs(seed=6)
    with torch.no_grad():
        want = model(x)
    save_mfnet(model, tmp_path / "m.safetensors")
    torch.manual_seed(3)
    with torch.no_grad():
        assert torch.equal(load_mfnet(tmp_path / "m.safetensors").eval()(x), want)


def test_sam2_missing_and_unexpected_keys_are_named(tmp_path) -> None:
    trunk = base_encoder(MFNetConfig(**HIERA, img_size=S)).trunk.state_dict()
    lost = dict(trunk)
    del lost["blocks.2.attn.qkv.bias"]
    write_sam2(tmp_path / "lost.pt", lost)
    with pytest.raises(EncoderCheckpointError, match=r"missing from the checkpoint: blocks\.2\.attn\.qkv\.bias"):
        build_mfnet(**HIERA, img_size=S, checkpoint=str(tmp_path / "lost.pt"))
    write_sam2(tmp_path / "extra.pt", {**trunk, "blocks.0.attn.rel_pos_h": torch.zeros(3)})
    with pytest.raises(EncoderCheckpointError, match=r"unexpected in it: blocks\.0\.attn\.rel_pos_h"):
        build_mfnet(**HIERA, img_size=S, checkpoint=str(tmp_path / "extra.pt"))


def _zeros_like_meta(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A state dict of ``model``'s shapes that costs nothing on disk (one stored zero each)."""
    return {k: torch.zeros(1).expand(v.shape) for k, v in model.state_dict().items()}


def test_files_of_other_encoders_are_refused_naming_them(tmp_path) -> None:
    import timm

    large = timm.create_model("sam2_hiera_large", pretrained=False, num_classes=0, device="meta")
    write_sam2(tmp_path / "large.pt", _zeros_like_meta(large))
    with pytest.raises(EncoderCheckpointError, match=r"sam2_hiera_large; model.backbone sam2_hiera_tiny"):
        build_mfnet(**HIERA, img_size=S, checkpoint=str(tmp_path / "large.pt"))
    sam = {
        "image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16),
        "image_encoder.blocks.0.norm1.weight": torch.zeros(768),
    }
    torch.save(sam, tmp_path / "sam_vit_b.pth")
    with pytest.raises(EncoderCheckpointError, match=r"a SAM \(v1\) ViT checkpoint .*not a SAM2 checkpoint"):
        build_mfnet(**HIERA, img_size=S, checkpoint=str(tmp_path / "sam_vit_b.pth"))
    with pytest.raises(EncoderCheckpointError, match=r"is a SAM2 checkpoint .*dinov2_vits14 is a ViT of width 32"):
        build_mfnet(**DINO, img_size=S, checkpoint=str(tmp_path / "large.pt"))
    dino = _zeros_like_meta(
        timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, device="meta")
    )
    torch.save({**dino, "mask_token": torch.zeros(1, 384)}, tmp_path / "dinov2_vits14_pretrain.pth")
    with pytest.raises(EncoderCheckpointError, match=r"official DINOv2 checkpoint \(width 384, 12 blocks"):
        build_mfnet(**HIERA, img_size=S, checkpoint=str(tmp_path / "dinov2_vits14_pretrain.pth"))
    with pytest.raises(
        EncoderCheckpointError, match=r"official DINOv2 checkpoint \(width 384, 12 blocks.*width 32 with 4"
    ):
        build_mfnet(**DINO, img_size=S, checkpoint=str(tmp_path / "dinov2_vits14_pretrain.pth"))
    with pytest.raises(FileNotFoundError, match="model.checkpoint .*nowhere.pt not found"):
        build_mfnet(**DINO, img_size=S, checkpoint=str(tmp_path / "nowhere.pt"))


@pytest.mark.parametrize("layout", ["dinov2", "timm"])
def test_dinov2_file_reproduces_the_unwrapped_encoder(tmp_path, layout: str) -> None:
    import timm

    cfg = MFNetConfig(**DINO, img_size=S)
    torch.manual_seed(5)  # a full trunk (all blocks, a classifier head), as a published file holds it
    full = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, num_classes=10, img_size=56, **cfg.timm_kwargs
    )
    state = dict(full.state_dict())
    if layout == "dinov2":  # the official layout: a mask token, no head
        state = {k: v for k, v in state.items() if not k.startswith("head.")} | {"mask_token": torch.zeros(1, 32)}
    torch.save(state, tmp_path / "vit.pth")
    torch.manual_seed(0)
    model = build_mfnet(**DINO, img_size=S, method="lora", checkpoint=str(tmp_path / "vit.pth")).eval()
    assert model.load_report.missing == [] and model.load_report.unexpected == []
    assert model.load_report.dropped == (["head.bias", "head.weight"] if layout == "timm" else [])
    full.eval()
    x = inputs(seed=8)["optical"]
    with torch.no_grad():
        want = full.forward_intermediates(
            torch.nn.functional.interpolate(x, size=(56, 56), mode="bilinear", antialias=True),
            indices=[0, 1, 2, 3],
            norm=True,
            intermediates_only=True,
        )
        got = model.encoder({"optical": x, "dsm": x[:, :1]})["optical"]
    assert all(close(a, b, rel=1e-5) for a, b in zip(got, want))


def test_backbone_names_and_options_are_checked() -> None:
    with pytest.raises(ValueError, match=r"unknown backbone 'vit_x'.*vit_b.*sam2_hiera_tiny.*dinov2_vitl14.*timm ViT"):
        MFNetConfig(backbone="vit_x")
    with pytest.raises(ValueError, match=r"\['impl', 'zero_rel_pos'\] do not apply to model.backbone=sam2_hiera_tiny"):
        MFNetConfig(backbone="sam2_hiera_tiny", impl="segment_anything", zero_rel_pos=True)
    with pytest.raises(ValueError, match=r"\['pyramid_blocks'\] apply to SAM2 / timm ViT backbones, not to SAM's"):
        MFNetConfig(backbone="vit_b", pyramid_blocks=[11])
    with pytest.raises(ValueError, match=r"1 block \(ViTDet\) or 4"):
        MFNetConfig(backbone="dinov2_vits14", pyramid_blocks=[5, 11])
    with pytest.raises(ValueError, match=r"is not a plain timm ViT"):
        build_mfnet(backbone="swin_tiny_patch4_window7_224", img_size=S)
    with pytest.raises(ValueError, match=r"pyramid_blocks \[3, 1, 2, 0\] must be increasing"):
        build_mfnet(**DINO, img_size=S, pyramid_blocks=[3, 1, 2, 0])


def test_vitdet_last_block_and_a_patch16_timm_vit() -> None:
    model = build_mfnet(**DINO, img_size=S, pyramid_blocks=[-1]).eval()
    assert model.encoder.base_model.blocks_taken == [3]
    with torch.no_grad():
        assert model(inputs(b=1)).shape == (1, 6, S, S)
    vit = build_mfnet(backbone="vit_tiny_patch16_224", depth=2, img_size=[64, 96], method="lora").eval()
    assert vit.encoder.base_model.input_size == (64, 96)  # patch 16: no resize
    assert vit.encoder.base_model.blocks_taken == [1]  # fewer than 4 blocks: the last (ViTDet)
    x = {"optical": torch.rand(1, 3, 64, 96), "dsm": torch.rand(1, 1, 64, 96)}
    with torch.no_grad():
        assert vit(x).shape == (1, 6, 64, 96)


def test_sam_only_position_and_norm_options_are_refused_elsewhere() -> None:
    with pytest.raises(
        ValueError, match=r"\['pos_embed_interp', 'dfm_norms'\] do not apply to model.backbone=sam2_hiera_tiny"
    ):
        MFNetConfig(backbone="sam2_hiera_tiny", pos_embed_interp="antialias", dfm_norms="layernorm")
    with pytest.raises(ValueError, match=r"\['pos_embed_interp'\] do not apply to model.backbone=dinov2_vits14"):
        MFNetConfig(backbone="dinov2_vits14", pos_embed_interp="antialias")
    MFNetConfig(backbone="dinov2_vits14", dfm_norms="layernorm")  # its BlockPyramid takes the norm
    MFNetConfig(backbone="sam2_hiera_tiny")
    MFNetConfig(backbone="vit_b", pos_embed_interp="antialias", dfm_norms="layernorm")
