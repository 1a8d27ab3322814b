"""The packages of the core (docs/architecture.md, "Inside the core"), checked on the source:
no import circle between ``mmpeft`` modules, and a package imports only the packages it may.

Every import is counted, at module level and inside functions (a lazy import is still a
dependency), relative ones resolved. An import of a package counts as an edge to its
``__init__``; ``from . import x`` as an edge to module ``x``, or to the package's ``__init__``
when ``x`` is a name there (``from . import __version__`` imports ``mmpeft/__init__``, which
imports everything). A package's ``__init__`` importing its own submodules is an ordinary edge.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.isprs import test_architecture as arch

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


def test_no_import_circle_inside_the_core() -> None:
    assert import_cycles(core_graph(core_files())) == []


def test_core_imports_follow_the_stated_direction() -> None:
    assert forbidden_imports(core_files()) == []


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
