"""The layers of the house (docs/architecture.md), checked on the source: who may import whom, and sizes.

Every module of ``mmpeft`` and ``mmpeft_isprs`` is parsed (ast, imports inside functions too);
relative imports are resolved; each import of a project module must go to a layer its own
layer may use. The core never imports the application, and never the application's I/O
libraries (tqdm, PyYAML, tifffile, Pillow: the ``isprs`` extra). The application imports only
names the core exports (``mmpeft.__all__``, ``mmpeft.backbones.__all__``). Files stay under 400
lines and functions under 60 in the whole repository. Each checker is shown to catch a bad case.
The core's own layers and the absence of import circles in it: ``tests/test_core_imports.py``.
"""

from __future__ import annotations

import ast
import io
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

from tests import source_graph

ROOT = Path(__file__).resolve().parents[2]

# layer -> module prefixes (longest match wins)
LAYERS: dict[str, tuple[str, ...]] = {
    "core": ("mmpeft",),
    "model": ("mmpeft_isprs.model",),
    "data": ("mmpeft_isprs.data",),
    "config": ("mmpeft_isprs.config",),
    "support": ("mmpeft_isprs.distributed", "mmpeft_isprs.inference", "mmpeft_isprs.metrics", "mmpeft_isprs.threads"),
    "datamodule": ("mmpeft_isprs.datamodule",),
    "task": ("mmpeft_isprs.task",),
    "runner": ("mmpeft_isprs.runner",),
    "command": ("mmpeft_isprs.train", "mmpeft_isprs.evaluate", "mmpeft_isprs.predict", "mmpeft_isprs.demo"),
    "cli": ("mmpeft_isprs", "mmpeft_isprs.cli", "mmpeft_isprs.__main__"),
}
_BELOW_COMMANDS = {"core", "model", "data", "config", "support", "datamodule", "task", "runner"}
ALLOWED: dict[str, set[str]] = {
    "core": {"core"},
    "model": {"core", "model"},
    "data": {"core", "data"},
    "config": {"core", "model", "config"},  # the model section is MFNetConfig
    "support": {"core", "config", "data", "support"},
    "datamodule": {"core", "data", "config", "support", "datamodule"},
    "task": {"core", "model", "data", "config", "support", "task"},
    "runner": _BELOW_COMMANDS,
    "command": _BELOW_COMMANDS,  # and never another command (checked below)
    "cli": _BELOW_COMMANDS | {"command", "cli"},
}
APP_IO_LIBS = ("tqdm", "yaml", "tifffile", "PIL")
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60


def layer_of(module: str) -> str | None:
    best = max(
        ((p, layer) for layer, ps in LAYERS.items() for p in ps if module == p or module.startswith(p + ".")),
        key=lambda x: len(x[0]),
        default=None,
    )
    return best[1] if best else None


def module_name(path: Path) -> str:
    return source_graph.module_name(path, ROOT)  # ROOT: patched by the checkers' own tests


def imports_of(path: Path) -> list[tuple[int, str]]:
    return source_graph.imports_of(path, ROOT)


def project_files() -> list[Path]:
    return sorted(p for pkg in ("mmpeft", "mmpeft_isprs") for p in (ROOT / pkg).rglob("*.py"))


def forbidden_imports(files: list[Path]) -> list[str]:
    problems = []
    for path in files:
        own_mod = module_name(path)
        own = layer_of(own_mod)
        for line, target in imports_of(path):
            if target.split(".")[0] not in ("mmpeft", "mmpeft_isprs"):
                continue
            other = layer_of(target)
            where = f"{path.relative_to(ROOT)}:{line}: {own} ({own_mod}) imports {other} ({target})"
            if own is None or other is None:
                problems.append(where + ": module in no layer (add it to LAYERS and docs/architecture.md)")
            elif own == other == "command":
                if layer_prefix(own_mod) != layer_prefix(target):
                    problems.append(where + ": a command never imports another command")
            elif other not in ALLOWED[own]:
                problems.append(where)
    return problems


def layer_prefix(module: str) -> str:
    return next(p for p in LAYERS["command"] if module == p or module.startswith(p + "."))


def test_every_import_respects_the_layers() -> None:
    assert forbidden_imports(project_files()) == []


def test_the_checker_catches_forbidden_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rules can fail: a core module importing the app, a command importing a command, data importing the task."""
    fake = {
        "mmpeft/_bad_core.py": "from mmpeft_isprs.model import MFNet\n",
        "mmpeft_isprs/demo_bad.py": "from .train import train\n",
        "mmpeft_isprs/data/_bad.py": "def f():\n    from ..task import SegmentationTask\n",
        "mmpeft_isprs/task/_bad.py": "from ..datamodule import ISPRSDataModule\n",
    }
    for rel, text in fake.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    monkeypatch.setitem(LAYERS, "command", (*LAYERS["command"], "mmpeft_isprs.demo_bad"))
    found = forbidden_imports(sorted(tmp_path.rglob("*.py")))
    assert len(found) == 4, found
    assert any("a command never imports another command" in p for p in found)


PUBLIC_MODULES = ("mmpeft", "mmpeft.backbones")  # what the application may import names from: their __all__


def exported_names(module: str) -> set[str]:
    """``__all__`` of a public core module, read from its source (a list of string literals)."""
    init = ROOT.joinpath(*module.split("."), "__init__.py")
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set()


def private_core_imports(files: list[Path]) -> list[str]:
    """Imports of the core by the application that are not ``import mmpeft`` or ``from mmpeft
    import X`` / ``from mmpeft.backbones import X`` with X exported (in that module's ``__all__``);
    and, after ``import mmpeft``, attributes ``mmpeft.X`` with X neither exported nor a dunder."""
    exported = {m: exported_names(m) for m in PUBLIC_MODULES}
    problems = []
    for path in files:
        where = str(path.relative_to(ROOT))
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                problems += [
                    f"{where}:{node.lineno}: import {a.name}"
                    for a in node.names
                    if a.name.split(".")[0] == "mmpeft" and a.name != "mmpeft"
                ]
            elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "mmpeft":
                module = node.module or ""
                bad = [a.name for a in node.names if a.name not in exported.get(module, set())]
                if bad:
                    problems.append(f"{where}:{node.lineno}: from {module} import {', '.join(bad)}")
            elif isinstance(node, ast.Attribute) and getattr(node.value, "id", None) == "mmpeft":
                if node.attr not in exported["mmpeft"] and not node.attr.startswith("__"):
                    problems.append(f"{where}:{node.lineno}: mmpeft.{node.attr}")
    return problems


def test_the_application_imports_only_names_mmpeft_exports() -> None:
    """The core's public API is ``mmpeft.__all__`` (and ``mmpeft.backbones.__all__``): the
    application imports nothing else, so the core may rearrange its modules freely."""
    found = private_core_imports(sorted((ROOT / "mmpeft_isprs").rglob("*.py")))
    assert found == [], "import these from `mmpeft` (export them there first if needed):\n" + "\n".join(found)


def test_the_checker_catches_private_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A module of the core, a name not exported, a submodule by ``import``, a private attribute."""
    fake = {
        "mmpeft/__init__.py": "__all__ = ['wrap_multimodal']\n",
        "mmpeft/backbones/__init__.py": "__all__ = ['build_sam_encoder']\n",
        "mmpeft_isprs/ok.py": "import mmpeft\nfrom mmpeft import wrap_multimodal\nfrom mmpeft.backbones import build_sam_encoder\n"
        "v = mmpeft.__version__\nw = mmpeft.wrap_multimodal\n",
        "mmpeft_isprs/bad.py": "from mmpeft.model.wrap import wrap_multimodal\nfrom mmpeft import wrap_multimodal, _hidden\n"
        "def f():\n    import mmpeft.tuners.base\n",
        "mmpeft_isprs/attr.py": "import mmpeft\nx = mmpeft.tuners\n",
    }
    for rel, text in fake.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    found = private_core_imports(sorted((tmp_path / "mmpeft_isprs").rglob("*.py")))
    assert found == [
        "mmpeft_isprs/attr.py:2: mmpeft.tuners",
        "mmpeft_isprs/bad.py:1: from mmpeft.model.wrap import wrap_multimodal",
        "mmpeft_isprs/bad.py:2: from mmpeft import _hidden",
        "mmpeft_isprs/bad.py:4: import mmpeft.tuners.base",
    ], found


def module_level_imports(path: Path) -> list[tuple[int, str]]:
    """Imports executed when the module is imported (not those inside functions)."""
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            node.body = []  # type: ignore[assignment]  # do not descend
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.append((node.lineno, node.module))
    return out


def test_core_does_not_import_the_application_io_libraries() -> None:
    """``pip install mmpeft`` (without the ``isprs`` extra) imports: no core module needs tqdm,
    PyYAML, tifffile or Pillow when it is imported (inside a function, lazily, it may)."""
    found = [
        f"{p.relative_to(ROOT)}:{line}: {mod}"
        for p in sorted((ROOT / "mmpeft").rglob("*.py"))
        for line, mod in module_level_imports(p)
        if mod.split(".")[0] in APP_IO_LIBS
    ]
    assert found == []
    # and for real: with tifffile unimportable (no core dependency brings it), every core module imports
    code = (
        "import sys, pkgutil, importlib\n"
        "sys.modules['tifffile'] = None\n"
        "import mmpeft\n"
        "for info in pkgutil.walk_packages(mmpeft.__path__, 'mmpeft.'):\n"
        "    importlib.import_module(info.name)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


SIZED_DIRS = ("mmpeft", "mmpeft_isprs", "benchmarks", "tools", "examples", "tests")


def wrapped_lines(text: str) -> set[int]:
    """The line numbers that continue a bracketed expression begun on an earlier line: the
    formatter's wrapping (one argument per line), not size the author wrote."""
    inside, depth = set(), 0
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.OP and tok.string in "([{":
            depth += 1
        elif tok.type == tokenize.OP and tok.string in ")]}":
            depth -= 1
        if depth > 0 and tok.type in (tokenize.NL, tokenize.NEWLINE):
            inside.add(tok.start[0] + 1)
    return inside


def oversized(files: list[Path]) -> list[str]:
    """Files over MAX_FILE_LINES lines and functions (methods, nested ones) over MAX_FUNCTION_LINES,
    counting the lines as written: docstrings and comments count, the formatter's continuation
    lines of one bracketed expression do not (``ruff format`` puts a long call one argument per line)."""
    big = []
    for path in files:
        text, where = path.read_text(), path.relative_to(ROOT)
        counted = [0]  # counted[i]: lines 1..i as written
        wrapped = wrapped_lines(text)
        for i in range(1, len(text.splitlines()) + 1):
            counted.append(counted[-1] + (i not in wrapped))

        def size(first: int, last: int, counted: list[int] = counted) -> int:
            return counted[last] - counted[first - 1]

        if (n := size(1, len(text.splitlines()))) > MAX_FILE_LINES:
            big.append(f"{where}: {n} lines")
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = size(node.lineno, node.end_lineno or node.lineno)
                if n > MAX_FUNCTION_LINES:
                    big.append(f"{where}:{node.lineno} {node.name}: {n} lines")
    return big


def test_files_and_functions_are_small() -> None:
    """Every .py of the repository's code, tools and tests."""
    found = oversized(sorted(p for d in SIZED_DIRS for p in (ROOT / d).rglob("*.py")))
    assert found == [], "split these:\n" + "\n".join(found)


def test_the_checker_catches_big_files_and_functions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file one line too long, a method one line too long; a function of exactly the limit passes."""

    def lines(n: int, indent: str) -> str:
        return "".join(f"{indent}x{i} = {i}\n" for i in range(n))

    fake = {
        "tests/big.py": lines(MAX_FILE_LINES + 1, ""),
        "benchmarks/long.py": "class A:\n    def method(self):\n" + lines(MAX_FUNCTION_LINES, " " * 8),
        "tools/ok.py": "def f():\n" + lines(MAX_FUNCTION_LINES - 1, " " * 4),
    }
    for rel, text in fake.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    found = oversized(sorted(tmp_path.rglob("*.py")))
    assert found == ["benchmarks/long.py:2 method: 61 lines", f"tests/big.py: {MAX_FILE_LINES + 1} lines"], found
