"""The thread policy under load: demo training throughput with a busy process pinned beside it.

For each setting (the default policy, ``train.threads=0``, and every manual ``train.threads=N``
up to the cores of this process) the script starts one busy-looping process pinned to the
first core, trains the demo's model (``configs/demo.yaml``) for ``--batches`` steps in a fresh
``mmpeft-isprs train`` process and reads the training throughput (images/s, training time
only) from the run's ``log.csv``. The check of issue 13: the default is within 1.5x of the best
manual setting. Writes ``results/threads.json`` and ``results/threads.md``.

    python benchmarks/threads.py [--batches 10] [--repeats 1] [--no-load]
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, write

BUSY = "import os, sys; os.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True: pass"


def _train(root: Path, run: Path, threads: int, batches: int) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    cmd = [
        sys.executable,
        "-m",
        "mmpeft_isprs",
        "train",
        "demo",
        f"data.root={root}",
        f"train.run_dir={run}",
        "train.epochs=1",
        f"train.batches_per_epoch={batches}",
        f"train.threads={threads}",
        "train.progress=false",
        "train.tensorboard=false",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    with (run / "log.csv").open() as f:
        row = list(csv.DictReader(f))[-1]
    line = next((x for x in proc.stdout.splitlines() if x.startswith("device:")), "")
    return {
        "images_per_s": float(row["images_per_s"]),
        "train_seconds": float(row["seconds"]),
        "wall_seconds": time.perf_counter() - t0,
        "header": line,
    }


def measure(setting: int, root: Path, work: Path, batches: int, load: bool) -> dict[str, Any]:
    """Throughput of ``train.threads=setting`` with (or without) one busy process on the first core."""
    core = sorted(os.sched_getaffinity(0))[0]
    busy = subprocess.Popen([sys.executable, "-c", BUSY, str(core)]) if load else None
    try:
        time.sleep(1.0 if load else 0.0)
        return _train(root, work / f"t{setting}_{time.monotonic_ns()}", setting, batches)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=10, help="training steps per measurement (batch 8, 128x128)")
    ap.add_argument("--repeats", type=int, default=1, help="measurements per setting (the median is reported)")
    ap.add_argument("--no-load", action="store_true", help="without the busy process (reference)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    settings = [0, *range(1, cores + 1)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run(
            [sys.executable, "-m", "mmpeft_isprs", "generate-synthetic", str(work / "data")],
            check=True,
            capture_output=True,
        )
        rows = []
        for s in settings:
            runs = [measure(s, work / "data", work, args.batches, not args.no_load) for _ in range(args.repeats)]
            rows.append({"threads": s, "images_per_s": median([r["images_per_s"] for r in runs]), "runs": runs})
            print(f"train.threads={s}: {rows[-1]['images_per_s']:.2f} images/s  {runs[0]['header']}", flush=True)
    auto = rows[0]["images_per_s"]
    best = max(rows[1:], key=lambda r: r["images_per_s"])
    ratio = best["images_per_s"] / max(auto, 1e-9)
    lines = [
        f"demo training throughput, {cores} cores, {'no load' if args.no_load else 'one busy process pinned to a core'}, "
        f"{args.batches} steps of 8 crops 128x128, median of {args.repeats}",
        "",
        "| train.threads | images/s | vs default |",
        "|---|---|---|",
    ]
    for r in rows:
        name = "0 (default policy)" if r["threads"] == 0 else str(r["threads"])
        lines.append(f"| {name} | {r['images_per_s']:.2f} | {r['images_per_s'] / max(auto, 1e-9):.2f}x |")
    lines += [
        "",
        f"best manual setting train.threads={best['threads']}: {ratio:.2f}x the default "
        f"({'within' if ratio <= 1.5 else 'NOT within'} 1.5x)",
    ]
    name = "threads_noload" if args.no_load else "threads"
    data = {"cores": cores, "load": not args.no_load, "batches": args.batches, "rows": rows, "best_over_default": ratio}
    write(name, data, "\n".join(lines), Path(args.out) if args.out else None)


if __name__ == "__main__":
    main()
