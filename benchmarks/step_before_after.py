"""A CPU training step and a merged inference forward of this checkout beside another commit's.

Two versions of a package cannot share one process, so each round starts one subprocess per
tree (this checkout, and ``--base``: a checkout of the commit to compare with, e.g. made by
``git worktree add /tmp/base <commit>``), alternating which goes first; each subprocess builds
the same seeded model (timm vit_tiny, depth 6, 96 px, optical + DSM, batch 4 per modality, one
thread), runs warm-up steps and then times training steps of the MMLoRA preset (forward, loss,
backward, SGD) and merged forwards of the ``lora`` preset (no mixing: ``merge_adapters``, no grad). Medians over all rounds and their ratio go
to benchmarks/results (``step_before_after.json`` / ``.md``)::

    git worktree add /tmp/base 60e091c
    python benchmarks/step_before_after.py --base /tmp/base
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import median, write  # noqa: E402

_CHILD = r"""
import json, sys, time, timm, torch
from mmpeft import wrap_multimodal
torch.set_num_threads(1)
steps, warmup = int(sys.argv[1]), 3
torch.manual_seed(0)
vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=96, depth=6, num_classes=0).eval()
model = wrap_multimodal(vit, ("optical", "dsm"), preset="mmlora").train()
g = torch.Generator().manual_seed(1)
batch = {"optical": torch.rand(4, 3, 96, 96, generator=g), "dsm": torch.rand(4, 1, 96, 96, generator=g)}
opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
train = []
for i in range(steps + warmup):
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = sum(o.float().square().mean() for o in model(batch).values())
    loss.backward()
    opt.step()
    if i >= warmup:
        train.append(time.perf_counter() - t0)
torch.manual_seed(0)
vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=96, depth=6, num_classes=0).eval()
model = wrap_multimodal(vit, ("optical", "dsm"), preset="lora").eval()  # no mixing: mergeable
model.merge_adapters()
merged = []
with torch.no_grad():
    for i in range(steps + warmup):
        t0 = time.perf_counter()
        model(batch)
        if i >= warmup:
            merged.append(time.perf_counter() - t0)
print(json.dumps({"train": train, "merged": merged}))
"""


def _run(tree: Path, steps: int) -> dict[str, list[float]]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(steps)], cwd=tree, env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, required=True, help="a checkout of the commit to compare with")
    p.add_argument("--rounds", type=int, default=4, help="subprocess pairs (the order alternates)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per subprocess")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    if not (args.base / "mmpeft" / "__init__.py").is_file():
        raise SystemExit(f"--base {args.base}: no mmpeft/__init__.py there (make one with git worktree add)")
    trees = {"base": args.base.resolve(), "head": ROOT}
    times: dict[str, dict[str, list[float]]] = {t: {"train": [], "merged": []} for t in trees}
    for r in range(args.rounds):
        for name in list(trees) if r % 2 == 0 else list(trees)[::-1]:
            got = _run(trees[name], args.steps)
            for kind in ("train", "merged"):
                times[name][kind] += got[kind]
    med = {f"{t}_{k}_ms": 1000 * median(v) for t, kinds in times.items() for k, v in kinds.items()}
    for kind in ("train", "merged"):
        med[f"ratio_{kind}_head_over_base"] = med[f"head_{kind}_ms"] / med[f"base_{kind}_ms"]
    rev = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=args.base, capture_output=True, text=True
    ).stdout.strip()
    table = (
        f"vit_tiny depth 6 at 96 px, train: MMLoRA, merged: lora, 2 modalities x 4, 1 thread; medians of {args.rounds} x "
        f"{args.steps} steps per tree, subprocesses alternating; base = {rev or args.base}\n\n"
        "| step | base (ms) | this checkout (ms) | ratio |\n|---|---:|---:|---:|\n"
        + "\n".join(
            f"| {k} | {med[f'base_{k}_ms']:.1f} | {med[f'head_{k}_ms']:.1f} | {med[f'ratio_{k}_head_over_base']:.3f} |"
            for k in ("train", "merged")
        )
        + "\n"
    )
    write("step_before_after", {"base": rev, "times": times, **med}, table, args.out)
    print(table)
    return med


if __name__ == "__main__":
    main()
