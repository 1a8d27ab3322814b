"""MFNet's speed switches: the bf16 frozen base trains without autocast, compile per device."""

from __future__ import annotations

import pytest
import torch

from mmpeft_isprs.model import build_mfnet
from mmpeft_isprs.model.config import MFNetConfig
from tests.helpers import assert_close

TINY = dict(backbone="vit_tiny", embed_dim=32, depth=2, num_heads=2, img_size=64)


def _batch() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = {"optical": torch.rand(2, 3, 64, 64, generator=g), "dsm": torch.rand(2, 1, 64, 64, generator=g)}
    return x, torch.randint(0, 6, (2, 64, 64), generator=g)


@pytest.mark.parametrize("method", ["adapter", "lora"])
def test_bf16_base_trains_without_autocast(method: str) -> None:
    torch.manual_seed(0)
    ref = build_mfnet(**TINY, method=method).train()
    torch.manual_seed(0)
    model = build_mfnet(**TINY, method=method, base_dtype="bf16").train()
    assert model.encoder.compute_dtype == torch.bfloat16
    x, y = _batch()
    with torch.no_grad():
        a, b = ref.eval()(x), model.eval()(x)  # eval: no dropout, BatchNorm's running statistics
    model.train()
    assert b.dtype == torch.float32  # the DFM and decoder run in float32 on the bf16 encoder's maps
    assert_close(a, b, rel=0.05)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, foreach=True)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert all(v.dtype == torch.float32 for v in model.trainable_state_dict().values() if v.is_floating_point())


def test_compile_switch() -> None:
    model = build_mfnet(**TINY, compile="auto")
    assert model.compile_for(torch.device("cpu")) == []  # auto: compiled on CUDA only
    assert build_mfnet(**TINY, compile="none").compile_for(torch.device("cuda")) == []
    with pytest.raises(ValueError, match="compile must be one of"):
        MFNetConfig(**TINY, compile="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown dtype"):
        MFNetConfig(**TINY, base_dtype="half-ish")
    with pytest.raises(ValueError, match="efficient_attention must be"):
        MFNetConfig(**TINY, efficient_attention="some")  # type: ignore[arg-type]


def test_compile_modes_resolve() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert build_mfnet(**TINY).compile_mode(cuda) == "blocks"
    assert build_mfnet(**TINY).compile_mode(cpu) == "none"
    model = build_mfnet(**TINY, compile="model")
    assert model.compile_for(cpu) == []  # nothing compiled in place
    assert model.compiled(model, cpu) is not model  # the whole forward, compiled lazily
    blocks = build_mfnet(**TINY, compile="blocks")
    assert blocks.compile_for(cpu) == ["blocks.0", "blocks.1"]
    assert blocks.compiled(blocks, cpu) is blocks
