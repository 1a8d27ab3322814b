"""Issue 31: input channels read from the model where its first convolution does not see the input
(CSATv2's DCT stem), and outputs whose fields are not tensors (transformers' MaskFormerSwinModel
returns its spatial sizes as ints) passed through to every modality, or named."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from mmpeft import wrap_multimodal
from mmpeft.errors import MmpeftTypeError
from mmpeft.runtime.batch import split_output
from mmpeft.targeting.inputs import declared_channels, infer_in_channels
from tests.helpers import assert_close

MODS = ("optical", "sar")


def test_csatv2_channels_are_the_declared_three_not_the_dct_convolution_s_64() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("csatv2", pretrained=False, num_classes=0)
    assert model.stem_dct.conv_y.in_channels == 64  # the first convolution sees 64 DCT frequencies
    assert declared_channels(model) == 3 and infer_in_channels(model) == 3


@pytest.mark.slow
def test_csatv2_wraps_by_default() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("csatv2", pretrained=False, num_classes=0).eval()
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        ref = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = wrap_multimodal(model, MODS)
    with torch.no_grad():
        out = wrapped({m: x for m in MODS})
    assert wrapped.in_channels == 3
    assert_close(out["sar"], ref, rel=1e-5)


def test_maskformer_swin_outputs_keep_their_plain_fields() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MaskFormerSwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4
    )
    torch.manual_seed(0)
    model = transformers.MaskFormerSwinModel(cfg).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    wrapped = wrap_multimodal(model, MODS)
    with torch.no_grad():
        out = wrapped({m: x for m in MODS})
    for m in MODS:
        assert type(out[m]) is type(ref)
        assert out[m].hidden_states_spatial_dimensions == ref.hidden_states_spatial_dimensions
        assert_close(out[m].last_hidden_state, ref.last_hidden_state, rel=1e-5)  # identity at init


def test_an_output_of_unknown_type_is_refused_naming_its_field() -> None:
    stacked = {"features": torch.rand(4, 3), "meta": nn.Identity(), "size": 7}
    with pytest.raises(MmpeftTypeError, match=r"output field 'meta': cannot split an output of type Identity"):
        split_output(stacked, MODS)
    parts = split_output({"features": stacked["features"], "size": 7, "none": None}, MODS)
    assert parts["sar"]["size"] == 7 and parts["sar"]["none"] is None
    assert_close(parts["sar"]["features"], stacked["features"][2:], rel=0)
