"""What the wrap-time dry run costs: wrapping SAM's image encoder with the shape-only dry run
(meta tensors, the default) beside the real one (two forwards) and without any (``probe=False``).

For each encoder (random weights, ``mmpeft.backbones.build_sam_encoder``) the three variants are
timed interleaved, ``--repeats`` times each, on a fresh copy of the model (the copy is not
timed); the table gives medians. The real dry run is the same code with the meta path turned
off. Both dry runs must find the same placements and batch factors (checked; an error if not).
Writes ``results/probe_cost.json`` and ``results/probe_cost.md``.

    python benchmarks/probe_cost.py [--specs vit_b vit_h] [--size 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, write

import mmpeft
import mmpeft.targeting.inject as inject
from mmpeft.backbones import build_sam_encoder
from mmpeft.targeting.probe import dry_run

VARIANTS = ("shapes", "real", "none")


def _wrap(model: torch.nn.Module, variant: str) -> tuple[float, dict[str, Any]]:
    """Seconds to wrap ``model`` with ``variant``'s dry run, and {layer: batch factor}."""
    inject.dry_run = functools.partial(dry_run, shapes_only=variant != "real")  # type: ignore[assignment]
    try:
        t0 = time.perf_counter()
        wrapped = mmpeft.wrap_multimodal(model, ("optical", "dsm"), "lora", probe=variant != "none")
        seconds = time.perf_counter() - t0
    finally:
        inject.dry_run = dry_run  # type: ignore[assignment]
    return seconds, {n: layer.batch_factor for n, layer in wrapped.layers()}


def measure(spec: str, size: int, repeats: int) -> dict[str, Any]:
    """Median wrap time of each variant on SAM ``spec`` at ``size`` px."""
    torch.manual_seed(0)
    base = build_sam_encoder(spec, img_size=size).eval()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    placed: dict[str, dict[str, Any]] = {}
    for _ in range(repeats):
        for variant in VARIANTS:  # interleaved: the machine's load falls on every variant alike
            model = copy.deepcopy(base)
            seconds, placed[variant] = _wrap(model, variant)
            times[variant].append(seconds)
            del model
    if placed["shapes"] != placed["real"]:
        raise AssertionError(
            f"{spec}: the shape-only dry run placed {placed['shapes']} but the real one {placed['real']}"
        )
    return {
        "spec": spec,
        "size": size,
        "repeats": repeats,
        "layers": len(placed["shapes"]),
        "median_s": {v: median(times[v]) for v in VARIANTS},
        "times_s": times,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", nargs="+", default=["vit_b", "vit_h"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    rows = [measure(s, args.size, args.repeats) for s in args.specs]
    table = "\n".join(
        [
            "| encoder | px | layers | shape-only dry run (s) | real dry run (s) | no dry run (s) |",
            "|---|---|---|---|---|---|",
        ]
        + [
            f"| SAM {r['spec']} | {r['size']} | {r['layers']} | {r['median_s']['shapes']:.2f} | "
            f"{r['median_s']['real']:.2f} | {r['median_s']['none']:.2f} |"
            for r in rows
        ]
        + [
            "",
            f"Medians of {args.repeats} interleaved runs each, {torch.get_num_threads()} threads; wrap_multimodal "
            "(method='lora') on a fresh copy of a randomly initialised encoder; placements and batch factors of both "
            "dry runs identical.",
        ]
    )
    write("probe_cost", {"rows": rows}, table)


if __name__ == "__main__":
    main()
