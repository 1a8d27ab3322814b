"""Fusion rules: how per-modality updates are mixed across modalities.

Every multimodal layer computes one update ``d_m`` per modality ``m`` (a LoRA product or an
adapter output), stacked modality-major as ``d: (M, ...)``. A fusion rule maps that stack to the
updates actually added to each modality's output. Rules are small modules so that new ones (a
learnable M x M matrix, gates, ...) can be added without touching the layers.

Registered rules:

- ``"none"``: ``out_m = d_m`` (standard per-modality LoRA / adapter; no parameters).
- ``"scalar"``: the paper's rule with one learnable scalar ``lambda_m`` per modality::

      out_m = lambda_m * d_m + (1 - lambda_m) * mean_{k != m} d_k

  For M = 2 this is exactly eqs. (5)-(6) and (9)-(10) of MFNet. For M = 1 there is nothing to mix,
  so the rule creates no parameter and acts as ``"none"``.
- ``"matrix"``: a learnable M x M mixing matrix, initialised to the ``"scalar"`` rule's matrix.

Missing modalities (docs/missing_modalities.md). With only a subset ``S`` of the modalities present
(for the whole batch, or per sample through a presence mask), a linear rule with matrix ``W`` mixes
with ``W^S`` (:func:`presence_weights`): the weight ``W[m, j]`` of every absent ``j`` is shared
equally among the present *other* modalities of ``m``, or goes to ``m`` itself when ``m`` is alone::

    W^S[m, k] = W[m, k] + [k != m] * A_m / (|S| - 1)     (|S| > 1),   A_m = sum_{j not in S} W[m, j]
    W^S[m, m] = W[m, m] + A_m                            (|S| = 1)
    W^S[m, k] = 0                                        (m or k not in S)

Row sums are preserved. For ``"scalar"`` this is ``lambda_m d_m + (1 - lambda_m) mean_{k in S, k != m} d_k``
and, alone, ``d_m``; for ``"none"`` the identity. An absent sample's update is zero (row ``m``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..errors import MmpeftTypeError, MmpeftValueError
from ..utils import register

__all__ = [
    "Fusion",
    "NoFusion",
    "ScalarFusion",
    "MatrixFusion",
    "FUSION_RULES",
    "build_fusion",
    "register_fusion",
    "presence_weights",
    "apply_mixing",
]


class Fusion(nn.Module):
    """Base class. ``forward(d)`` takes ``d: (M, ...)`` and returns the mixed ``(M, ...)``."""

    #: False when the rule is the identity (layers may then skip it entirely).
    mixes: bool = True
    #: True when the rule is a linear map given by :meth:`mixing_matrix` (layers may then mix
    #: in a cheaper space, e.g. LoRA's rank space, without materialising the updates).
    linear: bool = False

    def __init__(self, modalities: Sequence[str]) -> None:
        super().__init__()
        self.modalities = tuple(modalities)

    def mixing_matrix(self) -> torch.Tensor:
        """The (M, M) matrix W with ``out_m = sum_k W[m, k] * d_k``."""
        raise NotImplementedError

    def present_weights(self, present: Sequence[int] | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The mixing weights when only some modalities are present (:func:`presence_weights`).

        present: indices (in ``self.modalities``) of the modalities in the batch, ``S`` of them
        (None: all); mask: optional (S, B) per-sample presence of those modalities.
        Returns (S, S) without a mask, else (B, S, S) (one matrix per sample).
        """
        if not self.linear:
            raise NotImplementedError(
                f"fusion rule {type(self).__name__} is not linear; it must override present_weights to "
                "define what happens when modalities are absent"
            )
        m = len(self.modalities)
        idx = list(range(m)) if present is None else list(present)
        w = self.mixing_matrix()
        dev = w.device if mask is None else mask.device
        w = w.to(dev)
        if mask is None:
            p = torch.zeros(m, device=dev, dtype=w.dtype)
            p[idx] = 1.0
            return presence_weights(w, p)[idx][:, idx]
        p = torch.zeros(mask.shape[1], m, device=dev, dtype=w.dtype)  # (B, M)
        p[:, idx] = mask.t().to(w.dtype)
        return presence_weights(w, p)[:, idx][:, :, idx]

    def _check_updates(self, d: torch.Tensor) -> int:
        """M, after checking that ``d`` holds one update per modality on dim 0."""
        m = len(self.modalities)
        if d.shape[0] != m:
            raise MmpeftValueError(f"fusion expects {m} modality updates on dim 0, got shape {tuple(d.shape)}")
        return m

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        """d: (M, ...) per-modality updates -> (M, ...) mixed updates."""
        if not self.mixes:
            return d
        m = self._check_updates(d)
        w = self.mixing_matrix().to(d.dtype)  # (M, M)
        # (M, M) @ (M, rest) -> (M, rest)
        return (w @ d.reshape(m, -1)).reshape(d.shape)


class NoFusion(Fusion):
    """Identity: each modality keeps its own update (standard per-modality tuning)."""

    linear = True

    mixes = False

    def mixing_matrix(self) -> torch.Tensor:
        return torch.eye(len(self.modalities))

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        return d


class ScalarFusion(Fusion):
    """The paper's learnable-scalar mixing (eqs. 5-6, 9-10), generalised to M modalities.

    Parameters are ``lam.<modality>``, each of shape (1,), initialised to ``init``
    (0.5 in the paper), unconstrained.
    """

    _off: torch.Tensor  # buffers (M, M): off-diagonal ones and the identity minus them
    _diag: torch.Tensor

    linear = True

    def __init__(self, modalities: Sequence[str], init: float = 0.5, device: torch.device | None = None) -> None:
        super().__init__(modalities)
        m = len(self.modalities)
        self.mixes = m > 1
        self.lam = nn.ParameterDict()
        if self.mixes:
            for name in self.modalities:
                self.lam[name] = nn.Parameter(torch.full((1,), float(init), device=device))
            # W = off + lam[:, None] * (eye - off): the constant parts, built once (not saved)
            eye = torch.eye(m, device=device)
            off = (1.0 - eye) / (m - 1)  # mean over the other modalities
            self.register_buffer("_off", off, persistent=False)
            self.register_buffer("_diag", eye - off, persistent=False)

    def lambdas(self) -> torch.Tensor:
        """(M,) the current lambda values, in modality order."""
        return torch.cat([self.lam[n] for n in self.modalities])

    def mixing_matrix(self) -> torch.Tensor:
        if not self.mixes:
            return torch.eye(1)
        return torch.addcmul(self._off, self.lambdas()[:, None], self._diag)

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        if not self.mixes:
            return d
        m = self._check_updates(d)
        lam = self.lambdas().to(d.dtype).reshape((m,) + (1,) * (d.dim() - 1))  # (M, 1, ..)
        if m == 2:
            # eqs. (5)-(6): out_x = l1 * d_x + (1 - l1) * d_y ; out_y = l2 * d_y + (1 - l2) * d_x
            return lam * d + (1.0 - lam) * d.flip(0)
        others = (d.sum(0, keepdim=True) - d) / (m - 1)  # (M, ...) mean over k != m
        return lam * d + (1.0 - lam) * others


class MatrixFusion(Fusion):
    """A learnable (M, M) mixing matrix ``mix``, initialised like ``scalar`` with lambda = init.

    With one modality there is nothing to mix: no parameter, identity (as ``scalar``).
    """

    linear = True

    def __init__(self, modalities: Sequence[str], init: float = 0.5, device: torch.device | None = None) -> None:
        super().__init__(modalities)
        m = len(self.modalities)
        self.mixes = m > 1
        if self.mixes:
            eye = torch.eye(m, device=device)
            off = (1.0 - eye) / (m - 1)
            self.mix = nn.Parameter(init * eye + (1.0 - init) * off)

    def mixing_matrix(self) -> torch.Tensor:
        return self.mix if self.mixes else torch.eye(1)


FusionFactory = Callable[..., Fusion]
FUSION_RULES: dict[str, FusionFactory] = {}


def register_fusion(name: str, factory: FusionFactory, *, replace: bool = False) -> FusionFactory:
    """Register the fusion rule ``name``: ``factory(modalities, init=..., device=...) -> Fusion``,
    returned; a name taken by another factory is an error naming it unless ``replace=True``
    (:func:`mmpeft.utils.register`)."""
    if not callable(factory):
        raise MmpeftTypeError(f"fusion rule {name!r}: the factory must be callable, got {factory!r}")
    return register(FUSION_RULES, name, factory, kind="fusion rule", replace=replace)


def _no_fusion(modalities: Sequence[str], init: float = 0.5, device: torch.device | None = None) -> Fusion:
    return NoFusion(modalities)


register_fusion("none", _no_fusion)
register_fusion("scalar", ScalarFusion)
register_fusion("matrix", MatrixFusion)


def build_fusion(rule: str, modalities: Sequence[str], init: float = 0.5, device: torch.device | None = None) -> Fusion:
    """Instantiate the fusion rule named ``rule`` for ``modalities``."""
    if rule not in FUSION_RULES:
        raise MmpeftValueError(f"unknown fusion rule {rule!r}; known rules: {sorted(FUSION_RULES)}")
    return FUSION_RULES[rule](modalities, init=init, device=device)


def presence_weights(w: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The mixing matrix ``w`` (M, M) restricted to the present modalities ``p`` (..., M) in {0, 1}.

    Returns (..., M, M): ``W^S`` of the module docstring (absent weight shared equally among the
    present other modalities, onto the diagonal when alone; rows and columns of absent modalities zero).
    """
    m = w.shape[0]
    eye = torch.eye(m, device=w.device, dtype=w.dtype)
    absent = (w * (1.0 - p)[..., None, :]).sum(-1)  # (..., M): A_m = sum_{j absent} W[m, j]
    others = p.sum(-1, keepdim=True) - p  # (..., M): present modalities other than m
    share = torch.where(others > 0, 1.0 / others.clamp(min=1.0), torch.zeros_like(others))  # (..., M)
    alone = (others == 0).to(w.dtype)  # (..., M)
    add = absent[..., :, None] * (share[..., :, None] * (1.0 - eye) * p[..., None, :] + alone[..., :, None] * eye)
    return (w + add) * p[..., :, None] * p[..., None, :]


def apply_mixing(w: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Mix stacked updates d: (S, B', ...) with w: (S, S), or per sample with w: (B, S, S) (B' a
    multiple of B, each sample's rows contiguous: windows are batch-major)."""
    s = d.shape[0]
    w = w.to(d.dtype)
    if w.dim() == 2:
        return (w @ d.reshape(s, -1)).reshape(d.shape)
    dv = d.reshape(s, w.shape[0], -1)  # (S, B, rest)
    return torch.einsum("bmk,kbr->mbr", w, dv).reshape(d.shape)


def lowrank_mix(
    fusion: Fusion,
    h: torch.Tensor,
    b: torch.Tensor,
    base: torch.Tensor | None = None,
    inplace: bool = False,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``base_m + fusion(h @ b^T)_m``: per-modality low-rank products, mixed across modalities.

    h: (M, T, K) low-rank activations (LoRA's ``A x``, an adapter's bottleneck), b: (M, out, K)
    per-modality up weights, base: (M, T, out) or None (then the mixed products alone).
    Returns (M, T, out). A linear rule mixes in the K space:
    ``sum_k W[m, k] b_k h_k = [W[m, k] h_k]_k @ [b_k]_k^T``, one GEMM of inner size M*K, so the
    (M, T, out) products and their mixing temporaries never exist; the identity rule accumulates
    ``h_m b_m^T`` straight into the base; a non-linear rule gets the full products.
    ``inplace`` accumulates into ``base`` (safe when autograd does not need ``base`` itself).
    ``weights``: the mixing weights when modalities are missing (:meth:`Fusion.present_weights`):
    (M, M) replaces the rule's matrix, (B, M, M) mixes each sample with its own matrix.
    """
    m, t, k = h.shape
    n_out = b.shape[1]
    bt = b.transpose(1, 2)
    if weights is not None and weights.dim() == 3 and not fusion.mixes:
        keep = weights.diagonal(dim1=1, dim2=2).t().to(h.dtype)  # (M, B): an absent sample's update is zero
        h = (h.view(m, keep.shape[1], -1, k) * keep[:, :, None, None]).view(m, t, k)
    if not fusion.mixes:
        if base is None:
            return torch.bmm(h, bt)
        return base.baddbmm_(h, bt) if inplace else torch.baddbmm(base, h, bt)
    if not fusion.linear:
        d = torch.bmm(h, bt)
        d = fusion(d) if weights is None else apply_mixing(weights, d)
        return d if base is None else base + d.to(base.dtype)
    if weights is not None and weights.dim() == 3:  # per sample: g[m, b, t, (k, K)] = W_b[m, k] h[k, b, t]
        wb = weights.to(h.dtype).permute(1, 0, 2)[:, :, None, :, None]  # (M, B, 1, M, 1)
        hb = h.view(m, weights.shape[0], -1, k).permute(1, 2, 0, 3)  # (B, T/B, M, K)
        g = (wb * hb[None]).reshape(m * t, m * k)  # (M*T, M*K)
    else:
        w = (fusion.mixing_matrix() if weights is None else weights).to(h.dtype)  # (M, M)
        g = (w[:, :, None, None] * h[None]).permute(0, 2, 1, 3).reshape(m * t, m * k)  # (M*T, M*K)
    b_cat = b.permute(1, 0, 2).reshape(n_out, m * k)  # (out, M*K) = [b_0 | b_1 | ...]
    if base is None:
        return (g @ b_cat.t()).view(m, t, n_out)
    flat = base.reshape(m * t, n_out)
    return (flat.addmm_(g, b_cat.t()) if inplace else torch.addmm(flat, g, b_cat.t())).view(m, t, n_out)
