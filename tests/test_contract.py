"""The core's contract with a peft user: nothing lost or ignored without a word.

Each test is a case that failed before the tuner layout (issue: "the core as a tuner library"):
options of the other method, unchecked values, a trained head not saved, a loaded model in
training mode, reentrant checkpointing without gradients; and the new features: merge /
unmerge / merge_and_unload, disable_adapters, modules_to_save, from_pretrained.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from mmpeft import MergeError, MultimodalModel, build_config, load_multimodal, wrap_multimodal
from mmpeft.tuners.fusion import FUSION_RULES, register_fusion
from tests.helpers import assert_close, close
from tests.tiny_models import tiny_sam, tiny_timm_vit

MODS = ("optical", "dsm")


def _inputs(size: int = 32, batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "optical": torch.rand(batch, 3, size, size, generator=g),
        "dsm": torch.rand(batch, 1, size, size, generator=g),
    }


def _randomise(model: nn.Module, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (0.5 if p.numel() == 1 else 0.0))


def _sgd_step(model: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    out = model(inputs)
    sum(o.pow(2).mean() for o in out.values()).backward()
    opt.step()


# ---------------------------------------------------------------------- options and values
@pytest.mark.parametrize(
    ("method", "option", "value"),
    [
        ("lora", "scale", 0.5),
        ("lora", "bias", True),
        ("lora", "ratio", 0.5),
        ("lora", "init", "gaussian"),
        ("lora", "activation", "relu"),
        ("lora", "placement", "after"),
        ("adapter", "rank", 8),
        ("adapter", "alpha", 2.0),
    ],
)
def test_an_option_of_the_other_method_is_an_error_naming_it(method: str, option: str, value: object) -> None:
    with pytest.raises(TypeError, match=rf"{option}.*(not to|unknown).*{method}|unknown option '{option}'"):
        wrap_multimodal(tiny_timm_vit(), MODS, method, **{option: value})


def test_a_preset_of_the_other_method_and_build_config_options_are_refused() -> None:
    with pytest.raises(ValueError, match="preset 'mmlora' builds lora rules but method='adapter'"):
        wrap_multimodal(tiny_timm_vit(), MODS, method="adapter", preset="mmlora")
    with pytest.raises(TypeError, match="'ratio'"):
        build_config(tiny_timm_vit(), MODS, "lora", ratio=0.9, init="default")
    # the preset alone decides the method
    assert build_config(tiny_timm_vit(), MODS, preset="mmadapter").rules[0].kind == "adapter"


def test_slices_only_on_a_fused_qkv() -> None:
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc1 \(32 -> 128\) is not a fused q/k/v projection"):
        wrap_multimodal(tiny_timm_vit(), MODS, "lora", targets=["mlp.fc1"], slices=["q", "v"])
    w = wrap_multimodal(tiny_timm_vit(), MODS, "lora", targets=["attn.qkv"], slices=["q", "v"])
    assert w.base_model.blocks[0].attn.qkv.slices == {"q": (0, 32), "v": (64, 96)}


@pytest.mark.parametrize(
    ("option", "value", "error"),
    [
        ("lambda_init", float("nan"), ValueError),
        ("lambda_init", float("inf"), ValueError),
        ("lambda_init", True, TypeError),
        ("alpha", -4.0, ValueError),
        ("alpha", 0.0, ValueError),
        ("rank", 2.5, TypeError),
        ("rank", True, TypeError),
        ("rank", 0, ValueError),
        ("dropout", 1.0, ValueError),
    ],
)
def test_every_value_is_checked(option: str, value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match=option):
        wrap_multimodal(tiny_timm_vit(), MODS, "lora", targets=["attn.qkv"], **{option: value})


def test_lambda_init_may_be_any_finite_real() -> None:
    w = wrap_multimodal(tiny_timm_vit(), MODS, "lora", targets=["mlp.fc1"], lambda_init=-0.25)
    lam = w.base_model.blocks[0].mlp.fc1.lora_fusion.lam
    assert [float(lam[m].detach()) for m in MODS] == [-0.25, -0.25]


# ---------------------------------------------------------------------- disable
@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_disabled_adapters_compute_the_frozen_model_exactly(method: str) -> None:
    base = tiny_timm_vit()
    frozen = copy.deepcopy(base)
    w = wrap_multimodal(base, MODS, method, modules_to_save=["head"])
    _randomise(w)
    x = _inputs()
    stacked = torch.cat([x["optical"], x["dsm"].repeat(1, 3, 1, 1)])  # the stems' output
    want = frozen(stacked).chunk(2)
    enabled = w(x)
    with torch.no_grad(), w.disable_adapters():
        got = w(x)
    assert all(torch.equal(got[m], want[i]) for i, m in enumerate(MODS))
    assert not close(enabled["optical"], want[0], rel=1e-08)  # the updates act when enabled
    w.set_adapters_enabled(False)
    assert torch.equal(w(x)["dsm"], want[1])
    w.set_adapters_enabled(True)
    assert torch.equal(w(x)["dsm"], enabled["dsm"])


# ---------------------------------------------------------------------- merge
def _unmerged_and_merged(w: MultimodalModel, x: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    with torch.no_grad():
        before = w(x)
        w.merge_adapters()
        after = w(x)
    return before, after


@pytest.mark.parametrize("build", [tiny_timm_vit, tiny_sam])
def test_merged_equals_unmerged_and_unmerge_restores_the_frozen_weights(build) -> None:
    w = wrap_multimodal(build(), MODS, preset="lora")  # no cross-modal mixing: every layer merges
    _randomise(w)
    frozen = {k: v.clone() for k, v in w.base_model.state_dict().items() if "lora_" not in k}
    x = _inputs(64 if build is tiny_sam else 32)
    before, after = _unmerged_and_merged(w, x)
    assert all(layer.merged for _, layer in w.layers())
    w.train()
    with pytest.raises(RuntimeError, match="merged.*no gradient"):
        w(x)  # training through merged weights would leave the LoRA weights unchanged
    w.eval()
    for m in MODS:
        assert_close(after[m], before[m], rel=1e-5)
    with torch.no_grad():  # a subset of the modalities, and one modality alone, also merged
        assert_close(w({"dsm": x["dsm"]})["dsm"], before["dsm"], rel=1e-5)
    assert w.unmerge_adapters() and not any(layer.merged for _, layer in w.layers())
    now = w.base_model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in frozen.items())
    with torch.no_grad():
        assert torch.equal(w(x)["optical"], before["optical"])


@pytest.mark.parametrize("build", [tiny_timm_vit, tiny_sam])
def test_merge_and_unload_gives_the_plain_model_of_one_modality(build) -> None:
    base = build()
    cls = type(base)
    w = wrap_multimodal(base, MODS, preset="lora")
    _randomise(w)
    x = _inputs(64 if build is tiny_sam else 32)
    with torch.no_grad():
        want = w(x)
        for m in MODS:
            plain = w.merge_and_unload(m)
            assert type(plain) is cls
            mm = [n for n, mod in plain.named_modules() if type(mod).__module__.startswith("mmpeft")]
            assert mm == [] and all("forward" not in vars(mod) for mod in plain.modules())
            xm = x[m] if x[m].shape[1] == 3 else x[m].repeat(1, 3, 1, 1)
            assert_close(plain(xm), want[m], rel=1e-5)
    with torch.no_grad():  # the wrapped model is untouched (a copy was unloaded)
        assert torch.equal(w(x)["dsm"], want["dsm"])


@pytest.mark.parametrize(("preset", "reason"), [("mmlora", "mixes modalities"), ("mmadapter", "not linear")])
def test_what_cannot_merge_says_why(preset: str, reason: str) -> None:
    w = wrap_multimodal(tiny_timm_vit(), MODS, preset=preset)
    with pytest.raises(MergeError, match=reason):
        w.merge_adapters()
    with pytest.raises(MergeError, match=reason):
        w.merge_and_unload("optical")
    assert not any(layer.merged for _, layer in w.layers())  # all or nothing


# ---------------------------------------------------------------------- saving and loading
def test_modules_to_save_train_are_saved_and_restored(tmp_path: Path) -> None:
    w = wrap_multimodal(tiny_timm_vit(), MODS, preset="mmlora", modules_to_save=["head"])
    trainable, total = w.get_nb_trainable_parameters()
    head = sum(p.numel() for p in w.base_model.head.trained_module.parameters())
    assert trainable == sum(p.numel() for p in w.trainable_tensors() if p.requires_grad) and head == 32 * 5 + 5
    x = _inputs()
    _sgd_step(w, x)
    assert not torch.equal(w.base_model.head.trained_module.weight, w.base_model.head.original_module.weight)
    w.eval()
    with torch.no_grad():
        want = w(x)
    w.save_pretrained(tmp_path)
    loaded = load_multimodal(tiny_timm_vit(), tmp_path)
    with torch.no_grad():
        got = loaded(x)
    assert all(torch.equal(got[m], want[m]) for m in MODS)


def test_a_trainable_tensor_that_would_not_be_saved_is_named(tmp_path: Path) -> None:
    w = wrap_multimodal(tiny_timm_vit(), MODS, preset="mmlora")
    w.base_model.head.requires_grad_(True)  # unfrozen by hand, not through modules_to_save
    with pytest.raises(ValueError, match=r"base_model\.head\.weight.*modules_to_save"):
        w.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half written


def test_loading_is_for_inference_unless_asked(tmp_path: Path) -> None:
    import timm

    def build() -> nn.Module:
        torch.manual_seed(0)
        return timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            img_size=32,
            depth=2,
            embed_dim=32,
            num_heads=2,
            num_classes=5,
            drop_rate=0.5,
            proj_drop_rate=0.5,
        )  # (train mode, dropout on)

    w = wrap_multimodal(build(), MODS, preset="mmlora")
    _randomise(w)
    w.save_pretrained(tmp_path)
    loaded = MultimodalModel.from_pretrained(build(), tmp_path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x)["optical"], loaded(x)["optical"])  # dropout off
    trainable = load_multimodal(build(), tmp_path, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        n for n, _ in trainable.named_parameters() if n in trainable.trainable_names()
    }


def test_the_saved_config_records_base_dtype_and_names_a_missing_fusion_rule(tmp_path: Path) -> None:
    w = wrap_multimodal(tiny_timm_vit(), MODS, "lora", targets=["mlp.fc1"], base_dtype="bf16")
    w.save_pretrained(tmp_path / "bf16")
    assert load_multimodal(tiny_timm_vit(), tmp_path / "bf16").compute_dtype == torch.bfloat16

    register_fusion("halves", FUSION_RULES["scalar"])
    try:
        wrap_multimodal(tiny_timm_vit(), MODS, "lora", targets=["mlp.fc1"], fusion="halves").save_pretrained(
            tmp_path / "custom"
        )
    finally:
        del FUSION_RULES["halves"]  # as in a new process that did not register it
    with pytest.raises(ValueError, match="unknown fusion rule 'halves'.*register_fusion"):
        load_multimodal(tiny_timm_vit(), tmp_path / "custom")


# ---------------------------------------------------------------------- host checkpointing
def test_reentrant_checkpointing_of_the_host_still_trains_every_lora_tensor() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=16, intermediate_size=32
    )
    torch.manual_seed(0)
    model = transformers.ViTModel(cfg)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    w = wrap_multimodal(model, MODS, preset="lora", modules_to_save=["pooler"])
    w.train()
    _randomise(w)
    out = w(_inputs())
    sum(o["pooler_output"].pow(2).mean() + o["last_hidden_state"].pow(2).mean() for o in out.values()).backward()
    lora = {n: p for n, p in w.named_parameters() if "lora_" in n}
    assert len(lora) == 32 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())


def test_loading_weights_into_a_merged_model_merges_them_again() -> None:
    w = wrap_multimodal(tiny_timm_vit(), MODS, preset="lora")
    other = wrap_multimodal(tiny_timm_vit(), MODS, preset="lora")
    _randomise(other, seed=9)
    x = _inputs()
    w.merge_adapters()
    w.load_trainable_state_dict(other.trainable_state_dict())
    assert all(layer.merged for _, layer in w.layers())
    with torch.no_grad():
        for m in MODS:
            assert_close(w(x)[m], other(x)[m], rel=1e-5)


def test_status_says_what_state_the_model_is_in() -> None:
    w = wrap_multimodal(tiny_sam(), MODS, preset="lora", modules_to_save=["neck"])
    s = w.status()
    assert s["call_check_pending"] and s["adapters_enabled"] and s["merged"] == [] and s["execution"] == ["batched"]
    assert s["efficient_attention"] == ["blocks.0", "blocks.1"] and s["checkpointing"] == []
    assert s["modules_to_save"] == ["base_model.neck"] and s["nonfinite"] == "error"
    with torch.no_grad():
        w(_inputs(64))
    w.merge_adapters()
    w.set_grad_checkpointing(True)
    w.set_nonfinite("absent")
    with w.disable_adapters():
        s = w.status()
    assert not s["call_check_pending"] and not s["adapters_enabled"] and s["nonfinite"] == "absent"
    assert len(s["merged"]) == 6 and s["checkpointing"] == ["blocks.0", "blocks.1"]
    assert w.status()["adapters_enabled"]


def test_modules_to_save_under_a_bf16_base_and_options_a_frozen_preset_would_drop() -> None:
    w = wrap_multimodal(tiny_timm_vit(), MODS, preset="mmlora", modules_to_save=["head"], base_dtype="bf16")
    assert w.base_model.head.trained_module.weight.dtype == torch.float32  # the master copy
    out = w(_inputs())  # no autocast: the trained head computes in bf16
    assert out["optical"].dtype == torch.bfloat16
    out["optical"].float().pow(2).mean().backward()
    assert w.base_model.head.trained_module.weight.grad.dtype == torch.float32
    with pytest.raises(TypeError, match="enabled must be a bool"):
        w.set_adapters_enabled(0)  # type: ignore[arg-type]
    assert w.base_model.head.adapters_enabled and w.adapters_enabled  # nothing half switched
    with pytest.raises(TypeError, match="preset 'frozen' adapts no module.*rank"):
        wrap_multimodal(tiny_timm_vit(), MODS, preset="frozen", rank=8)


@pytest.mark.parametrize("preset", ["mmlora", "lora"])
def test_a_bf16_base_runs_the_loop_and_single_paths(preset: str) -> None:
    w = wrap_multimodal(tiny_timm_vit(), MODS, preset=preset, base_dtype="bf16")
    _randomise(w)
    x = _inputs()
    with torch.no_grad():
        batched = w(x)
        w.set_execution("loop")
        loop = w(x)
    for m in MODS:
        assert loop[m].dtype == torch.bfloat16
        assert_close(loop[m].float(), batched[m].float(), rel=0.03)
    if preset == "lora":  # no mixing: one modality alone through the single path
        w.set_execution("batched")
        with torch.no_grad(), w.only_modality("dsm"):
            alone = w.base_model(x["dsm"].repeat(1, 3, 1, 1).bfloat16())
        assert_close(alone.float(), batched["dsm"].float(), rel=0.03)


def test_a_host_reading_a_setting_of_a_wrapped_module_gets_the_base_layers() -> None:
    """timm Hiera's block reads ``attn.q_stride`` of the attention an "after" adapter wraps."""
    timm = pytest.importorskip("timm")
    model = timm.create_model(
        "hiera_tiny_224",
        pretrained=False,
        num_classes=0,
        img_size=(64, 64),
        embed_dim=16,
        num_heads=1,
        stages=(1, 1, 1, 1),
    )
    w = wrap_multimodal(model, MODS, "adapter", targets=["attn"], placement="after", probe=(64, 64))
    attn = w.base_model.blocks[0].attn
    assert attn.q_stride == attn.base_layer.q_stride
    with pytest.raises(AttributeError):
        attn.qkv_weight_that_does_not_exist  # noqa: B018
    x = _inputs(64)
    with torch.no_grad():
        assert w(x)["optical"].shape == (2, 128)
