"""The example scripts and the python snippets of the docs run end to end."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # one thread: with 2 busy cores (pytest-xdist, other jobs) torch's 2-thread pool can be 100x slower
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "quickstart OK" in proc.stdout
    assert "outputs identical: True" in proc.stdout
    for name in ("sam_encoder", "timm_vit"):
        assert (tmp_path / name / "adapter_model.safetensors").is_file()
        assert (tmp_path / name / "mmpeft_config.json").is_file()


EXAMPLES = {  # script: lines its tiny run must print (each a check the script asserts)
    "train_modality_dropout.py": [
        "train example OK",
        "frozen weights bit-identical after 25 steps: True",
        "an absent DSM leaves that sample's optical output unchanged: max diff 0.0e+00",
    ],
    "deploy.py": [
        "deploy example OK",
        "merged output equals unmerged (dsm",
        "merge_and_unload('dsm')",
        "load_multimodal for inference",
    ],
    "hf_trainer.py": [
        "hf trainer example OK",
        "eval_loss (mean of the modalities' losses) on the training samples",
        "frozen weights bit-identical after training: True",
        "no model.safetensors",
        "on a fresh base reproduces the trained model: max diff 0.0e+00",
        "ends where the uninterrupted run ends",
    ],
    "adapter_sets.py": [
        "adapter sets example OK",
        "Vaihingen set bit-identical after training the Potsdam set: True",
        "set 'potsdam' reloaded on a fresh encoder: max diff 0.0e+00",
        "combining the mixing sets is refused",
    ],
}


@pytest.mark.parametrize("script", sorted(EXAMPLES))
def test_example_runs_tiny(script: str, tmp_path) -> None:
    """Each path a user takes (examples/) runs end to end on tiny models and prints its checks."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.update(OMP_NUM_THREADS="1", MMPEFT_EXAMPLES_TINY="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    missing = [line for line in EXAMPLES[script] if line not in proc.stdout]
    assert not missing, f"{script} did not print {missing}:\n{proc.stdout[-3000:]}"


def test_every_example_is_run() -> None:
    assert {p.name for p in (ROOT / "examples").glob("*.py")} == {"quickstart.py", *EXAMPLES}


DOCS = ROOT / "docs"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(path: Path) -> list[str]:
    """The ```python blocks of a Markdown file (```console / ```text blocks are not run)."""
    return _BLOCK.findall(path.read_text())


# Every Markdown page a reader gets: the README and docs/*.md (a new page is picked up by itself).
PAGES = ["README.md", *(f"docs/{p.name}" for p in sorted(DOCS.glob("*.md")))]

# Blocks that cannot run standalone: (page, a line of the block) -> why. They are compiled, not run,
# and each shows up as a skipped test with its reason (`pytest -ra`); the pages' other blocks run.
NOT_RUN = {
    ("docs/isprs.md", 'cfg = load_config("vaihingen_mmadapter_vit_b"'): (
        "needs the ISPRS Vaihingen data set under /data/vaihingen and a full training run "
        "(the same calls run on synthetic data in tests/isprs/test_train.py and the demo)"
    ),
    ("docs/mfnet.md", 'build_mfnet(backbone="sam2_hiera_base_plus"'): (
        "needs the official SAM2 and DINOv2 weight files and builds full-size encoders (DINOv2-L: 300M "
        "parameters); the same calls run on tiny encoders and test-made official-layout files in "
        "tests/isprs/test_mfnet_encoders_weights.py"
    ),
}

# Pages whose snippets name full-size SAM encoders (vit_b / vit_l / vit_h, built on a real device,
# official checkpoint files): they run with every SAM size resolved to the 4-block "vit_tiny" and
# tiny stand-ins for the official files in the working folder (see `tiny_sam_models`). Other
# pages run exactly as written (their full-size models are built on the "meta" device only).
TINY_PAGES = {"README.md", "docs/quickstart.md", "docs/mfnet.md", "docs/missing_modalities.md"}
OFFICIAL_FILES = {"vit_b": "sam_vit_b_01ec64.pth", "vit_l": "sam_vit_l_0b3195.pth", "vit_h": "sam_vit_h_4b8939.pth"}


def _not_run(page: str, block: str) -> str | None:
    return next((why for (p, line), why in NOT_RUN.items() if p == page and line in block), None)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and oversubscribed cores make a 2-thread pool crawl."""
    from tests.helpers import one_thread as one_torch_thread  # imports torch

    with one_torch_thread():
        yield


@pytest.fixture
def tiny_sam_models(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """SAM ViT-B/L/H resolve to "vit_tiny" everywhere; tiny official-layout files under their names."""
    import torch

    from mmpeft.backbones import SAM_SPECS
    from tests.tiny_models import official_sam_state as official_state

    tiny = SAM_SPECS["vit_tiny"]
    state = official_state(tiny)
    for size, filename in OFFICIAL_FILES.items():
        monkeypatch.setitem(SAM_SPECS, size, tiny)
        torch.save(state, tmp_path / filename)


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(ROOT / p)])
def test_doc_snippets_run(page: str, tmp_path, monkeypatch, one_thread, request) -> None:
    """Every python block of the page runs, in order, in one namespace (as a reader would)."""
    from mmpeft import FAMILIES
    from mmpeft.tuners.fusion import FUSION_RULES

    if page in TINY_PAGES:
        request.getfixturevalue("tiny_sam_models")
    monkeypatch.chdir(tmp_path)  # snippets may write files
    rules, families = dict(FUSION_RULES), dict(FAMILIES)  # snippets may register some: leave them as found
    namespace: dict[str, object] = {"__name__": f"docs_{Path(page).stem}"}
    try:
        for i, block in enumerate(python_blocks(ROOT / page)):
            code = compile(block, f"{page}[python block {i}]", "exec")
            if _not_run(page, block):
                continue  # reported by test_doc_snippet_not_run
            try:
                exec(code, namespace)
            except Exception as e:  # pragma: no cover - the message names the block
                raise AssertionError(f"{page}: python block {i} failed: {e!r}\n{block}") from e
    finally:
        FUSION_RULES.clear()
        FUSION_RULES.update(rules)
        FAMILIES.clear()
        FAMILIES.update(families)


@pytest.mark.parametrize("page,line", sorted(NOT_RUN))
def test_doc_snippet_not_run(page: str, line: str) -> None:
    """A block left out names its reason here; an entry that matches no block (stale) fails."""
    blocks = [b for b in python_blocks(ROOT / page) if line in b]
    assert len(blocks) == 1, f"NOT_RUN entry matches {len(blocks)} python blocks of {page}: {line!r}"
    compile(blocks[0], page, "exec")  # at least it parses
    pytest.skip(f"{page}: {NOT_RUN[page, line]}")


def test_every_page_is_checked() -> None:
    """The README and every docs page are scanned, and the pages with tiny stand-ins exist."""
    assert "README.md" in PAGES and len(PAGES) > 5
    assert TINY_PAGES <= set(PAGES)


def test_api_doc_names_every_export() -> None:
    """docs/api.md lists every name exported by mmpeft and its public submodules (add new ones there)."""
    import mmpeft
    import mmpeft.backbones
    import mmpeft.interop.peft_interop
    import mmpeft.interop.trainer
    import mmpeft.runtime.attention
    import mmpeft.runtime.checkpointing

    text = (DOCS / "api.md").read_text()
    missing = [
        f"{mod.__name__}.{name}"
        for mod in (
            mmpeft,
            mmpeft.backbones,
            mmpeft.interop.peft_interop,
            mmpeft.interop.trainer,
            mmpeft.runtime.attention,
            mmpeft.runtime.checkpointing,
        )
        for name in mod.__all__
        if f"**`{name}`**" not in text
    ]
    assert not missing, f"docs/api.md does not document {missing}"


def _demo_docs():
    """tools/demo_docs.py as a module (a repository script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_docs", ROOT / "tools" / "demo_docs.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_docs_writes_the_summary_into_the_page(tmp_path) -> None:
    """The script replaces exactly the marked block of docs/isprs.md, and --check sees the difference."""
    import json

    tool = _demo_docs()
    text = (DOCS / "isprs.md").read_text()
    assert tool.HEADER in tool.doc_block(text)
    summary = {
        "table": "class  a  b\nmIoU  1.00  2.00",
        "summary": "DSM gain: mIoU -1.00 points; demo wall time 3.2 min",
        "quick": False,
        "checkpoint": None,
    }
    page = tmp_path / "isprs.md"
    page.write_text(text)
    (tmp_path / "s.json").write_text(json.dumps(summary))
    assert tool.main(["--check", "--doc", str(page), str(tmp_path / "s.json")]) == 1
    assert tool.main(["--doc", str(page), str(tmp_path / "s.json")]) == 0
    new = page.read_text()
    assert tool.doc_block(new) == tool.render(summary)
    outside = text.replace(tool.doc_block(text), "")
    assert new.replace(tool.render(summary), "") == outside  # nothing else changed
    later = {**summary, "summary": summary["summary"].replace("3.2 min", "9.9 min")}
    (tmp_path / "s.json").write_text(json.dumps(later))
    assert tool.main(["--check", "--doc", str(page), str(tmp_path / "s.json")]) == 0  # the wall time may differ


def test_demo_figures_are_compared_within_the_stated_tolerance() -> None:
    """Another CPU's drift (+37.07 vs +36.77, seen on the same torch) passes; a real change or a new row fails."""
    tool = _demo_docs()
    block = tool.doc_block((DOCS / "isprs.md").read_text())
    assert tool.differences(block, block) == []
    drifted = block.replace("79.73", "79.87").replace("42.96", "42.79").replace("+36.77", "+37.07")
    assert drifted != block and tool.differences(block, drifted) == []
    far = block.replace("42.96", "47.96")
    assert any("mIoU" in d for d in tool.differences(block, far))  # 5 points on a summary row
    assert tool.differences(block, block.replace("+36.77", "+32.77"))  # the gain by 4 points
    assert any("text differs" in d for d in tool.differences(block, block.replace("building", "roof")))
    assert tool.differences(block, block.replace("OA ", "OA 1.00 ", 1))  # a figure more on a row
    stated = " ".join((DOCS / "isprs.md").read_text().split())
    for phrase in (
        f"mIoU rows within {tool.TOLERANCE['summary']:g} point",
        f"gain within {tool.TOLERANCE['gain']:g} points",
        f"IoU within {tool.TOLERANCE['class']:g} points",
    ):
        assert phrase in stated, f"docs/isprs.md does not state {phrase!r}"


@pytest.mark.slow
def test_demo_table_in_the_docs_is_what_a_fresh_demo_prints(tmp_path, one_thread) -> None:
    """A full `mmpeft-isprs demo` (one torch thread, as for the docs; ~7 min on 2 cores) prints the docs' table."""
    import json

    from mmpeft_isprs.demo import run_demo

    tool = _demo_docs()
    run_demo(tmp_path / "demo", overrides=["train.threads=1"], log=lambda _: None)
    summary = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    block = tool.doc_block((DOCS / "isprs.md").read_text())
    found = tool.differences(block, tool.render(summary))  # the last digits vary by CPU: within tool.TOLERANCE
    assert not found, (
        f"docs/isprs.md's demo table differs from a fresh demo's beyond the stated tolerance: {found}; update it with\n"
        f"  python tools/demo_docs.py {tmp_path / 'demo' / 'demo_summary.json'}\ndocs:\n{block}\ndemo:\n{tool.render(summary)}"
    )
