"""peft's LoRA menu per modality (docs/peft.md): rsLoRA, gaussian / PiSSA / OLoRA initialisation,
lora_bias, DoRA. For each: identity at init, every trainable tensor trains, frozen weights stay
bit-identical, batched = loop = single paths, equal to peft's own implementation with one modality
(fusion "none"), merge where allowed."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from mmpeft import load_multimodal, wrap_multimodal
from mmpeft.tuners.lora import LoRAConfig, MultimodalLoRA
from tests.helpers import assert_close
from tests.helpers import perturb_trainables as _randomise
from tests.tiny_models import tiny_timm_vit

MODS = ("optical", "dsm")
TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
VARIANTS = {
    "rslora": {"use_rslora": True, "alpha": 8.0},
    "gaussian": {"init_lora_weights": "gaussian"},
    "pissa": {"init_lora_weights": "pissa", "alpha": 4.0},
    "olora": {"init_lora_weights": "olora", "alpha": 4.0},
    "lora_bias": {"lora_bias": True},
    "dora": {"use_dora": True, "alpha": 4.0},
}
MIXING = [v for v in VARIANTS if v != "dora"]  # DoRA refuses mixing rules


def _fusion(variant: str) -> str:
    return "none" if variant == "dora" else "scalar"


def _wrap(variant: str, fusion: str | None = None, base: nn.Module | None = None, mods=MODS, **kw):
    opts = {"rank": 2, "fusion": fusion or _fusion(variant), **VARIANTS[variant], **kw}
    targets = kw.pop("targets", None) or TARGETS
    opts.pop("targets", None)
    return wrap_multimodal(base if base is not None else tiny_timm_vit(), mods, "lora", targets=targets, **opts)


def _inputs(batch: int = 2, seed: int = 1, mods=MODS) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.rand(batch, 3 if m == "optical" else 1, 32, 32, generator=g) for m in mods}


def _frozen_outputs(base: nn.Module, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {m: base(v if v.shape[1] == 3 else v.repeat(1, 3, 1, 1)) for m, v in x.items()}


# ---------------------------------------------------------------------- options
def test_the_options_reach_the_layers() -> None:
    w = _wrap("rslora")
    layer = w.base_model.blocks[0].attn.qkv
    assert layer.scaling == pytest.approx(8.0 / math.sqrt(2))
    w = wrap_multimodal(
        tiny_timm_vit(), MODS, "lora", targets=["mlp.fc1"], rank=4, lora_bias=True, use_dora=True, fusion="none"
    )
    names = {n for n, p in w.named_parameters() if p.requires_grad and ".blocks.0." in n}
    assert "base_model.blocks.0.mlp.fc1.lora_B.dsm.bias" in names
    assert "base_model.blocks.0.mlp.fc1.lora_magnitude_vector.dsm" in names


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"use_rslora": True}, ValueError, "use_rslora=True needs an explicit alpha"),
        ({"init_lora_weights": "loftq"}, ValueError, "init_lora_weights must be one of"),
        ({"init_lora_weights": True}, ValueError, "init_lora_weights must be one of"),
        ({"use_dora": 1}, TypeError, "use_dora must be a bool"),
        ({"use_dora": True, "fusion": "scalar"}, ValueError, "DoRA rescales"),
        ({"init_lora_weights": "pissa", "rank": 64}, ValueError, "rank <= min"),
    ],
)
def test_bad_combinations_are_refused_with_the_reason(options: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        wrap_multimodal(tiny_timm_vit(), MODS, "lora", targets=["mlp.fc1"], **options)


def test_dora_on_the_mixing_preset_is_refused_and_the_option_not_given_to_adapters() -> None:
    with pytest.raises(ValueError, match="DoRA rescales"):
        wrap_multimodal(tiny_timm_vit(), MODS, preset="mmlora", use_dora=True)
    with pytest.raises(TypeError, match="use_dora"):
        wrap_multimodal(tiny_timm_vit(), MODS, "adapter", use_dora=True)
    cfg = LoRAConfig(targets=["qkv"], use_rslora=True, alpha=2.0, init_lora_weights="olora", lora_bias=True)
    assert LoRAConfig(**cfg.__dict__) == cfg  # round trip through the fields


# ---------------------------------------------------------------------- identity, gradients, frozen weights
@pytest.mark.parametrize(
    ("variant", "fusion"),
    [(v, f) for v in VARIANTS for f in ("none", "scalar", "matrix") if f == "none" or v in MIXING],
)
def test_identity_at_init_per_modality(variant: str, fusion: str) -> None:
    base = tiny_timm_vit()
    want = _frozen_outputs(copy.deepcopy(base), _inputs())
    w = _wrap(variant, fusion, base=base)
    with torch.no_grad():
        got = w(_inputs())
    for m in MODS:
        assert_close(got[m], want[m], rel=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_trainable_tensor_trains_and_frozen_weights_stay_bit_identical(variant: str) -> None:
    base = tiny_timm_vit()
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    w = _wrap(variant, base=base)
    _randomise(w)
    offsets = {k: v.clone() for k, v in w.state_dict().items() if "lora_offset" in k}
    assert bool(offsets) == (variant in ("pissa", "olora"))
    opt = torch.optim.SGD([p for p in w.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        sum(o.pow(2).mean() for o in w(_inputs()).values()).backward()
        trained = {n: p for n, p in w.named_parameters() if p.requires_grad and "stems" not in n}
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained.values()), [
            n for n, p in trained.items() if p.grad is None or p.grad.abs().sum() == 0
        ]
        opt.step()
    now = {k.replace(".base_layer", ""): v for k, v in w.base_model.state_dict().items()}
    assert all(torch.equal(now[k], v) for k, v in frozen.items())  # pissa / olora never write W
    assert all(torch.equal(w.state_dict()[k], v) for k, v in offsets.items())


# ---------------------------------------------------------------------- paths
def _paths_agree(w, x, presence=None, rel: float = 1e-5) -> None:
    with torch.no_grad():
        batched = w(x, presence=presence)
        w.set_execution("loop")
        loop = w(x, presence=presence)
        w.set_execution("batched")
    for m in batched:
        assert_close(loop[m], batched[m], rel=rel)


@pytest.mark.parametrize("slices", [False, True])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_batched_equals_loop_and_single(variant: str, slices: bool) -> None:
    kw = {"targets": ["attn.qkv"], "slices": ["q", "v"]} if slices else {}
    for fusion in {"none", _fusion(variant)}:
        w = _wrap(variant, fusion, **kw)
        _randomise(w)
        x = _inputs()
        _paths_agree(w, x)
        _paths_agree(w, {"dsm": x["dsm"]})  # a subset of the modalities
        _paths_agree(w, x, presence={"dsm": torch.tensor([True, False])})  # per-sample presence
        if fusion == "none":
            with torch.no_grad():
                want = w(x)
                with w.only_modality("dsm"):
                    single = w.base_model(x["dsm"].repeat(1, 3, 1, 1))
            assert_close(single, want["dsm"], rel=1e-5)


def test_dropout_paths_and_training_mode() -> None:
    for variant in ("pissa", "dora", "lora_bias"):
        w = _wrap(variant, dropout=0.2)
        _randomise(w)
        w.train()
        torch.manual_seed(0)
        out = w(_inputs())
        sum(o.pow(2).mean() for o in out.values()).backward()
        assert all(torch.isfinite(o).all() for o in out.values())


# ---------------------------------------------------------------------- against peft
def _peft_twin(variant: str, base: nn.Module, rank: int, alpha: float):
    peft = pytest.importorskip("peft")
    v = VARIANTS[variant]
    cfg = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=TARGETS,
        use_rslora=v.get("use_rslora", False),
        init_lora_weights={"kaiming": True}.get(v.get("init_lora_weights", "kaiming"), v.get("init_lora_weights")),
        lora_bias=v.get("lora_bias", False),
        use_dora=v.get("use_dora", False),
    )
    return peft.get_peft_model(base, cfg)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_one_modality_with_fusion_none_equals_peft(variant: str) -> None:
    """Same weights copied into peft's model: outputs agree to 1e-5 (measured: <= 1e-7 on outputs of
    size ~0.2, PiSSA / OLoRA included although peft subtracts s B_0 A_0 from W and mmpeft from the update)."""
    rank, alpha = 2, VARIANTS[variant].get("alpha", 4.0)
    base = tiny_timm_vit()
    twin = _peft_twin(variant, copy.deepcopy(base), rank, alpha)
    w = _wrap(variant, "none", base=base, mods=("optical",), alpha=alpha)
    _randomise(w)
    layers = {n: layer for n, layer in w.layers()}
    assert len(layers) == 8
    with torch.no_grad():
        for name, layer in layers.items():
            p = twin.base_model.model.get_submodule(name.removeprefix("base_model."))
            p.lora_A["default"].weight.copy_(layer.lora_A["optical"].weight)
            p.lora_B["default"].weight.copy_(layer.lora_B["optical"].weight)
            if layer.lora_bias:
                p.lora_B["default"].bias.copy_(layer.lora_B["optical"].bias)
            if layer.use_dora:
                p.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude_vector["optical"])
            assert p.scaling["default"] == pytest.approx(layer.scaling)
    x = _inputs(mods=("optical",))
    with torch.no_grad():
        got, want = w(x)["optical"], twin(x["optical"])
    assert_close(got, want, rel=1e-5)
    assert (
        w.get_nb_trainable_parameters()[0] - sum(p.numel() for p in w.stems.parameters())
        == (twin.get_nb_trainable_parameters()[0])
    )


# ---------------------------------------------------------------------- merge, save / load
@pytest.mark.parametrize(
    "variant", list(VARIANTS)
)  # lora_bias: per-modality merged biases (tests/test_merge_variants.py)
def test_merged_equals_unmerged_and_unloads(variant: str) -> None:
    w = _wrap(variant, "none")
    _randomise(w)
    x = _inputs()
    with torch.no_grad():
        before = w(x)
        w.merge_adapters()
        w.eval()
        after = w(x)
        for m in MODS:
            assert_close(after[m], before[m], rel=1e-5)
            plain = w.merge_and_unload(m)
            xm = x[m] if x[m].shape[1] == 3 else x[m].repeat(1, 3, 1, 1)
            assert_close(plain(xm), before[m], rel=1e-5)
        w.unmerge_adapters()
        assert torch.equal(w(x)["dsm"], before["dsm"])


@pytest.mark.parametrize("variant", ["pissa", "dora", "lora_bias"])
def test_saved_variants_load_onto_a_fresh_base_exactly(variant: str, tmp_path: Path) -> None:
    w = _wrap(variant)
    _randomise(w)
    x = _inputs()
    with torch.no_grad():
        want = w(x)
    w.save_pretrained(tmp_path)
    fresh = tiny_timm_vit()
    frozen = _frozen_outputs(copy.deepcopy(fresh), x)
    loaded = load_multimodal(fresh, tmp_path)
    with torch.no_grad():
        got = loaded(x)
        with loaded.disable_adapters():
            off = loaded(x)
    assert all(torch.equal(got[m], want[m]) for m in MODS)
    assert all(torch.equal(off[m], frozen[m]) for m in MODS)  # the frozen model itself, untouched


def test_pissa_offset_is_the_principal_part_and_mixing_starts_at_zero() -> None:
    lin = nn.Linear(12, 8)
    layer = MultimodalLoRA(copy.deepcopy(lin), MODS, rank=3, alpha=6.0, init_lora_weights="pissa", fusion="scalar")
    u, s, vh = torch.linalg.svd(lin.weight.detach())
    principal = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
    off = layer.lora_offset
    assert_close(layer.scaling * off.up("all") @ off.down("all"), principal, rel=1e-5)
    for m in MODS:  # every modality starts at (A_0, B_0); its update s (B A - B_0 A_0) at 0
        assert torch.equal(layer.lora_A[m].weight, off.down("all"))
        assert (
            layer.get_delta_weight(m).abs().max() <= 1e-5 * principal.abs().max()
        )  # B A - B_0 A_0 as one GEMM: rounding only


@pytest.mark.parametrize("execution", ["batched", "loop"])
def test_scalar_mixing_of_bias_and_offset_by_hand(execution: str) -> None:
    """out_m = W x_m + b + lam_m d_m + (1 - lam_m) d_k with d_m = s (B_m A_m x_m + b_m - B_0 A_0 x_m)."""
    torch.manual_seed(0)
    layer = MultimodalLoRA(
        nn.Linear(6, 5), MODS, rank=2, alpha=3.0, fusion="scalar", lora_bias=True, init_lora_weights="olora"
    )
    _randomise(layer)
    layer.execution = execution
    x = torch.randn(2 * 3, 4, 6)  # (M*B, T, in)
    off = layer.lora_offset
    xs = x.chunk(2)
    d = [
        layer.scaling * (layer.lora_B[m](layer.lora_A[m](xm)) - xm @ off.down("all").T @ off.up("all").T)
        for m, xm in zip(MODS, xs)
    ]
    lam = [layer.lora_fusion.lam[m] for m in MODS]
    want = torch.cat([layer.base_layer(xs[i]) + lam[i] * d[i] + (1 - lam[i]) * d[1 - i] for i in range(2)])
    with torch.no_grad():
        assert_close(layer(x), want, rel=1e-5)
