"""The demo: does the DSM help? Two small MFNets trained and scored on synthetic Vaihingen.

``mmpeft-isprs demo`` generates the synthetic data set (Vaihingen layout, DSM-dependent classes:
roofs look like roads and trees like grass), trains an MFNet on optical + DSM and another on
optical alone with the same budget (``configs/demo.yaml``: a tiny random-weight SAM-style
encoder with MMAdapter and scalar fusion, 128x128 crops), evaluates both on the synthetic test
tiles with sliding windows, writes colour maps, and prints both per-class tables side by side
with the mIoU gain from the DSM.

``--checkpoint sam_vit_b_01ec64.pth`` uses the real SAM encoder instead (slow on a CPU);
``--quick`` is a seconds-long smoke run (tiny data and model; numbers meaningless).

Every demo gets its own folder (``runs/demo/<date>-<time>``, or ``--out``); an interrupted demo
continues with ``mmpeft-isprs demo --resume [FOLDER]`` (the latest one by default), with the
options it was started with (stored in ``<out>/demo.json``).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError, ExperimentConfig, load_config
from .distributed import DistInfo, init_distributed
from .runner import fit, score_weights
from .task import EvalResult

__all__ = ["run_demo", "DemoResult", "QUICK_OVERRIDES", "side_by_side", "new_demo_dir", "latest_demo_dir", "DEMO_ROOT"]

DEMO_ROOT = Path("runs/demo")
OPTIONS = "demo.json"  # the options a demo folder was started with (read by --resume)
SUMMARY = "demo_summary.json"  # written when both runs are scored: the demo is finished

RUNS: tuple[tuple[str, str, list[str]], ...] = (
    ("optical+dsm", "optical_dsm", ["optical", "dsm"]),
    ("optical", "optical", ["optical"]),
)

QUICK_OVERRIDES: tuple[str, ...] = (
    "data.synthetic.num_tiles=3",
    "data.synthetic.tile_size=96",
    "model.img_size=64",
    "model.embed_dim=32",
    "model.num_heads=2",
    "model.decode_channels=16",
    "model.window_size=4",
    "model.decoder_heads=2",
    "train.epochs=1",
    "train.batches_per_epoch=2",
    "train.batch_size=2",
    "train.num_workers=0",
    "eval.stride=32",
    "eval.val_stride=64",
)
"""What ``--quick`` changes: 3 tiles of 96 px, a 2-block-wide toy model, 2 steps."""


@dataclass
class DemoResult:
    """Test-set results of both runs, and the wall time of the whole demo."""

    results: dict[str, EvalResult]
    seconds: float
    summary: str


def _backbone_of(checkpoint: str) -> str:
    match = re.search(r"vit_(tiny|[blh])(?![a-z])", Path(checkpoint).name)
    return f"vit_{match.group(1)}" if match else "vit_b"


def demo_config(
    out: str | Path, checkpoint: str | None, quick: bool, overrides: Sequence[str], name: str, modalities: list[str]
) -> ExperimentConfig:
    """The demo's config for one run (``configs/demo.yaml`` + options + user overrides)."""
    out = Path(out)
    items = [
        f"data.root={out / 'data'}",
        f"train.run_dir={out / name}",
        f"name=demo_{name}",
        f"model.modalities=[{', '.join(modalities)}]",
        "eval.save_predictions=true",
    ]
    if quick:
        items += QUICK_OVERRIDES
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise ConfigError(
                f"--checkpoint: {checkpoint} not found (an official SAM file such as sam_vit_b_01ec64.pth)"
            )
        items += [
            f"model.checkpoint={checkpoint}",
            f"model.backbone={_backbone_of(checkpoint)}",
            "model.embed_dim=null",
            "model.depth=null",
            "model.num_heads=null",
        ]
    return load_config("demo", [*items, *overrides])


def new_demo_dir(root: str | Path = DEMO_ROOT) -> Path:
    """A folder for a new demo: ``<root>/<YYYYmmdd-HHMMSS>`` (never one that exists)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = Path(root) / stamp, 1
    while path.exists():
        path, n = Path(root) / f"{stamp}-{n}", n + 1
    return path


def latest_demo_dir(root: str | Path = DEMO_ROOT) -> Path:
    """The most recent demo folder under ``root`` (the one ``--resume`` continues)."""
    found = sorted(p.parent for p in Path(root).glob(f"*/{OPTIONS}"))
    if not found:
        raise ConfigError(f"--resume: no demo folder under {root} (start one with mmpeft-isprs demo)")
    return found[-1]


def _options(
    out: Path, checkpoint: str | None, quick: bool, overrides: Sequence[str], resume: bool, overwrite: bool
) -> dict[str, Any]:
    """The options of this demo (read back on resume); refuses to reuse a folder."""
    stored = out / OPTIONS
    if resume:
        if not stored.is_file():
            raise ConfigError(f"--resume: {out} holds no demo ({OPTIONS} not found)")
        return json.loads(stored.read_text())
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(
            f"{out} already holds a demo run: continue it with `mmpeft-isprs demo --resume {out}`, "
            "replace it with --overwrite, or choose another --out"
        )
    return {"checkpoint": checkpoint, "quick": quick, "overrides": list(overrides)}


def _continue(run_dir: Path, resume: bool, overwrite: bool) -> list[str]:
    """Resume a run that has a checkpoint; replace it when asked or when nothing was saved yet."""
    if resume and (run_dir / "last.pt").is_file():
        return ["train.resume=true"]
    return ["train.overwrite=true"] if resume or overwrite else []


def side_by_side(results: dict[str, EvalResult], class_names: Sequence[str]) -> str:
    """Per-class F1 and IoU of both runs in adjacent columns, the IoU gain, and the means (%)."""
    a, b = (results[label].metrics for label, _, _ in RUNS)
    head = f"{'class':<22}{'optical+DSM':>16}{'optical':>16}{'IoU gain':>10}"
    sub = f"{'':<22}{'F1':>8}{'IoU':>8}{'F1':>8}{'IoU':>8}"
    rows = [head, sub]
    for n in class_names:
        rows.append(
            f"{n:<22}{a['F1'][n] * 100:8.2f}{a['IoU'][n] * 100:8.2f}{b['F1'][n] * 100:8.2f}"
            f"{b['IoU'][n] * 100:8.2f}{(a['IoU'][n] - b['IoU'][n]) * 100:+10.2f}"
        )
    for key in ("OA", "mF1", "mIoU"):
        rows.append(f"{key:<22}{a[key] * 100:16.2f}{b[key] * 100:16.2f}{(a[key] - b[key]) * 100:+10.2f}")
    rows.append(f"(mF1 and mIoU over {', '.join(a['eval_classes'])}; OA over all classes)")
    return "\n".join(rows)


def run_demo(
    out: str | Path | None = None,
    checkpoint: str | None = None,
    quick: bool = False,
    overrides: Sequence[str] = (),
    info: DistInfo | None = None,
    log: Callable[[str], None] = print,
    resume: bool = False,
    overwrite: bool = False,
) -> DemoResult:
    """Train and evaluate both runs (see the module doc); writes ``<out>/demo_summary.json``.

    ``out`` defaults to a new folder under ``runs/demo`` (with ``resume``: the latest one). A
    folder already used is refused unless ``resume`` (continue it, with its stored options) or
    ``overwrite``.
    """
    t0 = time.perf_counter()
    out = Path(out) if out is not None else latest_demo_dir() if resume else new_demo_dir()
    opts = _options(out, checkpoint, quick, overrides, resume, overwrite)
    if resume and (out / SUMMARY).is_file():
        return _finished(out, log)
    spent = float(opts.get("seconds", 0.0)) if resume else 0.0  # the earlier launches' time
    configs = {
        label: demo_config(
            out,
            opts["checkpoint"],
            opts["quick"],
            [*opts["overrides"], *_continue(out / name, resume, overwrite)],
            name,
            mods,
        )
        for label, name, mods in RUNS
    }
    info = info or init_distributed(configs["optical+dsm"].train.device, configs["optical+dsm"].train.threads)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / SUMMARY).unlink(missing_ok=True)  # --overwrite: the earlier demo's summary goes
        (out / OPTIONS).write_text(json.dumps(opts, indent=1))
        hint = "resumed" if resume else f"interrupted? continue with: mmpeft-isprs demo --resume {out}"
        log(f"demo folder {out} ({hint})")
    results: dict[str, EvalResult] = {}
    for label, cfg in configs.items():
        if info.is_main:
            log(
                f"\n=== {label}: training ({cfg.train.epochs} epochs x {cfg.train.batches_per_epoch} batches of "
                f"{cfg.train.batch_size} {cfg.crop_size}x{cfg.crop_size} crops) ==="
            )
        run = fit(cfg, info, log=log)
        if info.is_main:
            log(f"=== {label}: test tiles ===")
        results[label] = score_weights(cfg, run.best, info=info, out_dir=Path(cfg.train.run_dir) / "test", log=log)
        if info.is_main:  # the time so far, for a resumed demo's wall time
            (out / OPTIONS).write_text(json.dumps({**opts, "seconds": spent + time.perf_counter() - t0}, indent=1))
    return _report(out, configs, results, spent + time.perf_counter() - t0, opts, info, log)


def _finished(out: Path, log: Callable[[str], None]) -> DemoResult:
    """A finished demo asked to resume: nothing to train, its summary printed again, no file touched."""
    saved = json.loads((out / SUMMARY).read_text())
    log(f"{out} holds a finished demo (its {SUMMARY}): nothing to resume; its results:")
    log("\n=== test tiles: optical+DSM vs optical ===\n" + saved["table"] + "\n" + saved["summary"])
    return DemoResult({}, float(saved["seconds"]), saved["summary"])


def _report(
    out: Path,
    configs: dict[str, ExperimentConfig],
    results: dict[str, EvalResult],
    seconds: float,
    opts: dict[str, Any],
    info: DistInfo,
    log: Callable[[str], None],
) -> DemoResult:
    """The side-by-side table, the summary line and ``demo_summary.json``."""
    names = list(results["optical"].metrics["IoU"])  # type: ignore[arg-type]
    table = side_by_side(results, names)
    a, b = (results[label].metrics["mIoU"] * 100 for label, _, _ in RUNS)  # type: ignore[operator]
    summary = (
        f"DSM gain: mIoU {a - b:+.2f} points (optical+DSM {a:.2f} vs optical {b:.2f}); "
        f"demo wall time {seconds / 60:.1f} min"
    )
    if info.is_main:
        log("\n=== test tiles: optical+DSM vs optical ===\n" + table + "\n" + summary)
        maps = [str(Path(c.train.run_dir) / "test" / "predictions") for c in configs.values()]
        log(f"colour maps: {maps[0]} and {maps[1]}")
        figs = [
            f"{Path(c.train.run_dir) / 'test' / 'figures'} (tiles, confusion) and {Path(c.train.run_dir) / 'figures'} (curves)"
            for c in configs.values()
        ]
        log(f"figures: {figs[0]}; {figs[1]}")
        payload: dict[str, Any] = {
            "seconds": seconds,
            "gain_mIoU": (a - b) / 100,
            "quick": opts["quick"],
            "checkpoint": opts["checkpoint"],
            "table": table,
            "summary": summary,
            "runs": {k: r.metrics for k, r in results.items()},
        }
        (out / SUMMARY).write_text(json.dumps(payload, indent=1))
    return DemoResult(results, seconds, summary)
