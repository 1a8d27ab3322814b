"""Geospatial foundation models of TerraTorch's backbone registry, wrapped as first called (issue 31).

Tiny configurations of the registered classes (random weights): Prithvi-EO v2 with a time axis,
DOFA with per-modality wavelengths, Satlas Swin (the registry's ``SwinEncoderWrapper`` around a
one-block-per-stage torchvision Swin V2) and an SSL4EO ViT. ``import terratorch`` sets
``torch.set_float32_matmul_precision("medium")``: a fixture puts "highest" back around each test.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from mmpeft import (
    BandMeaningWarning,
    MatmulPrecisionWarning,
    load_multimodal,
    save_multimodal,
    set_modality_arguments,
    wrap_multimodal,
)
from tests.geo_fm import highest_precision, import_terratorch  # noqa: F401  (a fixture)
from tests.helpers import assert_close, randomise_trainables, rel_diff

terratorch = import_terratorch()  # the matmul precision put back (tests/geo_fm.py)
from terratorch.registry import BACKBONE_REGISTRY  # noqa: E402

HLS6 = ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"]
MODS = ("optical", "sar")


pytestmark = pytest.mark.usefixtures("highest_precision")  # terratorch's import set "medium"


def _first(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else _first(out[0])


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def _wrap_quietly(model: nn.Module) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("error", MatmulPrecisionWarning)  # "highest" here: none may come
        return wrap_multimodal(model, MODS, "lora")


def _identity_and_alone(build: Any, x: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> Any:
    """Wrapped as first called (``"lora"``: the paper's placement, with mixing), each modality's output
    equals ``ref`` at init. Wrapped with the preset without mixing (``preset="lora"``) and random
    trainables, the stacked batch equals each modality run alone, and the update acts. Returns the
    first wrapped model."""
    wrapped = _wrap_quietly(build())
    split = wrap_multimodal(build(), MODS, preset="lora")
    with torch.no_grad():
        out = wrapped(x)
        for m in MODS:
            assert_close(_first(out[m]), _first(ref[m]), rel=1e-5, msg=f"identity at init, {m}")
        randomise_trainables(split)
        together = split(x)
        for m in MODS:
            assert_close(_first(together[m]), _first(split({m: x[m]})[m]), rel=1e-4, msg=f"stacked vs alone, {m}")
        assert rel_diff(_first(together["optical"]), _first(out["optical"])) > 1e-3  # the LoRA acts
    return wrapped


def _prithvi(frames: int) -> nn.Module:
    torch.manual_seed(0)
    return BACKBONE_REGISTRY.build(
        "terratorch_prithvi_eo_v2_tiny_tl",
        pretrained=False,
        bands=HLS6,
        depth=2,
        embed_dim=64,
        num_heads=2,
        img_size=32,
        num_frames=frames,
    ).eval()


@pytest.mark.slow  # over 5 s on the shared CPU
def test_prithvi_with_a_time_axis_wraps_as_first_called() -> None:
    x = {"optical": _rand(2, 6, 2, 32, 32), "sar": _rand(2, 6, 2, 32, 32, seed=1)}  # (B, C, T, H, W)
    with torch.no_grad():
        ref = {m: _prithvi(frames=2)(x[m]) for m in MODS}
    # the dry run feeds (b, 6, 2, 32, 32): no probe=False needed
    wrapped = _identity_and_alone(lambda: _prithvi(frames=2), x, ref)
    assert len(list(wrapped.layers())) == 6  # 2 timm blocks: attn.qkv (q, v thirds), mlp.fc1, mlp.fc2


def test_prithvi_warns_when_sar_is_tiled_into_its_hls_bands() -> None:
    wrapped = _wrap_quietly(_prithvi(frames=1))
    x = {"optical": _rand(1, 6, 32, 32), "sar": _rand(1, 2, 32, 32)}
    with pytest.warns(BandMeaningWarning, match=r"'sar' has 2 band\(s\).*BLUE.*conv1x1"):
        wrapped(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BandMeaningWarning)  # said once
        wrapped(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BandMeaningWarning)  # a learnable stem: nothing to say
        _wrap_quietly(_prithvi(frames=1))  # (wrap alone warns nothing)
        learnable = wrap_multimodal(_prithvi(frames=1), MODS, "lora", stems={"sar": ("conv1x1", 2)})
        learnable(x)


def test_reduced_matmul_precision_is_said_at_wrap_time() -> None:
    torch.set_float32_matmul_precision("medium")  # what import terratorch does (the fixture restores it)
    with pytest.warns(MatmulPrecisionWarning, match='"medium".*"highest"'):
        wrap_multimodal(_prithvi(frames=1), MODS, "lora")


OPTICAL_WAVES = [0.49, 0.56, 0.665, 0.842, 1.61, 2.2]  # micrometres: DOFA's embedding is generated from them
SAR_WAVES = [5.405, 5.405]  # VV, VH (C band)


def _dofa(waves: list[float] = OPTICAL_WAVES) -> nn.Module:
    """The registry's DOFAEncoderWrapper around a 2-block torchgeo DOFA (its wavelengths fixed at build)."""
    from terratorch.models.backbones.dofa_vit import DOFAEncoderWrapper
    from torchgeo.models.dofa import DOFA

    torch.manual_seed(0)
    return DOFAEncoderWrapper(DOFA(img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=2), waves).eval()


@pytest.mark.slow  # over 5 s on the shared CPU
def test_dofa_wraps_with_channels_from_its_wavelengths_and_embeds_each_modality_with_its_own() -> None:
    x = {"optical": _rand(2, 6, 32, 32), "sar": _rand(2, 2, 32, 32, seed=1)}
    with torch.no_grad():  # what the model gives each modality embedded from its own wavelengths
        ref = {"optical": _dofa()(x["optical"]), "sar": _dofa(SAR_WAVES)(x["sar"])}

    def build() -> Any:
        wrapped = _wrap_quietly(_dofa())  # 6 channels from its 6 wavelengths: no in_channels= needed
        set_modality_arguments(wrapped, "dofa_model.patch_embed", {"sar": {"wavelengths": torch.tensor(SAR_WAVES)}})
        return wrapped

    plain = _wrap_quietly(_dofa())
    assert plain.in_channels == 6
    with torch.no_grad(), pytest.warns(BandMeaningWarning, match=r"'sar' has 2 band.*0\.49.*set_modality_arguments"):
        # without the per-modality wavelengths, SAR (tiled to 6) is embedded as optical bands: said
        assert rel_diff(_first(plain(x)["sar"]), _first(ref["sar"])) > 1e-2
    wrapped = build()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", BandMeaningWarning)  # SAR has its own wavelengths: nothing to say
        assert_close(_first(wrapped(x)["sar"]), _first(ref["sar"]), rel=1e-5, msg="SAR embedded as SAR")
    # the same through the no-mixing preset: stacked equal to alone with the wavelengths per modality
    split = wrap_multimodal(_dofa(), MODS, preset="lora")
    handle = set_modality_arguments(split, "dofa_model.patch_embed", {"sar": {"wavelengths": torch.tensor(SAR_WAVES)}})
    randomise_trainables(split)
    with torch.no_grad():
        together = split(x)
        for m in MODS:
            assert_close(_first(together[m]), _first(split({m: x[m]})[m]), rel=1e-4, msg=f"stacked vs alone, {m}")
        handle.remove()  # undone: SAR embedded with the optical wavelengths again
        assert rel_diff(_first(split(x)["sar"]), _first(together["sar"])) > 1e-2


def test_set_modality_arguments_refuses_before_changing_anything() -> None:
    wrapped = _wrap_quietly(_dofa())
    with pytest.raises(KeyError, match="no module 'dofa_model.patch_embedding'"):
        set_modality_arguments(wrapped, "dofa_model.patch_embedding", {"sar": {"wavelengths": SAR_WAVES}})
    with pytest.raises(KeyError, match="takes no argument.*'wave_list'"):
        set_modality_arguments(wrapped, "dofa_model.patch_embed", {"sar": {"wave_list": SAR_WAVES}})
    with pytest.raises(KeyError, match="unknown modality 'dsm'"):
        set_modality_arguments(wrapped, "dofa_model.patch_embed", {"dsm": {"wavelengths": SAR_WAVES}})
    assert not wrapped.base_model.dofa_model.patch_embed._forward_hooks
    mixing = wrap_multimodal(_dofa(), MODS, "lora", stems={"sar": ("conv1x1", 2)})
    with pytest.raises(ValueError, match="'conv1x1' stem, which mixes its bands"):
        set_modality_arguments(mixing, "dofa_model.patch_embed", {"sar": {"wavelengths": SAR_WAVES}})


@pytest.mark.slow  # over 5 s on the shared CPU
def test_the_arguments_go_with_a_deep_copy_and_are_set_again_after_loading(tmp_path: Path) -> None:
    x = {"optical": _rand(1, 6, 32, 32), "sar": _rand(1, 2, 32, 32, seed=1)}
    wrapped = wrap_multimodal(_dofa(), MODS, preset="lora")
    sar = {"sar": {"wavelengths": torch.tensor(SAR_WAVES)}}
    handle = set_modality_arguments(wrapped, "dofa_model.patch_embed", sar)
    randomise_trainables(wrapped)
    with torch.no_grad():
        expected = _first(wrapped(x)["sar"])
        twin = copy.deepcopy(wrapped)
        handle.remove()  # the original back to its optical wavelengths: the copy keeps its own arguments
        assert rel_diff(_first(wrapped(x)["sar"]), expected) > 1e-2
        assert_close(_first(twin(x)["sar"]), expected, rel=0, msg="deep copy, its own SAR wavelengths")
        twin.base_model.dofa_model.patch_embed._forward_hooks.clear()  # and the copy's removal leaves the original
        set_modality_arguments(wrapped, "dofa_model.patch_embed", sar)
        assert_close(_first(wrapped(x)["sar"]), expected, rel=0, msg="set again on the original")
    save_multimodal(wrapped, tmp_path / "dofa")
    loaded = load_multimodal(_dofa(), tmp_path / "dofa")  # the arguments are not saved: said, then set again
    with torch.no_grad(), pytest.warns(BandMeaningWarning, match="'sar' has 2 band"):
        assert rel_diff(_first(loaded(x)["sar"]), expected) > 1e-2
    set_modality_arguments(loaded, "dofa_model.patch_embed", sar)
    with torch.no_grad():
        assert_close(_first(loaded(x)["sar"]), expected, rel=0, msg="loaded, the arguments set again")


def _satlas() -> nn.Module:
    """The registry's SwinEncoderWrapper (Satlas) around a torchvision Swin V2 with one block per stage,
    its first convolution taking 6 bands as the registry's builder makes it."""
    from terratorch.models.backbones.torchgeo_swin_satlas import SwinEncoderWrapper, swin_v2_t_meta
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

    torch.manual_seed(0)
    swin = SwinTransformer(
        patch_size=[4, 4],
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 2, 2, 4],
        window_size=[4, 4],
        block=SwinTransformerBlockV2,
        downsample_layer=PatchMergingV2,
    )
    swin.features[0][0] = nn.Conv2d(6, 16, kernel_size=4, stride=4)
    return SwinEncoderWrapper(swin, dict(swin_v2_t_meta, embed_dim=16, depths=[1, 1, 1, 1])).eval()


@pytest.mark.slow  # over 5 s on the shared CPU
def test_satlas_swin_wraps_as_first_called() -> None:
    x = {"optical": _rand(2, 6, 64, 64), "sar": _rand(2, 2, 64, 64, seed=1)}
    with torch.no_grad():
        ref = {"optical": _satlas()(x["optical"]), "sar": _satlas()(x["sar"].repeat(1, 3, 1, 1))}
    wrapped = _identity_and_alone(_satlas, x, ref)
    assert wrapped.in_channels == 6 and len(list(wrapped.layers())) == 12  # 4 blocks: qkv, MLP's two linears


def _ssl4eo_vit() -> nn.Module:
    torch.manual_seed(0)
    return BACKBONE_REGISTRY.build(
        "terratorch_ssl4eos12_vit_small_patch16_224_sentinel2_all_moco",
        pretrained=False,
        model_bands=HLS6,
        depth=2,
        embed_dim=64,
        num_heads=2,
        img_size=32,
    ).eval()


@pytest.mark.slow  # over 5 s on the shared CPU
def test_ssl4eo_vit_wraps_as_first_called() -> None:
    x = {"optical": _rand(2, 6, 32, 32), "sar": _rand(2, 2, 32, 32, seed=1)}
    with torch.no_grad():
        ref = {"optical": _ssl4eo_vit()(x["optical"]), "sar": _ssl4eo_vit()(x["sar"].repeat(1, 3, 1, 1))}
    wrapped = _identity_and_alone(_ssl4eo_vit, x, ref)
    assert wrapped.in_channels == 6 and len(list(wrapped.layers())) == 6


def _croma(modalities: list[str]) -> nn.Module:
    from torchgeo.models.croma import CROMA

    torch.manual_seed(0)
    return CROMA(modalities=modalities, encoder_dim=64, encoder_depth=2, num_heads=16, patch_size=8, image_size=32)


class _Optical(nn.Module):
    """A user's one-line wrapper: CROMA's optical encoder called by keyword."""

    def __init__(self, croma: nn.Module) -> None:
        super().__init__()
        self.croma = croma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.croma(x_optical=x)["optical_encodings"]


def test_croma_pair_refused_with_its_reason_and_its_optical_encoder_wraps_at_its_own_size() -> None:
    pair = _croma(["sar", "optical"])
    before = {k: v.clone() for k, v in pair.state_dict().items()}
    with pytest.raises(ValueError, match=r"takes one image per modality \(x_sar, x_optical\).*CROMA\(x_optical=x\)"):
        wrap_multimodal(pair, MODS, "lora")
    assert all(torch.equal(v, before[k]) for k, v in pair.state_dict().items())  # left as it was
    assert all(p.requires_grad for p in pair.parameters())
    optical = _Optical(_croma(["optical"])).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # StructuralFamilyWarning: placed by structure, said
        wrapped = wrap_multimodal(
            optical, MODS, "lora"
        )  # dry run at the image_size CROMA declares inside the wrapper (32)
    assert wrapped.in_channels == 12 and len(list(wrapped.layers())) == 6
    x = {"optical": _rand(1, 12, 32, 32), "sar": _rand(1, 2, 32, 32, seed=1)}
    with torch.no_grad():
        assert_close(wrapped(x)["optical"], _Optical(_croma(["optical"])).eval()(x["optical"]), rel=1e-5)
