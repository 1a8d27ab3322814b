"""The maths of LoRA's variants (peft's menu), for :class:`~mmpeft.tuners.lora.MultimodalLoRA`.

- rsLoRA (``use_rslora``): ``scaling = alpha / sqrt(rank)`` instead of ``alpha / rank``.
- Initialisations (``init_lora_weights``): ``"kaiming"`` (A kaiming-uniform a=sqrt(5), B zeros:
  loralib / peft's ``True``), ``"gaussian"`` (A normal with std 1/r, B zeros: peft's
  ``"gaussian"``), ``"pissa"`` and ``"olora"`` (A, B from the frozen weight's SVD / QR, peft's
  ``pissa_init`` / ``olora_init``).
- PiSSA / OLoRA as an *offset*: peft writes ``W_res = W - s B_0 A_0`` into the frozen weight. The
  frozen weight of a multimodal layer is shared by every modality (and by ``disable_adapters``,
  ``merge_and_unload``, a fresh base model at load time), so mmpeft never writes it. It keeps the
  initial pair (A_0, B_0) as frozen buffers (:class:`LowRankOffset`, saved with the adapters) and
  uses the update ``delta_m = s (B_m A_m - B_0 A_0)``, mixed like any update:
  ``W x + delta_m x = W_res x + s B_m A_m x`` is peft's output for fusion "none", and the update is
  zero at init under every fusion rule.
- DoRA (``use_dora``): ``out_m = g_m * (W x_m + delta_m x_m) + b`` with
  ``g_m = mag_m / ||W + delta_m||_row`` (norm per output row, detached as in the DoRA paper, 4.3),
  the magnitude ``mag_m`` a trainable vector per modality initialised to ``||W||_row``.

A layer's per-modality pairs, their output rows and offsets are read through :class:`LoRAFactor`
(``layer.factors(modality)``), the one public view of its layout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn

from ...errors import MmpeftValueError
from ...utils import check_number

__all__ = [
    "INITS",
    "check_init",
    "lora_scaling",
    "init_pair",
    "decompose",
    "LowRankOffset",
    "slice_rows",
    "dora_scale",
    "dora_extra",
    "row_norms",
    "DORA_MIXING",
    "add_slice",
    "check_slices",
    "cast_or_none",
    "LoRAFactor",
]

#: why DoRA and a mixing fusion rule do not go together
DORA_MIXING = (
    "DoRA rescales modality m's output rows by mag_m / ||W + s B_m A_m||, the norm of m's own merged weight; "
    "a mixing rule adds the other modalities' updates B_k A_k x_k, which belong to no weight applied to x_m, "
    "so there is no weight whose norm to take. Use DoRA with fusion='none' (e.g. preset 'lora', or targets= "
    "with fusion='none')"
)
#: the initialisations of ``init_lora_weights``
INITS = ("kaiming", "gaussian", "pissa", "olora")
#: initialisations that read the frozen weight (A_0, B_0 kept as an offset)
FROM_WEIGHT = ("pissa", "olora")


def check_init(init: object) -> str:
    """``init`` if it names one of :data:`INITS`; a ValueError listing them otherwise."""
    if not isinstance(init, str) or init not in INITS:
        raise MmpeftValueError(
            f"init_lora_weights must be one of {list(INITS)}, got {init!r} (peft's True is 'kaiming'; peft's "
            "'pissa_niter_k', 'loftq', 'eva', 'corda' and False are not offered)"
        )
    return init


def lora_scaling(rank: int, alpha: float | None, use_rslora: bool = False) -> float:
    """``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA; ``alpha=None`` means scaling 1.

    rsLoRA needs an explicit alpha: ``None`` means "no scaling" (scaling 1), which rsLoRA would
    silently leave unchanged, so the combination is an error rather than a guess.
    """
    if alpha is not None:
        check_number("alpha", alpha, positive=True)
    if alpha is None:
        if use_rslora:
            raise MmpeftValueError(
                "use_rslora=True needs an explicit alpha (scaling = alpha / sqrt(rank)); alpha=None means "
                "scaling 1, which rsLoRA would not change. Pass e.g. alpha=8 (peft's default lora_alpha)"
            )
        return 1.0
    return float(alpha) / (math.sqrt(rank) if use_rslora else rank)


@torch.no_grad()
def init_pair(a: nn.Linear, b: nn.Linear, init: str, rank: int) -> None:
    """Initialise one (A, B) pair as ``init`` ("kaiming" or "gaussian"): the update starts at 0."""
    if init == "kaiming":
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
    elif init == "gaussian":
        nn.init.normal_(a.weight, std=1.0 / rank)
    else:
        raise MmpeftValueError(f"init_pair initialises 'kaiming' or 'gaussian', not {init!r} (see decompose)")
    nn.init.zeros_(b.weight)
    if b.bias is not None:
        nn.init.zeros_(b.bias)


@torch.no_grad()
def decompose(weight: torch.Tensor, rank: int, scaling: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_0 (r, in), B_0 (out, r)) in float32 from the frozen ``weight`` (out, in), as peft:

    - ``"pissa"``: ``W = U S V^T``; ``A_0 = sqrt(S_r / s) V_r^T``, ``B_0 = U_r sqrt(S_r / s)``, so
      ``s B_0 A_0`` is W's best rank-r part;
    - ``"olora"``: ``W = Q R``; ``A_0 = R[:r]``, ``B_0 = Q[:, :r]``.

    On the meta device (parameter counting) the shapes alone are returned.
    """
    out_f, in_f = weight.shape
    if rank > min(out_f, in_f):
        raise MmpeftValueError(
            f"init_lora_weights={init!r} needs rank <= min(out, in) = {min(out_f, in_f)}, got {rank}"
        )
    if weight.device.type == "meta":
        return torch.empty(rank, in_f, device="meta"), torch.empty(out_f, rank, device="meta")
    w = weight.float()
    if init == "pissa":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        sr = (s[:rank] / scaling).sqrt()
        return (sr[:, None] * vh[:rank]).contiguous(), (u[:, :rank] * sr[None]).contiguous()
    if init == "olora":
        q, r = torch.linalg.qr(w)
        return r[:rank].contiguous(), q[:, :rank].contiguous()
    raise MmpeftValueError(f"decompose reads the weight for {list(FROM_WEIGHT)}, not {init!r}")


class LowRankOffset(nn.Module):
    """The frozen initial pairs (A_0, B_0) of PiSSA / OLoRA, one per output slice, as buffers
    ``down_<slice>`` (r, in) and ``up_<slice>`` (len, r): saved with the adapters (the update
    ``s (B_m A_m - B_0 A_0)`` needs them), never trained."""

    def __init__(self, pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__()
        self.names = tuple(pairs)
        for name, (a, b) in pairs.items():
            self.register_buffer(f"down_{name}", a)
            self.register_buffer(f"up_{name}", b)

    def down(self, name: str) -> torch.Tensor:
        return getattr(self, f"down_{name}")

    def up(self, name: str) -> torch.Tensor:
        return getattr(self, f"up_{name}")


class LoRAFactor(NamedTuple):
    """One low-rank pair of a LoRA layer for one modality (``layer.factors(modality)``). It adds
    ``scaling * (lora_B(lora_A(x)) - B_0 A_0 x)`` to the base output's rows ``rows`` (channels for
    a convolution); DoRA's ``lora_magnitude_vector`` covers the factors' rows, in factor order."""

    #: the output slice's name (``"all"``: the layer has no slices)
    name: str
    #: the base layer's output rows (channels) the pair writes
    rows: slice
    #: in -> r: an ``nn.Linear`` (weight (r, in)) or the conv's ``nn.Conv2d`` (weight (r, in, kh, kw))
    lora_A: nn.Module
    #: r -> rows: an ``nn.Linear`` (weight (rows, r), ``.bias`` with ``lora_bias``) or a 1x1 ``nn.Conv2d``
    lora_B: nn.Module
    #: PiSSA / OLoRA's frozen initial pair (A_0 (r, in), B_0 (rows, r)) subtracted from the update, else None
    offset: tuple[torch.Tensor, torch.Tensor] | None


def slice_rows(ranges: Mapping[str, tuple[int, int]], out_features: int) -> list[int] | None:
    """The output rows the update reaches, in slice order; None when it is every row in order."""
    rows = [i for lo, hi in ranges.values() for i in range(lo, hi)]
    return None if rows == list(range(out_features)) else rows


@torch.no_grad()
def row_norms(weight: torch.Tensor, rows: list[int] | None) -> torch.Tensor:
    """(len(rows),) or (out,): the norms of the frozen weight's output rows (DoRA's initial magnitude)."""
    norms = torch.linalg.norm(weight.float(), dim=1)
    return (norms if rows is None else norms[rows]).to(weight.dtype)


def dora_scale(
    magnitude: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor, rows: list[int] | None
) -> torch.Tensor:
    """(out,) DoRA's ``g = mag / ||W + delta||_row`` (the norm detached), 1 on rows outside ``rows``.

    magnitude: (len(rows),) or (out,); weight: (out, in) frozen; delta: (out, in) the update's weight.
    """
    full = weight.float() + delta.detach().float()  # (out, in)
    if rows is None:
        return magnitude / torch.linalg.norm(full, dim=1).detach()
    idx = torch.tensor(rows, device=weight.device)
    g_rows = magnitude / torch.linalg.norm(full[idx], dim=1).detach()  # (len(rows),)
    return torch.ones(weight.shape[0], device=weight.device, dtype=g_rows.dtype).index_copy(0, idx, g_rows)


def dora_extra(g: torch.Tensor, wx: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """What DoRA adds to the frozen output ``W x + b``: ``(g - 1) W x' + g d`` (peft's
    ``result_dora``), so that the output is ``g (W x' + d) + b``.

    g: (out,) or (M, 1, out); wx: ``W x'`` (x' the LoRA input after dropout), d: the LoRA update
    ``s (B A x' + b_lora)``, both (..., out).
    """
    g = g.to(d.dtype)
    return (g - 1) * wx.to(d.dtype) + g * d


def add_slice(out: torch.Tensor, d: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """out with d added to out[..., lo:hi] (out of place)."""
    return torch.cat([out[..., :lo], out[..., lo:hi] + d, out[..., hi:]], -1)


def check_slices(slices: Mapping[str, tuple[int, int]] | None, out_features: int) -> dict[str, tuple[int, int]] | None:
    if slices is None:
        return None
    if not slices:
        raise MmpeftValueError("slices must name at least one output range")
    checked: dict[str, tuple[int, int]] = {}
    for name, (lo, hi) in slices.items():
        if not (0 <= lo < hi <= out_features):
            raise MmpeftValueError(f"slice {name!r}=({lo}, {hi}) is outside the layer's {out_features} outputs")
        if "." in name:
            raise MmpeftValueError(f"slice names may not contain '.', got {name!r}")
        checked[name] = (int(lo), int(hi))
    return checked


def cast_or_none(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` in ``dtype`` (None stays None): float32 masters used in a low-precision forward."""
    return None if t is None else t.to(dtype)
