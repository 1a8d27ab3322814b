"""Input checks of a wrapped model: each bad input is a clear error before any work, naming the
modality, input, shape or sample and the fix; correct inputs still run."""

from __future__ import annotations

import json

import pytest
import torch

from mmpeft import MultimodalConfig, NonFiniteInputError, StemConfig, check_finite, modality_dropout, wrap_multimodal
from mmpeft.config import parse_stem
from mmpeft.model.io import CONFIG_NAME
from mmpeft.runtime.batch import check_sizes
from mmpeft.runtime.presence import masked_presence, presence_tensor
from mmpeft.runtime.stems import check_stem_inputs
from mmpeft.utils import check_modalities
from tests.tiny_models import tiny_timm_vit

MODS = ("optical", "dsm")


def _inputs(b: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 3, 32, 32, generator=g), torch.randn(b, 1, 32, 32, generator=g)


def _wrapped(**options):
    return wrap_multimodal(tiny_timm_vit(), MODS, "lora", **options)


# ---------------------------------------------------------------- correct inputs still run
def test_dict_list_missing_modality_and_presence_run() -> None:
    w, (opt, dsm) = _wrapped(), _inputs()
    with torch.no_grad():
        by_dict = w({"optical": opt, "dsm": dsm})
        by_list = w([opt, dsm])
        alone = w({"optical": opt})
        none_slot = w([None, dsm])
        masked = w({"optical": opt, "dsm": dsm}, presence={"dsm": torch.tensor([True, False])})
    assert set(by_dict) == set(MODS) and len(by_list) == 2 and torch.equal(by_list[0], by_dict["optical"])
    assert set(alone) == {"optical"} and len(none_slot) == 1 and set(masked) == set(MODS)
    assert (w.stems["optical"].in_channels, w.stems["dsm"].in_channels) == (3, 1)
    assert w.stems["dsm"].channels_origin == "first use"


# ---------------------------------------------------------------- channel counts per modality
def test_a_later_count_for_a_modality_names_both_counts_and_the_order() -> None:
    w, (opt, dsm) = _wrapped(), _inputs()
    with pytest.raises(ValueError, match=r"nothing tells a swapped order apart while \['optical', 'dsm'\]"):
        w([dsm, opt])  # the silent case: a first sequence in the wrong order
    w({"optical": opt, "dsm": dsm})  # fixes optical = 3, dsm = 1
    with pytest.raises(ValueError, match=r"'optical' takes 3 channels \(fixed at its first use\), got 1.*order"):
        w([dsm, opt])
    with pytest.raises(ValueError, match=r"'dsm' takes 1 channel \(fixed at its first use\), got 3"):
        w({"optical": opt, "dsm": opt})


def test_check_stem_inputs_calls_out_a_swapped_sequence_and_records_nothing() -> None:
    w, (opt, dsm) = _wrapped(stems={"dsm": ("repeat", 1)}), _inputs()
    names, xs = list(MODS), [dsm, opt]
    with pytest.raises(
        ValueError,
        match=r"'dsm' takes 1 channel \(declared.*got 3.*place of 'optical' has 1 channel, "
        r"as 'dsm'.*model's order \('optical', 'dsm'\)",
    ):
        check_stem_inputs(w.stems, names, xs, positional=True)
    assert w.stems["optical"].in_channels is None  # nothing recorded by a failed check
    w({"optical": opt, "dsm": dsm})
    with pytest.raises(
        ValueError,
        match=r"'optical' takes 3 .*'dsm' takes 1 .*place of 'optical' has 1 channel, as 'dsm', "
        r"the input in the place of 'dsm' has 3 channels, as 'optical'",
    ):
        check_stem_inputs(w.stems, names, xs, positional=True)


def test_a_swapped_first_call_is_refused_before_any_stem_records() -> None:
    w, (opt, dsm) = _wrapped(stems={"dsm": ("repeat", 1)}), _inputs()
    with pytest.raises(ValueError, match=r"model's order \('optical', 'dsm'\)"):
        w([dsm, opt])
    assert w.stems["optical"].in_channels is None


def test_recorded_counts_are_saved_and_enforced_after_loading(tmp_path) -> None:
    w, (opt, dsm) = _wrapped(), _inputs()
    w({"optical": opt, "dsm": dsm})
    w.save_pretrained(str(tmp_path))
    stems = json.loads((tmp_path / CONFIG_NAME).read_text())["config"]["stems"]
    assert stems == {"optical": {"kind": "auto", "in_channels": 3}, "dsm": {"kind": "auto", "in_channels": 1}}
    loaded = type(w).from_pretrained(tiny_timm_vit(), tmp_path)
    assert loaded.stems["dsm"].channels_origin == "declared"
    with pytest.raises(ValueError, match=r"'dsm' takes 1 channel \(declared"):
        loaded({"optical": opt, "dsm": opt})


def test_old_configs_load_and_stem_configs_round_trip() -> None:
    old = {"modalities": ["optical", "dsm"], "rules": [], "stems": {"dsm": {"kind": "repeat"}}}
    cfg = MultimodalConfig.from_dict(old)
    assert cfg.stem("dsm") == StemConfig("repeat") and cfg.stem("optical") == StemConfig()
    cfg.stems["dsm"].in_channels = 1
    assert MultimodalConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(TypeError, match="in_channels must be an int"):
        StemConfig("repeat", "1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="in_channels must be >= 1"):
        StemConfig("auto", 0)


# ---------------------------------------------------------------- stem short forms
def test_a_conv1x1_stem_without_channels_is_a_clear_error() -> None:
    with pytest.raises(
        ValueError,
        match=r"stem of modality 'dsm': \('conv1x1',\) lacks the channel count.*"
        r"\('conv1x1', channels\)",
    ):
        parse_stem(("conv1x1",), "dsm")
    with pytest.raises(ValueError, match="stem of modality 'dsm'.*lacks the channel count"):
        MultimodalConfig(list(MODS), [], {"dsm": ("conv1x1",)})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=r"stem of modality 'dsm': unknown stem fields \['channels'\]"):
        parse_stem({"kind": "repeat", "channels": 1}, "dsm")
    with pytest.raises(TypeError, match="stem of modality 'dsm': cannot read a stem from 7"):
        parse_stem(7, "dsm")
    assert parse_stem(("repeat",)) == StemConfig("repeat") and parse_stem(["conv1x1", 2]) == StemConfig("conv1x1", 2)


def test_wrap_reads_a_conv1x1_stem_without_channels_as_a_clear_error() -> None:
    with pytest.raises(ValueError, match="'dsm'.*lacks the channel count"):
        _wrapped(stems={"dsm": ("conv1x1",)})


# ---------------------------------------------------------------- modality names
@pytest.mark.parametrize("name", ["forward", "train", "to", "state_dict", "keys", "items", "update", "training"])
def test_a_modality_named_like_a_module_attribute_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match=rf"\['{name}'\] are attributes of torch's nn.Module"):
        check_modalities(["optical", name])
    with pytest.raises(ValueError, match=rf"'{name}'.*rename them"):
        wrap_multimodal(tiny_timm_vit(), ("optical", name), "lora")


# ---------------------------------------------------------------- dimensions
def test_a_single_sample_is_told_to_add_the_batch_axis() -> None:
    w, (opt, dsm) = _wrapped(), _inputs()
    with pytest.raises(ValueError, match=r"\['dsm'\] have fewer: .*dsm=\(1, 32, 32\).*x\[None\]"):
        w({"optical": opt, "dsm": dsm[0]})
    with pytest.raises(ValueError, match=r"'optical' has 32 channels \(shape \(3, 32, 32\)\).*add the batch axis"):
        w({"optical": opt[0]})  # the first call: nothing recorded yet
    w({"optical": opt, "dsm": dsm})
    with pytest.raises(ValueError, match=r"'dsm' has shape \(1, 32, 32\), 3 dimensions; its stem takes 4.*x\[None\]"):
        w({"dsm": dsm[0]})
    with pytest.raises(ValueError, match=r"inputs of \['optical'\] lack axes .*optical=\(32, 32\)"):
        w({"optical": opt[0, 0]})
    with pytest.raises(ValueError, match=r"single samples .*x\[None\]"):
        check_sizes(list(MODS), [opt[0], dsm[0]])


# ---------------------------------------------------------------- samples with no modality
def test_a_sample_with_every_modality_absent_is_refused() -> None:
    w, (opt, dsm) = _wrapped(), _inputs(3)
    none = {"optical": torch.tensor([True, False, True]), "dsm": torch.tensor([True, False, False])}
    with pytest.raises(ValueError, match=r"every modality of \['optical', 'dsm'\] is absent in sample 1 .*presence"):
        w({"optical": opt, "dsm": dsm}, presence=none)
    with pytest.raises(ValueError, match="absent in sample 0"):
        w({"optical": opt}, presence={"optical": torch.tensor([False, True, True])})
    with pytest.raises(ValueError, match="absent in sample 2"):
        presence_tensor(torch.tensor([[True, True, False]] * 2), list(MODS), 3, torch.device("cpu"))


def test_nonfinite_absent_refuses_a_sample_with_nothing_finite() -> None:
    opt, dsm = _inputs(3)
    opt[1, :, :2, :2], dsm[1, 0, 0, 0] = float("nan"), float("inf")
    with pytest.raises(NonFiniteInputError, match=r"NaN or inf in tile 'b' \(optical: 4 pixels, dsm: 1 pixels\)"):
        check_finite({"optical": opt, "dsm": dsm}, ["a", "b", "c"], "absent")
    w = _wrapped()
    w.set_nonfinite("absent")
    with pytest.raises(NonFiniteInputError, match="sample 1"):
        w({"optical": opt, "dsm": dsm})
    only_dsm_nan = {"optical": torch.tensor([True, True, False])}
    dsm2 = _inputs(3)[1]
    dsm2[2, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteInputError, match=r"absent in sample 2 \(absent by the presence mask or holding NaN"):
        masked_presence("absent", list(MODS), [_inputs(3)[0], dsm2], only_dsm_nan)
    ok = masked_presence("absent", list(MODS), [_inputs(3)[0], dsm2], None)
    assert ok is not None and ok.tolist() == [[True] * 3, [True, True, False]]


def test_modality_dropout_keeps_an_available_modality_in_every_sample() -> None:
    g = torch.Generator().manual_seed(0)
    finite = {"dsm": torch.tensor([True, False] * 8)}  # odd samples: the DSM is NaN
    for _ in range(20):
        keep = modality_dropout(0.9, MODS, 16, g, available=finite)
        stacked = torch.stack([keep[m] for m in MODS])
        assert stacked.any(0).all() and not (keep["dsm"] & ~finite["dsm"]).any()
        plain = modality_dropout({"optical": 0.9, "dsm": 0.9}, MODS, 16, g)
        assert torch.stack([plain[m] for m in MODS]).any(0).all()
    with pytest.raises(ValueError, match="absent in sample 1"):
        modality_dropout(0.5, MODS, 2, g, available={m: torch.tensor([True, False]) for m in MODS})
