"""The example scripts and the python snippets of the docs run end to end."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # one thread: with 2 busy cores (pytest-xdist, other jobs) torch's 2-thread pool can be 100x slower
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "quickstart OK" in proc.stdout
    assert "outputs identical: True" in proc.stdout
    for name in ("sam_encoder", "timm_vit"):
        assert (tmp_path / name / "adapter_model.safetensors").is_file()
        assert (tmp_path / name / "mmpeft_config.json").is_file()


DOCS = ROOT / "docs"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(path: Path) -> list[str]:
    """The ```python blocks of a Markdown file (```console / ```text blocks are not run)."""
    return _BLOCK.findall(path.read_text())


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and oversubscribed cores make a 2-thread pool crawl."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("page", ["quickstart.md", "concepts.md", "design.md"])
def test_doc_snippets_run(page: str, tmp_path, monkeypatch, one_thread) -> None:
    """Every python block of the page runs, in order, in one namespace (as a reader would)."""
    path = DOCS / page
    if not path.is_file():
        pytest.skip(f"{page} not written")
    from mmpeft.fusion import FUSION_RULES

    monkeypatch.chdir(tmp_path)  # snippets may write files
    rules = dict(FUSION_RULES)  # snippets may register fusion rules: leave the registry as found
    namespace: dict[str, object] = {"__name__": f"docs_{path.stem}"}
    try:
        for i, block in enumerate(python_blocks(path)):
            try:
                exec(compile(block, f"{page}[python block {i}]", "exec"), namespace)  # noqa: S102
            except Exception as e:  # pragma: no cover - the message names the block
                raise AssertionError(f"{page}: python block {i} failed: {e!r}\n{block}") from e
    finally:
        FUSION_RULES.clear()
        FUSION_RULES.update(rules)


def test_api_doc_names_every_export() -> None:
    """docs/api.md lists every name exported by mmpeft and its public submodules (add new ones there)."""
    import mmpeft
    import mmpeft.attention
    import mmpeft.backbones
    import mmpeft.checkpointing
    import mmpeft.peft_interop

    text = (DOCS / "api.md").read_text()
    missing = [
        f"{mod.__name__}.{name}"
        for mod in (mmpeft, mmpeft.backbones, mmpeft.peft_interop, mmpeft.attention, mmpeft.checkpointing)
        for name in mod.__all__
        if f"**`{name}`**" not in text
    ]
    assert not missing, f"docs/api.md does not document {missing}"
