"""LoRA on a convolution (``MultimodalLoRAConv2d``): per-modality LoRA on the patch embedding.

The tiny timm ViT's patch embedding is ``patch_embed.proj`` (Conv2d 3 -> 32, kernel = stride = 8).
Each test is one promise of the layer contract (mmpeft.tuners.base) on the convolution: identity at
init, every trainable tensor trained and nothing frozen written, batched = loop, one modality alone,
merge / unmerge / merge_and_unload, peft's own Conv2d LoRA, missing modalities, and the refusals.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from mmpeft import MergeError, MultimodalLoRAConv2d, load_multimodal, save_multimodal, wrap_multimodal
from tests.helpers import assert_close, close
from tests.tiny_models import CustomViT, tiny_sam, tiny_timm_vit

MODS = ("optical", "dsm")
BOTH = ["attn.proj", "patch_embed.proj"]  # a Linear and a Conv2d in one rule


def _inputs(size: int = 32, batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.rand(batch, 3 if m == "optical" else 1, size, size, generator=g) for m in MODS}


def _three(x: torch.Tensor) -> torch.Tensor:
    """The default stems' output: the DSM repeated to 3 channels."""
    return x if x.shape[1] == 3 else x.repeat(1, 3, 1, 1)


def _randomise(model: nn.Module, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (0.5 if p.numel() == 1 else 0.0))


def _wrap(fusion: str = "scalar", targets=BOTH, build=tiny_timm_vit, mods=MODS, **kw):
    w = wrap_multimodal(build(), mods, "lora", targets=targets, fusion=fusion, rank=2, alpha=4.0, **kw)
    _randomise(w)
    return w


def _with_delta(base: nn.Module, layer: MultimodalLoRAConv2d, modality: str) -> nn.Module:
    """A copy of the frozen ``base`` whose patch embedding holds W + delta of ``modality``."""
    plain = copy.deepcopy(base)
    with torch.no_grad():
        plain.patch_embed.proj.weight += layer.get_delta_weight(modality)
    return plain


def test_the_patch_embedding_is_wrapped_and_starts_as_the_identity() -> None:
    base = tiny_timm_vit()
    frozen = copy.deepcopy(base)
    w = wrap_multimodal(base, MODS, "lora", targets=["qkv", "proj"], rank=2)  # "proj" hits patch_embed.proj
    layer = w.base_model.patch_embed.proj
    assert isinstance(layer, MultimodalLoRAConv2d) and isinstance(layer.base_layer, nn.Conv2d)
    assert layer.lora_A["dsm"].weight.shape == (2, 3, 8, 8) and layer.lora_B["dsm"].weight.shape == (32, 2, 1, 1)
    names = {n for n, p in w.named_parameters() if p.requires_grad and "patch_embed" in n}
    want = {
        f"base_model.patch_embed.proj.{k}.{m}" + ("" if k == "lora_fusion.lam" else ".weight")
        for k in ("lora_A", "lora_B", "lora_fusion.lam")
        for m in MODS
    }
    assert names == want
    x = _inputs()
    with torch.no_grad():
        out = w(x)
        for m in MODS:
            assert torch.equal(out[m], frozen(_three(x[m])))


def test_training_reaches_every_trainable_and_never_writes_the_frozen_weights() -> None:
    w = _wrap()
    frozen = {k: v.clone() for k, v in w.base_model.state_dict().items() if "lora_" not in k}
    opt = torch.optim.SGD([p for p in w.parameters() if p.requires_grad], lr=0.5)
    w.train()
    for step in range(3):
        opt.zero_grad()
        sum(o.pow(2).mean() for o in w(_inputs(seed=step)).values()).backward()
        if step == 0:
            missing = [n for n, p in w.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
            assert not missing, missing
            assert not any(p.grad is not None for p in w.parameters() if not p.requires_grad)
        opt.step()
    now = w.base_model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in frozen.items())


@pytest.mark.parametrize("fusion", ["scalar", "none", "matrix"])
@pytest.mark.parametrize("build", [tiny_timm_vit, tiny_sam])
def test_batched_equals_loop(fusion: str, build) -> None:
    w = _wrap(fusion, ["patch_embed.proj"], build)
    x = _inputs(64 if build is tiny_sam else 32)
    with torch.no_grad():
        batched = w(x)
        w.set_execution("loop")
        loop = w(x)
    for m in MODS:
        assert_close(loop[m], batched[m], rel=1e-5)


def test_mixing_makes_the_modalities_interact_at_the_stem() -> None:
    w = _wrap("scalar", ["patch_embed.proj"])
    x = _inputs()
    y = dict(x, dsm=x["dsm"] + 1.0)
    with torch.no_grad():
        assert not close(w(x)["optical"], w(y)["optical"], rel=1e-08)
    w = _wrap("none", ["patch_embed.proj"])
    with torch.no_grad():
        assert torch.equal(w(x)["optical"], w(y)["optical"])


def test_one_modality_alone_is_the_plain_model_with_its_update() -> None:
    w = _wrap("none", BOTH)
    x = _inputs()
    with torch.no_grad():
        want = w(x)
        for m in MODS:
            with w.only_modality(m):
                assert_close(w.base_model(_three(x[m])), want[m], rel=1e-5)
    mixing = _wrap("scalar", ["patch_embed.proj"])
    with pytest.raises(RuntimeError, match="mixes modalities"), torch.no_grad(), mixing.only_modality("dsm"):
        mixing.base_model(_three(x["dsm"]))


def test_merged_equals_unmerged_and_unmerge_restores_the_frozen_weights() -> None:
    w = _wrap("none", BOTH)
    frozen = {k: v.clone() for k, v in w.base_model.state_dict().items() if "lora_" not in k}
    x = _inputs()
    with torch.no_grad():
        before = w(x)
        assert len(w.merge_adapters()) == 3
        after = w(x)
        alone = w({"dsm": x["dsm"]})["dsm"]
        with w.only_modality("optical"):
            single = w.base_model(x["optical"])
    layer = w.base_model.patch_embed.proj
    assert layer.merged and layer.merged_weight.shape == (2, 32, 3, 8, 8)
    for m in MODS:
        assert_close(after[m], before[m], rel=1e-5)
    assert_close(alone, before["dsm"], rel=1e-5)
    assert_close(single, before["optical"], rel=1e-5)
    w.train()
    with pytest.raises(RuntimeError, match="merged.*no gradient"):
        w(x)
    w.eval()
    assert w.unmerge_adapters() and not layer.merged
    now = w.base_model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in frozen.items())
    with torch.no_grad():
        assert torch.equal(w(x)["optical"], before["optical"])


@torch.no_grad()
def test_merge_and_unload_gives_the_plain_model_of_one_modality() -> None:
    w, x = _wrap("none", BOTH), _inputs()
    want = w(x)
    plains = {m: w.merge_and_unload(m) for m in MODS}
    for m, plain in plains.items():
        assert type(plain.patch_embed.proj) is nn.Conv2d
        assert not [n for n, mod in plain.named_modules() if type(mod).__module__.startswith("mmpeft")]
        assert_close(plain(_three(x[m])), want[m], rel=1e-5)
    assert torch.equal(w(x)["dsm"], want["dsm"])  # a copy was unloaded


def test_a_mixing_rule_cannot_merge_and_says_why() -> None:
    w = _wrap("scalar", ["patch_embed.proj"])
    with pytest.raises(MergeError, match="patch_embed.proj.*mixes modalities"):
        w.merge_adapters()
    with pytest.raises(MergeError, match="mixes modalities"):
        w.merge_and_unload("optical")


def test_one_modality_with_no_fusion_equals_peft_conv2d_lora() -> None:
    peft = pytest.importorskip("peft")
    base = tiny_timm_vit()
    config = peft.LoraConfig(target_modules=["patch_embed.proj"], r=2, lora_alpha=4)
    ref = peft.get_peft_model(copy.deepcopy(base), config)
    w = _wrap("none", ["patch_embed.proj"], lambda: base, mods=("optical",))
    ours, theirs = w.base_model.patch_embed.proj, ref.base_model.model.patch_embed.proj
    assert ours.scaling == theirs.scaling["default"] == 2.0
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_A["optical"].weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_B["optical"].weight)
        x = _inputs()["optical"]
        assert_close(w({"optical": x})["optical"], ref(x), rel=1e-5)
        assert_close(ours.get_delta_weight("optical"), theirs.get_delta_weight("default"), rel=1e-5)


def test_missing_modalities_and_a_presence_mask() -> None:
    w = _wrap("scalar", ["patch_embed.proj"])
    frozen = copy.deepcopy(w.base_model.patch_embed.proj.base_layer)
    layer = w.base_model.patch_embed.proj
    base = tiny_timm_vit()  # the same seeded weights as the wrapped model's frozen ones
    assert torch.equal(base.patch_embed.proj.weight, frozen.weight)
    x = _inputs()
    alone = {m: _with_delta(base, layer, m) for m in MODS}  # alone, a modality gets its own update
    with torch.no_grad():
        got = w({"dsm": x["dsm"]})["dsm"]
        assert_close(got, alone["dsm"](_three(x["dsm"])), rel=1e-5)
        full = w(x)
        for execution in ("batched", "loop"):
            w.set_execution(execution)
            out = w(x, presence={"dsm": torch.tensor([True, False])})
            assert_close(out["optical"][0], full["optical"][0], rel=1e-5)
            want = alone["optical"](x["optical"][1:])[0]
            assert_close(out["optical"][1], want, rel=1e-5)


def test_saved_and_loaded(tmp_path: Path) -> None:
    w = _wrap("scalar", BOTH)
    x = _inputs()
    save_multimodal(w, tmp_path)
    loaded = load_multimodal(tiny_timm_vit(), tmp_path)
    with torch.no_grad():
        assert all(torch.equal(loaded(x)[m], w.eval()(x)[m]) for m in MODS)


def test_refusals_name_the_module_and_the_reason() -> None:
    with pytest.raises(ValueError, match=r"patch_embed\.proj is a Conv2d.*slices"):
        wrap_multimodal(tiny_timm_vit(), MODS, "lora", targets=["qkv", "patch_embed.proj"], slices=["q", "v"])
    grouped = CustomViT()
    grouped.embed = nn.Conv2d(3, 24, 8, 8, groups=3)
    with pytest.raises(ValueError, match=r"embed: .*groups=1.*groups=3"):
        wrap_multimodal(grouped, MODS, "lora", targets=["embed"])
    with pytest.raises(TypeError, match=r"adapter on patch_embed\.proj \(Conv2d\): it is a convolution.*method='lora'"):
        wrap_multimodal(tiny_timm_vit(), MODS, "adapter", targets=["patch_embed.proj"])
    with pytest.raises(TypeError, match=r"adapter on patch_embed \(PatchEmbed\).*convolution"):
        wrap_multimodal(tiny_timm_vit(), MODS, "adapter", targets=["patch_embed"])
    with pytest.raises(TypeError, match="wraps nn.Conv2d"):
        MultimodalLoRAConv2d(nn.Conv1d(3, 4, 3), MODS)  # type: ignore[arg-type]
    layer = MultimodalLoRAConv2d(nn.Conv2d(3, 4, 3), MODS)
    with pytest.raises(ValueError, match="stack"):
        layer(torch.rand(3, 3, 8, 8))  # 3 images cannot hold 2 modalities
    with pytest.raises(KeyError, match="unknown modality"):
        layer.get_delta_weight("sar")


def test_padding_dilation_and_padding_mode_follow_the_base_layer() -> None:
    for mode in ("zeros", "reflect", "circular"):
        conv = nn.Conv2d(3, 6, 3, stride=2, padding=2, dilation=2, padding_mode=mode)
        layer = MultimodalLoRAConv2d(conv, MODS, rank=2, fusion="none")
        _randomise(layer)
        conv.requires_grad_(False)
        x = torch.rand(4, 3, 11, 9)
        with torch.no_grad():
            batched = layer(x)
            layer.execution = "loop"
            loop = layer(x)
            layer.merge()
            merged = layer(x)
        assert_close(loop, batched, rel=1e-5)
        assert_close(merged, batched, rel=1e-5)


@pytest.mark.parametrize(
    ("option", "value"), [("lora_bias", True)]
)  # use_rslora, use_dora: tests/test_merge_variants.py
def test_lora_variants_are_refused_on_a_convolution(option: str, value: object) -> None:
    import dataclasses

    from mmpeft import LoRAConfig

    if option not in {f.name for f in dataclasses.fields(LoRAConfig)}:
        pytest.skip(f"LoRAConfig has no {option}")
    with pytest.raises(ValueError, match=rf"patch_embed\.proj is a Conv2d: {option}=True .*nn.Linear layers only"):
        wrap_multimodal(tiny_timm_vit(), MODS, "lora", targets=BOTH, alpha=2.0, fusion="none", **{option: value})


def test_a_bfloat16_base_runs_every_path_with_float32_lora_weights() -> None:
    ref = _wrap("none", ["patch_embed.proj"])
    w = _wrap("none", ["patch_embed.proj"], base_dtype="bfloat16")
    layer = w.base_model.patch_embed.proj
    assert layer.base_layer.weight.dtype == torch.bfloat16 and layer.lora_A["dsm"].weight.dtype == torch.float32
    x = _inputs()
    with torch.no_grad():
        want = ref(x)
    w.train()
    for execution in ("batched", "loop"):
        w.set_execution(execution)
        w.zero_grad()
        out = w(x)
        sum(o.float().pow(2).mean() for o in out.values()).backward()
        assert layer.lora_A["dsm"].weight.grad.dtype == torch.float32 and layer.lora_B["dsm"].weight.grad.any()
        for m in MODS:
            assert_close(out[m].float(), want[m], rel=0.05)
    w.eval()
    with torch.no_grad():
        with w.only_modality("dsm"):
            alone = w.base_model(_three(x["dsm"]).bfloat16()).float()
        assert_close(alone, want["dsm"], rel=0.05)
        w.merge_adapters()
        assert_close(w(x)["optical"].float(), want["optical"], rel=0.05)


def test_the_reference_execution_runs_a_mixing_lora_on_the_patch_embedding() -> None:
    """per_modality_forward (the authors' execution) with a scalar-mixing conv LoRA on SAM's patch
    embedding and mixing LoRA on the MLP equals the batched forward."""
    from mmpeft import per_modality_forward

    w = _wrap("scalar", targets=["patch_embed.proj", "mlp.lin1"], build=tiny_sam)
    x = _inputs(64)
    with torch.no_grad():
        want = w(x)
        got = per_modality_forward(w, x)
    for m in MODS:
        assert_close(got[m], want[m], rel=1e-5)
