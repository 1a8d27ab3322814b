"""Sanity checks on the benchmark device before timing anything (the first phase of gpu_suite.py).

On a small SAM encoder wrapped with MMAdapter and MMLoRA (random, perturbed trainables), built
on the device: the efficient attention paths (``queries`` "real" / "all", ``rel_pos`` "mask" /
"channels") against the stock
blocks in fp32; the bf16 frozen base against fp32 autocast; compiled (regional and whole) against
eager. Writes ``sanity.json`` / ``sanity.md`` (max abs differences relative to the output scale).
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write
from steps import compile_options


def _rel(a: Any, b: Any) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def _model(preset: str, dev: Any, **kw: Any) -> Any:
    import torch
    from timm.models.vision_transformer_sam import VisionTransformerSAM

    from mmpeft import wrap_multimodal

    torch.manual_seed(0)
    with dev:
        enc = VisionTransformerSAM(
            img_size=128,
            patch_size=16,
            embed_dim=128,
            depth=4,
            num_heads=4,
            window_size=3,
            global_attn_indexes=(1, 3),
            use_rel_pos=True,
            neck_chans=32,
            num_classes=0,
            global_pool="",
        ).eval()
        with torch.no_grad():
            for n, p in enc.named_parameters():
                if "pos" in n:
                    p.normal_(0, 0.1)
        model = wrap_multimodal(enc, ("optical", "dsm"), preset=preset, **kw)
        g = torch.Generator(device=dev).manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g, device=dev) * 0.1)
    return model


def checks(dev: Any) -> dict[str, float]:
    import torch

    x = {"optical": torch.rand(4, 3, 128, 128, device=dev), "dsm": torch.rand(4, 1, 128, 128, device=dev)}
    res: dict[str, float] = {}
    for preset in ("mmadapter", "mmlora"):
        stock = _model(preset, dev, efficient_attention=False)
        with torch.no_grad():
            ref = stock(x)["optical"]
            for q in ("real", "all"):
                for rel_pos in ("mask", "channels"):
                    model = _model(preset, dev, efficient_attention=False)
                    model.enable_efficient_attention(q, rel_pos)
                    res[f"{preset}: queries={q}, rel_pos={rel_pos} vs stock blocks, fp32"] = _rel(
                        model(x)["optical"], ref
                    )
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                amp = stock(x)["optical"]
            base = _model(preset, dev, base_dtype="bf16")
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                res[f"{preset}: bf16 base vs fp32 weights, both under bf16 autocast"] = _rel(base(x)["optical"], amp)
            res[f"{preset}: bf16 autocast vs fp32"] = _rel(amp, ref)
        if preset != "mmadapter":
            continue  # compilation checked on one preset (time)
        compiled: list[tuple[str, Callable[[Any], Any]]] = []
        blocks = _model(preset, dev)
        blocks.compile_blocks(**compile_options())
        compiled.append(("compile_blocks", blocks))
        compiled.append(("torch.compile(model)", torch.compile(_model(preset, dev), **compile_options())))
        eager = _model(preset, dev)
        with torch.no_grad():
            ref = eager(x)["optical"]
            for name, m in compiled:
                res[f"{preset}: {name} vs eager, fp32"] = _rel(m(x)["optical"], ref)
    return res


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else platform.processor(),
    }
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 comparisons in fp32
    torch.backends.cudnn.allow_tf32 = False
    res = checks(dev)
    lines = [
        f"Sanity on {info['device']} (torch {info['torch']}): max |a - b| / max |b| of the optical output.",
        "",
        "| check | relative difference |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v:.2e} |" for k, v in res.items()]
    write("sanity", {"info": info, "results": res}, "\n".join(lines), args.out)


if __name__ == "__main__":
    main()
