"""Training-step time and peak memory of MFNet, side by side in one run.

Schemes (each measured in its own subprocess so that peak memory is its own):

- ``ours``: the stacked (M*B) pass through timm's SAM encoder, padding-free windows and fused
  attention (``mmpeft.attention``), batched per-modality products, in-place q/v slice updates.
- ``ours_ckpt``: the same with gradient checkpointing of the frozen encoder blocks.
- ``ours_padded``: ``ours`` with the encoder's own blocks (``efficient_attention=False``): the
  windowed blocks project the zero padding too. ``ours`` vs ``ours_padded`` measures
  ``mmpeft.attention``; ``ours_padded`` vs ``per_modality`` measures the stacked pass alone.
- ``per_modality``: the same layers run modality after modality through every layer (the
  authors' execution scheme, built from our code: ``execution="per_modality"``).
- ``per_modality_sam``: as ``per_modality`` on segment-anything's encoder (unfused attention),
  the closest to the authors' code.
- ``floor``: the frozen timm SAM encoder alone, forward + backward on the stacked batch of
  M*B images (input gradients only): the cost under any fine-tuning step.
- ``floor_efficient``: the floor with ``mmpeft.attention`` enabled on the frozen encoder.

    python benchmarks/speed.py                      # CPU: batch 2, vit_b, both methods
    python benchmarks/speed.py --device cuda --batch 10 --amp bf16
    python benchmarks/speed.py --quick              # tiny backbone, smoke test
    python benchmarks/speed.py --inference-only     # tile inference alone (images/s)

Writes benchmarks/results/speed[_<tag>].{json,md} with medians and the ratios a/b, a/c.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, write  # noqa: E402

SCHEMES = ("ours", "ours_ckpt", "ours_padded", "per_modality", "per_modality_sam", "floor", "floor_efficient")
_DEFAULTS = {"tile": "2500x2000", "stride": 128, "infer_batch": 8, "threads": 0}


def _peak_mb(device: str) -> float:
    """Peak CUDA memory, or this process's peak RSS (VmHWM).

    Not ``getrusage().ru_maxrss``: on Linux that value is inherited across fork and exec, so a
    worker started by a big parent would report the parent's peak.
    """
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    raise RuntimeError("VmHWM not found in /proc/self/status")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_step(args: argparse.Namespace, scheme: str, method: str) -> Callable[[], None]:
    """Build one scheme's model and return a function running one training step."""
    import torch

    from mmpeft_isprs.model import build_mfnet

    torch.manual_seed(0)
    dev = torch.device(args.device)
    size = (args.size, args.size)
    kw: dict[str, Any] = dict(backbone=args.backbone, method=method, img_size=args.size)
    if args.quick:
        kw.update(embed_dim=64, depth=4, num_heads=2)
    x = {"optical": torch.rand(args.batch, 3, *size, device=dev), "dsm": torch.rand(args.batch, 1, *size, device=dev)}
    y = torch.randint(0, 6, (args.batch, *size), device=dev)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    if scheme.startswith("floor"):
        from mmpeft.backbones import SAM_SPECS, build_sam_encoder, replace_spec

        spec = SAM_SPECS[args.backbone] if not args.quick else replace_spec(
            SAM_SPECS["vit_tiny"], embed_dim=64, depth=4, num_heads=2, global_attn_indexes=(0, 1, 2, 3))  # fmt: skip
        encoder = build_sam_encoder(spec, impl="timm", img_size=size).to(dev).requires_grad_(False)
        if scheme == "floor_efficient":
            from mmpeft.attention import enable_efficient_attention

            enable_efficient_attention(encoder)
        stacked = torch.cat([x["optical"], x["dsm"].repeat(1, 3, 1, 1)], 0)  # (2B, 3, H, W)

        def floor_step() -> None:
            inp = stacked.clone().requires_grad_(True)
            with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                out = encoder(inp)
            out.float().mean().backward()

        return floor_step
    kw.update(
        impl="segment_anything" if scheme == "per_modality_sam" else "timm",
        execution="per_modality" if scheme.startswith("per_modality") else "batched",
        grad_checkpointing=scheme == "ours_ckpt",
        efficient_attention=scheme in ("ours", "ours_ckpt"),
    )
    model = build_mfnet(**kw).to(dev).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(enabled=args.amp == "fp16")

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            loss = torch.nn.functional.cross_entropy(model(x), y, ignore_index=255)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_interleaved(args: argparse.Namespace, method: str, schemes: list[str]) -> dict[str, dict[str, Any]]:
    """All schemes built in this process; timed steps alternate between them (drift hits all alike)."""
    steps = {s: make_step(args, s, method) for s in schemes}
    for s, f in steps.items():
        for _ in range(args.warmup):
            f()
    times: dict[str, list[float]] = {s: [] for s in schemes}
    for _ in range(args.steps):
        for s, f in steps.items():
            _sync(args.device)
            t = time.perf_counter()
            f()
            _sync(args.device)
            times[s].append(time.perf_counter() - t)
    return {s: {"times": v, "median_s": median(v)} for s, v in times.items()}


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One scheme in a fresh process: peak memory of a training step (and its time)."""
    import torch

    base = _rss_mb()
    step = make_step(args, args.scheme, args.method)
    built = _rss_mb()
    for _ in range(args.warmup):
        step()
    _sync(args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        _sync(args.device)
        times.append(time.perf_counter() - t)
    peak = _peak_mb(args.device)
    return {"times": times, "median_s": median(times), "peak_mb": peak, "rss_after_imports_mb": base,
            "rss_after_build_mb": built, "peak_above_build_mb": peak - (0 if args.device.startswith("cuda") else built)}  # fmt: skip


def inference_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Images (windows) per second of sliding-window inference over one tile."""
    import torch

    from mmpeft_isprs.inference import sliding_window_predict, window_starts
    from mmpeft_isprs.model import build_mfnet

    torch.manual_seed(0)
    dev = torch.device(args.device)
    kw: dict[str, Any] = dict(backbone=args.backbone, method=args.method, img_size=args.size,
                              efficient_attention=args.scheme != "inference_padded")  # fmt: skip
    if args.quick:
        kw.update(embed_dim=64, depth=4, num_heads=2)
    model = build_mfnet(**kw).to(dev).eval()
    h, w = (int(v) for v in args.tile.split("x"))
    tile = {"optical": torch.rand(3, h, w), "dsm": torch.rand(1, h, w)}
    n = len(window_starts(h, args.size, args.stride)) * len(window_starts(w, args.size, args.stride))
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)

    def fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            return model(batch).float()

    with torch.inference_mode():
        t = time.perf_counter()
        sliding_window_predict(fn, tile, 6, window=args.size, stride=args.stride, batch_size=args.infer_batch, device=dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        sec = time.perf_counter() - t
    return {"tile": args.tile, "stride": args.stride, "windows": n, "seconds": sec, "images_per_s": n / sec,
            "peak_mb": _peak_mb(args.device)}  # fmt: skip


def run_scheme(args: argparse.Namespace, method: str, scheme: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", "--scheme", scheme, "--method", method]
    for k in ("backbone", "batch", "size", "steps", "warmup", "device", "amp", "threads", "tile", "stride", "infer_batch"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k, None) or _DEFAULTS[k])]
    if args.quick:
        cmd.append("--quick")
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if res.returncode != 0:
        raise RuntimeError(f"{method}/{scheme} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def table(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    cuda = args.device.startswith("cuda")
    unit = "peak CUDA MB" if cuda else "peak RSS MB"
    lines = [
        f"Training step, MFNet {args.backbone if not args.quick else 'tiny (--quick)'}, batch {args.batch}, {args.size}x{args.size}, device {args.device}, "
        f"amp {args.amp}: median of {args.steps} steps per scheme, schemes interleaved in one process after "
        f"{args.warmup} warm-up step(s); memory from one step of each scheme alone in a fresh process.",
        "",
        f"| method | scheme | median s/step | vs per_modality (a/b) | vs floor (a/c) | {unit} | above build MB | memory vs per_modality |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method, res in results.items():
        b, c = res.get("per_modality"), res.get("floor")
        for scheme, r in res.items():
            rb = f"{r['median_s'] / b['median_s']:.3f}" if b else "-"
            rc = f"{r['median_s'] / c['median_s']:.3f}" if c else "-"
            mb = f"{r['peak_mb'] / b['peak_mb']:.3f}" if b else "-"
            above = f"{r['peak_above_build_mb']:.0f}" if not cuda else "-"
            lines.append(f"| {method} | {scheme} | {r['median_s']:.3f} | {rb} | {rc} | {r['peak_mb']:.0f} | {above} | {mb} |")
    if not cuda:
        lines += ["", "Peak RSS counts everything the process maps (the CUDA build of torch alone is ~0.5 GB after "
                  "import) and the model weights; 'above build' is the peak minus the RSS right after the model was "
                  "built: what the training step itself adds (activations, gradients, optimizer state)."]  # fmt: skip
    return "\n".join(lines)


def inference_table(inference: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    if not inference:
        return ""
    lines = ["", "", f"Tile inference, {args.tile} tile, window {args.size}, stride {args.stride}, batch {args.infer_batch} "
             "('inference': mmpeft.attention on, the default; 'inference_padded': the encoder's own blocks):",
             "", "| method | variant | windows | seconds | images/s |", "|---|---|---:|---:|---:|"]  # fmt: skip
    lines += [f"| {m} | {v} | {r['windows']} | {r['seconds']:.1f} | {r['images_per_s']:.2f} |"
              for m, rs in inference.items() for v, r in rs.items()]  # fmt: skip
    return "\n".join(lines)


def _ratio(res: dict[str, dict[str, Any]], a: str, b: str, key: str = "median_s") -> float | None:
    """res[a][key] / res[b][key], or None when either scheme was not run."""
    return res[a][key] / res[b][key] if a in res and b in res else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="vit_b")
    ap.add_argument("--methods", nargs="+", default=["adapter", "lora"])
    ap.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--inference", action="store_true", help="also measure tile inference (images/s)")
    ap.add_argument("--inference-only", dest="inference_only", action="store_true",
                    help="measure tile inference only (no training-step schemes)")
    ap.add_argument("--tile", default="2500x2000", help="tile size HxW for --inference")
    ap.add_argument("--stride", type=int, default=128, help="sliding-window stride for --inference")
    ap.add_argument("--infer-batch", dest="infer_batch", type=int, default=8, help="windows per model call")
    ap.add_argument("--tag", default="", help="suffix of the result files")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="tiny backbone: a smoke test")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--scheme", default="ours", help=argparse.SUPPRESS)
    ap.add_argument("--method", default="adapter", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(inference_worker(args) if args.scheme.startswith("inference") else worker(args)))
        return
    results: dict[str, dict[str, Any]] = {}
    for method in [] if args.inference_only else args.methods:
        results[method] = timed_interleaved(args, method, args.schemes)
        for scheme in args.schemes:  # memory: each scheme alone in a fresh process
            mem_args = argparse.Namespace(**{**vars(args), "steps": 1, "warmup": 1})
            mem = run_scheme(mem_args, method, scheme)
            results[method][scheme].update({k: v for k, v in mem.items() if k not in ("times", "median_s")})
            r = results[method][scheme]
            print(f"{method:8s} {scheme:17s} {r['median_s']:.3f} s  {r['peak_mb']:.0f} MB", flush=True)
    inference: dict[str, dict[str, Any]] = {}
    if args.inference or args.inference_only:
        for method in args.methods:
            for variant in ("inference", "inference_padded"):  # mmpeft.attention on / off
                r = inference.setdefault(method, {})[variant] = run_scheme(args, method, variant)
                print(f"{method:8s} {variant} {r['images_per_s']:.2f} images/s", flush=True)
    ratios = {
        m: {
            "a_over_b": _ratio(r, "ours", "per_modality"),
            "a_over_c": _ratio(r, "ours", "floor"),
            "ckpt_mem_over_b": _ratio(r, "ours_ckpt", "per_modality", "peak_mb"),
            "ckpt_mem_above_build_over_b": _ratio(r, "ours_ckpt", "per_modality", "peak_above_build_mb"),
            "ckpt_time_over_b": _ratio(r, "ours_ckpt", "per_modality"),
            "padded_over_b": _ratio(r, "ours_padded", "per_modality"),
            "a_over_floor_efficient": _ratio(r, "ours", "floor_efficient"),
        }
        for m, r in results.items()
    }
    name = "speed" + (f"_{args.tag}" if args.tag else "")
    write(name, {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "results": results, "ratios": ratios, "inference": inference},
          (table(results, args) if results else "") + inference_table(inference, args), args.out)


if __name__ == "__main__":
    main()
