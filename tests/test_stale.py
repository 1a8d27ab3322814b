"""Nothing stale after a merge or a load (issue 23): every path that changes a LoRA tensor or the
base while merged rebuilds the merged copies (or is refused), a wrapper whose base was unloaded
in place refuses every use, and options that would change nothing are errors naming them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from mmpeft import MultimodalModel, wrap_multimodal
from tests.helpers import assert_close
from tests.tiny_models import tiny_timm_vit

MODS = ("optical", "dsm")


def _inputs(batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"optical": torch.rand(batch, 3, 32, 32, generator=g), "dsm": torch.rand(batch, 1, 32, 32, generator=g)}


def _randomise(model: nn.Module, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _lora(seed: int = 5, **options: object) -> MultimodalModel:
    w = wrap_multimodal(tiny_timm_vit(), MODS, preset="lora", **options)  # no mixing: every layer merges
    _randomise(w, seed)
    return w.eval()


def _unmerged(w: MultimodalModel, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The outputs of ``w`` computed without the merged copies (a fresh wrap with its tensors)."""
    fresh = wrap_multimodal(tiny_timm_vit(), MODS, preset="lora").eval()
    fresh.load_state_dict(w.state_dict())
    with torch.no_grad():
        return fresh(x)


def _close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    for m in want:
        assert_close(got[m], want[m], rel=1e-5)


# ---------------------------------------------------------------------- an unloaded wrapper
def test_a_wrapper_unloaded_in_place_refuses_every_use(tmp_path: Path) -> None:
    w = _lora()
    x = _inputs()
    plain = w.merge_and_unload("dsm", inplace=True)
    assert plain is w.base_model
    for _what, call in [
        ("call", lambda: w(x)),
        ("call", lambda: w.call("forward", x)),
        ("save", lambda: w.save_pretrained(tmp_path / "a")),
        ("merge", lambda: w.merge_adapters()),
        ("merge", lambda: w.unmerge_adapters()),
        ("unload", lambda: w.merge_and_unload("optical")),
        ("unload", lambda: w.unload()),
    ]:
        with pytest.raises(RuntimeError, match=r"merge_and_unload\('dsm', inplace=True\).*wrap_multimodal"):
            call()
    assert not (tmp_path / "a").exists()
    assert w.status()["unloaded"] == "merge_and_unload('dsm', inplace=True)"


# ---------------------------------------------------------------------- loading while merged
def test_load_state_dict_on_a_merged_model_merges_the_new_weights() -> None:
    w, other = _lora(seed=5), _lora(seed=9)
    x = _inputs()
    w.merge_adapters()
    w.load_state_dict(other.state_dict())  # plain nn.Module loading
    assert w.status()["merged"]  # still merged, with the new weights
    layer = next(layer for _, layer in w.layers())
    ref = next(layer for _, layer in other.layers())
    want_w = layer.base_layer.weight + ref.get_delta_weight("dsm")
    assert_close(layer.merged_weight[1], want_w, rel=1e-5)  # re-merged at load
    with torch.no_grad():
        _close(w(x), other(x))


@pytest.mark.parametrize("how", ["host", "assign"])
def test_loading_through_a_host_module_or_by_assignment_merges_again(how: str) -> None:
    w, other = _lora(seed=5), _lora(seed=9)
    x = _inputs()
    w.merge_adapters()
    if how == "host":  # the wrapper inside a module of the user's
        nn.ModuleDict({"encoder": w}).load_state_dict(nn.ModuleDict({"encoder": other}).state_dict())
    else:  # parameters replaced by new objects
        w.load_state_dict({k: v.clone() for k, v in other.state_dict().items()}, assign=True)
    with torch.no_grad():
        _close(w(x), other(x))


def test_in_place_edits_under_no_grad_while_merged_are_seen() -> None:
    w, ema = _lora(seed=5), _lora(seed=9)
    x = _inputs()
    w.merge_adapters()
    with torch.no_grad():
        w(x)
        for p, q in zip(w.trainable_tensors(), ema.trainable_tensors()):  # an EMA step
            p.mul_(0.5).add_(q, alpha=0.5)
        got = w(x)
    _close(got, _unmerged(w, x))


def test_an_edit_of_the_frozen_weight_while_merged_is_seen() -> None:
    w = _lora()
    x = _inputs()
    w.merge_adapters()
    with torch.no_grad():
        w.base_model.blocks[0].mlp.fc1.base_layer.weight.mul_(1.5)
        got = w(x)
    _close(got, _unmerged(w, x))


# ---------------------------------------------------------------------- options that change nothing
@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_lambda_init_without_a_mixing_rule_is_an_error(method: str) -> None:
    with pytest.raises(ValueError, match="lambda_init=0.9.*fusion='none'"):
        wrap_multimodal(tiny_timm_vit(), MODS, method, targets=["fc1"], fusion="none", lambda_init=0.9)
    wrap_multimodal(tiny_timm_vit(), MODS, method, targets=["fc1"], fusion="none")  # the default is fine


def test_split_without_slices_is_an_error() -> None:
    with pytest.raises(ValueError, match="split=.*slices"):
        wrap_multimodal(tiny_timm_vit(), MODS, "lora", targets=["qkv"], split=["a", "b", "c"])
    wrap_multimodal(tiny_timm_vit(), MODS, "lora", targets=["qkv"], split=["a", "b", "c"], slices=["a"])


def test_lambda_init_with_a_preset_that_never_mixes_is_an_error() -> None:
    with pytest.raises(ValueError, match="lambda_init=0.9: every rule of this wrap has fusion='none'"):
        wrap_multimodal(tiny_timm_vit(), MODS, preset="lora", lambda_init=0.9)
    w = wrap_multimodal(tiny_timm_vit(), MODS, preset="mmlora", lambda_init=0.9)  # sets the mixing rules only
    assert {r.fusion: r.lambda_init for r in w.config.rules} == {"none": 0.5, "scalar": 0.9}


# ---------------------------------------------------------------------- small errors
def test_a_bad_regex_in_a_pattern_option_names_the_option_and_the_key() -> None:
    for option in ("rank_pattern", "alpha_pattern"):
        with pytest.raises(ValueError, match=rf"{option} key 'fc\(1' is not a valid regular expression"):
            wrap_multimodal(tiny_timm_vit(), MODS, preset="mmlora", **{option: {"fc(1": 8}})


def test_wrapping_a_peft_model_says_so_and_how_to_unwrap_it() -> None:
    peft = pytest.importorskip("peft")
    twin = peft.get_peft_model(tiny_timm_vit(), peft.LoraConfig(target_modules=["qkv"]))
    for model in (twin, twin.get_base_model()):
        with pytest.raises(TypeError, match=r"already a peft model.*merge_and_unload\(\).*unload\(\)"):
            wrap_multimodal(model, MODS, preset="mmlora")
    wrap_multimodal(twin.merge_and_unload(), MODS, preset="mmlora")  # the plain model wraps
