"""`mmpeft-isprs help`: the docs a pip user has (packaged), and error messages that point to them."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mmpeft_isprs.cli import main
from mmpeft_isprs.help import docs_root, section, topics

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
_POINTER = re.compile(r"mmpeft-isprs help ([a-z_]+)(?: ([a-z]\w*))?")


def test_help_lists_every_page(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["help"]) == 0
    out = capsys.readouterr().out
    for page in sorted(DOCS.glob("*.md")):
        title = page.read_text().splitlines()[0].lstrip("# ")
        assert f"  {page.stem}" in out and title in out, page.name


def test_help_prints_a_page_and_a_section(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["help", "isprs"]) == 0
    assert capsys.readouterr().out == (DOCS / "isprs.md").read_text()
    assert main(["help", "isprs", "DEMO"]) == 0  # the first heading containing the text, any case
    out = capsys.readouterr().out
    assert out.startswith("### `demo") and "DSM gain" in out
    assert "### `generate-synthetic" not in out  # stops at the next heading of its level


def test_unknown_topic_or_section_is_an_error_listing_what_exists(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["help", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: help: no topic 'nope'") and "isprs" in err and "quickstart" in err
    assert main(["help", "isprs", "no such heading"]) == 2
    assert "Folder layouts" in capsys.readouterr().err


def test_help_needs_neither_torch_nor_the_isprs_extra() -> None:
    """`help` runs on a bare install: torch, PyYAML and the rest are never imported."""
    code = (
        "import sys\nfor m in ('torch', 'yaml', 'tifffile', 'PIL', 'tqdm'): sys.modules[m] = None\n"
        "from mmpeft_isprs.cli import main\nsys.exit(main(['help', 'quickstart']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == (DOCS / "quickstart.md").read_text()


def test_the_packaged_docs_are_the_repository_docs() -> None:
    """mmpeft_isprs/docs (package data) holds every docs/*.md, and pyproject ships them."""
    assert {p.stem for p in DOCS.glob("*.md")} == set(topics())
    for page in DOCS.glob("*.md"):
        assert (docs_root() / page.name).read_text() == page.read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'mmpeft_isprs = \[[^\]]*"docs/\*\.md"', pyproject), "docs/*.md missing from package-data"


def _messages(path: Path) -> list[str]:
    """The string constants of a module outside docstrings (messages, help texts)."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and n.body
        and isinstance(n.body[0], ast.Expr)
    }
    return [
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings
    ]


def test_messages_point_to_help_topics_that_exist() -> None:
    """No message (nor bundled config) names docs/, which a pip user lacks; every `mmpeft-isprs help T S` resolves."""
    pointers, stale = [], []
    sources = sorted((ROOT / "mmpeft_isprs").rglob("*.py")) + sorted((ROOT / "mmpeft_isprs" / "configs").glob("*.yaml"))
    for path in sources:
        for text in _messages(path) if path.suffix == ".py" else [path.read_text()]:
            if "docs/" in text:
                stale.append(f"{path.relative_to(ROOT)}: {text!r}")
            pointers += [(path, *m.groups()) for m in _POINTER.finditer(text)]
    assert not stale, "messages naming docs/ (use `mmpeft-isprs help TOPIC`):\n" + "\n".join(stale)
    assert pointers, "no message points to `mmpeft-isprs help`"
    for path, topic, text in pointers:
        assert topic in topics(), f"{path.name}: no help topic {topic!r}"
        if text:
            section(topic, text)  # raises naming the sections if the heading is gone


@pytest.mark.slow
def test_wheel_ships_the_docs_and_builds_without_warnings(tmp_path: Path) -> None:
    """`pip wheel .` (non-editable): the docs are in the wheel; setuptools warns about nothing of ours."""
    import zipfile

    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", str(ROOT), "-w", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    if proc.returncode != 0 and "setuptools" in proc.stdout + proc.stderr and "No matching distribution" in proc.stderr:
        pytest.skip("the build dependencies (setuptools, wheel) cannot be installed here (no package index)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ignore = ("byte-compiling is disabled", "is ignored: it is neither a file nor a directory")  # environment, not ours
    warnings = [
        line
        for line in (proc.stdout + proc.stderr).splitlines()
        if "warn" in line.lower() and not any(i in line for i in ignore)
    ]
    assert not warnings, "\n".join(warnings)
    (wheel,) = tmp_path.glob("mmpeft-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"mmpeft_isprs/docs/{p.name}" for p in DOCS.glob("*.md")} <= names
