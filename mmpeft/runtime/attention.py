"""Efficient execution of SAM-style ViT blocks: padding-free windows and fused attention.

SAM's image encoder (and timm's ``VisionTransformerSAM``) runs most blocks in windowed attention:
``norm1`` output is zero-padded to a multiple of the window, split into windows, and the whole
attention module, qkv and output projections included, runs on the padded windows. At 256x256
inputs the 16x16 token grid pads to 28x28 in 14x14 windows: two thirds of the tokens the qkv and
output projections see are padding, and the output projection's result on them is discarded.

:func:`enable_efficient_attention` replaces the ``forward`` of such blocks (names and state-dict keys
are unchanged) by one that computes
the same function with less work (installed through :mod:`mmpeft.runtime.blocks`, which also carries
gradient checkpointing):

- the qkv projection runs on the real tokens only; the padded tokens' q, k, v are the
  projection of a zero token (its bias), computed once per image, exactly what the stock code
  obtains for them (padded keys and values do take part in the attention, as in SAM);
- ``queries="real"``: only the real tokens' queries attend (their output is all the block keeps):
  the windows are grouped by their real extent (full, cut at the bottom, at the right, both), one
  call each; ``queries="all"``: one call over all the padded windows, cropped afterwards (fewer,
  larger kernels: what a GPU prefers); ``"auto"`` picks per device at run time;
- attention is ``torch.nn.functional.scaled_dot_product_attention`` (segment-anything's own
  encoder runs unfused) with the decomposed relative-position bias either as its additive mask
  (``rel_pos="mask"``) or folded into extra query and key channels (``rel_pos="channels"``:
  ``q' = [s q, bias_h(q), bias_w(q)]``, ``k' = [k, onehot(key row), onehot(key column)]``, so that
  ``q' . k' = s q . k + bias``): without a mask the fused (flash) kernels apply and no
  (B, heads, Tq, Tk) bias is stored for the backward (on the CPU this measured slower: the mask
  is the default);
- the output projection (and an adapter placed after the attention) runs on the real tokens only.

Wrapped layers inside (LoRA on qkv, an adapter after the attention, LoRA or adapters on the MLP)
work unchanged, in every execution mode. Outputs equal the stock blocks' to float rounding
(tests: 1e-5).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache, partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MmpeftValueError
from ..tuners import MultimodalAdapter, MultimodalLayer
from .blocks import blocks_with, runner_of, set_block_features

__all__ = [
    "enable_efficient_attention",
    "disable_efficient_attention",
    "efficient_attention_blocks",
    "resolve_queries",
    "QUERIES",
    "REL_POS",
]

#: block classes whose forward is known (qualified names; nothing is imported to check them)
SAM_BLOCKS = frozenset(
    {
        "segment_anything.modeling.image_encoder.Block",
        "timm.models.vision_transformer_sam.Block",
    }
)


def _qualname(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _core(attn: nn.Module) -> nn.Module:
    """The attention module itself (inside an adapter placed after it)."""
    return attn.base_layer if isinstance(attn, MultimodalAdapter) else attn


def _supported(block: nn.Module) -> bool:
    if _qualname(block) not in SAM_BLOCKS:
        return False
    attn = getattr(block, "attn", None)
    if attn is None or (isinstance(attn, MultimodalLayer) and not isinstance(attn, MultimodalAdapter)):
        return False
    if isinstance(attn, MultimodalAdapter) and attn.placement != "after":
        return False
    core = _core(attn)
    if isinstance(core, MultimodalLayer) or getattr(core, "rope", None) is not None:
        return False
    return all(hasattr(core, a) for a in ("qkv", "proj", "num_heads"))


def _rel_pos(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """(size, size, C) relative-position embeddings of query row i and key row j (SAM's get_rel_pos
    for equal query and key sizes, with its linear resize when the table's length differs)."""
    length = 2 * size - 1
    if rel_pos.shape[0] != length:
        rel_pos = F.interpolate(rel_pos.t()[None], size=length, mode="linear")[0].t()
    return rel_pos[_constant(_rel_index, size, rel_pos.device)]


def _constant(build: Callable[..., torch.Tensor], *key: Any) -> torch.Tensor:
    """The constant tensor ``build(*key)``: built once per key in eager mode (not in every step),
    built inside the graph while compiling (traced once there)."""
    return build(*key) if torch.compiler.is_compiling() else _cached(build, *key)


@lru_cache(maxsize=128)
def _cached(build: Callable[..., torch.Tensor], *key: Any) -> torch.Tensor:
    return build(*key)


def _rel_index(size: int, device: torch.device) -> torch.Tensor:
    """(size, size) index of the relative position i - j in a table of 2*size-1 rows."""
    idx = torch.arange(size, device=device)
    return idx[:, None] - idx[None, :] + size - 1


def _heads(x: torch.Tensor, parts: int, heads: int) -> tuple[torch.Tensor, ...]:
    """(B, T, parts*C) -> ``parts`` tensors (B, heads, T, C/heads)."""
    b, t, pc = x.shape
    return x.reshape(b, t, parts, heads, pc // (parts * heads)).permute(2, 0, 3, 1, 4).unbind(0)


def _rel_tables(
    core: nn.Module, k_size: tuple[int, int], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(kh, kh, hd) and (kw, kw, hd) relative-position tables of a ``k_size`` key grid, once per call
    of the block (queries on a corner of the grid use their first rows), or None without rel pos."""
    if not getattr(core, "use_rel_pos", False):
        return None
    tables = _rel_pos(k_size[0], core.rel_pos_h), _rel_pos(k_size[1], core.rel_pos_w)
    return tables if tables[0].dtype == dtype else (tables[0].to(dtype), tables[1].to(dtype))


def _attention(
    core: nn.Module,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_size: tuple[int, int],
    rel: tuple[torch.Tensor, torch.Tensor] | None,
    training: bool,
    rel_pos: str = "mask",
) -> torch.Tensor:
    """Attention of queries on a ``q_size`` grid (B, nh, Tq, hd) over keys (B, nh, Tk, hd) -> (B, Tq, C).
    The query grid is the top-left corner of the key grid whose tables ``rel`` holds; ``rel_pos``
    ("mask" or "channels", see the module doc) is how their bias enters the attention."""
    q_norm, k_norm = getattr(core, "q_norm", None), getattr(core, "k_norm", None)
    if q_norm is not None:
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)
    mask = None
    b, heads, tq, _ = q.shape
    if rel is not None:
        qh, qw = q_size
        rh, rw = rel[0][:qh], rel[1][:qw]  # (qh, kh, hd), (qw, kw, hd)
        rq = q.reshape(b, heads, qh, qw, -1)
        bias_h = torch.einsum("nahwc,hkc->nahwk", rq, rh)
        bias_w = torch.einsum("nahwc,wkc->nahwk", rq, rw)
        if rel_pos == "channels":
            bias = (bias_h.reshape(b, heads, tq, -1), bias_w.reshape(b, heads, tq, -1))
        else:
            mask = (bias_h[..., :, None] + bias_w[..., None, :]).reshape(b, heads, tq, k.shape[2])
    drop = getattr(core, "attn_drop", None)
    p = float(drop.p) if training and isinstance(drop, nn.Dropout) else 0.0
    scale = getattr(core, "scale", None)
    if rel is not None and rel_pos == "channels":
        out = _folded_attention(q, k, v, bias, p, q.shape[-1] ** -0.5 if scale is None else scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=scale)
    return out.transpose(1, 2).reshape(b, tq, -1)


def _folded_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: tuple[torch.Tensor, torch.Tensor], p: float, scale: float
) -> torch.Tensor:
    """SDPA of q (B, nh, Tq, hd) over k, v (B, nh, Tk, hd) with the decomposed relative-position
    bias ``bias_h[q, key row] + bias_w[q, key column]`` (bias: (B, nh, Tq, kh), (B, nh, Tq, kw))
    as extra channels: ``[s q, bias_h, bias_w] . [k, onehot(row), onehot(col)]``; no mask.
    Channels are zero-padded to a multiple of 8 (the fused kernels' alignment) and v to the same
    width (flash wants one head size), the output cropped back."""
    b, heads, tk, hd = k.shape
    kh, kw = bias[0].shape[-1], bias[1].shape[-1]
    width = hd + kh + kw
    pad = -width % 8
    onehot = _constant(_onehots, kh, kw, k.device, k.dtype)  # (Tk, kh + kw)
    qq = torch.cat([q * scale, *bias], -1)
    kk = torch.cat([k, onehot.expand(b, heads, tk, kh + kw)], -1)
    if pad:
        qq, kk = F.pad(qq, (0, pad)), F.pad(kk, (0, pad))
    out = F.scaled_dot_product_attention(qq, kk, F.pad(v, (0, width + pad - hd)), dropout_p=p, scale=1.0)
    return out[..., :hd]


def _onehots(kh: int, kw: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(kh*kw, kh + kw): for each key of a kh x kw grid (row-major), one-hot of its row, then of its column."""
    rows = torch.arange(kh * kw, device=device) // kw
    cols = torch.arange(kh * kw, device=device) % kw
    return torch.cat([F.one_hot(rows, kh), F.one_hot(cols, kw)], 1).to(dtype)


def _padded_qkv(core: nn.Module, y: torch.Tensor, ws: int) -> tuple[torch.Tensor, int, int]:
    """qkv of the zero-padded (N, Hp, Wp, C) grid, projecting only the real tokens of ``y``."""
    n, h, w, c = y.shape
    hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
    qkv = core.qkv(y)  # (N, H, W, 3C): real tokens only
    if (hp, wp) == (h, w):
        return qkv, hp, wp
    pad = core.qkv(y.new_zeros(n, 1, 1, c))  # (N, 1, 1, 3C): what a padded (zero) token projects to
    c3 = qkv.shape[-1]
    if wp > w:
        qkv = torch.cat([qkv, pad.expand(n, h, wp - w, c3)], 2)
    if hp > h:
        qkv = torch.cat([qkv, pad.expand(n, hp - h, wp, c3)], 1)
    return qkv, hp, wp


def _groups(size: int, ws: int) -> list[tuple[slice, int]]:
    """Windows along one axis grouped by how many real tokens they hold: (window slice, count)."""
    n = -(-size // ws)
    last = size - (n - 1) * ws
    if last == ws:
        return [(slice(0, n), ws)]
    return [g for g in ((slice(0, n - 1), ws), (slice(n - 1, n), last)) if g[0].stop > g[0].start]


def _windowed_attention(
    core: nn.Module, y: torch.Tensor, ws: int, queries: str, training: bool, rel_pos: str = "mask"
) -> torch.Tensor:
    """SAM's windowed attention of y: (N, H, W, C) before the output projection -> (N, H, W, C).

    Keys and values cover the padded windows (as in SAM). ``queries="all"``: every window's
    tokens attend in one call and the padding is cropped afterwards; ``"real"``: only the real
    tokens' queries attend, the windows grouped by their real extent (full, cut at the bottom,
    at the right, both), one call per group.
    """
    n, h, w, c = y.shape
    heads = int(core.num_heads)
    qkv, hp, wp = _padded_qkv(core, y, ws)
    grid = qkv.view(n, hp // ws, ws, wp // ws, ws, -1).permute(0, 1, 3, 2, 4, 5)  # (N, nH, nW, ws, ws, 3C)
    rel = _rel_tables(core, (ws, ws), y.dtype)
    if queries == "all":
        nh, nw = hp // ws, wp // ws
        q, k, v = _heads(grid.reshape(n * nh * nw, ws * ws, 3 * c), 3, heads)
        o = _attention(core, q, k, v, (ws, ws), rel, training, rel_pos)  # (N*nH*nW, ws*ws, C)
        o = o.view(n, nh, nw, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(n, hp, wp, c)
        return o[:, :h, :w] if (hp, wp) != (h, w) else o
    rows = []
    for rs, qh in _groups(h, ws):
        cols = []
        for cs, qw in _groups(w, ws):
            sub = grid[:, rs, cs]  # (N, a, b, ws, ws, 3C)
            a, b = sub.shape[1:3]
            k, v = _heads(sub[..., c:].reshape(n * a * b, ws * ws, 2 * c), 2, heads)  # keys: the padded windows
            q = _heads(sub[:, :, :, :qh, :qw, :c].reshape(n * a * b, qh * qw, c), 1, heads)[0]
            o = _attention(core, q, k, v, (qh, qw), rel, training, rel_pos)  # (N*a*b, qh*qw, C)
            cols.append(o.view(n, a, b, qh, qw, c).permute(0, 1, 3, 2, 4, 5).reshape(n, a * qh, b * qw, c))
        rows.append(torch.cat(cols, 2) if len(cols) > 1 else cols[0])
    return torch.cat(rows, 1) if len(rows) > 1 else rows[0]


def resolve_queries(queries: str, device: torch.device) -> str:
    """``"auto"`` -> ``"all"`` on CUDA (one fused attention call beats several smaller ones there:
    the step is bound by kernel launches), ``"real"`` elsewhere (the CPU is bound by FLOPs)."""
    if queries == "auto":
        return "all" if device.type == "cuda" else "real"
    return queries


def _efficient_block_forward(
    block: nn.Module, x: torch.Tensor, queries: str = "auto", rel_pos: str = "mask"
) -> torch.Tensor:
    """The block's function on x: (N, H, W, C), without work on window padding."""
    n, h, w, c = x.shape
    attn = block.attn
    core = _core(attn)
    ws = int(getattr(block, "window_size", 0) or 0)
    y = block.norm1(x)
    if ws > 0:
        a = _windowed_attention(core, y, ws, resolve_queries(queries, x.device), block.training, rel_pos)
    else:
        q, k, v = _heads(core.qkv(y).reshape(n, h * w, -1), 3, int(core.num_heads))
        rel = _rel_tables(core, (h, w), y.dtype)
        a = _attention(core, q, k, v, (h, w), rel, block.training, rel_pos).view(n, h, w, c)
    a = core.proj(a)  # real tokens only
    proj_drop = getattr(core, "proj_drop", None)
    if proj_drop is not None:
        a = proj_drop(a)
    if isinstance(attn, MultimodalAdapter):
        a = attn.adapt_output(a)
    for name in ("ls1", "drop_path1"):  # timm's layer scale and drop path (absent in segment-anything)
        mod = getattr(block, name, None)
        if mod is not None:
            a = mod(a)
    x = x + a
    z = block.mlp(block.norm2(x))
    for name in ("ls2", "drop_path2"):
        mod = getattr(block, name, None)
        if mod is not None:
            z = mod(z)
    return x + z


QUERIES = ("auto", "real", "all")
REL_POS = ("mask", "channels")


def enable_efficient_attention(model: nn.Module, queries: str = "auto", rel_pos: str = "mask") -> list[str]:
    """Run the SAM-style blocks of ``model`` padding-free with fused attention (see module doc).

    Applies to segment-anything's and timm's SAM ``Block`` (other blocks are left as they are),
    wrapped or not, before or after :func:`mmpeft.runtime.checkpointing.enable_gradient_checkpointing`.

    Args:
        queries: which queries of the padded windows attend: ``"real"`` (only the real tokens',
            grouped by window extent: least work), ``"all"`` (one attention call over the padded
            windows, cropped: fewest kernels) or ``"auto"`` (chosen per device at run time, see
            :func:`resolve_queries`).
        rel_pos: how the relative-position bias enters the attention: ``"mask"`` (SDPA's additive
            mask; the default: measured faster and leaner on the CPU) or ``"channels"`` (extra
            query/key channels, no mask: fused kernels may run, no bias stored for the backward;
            a candidate for the GPU, not yet measured there). Same function.

    Returns the names of the blocks now running this way (again: a new ``queries`` applies).
    Undo with :func:`disable_efficient_attention`.
    """
    if queries not in QUERIES:
        raise MmpeftValueError(f"queries must be one of {QUERIES}, got {queries!r}")
    if rel_pos not in REL_POS:
        raise MmpeftValueError(f"rel_pos must be one of {REL_POS}, got {rel_pos!r}")
    names = []
    for name, block in model.named_modules():
        if _supported(block):
            set_block_features(block, efficient=partial(_efficient_block_forward, queries=queries, rel_pos=rel_pos))
            names.append(name)
    return names


def disable_efficient_attention(model: nn.Module) -> int:
    """Give the blocks changed by :func:`enable_efficient_attention` their own function back;
    returns how many."""
    count = 0
    for block in model.modules():
        runner = runner_of(block)
        if runner is not None and runner.efficient is not None:
            set_block_features(block, efficient=None)
            count += 1
    return count


def efficient_attention_blocks(model: nn.Module) -> list[str]:
    """Names of the blocks of ``model`` running the efficient forward."""
    return blocks_with(model, lambda r: r.efficient is not None)
