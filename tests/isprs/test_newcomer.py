"""A newcomer's first commands (issue 30): help sections, a closed pipe, a missing extra."""

from __future__ import annotations

import subprocess
import sys

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
