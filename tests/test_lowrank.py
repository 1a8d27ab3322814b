"""The fused low-rank nodes (mmpeft.tuners.lowrank) against plain autograd: values and every gradient."""

from __future__ import annotations

import pytest
import torch

from mmpeft.tuners.lowrank import mixed_up, stacked_linear
from tests.helpers import assert_close


def _leaf(*shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype).requires_grad_(True)


def _ref_stacked(x, ws, bs, m):
    p = len(ws) // m
    outs = []
    for i in range(m):
        w = torch.cat(ws[i * p : (i + 1) * p], 0)
        h = x[i] @ w.t()
        if bs:
            h = h + torch.cat(bs[i * p : (i + 1) * p], 0)
        outs.append(h)
    return torch.stack(outs)


def _ref_mixed(base, h, w, ups, slices, bs, scale):
    m = h.shape[0]
    w = torch.eye(m, dtype=h.dtype) if w is None else w
    out = base.clone()
    for i in range(m):
        for k in range(m):
            for j, (lo, hi, c0, c1) in enumerate(slices):
                d = h[k][..., c0:c1] @ ups[k * len(slices) + j].t()
                if bs:
                    d = d + bs[k]
                pad = torch.zeros_like(out[i])
                pad[..., lo:hi] = d
                out[i] = out[i] + scale * w[i, k] * pad
    return out


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("pieces", [1, 2])
def test_stacked_linear_matches_autograd(bias: bool, pieces: int) -> None:
    torch.manual_seed(0)
    m, t, n_in = 3, 5, 4
    x = _leaf(m, t, n_in)
    ws = [_leaf(2 + j, n_in) for _ in range(m) for j in range(pieces)]
    bs = [_leaf(2 + j) for _ in range(m) for j in range(pieces)] if bias else None
    leaves = [x, *ws, *(bs or [])]
    got = stacked_linear(x, m, ws, bs)
    ref = _ref_stacked(x, ws, bs, m)
    assert_close(got, ref, rel=1e-5)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(got, leaves, g)
    refs = torch.autograd.grad(ref, leaves, g)
    for a, b in zip(grads, refs):
        assert_close(a, b, rel=1e-5)
    assert torch.autograd.gradcheck(
        lambda *a: stacked_linear(a[0], m, a[1 : 1 + len(ws)], a[1 + len(ws) :] or None), leaves
    )


@pytest.mark.parametrize("mix", [True, False])
@pytest.mark.parametrize("case", ["whole", "whole+bias", "slices"])
def test_mixed_up_matches_autograd(case: str, mix: bool) -> None:
    """Mixing weights (M, M) or the identity (None), a scale, biases, output slices."""
    torch.manual_seed(1)
    m, t, k, n_out, scale = 2, 6, 4, 9, 0.5
    bias = case.endswith("bias")
    slices = [(0, 3, 0, 2), (6, 9, 2, 4)] if case == "slices" else [(0, n_out, 0, k)]
    base, h = _leaf(m, t, n_out), _leaf(m, t, k)
    w = _leaf(m, m) if mix else None
    ups = [_leaf(hi - lo, c1 - c0) for _ in range(m) for lo, hi, c0, c1 in slices]
    bs = [_leaf(n_out) for _ in range(m)] if bias else None
    leaves = [base, h, *([w] if mix else []), *ups, *(bs or [])]
    got = mixed_up(base, h, w, ups, slices if case == "slices" else None, bs, scale=scale)
    ref = _ref_mixed(base, h, w, ups, slices, bs, scale)
    assert_close(got, ref, rel=1e-5)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(got, leaves, g), torch.autograd.grad(ref, leaves, g)):
        assert_close(a, b, rel=1e-5)
    n, o = len(ups), 3 if mix else 2

    def fn(*a: torch.Tensor) -> torch.Tensor:
        return mixed_up(a[0], a[1], a[2] if mix else None, a[o : o + n], slices, a[o + n :] or None, scale=scale)

    assert torch.autograd.gradcheck(fn, leaves)


def test_nodes_follow_autocast_with_float32_gradients() -> None:
    """Under bf16 autocast the nodes compute in bf16 and return float32 gradients to float32
    parameters; results match the float32 computation within bf16 precision."""
    torch.manual_seed(2)
    m, t, n_in, k = 2, 64, 16, 8
    x = torch.randn(m, t, n_in)
    ws = [torch.randn(k, n_in, requires_grad=True) for _ in range(m)]
    ups = [torch.randn(n_in, k, requires_grad=True) for _ in range(m)]
    w = torch.tensor([[0.6, 0.4], [0.3, 0.7]], requires_grad=True)

    def run() -> tuple[torch.Tensor, ...]:
        out = mixed_up(x, stacked_linear(x, m, ws), w, ups)
        return (out, *torch.autograd.grad(out.float().square().mean(), [*ws, *ups, w]))

    ref = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run()
    assert got[0].dtype == torch.bfloat16
    for a, b in zip(got, ref):
        assert a.shape == b.shape
        if a is not got[0]:
            assert a.dtype == torch.float32
        assert_close(a.float(), b, rel=3e-2)


def test_argument_errors_name_the_mismatch() -> None:
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="3 weights and a batch of 2 do not split over 2 modalities"):
        stacked_linear(x, 2, [torch.randn(2, 4)] * 3)
    with pytest.raises(ValueError, match="mixing weights must be"):
        mixed_up(torch.randn(2, 3, 5), torch.randn(2, 3, 2), torch.randn(3, 3), [torch.randn(5, 2)] * 2)
    with pytest.raises(ValueError, match="does not hold 2 modalities x 3 tokens x 5"):
        mixed_up(torch.randn(2, 4, 5), torch.randn(2, 3, 2), None, [torch.randn(5, 2)] * 2)
    with pytest.raises(ValueError, match="up weights for 2 modalities x 1 slices"):
        mixed_up(torch.randn(2, 3, 5), torch.randn(2, 3, 2), torch.randn(2, 2), [torch.randn(5, 2)])


def test_nodes_run_on_the_meta_device() -> None:
    """Shapes flow through on a device without autocast (models built on meta, then materialised)."""
    x = torch.empty(4, 3, 8, device="meta")
    ws = [torch.empty(2, 8, device="meta", requires_grad=True) for _ in range(2)]
    h = stacked_linear(x, 2, ws)
    out = mixed_up(x, h, None, [torch.empty(8, 2, device="meta") for _ in range(2)])
    assert h.shape == (2, 6, 2) and out.shape == x.shape and out.device.type == "meta"
