"""Reading the project's source as a graph: module names of files and the modules each file
imports (at module level and inside functions, relative imports resolved). Shared by the
architecture tests of the application (tests/isprs/test_architecture.py) and of the core
(tests/test_core_imports.py)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path, root: Path | None = None) -> str:
    """``mmpeft/model/wrap.py`` -> ``mmpeft.model.wrap``; a package's ``__init__`` is the package
    (``root``: the repository, ``ROOT`` read at the call, so a test may point it at a fake tree)."""
    parts = list(path.relative_to(root or ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path | None = None) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in ``path``, relative ones resolved."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            if node.module is None:  # from . import x: x is a module of the package
                out += [(node.lineno, f"{target}.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, target))
    return out
