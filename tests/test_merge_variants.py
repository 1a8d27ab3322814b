"""``lora_bias`` merges into per-modality bias copies (peft folds it into the base bias), and DoRA /
rsLoRA on ``nn.Conv2d`` equal peft's own on the same weights (one modality, fusion "none")."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mmpeft import MultimodalLoRAConv2d, wrap_multimodal
from tests.helpers import assert_close
from tests.helpers import perturb_trainables as _randomise
from tests.tiny_models import tiny_timm_vit

MODS = ("optical", "dsm")
TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
CONV = ["patch_embed.proj"]
TOL = 1e-5  # relative to the magnitudes; float32 sums in another order; measured against peft: <= 3e-8 on outputs ~0.2


def _inputs(mods=MODS, batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.rand(batch, 3, 32, 32, generator=g) for m in mods}


def _peft(base: nn.Module, targets: list[str], **options: object) -> nn.Module:
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4.0, target_modules=targets, **options))


def _copy_into_peft(w: nn.Module, twin: nn.Module) -> None:
    """The optical modality's tensors of ``w`` into peft's ``default`` adapter."""
    with torch.no_grad():
        for name, layer in w.layers():
            p = twin.base_model.model.get_submodule(name.removeprefix("base_model."))
            p.lora_A["default"].weight.copy_(layer.lora_A["optical"].weight)
            p.lora_B["default"].weight.copy_(layer.lora_B["optical"].weight)
            if getattr(layer, "lora_bias", False):
                p.lora_B["default"].bias.copy_(layer.lora_B["optical"].bias)
            if getattr(layer, "use_dora", False):
                mag = p.lora_magnitude_vector["default"].weight
                mag.copy_(layer.lora_magnitude_vector["optical"].view(mag.shape))
            assert p.scaling["default"] == pytest.approx(layer.scaling)


# ---------------------------------------------------------------------- lora_bias
def test_lora_bias_merges_as_peft_folds_it_into_the_bias() -> None:
    base = tiny_timm_vit()
    twin = _peft(copy.deepcopy(base), TARGETS, lora_bias=True)
    w = wrap_multimodal(base, ("optical",), "lora", targets=TARGETS, rank=2, alpha=4.0, fusion="none", lora_bias=True)
    _randomise(w)
    _copy_into_peft(w, twin)
    x = _inputs(("optical",))["optical"]
    with torch.no_grad():
        want = twin(x)
        theirs = twin.merge_and_unload()
        ours = w.eval().merge_and_unload("optical")
        for (name, a), b in zip(ours.named_modules(), theirs.modules()):
            if isinstance(a, nn.Linear):
                assert_close(a.weight, b.weight, rel=1e-5, msg=name)
                assert_close(a.bias, b.bias, rel=1e-5, msg=name)
        assert_close(ours(x), want, rel=TOL)


@pytest.mark.parametrize("dora", [False, True])
def test_lora_bias_merged_per_modality_equals_unmerged(dora: bool) -> None:
    w = wrap_multimodal(
        tiny_timm_vit(), MODS, "lora", targets=TARGETS, rank=2, alpha=4.0, fusion="none", lora_bias=True, use_dora=dora
    )
    _randomise(w)
    x = _inputs()
    with torch.no_grad():
        before = w.eval()(x)
        w.merge_adapters()
        layer = w.base_model.blocks[0].mlp.fc1
        assert layer.merged_bias.shape == (2, layer.out_features)
        assert not torch.equal(layer.merged_bias[0], layer.merged_bias[1])  # one bias per modality
        after = w(x)
        for m in MODS:
            assert_close(after[m], before[m], rel=TOL)
            assert_close(w.merge_and_unload(m)(x[m]), before[m], rel=TOL)
        with w.only_modality("dsm"):
            assert_close(w.base_model(x["dsm"]), before["dsm"], rel=TOL)
        w.unmerge_adapters()
        assert layer.merged_bias is None and torch.equal(w(x)["dsm"], before["dsm"])


def test_lora_bias_on_a_linear_without_bias_unloads_into_a_new_bias() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.Flatten(2), nn.Linear(4, 6, bias=False))
    w = wrap_multimodal(net, MODS, "lora", targets=["2"], fusion="none", lora_bias=True, probe=(8, 8))
    _randomise(w)
    x = {m: torch.rand(2, 3, 8, 8) for m in MODS}
    with torch.no_grad():
        want = w(x)
        for m in MODS:
            plain = w.merge_and_unload(m)
            assert plain[2].bias is not None and not plain[2].bias.requires_grad
            assert_close(plain(x[m]), want[m], rel=TOL)


# ---------------------------------------------------------------------- DoRA and rsLoRA on a convolution
@pytest.mark.parametrize("variant", [{"use_dora": True}, {"use_rslora": True}, {"use_dora": True, "use_rslora": True}])
def test_conv_variants_equal_peft(variant: dict) -> None:
    base = tiny_timm_vit()
    twin = _peft(copy.deepcopy(base), CONV, **variant)
    w = wrap_multimodal(base, ("optical",), "lora", targets=CONV, rank=2, alpha=4.0, fusion="none", **variant)
    _randomise(w)
    _copy_into_peft(w, twin)
    assert w.get_nb_trainable_parameters()[0] == twin.get_nb_trainable_parameters()[0]
    x = _inputs(("optical",))["optical"]
    with torch.no_grad():
        assert_close(w({"optical": x})["optical"], twin(x), rel=TOL)
        ours = w.eval().merge_and_unload("optical").patch_embed.proj.weight
        theirs = twin.merge_and_unload().patch_embed.proj.weight
        assert_close(ours, theirs, rel=1e-5)


def test_conv_dora_paths_agree_and_train() -> None:
    w = wrap_multimodal(tiny_timm_vit(), MODS, "lora", targets=CONV, rank=2, alpha=4.0, fusion="none", use_dora=True)
    layer = w.base_model.patch_embed.proj
    assert isinstance(layer, MultimodalLoRAConv2d) and layer.use_dora
    x = _inputs()
    with torch.no_grad():
        at_init = w(x)
        with w.disable_adapters():
            frozen = w(x)
    for m in MODS:
        assert_close(at_init[m], frozen[m], rel=1e-5)  # identity at init
    _randomise(w)
    out = w(x)
    sum(o.pow(2).mean() for o in out.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in layer.named_parameters() if p.requires_grad)
    with torch.no_grad():
        batched = w(x)
        w.set_execution("loop")
        loop = w(x)
        w.set_execution("batched")
        with w.only_modality("dsm"):
            alone = w.base_model(x["dsm"])
        w.eval().merge_adapters()
        merged = w(x)
    for m in MODS:
        assert_close(loop[m], batched[m], rel=TOL)
        assert_close(merged[m], batched[m], rel=TOL)
    assert_close(alone, batched["dsm"], rel=TOL)


def test_conv_dora_with_a_mixing_rule_is_refused() -> None:
    with pytest.raises(ValueError, match="patch_embed.proj: use_dora=True with fusion='scalar'"):
        wrap_multimodal(tiny_timm_vit(), MODS, "lora", targets=CONV, alpha=4.0, use_dora=True)


@pytest.mark.parametrize("targets", [CONV, CONV + TARGETS])
def test_conv_dora_exports_to_peft(targets: list[str], tmp_path) -> None:
    peft = pytest.importorskip("peft")
    from mmpeft.interop.peft_interop import export_peft

    w = wrap_multimodal(tiny_timm_vit(), MODS, "lora", targets=targets, rank=2, alpha=4.0, fusion="none", use_dora=True)
    _randomise(w)
    export_peft(w, "dsm", tmp_path)
    twin = peft.PeftModel.from_pretrained(tiny_timm_vit(), str(tmp_path)).eval()
    x = _inputs()
    with torch.no_grad():
        assert_close(twin(x["dsm"]), w.eval()(x)["dsm"], rel=TOL)
