"""Multimodal LoRA around a frozen ``nn.Linear``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import MmpeftTypeError, MmpeftValueError
from ...utils import check_int
from ..base import MultimodalLayer, by_modality, mixing_refusal
from ..fusion import Fusion, build_fusion, lowrank_mix
from ..lowrank import mixed_up, stacked_linear
from ..merging import WeightMerging
from .variants import (
    DORA_MIXING,
    FROM_WEIGHT,
    LoRAFactor,
    LowRankOffset,
    add_slice,
    cast_or_none,
    check_init,
    check_slices,
    decompose,
    dora_extra,
    dora_scale,
    init_pair,
    lora_scaling,
    row_norms,
    slice_rows,
)

__all__ = ["MultimodalLoRA"]


class MultimodalLoRA(WeightMerging, MultimodalLayer):
    """Per-modality low-rank updates of a frozen linear layer, mixed by a fusion rule.

    For modality ``m`` with input ``x_m`` and output slice ``s`` (the whole output by default)::

        d_m^s = scaling * (B_m^s A_m^s dropout(x_m) + b_m^s)
        out_m[..., s] = base_layer(x_m)[..., s] + fusion(d^s)_m

    With fusion ``"scalar"`` and two modalities this is eqs. (9)-(12) of MFNet; with ``"none"`` it is
    standard LoRA per modality. Parameters follow peft's naming: ``lora_A.<modality>.weight``
    (r, in) and ``lora_B.<modality>.weight`` (out, r) (``.bias`` with ``lora_bias``); with output
    slices (e.g. the q and v thirds of a fused qkv) one pair per slice: ``lora_A.<modality>.<slice>.weight``.
    The variants (:mod:`.variants`, docs/peft.md): rsLoRA scaling, the initialisations (PiSSA / OLoRA
    subtract their frozen initial pair, ``lora_offset``, from every update: ``d_m`` starts at 0 and
    the frozen weight is never written), ``lora_bias`` (``b_m`` above, mixed with the rest) and DoRA
    (``lora_magnitude_vector.<modality>``; fusion rules that mix are refused).

    Args:
        base_layer: the frozen ``nn.Linear`` (kept as ``self.base_layer``).
        modalities: modality names in stacked order.
        rank: LoRA rank r.
        alpha: scaling numerator; ``scaling = alpha / rank`` (``alpha / sqrt(rank)`` with
            ``use_rslora``); ``None`` means scaling 1 (the paper's MLP LoRA).
        dropout: dropout on the LoRA input.
        slices: optional ``{name: (start, stop)}`` output ranges that receive an update; others
            are left untouched (no zero-padding copies are made).
        fusion: fusion rule name (see :mod:`mmpeft.tuners.fusion`).
        lambda_init: initial value of the fusion parameters.
        use_rslora: rank-stabilised scaling ``alpha / sqrt(rank)`` (needs ``alpha``).
        init_lora_weights: ``"kaiming"``, ``"gaussian"``, ``"pissa"`` or ``"olora"``.
        lora_bias: a trainable bias on every B (zero at init).
        use_dora: DoRA's per-modality magnitude (needs a fusion rule that does not mix).
    """

    method = "lora"

    def __init__(
        self,
        base_layer: nn.Linear,
        modalities: Sequence[str],
        rank: int = 4,
        alpha: float | None = None,
        dropout: float = 0.0,
        slices: Mapping[str, tuple[int, int]] | None = None,
        fusion: str = "scalar",
        lambda_init: float = 0.5,
        use_rslora: bool = False,
        init_lora_weights: str = "kaiming",
        lora_bias: bool = False,
        use_dora: bool = False,
    ) -> None:
        super().__init__(base_layer, modalities)
        if not isinstance(base_layer, nn.Linear):
            raise MmpeftTypeError(f"MultimodalLoRA wraps nn.Linear, got {type(base_layer).__name__}")
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.rank = check_int("rank", rank)
        #: alpha / rank (alpha / sqrt(rank) with rsLoRA); the only place it is computed (alpha None: 1)
        self.scaling = lora_scaling(rank, alpha, bool(use_rslora))
        self.init_lora_weights = check_init(init_lora_weights)
        self.lora_bias, self.use_dora = bool(lora_bias), bool(use_dora)
        self.slices: dict[str, tuple[int, int]] | None = check_slices(slices, self.out_features)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._build_pairs()
        dev = base_layer.weight.device
        self.lora_fusion = build_fusion(fusion, self.modalities, lambda_init, device=dev)
        if self.use_dora and self.lora_fusion.mixes:
            raise MmpeftValueError(f"use_dora=True with fusion={fusion!r}: {DORA_MIXING}")
        self._init_merging()  # merged_weight: (M, *W.shape) while merged (:meth:`merge`), else None
        self.lora_offset: LowRankOffset | None = None  # PiSSA / OLoRA's frozen (A_0, B_0)
        self.reset_lora_parameters()
        self._rows = slice_rows(self._ranges(), self.out_features)
        if self.use_dora:  # ||W + delta_m|| = ||W|| at init (delta_m = 0 for every initialisation)
            norms = row_norms(base_layer.weight, self._rows)
            self.lora_magnitude_vector = nn.ParameterDict({m: nn.Parameter(norms.clone()) for m in self.modalities})

    def _build_pairs(self) -> None:
        dev, dt = self.base_layer.weight.device, self.base_layer.weight.dtype

        def pair(n_out: int) -> tuple[nn.Linear, nn.Linear]:
            a = nn.Linear(self.in_features, self.rank, bias=False, device=dev, dtype=dt)
            return a, nn.Linear(self.rank, n_out, bias=self.lora_bias, device=dev, dtype=dt)

        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        for name in self.modalities:
            if self.slices is None:
                self.lora_A[name], self.lora_B[name] = pair(self.out_features)
            else:
                pairs = {s: pair(hi - lo) for s, (lo, hi) in self.slices.items()}
                self.lora_A[name] = nn.ModuleDict({s: p[0] for s, p in pairs.items()})
                self.lora_B[name] = nn.ModuleDict({s: p[1] for s, p in pairs.items()})

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """As ``init_lora_weights`` says; the update starts at 0 for every modality.

        "kaiming": A kaiming-uniform(a=sqrt(5)) (peft / loralib), B zeros; "gaussian": A normal with
        std 1/r, B zeros; "pissa" / "olora": every modality's (A, B) = (A_0, B_0) from the frozen
        weight (of each slice), kept in ``lora_offset`` and subtracted from the update."""
        if self.init_lora_weights not in FROM_WEIGHT:
            for _, a, b in self._pairs_all():
                init_pair(a, b, self.init_lora_weights, self.rank)
            return
        w = self.base_layer.weight
        pairs = {}
        for s, (lo, hi) in self._ranges().items():
            a0, b0 = decompose(w[lo:hi], self.rank, self.scaling, self.init_lora_weights)
            pairs[s] = (a0.to(w.dtype), b0.to(w.dtype))
        for m in self.modalities:
            for s, (a0, b0) in pairs.items():
                a, b = self._pair(m, s)
                a.weight.copy_(a0)
                b.weight.copy_(b0)
                if b.bias is not None:
                    nn.init.zeros_(b.bias)
        self.lora_offset = LowRankOffset(pairs)

    def _fusion(self) -> Fusion:
        return self.lora_fusion

    def _ranges(self) -> dict[str, tuple[int, int]]:
        return self.slices if self.slices is not None else {"all": (0, self.out_features)}

    def _pair(self, modality: str, slice_name: str) -> tuple[nn.Linear, nn.Linear]:
        a, b = self.lora_A[modality], self.lora_B[modality]
        if self.slices is None:
            return a, b  # type: ignore[return-value]
        return a[slice_name], b[slice_name]  # type: ignore[index]

    def factors(self, modality: str) -> list[LoRAFactor]:
        """``modality``'s low-rank pairs, one per output slice in slice order (one over every row
        without ``slices``), with their rows and PiSSA / OLoRA offsets: the layer's layout as
        export and the combination of sets read it (:class:`~mmpeft.tuners.lora.variants.LoRAFactor`)."""
        self._check_modality(modality)
        off = self.lora_offset
        return [
            LoRAFactor(s, slice(lo, hi), *self._pair(modality, s), None if off is None else (off.down(s), off.up(s)))
            for s, (lo, hi) in self._ranges().items()
        ]

    def _pairs_all(self) -> list[tuple[str, nn.Linear, nn.Linear]]:
        return [(m, *self._pair(m, s)) for m in self.modalities for s in self._ranges()]

    # ------------------------------------------------------------------ merging
    def cannot_merge(self) -> str | None:
        return mixing_refusal(self.lora_fusion)

    def _lora_weight(self, modality: str) -> torch.Tensor:
        """(out, in) float32: ``scaling * (B_m A_m - B_0 A_0)`` (slice B's in their output rows)."""
        ranges = self._ranges()
        downs = [self._pair(modality, s)[0].weight for s in ranges]
        if self.lora_offset is not None:
            downs += [self.lora_offset.down(s) for s in ranges]
        return self._up_full(modality).float() @ torch.cat(downs, 0).float() * self.scaling

    def _dora_scale(self, modality: str) -> torch.Tensor:
        """(out,) DoRA's ``mag_m / ||W + delta_m||`` (1 on rows outside the slices)."""
        w = self.base_layer.weight
        return dora_scale(self.lora_magnitude_vector[modality], w, self._lora_weight(modality), self._rows)

    def get_delta_weight(self, modality: str) -> torch.Tensor:
        """(out, in) float32: ``scaling * (B_m A_m - B_0 A_0)`` (B_0 A_0 = 0 but for PiSSA / OLoRA;
        slice B's in their output rows, zeros elsewhere); with DoRA ``g_m (W + delta_m) - W``."""
        self._check_modality(modality)
        delta = self._lora_weight(modality)
        if not self.use_dora:
            return delta
        g = self._dora_scale(modality).float()[:, None]  # (out, 1)
        return (g - 1) * self.base_layer.weight.float() + g * delta

    def get_delta_bias(self, modality: str) -> torch.Tensor | None:
        """(out,) float32 with ``lora_bias``: ``scaling * b_m`` in the slices' rows (times DoRA's
        ``g_m``, as the forward scales the whole update), else None. peft folds it into the bias."""
        if not self.lora_bias:
            return None
        d = self._bias_full(modality).float() * self.scaling
        return self._dora_scale(modality).float() * d if self.use_dora else d

    def _forward_merged(self, x: torch.Tensor) -> torch.Tensor:
        """x: (S*B', ..., in) -> (S*B', ..., out) with the merged per-modality weights (and biases)."""
        w, b, mb = self.merged_weight, self.base_layer.bias, self.merged_bias
        assert w is not None
        if self.single is not None:
            b = b if mb is None else mb[self.single]
            return F.linear(x, w[self.single].to(x.dtype), None if b is None else b.to(x.dtype))
        idx = list(range(len(self.modalities))) if self.present is None else list(self.present)
        xs = by_modality(x, len(idx))  # (S, T, in)
        y = torch.bmm(xs, w[idx].transpose(1, 2).to(x.dtype))  # (S, T, out)
        if mb is not None:
            y = y + mb[idx, None].to(y.dtype)  # (S, 1, out): each modality's own bias
        elif b is not None:
            y = y + b.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    # ------------------------------------------------------------------ the forward's steps (MultimodalLayer.forward)
    def _pad_rows(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        """(out, S*k): per-slice (len, k) pieces in their output rows, zeros elsewhere.

        Only this tiny weight is zero-padded (out x S*k elements), never an activation.
        """
        if self.slices is None:
            return pieces[0]
        n = self.out_features
        return torch.cat([F.pad(p, (0, 0, lo, n - hi)) for p, (lo, hi) in zip(pieces, self.slices.values())], 1)

    def _up_full(self, modality: str) -> torch.Tensor:
        """(out, K): the B's of ``modality`` (then -B_0 of the offset) in their output rows, zeros elsewhere."""
        ranges = self._ranges()
        b = self._pad_rows([self._pair(modality, s)[1].weight for s in ranges])
        if self.lora_offset is None:
            return b
        return torch.cat([b, -self._pad_rows([self.lora_offset.up(s) for s in ranges])], 1)

    def _bias_full(self, modality: str) -> torch.Tensor:
        """(out,): the B biases of ``modality`` in their output rows, zeros elsewhere."""
        return self._pad_rows([self._pair(modality, s)[1].bias[:, None] for s in self._ranges()]).sum(1)

    def _down(self, x: torch.Tensor, xd: torch.Tensor, mods: Sequence[str]) -> torch.Tensor:
        """(M, T, K): every A of every slice of each modality on ``xd`` (x after dropout), then
        the offset's A_0 on ``x``, in one node where the two inputs are one tensor."""
        ranges, m = self._ranges(), len(mods)
        downs = [self._pair(mod, s)[0].weight for mod in mods for s in ranges]
        if self.lora_offset is None:
            return stacked_linear(xd, m, downs)
        a0 = [self.lora_offset.down(s) for s in ranges]
        if xd is x:
            n = len(ranges)
            return stacked_linear(x, m, [w for i in range(m) for w in downs[i * n : (i + 1) * n] + a0])
        return torch.cat([stacked_linear(xd, m, downs), stacked_linear(x, m, a0 * m)], -1)

    def _up_pieces(self, mods: Sequence[str]) -> tuple[list[torch.Tensor], list[tuple[int, int, int, int]]]:
        """The up weights (modality-major, one per slice, then the offset's -B_0) and their columns."""
        ranges, r = self._ranges(), self.rank
        cols = [(lo, hi, j * r, (j + 1) * r) for j, (lo, hi) in enumerate(ranges.values())]
        ups = [[self._pair(mod, s)[1].weight for s in ranges] for mod in mods]
        if self.lora_offset is not None:
            n = len(ranges)
            cols += [(lo, hi, (n + j) * r, (n + j + 1) * r) for j, (lo, hi) in enumerate(ranges.values())]
            neg = [-self.lora_offset.up(s) for s in ranges]
            ups = [u + neg for u in ups]
        return [u for per_mod in ups for u in per_mod], cols

    def _forward_batched(self, x: torch.Tensor) -> torch.Tensor:
        mods = self._active()  # the modalities in the batch (all, unless some are missing)
        m = len(mods)
        out = self.base_layer(x)  # (M*B', ..., out)
        xd = self.lora_dropout(x)
        h = self._down(x, xd, mods)  # (M*B', ..., in) -> (M, T, K)
        if self.use_dora:
            return self._dora_batched(xd, out, h, mods)
        biases = [self._bias_full(mod) for mod in mods] if self.lora_bias else None
        fused, w = self._fused_weights()
        if fused:  # the B's, the biases and the mixing in one node
            ups, cols = self._up_pieces(mods)
            return mixed_up(out, h, w, ups, cols, biases=biases, scale=self.scaling)
        h = h * self.scaling
        b_full = torch.stack([self._up_full(mod) for mod in mods]).to(h.dtype)  # (M, out, K)
        if biases is not None:  # the bias as one more rank-space column: h_k[:, K] = s, B[:, K] = b_k
            h = torch.cat([h, h.new_full((*h.shape[:2], 1), self.scaling)], -1)
            b_full = torch.cat([b_full, torch.stack(biases).to(h.dtype)[:, :, None]], -1)
        # in place into the base output: a linear layer's backward does not need its output
        mixed = lowrank_mix(self.lora_fusion, h, b_full, by_modality(out, m), inplace=True, weights=self._mixing())
        return mixed.view(out.shape)

    def _dora_batched(self, xd: torch.Tensor, out: torch.Tensor, h: torch.Tensor, mods: Sequence[str]) -> torch.Tensor:
        """DoRA on the stacked batch (a rule that does not mix): out + (g - 1) W x' + g d."""
        m = len(mods)
        b_full = torch.stack([self._up_full(mod) for mod in mods]).to(h.dtype)  # (M, out, K)
        d = torch.bmm(h, b_full.transpose(1, 2)) * self.scaling  # (M, T, out)
        if self.lora_bias:
            d = d + torch.stack([self._bias_full(mod) for mod in mods]).to(d.dtype)[:, None] * self.scaling
        g = torch.stack([self._dora_scale(mod) for mod in mods])[:, None]  # (M, 1, out)
        wx = by_modality(self._frozen_product(xd, out), m)  # (M, T, out)
        extra = self._mix(dora_extra(g, wx, d))  # the identity, or zero for absent samples
        return (by_modality(out, m) + extra.to(out.dtype)).view(out.shape)

    def _frozen_product(self, xd: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``W x'`` without the bias: from the base output when x' is x (no dropout), else computed."""
        b = self.base_layer.bias
        if isinstance(self.lora_dropout, nn.Identity) or not self.lora_dropout.training:
            return out if b is None else out - b.to(out.dtype)
        return F.linear(xd, self.base_layer.weight.to(xd.dtype))

    def _delta(self, x: torch.Tensor, xd: torch.Tensor, modality: str, slice_name: str) -> torch.Tensor:
        """``scaling * (B A x' + b - B_0 A_0 x)`` of one modality and slice (x' = x after dropout)."""
        a, b = self._pair(modality, slice_name)  # float32 masters, computed in the input's dtype
        d = F.linear(F.linear(xd, a.weight.to(xd.dtype)), b.weight.to(xd.dtype), cast_or_none(b.bias, xd.dtype))
        if self.lora_offset is not None:
            off = self.lora_offset
            d = d - F.linear(F.linear(x, off.down(slice_name).to(x.dtype)), off.up(slice_name).to(x.dtype))
        return d * self.scaling

    def _full_delta(self, x: torch.Tensor, xd: torch.Tensor, modality: str) -> torch.Tensor:
        """(..., out): the update of ``modality`` over every output (zeros outside the slices)."""
        if self.slices is None:
            return self._delta(x, xd, modality, "all")
        n = self.out_features
        pieces = [F.pad(self._delta(x, xd, modality, s), (lo, n - hi)) for s, (lo, hi) in self.slices.items()]
        return torch.stack(pieces).sum(0)

    def _dora_one(self, x: torch.Tensor, out: torch.Tensor, modality: str) -> torch.Tensor:
        """DoRA's addition ``(g - 1) W x' + g d`` for one modality's input x and base output."""
        xd = self.lora_dropout(x)
        return dora_extra(self._dora_scale(modality), self._frozen_product(xd, out), self._full_delta(x, xd, modality))

    def _forward_one(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        out = self.base_layer(x)
        if self.use_dora:
            return out + self._dora_one(x, out, modality).to(out.dtype)
        xd = self.lora_dropout(x)
        for s, (lo, hi) in self._ranges().items():
            d = self._delta(x, xd, modality, s)
            out = out + d if self.slices is None else add_slice(out, d, lo, hi)
        return out

    def _forward_loop(self, x: torch.Tensor) -> torch.Tensor:
        mods = self._active()
        xs = x.chunk(len(mods), 0)
        outs = [self.base_layer(xm) for xm in xs]  # the frozen layer once per modality
        if self.use_dora:
            extra = self._mix(torch.stack([self._dora_one(xm, o, mod) for xm, o, mod in zip(xs, outs, mods)]))
            return torch.cat([o + e.to(o.dtype) for o, e in zip(outs, extra)], 0)
        xds = [self.lora_dropout(xm) for xm in xs]
        for s, (lo, hi) in self._ranges().items():
            d = self._mix(torch.stack([self._delta(xm, xdm, mod, s) for xm, xdm, mod in zip(xs, xds, mods)]))
            outs = [o + dm if self.slices is None else add_slice(o, dm, lo, hi) for o, dm in zip(outs, d)]
        return torch.cat(outs, 0)

    def extra_repr(self) -> str:
        sl = "" if self.slices is None else f", slices={self.slices}"
        var = "".join(f", {k}" for k, on in (("lora_bias", self.lora_bias), ("dora", self.use_dora)) if on)
        init = "" if self.init_lora_weights == "kaiming" else f", init={self.init_lora_weights}"
        head = f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}"
        return f"{head}{sl}{init}{var}, merged={self.merged}"
