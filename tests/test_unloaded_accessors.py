"""After ``unload()`` or ``merge_and_unload(m, inplace=True)`` every accessor of the wrapper refuses
with a state error naming the call (issue 28): before, ``count_adapter_parameters("b")`` counted the
unfrozen base as set b's and ``trainable_state_dict()`` returned ``{}`` without a word."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from mmpeft import MultimodalModel, wrap_multimodal
from mmpeft.errors import MmpeftStateError
from tests.tiny_models import tiny_timm_vit

MODS = ("optical", "dsm")

ACCESSORS: dict[str, Callable[[MultimodalModel, Path], Any]] = {
    "count_adapter_parameters": lambda w, _: w.count_adapter_parameters("b"),
    "count_adapter_parameters()": lambda w, _: w.count_adapter_parameters(),
    "trainable_state_dict": lambda w, _: w.trainable_state_dict(),
    "trainable_state_dict(b)": lambda w, _: w.trainable_state_dict(adapter_name="b"),
    "load_trainable_state_dict": lambda w, _: w.load_trainable_state_dict({}, strict=False),
    "trainable_names": lambda w, _: w.trainable_names(),
    "trainable_tensors": lambda w, _: w.trainable_tensors(),
    "unsaved_trainables": lambda w, _: w.unsaved_trainables(),
    "get_nb_trainable_parameters": lambda w, _: w.get_nb_trainable_parameters(),
    "print_trainable_parameters": lambda w, _: w.print_trainable_parameters(),
    "layers": lambda w, _: list(w.layers()),
    "modules_to_save": lambda w, _: list(w.modules_to_save()),
    "adapter_status": lambda w, _: w.adapter_status(),
    "set_adapter": lambda w, _: w.set_adapter("b"),
    "add_adapter": lambda w, _: w.add_adapter("c", "lora", targets=["fc2"]),
    "delete_adapter": lambda w, _: w.delete_adapter("b"),
    "set_execution": lambda w, _: w.set_execution("loop"),
    "set_adapters_enabled": lambda w, _: w.set_adapters_enabled(False),
    "disable_adapters": lambda w, _: w.disable_adapters().__enter__(),
    "disable_adapter": lambda w, _: w.disable_adapter().__enter__(),
    "only_modality": lambda w, _: w.only_modality("dsm").__enter__(),
    "get_base_model": lambda w, _: w.get_base_model(),
    "peft_config": lambda w, _: w.peft_config,
    "active_peft_config": lambda w, _: w.active_peft_config,
    "merge_adapter": lambda w, _: w.merge_adapter(),
    "unmerge_adapter": lambda w, _: w.unmerge_adapter(),
    "save_pretrained": lambda w, d: w.save_pretrained(d / "saved"),
    "hotswap_adapter": lambda w, d: w.hotswap_adapter(d, "b"),
    "to": lambda w, _: w.to(torch.float64),
    "forward with adapter_names": lambda w, _: w(
        {"optical": torch.rand(1, 3, 32, 32), "dsm": torch.rand(1, 1, 32, 32)}, adapter_names=["b"]
    ),
}


def _wrapped() -> MultimodalModel:
    w = wrap_multimodal(tiny_timm_vit(), MODS, preset="lora")
    w.add_adapter("b", "lora", targets=["fc1"], fusion="none")
    return w.eval()


@pytest.mark.parametrize("how", ["unload()", "merge_and_unload('dsm', inplace=True)"])
def test_every_accessor_of_an_unloaded_wrapper_refuses_naming_the_call(how: str, tmp_path: Path) -> None:
    w = _wrapped()
    w.save_pretrained(tmp_path)
    plain = w.unload() if how == "unload()" else w.merge_and_unload("dsm", inplace=True)
    weights = {k: v.clone() for k, v in plain.state_dict().items()}
    answered = []
    for name, call in ACCESSORS.items():
        try:
            call(w, tmp_path)
            answered.append(name)
        except MmpeftStateError as e:
            assert how.replace("(", "").replace(")", "")[:10] in str(e).replace("(", "").replace(")", ""), (name, e)
    assert answered == []
    assert w.status() == {"unloaded": how}  # status says what happened, and only that
    assert not (tmp_path / "saved").exists()
    assert all(torch.equal(v, weights[k]) and v.dtype == weights[k].dtype for k, v in plain.state_dict().items())


def test_the_counts_before_unloading_are_the_sets() -> None:
    """The numbers the accessors gave before unloading (the refusal replaces a wrong answer)."""
    w = _wrapped()
    assert w.count_adapter_parameters("b").trainable == w.adapter_status()["adapters"]["b"]["trainable"] > 0
    assert w.trainable_state_dict()
