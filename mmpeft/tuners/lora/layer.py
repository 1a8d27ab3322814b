"""Multimodal LoRA around a frozen ``nn.Linear``."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...fusion import Fusion, build_fusion, lowrank_mix
from ...lowrank import mixed_up, stacked_linear
from ...utils import check_int, check_number
from ..base import MergeError, MultimodalLayer, by_modality

__all__ = ["MultimodalLoRA"]


class MultimodalLoRA(MultimodalLayer):
    """Per-modality low-rank updates of a frozen linear layer, mixed by a fusion rule.

    For modality ``m`` with input ``x_m`` and output slice ``s`` (the whole output by default)::

        d_m^s = scaling * B_m^s A_m^s dropout(x_m)
        out_m[..., s] = base_layer(x_m)[..., s] + fusion(d^s)_m

    With fusion ``"scalar"`` and two modalities this is eqs. (9)-(12) of MFNet; with ``"none"`` it is
    standard LoRA per modality. Parameters follow peft's naming: ``lora_A.<modality>.weight``
    (r, in) and ``lora_B.<modality>.weight`` (out, r); with output slices (e.g. the q and v thirds of a
    fused qkv) one pair per slice: ``lora_A.<modality>.<slice>.weight``.

    Args:
        base_layer: the frozen ``nn.Linear`` (kept as ``self.base_layer``).
        modalities: modality names in stacked order.
        rank: LoRA rank r.
        alpha: scaling numerator; ``scaling = alpha / rank``; ``None`` means ``alpha = rank``
            (scaling 1, the paper's MLP LoRA).
        dropout: dropout on the LoRA input.
        slices: optional ``{name: (start, stop)}`` output ranges that receive an update; others
            are left untouched (no zero-padding copies are made).
        fusion: fusion rule name (see :mod:`mmpeft.fusion`).
        lambda_init: initial value of the fusion parameters.
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
    ) -> None:
        super().__init__(base_layer, modalities)
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"MultimodalLoRA wraps nn.Linear, got {type(base_layer).__name__}")
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.rank = check_int("rank", rank)
        #: alpha / rank; the only place it is computed (alpha None: scaling 1)
        self.scaling = 1.0 if alpha is None else check_number("alpha", alpha, positive=True) / rank
        self.slices: dict[str, tuple[int, int]] | None = _check_slices(slices, self.out_features)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dev, dt = base_layer.weight.device, base_layer.weight.dtype
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        for name in self.modalities:
            if self.slices is None:
                self.lora_A[name] = nn.Linear(self.in_features, rank, bias=False, device=dev, dtype=dt)
                self.lora_B[name] = nn.Linear(rank, self.out_features, bias=False, device=dev, dtype=dt)
            else:
                self.lora_A[name] = nn.ModuleDict(
                    {s: nn.Linear(self.in_features, rank, bias=False, device=dev, dtype=dt) for s in self.slices}
                )
                self.lora_B[name] = nn.ModuleDict(
                    {s: nn.Linear(rank, b - a, bias=False, device=dev, dtype=dt) for s, (a, b) in self.slices.items()}
                )
        self.lora_fusion = build_fusion(fusion, self.modalities, lambda_init, device=dev)
        #: (M, out, in) per-modality merged weights while merged (:meth:`merge`), else None
        self.register_buffer("merged_weight", None, persistent=False)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A: kaiming-uniform(a=sqrt(5)) (as peft / loralib); B: zeros, so the update starts at 0."""
        for _, a, b in self._pairs_all():
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.zeros_(b.weight)

    def _fusion(self) -> Fusion:
        return self.lora_fusion

    def _ranges(self) -> dict[str, tuple[int, int]]:
        return self.slices if self.slices is not None else {"all": (0, self.out_features)}

    def _pair(self, modality: str, slice_name: str) -> tuple[nn.Linear, nn.Linear]:
        a, b = self.lora_A[modality], self.lora_B[modality]
        if self.slices is None:
            return a, b  # type: ignore[return-value]
        return a[slice_name], b[slice_name]  # type: ignore[index]

    def _pairs_all(self) -> list[tuple[str, nn.Linear, nn.Linear]]:
        return [(m, *self._pair(m, s)) for m in self.modalities for s in self._ranges()]

    # ------------------------------------------------------------------ merging
    @property
    def merged(self) -> bool:
        return self.merged_weight is not None

    def cannot_merge(self) -> str | None:
        if not self.lora_fusion.mixes:
            return None
        return (
            f"its fusion rule {type(self.lora_fusion).__name__} mixes modalities: each modality's output adds "
            "the other modalities' updates B_k A_k x_k, computed from *their* inputs, which no weight applied "
            "to x_m alone can express (merge needs fusion='none', e.g. the preset 'lora' or the MMLoRA "
            "attention rule)"
        )

    def get_delta_weight(self, modality: str) -> torch.Tensor:
        """(out, in) float32: ``scaling * B_m A_m`` (slice B's in their output rows, zeros elsewhere)."""
        if modality not in self.modalities:
            raise KeyError(f"unknown modality {modality!r}; known: {self.modalities}")
        a = torch.cat([self._pair(modality, s)[0].weight for s in self._ranges()], 0).float()  # (S*r, in)
        return self._b_full(modality).float() @ a * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold each modality's update into its own copy ``W + scaling B_m A_m`` of the frozen
        weight ((M, out, in) in the weight's dtype: M times the layer's weight memory). The frozen
        weight itself is never written, so :meth:`unmerge` restores it exactly."""
        reason = self.cannot_merge()
        if reason is not None:
            raise MergeError(f"cannot merge: {reason}")
        w = self.base_layer.weight
        deltas = torch.stack([self.get_delta_weight(m) for m in self.modalities])  # (M, out, in)
        self.merged_weight = (w.float() + deltas.to(w.device)).to(w.dtype)

    def unmerge(self) -> None:
        self.merged_weight = None

    def _check_merged_inference(self) -> None:
        """A merged layer has no gradient path to its LoRA weights: training through it would
        leave them unchanged without a word, so it is an error."""
        if self.training and torch.is_grad_enabled() and any(p.requires_grad for p in self.lora_A.parameters()):
            raise RuntimeError(
                "this LoRA layer is merged (merge_adapters), so its LoRA weights get no gradient; call "
                "unmerge_adapters() before training, or run the merged model in eval mode / under torch.no_grad()"
            )

    def _forward_merged(self, x: torch.Tensor) -> torch.Tensor:
        """x: (S*B', ..., in) -> (S*B', ..., out) with the merged per-modality weights."""
        w, b = self.merged_weight, self.base_layer.bias
        assert w is not None
        if self.single is not None:
            return F.linear(x, w[self.single].to(x.dtype), None if b is None else b.to(x.dtype))
        idx = list(range(len(self.modalities))) if self.present is None else list(self.present)
        xs = by_modality(x, len(idx))  # (S, T, in)
        y = torch.bmm(xs, w[idx].transpose(1, 2).to(x.dtype))  # (S, T, out)
        if b is not None:
            y = y + b.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (M*B', ..., in) stacked modality-major -> (M*B', ..., out)."""
        self._note_call(x)
        if not self.adapters_enabled:
            return self.base_layer(x)
        if self.merged and self.presence is None:  # per-sample presence: the unmerged path
            self._check_merged_inference()
            if self.single is None:
                self._check_stack(x)
            return self._forward_merged(x)
        if self.single is not None:
            return self._forward_single(x, self.modalities[self._check_single()])
        self._check_stack(x)
        if self.execution == "loop":
            return self._forward_loop(x)
        return self._forward_batched(x)

    def _b_full(self, modality: str) -> torch.Tensor:
        """(out, S*r): the slice B's of ``modality`` in their output rows, zeros elsewhere.

        Only this tiny weight is zero-padded (out x S*r elements), never an activation.
        """
        if self.slices is None:
            return self.lora_B[modality].weight  # type: ignore[return-value]
        blocks = []
        for s, (lo, hi) in self.slices.items():
            b = self._pair(modality, s)[1].weight  # (len, r)
            blocks.append(F.pad(b, (0, 0, lo, self.out_features - hi)))  # (out, r)
        return torch.cat(blocks, 1)

    def _forward_batched(self, x: torch.Tensor) -> torch.Tensor:
        mods = self._active()  # the modalities in the batch (all, unless some are missing)
        m = len(mods)
        out = self.base_layer(x)  # (M*B', ..., out)
        ranges = self._ranges()
        # all A's of all slices in one node: (M*B', ..., in) -> (M, T, R), R = S*r
        h = stacked_linear(self.lora_dropout(x), m, [self._pair(mod, s)[0].weight for mod in mods for s in ranges])
        fused, w = self._fused_weights()
        if fused:  # the B's and the mixing in one node
            ups = [self._pair(mod, s)[1].weight for mod in mods for s in ranges]
            r = self.rank
            cols = [(lo, hi, j * r, (j + 1) * r) for j, (lo, hi) in enumerate(ranges.values())]
            return mixed_up(out, h, w, ups, cols, scale=self.scaling)
        h = h * self.scaling
        b_full = torch.stack([self._b_full(mod) for mod in mods]).to(h.dtype)  # (M, out, R)
        # in place into the base output: a linear layer's backward does not need its output
        mixed = lowrank_mix(self.lora_fusion, h, b_full, by_modality(out, m), inplace=True, weights=self._mixing())
        return mixed.view(out.shape)

    def _delta(self, x: torch.Tensor, modality: str, slice_name: str) -> torch.Tensor:
        a, b = self._pair(modality, slice_name)
        return b(a(self.lora_dropout(x))) * self.scaling

    def _forward_single(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        out = self.base_layer(x)
        for s, (lo, hi) in self._ranges().items():
            d = self._delta(x, modality, s)
            out = out + d if self.slices is None else _add_slice(out, d, lo, hi)
        return out

    def _forward_loop(self, x: torch.Tensor) -> torch.Tensor:
        mods = self._active()
        xs = x.chunk(len(mods), 0)
        outs = [self.base_layer(xm) for xm in xs]  # the frozen layer once per modality
        for s, (lo, hi) in self._ranges().items():
            d = self._mix(torch.stack([self._delta(xm, mod, s) for xm, mod in zip(xs, mods)]))
            outs = [o + dm if self.slices is None else _add_slice(o, dm, lo, hi) for o, dm in zip(outs, d)]
        return torch.cat(outs, 0)

    def extra_repr(self) -> str:
        sl = "" if self.slices is None else f", slices={self.slices}"
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}{sl}, merged={self.merged}"


def _add_slice(out: torch.Tensor, d: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """out with d added to out[..., lo:hi] (out of place)."""
    return torch.cat([out[..., :lo], out[..., lo:hi] + d, out[..., hi:]], -1)


def _check_slices(
    slices: Mapping[str, tuple[int, int]] | None, out_features: int
) -> dict[str, tuple[int, int]] | None:
    if slices is None:
        return None
    if not slices:
        raise ValueError("slices must name at least one output range")
    checked: dict[str, tuple[int, int]] = {}
    for name, (lo, hi) in slices.items():
        if not (0 <= lo < hi <= out_features):
            raise ValueError(f"slice {name!r}=({lo}, {hi}) is outside the layer's {out_features} outputs")
        if "." in name:
            raise ValueError(f"slice names may not contain '.', got {name!r}")
        checked[name] = (int(lo), int(hi))
    return checked
