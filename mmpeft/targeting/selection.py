"""Which modules a wrap tunes, written as peft users write it.

``targets="all-linear"`` (peft's shorthand), ``exclude`` (peft's ``exclude_modules``),
``layers`` / ``layers_pattern`` (peft's ``layers_to_transform`` / ``layers_pattern``) and, for
LoRA, ``rank_pattern`` / ``alpha_pattern``. :func:`resolve_rules` turns the rules of a preset or
of ``targets`` plus these options into rules with explicit module names, one rule per distinct
(rank, alpha), so the saved :class:`~mmpeft.MultimodalConfig` says exactly what was wrapped.
Every option must take effect: an ``exclude`` that removes nothing, a block index that does not
exist, a pattern key that matches no selected module are errors naming them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..config import RuleConfig
from ..errors import MmpeftTypeError, MmpeftValueError
from ..tuners import method_of
from ..tuners.options import Targets, check_targets
from ..utils import check_int, check_number
from .targets import _matches, match_targets

__all__ = [
    "ALL_LINEAR",
    "DEFAULT_LAYERS_PATTERN",
    "SELECTION_OPTIONS",
    "Selection",
    "all_linear",
    "is_all_linear",
    "layer_index",
    "output_heads",
    "pattern_key",
    "resolve_rules",
]

ALL_LINEAR = "all-linear"  # peft's INCLUDE_LINEAR_LAYERS_SHORTHAND
#: names of the numbered block lists searched, in order, when ``layers_pattern`` is not given
DEFAULT_LAYERS_PATTERN = ("blocks", "layers", "layer")
SELECTION_OPTIONS = ("exclude", "layers", "layers_pattern", "rank_pattern", "alpha_pattern")
#: the rule field each pattern option overrides (the option is refused for a method without it)
PATTERN_FIELDS = {"rank_pattern": "rank", "alpha_pattern": "alpha"}
_HEAD_ATTRIBUTES = ("classifier", "score", "heads")  # transformers' (peft's SEQ_CLS) and torchvision's heads


def is_all_linear(targets: Any) -> bool:
    """``targets`` is peft's ``"all-linear"`` shorthand (any case, as peft)."""
    return isinstance(targets, str) and targets.lower() == ALL_LINEAR


def _under(name: str, roots: Sequence[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def _call(model: nn.Module, method: str) -> Any:
    fn = getattr(model, method, None)
    try:
        return fn() if callable(fn) else None
    except (NotImplementedError, AttributeError):
        return None


def output_heads(model: nn.Module) -> list[str]:
    """Names of the model's output layers, which ``"all-linear"`` leaves out: transformers'
    ``get_output_embeddings()`` (peft's rule), its ``classifier`` / ``score`` (peft's rule for
    sequence classification), timm's ``get_classifier()`` and torchvision's ``heads``."""
    heads = [_call(model, "get_output_embeddings"), _call(model, "get_classifier")]
    heads += [getattr(model, a, None) for a in _HEAD_ATTRIBUTES]
    ids = {id(h) for h in heads if isinstance(h, nn.Module) and h is not model}
    return [n for n, m in model.named_modules() if n and id(m) in ids]


def all_linear(model: nn.Module, modules_to_save: Targets | None = None) -> list[str]:
    """The modules ``"all-linear"`` selects: every ``nn.Linear`` but the output layers
    (:func:`output_heads`), the modules that train in full (``modules_to_save``, as peft) and the
    linears inside an ``nn.MultiheadAttention`` (it reads their weights, a layer there is bypassed)."""
    named = [(n, m) for n, m in model.named_modules() if n]
    skip = output_heads(model) + [n for n, m in named if isinstance(m, nn.MultiheadAttention)]
    if modules_to_save is not None:
        skip += [n for n, _ in named if _matches(n, modules_to_save)]
    names = [n for n, m in named if isinstance(m, nn.Linear) and not _under(n, skip)]
    if not names:
        raise MmpeftValueError(f"targets='all-linear' finds no nn.Linear in {type(model).__name__} outside {skip[:5]}")
    return names


def layer_index(name: str, patterns: Sequence[str] = DEFAULT_LAYERS_PATTERN) -> int | None:
    """The index of the block ``name`` is in: the number after the first ``<pattern>.`` (the
    first pattern that matches, as peft's ``layers_pattern``); None outside numbered blocks."""
    for pattern in patterns:
        match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
        if match is not None:
            return int(match["idx"])
    return None


def pattern_key(keys: Sequence[str], name: str) -> str | None:
    """The first key of a rank / alpha pattern that matches the end of ``name`` (peft's
    ``get_pattern_key``: ``re.match(rf"(.*\\.)?({key})$", name)``), or None."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def _int_list(name: str, value: Any) -> list[int]:
    values = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(values, (list, tuple)) or not values:
        raise MmpeftTypeError(f"{name} must be a block index or a non-empty list of them, got {value!r}")
    return [check_int(name, v, minimum=0) for v in values]


def _patterns(name: str, value: Any, check: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not value or not all(isinstance(k, str) and k for k in value):
        raise MmpeftTypeError(f"{name} must be a non-empty {{pattern: value}} dict with string keys, got {value!r}")
    for key in value:
        try:
            re.compile(rf"(.*\.)?({key})$")  # as pattern_key matches it
        except re.error as err:
            raise MmpeftValueError(
                f"{name} key {key!r} is not a valid regular expression ({err}); a key is a regex matched against "
                "the end of module names: escape special characters (re.escape) or write a plain name"
            ) from None
    return {k: check(f"{name}[{k!r}]", v) for k, v in value.items()}


@dataclass
class Selection:
    """The wrap's selection options (see the module docstring); all None / empty: none given."""

    exclude: Targets | None = None
    layers: list[int] | None = None
    layers_pattern: list[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    @classmethod
    def parse(cls, options: Mapping[str, Any]) -> Selection:
        """The selection options among ``options`` (other keys ignored; None: not given), checked."""
        got = {k: options[k] for k in SELECTION_OPTIONS if options.get(k) is not None}
        sel = cls(**got)
        if sel.exclude is not None:
            sel.exclude = check_targets(sel.exclude)
        if sel.layers is not None:
            sel.layers = _int_list("layers", sel.layers)
        if sel.layers_pattern is not None:
            if sel.layers is None:
                raise MmpeftValueError("layers_pattern= says where block indices are found; it needs layers= (as peft)")
            lp = [sel.layers_pattern] if isinstance(sel.layers_pattern, str) else list(sel.layers_pattern)
            if not lp or not all(isinstance(p, str) and p for p in lp):
                raise MmpeftTypeError(f"layers_pattern must be a name or a list of names, got {sel.layers_pattern!r}")
            sel.layers_pattern = lp
        if got.get("rank_pattern") is not None:
            sel.rank_pattern = _patterns("rank_pattern", sel.rank_pattern, check_int)
        if got.get("alpha_pattern") is not None:
            sel.alpha_pattern = _patterns("alpha_pattern", sel.alpha_pattern, lambda n, v: check_number(n, v, True))
        return sel

    def given(self) -> list[str]:
        """The names of the options given."""
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) not in (None, {})]


def _candidates(model: nn.Module, rule: RuleConfig, modules_to_save: Targets | None) -> list[str]:
    if is_all_linear(rule.targets):
        return all_linear(model, modules_to_save)
    return match_targets(model, rule.targets, method_of(rule).wraps)


def _exclude(chosen: list[list[str]], exclude: Targets) -> list[list[str]]:
    kept = [[n for n in names if not _matches(n, exclude)] for names in chosen]
    if sum(map(len, kept)) == sum(map(len, chosen)):
        some = sorted({".".join(n.split(".")[-2:]) for names in chosen for n in names})
        raise MmpeftValueError(
            f"exclude={exclude!r} matches none of the modules the targets select (name endings: {some[:20]}): "
            "it would exclude nothing"
        )
    return kept


def _by_layer(chosen: list[list[str]], layers: list[int], patterns: Sequence[str]) -> list[list[str]]:
    found = sorted({i for names in chosen for n in names if (i := layer_index(n, patterns)) is not None})
    if not found:
        raise MmpeftValueError(
            f"layers={layers}: none of the selected modules sits in a numbered block <{'|'.join(patterns)}>.<i>; "
            "pass layers_pattern= with the name of the model's block list"
        )
    missing = [i for i in layers if i not in found]
    if missing:
        raise MmpeftValueError(
            f"layers={layers}: no selected module in block(s) {missing}; the selected modules are in blocks "
            f"{found[0]}..{found[-1]} (layers_pattern {list(patterns)})"
        )
    return [[n for n in names if layer_index(n, patterns) in layers] for names in chosen]


def exact_targets(model: nn.Module, names: list[str]) -> Targets:
    """Targets selecting exactly ``names``: the names themselves, or an anchored regex where a
    name is also the ending of another module's name."""
    if {n for n, _ in model.named_modules() if n and _matches(n, names)} == set(names):
        return list(names)
    return "|".join(re.escape(n) for n in names)


def _split(model: nn.Module, rule: RuleConfig, names: list[str], sel: Selection, used: set[str]) -> list[RuleConfig]:
    """``rule`` on ``names``, one rule per distinct (rank, alpha) the patterns give."""
    groups: dict[tuple[Any, ...], list[str]] = {}
    for n in names:
        values = []
        for option, f in PATTERN_FIELDS.items():
            pattern = getattr(sel, option)
            key = pattern_key(list(pattern), n)
            used.update([f"{option}[{key!r}]"] if key is not None else [])
            values.append(pattern[key] if key is not None else getattr(rule, f, None))
        groups.setdefault(tuple(values), []).append(n)
    out = []
    for values, group in groups.items():
        updates = {f: v for f, v in zip(PATTERN_FIELDS.values(), values) if hasattr(rule, f)}
        out.append(dataclasses.replace(rule, targets=exact_targets(model, group), **updates))
    return out


def resolve_rules(
    model: nn.Module, rules: list[RuleConfig], sel: Selection, modules_to_save: Targets | None = None
) -> list[RuleConfig]:
    """``rules`` restricted by ``sel`` and split by its patterns, each with explicit module names
    (``model`` as it will be wrapped, i.e. prepared). A rule left with no module is dropped."""
    chosen = [_candidates(model, r, modules_to_save) for r in rules]
    if sel.exclude is not None:
        chosen = _exclude(chosen, sel.exclude)
    if sel.layers is not None:
        chosen = _by_layer(chosen, sel.layers, sel.layers_pattern or DEFAULT_LAYERS_PATTERN)
    if rules and not any(chosen):
        raise MmpeftValueError(f"no module is left to tune: {sel.given()} remove every module the targets select")
    used: set[str] = set()
    out = [r for rule, names in zip(rules, chosen) if names for r in _split(model, rule, names, sel, used)]
    unused = [f"{o}[{k!r}]" for o in PATTERN_FIELDS for k in getattr(sel, o) if f"{o}[{k!r}]" not in used]
    if unused:
        selected = [n for names in chosen for n in names]
        raise MmpeftValueError(
            f"{', '.join(unused)} take(s) effect on none of the {len(selected)} selected modules (e.g. "
            f"{selected[:4]}): a key applies to the names that end with it (peft: re.match(rf'(.*\\.)?({{key}})$', "
            "name)), the first matching key of the dict winning"
        )
    return out
