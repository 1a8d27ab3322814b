"""Run logs: ``log.csv`` (one row per epoch), ``metrics/epoch_NNN.json``, TensorBoard events, the run summary."""

from __future__ import annotations

import csv
import json
import platform
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..config import ExperimentConfig
from ..data import TileSet
from ..distributed import DistInfo
from ..model import MFNet
from ..model.fingerprint import describe_load_report
from ..threads import current_policy
from .records import mixed_launches, record_launch

__all__ = ["CSV_FIELDS", "RunLog", "TextLog", "describe_run", "run_header"]

CSV_FIELDS = (
    "epoch",
    "step",
    "lr",
    "train_loss",
    "val_OA",
    "val_mF1",
    "val_mIoU",
    "best_epoch",
    "seconds",
    "images_per_s",
)


class RunLog:
    """The per-epoch files of a run folder (rank 0 only); TensorBoard when asked for and installed."""

    def __init__(self, run_dir: Path, tensorboard: bool) -> None:
        self.run_dir = run_dir
        self.writer = _tensorboard(run_dir) if tensorboard else None

    def write(self, row: Mapping[str, Any], metrics: Mapping[str, Any] | None) -> None:
        """Append ``row`` to ``log.csv``; per-class ``metrics`` to JSON and TensorBoard."""
        path = self.run_dir / "log.csv"
        new = not path.exists()
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            if new:
                w.writeheader()
            w.writerow({k: ("" if v is None else v) for k, v in row.items()})
        if metrics is not None:
            out = self.run_dir / "metrics" / f"epoch_{row['epoch']:03d}.json"
            out.parent.mkdir(exist_ok=True)
            out.write_text(json.dumps({"epoch": row["epoch"], "split": "val", **metrics}, indent=1))
        if self.writer is not None:
            for k, v in row.items():
                if v is not None and k not in ("epoch", "step", "best_epoch"):
                    self.writer.add_scalar(k, v, row["epoch"])
            for name, iou in (metrics or {}).get("IoU", {}).items():
                self.writer.add_scalar(f"val_IoU/{name}", iou, row["epoch"])
            self.writer.flush()

    def trim(self, completed: int) -> None:
        """Drop log rows of epochs a resumed run will redo (written after its checkpoint)."""
        path = self.run_dir / "log.csv"
        if not path.exists():
            return
        with path.open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= completed]
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            w.writeheader()
            w.writerows(rows)

    def close(self) -> None:
        """Close the TensorBoard writer (if any)."""
        if self.writer is not None:
            self.writer.close()


class TextLog:
    """A ``log`` callable that also appends every line to a text file (``train.log``, ``eval.log``),
    each physical line after the time it was written (``2026-12-07 02:50:47 ``).

    The file is opened for each line (no handle kept open, nothing lost on a crash) and created
    with its folder at the first line; a file that cannot be written is reported once, on the
    forwarded log, and skipped. With ``hold=True`` the file lines wait in memory until
    :meth:`release` (a command that refuses before its work starts leaves no file behind).
    :meth:`write_file` writes to the file only (warnings, which the terminal already shows).
    """

    def __init__(self, path: Path, log: Callable[[str], None] = print, hold: bool = False) -> None:
        self.path, self.log, self.failed = Path(path), log, False
        self.held: list[str] | None = [] if hold else None

    def __call__(self, line: str) -> None:
        self.log(line)
        self.write_file(line)

    def write_file(self, line: str) -> None:
        """Append ``line`` to the file (not to the forwarded log), timestamped."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        text = "".join(f"{stamp} {x}\n" for x in (str(line).splitlines() or [""]))
        if self.held is not None:
            self.held.append(text)
        else:
            self._append(text)

    def release(self) -> None:
        """Write the held lines and stop holding."""
        held, self.held = self.held or [], None
        if held:
            self._append("".join(held))

    def _append(self, text: str) -> None:
        if self.failed:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(text)
        except OSError as exc:
            self.failed = True
            self.log(f"note: cannot write {self.path} ({exc}); the lines go to the output only")


def _tensorboard(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # TensorBoard is optional
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _ids(ids: list[str], show: int = 8) -> str:
    return " ".join(ids[:show]) + (f" ... ({len(ids)} tiles)" if len(ids) > show else "")


def describe_run(
    cfg: ExperimentConfig, model: MFNet, train_tiles: TileSet, val_tiles: TileSet | None, info: DistInfo
) -> str:
    """One paragraph: model, trainable parameters, tiles, schedule, processes and run folder."""
    t = cfg.train
    trainable = model.parameter_groups()["total"]["trainable"]
    return (
        f"{cfg.name}: {cfg.model.backbone} {cfg.model.mmpeft_preset}, modalities {cfg.model.modalities}, "
        f"{trainable:,} trainable parameters; {len(train_tiles)} train tiles, validation tiles "
        f"{_ids(val_tiles.ids) if val_tiles is not None else 'none'}; {t.epochs} epochs x "
        f"{t.batches_per_epoch} batches of {t.batch_size} ({info.world_size} process(es), {info.device}); "
        f"run dir {Path(t.run_dir)}"
    )


def _versions() -> dict[str, str]:
    import torch

    import mmpeft

    return {"python": platform.python_version(), "torch": torch.__version__, "mmpeft": mmpeft.__version__}


def run_header(
    cfg: ExperimentConfig, info: DistInfo, encoder: dict[str, Any] | None = None, resumed: bool = False
) -> str:
    """Record this launch in ``run.json`` (versions, device, threads, command, the encoder file,
    the resolved config; earlier launches kept on resume); return its lines for the log."""
    run_dir = Path(cfg.train.run_dir)
    threads = current_policy()
    versions = _versions()
    launch = {
        "versions": versions,
        "device": str(info.device),
        "world_size": info.world_size,
        "threads": threads.to_dict(),
    }
    launches = record_launch(run_dir, launch, cfg.to_dict(), encoder, resumed)
    lines = [
        "versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"device: {info.device} x {info.world_size} process(es); threads: {threads.describe()}",
        f"resolved config: {run_dir / 'config.yaml'} (with versions, threads and every launch: {run_dir / 'run.json'})",
    ]
    if encoder is not None:
        lines.append(describe_load_report(encoder.get("report"), encoder.get("sha256")))
    mixed = mixed_launches(launches)
    return "\n".join(lines + ([mixed] if mixed else []))
