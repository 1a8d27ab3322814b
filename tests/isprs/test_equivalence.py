"""Every speed/memory switch leaves the maths unchanged (fp32, to 1e-5)."""

from __future__ import annotations

import re

import pytest
import torch

from mmpeft_isprs.model import build_mfnet
from tests.helpers import assert_close, close, grad_scale

TINY = dict(backbone="vit_tiny", embed_dim=32, depth=2, num_heads=2, img_size=128)


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = {"optical": torch.rand(2, 3, 128, 128, generator=g), "dsm": torch.rand(2, 1, 128, 128, generator=g)}
    return x, torch.randint(0, 6, (2, 128, 128), generator=g)


def _perturb(model: torch.nn.Module) -> None:
    """Non-trivial trainable values (LoRA B and zero-init adapters start at 0)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _n, p in model.encoder.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)


def _loss_and_grads(model: torch.nn.Module, x, y) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # same dropout mask in the decoder head
    out = model(x)
    torch.nn.functional.cross_entropy(out, y).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _twins(**kw):
    torch.manual_seed(0)
    a = build_mfnet(**TINY, **kw.pop("a", {}), **kw)
    torch.manual_seed(0)
    b = build_mfnet(**TINY, **kw.pop("b", {}), **kw)
    return a, b


@pytest.mark.parametrize("method", ["adapter", "lora"])
@pytest.mark.parametrize("switch", ["execution", "grad_checkpointing"])
def test_switches_keep_outputs_and_gradients(method: str, switch: str) -> None:
    """Outputs agree in fp32 to 1e-5; gradients (sums over many pixels, amplified by the train-mode
    BatchNorms) are compared in fp64, where rounding differences vanish."""
    torch.manual_seed(0)
    plain = build_mfnet(**TINY, method=method).train()
    _perturb(plain)
    other_kw = {"execution": "per_modality"} if switch == "execution" else {"grad_checkpointing": True}
    other = build_mfnet(**TINY, method=method, **other_kw).train()
    other.load_state_dict(plain.state_dict())
    x, y = _data()
    out_a, _ = _loss_and_grads(plain, x, y)
    out_b, _ = _loss_and_grads(other, x, y)
    assert close(out_a, out_b, rel=1e-5)
    plain.load_state_dict(other.state_dict())  # undo the BN running-stat updates of the first pass
    plain.double(), other.double()
    x64 = {k: v.double() for k, v in x.items()}
    _, g_a = _loss_and_grads(plain, x64, y)
    _, g_b = _loss_and_grads(other, x64, y)
    assert g_a.keys() == g_b.keys() and len(g_a) > 0
    scale = grad_scale(g_a, g_b)  # some gradients are rounding noise (1e-20): compare to the largest
    for n in g_a:
        assert_close(g_a[n], g_b[n], rel=1e-9, scale=scale, msg=n)


@pytest.mark.parametrize("method", ["adapter", "lora"])
def test_fused_attention_timm_equals_segment_anything(method: str) -> None:
    torch.manual_seed(0)
    timm_model = build_mfnet(**TINY, method=method, impl="timm").eval()
    _perturb(timm_model)
    sam_model = build_mfnet(**TINY, method=method, impl="segment_anything").eval()
    rename = lambda k: re.sub(r"(mlp\.(?:base_layer\.)?)fc([12])", r"\1lin\2", k) if k.startswith("encoder.") else k  # noqa: E731
    state = {rename(k): v for k, v in timm_model.state_dict().items()}
    sam_model.load_state_dict(state)
    x, _ = _data(1)
    with torch.no_grad():
        assert close(timm_model(x), sam_model(x), rel=1e-5)


def test_batched_sliding_windows_equal_one_by_one() -> None:
    from mmpeft_isprs.inference import sliding_window_predict

    torch.manual_seed(0)
    model = build_mfnet(**TINY, method="lora").eval()
    g = torch.Generator().manual_seed(2)
    tile = {"optical": torch.rand(3, 200, 300, generator=g), "dsm": torch.rand(1, 200, 300, generator=g)}
    with torch.no_grad():
        one = sliding_window_predict(model, tile, 6, window=128, stride=64, batch_size=1)
        many = sliding_window_predict(model, tile, 6, window=128, stride=64, batch_size=8)
    assert close(one, many, rel=1e-5)
