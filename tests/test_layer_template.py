"""One layer template: ``MultimodalLayer.forward`` is the only dispatch, each method supplies its
steps under the same names; a LoRA layer's factors (``factors(modality)``) are the public read of
its slice layout, and they add up to its update."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmpeft.tuners import MultimodalAdapter, MultimodalLayer, MultimodalLoRA, MultimodalLoRAConv2d, only_modality
from tests.helpers import assert_close, randomise_trainables

LAYERS = (MultimodalLoRA, MultimodalLoRAConv2d, MultimodalAdapter)
STEPS = ("_forward_one", "_forward_loop", "_forward_batched")


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_every_layer_supplies_the_steps_of_the_one_dispatch(cls: type[MultimodalLayer]) -> None:
    """No layer writes the dispatch again (the conv layer only checks its input's rank before it)."""
    for step in STEPS:
        assert getattr(cls, step) is not getattr(MultimodalLayer, step), f"{cls.__name__} lacks {step}"
    assert cls.forward is MultimodalLayer.forward or cls is MultimodalLoRAConv2d
    for name in ("_forward_single", "_shared_forward"):
        assert not hasattr(cls, name), f"{cls.__name__}.{name}: one name per step"


def test_the_adapter_keeps_its_extra_arguments_and_keyword_input() -> None:
    """The base module's extra arguments reach it in every case of the dispatch, and x may come by keyword."""

    class Scaled(nn.Module):
        def forward(self, hidden: torch.Tensor, factor: float = 1.0, *, shift: float = 0.0) -> tuple:
            return hidden * factor + shift, "rest"

    ad = randomise_trainables(MultimodalAdapter(Scaled(), ("a", "b"), in_features=4, hidden=2, fusion="none"))
    x = torch.randn(6, 3, 4)
    with torch.no_grad():
        batched = ad(hidden=x, factor=2.0, shift=1.0)
        ad.execution = "loop"
        loop = ad(x, 2.0, shift=1.0)
        with only_modality(ad, "b"):
            one = ad(x[3:], 2.0, shift=1.0)
        ad.enable_adapters(False)
        off = ad(x, 2.0, shift=1.0)
    assert batched[1] == loop[1] == one[1] == off[1] == "rest"
    assert_close(loop[0], batched[0])
    assert_close(one[0], batched[0][3:])
    assert torch.equal(off[0], x * 2.0 + 1.0)
    assert not torch.equal(batched[0], off[0])


def _update_from_factors(layer: MultimodalLoRA, modality: str) -> torch.Tensor:
    delta = torch.zeros(layer.out_features, layer.in_features)
    for f in layer.factors(modality):
        d = f.lora_B.weight.float() @ f.lora_A.weight.float()
        if f.offset is not None:
            d = d - f.offset[1].float() @ f.offset[0].float()
        delta[f.rows] += layer.scaling * d
    return delta


@pytest.mark.parametrize("init", ["kaiming", "pissa"])
def test_lora_factors_add_up_to_the_update(init: str) -> None:
    """Sliced q / v rows of a fused qkv, with PiSSA's offset: the factors' rows and pairs give get_delta_weight."""
    torch.manual_seed(0)
    slices = {"q": (0, 4), "v": (8, 12)}
    layer = MultimodalLoRA(nn.Linear(4, 12), ("a", "b"), rank=2, alpha=4.0, slices=slices, init_lora_weights=init)
    randomise_trainables(layer)
    factors = layer.factors("b")
    assert [(f.name, f.rows) for f in factors] == [("q", slice(0, 4)), ("v", slice(8, 12))]
    assert all((f.offset is not None) == (init == "pissa") for f in factors)
    assert factors[1].lora_B is layer.lora_B["b"]["v"]  # the modules themselves (combination writes them)
    with torch.no_grad():
        assert_close(_update_from_factors(layer, "b"), layer.get_delta_weight("b"))
        assert not torch.equal(layer.get_delta_weight("a"), layer.get_delta_weight("b"))
    with pytest.raises(KeyError, match="unknown modality"):
        layer.factors("c")


def test_conv_lora_factors_are_one_pair_over_every_channel() -> None:
    layer = randomise_trainables(MultimodalLoRAConv2d(nn.Conv2d(3, 5, 2), ("a", "b"), rank=2))
    (f,) = layer.factors("a")
    assert (f.name, f.rows, f.offset) == ("all", slice(0, 5), None)
    assert f.lora_A is layer.lora_A["a"] and f.lora_B is layer.lora_B["a"]
    with torch.no_grad():
        delta = torch.einsum("or,rikl->oikl", f.lora_B.weight.flatten(1), f.lora_A.weight) * layer.scaling
        assert_close(delta, layer.get_delta_weight("a"))
