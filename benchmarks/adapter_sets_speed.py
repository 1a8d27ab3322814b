"""The single-set path keeps its speed with named adapter sets: CPU training steps, side by side.

Two models of the same frozen timm ViT and the same MMLoRA set, two modalities:

- ``single``: ``wrap_multimodal(vit, preset="mmlora")``, the path every existing user takes;
- ``sets``: wrapped with another set (preset "lora"), the MMLoRA set added through
  ``add_adapter`` and made active with ``set_adapter`` (the other set stays inactive).

Both run the same training step (forward, loss, backward, SGD step), interleaved step by step
(``single``, ``sets``, ``sets``, ``single``, ...) after warm-up steps, so that the load of a shared machine
falls on both alike; the medians and their ratio are written to benchmarks/results
(``adapter_sets_speed.json`` / ``.md``)::

    python benchmarks/adapter_sets_speed.py            # vit_tiny at 96 px, depth 6, 30 steps each
    python benchmarks/adapter_sets_speed.py --quick    # seconds: a 2-block ViT at 32 px, 5 steps
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import median, write
from mmpeft import wrap_multimodal


def _vit(size: int, depth: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=size, depth=depth, num_classes=0).eval()


def _models(size: int, depth: int) -> dict[str, torch.nn.Module]:
    single = wrap_multimodal(_vit(size, depth), ("optical", "dsm"), preset="mmlora")
    sets = wrap_multimodal(_vit(size, depth), ("optical", "dsm"), preset="lora")
    sets.add_adapter("mmlora", preset="mmlora")
    sets.set_adapter("mmlora")
    sets.load_trainable_state_dict(single.trainable_state_dict())  # the very same set
    return {"single": single.train(), "sets": sets.train()}


def _step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], float]:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def run() -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = sum(o.float().square().mean() for o in model(batch).values())
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    return run


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a 2-block ViT at 32 px, 5 steps (seconds)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per model (default 30, quick 5)")
    p.add_argument("--batch", type=int, default=4, help="samples per modality")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: least noise on shared cores)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    size, depth, steps = (32, 2, args.steps or 5) if args.quick else (96, 6, args.steps or 30)
    g = torch.Generator().manual_seed(1)
    batch = {
        "optical": torch.rand(args.batch, 3, size, size, generator=g),
        "dsm": torch.rand(args.batch, 1, size, size, generator=g),
    }
    runs = {name: _step(model, batch) for name, model in _models(size, depth).items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(steps + 3):  # 3 warm-up steps each, not timed
        for name in list(runs) if i % 2 == 0 else list(runs)[::-1]:  # neither always goes first
            t = runs[name]()
            if i >= 3:
                times[name].append(t)
    med = {name: median(ts) * 1e3 for name, ts in times.items()}
    ratio = med["sets"] / med["single"]
    data = {
        "model": f"vit_tiny depth {depth} at {size} px",
        "batch_per_modality": args.batch,
        "steps": steps,
        "median_ms": med,
        "sets_over_single": ratio,
    }
    table = "\n".join(
        [
            f"CPU training step, {data['model']}, 2 modalities x {args.batch}, median of {steps} interleaved steps",
            "",
            "| model | median step (ms) |",
            "|---|---:|",
            *(f"| {name} | {ms:.1f} |" for name, ms in med.items()),
            f"| ratio sets / single | {ratio:.3f} |",
        ]
    )
    write("adapter_sets_speed", data, table, args.out)
    return med


if __name__ == "__main__":
    main()
