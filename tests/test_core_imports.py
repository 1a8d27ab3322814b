"""The layers inside the core (docs/architecture.md, "Inside the core"), checked on the source:
no import circle between ``mmpeft`` modules, and imports run one way, from the leaves up.

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

# core layer -> modules (a module belongs to the longest prefix; the package ``mmpeft`` itself,
# its ``__init__``, is the public API on top)
CORE_LAYERS: dict[str, tuple[str, ...]] = {
    "leaves": ("mmpeft._version", "mmpeft.utils", "mmpeft.fusion", "mmpeft.lowrank", "mmpeft.presence",
               "mmpeft.outputs", "mmpeft.batch"),
    "tuners": ("mmpeft.tuners",),
    "config": ("mmpeft.config", "mmpeft.structure", "mmpeft.targets", "mmpeft.selection"),
    "host": ("mmpeft.backbones", "mmpeft.norms", "mmpeft.prepare", "mmpeft.stems", "mmpeft.verify", "mmpeft.probe", "mmpeft.blocks",
             "mmpeft.attention", "mmpeft.checkpointing"),
    "inject": ("mmpeft.inject", "mmpeft.merge", "mmpeft.io"),
    "features": ("mmpeft.features", "mmpeft.saving", "mmpeft.params"),
    "model": ("mmpeft.model",),
    "wrap": ("mmpeft.wrap",),
    "interop": ("mmpeft.peft_interop", "mmpeft.peft_families", "mmpeft.reference", "mmpeft.lockstep_reference"),
    "api": ("mmpeft",),
}  # fmt: skip
CORE_ORDER = list(CORE_LAYERS)  # bottom to top: a layer imports its own and the layers below it


def core_layer_of(module: str) -> str | None:
    if module == "mmpeft":
        return "api"
    hits = [(p, layer) for layer, ps in CORE_LAYERS.items() if layer != "api" for p in ps
            if module == p or module.startswith(p + ".")]  # fmt: skip
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
                found.append(" -> ".join([*path[path.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def upward_imports(files: list[Path]) -> list[str]:
    """Imports that run down the table (a lower layer importing a higher one), or of modules in no layer."""
    problems, paths = [], {arch.module_name(p): p.relative_to(arch.ROOT) for p in files}
    for mod, edges in core_graph(files).items():
        own = core_layer_of(mod)
        for target, line in sorted(edges.items()):
            other = core_layer_of(target)
            where = f"{paths[mod]}:{line}: {own} ({mod}) imports {other} ({target})"
            if own is None or other is None:
                problems.append(where + ": module in no core layer (add it to CORE_LAYERS and docs/architecture.md)")
            elif CORE_ORDER.index(other) > CORE_ORDER.index(own):
                problems.append(where + ": imports run one way, from the leaves up")
    return problems


def test_no_import_circle_inside_the_core() -> None:
    assert import_cycles(core_graph(core_files())) == []


def test_core_imports_run_one_way() -> None:
    assert upward_imports(core_files()) == []


def _fake_core(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: dict[str, str]) -> list[Path]:
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.setattr(arch, "ROOT", tmp_path)
    return core_files()


def test_the_checker_catches_an_import_circle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A circle through a lazy import, and one through the package ``__init__`` (``from . import __version__``)."""
    files = _fake_core(tmp_path, monkeypatch, {
        "mmpeft/__init__.py": "__version__ = '0'\nfrom .model import Model\n",
        "mmpeft/model.py": "from .saving import save\n",
        "mmpeft/saving.py": "from . import __version__\n",
        "mmpeft/io.py": "from .utils import f\n",
        "mmpeft/utils.py": "def g():\n    from mmpeft.wrap import w\n",
        "mmpeft/wrap.py": "from . import io\n",
        "mmpeft/tuners/__init__.py": "from .base import Layer\n",
        "mmpeft/tuners/base.py": "from ..fusion import Fusion\n",  # a package's own submodules: no circle
        "mmpeft/fusion.py": "",
    })  # fmt: skip
    cycles = import_cycles(core_graph(files))
    assert cycles == ["mmpeft -> mmpeft.model -> mmpeft.saving -> mmpeft",
                      "mmpeft.io -> mmpeft.utils -> mmpeft.wrap -> mmpeft.io"], cycles


def test_the_checker_catches_an_upward_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A leaf importing the model (inside a function), the tuners importing the config, an unlisted module."""
    files = _fake_core(tmp_path, monkeypatch, {
        "mmpeft/__init__.py": "from .wrap import wrap\n",
        "mmpeft/wrap.py": "from .model import Model\nfrom .tuners import Layer\n",  # downward: fine
        "mmpeft/model.py": "", "mmpeft/config.py": "",
        "mmpeft/utils.py": "def f():\n    from .model import Model\n",
        "mmpeft/tuners/__init__.py": "from ..config import Config\n",
        "mmpeft/novel.py": "from .utils import f\n",
    })  # fmt: skip
    found = upward_imports(files)
    assert len(found) == 3, found
    assert any(p.startswith("mmpeft/utils.py:2: leaves (mmpeft.utils) imports model") for p in found), found
    assert any("mmpeft.novel" in p and "no core layer" in p for p in found), found
