"""The packages of the core (docs/architecture.md, "Inside the core"), checked on the source:
no import circle between ``mmpeft`` modules, and a package imports only the packages it may.

Every import is counted, at module level and inside functions (a lazy import is still a
dependency), relative ones resolved. An import of a package counts as an edge to its
``__init__``; ``from . import x`` as an edge to module ``x``, or to the package's ``__init__``
when ``x`` is a name there (``from . import __version__`` imports ``mmpeft/__init__``, which
imports everything). A package's ``__init__`` importing its own submodules is an ordinary edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests import source_graph as arch

# core package -> its modules (a module belongs to the longest prefix; the package ``mmpeft``
# itself, its ``__init__``, is the public API on top)
CORE_PACKAGES: dict[str, tuple[str, ...]] = {
    "base": ("mmpeft._version", "mmpeft.errors", "mmpeft.utils"),
    "tuners": ("mmpeft.tuners",),
    "config": ("mmpeft.config",),
    "backbones": ("mmpeft.backbones",),
    "runtime": ("mmpeft.runtime",),
    "targeting": ("mmpeft.targeting",),
    "model": ("mmpeft.model",),
    "interop": ("mmpeft.interop",),
    "api": ("mmpeft",),
}
#: the stated direction: which packages each package may import (besides its own modules)
MAY_IMPORT: dict[str, frozenset[str]] = {
    "base": frozenset(),
    "tuners": frozenset({"base"}),
    "config": frozenset({"tuners", "base"}),
    "backbones": frozenset({"base"}),
    "runtime": frozenset({"config", "tuners", "base"}),
    "targeting": frozenset({"runtime", "backbones", "config", "tuners", "base"}),
    "model": frozenset({"targeting", "runtime", "config", "tuners", "base"}),
    "interop": frozenset({"model", "targeting", "runtime", "backbones", "config", "tuners", "base"}),
    "api": frozenset(CORE_PACKAGES) - {"api"},
}


def core_package_of(module: str) -> str | None:
    if module == "mmpeft":
        return "api"
    hits = [
        (p, pkg)
        for pkg, ps in CORE_PACKAGES.items()
        if pkg != "api"
        for p in ps
        if module == p or module.startswith(p + ".")
    ]
    return max(hits, key=lambda h: len(h[0]))[1] if hits else None


def core_files() -> list[Path]:
    return sorted((arch.ROOT / "mmpeft").rglob("*.py"))


def resolve(target: str, modules: set[str]) -> str | None:
    """The module an import runs: ``mmpeft.tuners`` is the package (its ``__init__``);
    ``mmpeft.__version__`` (from ``from . import __version__``) is a name in ``mmpeft``."""
    parts = target.split(".")
    while parts and ".".join(parts) not in modules:
        parts.pop()
    return ".".join(parts) or None


def core_graph(files: list[Path]) -> dict[str, dict[str, int]]:
    """module -> {imported core module: line of the first such import}."""
    modules = {arch.module_name(p) for p in files}
    graph: dict[str, dict[str, int]] = {}
    for path in files:
        edges = graph.setdefault(arch.module_name(path), {})
        for line, target in arch.imports_of(path):
            if target.split(".")[0] == "mmpeft" and (mod := resolve(target, modules)):
                edges.setdefault(mod, line)
    return graph


def import_cycles(graph: dict[str, dict[str, int]]) -> list[str]:
    """Each circle found by a depth-first search, as ``a -> b -> a``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    found: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                found.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def forbidden_imports(files: list[Path]) -> list[str]:
    """Imports against the stated direction (``MAY_IMPORT``), or of modules in no package."""
    problems, paths = [], {arch.module_name(p): p.relative_to(arch.ROOT) for p in files}
    for mod, edges in core_graph(files).items():
        own = core_package_of(mod)
        for target, line in sorted(edges.items()):
            other = core_package_of(target)
            where = f"{paths[mod]}:{line}: {own} ({mod}) imports {other} ({target})"
            if own is None or other is None:
                problems.append(
                    where + ": module in no core package (add it to CORE_PACKAGES and docs/architecture.md)"
                )
            elif other != own and other not in MAY_IMPORT[own]:
                problems.append(where + f": {own} may import only {sorted(MAY_IMPORT[own])}")
    return problems


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _imported(tree: ast.AST, package: str, modules: set[str]) -> tuple[dict[str, str], list[tuple[int, str, str]]]:
    """(local name -> the core module an import binds it to, [(line, module, private name)] taken
    by name: ``from ..targeting.inject import _owners``). ``package``: the one relative imports start in."""
    bound: dict[str, str] = {}
    taken: list[tuple[int, str, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                bound[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = parts[: len(parts) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            for a in node.names:
                if f"{target}.{a.name}" in modules:
                    bound[a.asname or a.name] = f"{target}.{a.name}"
                elif _private(a.name) and (owner := resolve(target, modules)):
                    taken.append((node.lineno, owner, a.name))
    return bound, taken


def _module_named(node: ast.expr, bound: dict[str, str], modules: set[str]) -> str | None:
    """The core module an expression ``a.b.c`` names through an import (``inject``,
    ``mmpeft.targeting.inject``), else None."""
    chain: list[str] = []
    while isinstance(node, ast.Attribute):
        chain.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in bound:
        return None
    target = ".".join([bound[node.id], *reversed(chain)])
    return target if target in modules else None


def private_uses(files: list[Path]) -> list[str]:
    """Private names (``_x``, not dunders) a core module takes from a module of another core
    package: imported by name, or read as an attribute of an imported module (``inject._owners``)."""
    modules = {arch.module_name(p) for p in files}
    problems = []
    for path in files:
        mod = arch.module_name(path)
        tree = ast.parse(path.read_text(), str(path))
        bound, taken = _imported(tree, mod if path.name == "__init__.py" else mod.rpartition(".")[0], modules)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                owner = _module_named(node.value, bound, modules)
                if owner is not None:
                    taken.append((node.lineno, owner, node.attr))
        own = core_package_of(mod)
        for line, owner, name in sorted(taken):
            other = core_package_of(owner)
            if other != own:
                where = f"{path.relative_to(arch.ROOT)}:{line}: {own} ({mod})"
                problems.append(f"{where} uses {name}, private to {other} ({owner}): give it a public name there")
    return problems


def test_no_import_circle_inside_the_core() -> None:
    assert import_cycles(core_graph(core_files())) == []


def test_core_imports_follow_the_stated_direction() -> None:
    assert forbidden_imports(core_files()) == []


def test_no_private_name_is_used_across_packages() -> None:
    """A package reads another's internals only through public names (``_x`` may change freely)."""
    assert private_uses(core_files()) == []


def test_the_stated_direction_has_no_circle_and_is_drawn_in_the_docs() -> None:
    """MAY_IMPORT is itself one-way (a package never reaches itself), and docs/architecture.md
    gives each package one line with what it may import."""
    graph = {pkg: {other: 0 for other in allowed} for pkg, allowed in MAY_IMPORT.items()}
    assert import_cycles(graph) == []
    text = (arch.ROOT / "docs" / "architecture.md").read_text()
    for pkg in CORE_PACKAGES:
        if pkg not in ("api", "base"):
            assert f"`mmpeft/{pkg}/`" in text or f"`mmpeft/{pkg}.py`" in text, (
                f"docs/architecture.md does not draw {pkg}"
            )


def _fake_core(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: dict[str, str]) -> list[Path]:
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.setattr(arch, "ROOT", tmp_path)
    return core_files()


def test_the_checker_catches_an_import_circle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A circle through a lazy import, and one through the package ``__init__`` (``from . import __version__``)."""
    files = _fake_core(
        tmp_path,
        monkeypatch,
        {
            "mmpeft/__init__.py": "__version__ = '0'\nfrom .model.multimodal import Model\n",
            "mmpeft/model/__init__.py": "",
            "mmpeft/model/multimodal.py": "from .saving import save\n",
            "mmpeft/model/saving.py": "from .. import __version__\n",
            "mmpeft/model/io.py": "from ..utils import f\n",
            "mmpeft/utils.py": "def g():\n    from mmpeft.model.wrap import w\n",
            "mmpeft/model/wrap.py": "from . import io\n",
            "mmpeft/tuners/__init__.py": "from .base import Layer\n",
            "mmpeft/tuners/base.py": "from .fusion import Fusion\n",  # a package's own submodules: no circle
            "mmpeft/tuners/fusion.py": "",
        },
    )
    cycles = import_cycles(core_graph(files))
    assert cycles == [
        "mmpeft -> mmpeft.model.multimodal -> mmpeft.model.saving -> mmpeft",
        "mmpeft.model.io -> mmpeft.utils -> mmpeft.model.wrap -> mmpeft.model.io",
    ], cycles


def test_the_checker_catches_an_import_against_the_direction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runtime importing the model (inside a function), the tuners importing the config, an unlisted module."""
    files = _fake_core(
        tmp_path,
        monkeypatch,
        {
            "mmpeft/__init__.py": "from .model.wrap import wrap\n",
            "mmpeft/model/wrap.py": "from .multimodal import Model\nfrom ..tuners import Layer\n",  # allowed
            "mmpeft/model/multimodal.py": "",
            "mmpeft/config.py": "",
            "mmpeft/runtime/stems.py": "def f():\n    from ..model.multimodal import Model\n",
            "mmpeft/tuners/__init__.py": "from ..config import Config\n",
            "mmpeft/novel.py": "from .utils import f\n",
        },
    )
    found = forbidden_imports(files)
    assert len(found) == 3, found
    assert any(
        p.startswith("mmpeft/runtime/stems.py:2: runtime (mmpeft.runtime.stems) imports model") for p in found
    ), found
    assert any(
        p.startswith("mmpeft/tuners/__init__.py:1: tuners") and "may import only ['base']" in p for p in found
    ), found
    assert any("mmpeft.novel" in p and "no core package" in p for p in found), found


def test_the_checker_catches_a_private_name_across_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Taken by name (inside a function too), read on a module imported by name, by alias or by
    its dotted path; not: a private name of the same package, a dunder, a private alias."""
    files = _fake_core(
        tmp_path,
        monkeypatch,
        {
            "mmpeft/__init__.py": "from . import __version__\n",
            "mmpeft/targeting/__init__.py": "",
            "mmpeft/targeting/inject.py": "def _owners(): ...\nfrom .probe import _probe\n",  # same package
            "mmpeft/targeting/probe.py": "def _probe(): ...\n",
            "mmpeft/model/__init__.py": "",
            "mmpeft/model/combine.py": "def f():\n    from ..targeting.inject import _owners\n",
            "mmpeft/model/wrap.py": "from ..targeting import inject\nx = inject._owners\n",
            "mmpeft/model/io.py": "import mmpeft.targeting.probe as p\nimport mmpeft\np._probe\nmmpeft.targeting.inject._o\n",
            "mmpeft/model/ok.py": "from ..targeting.inject import owners as _owners\nfrom .io import _local\n",
        },
    )
    found = private_uses(files)
    assert [p.split(": ")[0] for p in found] == [
        "mmpeft/model/combine.py:2",
        "mmpeft/model/io.py:3",
        "mmpeft/model/io.py:4",
        "mmpeft/model/wrap.py:2",
    ], found
    assert "uses _owners, private to targeting (mmpeft.targeting.inject)" in found[0], found
