"""Peak memory of one MFNet training step for the six configurations of Table VI.

On CPU it reports peak RSS of a fresh process per configuration; on a GPU peak CUDA memory,
beside the paper's Table VI figures (RTX 3090, batch not stated).

    python benchmarks/memory.py                       # CPU, batch 1 and 10, 256x256
    python benchmarks/memory.py --batches 1 --backbones vit_b
    python benchmarks/memory.py --device cuda
    python benchmarks/memory.py --backbones sam2_hiera_tiny dinov2_vitb14 --batches 2   # other encoders

Writes benchmarks/results/memory[_<tag>].{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write
from speed import run_scheme

PAPER_MB = {
    ("adapter", "vit_b"): 1872,
    ("adapter", "vit_l"): 4242,
    ("adapter", "vit_h"): 6854,
    ("lora", "vit_b"): 1924,
    ("lora", "vit_l"): 4158,
    ("lora", "vit_h"): 6520,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--backbones",
        nargs="+",
        default=["vit_b", "vit_l", "vit_h"],
        help="SAM vit_b / vit_l / vit_h, sam2_hiera_*, dinov2_vit*14 or timm ViT names",
    )
    ap.add_argument("--methods", nargs="+", default=["adapter", "lora"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 10])
    ap.add_argument(
        "--scheme",
        default="ours",
        help="a scheme spec of benchmarks/steps.py: ours | ours_ckpt | per_modality | ..., with +modifiers "
        "(e.g. ours+bf16+base)",
    )
    ap.add_argument(
        "--extra", nargs="*", default=[], help="more configurations as method:backbone:batch (e.g. adapter:vit_h:10)"
    )
    ap.add_argument("--timeout", type=int, default=0, help="seconds allowed to each configuration (0: no limit)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    unit = "peak CUDA MB" if args.device.startswith("cuda") else "peak RSS MB"
    rows, data = [], {}
    configs = [(m, bb, b) for m in args.methods for bb in args.backbones for b in args.batches]
    configs += [(m, bb, int(b)) for m, bb, b in (e.split(":") for e in args.extra)]
    for method, backbone, batch in configs:
        ns = argparse.Namespace(
            backbone=backbone,
            batch=batch,
            size=args.size,
            steps=1,
            warmup=1,
            device=args.device,
            amp=args.amp,
            threads=0,
            quick=False,
            timeout=args.timeout,
        )
        try:
            r: dict[str, Any] = run_scheme(ns, method, args.scheme)
        except RuntimeError as e:  # one configuration out of memory or time must not lose the others
            print(f"{method} {backbone} batch {batch}: {str(e)[-500:]}", flush=True)
            data[f"{method}_{backbone}_b{batch}"] = {"error": str(e)[-500:]}
            rows.append(f"| MM{'Adapter' if method == 'adapter' else 'LoRA'} {backbone} | {batch} | failed | | | |")
            continue
        paper = PAPER_MB.get((method, backbone))  # Table VI: SAM's ViTs only
        data[f"{method}_{backbone}_b{batch}"] = {**r, "paper_mb": paper}
        ratio = f"{r['peak_mb'] / paper:.2f}" if paper else "-"
        rows.append(
            f"| MM{'Adapter' if method == 'adapter' else 'LoRA'} {backbone} | {batch} | "
            f"{r['peak_mb']:.0f} | {paper or '-'} | {ratio} | {r['median_s']:.2f} |"
        )
        print(rows[-1], flush=True)
    table = "\n".join(
        [
            f"Peak memory of one training step (scheme {args.scheme}, {args.size}x{args.size}, device {args.device}, amp {args.amp}).",
            "",
            f"| configuration | batch | {unit} | paper MB (RTX 3090) | ratio | step s |",
            "|---|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
    name = "memory" + (f"_{args.tag}" if args.tag else "")
    write(name, {"args": {k: str(v) for k, v in vars(args).items()}, "results": data}, table, args.out)


if __name__ == "__main__":
    main()
