"""Placement by what the attention computes: the presets for a model no family and no block
structure of linears describes (convolutional attention: SHViT, IFormer, EfficientViT's LiteMLA).

:class:`~mmpeft.targeting.attention_trace.AttentionTrace` runs one shape-only forward and says,
for every module that computes attention, which projections feed its products as q, k and v.
:func:`traced_family` turns that into a :class:`TracedFamily`:

- attention: LoRA on the projections inside each attention module that feed q and v (k alone is
  left, as the presets do); a fused projection feeding all three (SHViT's ``qkv``, LiteMLA's
  ``qkv``) takes one LoRA over all its outputs (a convolution takes no q / v slices), or its q and
  v thirds when every one is an ``nn.Linear`` of ``out = 3 x in`` (CoaT's ``qkv``); a query from
  outside the module (GCViT's global query) gets none; grouped convolutions are left out (Conv2d
  LoRA takes ``groups=1``);
- MLP: in every block of the lists that hold an attention module, the pairs of projections
  (``nn.Linear`` or 1x1 ``nn.Conv2d``) widening ``c -> h`` then narrowing ``h -> c`` outside the
  attention (CoaT's parallel blocks hold three); in a block with none, the bottleneck's pair
  narrowing (or keeping) then widening back (HaloNet's ``conv1_1x1`` / ``conv3_1x1`` around its attention); none
  found: no placement (the refusal names the attention's projections);
- adapters: after each attention module and beside each MLP when every projection is an
  ``nn.Linear``; refused with the reason when the attention works on (N, C, H, W) maps.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .attention_trace import AttentionTrace
from .coverage import attention_modules
from .family import BackboneFamily

__all__ = ["TracedFamily", "attention_roles", "traced_family"]

_NCHW = (
    "its attention works on (N, C, H, W) maps with convolution projections, while an adapter is a bottleneck "
    "over the last axis of (..., C) features; use the LoRA presets (Conv2d LoRA per modality)"
)


@dataclass(frozen=True)
class TracedFamily(BackboneFamily):
    """A family whose parts are lists of full module names (found by a trace, not by suffixes):
    ``parts`` maps "q", "v", "mlp_in", "mlp_out", "attn", "mlp" to them."""

    parts: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def targets(self, *parts: str) -> list[str]:  # type: ignore[override]
        table = dict(self.parts)
        return [n for p in parts for n in table.get(p, ())]


def attention_roles(model: nn.Module, in_channels: int, size: tuple[int, int]) -> dict[str, dict[str, set[str]]]:
    """{attention module: {"q" | "k" | "v": projections feeding it}} of one shape-only forward on a
    (1, in_channels, H, W) input (empty when the model cannot run there). An attention module named
    like one that multiplies no two activations (SwiftFormer's additive attention) gets its input
    projections (those fed from outside it) as q."""
    return _traced_roles(model, in_channels, size)[0]


def _traced_roles(
    model: nn.Module, in_channels: int, size: tuple[int, int]
) -> tuple[dict[str, dict[str, set[str]]], dict[str, frozenset[str]]]:
    """(:func:`attention_roles`, {projection: projections feeding its input}) of one trace."""
    from .shapes import meta_forward

    modes = [(m, m.training) for m in model.modules()]
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    trace = AttentionTrace(model)
    try:
        model.eval()
        meta_forward(model, [(1, in_channels, *size)], p.dtype if p is not None else None, inner=trace)  # type: ignore[arg-type]
    except Exception:
        return {}, {}
    finally:
        trace.close()
        for m, training in modes:
            m.training = training
    roles = dict(trace.roles)
    for a in attention_modules(model):
        if a not in roles:
            first = {p for p, src in trace.fed_by.items() if p.startswith(a + ".") and not _inside(src, a)}
            roles[a] = {"q": first, "k": set(), "v": set()}
    return roles, dict(trace.fed_by)


def _inside(names: frozenset[str], prefix: str) -> bool:
    return any(n.startswith(prefix + ".") for n in names)


def _projection(m: nn.Module) -> bool:
    """An nn.Linear, or a 1x1 nn.Conv2d of groups 1 (what a LoRA of either kind wraps)."""
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1)


def _through(model: nn.Module, names: set[str], attn: str, fed_by: dict[str, frozenset[str]]) -> set[str]:
    """``names`` inside ``attn``, a depthwise / grouped / spatial convolution replaced by the
    projections feeding it (EfficientViM's ``dw`` after its 1x1 ``BCdt_proj``), up to three steps."""
    out = {n for n in names if n.startswith(attn + ".")}
    for _ in range(3):
        behind = {n for n in out if not _projection(model.get_submodule(n))}
        if not behind:
            break
        out = (out - behind) | {s for n in behind for s in fed_by.get(n, ()) if s.startswith(attn + ".")}
    return out


def _inputs(
    model: nn.Module, attn: str, roles: dict[str, set[str]], fed_by: dict[str, frozenset[str]] | None = None
) -> list[str]:
    """The projections inside ``attn`` feeding q or v (a fused one feeding all three once)."""
    own = {r: _through(model, names, attn, fed_by or {}) for r, names in roles.items()}
    chosen = own["q"] | own["v"] or own["k"]
    return sorted(n for n in chosen if _projection(model.get_submodule(n)))


def _dims(m: nn.Module) -> tuple[int, int]:
    return (m.in_features, m.out_features) if isinstance(m, nn.Linear) else (m.in_channels, m.out_channels)  # type: ignore[return-value]


def _block_of(model: nn.Module, name: str) -> str | None:
    """The child of the innermost nn.ModuleList / nn.Sequential holding ``name`` (its block)."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if isinstance(model.get_submodule(".".join(parts[: i - 1])), (nn.ModuleList, nn.Sequential)):
            return ".".join(parts[:i])
    return None


def _mlp_pairs(block: nn.Module, prefix: str, attention: list[str]) -> list[tuple[str, str]]:
    """Each narrowing projection ``h -> c`` with the latest unused widening ``c -> h`` before it
    (CoaT's parallel blocks hold three MLPs)."""
    lins = [
        (f"{prefix}.{n}", m)
        for n, m in block.named_modules()
        if n and _projection(m) and not any(f"{prefix}.{n}".startswith(a + ".") for a in attention)
    ]
    for widen in (True, False):  # an MLP (c -> h -> c, h > c), else a bottleneck's 1x1s around the attention
        pairs: list[tuple[str, str]] = []
        used: set[str] = set()
        for j, (nj, mj) in enumerate(lins):
            for ni, mi in reversed(lins[:j]):
                (ci, hi), (hj, cj) = _dims(mi), _dims(mj)
                if ni not in used and nj not in used and (hi > ci) == widen and (hj, cj) == (hi, ci):
                    pairs.append((ni, nj))
                    used |= {ni, nj}
                    break
        if pairs:
            return pairs
    return []


def _mlps(model: nn.Module, attention: list[str]) -> list[tuple[str, str]]:
    blocks = {b for b in (_block_of(model, a) for a in attention) if b is not None}
    lists = {b.rpartition(".")[0] for b in blocks}
    siblings = [f"{lst}.{k}" for lst in sorted(lists) for k, _ in model.get_submodule(lst).named_children()]
    return [p for b in siblings for p in _mlp_pairs(model.get_submodule(b), b, attention)]


def _container(a: str, b: str) -> str:
    pa, pb = a.split("."), b.split(".")
    common = [x for x, y in zip(pa, pb) if x == y]
    n = next((i for i, (x, y) in enumerate(zip(pa, pb)) if x != y), len(common))
    return ".".join(pa[:n])


def traced_family(model: nn.Module, in_channels: int, size: tuple[int, int]) -> TracedFamily | None:
    """The presets' modules found from what ``model``'s attention computes (see the module's doc);
    None when no attention module has a projection to adapt or no MLP is found."""
    roles, fed_by = _traced_roles(model, in_channels, size)
    inputs = {a: _inputs(model, a, r, fed_by) for a, r in roles.items()}
    attention = [a for a, names in inputs.items() if names]
    pairs = _mlps(model, list(roles))
    if not attention or not pairs:
        return None
    projections = [n for a in attention for n in inputs[a]] + [n for p in pairs for n in p]
    linear = all(isinstance(model.get_submodule(n), nn.Linear) for n in projections)
    containers = [_container(*p) for p in pairs]
    refused = None if linear and all(c and not any(a.startswith(c + ".") for a in roles) for c in containers) else _NCHW
    classes = sorted({type(model.get_submodule(a)).__name__ for a in attention})
    chosen = tuple(n for a in attention for n in inputs[a])
    fused = all(len(inputs[a]) == 1 and _thirds(model.get_submodule(inputs[a][0])) for a in attention)
    parts = (
        ("qkv" if fused else "q", chosen),  # fused linears (out = 3 x in): LoRA on their q and v thirds
        ("v", ()),
        ("mlp_in", tuple(p[0] for p in pairs)),
        ("mlp_out", tuple(p[1] for p in pairs)),
        ("attn", tuple(attention)),
        ("mlp", tuple(containers)),
    )
    note = (
        f"placed by what its attention computes: {len(attention)} attention modules ({', '.join(classes)}), LoRA on "
        f"the projections feeding q and v ({_short(inputs[attention[0]], attention[0])} in {attention[0]}; "
        f"{'q and v thirds of a fused linear' if fused else 'a fused one whole'}), {len(pairs)} MLP pairs "
        f"({', '.join(pairs[0])}, ...)"
    )
    return TracedFamily(
        "traced",
        "qkv" if fused else None,
        "mlp_in",
        "mlp_out",
        "attn",
        "mlp",
        q=None if fused else "q",
        v=None if fused else "v",
        adapter_refused=refused,
        note=note,
        parts=parts,
    )


def _thirds(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) and m.out_features == 3 * m.in_features


def _short(names: tuple[str, ...] | list[str], prefix: str) -> str:
    return ", ".join(re.sub("^" + re.escape(prefix + "."), "", n) for n in names)


def traced_placement(model: nn.Module) -> TracedFamily | None:
    """:func:`traced_family` at the model's own input size and channels, announced by a
    :class:`~mmpeft.targeting.structure.StructuralFamilyWarning` naming the chosen modules."""
    from .inputs import choose_size, infer_in_channels
    from .structure import warn_structural

    channels = infer_in_channels(model, None) or 3
    family = traced_family(model, channels, choose_size(model, channels))
    if family is not None:
        warn_structural(
            f"no known ViT family matches {type(model).__name__}; {family.note}. List them with "
            "mmpeft.plan_targets(model, ...); pass targets= to choose others"
        )
    return family
