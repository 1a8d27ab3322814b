"""Named adapter sets on one frozen model: add_adapter / set_adapter / delete_adapter / load_adapter /
add_weighted_adapter, equal to a model wrapped with each set alone and to peft's multi-adapter model."""

from __future__ import annotations

import pytest
import torch

from mmpeft import count_parameters, load_multimodal, set_execution, wrap_multimodal
from mmpeft.interop.peft_interop import peft_lora_weights
from tests.helpers import assert_close, rel_diff
from tests.helpers import randomise_trainables as _randomise_trainables
from tests.tiny_models import tiny_sam, tiny_timm_vit

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread is fastest

MODS = ("optical", "dsm")


def _x(mods=MODS) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {m: torch.rand(2, 3 if m == "optical" else 1, 32, 32, generator=g) for m in mods}


def _run(model, mods=MODS) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return model(_x(mods))


def _three_sets():
    """default: sliced-qkv LoRA without mixing; "mix": MMLoRA rank 2; "ad": MMAdapter (wraps attn,
    around the sites of the default set's qkv LoRA). Each randomised with its own seed."""
    w = wrap_multimodal(tiny_timm_vit(), MODS, preset="lora").eval()
    _randomise_trainables(w, seed=1)
    w.add_adapter("mix", preset="mmlora", rank=2)
    w.add_adapter("ad", method="adapter")
    for seed, name in ((2, "mix"), (3, "ad")):
        w.set_adapter(name)
        _randomise_trainables(w, seed=seed)
    w.set_adapter("default")
    return w


ALONE = {"default": {"preset": "lora"}, "mix": {"preset": "mmlora", "rank": 2}, "ad": {"method": "adapter"}}


def _frozen(w) -> dict[str, torch.Tensor]:
    own = w.trainable_names()
    return {k: v.clone() for k, v in w.state_dict().items() if k not in own}


def test_set_adapter_equals_the_set_wrapped_alone() -> None:
    w = _three_sets()
    assert w.adapters == ["default", "mix", "ad"] and w.active_adapter == "default"
    for name, options in [*ALONE.items(), ("default", ALONE["default"])]:
        w.set_adapter(name)
        alone = wrap_multimodal(tiny_timm_vit(), MODS, **options).eval()
        alone.load_trainable_state_dict(w.trainable_state_dict())
        assert sorted(alone.state_dict()) == sorted(w.state_dict())  # the same module tree, keys and all
        got, want = _run(w), _run(alone)
        assert all(torch.equal(got[m], want[m]) for m in MODS), name  # bit for bit
    plain = _run(wrap_multimodal(tiny_timm_vit(), MODS, preset="lora").eval())
    assert rel_diff(got["dsm"], plain["dsm"]) > 1e-4  # the sets matter


def test_switching_touches_nothing_frozen_and_restores_the_tree() -> None:
    w = _three_sets()
    names, frozen = [n for n, _ in w.named_modules()], _frozen(w)
    for name in ("ad", "mix", "ad", "default"):
        w.set_adapter(name)
    assert [n for n, _ in w.named_modules()] == names
    after = _frozen(w)
    assert sorted(after) == sorted(frozen) and all(torch.equal(after[k], frozen[k]) for k in frozen)
    assert w.status()["active_adapter"] == "default" and set(w.status()["adapters"]) == {"default", "mix", "ad"}


def test_training_one_set_leaves_the_others_bit_identical() -> None:
    w = _three_sets()
    before = {n: _saved(w, n) for n in w.adapters}
    frozen = _frozen(w)
    w.set_adapter("mix")
    w.train()
    params = [p for p in w.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        sum(o.square().mean() for o in w(_x()).values()).backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)  # every trainable learns
        opt.step()
    w.eval()
    for name in ("default", "ad"):
        now = _saved(w, name)
        assert all(torch.equal(now[k], before[name][k]) for k in now), name
    assert any(not torch.equal(v, before["mix"][k]) for k, v in _saved(w, "mix").items())
    after = _frozen(w)
    assert all(torch.equal(after[k], frozen[k]) for k in frozen)


def _saved(w, name: str) -> dict[str, torch.Tensor]:
    with w._using(name):
        return {k: v.clone() for k, v in w.trainable_state_dict().items()}


def test_save_and_load_several_sets(tmp_path) -> None:
    w = _three_sets()
    want = {}
    for name in w.adapters:
        w.set_adapter(name)
        want[name] = _run(w)
    w.set_adapter("mix")  # saving does not depend on which set is active
    w.save_pretrained(tmp_path)
    assert (tmp_path / "mmpeft_config.json").is_file()  # "default" at the root, as one set always was
    assert all((tmp_path / n / "adapter_model.safetensors").is_file() for n in ("mix", "ad"))
    loaded = load_multimodal(tiny_timm_vit(), tmp_path)
    loaded.load_adapter(tmp_path, "mix")
    loaded.load_adapter(tmp_path / "ad", "ad")  # the set's own folder works too
    assert loaded.adapters == ["default", "mix", "ad"] and loaded.active_adapter == "default"
    for name in loaded.adapters:
        loaded.set_adapter(name)
        assert not any(p.requires_grad for p in loaded.parameters())  # for inference unless is_trainable
        got = _run(loaded)
        assert all(torch.equal(got[m], want[name][m]) for m in MODS), name
    only = tmp_path / "only"
    w.save_pretrained(only, selected_adapters=["ad"])
    assert not (only / "mmpeft_config.json").exists() and (only / "ad" / "mmpeft_config.json").is_file()
    with pytest.raises(FileNotFoundError, match=r"it holds the adapter sets \['ad'\] in folders of their own"):
        load_multimodal(tiny_timm_vit(), only)  # no "default" at the root: the error names the sets there


def test_load_adapter_trainable_and_refusals(tmp_path) -> None:
    w = _three_sets()
    w.save_pretrained(tmp_path)
    other = load_multimodal(tiny_timm_vit(), tmp_path, is_trainable=True)
    other.load_adapter(tmp_path, "mix", is_trainable=True)
    other.set_adapter("mix")
    assert all(p.requires_grad for n, p in other.named_parameters() if n in other.trainable_names())
    with pytest.raises(ValueError, match="exists already"):
        other.load_adapter(tmp_path, "mix")
    wider = wrap_multimodal(tiny_timm_vit(), MODS, preset="lora")
    with pytest.raises(ValueError, match="cannot load multimodal weights"):
        bad = tmp_path / "bad"
        w.set_adapter("mix")
        w.save_pretrained(bad, selected_adapters=["mix"])
        (bad / "mix" / "adapter_model.safetensors").write_bytes((tmp_path / "adapter_model.safetensors").read_bytes())
        wider.load_adapter(bad, "mix")
    assert wider.adapters == ["default"]  # a failed load leaves no half set


def test_delete_adapter() -> None:
    w = _three_sets()
    w.delete_adapter("mix")
    assert w.adapters == ["default", "ad"]
    with pytest.raises(KeyError, match="no adapter set 'mix'"):
        w.set_adapter("mix")
    with pytest.raises(ValueError, match=r"cannot delete the active adapter set 'default': set_adapter\('ad'\)"):
        w.delete_adapter("default")
    w.add_adapter("mix", preset="mmlora", rank=2)  # the name is free again
    w.set_adapter("ad")
    w.delete_adapter("default")
    assert w.adapters == ["ad", "mix"]


def test_refusals() -> None:
    w = _three_sets()
    with pytest.raises(ValueError, match="exists already"):
        w.add_adapter("mix")
    with pytest.raises(ValueError, match="adapter_name must be a folder name"):
        w.add_adapter("a/b")
    with pytest.raises(ValueError, match="modules_to_save is the model's"):
        w.add_adapter("head", modules_to_save=["head"])
    with pytest.raises(ValueError, match="in_channels is the model's"):
        w.add_adapter("c4", in_channels=4)
    with pytest.raises(TypeError, match="unknown option"):
        w.add_adapter("typo", rnak=3)
    names = [n for n, _ in w.named_modules()]
    with pytest.raises(ValueError, match="not a fused q/k/v projection"):
        w.add_adapter("cut", targets=["qkv", "fc1"], slices=["q", "v"])
    assert w.adapters == ["default", "mix", "ad"] and [n for n, _ in w.named_modules()] == names  # nothing left
    with pytest.raises(ValueError, match="config= must share the model's"):
        w.add_adapter("one", config=wrap_multimodal(tiny_timm_vit(), ("optical",), preset="lora").config)
    with pytest.raises(ValueError, match="add_adapter"):
        wrap_multimodal(w.base_model, MODS)  # a second wrap is refused, naming the way
    w.merge_adapters()
    with pytest.raises(ValueError, match=r"is merged .*unmerge_adapters\(\)"):
        w.set_adapter("mix")
    w.unmerge_adapters()
    w.set_adapter("mix")


def test_sets_move_with_the_model() -> None:
    w = _three_sets()
    w.to(torch.float64)
    for name in w.adapters:
        w.set_adapter(name)
        assert {p.dtype for p in w.parameters()} == {torch.float64}, name
    w.to(torch.float32)
    w.set_adapter("default")
    w.to(torch.bfloat16)
    default = {p.dtype for n, p in w.named_parameters() if n in w.trainable_names()}
    w.set_adapter("mix")
    assert {p.dtype for n, p in w.named_parameters() if n in w.trainable_names()} == default  # one policy for all


def test_counted_per_set() -> None:
    w = _three_sets()
    for name, options in ALONE.items():
        alone = count_parameters(wrap_multimodal(tiny_timm_vit(), MODS, **options))
        report = w.count_adapter_parameters(name)
        assert report.to_dict() == alone.to_dict(), name
        assert w.status()["adapters"][name]["trainable"] == alone.trainable
    assert w.active_adapter == "default"


def test_weighted_cat_is_the_weighted_sum_of_deltas() -> None:
    """Two modalities, sliced qkv and MLP LoRA of different ranks and scalings: every layer's weight
    update per modality is sum_i w_i * delta_i (float32, 1e-6)."""
    w = wrap_multimodal(tiny_timm_vit(), MODS, preset="lora")
    _randomise_trainables(w, seed=1)
    w.add_adapter("b", targets=["qkv"], slices=["q", "v"], rank=3, alpha=5.0, fusion="none")
    w.add_adapter("d", targets=["fc2"], rank=2, fusion="none", use_rslora=False)
    for seed, name in ((2, "b"), (3, "d")):
        w.set_adapter(name)
        _randomise_trainables(w, seed=seed)
    weights = {"default": 0.7, "b": -1.5, "d": 0.25}
    deltas = {n: _deltas(w, n) for n in weights}
    w.add_weighted_adapter(list(weights), list(weights.values()), "c")
    combined = _deltas(w, "c")
    assert set(combined) == set(deltas["default"]) | set(deltas["b"]) | set(deltas["d"])
    for key, d in combined.items():
        want = sum(wt * deltas[n][key] for n, wt in weights.items() if key in deltas[n])
        assert_close(d, want, rel=1e-5)
    w.add_adapter("whole", targets=["qkv"], fusion="none")
    with pytest.raises(ValueError, match="different slices of blocks.0.attn.qkv"):
        w.add_weighted_adapter(["default", "whole"], [1.0, 1.0], "e")


def _deltas(w, name: str) -> dict[tuple[str, str], torch.Tensor]:
    with w._using(name):
        return {(site, m): layer.get_delta_weight(m).detach() for site, layer in w.layers() for m in MODS}


def test_weighted_refusals() -> None:
    w = _three_sets()
    with pytest.raises(ValueError, match="mixes modalities with this set's own lambdas"):
        w.add_weighted_adapter(["default", "mix"], [1.0, 1.0], "c")
    with pytest.raises(ValueError, match="activation between its projections"):
        w.add_weighted_adapter(["default", "ad"], [1.0, 1.0], "c")
    with pytest.raises(ValueError, match="only 'cat' is offered"):
        w.add_weighted_adapter(["default"], [1.0], "c", combination_type="svd")
    with pytest.raises(ValueError, match="weights must be 1 finite numbers"):
        w.add_weighted_adapter(["default"], [1.0, 2.0], "c")
    with pytest.raises(KeyError, match="no adapter set 'nope'"):
        w.add_weighted_adapter(["nope"], [1.0], "c")
    with pytest.raises(ValueError, match="weights must be 1 finite numbers"):
        w.add_weighted_adapter(["default"], [True], "c")  # a bool is not a weight
    w.add_adapter("drop", preset="lora", dropout=0.1)
    with pytest.raises(ValueError, match="different dropout at"):
        w.add_weighted_adapter(["default", "drop"], [1.0, 1.0], "c")
    w.delete_adapter("drop")
    assert w.adapters == ["default", "mix", "ad"]


def test_sets_and_their_cat_equal_peft_multi_adapter_model() -> None:
    """One modality, fusion='none': each set equals peft's adapter of the same weights after peft's
    own add_adapter / set_adapter, and add_weighted_adapter(..., "cat") equals peft's (1e-5)."""
    peft = pytest.importorskip("peft")
    w = wrap_multimodal(tiny_timm_vit(), ("optical",), targets=["qkv", "fc1"], rank=4, alpha=8.0, fusion="none").eval()
    _randomise_trainables(w, seed=1)
    w.add_adapter("b", targets=["qkv", "fc2"], rank=2, alpha=3.0, fusion="none")
    pm = peft.get_peft_model(tiny_timm_vit(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "fc1"]))
    pm.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=3, target_modules=["qkv", "fc2"]))
    for name, seed in (("b", 2), ("default", None)):
        w.set_adapter(name)
        if seed is not None:
            _randomise_trainables(w, seed=seed)
        _into_peft(pm, name, peft_lora_weights(w, "optical"))
    pm.eval()
    w.add_weighted_adapter(["default", "b"], [0.6, -1.3], "cat")
    pm.add_weighted_adapter(["default", "b"], [0.6, -1.3], "cat", combination_type="cat")
    x = _x(("optical",))
    for name in ("default", "b", "cat"):
        w.set_adapter(name)
        pm.set_adapter(name)
        with torch.no_grad():
            got, want = w(x)["optical"], pm(x["optical"])
        assert_close(got, want, rel=1e-5)
    with torch.no_grad(), pm.disable_adapter():
        assert rel_diff(got, pm(x["optical"])) > 1e-4  # the sets matter


def _into_peft(pm, adapter: str, weights: dict) -> None:
    """Copy mmpeft's exported (A, B, scaling) of every module into peft's adapter ``adapter``."""
    modules = dict(pm.base_model.model.named_modules())
    with torch.no_grad():
        for name, (a, b, scaling) in weights.items():
            layer = modules[name]
            assert layer.scaling[adapter] == pytest.approx(scaling)
            layer.lora_A[adapter].weight.copy_(a)
            layer.lora_B[adapter].weight.copy_(b)


def test_sam_set_added_under_efficient_attention_equals_the_set_alone() -> None:
    """SAM's windowed blocks: the new set's dry run sees the stock blocks (as a first wrap does),
    so its layers carry the same batch factors and compute the same outputs as the set alone."""
    x = {"optical": torch.rand(2, 3, 64, 64), "dsm": torch.rand(2, 1, 64, 64)}
    w = wrap_multimodal(tiny_sam(), MODS, preset="mmadapter").eval()
    w.add_adapter("lora", preset="mmlora")
    w.set_adapter("lora")
    _randomise_trainables(w, seed=4)
    alone = wrap_multimodal(tiny_sam(), MODS, preset="mmlora").eval()
    alone.load_trainable_state_dict(w.trainable_state_dict())
    factors = {n: (layer.batch_factor, layer.factor_size) for n, layer in w.layers()}
    assert factors == {n: (layer.batch_factor, layer.factor_size) for n, layer in alone.layers()}
    assert w.block_features() == alone.block_features() and w.block_features()["efficient_attention"]
    with torch.no_grad():
        got, want = w(x), alone(x)
    assert all(torch.equal(got[m], want[m]) for m in MODS)
    w.disable_efficient_attention()
    alone.disable_efficient_attention()
    with torch.no_grad():
        got, want = w(x), alone(x)  # the stock windowed blocks: the layers' checks hold
    assert all(torch.equal(got[m], want[m]) for m in MODS)


def test_each_set_has_its_own_head_copy_and_stems(tmp_path) -> None:
    """modules_to_save and learnable stems are per set: training one set's head and DSM stem leaves
    the other set's copies bit-identical; both are saved and loaded by name."""
    w = wrap_multimodal(tiny_timm_vit(), MODS, preset="lora", modules_to_save=["head"]).eval()
    w.add_adapter("conv", preset="lora", stems={"dsm": ("conv1x1", 1)})
    head = {k: v.clone() for k, v in w.trainable_state_dict().items() if "head" in k}
    w.set_adapter("conv")
    assert w.stems["dsm"].kind == "conv1x1" and w.config.stem("dsm").kind == "conv1x1"
    trained = [n for n, p in w.named_parameters() if p.requires_grad]
    assert any("head.trained_module" in n for n in trained) and any(n.startswith("stems.dsm") for n in trained)
    opt = torch.optim.SGD([p for p in w.parameters() if p.requires_grad], lr=0.5)
    w.train()
    for _ in range(2):
        opt.zero_grad()
        sum(o.square().mean() for o in w(_x()).values()).backward()
        opt.step()
    w.eval()
    want = _run(w)
    w.set_adapter("default")
    assert w.stems["dsm"].kind != "conv1x1"
    assert all(torch.equal(v, head[k]) for k, v in w.trainable_state_dict().items() if "head" in k)
    w.save_pretrained(tmp_path)
    loaded = load_multimodal(tiny_timm_vit(), tmp_path)
    loaded.load_adapter(tmp_path, "conv")
    loaded.set_adapter("conv")
    got = _run(loaded)
    assert all(torch.equal(got[m], want[m]) for m in MODS)
    with pytest.raises(TypeError, match="adapter_name must be a str"):
        loaded.set_adapter(["conv"])
    tree, before = [(n, type(m)) for n, m in loaded.named_modules()], _run(loaded)  # "conv" active
    for method in ("lora", "adapter"):  # a layer in place of the trained head lost it on the next switch
        with pytest.raises(ValueError, match=r"modules_to_save selects head, .*adapted module\(s\) \['head'\]"):
            loaded.add_adapter("two", method, targets=["head"])
    loaded.set_adapter("default")
    loaded.set_adapter("conv")  # the head's trained copies survive the round trip
    assert [(n, type(m)) for n, m in loaded.named_modules()] == tree and loaded.adapters == ["default", "conv"]
    assert all(torch.equal(v, before[m]) for m, v in _run(loaded).items())


def test_switching_sets_keeps_the_frozen_norms_in_eval_where_they_moved() -> None:
    """A set whose adapter wraps the module holding a BatchNorm renames that norm: switching to it
    (and back) keeps the norm frozen in eval mode under model.train(), and status names it where it is."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)
            self.attn = torch.nn.Sequential(torch.nn.Linear(8, 8))
            self.attn.add_module("bn", torch.nn.BatchNorm1d(8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(self.fc(x.flatten(1)[:, :8]))

    torch.manual_seed(0)
    w = wrap_multimodal(Net(), ("optical", "dsm"), "lora", targets=["fc"], probe=False, in_channels=8)
    norm = w.base_model.attn.bn
    w.add_adapter("b", method="adapter", targets=["attn"])
    w.set_adapter("b")
    assert w.active_adapter == "b"
    w.train()
    assert not norm.training and w.frozen_norms == ("attn.base_layer.bn",)
    w.set_adapter("default")
    w.train()
    assert not norm.training and w.frozen_norms == ("attn.bn",)


def test_switching_carries_the_execution_or_refuses_a_mixed_one() -> None:
    w = wrap_multimodal(tiny_timm_vit(), MODS, preset="lora")
    w.add_adapter("b", preset="mmlora")
    set_execution(w, "loop")
    w.set_adapter("b")
    assert {layer.execution for _, layer in w.layers()} == {"loop"}
    next(iter(w.layers()))[1].execution = "batched"  # one layer switched by hand
    with pytest.raises(ValueError, match="several executions"):
        w.set_adapter("default")
    assert w.active_adapter == "b"  # nothing switched
