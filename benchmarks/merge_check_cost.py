"""What it would cost to see ``.data`` edits after a merge: the merged forward with the check mmpeft
runs (version counters and storage addresses, host-side) beside the same forward with a check by
value (every tensor a merge reads compared with a copy taken at the merge).

An edit through ``param.data`` (or ``torch.Tensor.set_`` on it) bumps no version counter, so only
a comparison of values sees it; that needs a copy of the frozen weight of every merged layer (one
more weight's memory) and, on a GPU, a device sync per layer (``torch.equal`` returns a bool).
docs/concepts.md ("Merging") states the choice these numbers support. Three paths, interleaved
call by call (``stamp``, ``values``, ``none``, ...) after warm-up, medians written to
benchmarks/results (``merge_check_cost.json`` / ``.md``)::

    python benchmarks/merge_check_cost.py            # timm ViT-S/16 at 224 px, 4 blocks, batch 1 and 8
    python benchmarks/merge_check_cost.py --quick    # seconds: a 2-block ViT at 32 px
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import median, write
from mmpeft import wrap_multimodal
from mmpeft.tuners.merging import WeightMerging

_STAMP = WeightMerging._merged_current


def _by_value(layer: Any) -> None:
    """The stamp check, then every source compared with its copy from the merge (re-merged on a change)."""
    _STAMP(layer)
    copies = getattr(layer, "_bench_copies", None)
    if copies is None or len(copies) != len(layer._merge_sources):
        layer._bench_copies = [t.detach().clone() for t in layer._merge_sources]
        return
    if not all(torch.equal(t, c) for t, c in zip(layer._merge_sources, copies)):
        layer.merge()
        layer._bench_copies = [t.detach().clone() for t in layer._merge_sources]


def _no_check(layer: Any) -> None:
    return None


CHECKS = {"stamp": _STAMP, "values": _by_value, "none": _no_check}


def _model(size: int, depth: int, dim: int, heads: int) -> torch.nn.Module:
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_small_patch16_224",
        pretrained=False,
        img_size=size,
        depth=depth,
        embed_dim=dim,
        num_heads=heads,
        num_classes=0,
    ).eval()
    w = wrap_multimodal(vit, ("optical", "dsm"), preset="lora", rank=8)  # every layer merges
    w.merge_adapters()
    return w.eval()


def _time(model: torch.nn.Module, x: dict[str, torch.Tensor], check: str) -> float:
    WeightMerging._merged_current = CHECKS[check]  # type: ignore[method-assign]
    try:
        start = time.perf_counter()
        with torch.no_grad():
            model(x)
        return time.perf_counter() - start
    finally:
        WeightMerging._merged_current = _STAMP  # type: ignore[method-assign]


def run(size: int, depth: int, dim: int, heads: int, batches: list[int], calls: int) -> dict[str, Any]:
    model = _model(size, depth, dim, heads)
    layers = sum(1 for _ in model.layers())
    weight_mb = sum(layer.base_layer.weight.numel() * 4 for _, layer in model.layers()) / 2**20
    results: dict[str, Any] = {
        "model": f"timm ViT dim {dim}, depth {depth}, {size} px, LoRA r=8 on {layers} merged layers, 2 modalities",
        "copied_weight_mib": round(weight_mb, 2),
    }
    for batch in batches:
        g = torch.Generator().manual_seed(0)
        x = {
            "optical": torch.rand(batch, 3, size, size, generator=g),
            "dsm": torch.rand(batch, 1, size, size, generator=g),
        }
        for check in CHECKS:  # warm-up (and the value check's first copies)
            for _ in range(2):
                _time(model, x, check)
        times: dict[str, list[float]] = {c: [] for c in CHECKS}
        for _ in range(calls):
            for check in CHECKS:
                times[check].append(_time(model, x, check))
        med = {c: median(t) for c, t in times.items()}
        results[f"batch_{batch}"] = {
            **{f"{c}_ms": round(1000 * v, 3) for c, v in med.items()},
            "stamp_over_none": round(med["stamp"] / med["none"], 4),
            "values_over_stamp": round(med["values"] / med["stamp"], 4),
            "values_extra_ms_per_layer": round(1000 * (med["values"] - med["stamp"]) / layers, 4),
        }
    return results


def _median_ms(fn: Any, calls: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * median(times)


def per_layer(calls: int) -> dict[str, Any]:
    """One ``torch.equal`` of a ViT-B weight with its copy beside that layer's merged matmul at
    batch 1 (197 tokens, 2 modalities), one thread: the check's share of the layer's work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    try:
        for rows, cols in [(2304, 768), (3072, 768), (768, 3072)]:
            w, x = torch.randn(rows, cols), torch.randn(2, 197, cols)
            copy = w.clone()
            equal = _median_ms(lambda w=w, c=copy: torch.equal(w, c), calls)
            matmul = _median_ms(lambda w=w, x=x: torch.matmul(x, w.T), calls)
            out[f"{rows}x{cols}"] = {
                "equal_ms": round(equal, 3),
                "matmul_ms": round(matmul, 3),
                "ratio": round(equal / matmul, 4),
            }
    finally:
        torch.set_num_threads(before)
    return out


def _table(res: dict[str, Any]) -> str:
    rows = [
        f"Merged forward, {res['model']}; the value check keeps {res['copied_weight_mib']} MiB of weight copies.",
        "",
        "| batch | no check (ms) | stamp (ms, mmpeft) | values (ms) | values / stamp | extra ms per layer |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for key, r in res.items():
        if key.startswith("batch_"):
            rows.append(
                f"| {key.removeprefix('batch_')} | {r['none_ms']} | {r['stamp_ms']} | {r['values_ms']} | "
                f"{r['values_over_stamp']} | {r['values_extra_ms_per_layer']} |"
            )
    rows += ["", "| ViT-B weight | torch.equal (ms) | merged matmul, batch 1 (ms) | ratio |", "|---|---:|---:|---:|"]
    rows += [f"| {k} | {v['equal_ms']} | {v['matmul_ms']} | {v['ratio']} |" for k, v in res["per_layer"].items()]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 2-block ViT at 32 px, 3 calls")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.quick:
        res = run(size=32, depth=2, dim=64, heads=2, batches=[2], calls=3)
        res["per_layer"] = per_layer(calls=3)
    else:
        res = run(size=224, depth=4, dim=384, heads=6, batches=[1, 8], calls=9)
        res["per_layer"] = per_layer(calls=30)
    write("merge_check_cost", res, _table(res), args.out)


if __name__ == "__main__":
    main()
