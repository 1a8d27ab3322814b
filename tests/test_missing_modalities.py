"""Missing modalities: subsets of the modalities, per-sample presence masks, the non-finite check.

The rules are written out by hand here (docs/missing_modalities.md): with the modalities ``S``
present, ``scalar`` gives ``lam_m d_m + (1 - lam_m) mean_{k in S, k != m} d_k`` and, alone, ``d_m``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mmpeft import MultimodalLoRA, build_fusion, wrap_multimodal
from mmpeft.runtime.presence import NonFiniteInputError, check_finite, modality_dropout
from mmpeft.tuners.fusion import presence_weights
from tests.helpers import close, rel_diff
from tests.tiny_models import tiny_sam, tiny_timm_vit

MODS3 = ("optical", "dsm", "sar")


def _randomise(model: nn.Module, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lam" in n:
                p.uniform_(0.1, 0.9, generator=g)
            elif p.requires_grad and "stem" not in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _vit_lora(mods=MODS3):
    """A tiny timm ViT with scalar-mixed LoRA on every linear of the blocks."""
    model = wrap_multimodal(
        tiny_timm_vit(), mods, "lora", targets=["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"], fusion="scalar", rank=2
    )
    _randomise(model)
    return model


def _inputs(mods, b: int = 2, size: int = 32, seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.rand(b, 3 if m == "optical" else 1, size, size, generator=g) for m in mods}


def _hand_lora_forward(layer: MultimodalLoRA, present: tuple[str, ...]):
    """The documented rule, by hand: base_m + lam_m d_m + (1 - lam_m) mean of the other present d_k."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        xs = x.chunk(len(present), 0)
        d = [layer.scaling * xm @ layer.lora_A[m].weight.T @ layer.lora_B[m].weight.T for xm, m in zip(xs, present)]
        outs = []
        for i, (xm, m) in enumerate(zip(xs, present)):
            others = [d[j] for j in range(len(present)) if j != i]
            if not others:
                upd = d[i]  # alone: its own update
            else:
                lam = layer.lora_fusion.lam[m]
                upd = lam * d[i] + (1 - lam) * sum(others) / len(others)
            outs.append(layer.base_layer(xm) + upd)
        return torch.cat(outs, 0)

    return forward


def _hand_model(model, present: tuple[str, ...], x: dict[str, torch.Tensor]) -> torch.Tensor:
    ref = copy.deepcopy(model)
    for _, layer in ref.layers():
        assert isinstance(layer, MultimodalLoRA)
        layer.forward = _hand_lora_forward(layer, present)  # type: ignore[method-assign]
    stacked = torch.cat([ref.stems[m](x[m]) for m in present], 0)
    return ref.base_model(stacked)


@pytest.mark.parametrize("present", [("optical",), ("dsm",), ("optical", "dsm"), ("dsm", "sar"), MODS3])
def test_subset_equals_the_documented_rule_by_hand(present) -> None:
    model = _vit_lora()
    x = _inputs(MODS3)
    with torch.no_grad():
        out = model({m: x[m] for m in present})
        ref = _hand_model(model, present, x).chunk(len(present), 0)
    assert list(out) == list(present)
    for m, r in zip(present, ref):
        assert close(out[m], r, rel=1e-5), m


def test_optical_alone_is_not_the_mixed_output() -> None:
    """Guard: with the DSM present, the optical output differs (so the subset test can fail)."""
    model = _vit_lora(("optical", "dsm"))
    x = _inputs(("optical", "dsm"))
    with torch.no_grad():
        alone = model({"optical": x["optical"]})["optical"]
        both = model(x)["optical"]
    assert rel_diff(alone, both) > 1e-4


def test_sequence_inputs_take_none_for_missing() -> None:
    model = _vit_lora(("optical", "dsm"))
    x = _inputs(("optical", "dsm"))
    with torch.no_grad():
        out = model([None, x["dsm"]])
        ref = model({"dsm": x["dsm"]})["dsm"]
    assert len(out) == 1 and torch.equal(out[0], ref)


@pytest.mark.parametrize("rule", ["scalar", "matrix", "none"])
def test_present_weights_by_hand(rule: str) -> None:
    fusion = build_fusion(rule, MODS3, 0.5)
    with torch.no_grad():
        for p in fusion.parameters():
            p.copy_(torch.rand(p.shape) * 0.8 + 0.1)
    w = fusion.mixing_matrix().detach()
    sub = fusion.present_weights([0, 2]).detach()  # optical and sar
    if rule == "none":
        assert torch.equal(sub, torch.eye(2))
    elif rule == "scalar":
        lam = fusion.lambdas().detach()
        assert close(sub, torch.tensor([[lam[0], 1 - lam[0]], [1 - lam[2], lam[2]]]), rel=1e-5)
    else:  # the absent column's weight goes to the present other modality
        assert close(sub, torch.tensor([[w[0, 0], w[0, 1] + w[0, 2]], [w[2, 0] + w[2, 1], w[2, 2]]]), rel=1e-5)
    alone = fusion.present_weights([1]).detach()
    assert close(alone, w[1].sum().reshape(1, 1), rel=1e-5)  # alone: the whole row on its own update
    # per sample: the same weights, absent rows and columns zero
    mask = torch.tensor([[False, True], [True, True]])  # (S=2, B=2): optical missing in sample 0
    per = fusion.present_weights([0, 2], mask).detach()
    assert close(per[1], sub, rel=1e-5)
    assert close(per[0], torch.tensor([[0.0, 0.0], [0.0, w[2].sum()]]), rel=1e-5)


def test_presence_weights_full_is_the_matrix() -> None:
    w = torch.rand(3, 3)
    assert torch.equal(presence_weights(w, torch.ones(3)), w)


def _sam_adapter():
    model = wrap_multimodal(tiny_sam(), ("optical", "dsm"), "adapter")  # mmadapter: mixed, efficient attention
    _randomise(model)
    return model


@pytest.mark.parametrize("build", [_vit_lora, _sam_adapter], ids=["vit_lora", "sam_adapter"])
def test_all_ones_presence_equals_the_plain_path(build) -> None:
    model = build() if build is _sam_adapter else build(("optical", "dsm"))
    size = 64 if build is _sam_adapter else 32
    x = _inputs(("optical", "dsm"), b=3, size=size)
    ones = {m: torch.ones(3, dtype=torch.bool) for m in x}
    with torch.no_grad():
        plain, masked = model(x), model(x, presence=ones)
    for m in x:
        assert close(plain[m], masked[m], rel=1e-5)


@pytest.mark.parametrize("build", [_vit_lora, _sam_adapter], ids=["vit_lora", "sam_adapter"])
@pytest.mark.parametrize("execution", ["batched", "loop"])
def test_per_sample_presence(build, execution: str) -> None:
    """Sample 1 lacks its DSM (NaN there): its optical output is optical alone; the others are untouched."""
    model = build() if build is _sam_adapter else build(("optical", "dsm"))
    model.set_execution(execution)
    size = 64 if build is _sam_adapter else 32
    x = _inputs(("optical", "dsm"), b=3, size=size)
    x["dsm"][1] = float("nan")
    presence = {"dsm": torch.tensor([True, False, True])}
    with torch.no_grad():
        out = model(x, presence=presence)
        full = model({m: v[[0, 2]] for m, v in x.items()})
        alone = model({"optical": x["optical"][1:2]})["optical"]
    assert torch.isfinite(out["optical"]).all() and torch.isfinite(out["dsm"]).all()
    assert close(out["optical"][1:2], alone, rel=1e-5)
    for m in x:
        assert close(out[m][[0, 2]], full[m], rel=1e-5)


def test_gradients_flow_with_subsets_and_masks() -> None:
    model = _vit_lora()
    x = _inputs(MODS3, b=2)
    out = model(x, presence={"dsm": torch.tensor([True, False]), "sar": torch.tensor([False, True])})
    (out["optical"].square().mean() + out["dsm"][0].square().mean()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and "stem" not in n}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_B.sar" in n)  # sar sample 1 mixes into optical
    model.zero_grad()
    out = model({"optical": x["optical"]})["optical"].square().mean().backward()
    a_opt = [p.grad for n, p in model.named_parameters() if "lora_A.optical" in n]
    assert all(g is not None and g.abs().sum() > 0 for g in a_opt)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_A.dsm" in n)


def test_full_presence_never_builds_subset_weights(monkeypatch) -> None:
    """The fast path is unchanged: no presence weights are computed when every modality is given."""
    model = _vit_lora(("optical", "dsm"))
    calls = []
    monkeypatch.setattr(type(model.layers().__next__()[1].lora_fusion), "present_weights", lambda *a: calls.append(1))
    with torch.no_grad():
        model(_inputs(("optical", "dsm")))
    assert calls == []


def test_nonfinite_input_is_an_error_naming_modality_sample_and_pixels() -> None:
    model = _vit_lora(("optical", "dsm"))
    x = _inputs(("optical", "dsm"), b=2)
    x["dsm"][1, 0, :2, :3] = float("nan")
    x["dsm"][1, 0, 5, 5] = float("inf")
    with pytest.raises(NonFiniteInputError, match=r"dsm in sample 1: 7 of 1024 pixels"):
        model(x)
    with pytest.raises(NonFiniteInputError, match=r"dsm in tile 'top_mosaic_09cm_area3': 7 of 1024 pixels"):
        check_finite(x, tiles=["area1", "top_mosaic_09cm_area3"])
    model.nonfinite = "absent"
    with torch.no_grad():
        out = model(x)
        alone = model({"optical": x["optical"][1:2]})["optical"]
    assert close(out["optical"][1:2], alone, rel=1e-5)


def test_modality_dropout_masks() -> None:
    g = torch.Generator().manual_seed(0)
    mask = modality_dropout({"dsm": 0.5}, ("optical", "dsm"), 400, generator=g)
    assert mask["optical"].all() and 0.4 < mask["dsm"].float().mean() < 0.6
    mask = modality_dropout(0.9, ("optical", "dsm"), 400, generator=g)
    assert (mask["optical"] | mask["dsm"]).all()  # every sample keeps a modality
    with pytest.raises(ValueError, match="unknown modalities"):
        modality_dropout({"sar": 0.5}, ("optical", "dsm"), 4)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        modality_dropout(1.0, ("optical", "dsm"), 4)
