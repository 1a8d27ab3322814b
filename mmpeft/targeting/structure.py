"""Placement by structure: where the presets go in a transformer of no known family.

:func:`find_structure` reads the module tree (no forward is run):

- the repeated blocks: the innermost ``nn.ModuleList`` / ``nn.Sequential`` lists of modules of one
  class, each holding 3 or more ``nn.Linear``, 2 or more such modules in all (one per list is
  enough: CoaT-lite's stages); all such lists must hold one class;
- inside the first block, with its ``nn.Linear`` modules in registration order:
  the MLP pair, a Linear ``in -> h`` (``h > in``) followed later by ``h -> in`` (for each
  narrowing Linear the latest matching widening one before it; a second pair is ambiguous; a
  second ``in -> h`` Linear in the MLP's module is its gate, as SwiGLU's ``fc1_g``);
  the attention before it: a fused qkv (``out = 3 x in``, names containing ``qkv`` / ``in_proj``
  preferred), else q and v by name (ending in ``q`` / ``q_proj`` / ``query``, ``v`` / ``v_proj`` /
  ``value``; a fused ``kv`` with ``q``), else by position when the attention holds exactly four
  Linears (q, k, v, output); its output projection is the first Linear back to the block width
  after them;
- the module an "after" adapter follows: the smallest submodule holding the attention's
  linears, or the output projection when that is the block itself, holds the MLP, ends in
  another Linear, or returns a tuple (read off its ``forward``'s source);
- the module a "beside" adapter runs parallel to: the smallest submodule holding the MLP's
  linears (none but the block: the adapter presets are refused with the reason).

Every block must have the chosen names. Anything else raises :class:`StructureError` saying what
was found. Names are relative to a block; :attr:`Structure.scope` is the regex of the blocks.
"""

from __future__ import annotations

import ast
import inspect
import re
import sys
import textwrap
import warnings
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import MmpeftValueError, MmpeftWarning

__all__ = ["Structure", "StructureError", "StructuralFamilyWarning", "find_structure", "warn_structural"]

_Q = re.compile(r"(^|_)(q|q_proj|query)$")
_V = re.compile(r"(^|_)(v|v_proj|value)$")
_KV = re.compile(r"(^|_)(kv|kv_proj)$")
_FUSED = ("qkv", "in_proj")
_Lins = list[tuple[str, nn.Linear]]


class StructureError(MmpeftValueError):
    """The module tree does not say where the presets go (the message says what was found)."""


class StructuralFamilyWarning(MmpeftWarning):
    """A model of no known family was placed by structure (the message lists the chosen modules)."""


def warn_structural(summary: str, category: type[Warning] = StructuralFamilyWarning) -> None:
    """Issue ``summary`` as a ``category`` warning (a :class:`StructuralFamilyWarning` by default)
    pointing at the first caller outside mmpeft."""
    level, frame = 2, sys._getframe(1)  # stacklevel 2: the caller of this function
    while frame is not None and str(frame.f_globals.get("__name__", "")).split(".")[0] == "mmpeft":
        level, frame = level + 1, frame.f_back  # type: ignore[assignment]
    warnings.warn(summary, category, stacklevel=level)


@dataclass(frozen=True)
class Structure:
    """The preset's modules found by structure; names relative to a block."""

    lists: tuple[str, ...]
    n_blocks: int
    block_class: str
    scope: str
    width: int
    qkv: str | None
    q: str | None
    v: str | None
    kv: str | None
    out_proj: str
    mlp_in: str
    mlp_out: str
    mlp_gate: str | None
    hidden: int
    attn: str
    mlp: str
    adapter_refused: str | None

    def family_fields(self) -> dict[str, Any]:
        """Keyword arguments of :class:`mmpeft.targeting.targets.BackboneFamily` (all but the name)."""
        return dict(
            qkv=self.qkv,
            q=self.q,
            v=self.v,
            kv=self.kv,
            mlp_in=self.mlp_in,
            mlp_out=self.mlp_out,
            mlp_gate=self.mlp_gate,
            attn=self.attn,
            mlp=self.mlp,
            scope=self.scope,
            adapter_refused=self.adapter_refused,
            note=f"placed by structure in {self.block_class} blocks",
        )

    def summary(self, model: str = "the model") -> str:
        """One paragraph naming the chosen modules."""
        if self.qkv is not None:
            attn = f"fused qkv {self.qkv} (LoRA on its q and v thirds)"
        else:
            attn = f"q {self.q} and {'v half of kv ' + str(self.kv) if self.kv else 'v ' + str(self.v)}"
        gate = f", gate {self.mlp_gate}" if self.mlp_gate else ""
        beside = f"beside {self.mlp}" if self.adapter_refused is None else "no 'beside' adapter (no MLP module)"
        return (
            f"no known ViT family matches {model}; placed by structure in {self.n_blocks} {self.block_class} "
            f"blocks ({', '.join(self.lists)}; width {self.width}): attention {attn}, output projection "
            f"{self.out_proj}; MLP {self.mlp_in} ({self.width} -> {self.hidden}) and {self.mlp_out}{gate}; "
            f"adapters after {self.attn}, {beside}. List them with mmpeft.plan_targets(model, ...); pass "
            "targets= or register a BackboneFamily (mmpeft.register_family) to choose others"
        )


def _n_linear(m: nn.Module) -> int:
    return sum(isinstance(x, nn.Linear) for x in m.modules())


def _is_block_list(m: nn.Module) -> bool:
    kids = list(m.children())
    if not isinstance(m, (nn.ModuleList, nn.Sequential)) or not kids:
        return False
    return all(type(k) is type(kids[0]) for k in kids) and _n_linear(kids[0]) >= 3


_Blocks = list[tuple[str, list[tuple[str, nn.Module]]]]  # (list name, [(child name, block)])


def _block_lists(model: nn.Module) -> _Blocks:
    """Every list holding blocks of the class of the innermost repeated lists (a stage of one block
    too: CoaT-lite's ``serial_blocks1`` .. ``4`` hold one block each at depth 1)."""
    found = [(n, m) for n, m in model.named_modules() if _is_block_list(m)]
    count: dict[type, int] = {}
    for _, m in found:
        count[type(next(iter(m.children())))] = count.get(type(next(iter(m.children()))), 0) + len(m)
    found = [(n, m) for n, m in found if count[type(next(iter(m.children())))] >= 2]  # blocks repeat
    inner = [(n, m) for n, m in found if not any(o != n and o.startswith(n + "." if n else "") for o, _ in found)]
    classes = sorted({type(next(iter(m.children()))).__name__ for _, m in inner})
    if not inner:
        raise StructureError(
            "no repeated blocks (2 or more modules of one class in nn.ModuleList / nn.Sequential lists, each "
            "holding 3 or more nn.Linear)"
        )
    if len(classes) > 1:
        raise StructureError(f"repeated blocks of {len(classes)} classes {classes} in {[n for n, _ in inner]}")
    cls = type(next(iter(inner[0][1].children())))
    lists = [
        (n, [(k, c) for k, c in m.named_children() if type(c) is cls])
        for n, m in model.named_modules()
        if isinstance(m, (nn.ModuleList, nn.Sequential))
    ]
    return [(n, kids) for n, kids in lists if kids]


def _scope(lists: _Blocks) -> str:
    """Regex of the blocks' names: the lists' names (indices as ``\\d+``), then a child's name."""
    pats = sorted({r"\.".join(r"\d+" if p.isdigit() else re.escape(p) for p in n.split(".")) for n, _ in lists})
    kids = sorted({k for _, ks in lists for k, _ in ks})
    kid = r"\d+" if all(k.isdigit() for k in kids) else "(?:" + "|".join(re.escape(k) for k in kids) + ")"
    pats = [p + r"\." + kid if p else kid for p in pats]
    return pats[0] if len(pats) == 1 else "(?:" + "|".join(pats) + ")"


def _last(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _is_attention_name(name: str) -> bool:
    last = _last(name)
    return any(t in last for t in _FUSED) or any(r.search(last) for r in (_Q, _V, _KV))


def _mlp_pair(lins: _Lins) -> tuple[int, int]:
    pairs = []
    for j, (_, mj) in enumerate(lins):
        if mj.in_features <= mj.out_features:
            continue
        for i in range(j - 1, -1, -1):
            ni, mi = lins[i]
            if (mi.in_features, mi.out_features) == (mj.out_features, mj.in_features):
                if not _is_attention_name(ni):
                    pairs.append((i, j))
                break
    if len(pairs) != 1:
        what = [f"{lins[i][0]} -> {lins[j][0]}" for i, j in pairs]
        raise StructureError(
            f"{'two or more candidate MLP pairs ' + str(what) if pairs else 'no MLP pair'} (a Linear in -> h, "
            f"h > in, followed by h -> in) among the block's linears {_shapes(lins)}"
        )
    return pairs[0]


def _shapes(lins: _Lins) -> list[str]:
    return [f"{n} ({m.in_features} -> {m.out_features})" for n, m in lins]


def _attention_inputs(region: _Lins, d: int) -> dict[str, str | None]:
    """{qkv, q, v, kv}: the attention's input projections among ``region`` (the Linears before the MLP)."""
    fused = [n for n, m in region if m.in_features == d and m.out_features == 3 * d]
    named = [n for n in fused if any(t in _last(n) for t in _FUSED)] or fused
    if len(named) == 1:
        return {"qkv": named[0], "q": None, "v": None, "kv": None}
    if len(named) > 1:
        raise StructureError(f"two or more fused qkv candidates (out = 3 x in): {named}")
    qs, vs, kvs = ([n for n, m in region if r.search(_last(n))] for r in (_Q, _V, _KV))
    if len(qs) == 1 and len(vs) == 1:
        return {"qkv": None, "q": qs[0], "v": vs[0], "kv": None}
    if len(qs) == 1 and len(kvs) == 1 and dict(region)[kvs[0]].out_features == 2 * dict(region)[kvs[0]].in_features:
        return {"qkv": None, "q": qs[0], "v": None, "kv": kvs[0]}
    ms = [m for _, m in region]
    square = len(ms) == 4 and all(m.in_features == d and m.out_features == ms[0].out_features for m in ms[:3])
    if square and (ms[3].in_features, ms[3].out_features) == (ms[0].out_features, d):  # q, k, v, output by position
        return {"qkv": None, "q": region[0][0], "v": region[2][0], "kv": None}
    raise StructureError(
        f"no attention before the MLP: no fused qkv (out = 3 x in), no q / v linears by name (q, q_proj, "
        f"query / v, v_proj, value) and not exactly four linears q, k, v, output; found {_shapes(region)}"
    )


def _container(names: list[str]) -> str:
    parents = [n.split(".")[:-1] for n in names]
    common = []
    for parts in zip(*parents):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    return ".".join(common)


def _forward_ast(module: nn.Module) -> ast.FunctionDef | None:
    try:
        fn = ast.parse(textwrap.dedent(inspect.getsource(type(module).forward))).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return None
    return fn if isinstance(fn, ast.FunctionDef) else None


def _returns_tuple(module: nn.Module) -> bool:
    """Whether ``forward`` is annotated to return a tuple or returns a tuple display (source read)."""
    fn = _forward_ast(module)
    if fn is None:
        return False
    if fn.returns is not None and re.search(r"\b[Tt]uple\b", ast.unparse(fn.returns)):
        return True
    return any(isinstance(n, ast.Return) and isinstance(n.value, ast.Tuple) for n in ast.walk(fn))


def _reads_attributes(parent: nn.Module, child: str) -> bool:
    """Whether ``parent.forward`` reads an attribute of ``self.<child>`` other than calling it
    (Hiera's block reads ``self.attn.q_stride``: an adapter in the attention's place would hide it)."""
    fn = _forward_ast(parent)
    if fn is None:
        return False
    calls = {id(n.func) for n in ast.walk(fn) if isinstance(n, ast.Call)}
    return any(
        isinstance(n, ast.Attribute)
        and id(n) not in calls
        and isinstance(n.value, ast.Attribute)
        and n.value.attr == child
        and isinstance(n.value.value, ast.Name)
        and n.value.value.id == "self"
        for n in ast.walk(fn)
    )


def _after(block: nn.Module, lins: _Lins, attn_names: list[str], out_proj: str, mlp_in: str) -> str:
    where = _container([*attn_names, out_proj])
    if not where or mlp_in.startswith(where + "."):
        return out_proj
    inside = [n for n, _ in lins if n.startswith(where + ".")]
    parent = block.get_submodule(where.rpartition(".")[0])
    if inside[-1] != out_proj or _returns_tuple(block.get_submodule(where)) or _reads_attributes(parent, _last(where)):
        return out_proj
    return where


def _beside(lins: _Lins, mlp_names: list[str], attn_names: list[str]) -> tuple[str, str | None]:
    where = _container(mlp_names)
    if where and not any(n.startswith(where + ".") for n in attn_names):
        return where, None
    return mlp_names[-2], (
        f"the MLP linears {mlp_names} have no module of their own in the block, so no 'beside' adapter can run "
        "parallel to the MLP; use the LoRA presets, or pass targets= with placement="
    )


def _analyse(block: nn.Module) -> dict[str, Any]:
    lins: _Lins = [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    i, j = _mlp_pair(lins)
    (mlp_in, m_in), (mlp_out, _) = lins[i], lins[j]
    d, h = m_in.in_features, m_in.out_features
    box = _container([mlp_in, mlp_out])
    gates = [n for n, m in lins[:i] if box and n.startswith(box + ".") and (m.in_features, m.out_features) == (d, h)]
    gate = gates[0] if len(gates) == 1 else None
    region = [(n, m) for k, (n, m) in enumerate(lins[:i]) if n != gate]
    inputs = _attention_inputs(region, d)
    used = [n for n in inputs.values() if n is not None]
    last = max(k for k, (n, _) in enumerate(region) if n in used)
    outs = [n for n, m in region[last + 1 :] if m.out_features == d]
    if not outs:
        raise StructureError(f"no attention output projection (a Linear back to width {d}) after {used}")
    mlp, refused = _beside(lins, [n for n in (gate, mlp_in, mlp_out) if n], used)
    after = _after(block, lins, used, outs[0], mlp_in)
    return dict(
        inputs,
        out_proj=outs[0],
        mlp_in=mlp_in,
        mlp_out=mlp_out,
        mlp_gate=gate,
        width=d,
        hidden=h,
        attn=after,
        mlp=mlp,
        adapter_refused=refused,
    )


def _check_blocks(lists: _Blocks, found: dict[str, Any]) -> list[str]:
    names = [found[k] for k in ("qkv", "q", "v", "kv", "out_proj", "mlp_in", "mlp_out", "mlp_gate") if found[k]]
    blocks = [(f"{ln}.{bn}" if ln else bn, b) for ln, kids in lists for bn, b in kids]
    for qual, block in blocks:
        have = {n for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        missing = [n for n in names if n not in have]
        if missing:
            raise StructureError(f"the blocks differ: {qual} has no nn.Linear {missing} (found in the first block)")
    return [q for q, _ in blocks]


def find_structure(model: nn.Module) -> Structure:
    """The preset's modules in ``model``, found by structure (see the module's doc).

    Raises :class:`StructureError` saying what was found when the structure is ambiguous: no
    repeated blocks, two candidate MLP pairs, no attention, blocks that differ.
    """
    lists = _block_lists(model)
    name, first = lists[0][1][0]
    try:
        found = _analyse(first)
    except StructureError as err:
        name = f"{lists[0][0]}.{name}" if lists[0][0] else name
        raise StructureError(f"in block {name} ({type(first).__name__}): {err}") from None
    blocks = _check_blocks(lists, found)
    return Structure(
        lists=tuple(n or "<model>" for n, _ in lists),
        n_blocks=len(blocks),
        block_class=type(first).__name__,
        scope=_scope(lists),
        **found,
    )
