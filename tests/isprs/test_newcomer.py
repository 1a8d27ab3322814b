"""A newcomer's first commands (issue 30): help sections, a closed pipe, a missing extra."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mmpeft_isprs.cli import main
from mmpeft_isprs.help import page


def test_help_section_prints_the_section_not_the_page(capsys) -> None:
    assert main(["help", "isprs", "metrics"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("## 3. Metrics protocol\n")  # the page's title names metrics too: not taken
    assert len(out.splitlines()) < len(page("isprs").splitlines()) // 5
    assert main(["help", "isprs", "pipeline"]) == 0  # only the title matches: the page
    assert capsys.readouterr().out.startswith("# The ISPRS pipeline")


def test_help_into_a_closed_pipe_ends_quietly() -> None:
    code = "import sys; from mmpeft_isprs.cli import main; sys.exit(main(['help', 'isprs']))"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.readline()
    proc.stdout.close()  # as `| head -1` does
    err = proc.stderr.read().decode() if proc.stderr else ""
    assert proc.wait(timeout=60) == 0 and "Traceback" not in err and "BrokenPipeError" not in err, err


def test_without_the_isprs_extra_the_error_says_how_to_install_it() -> None:
    code = (
        "import sys; sys.modules['yaml'] = None\n"  # PyYAML not installed
        "from mmpeft_isprs.cli import main; sys.exit(main(['list-configs']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "error: PyYAML (module 'yaml') is missing" in done.stderr and "pip install 'mmpeft[isprs]'" in done.stderr


@pytest.mark.slow
def test_resuming_a_finished_demo_changes_nothing(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "train.threads=1"]) == 0
    summary = (out / "demo_summary.json").read_bytes()
    first = capsys.readouterr().out
    assert f"interrupted? continue with: mmpeft-isprs demo --resume {out}" in first
    assert main(["demo", "--resume", str(out)]) == 0
    again = capsys.readouterr().out
    assert f"{out} holds a finished demo (its demo_summary.json): nothing to resume" in again
    assert "interrupted?" not in again and "epoch 2" not in again and "DSM gain" in again
    assert (out / "demo_summary.json").read_bytes() == summary  # its wall time is not replaced by the resume's
