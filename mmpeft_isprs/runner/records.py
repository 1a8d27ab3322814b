"""What a run folder keeps of every launch: ``run.json``'s history, warnings in the logs, the encoder file.

``run.json`` holds the resolved config and one entry per launch in ``"launches"`` (start time,
command, torch threads, versions, device, processes, whether it resumed), appended by every
``--resume``, so a run that mixed thread counts or versions says so in a file; the top-level
``versions``, ``device``, ``world_size``, ``threads`` and ``command`` are the latest launch's.
It also names the encoder file the run loaded, by path and SHA-256, with its load report
(``"encoder"``).

:func:`logged_warnings` sends every warning printed while it is active (data warnings
included) to a :class:`~.logs.TextLog` file as well, so ``train.log`` / ``eval.log`` hold
every line the terminal shows.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mmpeft import atomic_write

__all__ = ["record_launch", "read_launches", "logged_warnings", "mixed_launches"]


def read_launches(path: Path) -> list[dict[str, Any]]:
    """The launches recorded in ``run.json`` (a file of an earlier version counts as one launch)."""
    if not path.is_file():
        return []
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if isinstance(saved.get("launches"), list):
        return list(saved["launches"])
    keys = ("command", "threads", "versions", "device", "world_size")
    return [{k: saved[k] for k in keys if k in saved}] if saved else []


def record_launch(
    run_dir: Path, launch: dict[str, Any], config: dict[str, Any], encoder: dict[str, Any] | None, resumed: bool
) -> list[dict[str, Any]]:
    """Append this launch to ``run_dir/run.json`` (a fresh run starts its history); returns every launch."""
    path = Path(run_dir) / "run.json"
    entry = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": list(sys.argv), "resumed": resumed, **launch}
    launches = [*(read_launches(path) if resumed else []), entry]
    payload = {
        **{k: v for k, v in entry.items() if k != "started"},
        "launches": launches,
        "encoder": encoder,
        "config": config,
    }
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(payload, indent=1)))
    return launches


def mixed_launches(launches: list[dict[str, Any]]) -> str | None:
    """A note when the launches of one run used different torch threads or versions (not bit-exact)."""
    if len(launches) < 2:
        return None
    threads = [(launch.get("threads") or {}).get("threads") for launch in launches]
    versions = [json.dumps(launch.get("versions"), sort_keys=True) for launch in launches]
    parts = []
    if len(set(threads)) > 1:
        parts.append(f"torch threads {' -> '.join(str(t) for t in threads)}")
    if len(set(versions)) > 1:
        parts.append("versions " + " -> ".join(str((launch.get("versions") or {}).get("torch")) for launch in launches))
    if not parts:
        return None
    return f"note: this run's {len(launches)} launches used {'; '.join(parts)} (run.json, launches): the result is not bit-exact"


@contextlib.contextmanager
def logged_warnings(write: Callable[[str], None]) -> Iterator[None]:
    """While active, every warning shown on the terminal is also passed to ``write`` (a log
    file's writer), formatted as on the terminal."""
    previous = warnings.showwarning

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: Any = None,
        line: str | None = None,
    ) -> None:
        previous(message, category, filename, lineno, file, line)
        with contextlib.suppress(Exception):
            write(warnings.formatwarning(message, category, filename, lineno, line).rstrip("\n"))

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous
