"""Training-sample throughput of the ISPRS data loader, beside the GPU step rate.

Random 256x256 crops (with flips) from ISPRS-sized tiles (synthetic Vaihingen layout, generated
once into ``--root``), read through the pipeline's own ``ISPRSDataModule`` with the configured
workers, batches of 10. The GPU step rate it is compared with comes from
``benchmarks/results/gpu/speed_gpu_*.json`` (the fastest measured scheme of ours): the loader
must deliver at least that many samples per second, or it becomes the bottleneck.

    python benchmarks/loader.py                       # workers 0, 2, 4; 30 batches each
    python benchmarks/loader.py --workers 0 4 8 --tile-size 2000

Writes benchmarks/results/loader.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, median, write


def gpu_rates() -> dict[str, dict[str, Any]]:
    """{method: {scheme, samples_per_s}} of the fastest measured GPU scheme of ours."""
    out = {}
    for path in sorted((RESULTS / "gpu").glob("speed_gpu_*.json")):
        data = json.loads(path.read_text())
        batch = int(data["args"]["batch"])
        for method, res in data.get("results", {}).items():
            ours = {s: r for s, r in res.items() if s.startswith("ours") and "median_s" in r}
            if ours:
                best = min(ours, key=lambda s: ours[s]["median_s"])
                out[method] = {"scheme": best, "samples_per_s": batch / ours[best]["median_s"], "file": path.name}
    return out


def measure(root: Path, workers: int, batches: int, args: argparse.Namespace) -> dict[str, Any]:
    """Samples per second of one loader configuration (the first ``--skip`` batches excluded)."""
    from mmpeft_isprs.config import load_config
    from mmpeft_isprs.datamodule import ISPRSDataModule

    cfg = load_config(
        "synthetic",
        [
            f"data.root={root}",
            f"data.synthetic.num_tiles={args.tiles}",
            f"data.synthetic.tile_size={args.tile_size}",
            f"train.num_workers={workers}",
            f"train.batch_size={args.batch}",
            f"train.batches_per_epoch={batches + args.skip}",
        ],
    )
    dm = ISPRSDataModule(cfg, log=lambda s: None)
    dm.setup()
    times = []
    it = iter(dm.train_loader(0))
    for _ in range(args.skip):  # start-up: workers, first reads of each tile
        next(it)
    t = time.perf_counter()
    for batch in it:
        now = time.perf_counter()
        times.append(now - t)
        t = now
        assert batch["optical"].shape[0] == args.batch
    return {
        "workers": workers,
        "batches": len(times),
        "median_batch_s": median(times),
        "samples_per_s": args.batch / median(times),
        "mean_samples_per_s": args.batch * len(times) / sum(times),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("data/loader_bench"))
    ap.add_argument("--tiles", type=int, default=5, help="synthetic tiles (3 train at 5)")
    ap.add_argument("--tile-size", dest="tile_size", type=int, default=2000, help="tile side (Vaihingen: about 2000)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--skip", type=int, default=5, help="batches not timed (start-up)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rows = [measure(args.root, w, args.batches, args) for w in args.workers]
    gpu = gpu_rates()
    lines = [
        f"Data loader, random {256}x{256} crops with flips from {args.tile_size}x{args.tile_size} synthetic tiles "
        f"(Vaihingen layout), batches of {args.batch}; median over {args.batches} batches after the first {args.skip}.",
        "",
        "| workers | samples/s (median batch) | samples/s (mean) |",
        "|---:|---:|---:|",
        *[f"| {r['workers']} | {r['samples_per_s']:.1f} | {r['mean_samples_per_s']:.1f} |" for r in rows],
        "",
        "GPU training-step rate to keep up with (fastest measured scheme of ours, benchmarks/results/gpu):",
        "",
        *[f"- {m}: {g['samples_per_s']:.1f} samples/s ({g['scheme']}, {g['file']})" for m, g in gpu.items()],
    ]
    write(
        "loader",
        {"args": {k: str(v) for k, v in vars(args).items()}, "loader": rows, "gpu": gpu},
        "\n".join(lines),
        args.out,
    )


if __name__ == "__main__":
    main()
