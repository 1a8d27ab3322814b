"""Per-modality low-rank products as single autograd nodes (the hot path of the batched layers).

A multimodal layer's update is small maths spread over many small tensors: one down and one up
weight (and bias) per modality, per output slice, and an (M, M) mixing matrix. Written with
ordinary tensor ops, autograd records every stack, cast, transpose, permute and reshape and
replays each of them backwards: 60-110 operator calls per layer and step (forward + backward)
against 9 for the frozen linear layer alone, and on a GPU each call is a kernel launch or at
least a dispatch (docs/design.md has the counts). The two
functions below do the same maths as one autograd node each, with hand-written backward passes
(tested against autograd in float64, ``tests/test_lowrank.py``):

- :func:`stacked_linear`: ``h[m] = x[m] @ W_m^T (+ b_m)`` for M modalities at once, the
  weights given as the separate per-modality parameters (they keep their names and state-dict
  keys), stacked inside the node and split again in its backward;
- :func:`mixed_up`: ``out[m] = base[m] + sum_k W[m, k] (h[k] @ U_k^T + b_k)``, the up
  projection and the cross-modal mixing as one GEMM of inner size M*K (the products
  ``h[k] @ U_k^T`` never exist), scattered into output column ranges (e.g. the q and v thirds
  of a fused qkv).

Both follow autocast: they compute in the autocast dtype where it is on (the weights, float32
masters, are cast inside the node) and return float32 gradients to float32 parameters. They are
differentiable once (no double backward).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import MmpeftValueError

__all__ = ["stacked_linear", "mixed_up", "Slice"]

#: (out_lo, out_hi, k_lo, k_hi): the output columns a slice writes and the columns of h it reads.
Slice = tuple[int, int, int, int]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the node computes in: autocast's where it is on for x's device, else x's."""
    dev = x.device.type
    if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _no_autocast(x: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
    """Autocast off inside the node (it casts explicitly); nothing where the device has none."""
    dev = x.device.type
    return torch.autocast(dev, enabled=False) if torch.amp.is_autocast_available(dev) else contextlib.nullcontext()


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _scaled(t: torch.Tensor, scale: float) -> torch.Tensor:
    return t if scale == 1.0 else t * scale


class _StackedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, m: int, n_weights: int, *params: torch.Tensor) -> torch.Tensor:
        dt = _compute_dtype(x)
        ws, bs = params[:n_weights], params[n_weights:]
        w = _cast(torch.cat(ws, 0), dt).view(m, -1, ws[0].shape[1])  # (M, K, in)
        xc = _cast(x, dt).reshape(m, -1, x.shape[-1])  # (M, T, in)
        with _no_autocast(x):
            if bs:
                b = _cast(torch.cat(bs, 0), dt).view(m, 1, -1)  # (M, 1, K)
                h = torch.baddbmm(b, xc, w.transpose(1, 2))
            else:
                h = torch.bmm(xc, w.transpose(1, 2))
        ctx.save_for_backward(xc, w)
        ctx.meta = ([p.shape[0] for p in ws], len(bs), x.shape)
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dh: torch.Tensor) -> tuple[Any, ...]:
        xc, w = ctx.saved_tensors
        sizes, n_bias, x_shape = ctx.meta
        dh = _cast(dh, w.dtype)
        dx = torch.bmm(dh, w).view(x_shape) if ctx.needs_input_grad[0] else None
        dw = torch.bmm(dh.transpose(1, 2), xc).view(-1, w.shape[2]).split(sizes, 0)
        db = dh.sum(1).view(-1).split(sizes, 0) if n_bias else ()
        return (dx, None, None, *dw, *db)


def stacked_linear(
    x: torch.Tensor, m: int, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor] | None = None
) -> torch.Tensor:
    """``h[i] = x_i @ cat(W_i)^T + cat(b_i)`` for ``m`` stacked modalities, as one autograd node.

    x: (M*B', ..., in), stacked modality-major (``x_i``: the i-th of M equal chunks of dim 0).
    weights: M * P tensors, modality-major, P pieces (k_p, in) per modality concatenated along
    the output (e.g. the A's of a LoRA's slices); biases: none, or one (k_p,) per weight.
    Returns (M, T, K): T = the tokens of one modality, K = sum of the k_p of one modality.
    """
    if x.shape[0] % m or len(weights) % m:
        raise MmpeftValueError(f"{len(weights)} weights and a batch of {x.shape[0]} do not split over {m} modalities")
    if biases is not None and len(biases) != len(weights):
        raise MmpeftValueError(f"{len(biases)} biases for {len(weights)} weights")
    return _StackedLinear.apply(x, m, len(weights), *weights, *(biases or ()))


class _MixedUp(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        base: torch.Tensor,
        h: torch.Tensor,
        w: torch.Tensor | None,
        scale: float,
        slices: tuple[Slice, ...],
        n_up: int,
        *params: torch.Tensor,
    ) -> torch.Tensor:
        m, t, k = h.shape
        n_out = base.shape[-1]
        dt = _compute_dtype(h)
        ups, bs = params[:n_up], params[n_up:]
        whole = len(slices) == 1 and slices[0] == (0, n_out, 0, k)
        hc = _cast(h, dt)
        b = _cast(torch.stack(bs), dt) if bs else None  # (M, out)
        flat = _cast(base, dt).reshape(m * t, n_out)
        wc = g2 = None
        res = flat.new_empty(base.shape)  # the output in its own storage (a view would be refused)
        out = res.view(m, t, n_out)
        with _no_autocast(h):
            if w is None:  # identity: out_i = base_i + s (h_i @ U_i^T + b_i)
                u = _stacked_up(ups, slices, m, n_out, k, dt, whole)  # (M, out, K)
                torch.baddbmm(flat.view(m, t, n_out), hc, u.transpose(1, 2), alpha=scale, out=out)
                if b is not None:
                    out += _scaled(b, scale)[:, None]
            else:
                # G[i, t, j, c] = s W[i, j] h_j[t, c]: the mixed low-rank activations, (M*T, M*K)
                wc = _scaled(_cast(w, dt), scale)
                wr = wc[:, :, None].expand(m, m, k).reshape(m, 1, m * k)  # W[i, j] repeated over c
                g2 = (wr * hc.transpose(0, 1).reshape(1, t, m * k)).view(m * t, m * k)  # contiguous
                u = _side_by_side(ups, slices, m, n_out, k, dt, whole)  # (out, M*K), U_j in block j
                torch.addmm(flat, g2, u.t(), out=res.view(m * t, n_out))
                if b is not None:  # sum_j s W[i, j] b_j, one row per modality
                    out += (wc @ b)[:, None]
        ctx.save_for_backward(hc, wc, g2, u, b)
        ctx.meta = (slices, whole, scale, base.shape)
        return res

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[Any, ...]:
        hc, wc, g2, u, b = ctx.saved_tensors
        slices, whole, scale, base_shape = ctx.meta
        m, t, k = hc.shape
        n_out = base_shape[-1]
        d3 = _cast(dout, hc.dtype).reshape(m, t, n_out)
        dsum = d3.sum(1) if b is not None else None  # (M, out)
        need_h = ctx.needs_input_grad[1]
        if wc is None:
            dh = _scaled(torch.bmm(d3, u), scale) if need_h else None
            du = _scaled(torch.bmm(d3.transpose(1, 2), hc), scale)  # (M, out, K) in one GEMM
            if whole:  # one contiguous piece per modality
                dups = list(du.unbind(0))
            else:  # modality-major pieces, one view per slice and modality
                per_slice = [du[:, lo:hi, c0:c1].unbind(0) for lo, hi, c0, c1 in slices]
                dups = [per_slice[j][i] for i in range(m) for j in range(len(slices))]
            dbs = list(_scaled(dsum, scale).unbind(0)) if dsum is not None else []
            return (dout, dh, None, None, None, None, *dups, *dbs)
        d2 = d3.reshape(m * t, n_out)
        dg = (d2 @ u).view(m, t, m, k)  # dL/dG
        # dh_j[t, c] = sum_i s W[i, j] dG[i, t, j, c];  dW[i, j] = s sum_{t,c} dG[i, t, j, c] h_j[t, c]
        dh = torch.einsum("ij,itjc->jtc", wc, dg) if need_h else None
        dwc = torch.einsum("itjc,jtc->ij", dg, hc)
        if dsum is not None:  # out_i += sum_j s W[i, j] b_j
            dwc = dwc + dsum @ b.t()
        dups = [d2[:, lo:hi].t() @ g2[:, i * k + c0 : i * k + c1] for i in range(m) for lo, hi, c0, c1 in slices]
        dbs = list((wc.t() @ dsum).unbind(0)) if dsum is not None else []
        return (dout, dh, _scaled(dwc, scale), None, None, None, *dups, *dbs)


def _stacked_up(
    ups: Sequence[torch.Tensor], slices: tuple[Slice, ...], m: int, n_out: int, k: int, dt: torch.dtype, whole: bool
) -> torch.Tensor:
    """(M, out, K): each modality's up weights in their output rows and h columns, zeros elsewhere."""
    if whole:
        return _cast(torch.stack(list(ups)), dt)
    u = torch.zeros(m, n_out, k, dtype=dt, device=ups[0].device)
    for j, (lo, hi, c0, c1) in enumerate(slices):  # one copy per slice, all modalities at once
        u[:, lo:hi, c0:c1] = torch.stack(list(ups[j :: len(slices)]))
    return u


def _side_by_side(
    ups: Sequence[torch.Tensor], slices: tuple[Slice, ...], m: int, n_out: int, k: int, dt: torch.dtype, whole: bool
) -> torch.Tensor:
    """(out, M*K): the modalities' up weights side by side (the column order of G)."""
    if whole:
        return _cast(torch.cat(list(ups), 1), dt)
    return _stacked_up(ups, slices, m, n_out, k, dt, whole).permute(1, 0, 2).reshape(n_out, m * k)


def mixed_up(
    base: torch.Tensor,
    h: torch.Tensor,
    w: torch.Tensor | None,
    ups: Sequence[torch.Tensor],
    slices: Sequence[Slice] | None = None,
    biases: Sequence[torch.Tensor] | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """``out_i = base_i + scale * sum_j W[i, j] (h_j @ U_j^T + b_j)`` as one autograd node.

    base: (M*B', ..., out) stacked modality-major; h: (M, T, K) (T = the tokens of one modality);
    w: (M, M) mixing weights, or None for the identity (each modality its own update); ups: M * S
    up weights, modality-major, one per slice: slice ``(lo, hi, c0, c1)`` adds
    ``h_j[..., c0:c1] @ U^T`` (U: (hi - lo, c1 - c0)) to the output columns ``lo:hi``; default one
    slice, the whole output from the whole of h. biases: none, or one (out,) per modality.
    Returns a new tensor shaped like ``base`` (``base`` is not modified).
    """
    m, t, k = h.shape
    n_out = base.shape[-1]
    sl = tuple(slices) if slices is not None else ((0, n_out, 0, k),)
    if base.numel() != m * t * n_out:
        raise MmpeftValueError(f"base {tuple(base.shape)} does not hold {m} modalities x {t} tokens x {n_out}")
    if len(ups) != m * len(sl):
        raise MmpeftValueError(f"{len(ups)} up weights for {m} modalities x {len(sl)} slices")
    if w is not None and w.shape != (m, m):
        raise MmpeftValueError(f"mixing weights must be ({m}, {m}), got {tuple(w.shape)}")
    return _MixedUp.apply(base, h, w, float(scale), sl, len(ups), *ups, *(biases or ()))
