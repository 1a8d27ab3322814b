"""Training-step time and peak memory of MFNet, side by side in one run.

Schemes (each measured in its own subprocess so that peak memory is its own):

- ``ours``: the stacked (M*B) pass through timm's SAM encoder, padding-free windows and fused
  attention (``mmpeft.runtime.attention``), batched per-modality products, in-place q/v slice updates.
- ``ours_ckpt``: the same with gradient checkpointing of the frozen encoder blocks.
- ``ours_padded``: ``ours`` with the encoder's own blocks (``efficient_attention=False``): the
  windowed blocks project the zero padding too. ``ours`` vs ``ours_padded`` measures
  ``mmpeft.runtime.attention``; ``ours_padded`` vs ``per_modality`` measures the stacked pass alone.
- ``per_modality``: the same layers run modality after modality through every layer (the
  authors' execution scheme, built from our code: ``execution="per_modality"``).
- ``per_modality_sam``: as ``per_modality`` on segment-anything's encoder (unfused attention),
  the closest to the authors' code.
- ``floor``: the frozen timm SAM encoder alone, forward + backward on the stacked batch of
  M*B images (input gradients only): the cost under any fine-tuning step.
- ``floor_efficient``: the floor with ``mmpeft.runtime.attention`` enabled on the frozen encoder.

    python benchmarks/speed.py                      # CPU: batch 2, vit_b, both methods
    python benchmarks/speed.py --device cuda --batch 10 --amp bf16
    python benchmarks/speed.py --quick              # tiny backbone, smoke test
    python benchmarks/speed.py --backbones vit_b sam2_hiera_tiny dinov2_vits14 --schemes ours --methods lora
                                                    # several encoders in one run, steps interleaved
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, write
from steps import COMPILE, NAMES, Spec, build_model, count_ops, make_step

SCHEMES = NAMES
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


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def labelled(args: argparse.Namespace, schemes: list[str]) -> list[tuple[str, str, str]]:
    """(label, backbone, scheme) of every run: the scheme itself with one backbone, else
    ``<backbone>/<scheme>``."""
    backbones = args.backbones or [args.backbone]
    return [(s if len(backbones) == 1 else f"{bb}/{s}", bb, s) for bb in backbones for s in schemes]


def timed_interleaved(args: argparse.Namespace, method: str, schemes: list[str]) -> dict[str, dict[str, Any]]:
    """All schemes (of every backbone of ``--backbones``) built in this process; timed steps
    alternate between them (drift hits all alike)."""
    steps: dict[str, Callable[[], None]] = {}
    first: dict[str, float] = {}
    failed: dict[str, str] = {}
    for s, backbone, scheme in labelled(args, schemes):
        try:
            f = make_step(argparse.Namespace(**{**vars(args), "backbone": backbone}), scheme, method)
            for _ in range(args.warmup):
                _sync(args.device)
                t = time.perf_counter()
                f()
                _sync(args.device)
                first.setdefault(s, time.perf_counter() - t)  # the first step: compilation included
            steps[s] = f
            print(f"{method:8s} {s:34s} ready, first step {first.get(s, 0):.1f} s", flush=True)
        except Exception as e:
            if not args.keep_going:
                raise
            failed[s] = f"{type(e).__name__}: {str(e)[:400]}"
            print(f"{method:8s} {s:34s} FAILED {failed[s]}", flush=True)
    frames = _compiled_frames()
    times: dict[str, list[float]] = {s: [] for s in steps}  # the schemes that built and ran
    for _ in range(args.steps):
        for s, f in steps.items():
            _sync(args.device)
            t = time.perf_counter()
            f()
            _sync(args.device)
            times[s].append(time.perf_counter() - t)
    recompiled = _compiled_frames() - frames  # frames compiled during the timed steps: should be 0
    out: dict[str, dict[str, Any]] = {}
    for s, v in times.items():
        out[s] = {"times": v, "median_s": median(v), "first_step_s": first.get(s), "recompiled_frames": recompiled}
        if args.count_ops:
            out[s]["ops"] = count_ops(steps[s], args.device)
    for s, err in failed.items():
        out[s] = {"error": err}
    return out


def _compiled_frames() -> int:
    """How many frames torch.compile has compiled in this process so far."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover
        return 0
    return int(counters["frames"]["ok"])


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
    return {
        "times": times,
        "median_s": median(times),
        "peak_mb": peak,
        "rss_after_imports_mb": base,
        "rss_after_build_mb": built,
        "peak_above_build_mb": peak - (0 if args.device.startswith("cuda") else built),
    }


def inference_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Windows per second of sliding-window inference over one tile.

    The scheme is ``inference`` (``mmpeft.runtime.attention``) or ``inference_padded`` (the encoder's own
    blocks) with the modifiers of :class:`steps.Spec` (``bf16``, ``base``, ``compile=...``,
    ``queries=...``). On CUDA the tile lives on the device and the scores accumulate there.
    """
    import torch

    from mmpeft_isprs.inference import sliding_window_predict, window_starts

    name, _, mods = args.scheme.partition("+")
    spec = Spec.parse("ours" + ("+" + mods if mods else ""))
    torch.manual_seed(0)
    dev = torch.device(args.device)
    model, run = build_model(
        args, spec, args.method, efficient_attention=spec.queries if name != "inference_padded" else False
    )
    model.eval()
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec.amp_of(args))
    h, w = (int(v) for v in args.tile.split("x"))
    on = dev if dev.type == "cuda" else torch.device("cpu")
    tile = {"optical": torch.rand(3, h, w, device=on), "dsm": torch.rand(1, h, w, device=on)}
    n = len(window_starts(h, args.size, args.stride)) * len(window_starts(w, args.size, args.stride))

    def fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            return run(batch).float()

    with torch.inference_mode():  # warm-up (compilation) on one batch of the real shape
        warm = {
            k: v[:, : args.size, : args.size].expand(args.infer_batch, -1, -1, -1).contiguous() for k, v in tile.items()
        }
        t = time.perf_counter()
        fn(warm)
        fn(warm)
        _sync(args.device)
        first = time.perf_counter() - t
        t = time.perf_counter()
        sliding_window_predict(
            fn, tile, 6, window=args.size, stride=args.stride, batch_size=args.infer_batch, device=dev, out_device=on
        )
        _sync(args.device)
        sec = time.perf_counter() - t
    return {
        "tile": args.tile,
        "stride": args.stride,
        "windows": n,
        "seconds": sec,
        "images_per_s": n / sec,
        "warmup_s": first,
        "peak_mb": _peak_mb(args.device),
    }


def run_scheme(args: argparse.Namespace, method: str, scheme: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", "--scheme", scheme, "--method", method]
    for k in (
        "backbone",
        "batch",
        "size",
        "steps",
        "warmup",
        "device",
        "amp",
        "threads",
        "tile",
        "stride",
        "infer_batch",
    ):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k, None) or _DEFAULTS[k])]
    if args.quick:
        cmd.append("--quick")
    if getattr(args, "timeout", 0):
        cmd = ["timeout", "-k", "10", str(args.timeout)] + cmd
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if res.returncode in (124, 137) and getattr(args, "timeout", 0):
        raise RuntimeError(f"{method}/{scheme} timed out after {args.timeout} s (--timeout)")
    if res.returncode != 0:
        raise RuntimeError(f"{method}/{scheme} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def _baseline(res: dict[str, dict[str, Any]], name: str, backbone: str = "") -> dict[str, Any] | None:
    """The scheme ``name`` exactly, else the first spec of that name (with modifiers); with
    ``backbone`` (runs labelled ``<backbone>/<scheme>``) among that backbone's runs."""
    ok = (
        {s.partition("/")[2]: r for s, r in res.items() if "error" not in r and s.startswith(backbone + "/")}
        if backbone
        else {s: r for s, r in res.items() if "error" not in r}
    )
    if name in ok:
        return ok[name]
    return next((r for s, r in ok.items() if s.split("+")[0] == name), None)


def table(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    cuda = args.device.startswith("cuda")
    unit = "peak CUDA MB" if cuda else "peak RSS MB"
    encoders = " / ".join(args.backbones or [args.backbone])
    lines = [
        f"Training step, MFNet {encoders}{' (tiny: --quick)' if args.quick else ''}, batch {args.batch}, {args.size}x{args.size}, device {args.device}, "
        f"amp {args.amp} (unless the scheme says): median of {args.steps} steps per scheme, schemes interleaved in one process after "
        f"{args.warmup} warm-up step(s) (the first includes compilation); memory from one step of each scheme alone in a fresh process.",
        "",
        f"| method | scheme | median s/step | vs per_modality (a/b) | vs floor (a/c) | first step s | aten ops | CUDA kernels | {unit} | above build MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, res in results.items():
        for scheme, r in res.items():
            bb = scheme.partition("/")[0] if "/" in scheme else ""
            b, c = _baseline(res, "per_modality", bb), _baseline(res, "floor", bb)
            if "error" in r:
                lines.append(f"| {method} | {scheme} | failed: {r['error'][:120]} |")
                continue
            rb = _fmt(r["median_s"] / b["median_s"]) if b else "-"
            rc = _fmt(r["median_s"] / c["median_s"]) if c else "-"
            ops = r.get("ops") or {}
            above = _fmt(r.get("peak_above_build_mb"), ".0f") if not cuda else "-"
            lines.append(
                f"| {method} | {scheme} | {r['median_s']:.4f} | {rb} | {rc} | {_fmt(r.get('first_step_s'), '.1f')} | "
                f"{ops.get('aten_top', '-')} | {ops.get('cuda_kernels', '-') if cuda else '-'} | "
                f"{_fmt(r.get('peak_mb'), '.0f')} | {above} |"
            )
    recompiled = {m: max([r.get("recompiled_frames") or 0 for r in res.values()] + [0]) for m, res in results.items()}
    lines += ["", f"Frames compiled during the timed steps (recompilations; should be 0): {recompiled}."]
    if not cuda:
        lines += [
            "",
            "Peak RSS counts everything the process maps (the CUDA build of torch alone is ~0.5 GB after "
            "import) and the model weights; 'above build' is the peak minus the RSS right after the model was "
            "built: what the training step itself adds (activations, gradients, optimizer state).",
        ]
    return "\n".join(lines)


def inference_table(inference: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    if not inference:
        return ""
    lines = [
        "",
        "",
        f"Tile inference, {args.tile} tile, window {args.size}, stride {args.stride}, batch {args.infer_batch} "
        "('inference': mmpeft.runtime.attention on, the default; 'inference_padded': the encoder's own blocks):",
        "",
        "| method | variant | windows | seconds | images/s |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [
        f"| {m} | {v} | {r['windows']} | {r['seconds']:.1f} | {r['images_per_s']:.2f} |"
        for m, rs in inference.items()
        for v, r in rs.items()
    ]
    return "\n".join(lines)


def _ratio(res: dict[str, dict[str, Any]], a: str, b: str, key: str = "median_s") -> float | None:
    """res[a][key] / res[b][key], or None when either scheme was not run."""
    if a in res and b in res and key in res[a] and key in res[b]:
        return res[a][key] / res[b][key]
    return None


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--backbone",
        default="vit_b",
        help="the encoder: SAM vit_b / vit_l / vit_h, sam2_hiera_*, dinov2_vit*14 or a timm ViT name",
    )
    ap.add_argument(
        "--backbones",
        nargs="+",
        default=None,
        help="several encoders in one run (steps interleaved; results labelled <backbone>/<scheme>)",
    )
    ap.add_argument("--methods", nargs="+", default=["adapter", "lora"])
    ap.add_argument(
        "--schemes",
        nargs="+",
        default=list(SCHEMES),
        help=f"scheme specs: a name of {SCHEMES} with +modifiers, e.g. ours+bf16+base+compile=model "
        f"(modifiers: bf16, fp16, fp32, base, foreach, compile={{{','.join(COMPILE)}}}, queries={{real,all,auto}}; "
        "see benchmarks/steps.py)",
    )
    ap.add_argument(
        "--keep-going",
        dest="keep_going",
        action="store_true",
        help="record a scheme that fails to build or run and go on with the others",
    )
    ap.add_argument("--timeout", type=int, default=0, help="seconds allowed to each worker process (0: no limit)")
    ap.add_argument(
        "--count-ops",
        dest="count_ops",
        action="store_true",
        help="profile one step per scheme: aten operator calls (and CUDA kernels)",
    )
    ap.add_argument("--no-memory", dest="memory", action="store_false", help="skip the per-scheme memory subprocesses")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--inference", action="store_true", help="also measure tile inference (images/s)")
    ap.add_argument(
        "--inference-only",
        dest="inference_only",
        action="store_true",
        help="measure tile inference only (no training-step schemes)",
    )
    ap.add_argument(
        "--inference-variants",
        dest="inference_variants",
        nargs="+",
        default=["inference", "inference_padded"],
        help="inference or inference_padded, with scheme modifiers (e.g. inference+bf16+base+compile=blocks)",
    )
    ap.add_argument("--tile", default="2500x2000", help="tile size HxW for --inference")
    ap.add_argument("--stride", type=int, default=128, help="sliding-window stride for --inference")
    ap.add_argument("--infer-batch", dest="infer_batch", type=int, default=8, help="windows per model call")
    ap.add_argument("--tag", default="", help="suffix of the result files")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="tiny backbone: a smoke test")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--scheme", default="ours", help=argparse.SUPPRESS)
    ap.add_argument("--method", default="adapter", help=argparse.SUPPRESS)
    return ap


def _train_results(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """{method: {scheme: record}}: the training-step schemes timed interleaved, then each scheme's
    memory in a fresh process (unless --no-memory)."""
    results: dict[str, dict[str, Any]] = {}
    for method in [] if args.inference_only else args.methods:
        results[method] = timed_interleaved(args, method, args.schemes)
        for label, backbone, scheme in labelled(args, args.schemes) if args.memory else []:  # each alone, fresh process
            if "error" in results[method][label]:
                continue
            mem_args = argparse.Namespace(**{**vars(args), "steps": 1, "warmup": 1, "backbone": backbone})
            mem = run_scheme(mem_args, method, scheme)
            results[method][label].update({k: v for k, v in mem.items() if k not in ("times", "median_s")})
            r = results[method][label]
            print(f"{method:8s} {label:17s} {r['median_s']:.3f} s  {r['peak_mb']:.0f} MB", flush=True)
        if not args.memory:
            for scheme, r in results[method].items():
                if "error" in r:
                    continue
                print(
                    f"{method:8s} {scheme:30s} {r['median_s']:.4f} s  first {r['first_step_s']:.1f} s  ops {r.get('ops')}",
                    flush=True,
                )
    return results


def _inference_results(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """{method: {variant: record}} of tile inference (empty without --inference / --inference-only)."""
    inference: dict[str, dict[str, Any]] = {}
    if args.inference or args.inference_only:
        for method in args.methods:
            for variant in args.inference_variants:  # default: mmpeft.runtime.attention on / off
                r = inference.setdefault(method, {})[variant] = run_scheme(args, method, variant)
                print(f"{method:8s} {variant} {r['images_per_s']:.2f} images/s", flush=True)
    return inference


def _ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per method, the time and memory ratios between schemes (None where a scheme was not run)."""
    return {
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


def main() -> None:
    args = _parser().parse_args()
    for spec in args.schemes:
        Spec.parse(spec)  # unknown names or modifiers fail before any work
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(inference_worker(args) if args.scheme.startswith("inference") else worker(args)))
        return
    results = _train_results(args)
    inference = _inference_results(args)
    name = "speed" + (f"_{args.tag}" if args.tag else "")
    write(
        name,
        {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "results": results,
            "ratios": _ratios(results),
            "inference": inference,
        },
        (table(results, args) if results else "") + inference_table(inference, args),
        args.out,
    )


if __name__ == "__main__":
    main()
