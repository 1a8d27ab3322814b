"""Shared helpers of the benchmark scripts: environment record, JSON + Markdown output."""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _git(*args: str) -> str:
    """What ``git <args>`` prints in this checkout, stripped (empty where git fails)."""
    run = subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent, check=False)
    return run.stdout.strip()


def environment() -> dict[str, Any]:
    """git sha, torch version, device and threads: recorded with every result."""
    try:
        sha = _git("rev-parse", "--short", "HEAD")
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    except OSError:
        sha, dirty = "", False
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return {
        "git_sha": sha,
        "git_dirty": dirty,
        "torch": torch.__version__,
        "device": dev,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def write(name: str, data: dict[str, Any], table: str, out_dir: Path | None = None) -> Path:
    """Write ``<name>.json`` and ``<name>.md`` under benchmarks/results (or out_dir); print the table."""
    out = Path(out_dir) if out_dir else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"environment": environment(), **data}, indent=2))
    (out / f"{name}.md").write_text(table + "\n")
    print(table)
    return out
