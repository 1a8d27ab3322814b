"""wrap_multimodal on real backbones: identity at init, frozen weights, gradients, equivalence."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mmpeft import MultimodalModel, count_parameters, set_execution, wrap_multimodal
from mmpeft.interop.reference import per_modality_forward
from tests.helpers import close, rel_diff
from tests.helpers import randomise_trainables as _randomise_trainables
from tests.tiny_models import tiny_custom, tiny_sam, tiny_timm_sam, tiny_timm_vit

CUSTOM_TARGETS = {"lora": ["in_proj", "ffn.0", "ffn.2"], "adapter": r"layers\.\d+\.ffn"}


def _wrap(kind: str, method: str, **kw):  # -> (base copy, wrapped)
    base = {"sam": tiny_sam, "timm_sam": tiny_timm_sam, "timm_vit": tiny_timm_vit, "custom": tiny_custom}[kind]()
    ref = copy.deepcopy(base)
    if kind == "custom":
        kw.setdefault("targets", CUSTOM_TARGETS[method])
    return ref, wrap_multimodal(base, ("optical", "dsm"), method, **kw)


def _inputs(kind: str) -> dict[str, torch.Tensor]:
    size = 32 if kind in ("timm_vit", "custom") else 64
    g = torch.Generator().manual_seed(3)
    return {"optical": torch.rand(2, 3, size, size, generator=g), "dsm": torch.rand(2, 1, size, size, generator=g)}


BACKBONES = ["sam", "timm_sam", "timm_vit", "custom"]


@pytest.mark.parametrize("kind", BACKBONES)
@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_identity_at_init(kind: str, method: str) -> None:
    """LoRA (B = 0) and zero-init adapters start as the frozen model, modality by modality."""
    ref, wrapped = _wrap(kind, method)
    x = _inputs(kind)
    with torch.no_grad():
        out = wrapped(x)
        assert close(out["optical"], ref(x["optical"]), rel=1e-5)
        assert close(out["dsm"], ref(x["dsm"].repeat(1, 3, 1, 1)), rel=1e-5)


def test_authors_adapter_init_is_not_identity() -> None:
    ref, wrapped = _wrap("sam", "adapter", preset="mmadapter_authors")
    x = _inputs("sam")
    with torch.no_grad():
        assert not close(wrapped(x)["optical"], ref(x["optical"]), rel=1e-3)


@pytest.mark.parametrize("kind", BACKBONES)
@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_training_freezes_base_and_reaches_every_trainable(kind: str, method: str) -> None:
    _, wrapped = _wrap(kind, method)
    wrapped.train()
    frozen = {
        k: v.clone() for k, v in wrapped.base_model.state_dict().items() if "lora_" not in k and "adapter_" not in k
    }
    trainable = {n: p for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all(any(s in n for s in ("lora_", "adapter_")) for n in trainable)
    start = {n: p.detach().clone() for n, p in trainable.items()}
    opt = torch.optim.SGD(trainable.values(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x = _inputs(kind)
    for step in range(3):
        opt.zero_grad()
        out = wrapped(x)
        loss = sum((o.float() ** 2).mean() + o.float().mean() for o in out.values())
        loss.backward()
        if step == 2:  # B and lambda gradients are zero only at the very first step (B = 0)
            no_grad = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
            assert not no_grad, f"no gradient reached {no_grad}"
        opt.step()
    after = wrapped.base_model.state_dict()
    changed = [k for k, v in frozen.items() if not torch.equal(v, after[k])]
    assert not changed, f"frozen tensors changed: {changed}"
    assert all(not torch.equal(start[n], p) for n, p in trainable.items())


@pytest.mark.parametrize("method", ["lora", "adapter"])
@pytest.mark.parametrize("mods", [("optical",), ("optical", "dsm"), ("optical", "dsm", "sar")])
def test_stacked_equals_per_modality_reference_on_sam(method: str, mods: tuple[str, ...]) -> None:
    """The (M*B) pass through windowed + global attention equals running modality by modality."""
    enc = tiny_sam(img_size=80, window=3)  # 5x5 grid: windows of 3 pad to 6x6
    wrapped = wrap_multimodal(enc, mods, method)
    _randomise_trainables(wrapped)
    g = torch.Generator().manual_seed(0)
    x = {m: torch.rand(2, 3 if i == 0 else 1, 80, 80, generator=g) for i, m in enumerate(mods)}
    with torch.no_grad():
        stacked = wrapped(x)
        ref = per_modality_forward(wrapped, x)
        set_execution(wrapped, "loop")
        looped = wrapped(x)
        set_execution(wrapped, "batched")
    for m in mods:
        assert stacked[m].shape == (2, 16, 5, 5)
        assert close(stacked[m], ref[m], rel=1e-5), (m, rel_diff(stacked[m], ref[m]))
        assert close(stacked[m], looped[m], rel=1e-5)


def test_mixing_makes_modalities_interact() -> None:
    """With scalar fusion the optical output depends on the DSM input; with none it does not."""
    for fusion, depends in (("scalar", True), ("none", False)):
        _, wrapped = _wrap("sam", "lora", fusion=fusion)
        _randomise_trainables(wrapped)
        x = _inputs("sam")
        with torch.no_grad():
            a = wrapped(x)["optical"]
            b = wrapped({"optical": x["optical"], "dsm": x["dsm"] * 0.2})["optical"]
        assert (not close(a, b, rel=1e-06)) == depends


def test_timm_forward_features_and_sequence_inputs() -> None:
    _, wrapped = _wrap("timm_sam", "adapter")
    x = _inputs("timm_sam")
    with pytest.raises(ValueError, match="swapped order"):  # counts unknown: a first sequence is ambiguous
        wrapped.call("forward_features", [x["optical"], x["dsm"]])
    wrapped.call("forward_features", x)  # a dict fixes each modality's channel count
    feats = wrapped.call("forward_features", [x["optical"], x["dsm"]])
    assert isinstance(feats, list) and feats[0].shape == (2, 16, 4, 4)


def test_paper_presets_on_sam_names() -> None:
    _, wrapped = _wrap("sam", "lora")
    names = [n for n, _ in wrapped.layers()]
    assert "base_model.blocks.0.attn.qkv" in names and "base_model.blocks.1.mlp.lin2" in names
    assert not any(n.endswith("attn.proj") for n in names)
    qkv = wrapped.base_model.blocks[0].attn.qkv
    assert qkv.slices == {"q": (0, 32), "v": (64, 96)} and qkv.scaling == 0.25
    assert wrapped.base_model.blocks[0].mlp.lin1.scaling == 1.0
    assert count_parameters(wrapped)["fusion"].trainable == 2 * 2 * 2  # 2 blocks x 2 linears x 2 lambdas


def test_custom_vit_by_regex_and_conv_stem() -> None:
    base = tiny_custom()
    wrapped = wrap_multimodal(
        base, ("optical", "ms"), "lora", targets=r"layers\.\d+\.(in_proj|ffn\.[02])", stems={"ms": ("conv1x1", 5)}
    )
    out = wrapped({"optical": torch.rand(1, 3, 32, 32), "ms": torch.rand(1, 5, 32, 32)})
    assert out["ms"].shape == (1, 4)
    assert any("stem_conv" in n for n, p in wrapped.named_parameters() if p.requires_grad)


def test_conv_stem_starts_as_repeat() -> None:
    _, wrapped = _wrap("sam", "lora", stems={"dsm": ("conv1x1", 1)})
    _, plain = _wrap("sam", "lora")
    x = _inputs("sam")
    with torch.no_grad():
        assert close(wrapped(x)["dsm"], plain(x)["dsm"], rel=1e-5)


# ------------------------------------------------------------------------ bad input


def test_bad_inputs_give_clear_errors() -> None:
    _, wrapped = _wrap("sam", "lora")
    x = _inputs("sam")
    with pytest.raises(ValueError, match="no modality given"):  # a subset is fine, none is not
        wrapped({})
    with pytest.raises(KeyError, match="unknown modalities \\['sar'\\]"):
        wrapped({**x, "sar": x["dsm"]})
    with pytest.raises(ValueError, match="expected 2 inputs"):
        wrapped([x["optical"]])
    with pytest.raises(ValueError, match="same batch and spatial sizes"):
        wrapped({"optical": x["optical"], "dsm": x["dsm"][:1]})
    with pytest.raises(ValueError, match="same batch and spatial sizes"):
        wrapped({"optical": x["optical"], "dsm": x["dsm"][..., :32]})
    with pytest.raises(ValueError, match="'dsm' has 2 channels"):
        wrapped({"optical": x["optical"], "dsm": x["dsm"].repeat(1, 2, 1, 1)})
    with pytest.raises(TypeError, match="one tensor per modality"):
        wrapped(x["optical"])


def test_bad_wrapping_gives_clear_errors() -> None:
    with pytest.raises(ValueError, match="match no module.*Module name endings"):
        wrap_multimodal(tiny_sam(), method="lora", targets=["attn.query"])
    with pytest.raises(
        ValueError,
        match=r"Sequential has no attention.*nothing for the presets to adapt \(a CNN or a modulation network\)",
    ):
        wrap_multimodal(nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.Flatten(), nn.Linear(8, 4)), method="lora")
    with pytest.raises(TypeError, match="needs Linear"):
        wrap_multimodal(tiny_sam(), method="lora", targets=["mlp"])
    enc = tiny_sam()
    wrapped = wrap_multimodal(enc, method="lora")
    with pytest.raises(ValueError, match="already wrapped"):
        wrap_multimodal(enc, method="adapter")
    with pytest.raises(ValueError, match="already wrapped"):
        wrap_multimodal(wrapped, method="adapter")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unknown option .rnak."):
        wrap_multimodal(tiny_sam(), method="lora", rnak=8)
    with pytest.raises(ValueError, match="unknown fusion"):
        wrap_multimodal(tiny_sam(), method="lora", fusion="gate")
    with pytest.raises(ValueError, match="stack"):
        wrapped.base_model.blocks[0].mlp.lin1(torch.rand(3, 32))  # 3 rows cannot hold 2 modalities


def test_options_reach_layers() -> None:
    _, wrapped = _wrap("sam", "lora", rank=8, alpha=16, fusion="none")
    lin1 = wrapped.base_model.blocks[0].mlp.lin1
    assert lin1.rank == 8 and lin1.scaling == 2.0 and not lin1.lora_fusion.mixes
    _, wrapped = _wrap("timm_sam", "adapter", ratio=0.5, activation="relu", lambda_init=0.9)
    mlp = wrapped.base_model.blocks[0].mlp
    assert mlp.hidden == 16 and isinstance(mlp.adapter_act, nn.ReLU)
    assert float(mlp.adapter_fusion.lam["dsm"].detach()) == pytest.approx(0.9)
    assert isinstance(wrapped, MultimodalModel)


def test_hooks_on_the_base_model_run_inside_the_wrapped_forward() -> None:
    """The wrap called ``base_model.forward`` directly, so forward hooks a user had put on the
    model itself ran 0 times, silently (peft does the same): now it is called as a module, the
    hooks see the stacked batch and their changes reach every modality's output."""
    model = tiny_timm_vit()
    seen: list[int] = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    model.register_forward_hook(lambda m, args, out: out + 1.0)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        wrapped = wrap_multimodal(model, ("optical", "dsm"), "lora", targets=["qkv"])  # its dry run calls the model
        seen.clear()
        out = wrapped({"optical": x, "dsm": x})
    assert seen == [4]  # once, on the stacked batch of 2 modalities x 2 samples
    assert torch.equal(out["optical"], ref) and torch.equal(out["dsm"], ref)  # the +1 of the hook included
