"""TerraMind's own per-modality patch embeddings on a wrapped model (issue 31).

TerraMind (TerraTorch's ``TerraMindViT``) embeds each modality with its own patch embedding
(``encoder_embeddings["untok_sen1grd@224"]`` for Sentinel-1 GRD, ...) before one shared
transformer. Wrapped, each modality goes through its own embedding, then the frozen transformer
with its LoRA: equal at init to TerraMind called with that modality alone. A tiny configuration of
the registered class (2 blocks, width 64, random weights).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from mmpeft import load_multimodal, save_multimodal, set_modality_embeddings, wrap_multimodal
from tests.geo_fm import highest_precision, import_terratorch  # noqa: F401  (a fixture)
from tests.helpers import assert_close, randomise_trainables, rel_diff

import_terratorch()  # skipped without the extra; the matmul precision put back
from terratorch.models.backbones.terramind.model.terramind_vit import TerraMindViT  # noqa: E402

KEYS = ("S2L2A", "S1GRD")


pytestmark = pytest.mark.usefixtures("highest_precision")


def _terramind(modalities: tuple[str, ...] = KEYS) -> TerraMindViT:
    torch.manual_seed(0)
    return TerraMindViT(
        img_size=32, modalities=list(modalities), patch_size=16, dim=64, encoder_depth=2, num_heads=2
    ).eval()


def _inputs(names: tuple[str, str] = KEYS) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {names[0]: torch.rand(2, 12, 32, 32, generator=g), names[1]: torch.rand(2, 2, 32, 32, generator=g)}


def _alone(x: dict[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """The unwrapped TerraMind called with each modality alone, under its own key."""
    with torch.no_grad():
        return {k: _terramind()({k: v}) for k, v in zip(KEYS, x.values())}


def _assert_outputs(out: dict[str, Any], ref: dict[str, Any], names: tuple[str, ...], rel: float, what: str) -> None:
    for m, k in zip(names, KEYS):
        for i, (a, b) in enumerate(zip(out[m], ref[k])):  # every block's output
            assert_close(a, b, rel=rel, msg=f"{what}, {m}, block {i}")


def test_each_modality_goes_through_its_own_embedding_identity_at_init_and_stacked_equal_to_alone() -> None:
    x = _inputs()
    ref = _alone(x)
    with torch.no_grad():  # the old behaviour: SAR tiled into the optical embedding, far from SAR embedded as SAR
        tiled = _terramind()(x["S1GRD"].repeat(1, 6, 1, 1))
    assert rel_diff(tiled[-1], ref["S1GRD"][-1]) > 0.1
    wrapped = wrap_multimodal(_terramind(), KEYS, "lora")  # names after TerraMind's keys: routed, no hint
    with torch.no_grad():
        _assert_outputs(wrapped(x), ref, KEYS, 1e-5, "identity at init")
    split = wrap_multimodal(_terramind(), KEYS, preset="lora")  # without mixing: stacked equal to alone
    randomise_trainables(split)
    with torch.no_grad():
        together = split(x)
        for m in KEYS:
            for a, b in zip(together[m], split({m: x[m]})[m]):
                assert_close(a, b, rel=1e-4, msg=f"stacked vs alone, {m}")
        assert rel_diff(together["S1GRD"][-1], ref["S1GRD"][-1]) > 1e-3  # the LoRA acts


def test_a_modality_without_an_embedding_is_refused_naming_the_keys_then_mapped() -> None:
    names = ("optical", "sar")
    x = _inputs(names)
    wrapped = wrap_multimodal(_terramind(), names, "lora")
    with pytest.raises(KeyError, match=r"'optical' has no patch embedding.*\['S2L2A', 'S1GRD'\].*set_modality_embed"):
        wrapped(x)
    assert wrapped.stems["optical"].in_channels is None  # refused before any work: nothing recorded
    with pytest.raises(KeyError, match=r"no embedding 'S1RTC'; its modality keys: \['S2L2A', 'S1GRD'\]"):
        set_modality_embeddings(wrapped, {"optical": "S2L2A", "sar": "S1RTC"})
    with pytest.raises(KeyError, match="unknown modality"):
        set_modality_embeddings(wrapped, {"dsm": "S1GRD"})
    with pytest.raises(KeyError, match="'optical' has no patch embedding"):  # the refusals changed nothing
        wrapped(x)
    set_modality_embeddings(wrapped, {"optical": "S2L2A", "sar": "untok_sen1grd@224"})  # a key or an embedding
    with torch.no_grad():
        _assert_outputs(wrapped(x), _alone(x), names, 1e-5, "mapped, identity at init")
    set_modality_embeddings(wrapped, {"optical": "S2L2A", "sar": "S2L2A"})  # replaces: SAR's 2 bands into 12
    with pytest.raises(ValueError, match="'sar' has 2 band.*takes 12"):
        wrapped(x)


def test_a_model_without_the_modality_refuses_it_and_a_learnable_stem_is_the_users_choice() -> None:
    optical_only = wrap_multimodal(_terramind(("S2L2A",)), KEYS, "lora")
    with pytest.raises(KeyError, match=r"'S1GRD' has no patch embedding.*keys: \['S2L2A'\]"):
        optical_only(_inputs())
    stem = wrap_multimodal(_terramind(("S2L2A",)), KEYS, "lora", stems={"S1GRD": ("conv1x1", 2)})
    with torch.no_grad():
        out = stem(_inputs())
    assert out["S1GRD"][-1].shape == (2, 4, 64)


def test_unloaded_the_base_model_runs_as_its_own() -> None:
    x = _inputs()
    wrapped = wrap_multimodal(_terramind(), KEYS, "lora")
    randomise_trainables(wrapped)
    base = wrapped.unload()  # the routing hook stays on its embedding, and does nothing outside a wrapped forward
    with torch.no_grad():
        for k in KEYS:
            for a, b in zip(base({k: x[k]}), _alone(x)[k]):
                assert_close(a, b, rel=0, msg=f"unloaded, {k}")


def test_the_routing_survives_save_load_and_deepcopy(tmp_path: Path) -> None:
    x = _inputs()
    wrapped = wrap_multimodal(_terramind(), KEYS, preset="lora")
    randomise_trainables(wrapped)
    with torch.no_grad():
        expected = wrapped(x)
    save_multimodal(wrapped, tmp_path / "tm")
    loaded = load_multimodal(_terramind(), tmp_path / "tm")  # routed again from the modalities' names
    twin = copy.deepcopy(wrapped)
    with torch.no_grad():
        _assert_outputs(loaded(x), expected, KEYS, 0, "loaded")
        _assert_outputs(twin(x), expected, KEYS, 0, "deep copy")
        # the copy's hook reads the copy: the original's SAR embedding changed leaves the copy as it was
        wrapped.base_model.encoder_embeddings["untok_sen1grd@224"].proj.weight.mul_(2)
        _assert_outputs(twin(x), expected, KEYS, 0, "deep copy after the original changed")
        assert rel_diff(wrapped(x)["S1GRD"][-1], expected["S1GRD"][-1]) > 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the copy runs alone, the original gone
        del wrapped
        with torch.no_grad():
            alone = twin({"S1GRD": x["S1GRD"]})["S1GRD"]
        for a, b in zip(alone, expected["S1GRD"]):
            assert_close(a, b, rel=1e-4, msg="the copy, SAR alone")
