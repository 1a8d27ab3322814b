"""Every GPU figure of docs/performance.md in one run (about 8 minutes on one H100), never hanging.

Phases, each in its own process under a time limit (a phase that fails or runs out of time is
recorded and the suite goes on), results into one folder:

1. ``sanity``: device, versions; the bf16 frozen base against fp32 autocast, compiled against
   eager, on a small SAM encoder on the device.
2. ``train_adapter`` / ``train_lora``: MFNet vit_b training steps at batch 10, the schemes
   interleaved in one process (``benchmarks/speed.py``): the authors' per-modality scheme in
   fp32 (b), the frozen floor in bf16 (c), ours in bf16 eager / with the bf16 base / compiled,
   operator and CUDA-kernel counts per step, compile time, recompilations.
3. ``memory``: peak CUDA memory of one training step of the six Table VI configurations at batch
   1 (bf16 base + autocast), and vit_h MMAdapter at batch 10 without checkpointing.
4. ``inference``: sliding-window inference over a 2500x2000 tile at stride 32 (windows/s).

    python benchmarks/gpu_suite.py --out results_gpu          # on a CUDA machine
    python benchmarks/gpu_suite.py --quick --device cpu       # smoke test of the suite itself

Writes ``<out>/<phase>.json``, ``<out>/<phase>.log`` and ``<out>/summary.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable

TRAIN_ADAPTER = [
    "per_modality+fp32", "floor+bf16", "ours+bf16", "ours+bf16+base", "ours+bf16+base+queries=real",
    "ours_padded+bf16+base", "ours+bf16+base+compile=blocks", "ours+bf16+base+compile=model-ro",
]  # fmt: skip
TRAIN_LORA = [
    "per_modality+fp32", "floor+bf16", "ours+bf16+base", "ours+bf16+base+compile=blocks",
    "ours+bf16+base+compile=model-ro",
]  # fmt: skip
INFERENCE = ["inference+bf16+base", "inference+bf16+base+compile=model-ro"]


def phases(args: argparse.Namespace) -> list[tuple[str, list[str], int]]:
    """(name, command, seconds allowed) of every phase, in order of importance."""
    out = str(args.out)
    common = ["--device", args.device, "--keep-going", "--out", out] + (["--quick"] if args.quick else [])
    train = [PY, str(HERE / "speed.py"), "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", "3",
             "--count-ops", "--no-memory", *common]  # fmt: skip
    tile = "2500x2000" if not args.quick else "300x300"
    return [
        ("sanity", [PY, str(HERE / "gpu_sanity.py"), "--device", args.device, "--out", out], 75),
        ("train_adapter", [*train, "--methods", "adapter", "--tag", "gpu_adapter", "--schemes", *TRAIN_ADAPTER], 170),
        ("train_lora", [*train, "--methods", "lora", "--tag", "gpu_lora", "--schemes", *TRAIN_LORA], 120),
        ("memory", [PY, str(HERE / "memory.py"), "--device", args.device, "--batches", "1", "--scheme",
                    "ours+bf16+base", "--extra", "adapter:vit_h:10", "--timeout", "60", "--tag", "gpu", "--out", out,
                    *(["--backbones", "vit_b"] if args.quick else [])], 90),  # fmt: skip
        ("inference", [PY, str(HERE / "speed.py"), "--inference-only", "--methods", "adapter", "--tile", tile,
                       "--stride", "32", "--infer-batch", "64", "--timeout", "100", "--inference-variants", *INFERENCE,
                       "--tag", "gpu_inference", *common], 90),  # fmt: skip
    ]


def run_phase(name: str, cmd: list[str], limit: int, out: Path) -> dict[str, Any]:
    """Run one phase under ``limit`` seconds; its output goes to ``<out>/<name>.log``."""
    t = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        try:
            proc = subprocess.run(["timeout", "-k", "5", str(limit), *cmd], stdout=log, stderr=subprocess.STDOUT,
                                  cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
            rc = proc.returncode
        except OSError as e:
            log.write(f"could not start: {e}\n")
            rc = -1
    sec = time.perf_counter() - t
    status = "ok" if rc == 0 else ("timed out" if rc in (124, 137) else f"failed (exit {rc})")
    print(f"[{name}] {status} in {sec:.0f} s", flush=True)
    return {"phase": name, "status": status, "seconds": round(sec, 1), "command": " ".join(cmd)}


def summary(out: Path, runs: list[dict[str, Any]]) -> str:
    lines = ["# GPU suite", "", "| phase | status | seconds |", "|---|---|---:|"]
    lines += [f"| {r['phase']} | {r['status']} | {r['seconds']} |" for r in runs]
    for md in ("sanity", "speed_gpu_adapter", "speed_gpu_lora", "memory_gpu", "speed_gpu_inference"):
        path = out / f"{md}.md"
        if path.is_file():
            lines += ["", f"## {md}", "", path.read_text().strip()]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "gpu")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--budget", type=int, default=550, help="seconds for the whole suite; later phases are skipped")
    ap.add_argument("--only", nargs="+", default=None, help="run these phases only")
    ap.add_argument("--quick", action="store_true", help="tiny models: a smoke test of the suite")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start, runs = time.perf_counter(), []
    for name, cmd, limit in phases(args):
        if args.only and name not in args.only:
            continue
        left = args.budget - (time.perf_counter() - start)
        if left < 20:
            runs.append({"phase": name, "status": "skipped (suite budget spent)", "seconds": 0, "command": " ".join(cmd)})
            continue
        runs.append(run_phase(name, cmd, int(min(limit, left)), args.out))
        (args.out / "suite.json").write_text(json.dumps(runs, indent=2))
        (args.out / "summary.md").write_text(summary(args.out, runs))
    print(summary(args.out, runs))


if __name__ == "__main__":
    main()
