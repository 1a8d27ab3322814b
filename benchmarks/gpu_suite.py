"""Every GPU figure of docs/performance.md in two calls of under 10 minutes on one H100, never hanging.

Phases, each in its own process under a time limit (a phase that fails or runs out of time is
recorded and the suite goes on), results into one folder:

1. ``sanity``: device, versions; the bf16 frozen base against fp32 autocast, compiled against
   eager, on a small SAM encoder on the device.
2. ``train_adapter`` / ``train_lora``: MFNet vit_b training steps at batch 10, eager, the schemes
   interleaved in one process (``benchmarks/speed.py``): the authors' per-modality scheme in
   fp32 (b), the frozen floor in bf16 (c), ours with the bf16 frozen base, with the relative
   positions as a mask and as extra q/k channels; operator and CUDA-kernel counts per step.
3. ``memory`` / ``memory_channels``: peak CUDA memory of one training step of the six Table VI
   configurations at batch 1 (bf16 base + autocast), and vit_h MMAdapter at batch 10 without
   checkpointing; with either way of adding the relative positions.
4. ``compiled_adapter`` / ``compiled_lora``: the references and ours with regionally compiled
   encoder blocks (compile time, recompilations).
5. ``inference``: sliding-window inference over a 2500x2000 tile at stride 32 (windows/s).
6. ``cuda_graphs``: the whole step compiled with CUDA graphs (``mode="reduce-overhead"``).

    python benchmarks/gpu_suite.py --group first --out results_gpu    # phases 1-3, about 6 minutes on an H100
    python benchmarks/gpu_suite.py --group second --out results_gpu   # phases 4-6, about 9 minutes
    python benchmarks/gpu_suite.py --quick --device cpu               # smoke test of the suite itself

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

# eager schemes: the references (b) and (c), ours with the frozen bf16 base (relative positions as
# an additive mask: the measured default on CUDA; as extra q/k channels: the candidate), and
# ours with the grouped real-query attention (the CPU's choice)
EAGER = ["per_modality+fp32", "floor+bf16", "ours+bf16+base", "ours+bf16+base+relpos=channels"]
TRAIN_ADAPTER = [*EAGER, "ours+bf16+base+queries=real"]
TRAIN_LORA = EAGER
# compiled schemes in their own phases (cold Inductor compiles take about a minute each): the
# references again, so that the ratios come from one process
COMPILED = [
    "per_modality+fp32",
    "floor+bf16",
    "ours+bf16+base+compile=blocks",
    "ours+bf16+base+relpos=channels+compile=blocks",
]
INFERENCE = ["inference+bf16+base", "inference+bf16+base+relpos=channels", "inference+bf16+base+compile=model-ro"]
#: two calls of at most 10 minutes each cover every phase
GROUPS = {
    "first": ["sanity", "train_adapter", "train_lora", "memory", "memory_channels"],
    "second": ["compiled_adapter", "compiled_lora", "inference", "cuda_graphs"],
}


def phases(args: argparse.Namespace) -> list[tuple[str, list[str], int]]:
    """(name, command, seconds allowed) of every phase, in order of importance."""
    out = str(args.out)
    common = ["--device", args.device, "--keep-going", "--out", out] + (["--quick"] if args.quick else [])
    train = [
        PY,
        str(HERE / "speed.py"),
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--warmup",
        "3",
        "--count-ops",
        "--no-memory",
        *common,
    ]
    tile = "2500x2000" if not args.quick else "300x300"
    memory = [
        PY,
        str(HERE / "memory.py"),
        "--device",
        args.device,
        "--batches",
        "1",
        "--extra",
        "adapter:vit_h:10",
        "--timeout",
        "60",
        "--out",
        out,
        *(["--backbones", "vit_b"] if args.quick else []),
    ]
    return [
        ("sanity", [PY, str(HERE / "gpu_sanity.py"), "--device", args.device, "--out", out], 75),
        ("train_adapter", [*train, "--methods", "adapter", "--tag", "gpu_adapter", "--schemes", *TRAIN_ADAPTER], 90),
        ("train_lora", [*train, "--methods", "lora", "--tag", "gpu_lora", "--schemes", *TRAIN_LORA], 80),
        ("memory", [*memory, "--scheme", "ours+bf16+base", "--tag", "gpu"], 110),
        ("memory_channels", [*memory, "--scheme", "ours+bf16+base+relpos=channels", "--tag", "gpu_channels"], 110),
        (
            "compiled_adapter",
            [*train, "--methods", "adapter", "--tag", "gpu_compiled_adapter", "--schemes", *COMPILED],
            170,
        ),
        ("compiled_lora", [*train, "--methods", "lora", "--tag", "gpu_compiled_lora", "--schemes", *COMPILED], 170),
        (
            "inference",
            [
                PY,
                str(HERE / "speed.py"),
                "--inference-only",
                "--methods",
                "adapter",
                "--tile",
                tile,
                "--stride",
                "32",
                "--infer-batch",
                "64",
                "--timeout",
                "100",
                "--inference-variants",
                *INFERENCE,
                "--tag",
                "gpu_inference",
                *common,
            ],
            120,
        ),
        (
            "cuda_graphs",
            [
                *train,
                "--methods",
                "adapter",
                "--tag",
                "gpu_cuda_graphs",
                "--schemes",
                "floor+bf16",
                "ours+bf16+base+compile=model-ro",
            ],
            150,
        ),
    ]


def run_phase(name: str, cmd: list[str], limit: int, out: Path) -> dict[str, Any]:
    """Run one phase under ``limit`` seconds; its output goes to ``<out>/<name>.log``."""
    t = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        try:
            proc = subprocess.run(
                ["timeout", "-k", "5", str(limit), *cmd],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
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
    names = [
        "sanity",
        "speed_gpu_adapter",
        "speed_gpu_lora",
        "memory_gpu",
        "memory_gpu_channels",
        "speed_gpu_compiled_adapter",
        "speed_gpu_compiled_lora",
        "speed_gpu_inference",
        "speed_gpu_cuda_graphs",
    ]
    for md in names:
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
    ap.add_argument(
        "--group",
        choices=sorted(GROUPS),
        default=None,
        help="the phases of one call of at most 10 minutes: "
        + "; ".join(f"{k}: {' '.join(v)}" for k, v in GROUPS.items()),
    )
    ap.add_argument("--quick", action="store_true", help="tiny models: a smoke test of the suite")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start, runs = time.perf_counter(), []
    earlier = args.out / "suite.json"  # phases of an earlier call into the same folder (--group first)
    kept = json.loads(earlier.read_text()) if earlier.is_file() else []
    only = args.only or (GROUPS[args.group] if args.group else None)
    for name, cmd, limit in phases(args):
        if only and name not in only:
            continue
        left = args.budget - (time.perf_counter() - start)
        if left < 20:
            runs.append(
                {"phase": name, "status": "skipped (suite budget spent)", "seconds": 0, "command": " ".join(cmd)}
            )
            continue
        runs.append(run_phase(name, cmd, int(min(limit, left)), args.out))
        (args.out / "suite.json").write_text(json.dumps(_merged(kept, runs), indent=2))
        (args.out / "summary.md").write_text(summary(args.out, _merged(kept, runs)))
    print(summary(args.out, _merged(kept, runs)))


def _merged(kept: list[dict[str, Any]], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The phases of an earlier call not run again, then this call's."""
    done = {r["phase"] for r in runs}
    return [r for r in kept if r["phase"] not in done] + runs


if __name__ == "__main__":
    main()
