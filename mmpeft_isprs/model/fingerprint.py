"""Encoder files known by their content: a SHA-256 of the file, and the load report as plain data.

Two official files can hold tensors of the same shapes and other values (``sam2_hiera_tiny.pt``
and ``sam2.1_hiera_tiny.pt``): a path or a shape check cannot tell them apart, a hash can. The
hash is stored with the trained weights (``encoder_sha256``), in the run's ``run.json`` and in
every evaluation's ``metrics.json``; evaluation and ``predict`` compare it with the file they load.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

__all__ = ["file_sha256", "short_hash", "load_report_dict", "describe_load_report", "encoder_record"]

_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes (remembered per path, size and modification time, so a
    process hashes a file once)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _CACHE:
        with p.open("rb") as f:
            _CACHE[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return _CACHE[key]


def short_hash(digest: str | None) -> str:
    """The first 12 hex digits (enough to tell files apart in a message or a folder name)."""
    return (digest or "none")[:12]


def load_report_dict(report: Any) -> dict[str, Any] | None:
    """A SAM or encoder load report as JSON-ready data: ``source``, counts and the key lists
    (``loaded``, ``dropped``, ``missing``, ``unexpected``); None without a report."""
    if report is None:
        return None
    out: dict[str, Any] = {"source": str(getattr(report, "source", getattr(report, "path", "")))}
    for name in ("loaded", "dropped", "missing", "unexpected", "resized", "zeroed"):
        value = getattr(report, name, None)
        if isinstance(value, (list, tuple, set, dict)):
            keys = sorted(map(str, value))
            out[name] = keys
            out[f"n_{name}"] = len(keys)
    return out


def describe_load_report(report: dict[str, Any] | None, digest: str | None) -> str:
    """One line: which encoder file was loaded (with its hash) and what happened to its keys."""
    if report is None:
        return "encoder weights: none (model.checkpoint unset: a random encoder from the seed)"
    counts = ", ".join(
        f"{report[f'n_{k}']} {k}" for k in ("loaded", "dropped", "missing", "unexpected") if f"n_{k}" in report
    )
    return f"encoder weights: {report['source']} (sha256 {short_hash(digest)}): {counts} key(s)"


def encoder_record(model: Any) -> dict[str, Any]:
    """The encoder file an MFNet was built from: ``path``, ``sha256`` (None without a file) and
    its load ``report`` (:func:`load_report_dict`), for ``run.json`` and the logs."""
    report = getattr(model, "load_report", None)
    path = getattr(report, "source", None) or getattr(model.config, "checkpoint", None)  # a name: its file
    return {
        "path": path,
        "sha256": file_sha256(path) if path and Path(path).is_file() else None,
        "report": load_report_dict(getattr(model, "load_report", None)),
    }
