"""Issue 31: Hugging Face vision models wrap by default (no hints), each checked as
``benchmarks/hf_model_status.py`` measures all 22 of ``tests/hf_zoo.py``: identity at init,
the stacked batch equal to each modality run alone after random trainables, and an effect of the
trainables. The subset: those that needed something (MobileViT V2's 1x1-convolution attention
placed by what it computes, MaskFormerSwin's int output fields, ViTMAE's random masking, MobileViT's
underflowing init) and common ones (ViT, CLIP, Swin, DINOv2, Segformer); a CNN is refused."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from mmpeft import plan_targets, wrap_multimodal
from mmpeft.errors import MmpeftValueError
from tests.helpers import assert_close, randomise_trainables, rel_diff

transformers = pytest.importorskip("transformers")

from tests.hf_zoo import build, input_size  # noqa: E402  (after the skip: it builds transformers models)

MODS = ("optical", "sar")
FAST = ["vit", "clip_vision", "swin", "dinov2", "segformer", "maskformer_swin", "vit_mae"]
SLOW = ["mobilevitv2", "mobilevit", "hiera", "levit", "beit", "swinv2"]

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: 2 threads on shared cores crawl (5 s vs 0.1 s)


def _wrap(name: str, method: str, **kw: object) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the structural / traced placements say what they chose
        return wrap_multimodal(build(name), MODS, method, **kw)


def _conformance(name: str, method: str) -> None:
    size = input_size(name)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, size, size, generator=g)
    base = build(name)
    with torch.no_grad():
        ref = base(x)
        out = _wrap(name, method)({m: x for m in MODS})
    for m in MODS:  # identity at init
        assert_close(out[m], ref, rel=1e-5, msg=f"{name} {method} {m} at init")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        split = randomise_trainables(wrap_multimodal(build(name), MODS, preset=method))  # no mixing
    xs = {m: x + 0.1 * i for i, m in enumerate(MODS)}
    with torch.no_grad():
        together = split(xs)
        for m in MODS:  # the stacked batch equals each modality alone
            assert_close(together[m], split({m: xs[m]})[m], rel=1e-4, msg=f"{name} {method} {m} stacked vs alone")
        assert rel_diff(together["optical"], base(xs["optical"])) > 1e-4, f"{name} {method}: the trainables act"


@pytest.mark.parametrize("name", FAST)
def test_lora_wraps_by_default(name: str) -> None:
    _conformance(name, "lora")


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_lora_wraps_by_default_slow(name: str) -> None:
    _conformance(name, "lora")


@pytest.mark.parametrize("name", ["vit", "clip_vision", "segformer"])
def test_adapter_wraps_by_default(name: str) -> None:
    _conformance(name, "adapter")


def test_mobilevitv2_convolution_attention_gets_conv_lora() -> None:
    """The 1x1-convolution q / k / v of MobileViT V2's linear attention is found by what it computes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plans = plan_targets(build("mobilevitv2"), MODS, "lora")
    attention = [p.name for p in plans if p.name.endswith("attention.qkv_proj.convolution")]
    assert len(attention) == 9  # every transformer layer's fused qkv (1 + 2 x C outputs), whole


def test_adapter_refused_where_no_module_holds_the_mlp() -> None:
    """YOLOS's layer calls `intermediate` then `output` itself: no 'beside' adapter, said at wrap time."""
    model = build("yolos")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MmpeftValueError, match=r"intermediate\.dense.*no module of their own"):
        _wrap("yolos", "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(MmpeftValueError):
            wrap_multimodal(model, MODS, "adapter")
    assert all(p.requires_grad for p in model.parameters())
    for k, v in model.state_dict().items():
        assert_close(v, before[k], rel=0)


def test_a_cnn_is_refused_naming_why() -> None:
    model = build("convnext")
    with pytest.raises(MmpeftValueError, match="ConvNextModel has no attention"):
        wrap_multimodal(model, MODS, "lora")
    assert all(p.requires_grad for p in model.parameters())
