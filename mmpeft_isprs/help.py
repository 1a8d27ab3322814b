"""``mmpeft-isprs help [TOPIC [SECTION]]``: the project's documentation, shipped in the package.

The Markdown pages of the repository's ``docs/`` travel as package data (``mmpeft_isprs/docs``
is a link to ``docs/`` in the source tree; the wheel holds copies), so a ``pip install`` user
reads the same pages as a reader of the repository. Error messages name a topic here
(``mmpeft-isprs help isprs``). Imports nothing heavy: works without torch or the ``isprs`` extra.
"""

from __future__ import annotations

import sys
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path

__all__ = ["docs_root", "topics", "page", "section", "show_help"]


def docs_root() -> Traversable:
    """The packaged docs folder (a source checkout without symlinks falls back to ``docs/``)."""
    packaged = resources.files("mmpeft_isprs") / "docs"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[1] / "docs"


def topics() -> dict[str, str]:
    """``{topic: title}`` for every page (the topic is the file name without ``.md``)."""
    found = {}
    for entry in sorted(docs_root().iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".md"):
            first = entry.read_text(encoding="utf-8").lstrip().splitlines()[0]
            found[entry.name[: -len(".md")]] = first.lstrip("# ").strip()
    return found


def page(topic: str) -> str:
    """The Markdown text of one topic (FileNotFoundError listing the topics if unknown)."""
    known = topics()
    if topic not in known:
        raise FileNotFoundError(f"help: no topic {topic!r}; topics: {', '.join(known)}")
    return (docs_root() / f"{topic}.md").read_text(encoding="utf-8")


def _headings(lines: list[str]) -> list[tuple[int, int]]:
    """``(line index, level)`` of the Markdown headings outside fenced code blocks."""
    found, fenced = [], False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            found.append((i, len(line) - len(line.lstrip("#"))))
    return found


def section(topic: str, text: str) -> str:
    """The first section of ``topic`` whose heading contains ``text`` (any case), subsections
    included; the page's title (its one level-1 heading, which names the page's topics) only when
    no section heading matches, so ``help isprs metrics`` prints the metrics section, not the page."""
    lines = page(topic).splitlines()
    heads = _headings(lines)
    found = [n for n, (start, _) in enumerate(heads) if text.lower() in lines[start].lower()]
    found = [n for n in found if heads[n][1] > 1] or found
    if found:
        n, (start, level) = found[0], heads[found[0]]
        end = next((i for i, lv in heads[n + 1 :] if lv <= level), len(lines))
        return "\n".join(lines[start:end]).rstrip() + "\n"
    titles = "; ".join(lines[i].lstrip("# ") for i, _ in heads)
    raise FileNotFoundError(f"help: no section of {topic!r} matches {text!r}; sections: {titles}")


def show_help(topic: str | None = None, text: str | None = None) -> int:
    """Print the topic list, a page or one section; returns the exit status (2: unknown topic)."""
    try:
        if topic is None:
            known = topics()
            width = max(map(len, known))
            print("mmpeft-isprs help TOPIC [SECTION] prints a page of the documentation (or one section):\n")
            print("\n".join(f"  {name:<{width}}  {title}" for name, title in known.items()))
        else:
            print(section(topic, text) if text else page(topic), end="")
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
