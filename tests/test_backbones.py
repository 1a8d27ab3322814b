"""Every backbone family on a tiny random model: detection, presets, identity at init, training,
stacked versus loop execution; the families' special cases (EVA02's qkv, torchvision's attention,
tuple outputs) and the checks that turn silent failures into named errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmpeft import MultimodalLoRA, detect_family, wrap_multimodal
from mmpeft.runtime.norms import MixingNormError
from mmpeft.runtime.verify import WrapError
from mmpeft.targeting.prepare import BypassError
from mmpeft.targeting.probe import ProbeError
from tests.backbone_cases import BACKBONES, MODS, train_and_check
from tests.backbone_cases import backbone_inputs as _inputs
from tests.backbone_cases import build_backbone as _build
from tests.backbone_cases import main_tensor as _tensor
from tests.backbone_cases import randomise_family_trainables as _randomise_trainables
from tests.helpers import close

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("kind", BACKBONES)
def test_family_detected_and_presets_resolve(kind: str) -> None:
    assert detect_family(_build(kind)).name == BACKBONES[kind][2]
    for preset, method in (("mmlora", "lora"), ("mmadapter", "adapter"), ("lora", "lora"), ("adapter", "adapter")):
        wrapped = wrap_multimodal(_build(kind), MODS, method, preset=preset)
        layers = dict(wrapped.layers())
        fam = detect_family(_build(kind))
        per_block = 2 if "adapter" in preset else (1 if fam.qkv else 2) + len(fam.mlp_linears())
        assert len(layers) == 2 * per_block, sorted(layers)  # every test model has two blocks
        assert all(not layer.lora_fusion.mixes for n, layer in layers.items() if preset == "lora")


@pytest.mark.parametrize("kind", BACKBONES)
@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_identity_at_init(kind: str, method: str) -> None:
    base = _build(kind)
    wrapped = wrap_multimodal(copy.deepcopy(base), MODS, method)
    x = _inputs(kind)
    with torch.no_grad():
        out = wrapped(x)
        assert close(_tensor(out["optical"]), _tensor(base(x["optical"])), rel=1e-5)
        assert close(_tensor(out["dsm"]), _tensor(base(x["dsm"].repeat(1, 3, 1, 1))), rel=1e-5)


@pytest.mark.parametrize("kind", BACKBONES)
@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_training_changes_only_trainables_and_loop_matches(kind: str, method: str) -> None:
    wrapped = wrap_multimodal(_build(kind), MODS, method)
    x = _inputs(kind)
    train_and_check(wrapped, x, steps=2)
    wrapped.eval()
    with torch.no_grad():
        batched = wrapped(x)
        wrapped.set_execution("loop")
        looped = wrapped(x)
    for m in MODS:
        assert close(_tensor(batched[m]), _tensor(looped[m]), rel=1e-5)


# ---------------------------------------------------------------------- EVA02


def test_eva02_qkv_update_acts_and_a_bypass_is_named() -> None:
    base = _build("timm_eva02")
    wrapped = wrap_multimodal(copy.deepcopy(base), MODS, "lora", preset="lora")
    qkv = wrapped.base_model.blocks[0].attn.qkv
    assert isinstance(qkv, MultimodalLoRA) and wrapped.base_model.blocks[0].attn.qkv_bias_separate
    x = _inputs("timm_eva02")
    with torch.no_grad():
        qkv.lora_B["optical"]["q"].weight.normal_(0.0, 0.5)  # only the optical q update of block 0
        out = wrapped(x)
    assert not close(out["optical"], base(x["optical"]), rel=1e-4)  # the update reaches the output
    assert close(out["dsm"], base(x["dsm"].repeat(1, 3, 1, 1)), rel=1e-5)
    # timm's fused-bias path reads qkv.weight: the first forward names the bypassed layer
    again = wrap_multimodal(copy.deepcopy(base), MODS, "lora", preset="lora")
    again.base_model.blocks[0].attn.qkv_bias_separate = False
    with pytest.raises(WrapError, match=r"blocks\.0\.attn\.qkv"):
        again(x)


# ---------------------------------------------------------------------- torchvision


def test_torchvision_attention_swap_keeps_function_and_state_dict() -> None:
    from mmpeft.backbones.torchvision_vit import ExplicitMultiheadAttention, make_attention_explicit

    base = _build("torchvision")
    swapped = copy.deepcopy(base)
    assert make_attention_explicit(swapped) == [f"encoder.layers.encoder_layer_{i}.self_attention" for i in range(2)]
    assert list(swapped.state_dict()) == list(base.state_dict())
    swapped.load_state_dict(base.state_dict())
    x = torch.rand(2, 3, 32, 32)
    assert close(swapped(x), base(x), rel=1e-5)
    # the general module against nn.MultiheadAttention: weights, masks, cross-attention, seq-first
    torch.manual_seed(0)
    for batch_first in (True, False):
        mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
        ours = ExplicitMultiheadAttention.from_torch(mha)
        q, kv = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
        if not batch_first:
            q, kv = q.transpose(0, 1), kv.transpose(0, 1)
        pad = torch.tensor([[False] * 7, [False] * 5 + [True] * 2])
        for args, kw in (
            ((q, q, q), {}),
            ((q, kv, kv), {"key_padding_mask": pad}),
            ((q, q, q), {"need_weights": False}),
        ):
            ref, ref_w = mha(*args, **kw)
            got, got_w = ours(*args, **kw)
            assert close(got, ref, rel=1e-5)
            assert (got_w is None) == (ref_w is None) and (got_w is None or close(got_w, ref_w, rel=1e-5))


def test_torchvision_lora_acts_and_plain_multihead_attention_is_refused() -> None:
    base = _build("torchvision")
    wrapped = wrap_multimodal(copy.deepcopy(base), MODS, "lora")
    x = _inputs("torchvision")
    in_proj = wrapped.base_model.encoder.layers[0].self_attention.in_proj
    with torch.no_grad():
        in_proj.lora_B["dsm"]["v"].weight.normal_(0.0, 0.5)
        out = wrapped(x)
    assert close(out["optical"], base(x["optical"]), rel=1e-5)
    assert not close(out["dsm"], base(x["dsm"].repeat(1, 3, 1, 1)), rel=1e-3)

    class Host(nn.Module):  # any other model holding an nn.MultiheadAttention
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, x, x)[0]

    with pytest.raises(BypassError, match=r"attn\.out_proj"):
        wrap_multimodal(Host(), MODS, "lora", targets=["out_proj"])


# ---------------------------------------------------------------------- tuple outputs


@pytest.mark.parametrize(("kind", "target"), [("hf_clip", "self_attn"), ("torchvision", "self_attention")])
def test_adapter_after_a_module_returning_a_tuple(kind: str, target: str) -> None:
    """An 'after' adapter on an attention that returns (output, weights), called by keyword
    (transformers) or positionally (torchvision): the first element is adapted."""
    base = _build(kind)
    wrapped = wrap_multimodal(copy.deepcopy(base), MODS, "adapter", targets=[target], placement="after")
    x = _inputs(kind)
    with torch.no_grad():
        assert close(_tensor(wrapped(x)["optical"]), _tensor(base(x["optical"])), rel=1e-5)
        _randomise_trainables(wrapped)
        batched = wrapped(x)
        wrapped.set_execution("loop")
        looped = wrapped(x)
    assert not close(_tensor(batched["optical"]), _tensor(base(x["optical"])), rel=1e-4)
    assert close(_tensor(batched["dsm"]), _tensor(looped["dsm"]), rel=1e-5)


# ---------------------------------------------------------------------- named errors


class _ReadsWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 4, 1, 1)
        return F.linear(x.flatten(1), self.fc.weight, self.fc.bias)


def test_bypassed_and_unused_layers_are_named() -> None:
    x = {"optical": torch.rand(2, 4, 1, 1), "dsm": torch.rand(2, 4, 1, 1)}
    with pytest.raises(ProbeError, match=r"_ReadsWeight.*probe=False"):  # the dry run needs an image batch
        wrap_multimodal(_ReadsWeight(), MODS, "lora", targets=["fc"], in_channels=4)
    with pytest.raises(WrapError, match=r"base_model\.fc .*'weight'"):
        wrap_multimodal(_ReadsWeight(), MODS, "lora", targets=["fc"], in_channels=4, probe=False)(x)
    unused = wrap_multimodal(_ReadsWeight(), MODS, "adapter", targets=["unused"], in_channels=4, probe=False)
    with pytest.raises(WrapError, match=r"base_model\.unused"):
        unused(x)
    unused.skip_call_check()
    assert unused(x)["optical"].shape == (2, 4)


def test_frozen_batchnorm_never_mixes_modalities_nor_updates() -> None:
    def make() -> nn.Module:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
        with torch.no_grad():
            net[1].running_mean.normal_()
            net[1].running_var.uniform_(0.5, 2.0)
        return net.eval()

    base = make()
    wrapped = wrap_multimodal(make(), MODS, "lora", targets=["3"], probe=(8, 8))
    wrapped.train()
    bn = wrapped.base_model[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone())
    x = torch.rand(2, 3, 8, 8)
    a = wrapped({"optical": x, "dsm": torch.rand(2, 1, 8, 8)})["optical"]
    b = wrapped({"optical": x, "dsm": torch.rand(2, 1, 8, 8) * 10})["optical"]
    assert not bn.training and torch.equal(a, b)
    assert close(a, base(x), rel=1e-5)  # the frozen model in eval mode on optical alone
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    no_stats = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten(), nn.Linear(144, 5)
    )
    with pytest.raises(MixingNormError, match=r"^1 "):
        wrap_multimodal(no_stats, MODS, "lora", targets=["3"])


def test_modalities_must_be_distinct_names() -> None:
    for bad, err in (
        ("optical", TypeError),
        (("optical", "optical"), ValueError),
        (("optical", ""), ValueError),
        ({"optical", "dsm"}, TypeError),
        ((), ValueError),
    ):
        with pytest.raises(err):
            wrap_multimodal(_build("timm_vit"), bad, "lora")
    with pytest.raises(TypeError, match="string"):
        MultimodalLoRA(nn.Linear(4, 4), "optical")  # type: ignore[arg-type]


def test_input_dtypes_cast_or_refused() -> None:
    wrapped = wrap_multimodal(_build("timm_vit"), MODS, "lora")
    x = _inputs("timm_vit")
    with torch.no_grad():
        ref = wrapped(x)
        doubled = wrapped({m: v.double() for m, v in x.items()})
    assert doubled["optical"].dtype == torch.float32 and close(doubled["optical"], ref["optical"], rel=1e-5)
    with pytest.raises(TypeError, match=r"'dsm' has dtype torch.uint8"):
        wrapped({"optical": x["optical"], "dsm": (x["dsm"] * 255).to(torch.uint8)})
