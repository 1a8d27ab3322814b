"""SAM encoders (timm / segment-anything) and official-checkpoint loading, on tiny random models."""

from __future__ import annotations

import dataclasses
import logging
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.image_encoder import get_rel_pos

from mmpeft.backbones import (
    SAM_SPECS,
    SamCheckpointError,
    SamSpec,
    TimmSamEncoder,
    build_sam_encoder,
    load_sam_checkpoint,
    sam_encoder_grid,
    sam_encoder_impl,
)
from tests.helpers import assert_close, close
from tests.tiny_models import SAM_DROPPED as DROPPED
from tests.tiny_models import SAM_NATIVE as NATIVE
from tests.tiny_models import SAM_TINY as TINY
from tests.tiny_models import official_sam_state as official_state
from tests.tiny_models import reference_sam_encoder as reference_encoder

IMPLS = ("timm", "segment_anything")


def stripped(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("image_encoder.") :]: v for k, v in state.items() if k.startswith("image_encoder.")}


def loaded_reference(state: dict[str, torch.Tensor]) -> ImageEncoderViT:
    ref = reference_encoder(TINY, NATIVE)
    ref.load_state_dict(stripped(state), strict=True)
    return ref.eval()


def authors_forward(ref: ImageEncoderViT, x: torch.Tensor) -> torch.Tensor:
    """The MFNet authors' run-time resizing: bicubic pos embed per call, get_rel_pos in attention."""
    tokens = ref.patch_embed(x)  # (B, h, w, C)
    pos = F.interpolate(
        ref.pos_embed.permute(0, 3, 1, 2), size=tokens.shape[1:3], mode="bicubic", align_corners=False
    ).permute(0, 2, 3, 1)
    tokens = tokens + pos
    for block in ref.blocks:
        tokens = block(tokens)
    return ref.neck(tokens.permute(0, 3, 1, 2))


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return official_state()


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory: pytest.TempPathFactory, state: dict[str, torch.Tensor]):
    path = tmp_path_factory.mktemp("sam") / "sam_vit_tiny_test.pth"
    torch.save(state, path)
    return path


def build_loaded(impl: str, img_size, ckpt, **kwargs):
    torch.manual_seed(123)
    encoder = build_sam_encoder(TINY, impl=impl, img_size=img_size).eval()
    report = load_sam_checkpoint(encoder, ckpt, **kwargs)
    return encoder, report


# ---------------------------------------------------------------- specs and building


def test_spec_table() -> None:
    assert SAM_SPECS["vit_b"] == SamSpec(768, 12, 12, (2, 5, 8, 11))
    assert SAM_SPECS["vit_l"] == SamSpec(1024, 24, 16, (5, 11, 17, 23))
    assert SAM_SPECS["vit_h"] == SamSpec(1280, 32, 16, (7, 15, 23, 31))
    tiny = SAM_SPECS["vit_tiny"]
    assert (tiny.embed_dim, tiny.depth, tiny.num_heads, tiny.global_attn_indexes) == (96, 4, 3, (1, 3))
    assert dataclasses.replace(tiny, out_chans=64).out_chans == 64
    for spec in SAM_SPECS.values():
        assert (spec.window_size, spec.patch_size, spec.mlp_ratio) == (14, 16, 4.0)
    with pytest.raises(ValueError, match="divisible"):
        SamSpec(embed_dim=65, depth=2, num_heads=2, global_attn_indexes=())
    with pytest.raises(ValueError, match="out of range"):
        SamSpec(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(2,))


def test_build_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="250"):
        build_sam_encoder(TINY, img_size=250)
    with pytest.raises(ValueError, match=r"\(256, 200\)"):
        build_sam_encoder(TINY, impl="segment_anything", img_size=(256, 200))
    with pytest.raises(ValueError, match="impl"):
        build_sam_encoder(TINY, impl="detectron2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="vit_b"):
        build_sam_encoder("vit_x")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("img_size", [128, (128, 192)])
def test_build_shapes_and_names(impl: str, img_size) -> None:
    encoder = build_sam_encoder(TINY, impl=impl, img_size=img_size)
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    assert sam_encoder_impl(encoder) == impl
    assert sam_encoder_grid(encoder) == (h // 16, w // 16)
    assert encoder(torch.randn(2, 3, h, w)).shape == (2, TINY.out_chans, h // 16, w // 16)
    names = dict(encoder.named_modules())
    params = dict(encoder.named_parameters())
    lin = ("fc1", "fc2") if impl == "timm" else ("lin1", "lin2")
    for i, block in enumerate(encoder.blocks):
        for sub in ("norm1", "attn.qkv", "attn.proj", "norm2", f"mlp.{lin[0]}", f"mlp.{lin[1]}"):
            assert f"blocks.{i}.{sub}" in names
        is_global = i in TINY.global_attn_indexes
        assert block.window_size == (0 if is_global else TINY.window_size)
        rows = (2 * h // 16 - 1, 2 * w // 16 - 1) if is_global else (2 * TINY.window_size - 1,) * 2
        assert params[f"blocks.{i}.attn.rel_pos_h"].shape == (rows[0], TINY.head_dim)
        assert params[f"blocks.{i}.attn.rel_pos_w"].shape == (rows[1], TINY.head_dim)
        assert block.norm1.eps == 1e-6 and isinstance(block.mlp.act, nn.GELU)
    assert {"patch_embed.proj", "neck.0", "neck.1", "neck.2", "neck.3"} <= set(names)
    assert params["pos_embed"].shape == (1, h // 16, w // 16, TINY.embed_dim)


def test_timm_and_segment_anything_keys_match() -> None:
    timm_keys = build_sam_encoder(TINY, impl="timm").state_dict().keys()
    sa_keys = build_sam_encoder(TINY, impl="segment_anything").state_dict().keys()
    assert [k.replace("mlp.fc", "mlp.lin") for k in timm_keys] == list(sa_keys)
    assert list(sa_keys) == list(reference_encoder(TINY, 256).state_dict().keys())


def test_meta_build_vit_h_is_fast_and_counts_match() -> None:
    with torch.device("meta"):
        expected = sum(p.numel() for p in reference_encoder(SAM_SPECS["vit_h"], 256).parameters())
    for impl in IMPLS:
        start = time.perf_counter()
        encoder = build_sam_encoder("vit_h", impl=impl, device="meta")
        assert time.perf_counter() - start < 2.0
        assert all(p.is_meta for p in encoder.parameters())
        assert sum(p.numel() for p in encoder.parameters()) == expected


def test_dtype_and_timm_wrong_input_size() -> None:
    encoder = build_sam_encoder(TINY, img_size=64, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in encoder.parameters())
    assert isinstance(encoder, TimmSamEncoder)
    with pytest.raises(ValueError, match="token grid"):
        encoder(torch.randn(1, 3, 96, 64, dtype=torch.float64))


def test_timm_grad_checkpointing_matches() -> None:
    torch.manual_seed(0)
    encoder = build_sam_encoder(TINY, img_size=64)
    x = torch.randn(2, 3, 64, 64)
    plain = encoder(x)
    encoder.set_grad_checkpointing(True)
    x_ck = x.clone().requires_grad_(True)
    checkpointed = encoder(x_ck)
    checkpointed.sum().backward()
    assert_close(checkpointed, plain, rel=1e-5)
    assert x_ck.grad is not None and encoder.blocks[0].attn.qkv.weight.grad is not None


# ---------------------------------------------------------------- loading, native size


@pytest.mark.parametrize("impl", IMPLS)
def test_native_size_matches_segment_anything(impl: str, state, ckpt_path) -> None:
    encoder, report = build_loaded(impl, NATIVE, ckpt_path)
    ref = loaded_reference(state)
    x = torch.randn(2, 3, NATIVE, NATIVE)
    with torch.no_grad():
        assert_close(encoder(x), ref(x), rel=1e-4)
    assert report.impl == impl and report.source == str(ckpt_path)
    assert report.missing == [] and report.unexpected == [] and report.resized == {}
    assert sorted(report.dropped) == sorted(DROPPED)
    assert len(report.loaded) == len(stripped(state))


@pytest.mark.parametrize("impl", IMPLS)
def test_bare_mapping_safetensors_and_timm_naming(impl: str, state, tmp_path) -> None:
    path = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in stripped(state).items()}, str(path))
    expected, _ = build_loaded(impl, NATIVE, state)
    for source in (stripped(state), path):
        encoder, report = build_loaded(impl, NATIVE, source)
        assert report.dropped == [] and report.missing == [] and report.unexpected == []
        for (k, a), b in zip(encoder.state_dict().items(), expected.state_dict().values()):
            assert torch.equal(a, b), k
    # a state dict saved from the timm encoder loads into either implementation
    timm_state, _ = build_loaded("timm", NATIVE, state)
    encoder, report = build_loaded(impl, NATIVE, timm_state.state_dict())
    assert report.missing == [] and report.unexpected == []
    for a, b in zip(encoder.state_dict().values(), expected.state_dict().values()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- loading, other sizes


def expected_rel(table: torch.Tensor, length: int) -> torch.Tensor:
    resized = F.interpolate(table.reshape(1, table.shape[0], -1).permute(0, 2, 1), size=length, mode="linear")
    return resized.reshape(-1, length).permute(1, 0)


@pytest.mark.parametrize("grid", [(8, 8), (8, 12)])
def test_resized_load(grid, state, ckpt_path, monkeypatch) -> None:
    gh, gw = grid
    hw = (16 * gh, 16 * gw)
    encoders = {impl: build_loaded(impl, hw, ckpt_path) for impl in IMPLS}
    ref = loaded_reference(state)
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        authors = authors_forward(ref, x)
    pos = state["image_encoder.pos_embed"]
    expected_pos = F.interpolate(
        pos.permute(0, 3, 1, 2), size=grid, mode="bicubic", align_corners=False, antialias=False
    ).permute(0, 2, 3, 1)
    for impl, (encoder, report) in encoders.items():
        assert torch.equal(encoder.pos_embed.detach(), expected_pos), impl
        assert report.resized["pos_embed"] == ((1, 16, 16, TINY.embed_dim), (1, gh, gw, TINY.embed_dim))
        for i in range(TINY.depth):
            for axis, g in (("h", gh), ("w", gw)):
                key = f"blocks.{i}.attn.rel_pos_{axis}"
                table = state[f"image_encoder.{key}"]
                got = dict(encoder.named_parameters())[key].detach()
                if i in TINY.global_attn_indexes:
                    assert torch.equal(got, expected_rel(table, 2 * g - 1))
                    # the lookup at run time equals segment-anything's own on-the-fly resize
                    assert torch.equal(get_rel_pos(g, g, got), get_rel_pos(g, g, table))
                    assert report.resized[key] == ((31, TINY.head_dim), (2 * g - 1, TINY.head_dim))
                else:
                    assert torch.equal(got, table) and key not in report.resized

    def no_resize(*args, **kwargs):
        raise AssertionError("F.interpolate called during forward")

    monkeypatch.setattr(F, "interpolate", no_resize)
    with torch.no_grad():
        out = {impl: encoder(x) for impl, (encoder, _) in encoders.items()}
    assert out["timm"].shape == (2, TINY.out_chans, gh, gw)
    assert_close(out["timm"], out["segment_anything"], rel=1e-4)
    assert_close(out["segment_anything"], authors, rel=1e-4)


def test_antialias_pos_embed(state) -> None:
    encoder, report = build_loaded("timm", 128, state, pos_embed_interp="antialias")
    pos = state["image_encoder.pos_embed"].permute(0, 3, 1, 2)
    expected = F.interpolate(pos, size=(8, 8), mode="bicubic", align_corners=False, antialias=True)
    plain = F.interpolate(pos, size=(8, 8), mode="bicubic", align_corners=False)
    assert torch.equal(encoder.pos_embed.detach(), expected.permute(0, 2, 3, 1))
    assert not close(expected, plain, rel=1e-3)
    with pytest.raises(ValueError, match="pos_embed_interp"):
        load_sam_checkpoint(encoder, state, pos_embed_interp="nearest")  # type: ignore[arg-type]


# ---------------------------------------------------------------- errors and options


def test_wrong_model_size_names_keys_and_shapes() -> None:
    bigger = dataclasses.replace(TINY, embed_dim=96, num_heads=3, depth=5, global_attn_indexes=(1, 4))
    encoder = build_sam_encoder(TINY, img_size=NATIVE)
    with pytest.raises(SamCheckpointError) as err:
        load_sam_checkpoint(encoder, official_state(bigger))
    message = str(err.value)
    assert "blocks.0.attn.qkv.weight: checkpoint (288, 96) vs model (192, 64)" in message
    assert "embed_dim 96, depth 5" in message and "embed_dim 64, depth 4" in message
    assert "more" in message and message.count(" vs model ") == 10


def test_not_a_sam_checkpoint(tmp_path) -> None:
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1), "fc.bias": torch.zeros(1)}, path)
    encoder = build_sam_encoder(TINY, img_size=64)
    with pytest.raises(SamCheckpointError, match="not a SAM checkpoint.*conv1.weight"):
        load_sam_checkpoint(encoder, path)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(SamCheckpointError, match="garbage.pth"):
        load_sam_checkpoint(encoder, garbage)
    with pytest.raises(FileNotFoundError):
        load_sam_checkpoint(encoder, tmp_path / "absent.pth")


def test_strict_missing_and_unexpected(state, caplog) -> None:
    broken = dict(state)
    del broken["image_encoder.blocks.1.mlp.lin2.bias"]
    broken["image_encoder.blocks.0.attn.extra"] = torch.zeros(3)
    broken["decoder.weight"] = torch.zeros(3)
    for impl in IMPLS:
        fc2 = "fc2" if impl == "timm" else "lin2"
        encoder = build_sam_encoder(TINY, impl=impl, img_size=NATIVE)
        with pytest.raises(SamCheckpointError) as err:
            load_sam_checkpoint(encoder, broken)
        for name in (f"blocks.1.mlp.{fc2}.bias", "image_encoder.blocks.0.attn.extra", "decoder.weight"):
            assert name in str(err.value)
        before = encoder.blocks[1].mlp.get_submodule(fc2).bias.detach().clone()
        with caplog.at_level(logging.WARNING, logger="mmpeft.backbones.sam_load"):
            report = load_sam_checkpoint(encoder, broken, strict=False)
        assert report.missing == [f"blocks.1.mlp.{fc2}.bias"]
        assert sorted(report.unexpected) == ["decoder.weight", "image_encoder.blocks.0.attn.extra"]
        assert sorted(report.dropped) == sorted(DROPPED)
        assert "blocks.1.mlp" in caplog.text
        assert torch.equal(encoder.blocks[1].mlp.get_submodule(fc2).bias, before)
        assert torch.equal(encoder.blocks[0].attn.qkv.weight, state["image_encoder.blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_rel_pos(impl: str, state) -> None:
    encoder, report = build_loaded(impl, 128, state, zero_rel_pos=True)
    assert len(report.zeroed) == 2 * TINY.depth
    for name, param in encoder.named_parameters():
        if "rel_pos" in name:
            assert name in report.zeroed and not param.any()
    assert encoder.pos_embed.abs().sum() > 0


def test_meta_encoder_is_refused(state) -> None:
    encoder = build_sam_encoder(TINY, img_size=NATIVE, device="meta")
    with pytest.raises(ValueError, match="meta"):
        load_sam_checkpoint(encoder, state)
