"""peft's names on a wrapped model (issue 28), each the same operation as mmpeft's own, with peft's
behaviour as the reference: disable_adapter, get_base_model, peft_config, active_peft_config,
merge_adapter / unmerge_adapter, adapter_name= at wrap and load, a named set's state dict
without switching, adapter_names= per sample, a hot swap of saved weights into a loaded set."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from mmpeft import MultimodalLayer, MultimodalModel, load_multimodal, wrap_multimodal
from mmpeft.errors import MmpeftKeyError, MmpeftStateError, MmpeftTypeError, MmpeftValueError
from tests.helpers import assert_close, perturb_trainables
from tests.tiny_models import tiny_timm_vit

peft = pytest.importorskip("peft")

MODS = ("optical", "dsm")


def _inputs(batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"optical": torch.rand(batch, 3, 32, 32, generator=g), "dsm": torch.rand(batch, 1, 32, 32, generator=g)}


def _two_sets(seed: int = 5) -> MultimodalModel:
    """Set "default" (LoRA on qkv, fc1, scalar mixing on fc1) and set "b" (rank 4 on fc1, fc2), both trained."""
    w = wrap_multimodal(tiny_timm_vit(), MODS, preset="mmlora")
    w.add_adapter("b", "lora", targets=["fc1", "fc2"], rank=4, alpha=8.0, fusion="none")
    perturb_trainables(w, seed)
    with w._using("b"):
        perturb_trainables(w, seed + 1)
    return w.eval()


def _run(w: MultimodalModel, x: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """``w``'s output on ``x`` with set ``name`` active (``"__base__"``: adapters off)."""
    before = w.active_adapter
    with torch.no_grad():
        if name == "__base__":
            with w.disable_adapters():
                return w(x)
        w.set_adapter(name)
        try:
            return w(x)
        finally:
            w.set_adapter(before)


# ---------------------------------------------------------------------- the names
def test_peft_names_are_the_same_operations(capsys: pytest.CaptureFixture[str]) -> None:
    w = _two_sets()
    x = _inputs()
    with torch.no_grad():
        with w.disable_adapter():
            off = w(x)
        with w.disable_adapters():
            assert all(torch.equal(v, off[m]) for m, v in w(x).items())
        on = w(x)
    assert w.get_base_model() is w.base_model
    assert list(w.peft_config) == w.adapters == ["default", "b"]
    assert w.peft_config["default"] is w.config is w.active_peft_config
    assert w.peft_config["b"].rules[0].rank == 4
    w.print_trainable_parameters()
    trainable, total = w.get_nb_trainable_parameters()
    assert capsys.readouterr().out.strip() == (
        f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
    )
    w2 = wrap_multimodal(tiny_timm_vit(), MODS, preset="lora")
    perturb_trainables(w2)
    w2.eval()
    with torch.no_grad():
        want = w2(x)
        assert w2.merge_adapter() == w2.merge_adapter(["default"]) == [n for n, _ in w2.layers()]
        assert w2.status()["merged"]
        merged = w2(x)
        w2.unmerge_adapter()
        assert not w2.status()["merged"] and all(torch.equal(w2(x)[m], want[m]) for m in MODS)
    for m in MODS:
        assert_close(merged[m], want[m], rel=1e-5)
    with pytest.raises(MmpeftValueError, match=r"only the active set 'default' merges.*set_adapter\('b'\)"):
        w.merge_adapter(["b"])
    with pytest.raises(MmpeftKeyError, match="no adapter set 'zz'"):
        w.merge_adapter(["zz"])
    assert not any(torch.equal(on[m], off[m]) for m in MODS)


def test_adapter_name_at_wrap_and_load_as_peft(tmp_path: Path) -> None:
    """peft: get_peft_model(..., adapter_name="ft").save_pretrained(d) writes d/ft; so does mmpeft,
    and load_multimodal(base, d, adapter_name="ft") reads it back under that name."""
    cfg = peft.LoraConfig(r=2, target_modules=["qkv"])
    twin = peft.get_peft_model(tiny_timm_vit(), copy.deepcopy(cfg), adapter_name="ft")
    twin.save_pretrained(tmp_path / "peft")
    assert (tmp_path / "peft" / "ft" / "adapter_config.json").is_file()
    w = wrap_multimodal(tiny_timm_vit(), MODS, cfg, adapter_name="ft")
    assert w.adapters == ["ft"] and w.active_adapter == "ft" and list(w.peft_config) == list(twin.peft_config)
    # deliberate: peft keeps the LoraConfig, mmpeft the config the set was built from (its rules)
    assert isinstance(twin.peft_config["ft"], peft.LoraConfig) and w.peft_config["ft"].rules[0].rank == 2
    perturb_trainables(w)
    w.save_pretrained(tmp_path / "mm")
    assert (tmp_path / "mm" / "ft" / "mmpeft_config.json").is_file()
    loaded = load_multimodal(tiny_timm_vit(), tmp_path / "mm", adapter_name="ft")
    assert loaded.adapters == ["ft"]
    x = _inputs()
    with torch.no_grad():
        got, want = loaded(x), w.eval()(x)
    assert all(torch.equal(got[m], want[m]) for m in MODS)
    with pytest.raises(MmpeftValueError, match="adapter_name must be a folder name"):
        wrap_multimodal(tiny_timm_vit(), MODS, cfg, adapter_name="a/b")


# ---------------------------------------------------------------------- per-set state dicts
def test_a_named_sets_state_dict_without_switching() -> None:
    w = _two_sets()
    want = copy.deepcopy(w)
    want.set_adapter("b")
    sd = w.trainable_state_dict(adapter_name="b")
    assert w.active_adapter == "default"
    expected = want.trainable_state_dict()
    assert sd.keys() == expected.keys() and all(torch.equal(sd[k], expected[k]) for k in sd)
    other = _two_sets(seed=11)
    other.load_trainable_state_dict(sd, adapter_name="b")  # peft's set_peft_model_state_dict(..., adapter_name="b")
    assert other.active_adapter == "default"
    x = _inputs()
    got, ref = _run(other, x, "b"), _run(w, x, "b")
    assert all(torch.equal(got[m], ref[m]) for m in MODS)
    with pytest.raises(MmpeftValueError, match="cannot load"):
        other.load_trainable_state_dict(w.trainable_state_dict(), adapter_name="b")  # default's keys into b
    with pytest.raises(MmpeftKeyError, match="no adapter set 'c'"):
        w.trainable_state_dict(adapter_name="c")


# ---------------------------------------------------------------------- adapter_names per sample
def test_adapter_names_per_sample_equal_each_set_alone() -> None:
    w = _two_sets()
    x = _inputs(batch=5, seed=3)
    names = ["b", "default", "__base__", "b", "default"]
    with torch.no_grad():
        got = w(x, adapter_names=names)
    assert w.active_adapter == "default" and w.adapters_enabled
    for name in ("default", "b", "__base__"):
        idx = torch.tensor([i for i, n in enumerate(names) if n == name])
        alone = _run(w, {m: v[idx] for m, v in x.items()}, name)  # its samples under its set alone
        full = _run(w, x, name)  # the whole batch under its set
        for m in MODS:
            assert_close(got[m][idx], alone[m], rel=0)
            assert_close(got[m][idx], full[m][idx], rel=1e-5)  # another batch size: rounding only


def test_adapter_names_with_a_presence_tensor_equal_the_dict_form() -> None:
    """An (S, B) presence tensor is split by samples (its columns), as the {modality: (B,)} form."""
    w = _two_sets()
    x = _inputs(batch=4, seed=3)
    rows = torch.tensor([[True, True, True, True], [True, False, True, False]])  # dsm absent in samples 1, 3
    names = ["default", "b", "default", "b"]
    with torch.no_grad():
        by_tensor = w(x, presence=rows, adapter_names=names)
        by_dict = w(x, presence={"optical": rows[0], "dsm": rows[1]}, adapter_names=names)
    for name in ("default", "b"):
        idx = torch.tensor([i for i, n in enumerate(names) if n == name])
        w.set_adapter(name)
        with torch.no_grad():
            alone = w({m: v[idx] for m, v in x.items()}, presence=rows[:, idx])
        w.set_adapter("default")
        for m in MODS:
            assert_close(by_tensor[m][idx], alone[m], rel=0)
    for m in MODS:
        assert_close(by_tensor[m], by_dict[m], rel=0)


def test_adapter_names_refusals() -> None:
    w = _two_sets()
    x = _inputs(batch=2)
    with pytest.raises(MmpeftKeyError, match=r"no adapter set \['zz'\]; the sets are \['default', 'b'\]"):
        w(x, adapter_names=["b", "zz"])
    with pytest.raises(MmpeftValueError, match=r"1 name\(s\) for a batch of 2"):
        w(x, adapter_names=["b"])
    with pytest.raises(MmpeftTypeError, match="one per sample"):
        w(x, adapter_names="b")
    with pytest.raises(MmpeftStateError, match="inference"):
        w.train()(x, adapter_names=["b", "default"])
    w = wrap_multimodal(tiny_timm_vit(), MODS, preset="lora")  # no mixing: merges
    w.add_adapter("b", "lora", targets=["fc1"], fusion="none")
    w.eval().merge_adapters()
    with pytest.raises(MmpeftStateError, match=r"merged layers .*unmerge_adapters\(\) first"):
        w(x, adapter_names=["b", "default"])


# ---------------------------------------------------------------------- hot swap
def test_hotswap_copies_saved_weights_into_the_loaded_set(tmp_path: Path) -> None:
    w, trained = _two_sets(seed=5), _two_sets(seed=21)
    trained.save_pretrained(tmp_path)
    params = {n: p for n, p in w.named_parameters()}
    w.load_adapter(tmp_path, "default", hotswap=True)  # the active set
    w.hotswap_adapter(tmp_path, "b")  # an inactive one, from tmp_path/b
    assert all(p is params[n] for n, p in w.named_parameters())  # the same objects: nothing rebuilt
    x = _inputs()
    for name in ("default", "b"):
        got, want = _run(w, x, name), _run(trained, x, name)
        assert all(torch.equal(got[m], want[m]) for m in MODS)


def test_hotswap_refuses_naming_the_tensor_or_the_option(tmp_path: Path) -> None:
    w = _two_sets()
    before = {k: v.clone() for k, v in w.state_dict().items()}
    rank8 = wrap_multimodal(tiny_timm_vit(), MODS, preset="mmlora", rank=8)
    rank8.save_pretrained(tmp_path / "rank8")
    with pytest.raises(MmpeftValueError, match=r"qkv\.lora_A\.dsm\.q\.weight: saved \(8, 32\), set \(4, 32\)"):
        w.load_adapter(tmp_path / "rank8", "default", hotswap=True)
    alpha = wrap_multimodal(tiny_timm_vit(), MODS, preset="mmlora", alpha=2.0)  # same shapes, another scaling
    alpha.save_pretrained(tmp_path / "alpha")
    with pytest.raises(MmpeftValueError, match=r"rules\[1\]\.alpha: saved 2\.0, set None"):
        w.hotswap_adapter(tmp_path / "alpha", "default")
    with pytest.raises(MmpeftKeyError, match="no adapter set 'c' to swap into"):
        w.hotswap_adapter(tmp_path / "alpha", "c")
    assert all(torch.equal(v, before[k]) for k, v in w.state_dict().items())  # nothing copied


def test_adapter_names_on_a_hugging_face_model_by_keyword() -> None:
    """The inputs by the model's keyword (pixel_values=), a ModelOutput per modality put back per sample."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8, intermediate_size=64
    )
    w = wrap_multimodal(transformers.ViTModel(cfg).eval(), MODS, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    w.add_adapter("b", peft.LoraConfig(r=4, target_modules=["v_proj", "fc1"]))
    perturb_trainables(w)
    with w._using("b"):
        perturb_trainables(w, 6)
    w.eval()
    x = _inputs(batch=3, seed=4)
    names = ["default", "b", "default"]
    with torch.no_grad():
        got = w(pixel_values=x, adapter_names=names, output_hidden_states=True)
        with pytest.raises(MmpeftValueError, match="labels= with adapter_names="):
            w(pixel_values=x, adapter_names=names, labels=torch.zeros(3, dtype=torch.long))
    assert type(got["dsm"]).__name__ == "BaseModelOutputWithPooling"
    for name in ("default", "b"):
        idx = torch.tensor([i for i, n in enumerate(names) if n == name])
        w.set_adapter(name)
        with torch.no_grad():
            alone = w(pixel_values={m: v[idx] for m, v in x.items()}, output_hidden_states=True)
        for m in MODS:
            for field in ("last_hidden_state", "pooler_output"):
                assert torch.equal(getattr(got[m], field)[idx], getattr(alone[m], field))
            assert torch.equal(got[m].hidden_states[1][idx], alone[m].hidden_states[1])
    w.set_adapter("default")


@pytest.mark.parametrize("name", ["bad name", "__base__", "a/b"])
def test_a_bad_first_set_name_is_refused_before_the_model_changes(name: str) -> None:
    """adapter_name= is checked at the entrance: the refused model is exactly as given."""
    model = tiny_timm_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MmpeftValueError, match="adapter_name"):
        wrap_multimodal(model, ("optical", "dsm"), "lora", adapter_name=name)
    assert not any(isinstance(m, MultimodalLayer) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    wrapped = wrap_multimodal(model, ("optical", "dsm"), "lora", adapter_name="fine")  # then it wraps
    assert wrapped.adapters == ["fine"]
    with pytest.raises(MmpeftValueError, match="__base__"):
        wrapped.add_adapter("__base__", method="lora")


class _PerToken(torch.nn.Module):
    """Per-token logits flattened into the batch axis, (B*16, 5), as a per-pixel head may return."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = torch.nn.Conv2d(3, 8, 4, 4), torch.nn.Linear(8, 5)
        self.odd = False

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.fc(self.conv(x).flatten(2).transpose(1, 2)).flatten(0, 1)
        out = {"logits": logits}
        if self.odd:  # B + 2 values (B + 1 per modality): neither rows per sample nor the same in every group
            out["odd"] = torch.cat([logits.view(x.shape[0], -1).mean(1), logits.mean().view(1).expand(2)])
        return out


def test_adapter_names_put_back_rows_per_sample_and_refuse_the_rest() -> None:
    """An output with 16 rows per sample came back with the first group's rows only (sample 1
    missing, silently); it is put back per sample, equal to each set alone; one that is neither
    per sample nor the same in every group is refused naming its field."""
    torch.manual_seed(0)
    model = wrap_multimodal(_PerToken(), ("a", "b"), targets=["fc"], method="lora", fusion="none", probe=False)
    model.add_adapter("other", method="lora", targets=["fc"], fusion="none", probe=False)
    perturb_trainables(model)
    model.set_adapter("other")
    perturb_trainables(model, seed=9)
    model.set_adapter("default")
    model.eval()
    x = {"a": torch.rand(3, 3, 16, 16), "b": torch.rand(3, 3, 16, 16)}
    with torch.no_grad():
        mixed = model(x, adapter_names=["default", "other", "default"])["a"]
        alone = {}
        for name in ("default", "other"):
            model.set_adapter(name)
            alone[name] = model(x)["a"]
    assert mixed["logits"].shape == (48, 5)
    for i, name in enumerate(["default", "other", "default"]):
        assert_close(mixed["logits"][16 * i : 16 * (i + 1)], alone[name]["logits"][16 * i : 16 * (i + 1)], rel=1e-5)
    model.base_model.odd = True
    with torch.no_grad(), pytest.raises(ValueError, match=r"output\['a'\]\['odd'\] has \[\(3,\), \(2,\)\]"):
        model(x, adapter_names=["default", "other", "default"])


def test_hotswap_before_and_after_the_first_forward(tmp_path: Path) -> None:
    """An "auto" stem records its input channels at the first forward: a set saved before any
    forward was refused by a model that had run one (and the reverse), 'stems: saved ... None'."""
    kw = dict(method="lora", targets=["qkv", "fc1"], fusion="none")
    x = {m: torch.rand(2, 3, 32, 32) for m in MODS}
    source = wrap_multimodal(tiny_timm_vit(), MODS, **kw)
    perturb_trainables(source)
    source.save_pretrained(tmp_path / "before")
    with torch.no_grad():
        want = source(x)
    source.save_pretrained(tmp_path / "after")
    for ran in (False, True):
        for saved in ("before", "after"):
            served = wrap_multimodal(tiny_timm_vit(), MODS, **kw).eval()
            if ran:
                with torch.no_grad():
                    served(x)
            served.hotswap_adapter(tmp_path / saved)
            with torch.no_grad():
                got = served(x)
            assert all(torch.equal(got[m], want[m]) for m in MODS), (ran, saved)
