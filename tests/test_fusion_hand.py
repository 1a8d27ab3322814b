"""Hand-computed outputs of tiny multimodal layers with known weights and lambdas."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmpeft import MultimodalAdapter, MultimodalLoRA
from tests.helpers import close

W = [[1.0, 2.0], [3.0, 4.0]]
BIAS = [0.5, -1.0]


def _linear() -> nn.Linear:
    lin = nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(W))
        lin.bias.copy_(torch.tensor(BIAS))
    return lin


def _base(x: list[float]) -> list[float]:
    return [W[0][0] * x[0] + W[0][1] * x[1] + BIAS[0], W[1][0] * x[0] + W[1][1] * x[1] + BIAS[1]]


# per modality: A (1x2), B (2x1), lambda, input (one token)
LORA = {
    "a": ([1.0, -1.0], [2.0, 1.0], 0.8, [1.0, 2.0]),
    "b": ([0.5, 0.5], [-1.0, 3.0], 0.3, [2.0, 0.0]),
    "c": ([0.0, 2.0], [1.0, 1.0], 0.6, [-1.0, 1.0]),
}


def _lora_delta(m: str, scaling: float) -> list[float]:
    a, b, _, x = LORA[m]
    h = a[0] * x[0] + a[1] * x[1]
    return [scaling * b[0] * h, scaling * b[1] * h]


@pytest.mark.parametrize("mods", [("a", "b"), ("a", "b", "c")])
@pytest.mark.parametrize("execution", ["batched", "loop"])
def test_lora_scalar_fusion_by_hand(mods: tuple[str, ...], execution: str) -> None:
    scaling = 0.5
    layer = MultimodalLoRA(_linear(), mods, rank=1, alpha=0.5, fusion="scalar")
    layer.execution = execution  # type: ignore[assignment]
    with torch.no_grad():
        for m in mods:
            layer.lora_A[m].weight.copy_(torch.tensor([LORA[m][0]]))
            layer.lora_B[m].weight.copy_(torch.tensor([[LORA[m][1][0]], [LORA[m][1][1]]]))
            layer.lora_fusion.lam[m].fill_(LORA[m][2])
    x = torch.tensor([LORA[m][3] for m in mods])  # (M*B, 2) with B = 1
    out = layer(x)
    d = {m: _lora_delta(m, scaling) for m in mods}
    for i, m in enumerate(mods):
        lam = LORA[m][2]
        others = [k for k in mods if k != m]
        mean_o = [sum(d[k][j] for k in others) / len(others) for j in range(2)]
        expect = [_base(LORA[m][3])[j] + lam * d[m][j] + (1 - lam) * mean_o[j] for j in range(2)]
        assert out[i].tolist() == pytest.approx(expect, abs=1e-6)


def test_lora_two_modalities_is_eq_9_10() -> None:
    """M = 2 by hand: out_x = W x + l1 B_x A_x x + (1 - l1) B_y A_y y (eqs. 9-12, unscaled)."""
    layer = MultimodalLoRA(_linear(), ("x", "y"), rank=1, fusion="scalar")
    with torch.no_grad():
        layer.lora_A["x"].weight.copy_(torch.tensor([[1.0, 0.0]]))
        layer.lora_B["x"].weight.copy_(torch.tensor([[1.0], [2.0]]))
        layer.lora_A["y"].weight.copy_(torch.tensor([[0.0, 1.0]]))
        layer.lora_B["y"].weight.copy_(torch.tensor([[3.0], [-1.0]]))
        layer.lora_fusion.lam["x"].fill_(0.25)
        layer.lora_fusion.lam["y"].fill_(2.0)  # unconstrained
    out = layer(torch.tensor([[1.0, 1.0], [2.0, 3.0]]))
    # x = (1, 1): W x + b = (3.5, 6); d_x = B_x (1) = (1, 2); y = (2, 3): d_y = B_y (3) = (9, -3)
    assert out[0].tolist() == pytest.approx([3.5 + 0.25 * 1 + 0.75 * 9, 6 + 0.25 * 2 + 0.75 * -3], abs=1e-6)
    # W y + b = (8.5, 17); out_y = W y + 2 d_y - 1 d_x
    assert out[1].tolist() == pytest.approx([8.5 + 2 * 9 - 1, 17 + 2 * -3 - 2], abs=1e-6)


def test_lora_slices_touch_only_their_outputs() -> None:
    base = nn.Linear(2, 6)
    layer = MultimodalLoRA(base, ("x", "y"), rank=1, slices={"q": (0, 2), "v": (4, 6)}, fusion="none")
    with torch.no_grad():
        for m in ("x", "y"):
            for s in ("q", "v"):
                layer.lora_A[m][s].weight.fill_(1.0)
                layer.lora_B[m][s].weight.fill_(2.0 if s == "q" else -1.0)
    x = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    out, ref = layer(x), base(x)
    h = x.sum(1, keepdim=True)  # A x with A = (1, 1)
    assert close(out[:, 0:2], ref[:, 0:2] + 2 * h, rel=1e-5)
    assert torch.equal(out[:, 2:4], ref[:, 2:4])  # k untouched
    assert close(out[:, 4:6], ref[:, 4:6] - h, rel=1e-5)


ADAPTER = {  # down (1x2), down bias, up (2x1), up bias, lambda, input
    "a": ([1.0, 2.0], 0.5, [1.0, -1.0], [0.1, 0.2], 0.7, [1.0, -2.0]),
    "b": ([-1.0, 1.0], 0.0, [2.0, 0.5], [0.0, -0.3], 0.4, [0.5, 1.5]),
    "c": ([0.5, 0.5], -1.0, [1.0, 1.0], [1.0, 0.0], 0.9, [3.0, 1.0]),
}


def _relu_adapter(m: str, z: list[float]) -> list[float]:
    down, bd, up, bu, _, _ = ADAPTER[m]
    h = max(0.0, down[0] * z[0] + down[1] * z[1] + bd)
    return [up[0] * h + bu[0], up[1] * h + bu[1]]


@pytest.mark.parametrize("mods", [("a", "b"), ("a", "b", "c")])
@pytest.mark.parametrize("placement", ["beside", "after"])
@pytest.mark.parametrize("execution", ["batched", "loop"])
def test_adapter_scalar_fusion_by_hand(mods: tuple[str, ...], placement: str, execution: str) -> None:
    layer = MultimodalAdapter(
        _linear(),
        mods,
        in_features=2,
        hidden=1,
        placement=placement,
        activation=nn.ReLU,
        init="default",  # type: ignore[arg-type]
    )
    layer.execution = execution  # type: ignore[assignment]
    with torch.no_grad():
        for m in mods:
            down, bd, up, bu, lam, _ = ADAPTER[m]
            layer.adapter_down[m].weight.copy_(torch.tensor([down]))
            layer.adapter_down[m].bias.fill_(bd)
            layer.adapter_up[m].weight.copy_(torch.tensor([[up[0]], [up[1]]]))
            layer.adapter_up[m].bias.copy_(torch.tensor(bu))
            layer.adapter_fusion.lam[m].fill_(lam)
    out = layer(torch.tensor([ADAPTER[m][5] for m in mods]))
    base = {m: _base(ADAPTER[m][5]) for m in mods}
    z = {m: (ADAPTER[m][5] if placement == "beside" else base[m]) for m in mods}
    d = {m: _relu_adapter(m, z[m]) for m in mods}
    for i, m in enumerate(mods):
        lam = ADAPTER[m][4]
        others = [k for k in mods if k != m]
        mean_o = [sum(d[k][j] for k in others) / len(others) for j in range(2)]
        expect = [base[m][j] + lam * d[m][j] + (1 - lam) * mean_o[j] for j in range(2)]
        assert out[i].tolist() == pytest.approx(expect, rel=1e-6, abs=1e-6)  # float32 rounding


def test_fusion_none_and_single_modality_have_no_lambda() -> None:
    assert not [n for n, _ in MultimodalLoRA(_linear(), ("a", "b"), fusion="none").named_parameters() if "lam" in n]
    single = MultimodalLoRA(_linear(), ("a",), fusion="scalar")
    assert not [n for n, _ in single.named_parameters() if "lam" in n]
    x = torch.tensor([[1.0, 2.0]])
    assert torch.equal(single(x), single.base_layer(x))  # B = 0 at init


def test_matrix_fusion_starts_as_scalar() -> None:
    from mmpeft.tuners.fusion import MatrixFusion, ScalarFusion

    d = torch.randn(3, 5, 4)
    assert close(MatrixFusion("abc", init=0.3)(d), ScalarFusion("abc", init=0.3)(d), rel=1e-5)


def test_single_modality_rules_are_identity_and_parameter_free() -> None:
    from mmpeft.tuners.fusion import build_fusion

    d = torch.randn(1, 3, 4)
    for rule in ("none", "scalar", "matrix"):
        f = build_fusion(rule, ["only"])
        assert not list(f.parameters()) and torch.equal(f(d), d)


def test_custom_nonlinear_fusion_batched_equals_loop() -> None:
    """A registered rule that is not a linear map takes the generic path; both paths agree."""
    from mmpeft.tuners.fusion import Fusion, register_fusion

    class TanhSum(Fusion):  # out_m = tanh(sum_k d_k): not linear
        def forward(self, d: torch.Tensor) -> torch.Tensor:
            return torch.tanh(d.sum(0, keepdim=True)).expand_as(d)

    register_fusion("tanh_sum", lambda modalities, init=0.5, device=None: TanhSum(modalities))
    torch.manual_seed(0)
    layer = MultimodalLoRA(nn.Linear(6, 9), ("a", "b"), rank=2, slices={"q": (0, 3), "v": (6, 9)}, fusion="tanh_sum")
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    x = torch.randn(4, 6)
    batched = layer(x)
    layer.execution = "loop"
    assert close(batched, layer(x), rel=1e-5)
