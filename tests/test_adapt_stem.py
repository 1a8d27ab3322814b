"""The "adapt" stem: N bands through the frozen RGB patch embedding adapted as timm adapts
``in_chans`` (``timm.models.adapt_input_conv``), declared at wrap time and checked there."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models import adapt_input_conv
from timm.models.vision_transformer import VisionTransformer

from mmpeft import StemConfig, wrap_multimodal
from mmpeft.config import parse_stem
from mmpeft.runtime.stems import adapted_band_mix
from tests.helpers import assert_close, close
from tests.tiny_models import tiny_timm_vit


def _patch_tokens(wrapped, name: str, x: torch.Tensor) -> torch.Tensor:
    """The frozen patch embedding of ``wrapped`` on modality ``name``'s stem output."""
    return wrapped.base_model.patch_embed(wrapped.stems[name](x))


@pytest.mark.parametrize("bands", [1, 2, 4, 6, 12])
def test_the_stem_equals_a_patch_embedding_adapted_by_timms_helper(bands: int) -> None:
    vit = tiny_timm_vit()
    proj = vit.patch_embed.proj
    w = wrap_multimodal(vit, ["optical", "ms"], "lora", stems={"ms": ("adapt", bands)})
    x = torch.randn(2, bands, 32, 32, generator=torch.Generator().manual_seed(bands))
    adapted = adapt_input_conv(bands, proj.weight.detach())  # what timm loads for in_chans=bands
    expected = F.conv2d(x, adapted, proj.bias, stride=proj.stride).flatten(2).transpose(1, 2)  # (B, N, D)
    with torch.no_grad():
        got = _patch_tokens(w, "ms", x)
    assert_close(got, expected, rel=1e-5)
    repeated = F.conv2d(x.mean(1, keepdim=True).repeat(1, 3, 1, 1), proj.weight, proj.bias, stride=proj.stride)
    if bands > 1:  # not merely the band mean repeated: the test can tell the stems apart
        assert not close(got, repeated.flatten(2).transpose(1, 2), rel=1e-3)


def test_bands_that_copy_rgb_give_timms_in_chans_model_and_the_rgb_output() -> None:
    vit = tiny_timm_vit()
    state = {k: v.clone() for k, v in vit.state_dict().items()}
    state["patch_embed.proj.weight"] = adapt_input_conv(6, state["patch_embed.proj.weight"])
    torch.manual_seed(0)
    timm6 = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5, in_chans=6
    ).eval()
    timm6.load_state_dict(state)
    rgb = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    six = torch.cat([rgb, rgb], 1)  # six bands: RGB twice
    with torch.no_grad():
        plain = vit(rgb)
        w = wrap_multimodal(vit, ["optical", "ms"], preset="frozen", stems={"ms": ("adapt", 6)})
        out = w({"optical": rgb, "ms": six})
        reference = timm6(six)
    assert_close(out["ms"], reference, rel=1e-5)  # timm's own 6-band model
    assert_close(out["ms"], plain, rel=1e-5)  # copies of RGB: the RGB output
    assert_close(out["optical"], plain, rel=1e-5)
    assert not any("band_mix" in k for k in w.state_dict())  # fixed, rebuilt from the config: never saved


def test_the_band_count_is_declared_at_wrap_time_and_checked() -> None:
    with pytest.raises(
        ValueError, match=r"stem of modality 'ms': \('adapt',\) lacks the channel count.*\('adapt', channels\)"
    ):
        parse_stem(("adapt",), "ms")
    with pytest.raises(ValueError, match=r"the 'adapt' stem needs the modality's in_channels"):
        StemConfig("adapt")
    w = wrap_multimodal(tiny_timm_vit(), ["optical", "ms"], "lora", stems={"ms": ("adapt", 12)})
    assert w.stems["ms"].in_channels == 12 and w.stems["ms"].band_mix.shape == (3, 12)
    with pytest.raises(ValueError, match=r"modality 'ms' takes 12 channels \(declared in its StemConfig\), got 4"):
        w({"optical": torch.rand(1, 3, 32, 32), "ms": torch.rand(1, 4, 32, 32)})
    four = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, in_chans=4)
    with pytest.raises(
        ValueError, match=r"modality 'ms': timm's adapt_input_conv cannot adapt a 4-channel patch embedding to 2 bands"
    ):
        wrap_multimodal(four, ["optical", "ms"], "lora", stems={"ms": ("adapt", 2)})
    assert_close(adapted_band_mix("ms", 1, 3), torch.ones(3, 1), rel=1e-5)  # one band: the sum over RGB
