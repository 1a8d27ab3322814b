"""The status of every timm model module with attention, measured on its smallest registered model.

For each module of ``timm.models`` (timm's own grouping: one file per architecture) the smallest
registered model (parameters counted on the meta device) is built with random weights
(``pretrained=False``, ``num_classes=0``, ``depth=2`` for models over 30 M parameters that take it); a module has attention when a shape-only forward shows a
module computing it (:mod:`mmpeft.targeting.attention_trace`) or one is named like one. Each such
model is then wrapped by default with LoRA and with the adapter, and checked:

- ``identity``: every modality's output equals the plain model's at init (default preset);
- ``stacked_vs_alone``: after seeded random trainables (preset without mixing), the stacked batch
  equals each modality run alone (relative difference, bound 1e-4);
- ``effect``: with layer scales / zero norm weights set to 1 (near-zero inits), random trainables
  change the output (relative difference above 1e-4).

Writes JSON (``--out``, default ``benchmarks/results/timm_attention_status.json``), one record per
module, and prints a line per module. ``--modules a,b`` limits the run. Slow (a CPU run of every
model): about 20-40 minutes on two cores.

    python benchmarks/timm_attention_status.py --out /tmp/status.json
    python benchmarks/timm_attention_status.py --table /tmp/status.json   # the docs' table
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import warnings
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmpeft import wrap_multimodal
from mmpeft.targeting.attention_trace import traced_attention
from mmpeft.targeting.coverage import attention_modules
from mmpeft.targeting.inputs import choose_size, infer_in_channels
from tests.helpers import randomise_trainables, rel_diff

MODS = ("optical", "sar")
REL = 1e-4


def _params(name: str) -> int:
    import timm

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0)
    return sum(p.numel() for p in model.parameters())


_SIZES = ("test", "atto", "femto", "pico", "nano", "xxtiny", "xxs", "tiny", "xs", "mini", "small", "s0", "b0", "t", "s")


def _candidates(names: list[str], keep: int = 12) -> list[str]:
    """At most ``keep`` names, those with the smallest size words first (counting every model of
    ``vision_transformer``'s hundreds on the meta device takes minutes)."""

    def rank(name: str) -> tuple[int, int]:
        words = name.replace("-", "_").replace(".", "_").split("_")
        return min((i for i, s in enumerate(_SIZES) if s in words), default=len(_SIZES)), len(name)

    return sorted(names, key=rank)[:keep]


def smallest(module: str) -> tuple[str, int] | None:
    """The registered model of ``timm.models.<module>`` with the fewest parameters."""
    import timm

    sizes = []
    for name in _candidates(timm.list_models(module=module)):
        try:
            sizes.append((_params(name), name))
        except Exception:
            continue
    return (sizes and (min(sizes)[1], min(sizes)[0])) or None


def _tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return _tensor(out[-1])
    if isinstance(out, dict):
        return _tensor(next(iter(out.values())))
    raise TypeError(type(out))


def _wake(model: nn.Module) -> None:
    """Near-zero inits set to 1: layer scales, zero-initialised norm weights (residual branches on)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            last = n.rsplit(".", 1)[-1]
            if ("gamma" in last or "scale" in last or last.startswith("ls")) and p.abs().max() < 1e-3:
                p.fill_(1.0)
        for m in model.modules():  # zero-initialised norm weights: BatchNorm (LeViT), LayerNorm (Swin V2 post-norms)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)) and m.weight is not None:
                if not m.weight.any():
                    m.weight.fill_(1.0)


def _check(build: Any, method: str, x: torch.Tensor) -> dict[str, Any]:
    rec: dict[str, Any] = {}
    base = build()
    with torch.no_grad():
        ref = _tensor(base(x))
    wrapped = wrap_multimodal(build(), MODS, method)
    rec["layers"] = sum(1 for _ in wrapped.layers())
    with torch.no_grad():
        out = wrapped({m: x for m in MODS})
    rec["identity"] = max(rel_diff(_tensor(out[m]), ref) for m in MODS)
    split = wrap_multimodal(build(), MODS, preset=method)  # the method's preset without mixing
    randomise_trainables(split)
    xs = {m: x + 0.1 * i for i, m in enumerate(MODS)}
    with torch.no_grad():
        together = split(xs)
        rec["stacked_vs_alone"] = max(rel_diff(_tensor(together[m]), _tensor(split({m: xs[m]})[m])) for m in MODS)
        rec["effect"] = rel_diff(_tensor(together[MODS[0]]), _tensor(base(xs[MODS[0]])))
    rec["ok"] = rec["identity"] <= REL and rec["stacked_vs_alone"] <= REL and rec["effect"] > REL
    return rec


def check_methods(rec: dict[str, Any], build: Any, x: torch.Tensor, limit: int) -> dict[str, Any]:
    """``rec["lora"]`` and ``rec["adapter"]``: :func:`_check` of each method (its exception a refusal),
    each under a ``limit``-second alarm, with its seconds."""
    for method in ("lora", "adapter"):
        start = time.perf_counter()
        signal.alarm(limit)
        try:
            rec[method] = _check(build, method, x)
        except Exception as err:
            rec[method] = {"ok": False, "refused": f"{type(err).__name__}: {str(err)[:300]}"}
        finally:
            signal.alarm(0)
        rec[method]["seconds"] = round(time.perf_counter() - start, 1)
    return rec


def _timeout(*_: Any) -> None:
    raise TimeoutError("over the time limit")


def measure(module: str, limit: int, pick: str | None = None) -> dict[str, Any]:
    import timm

    rec: dict[str, Any] = {"module": module}
    found = (pick, _params(pick)) if pick else smallest(module)
    if found is None:
        return {**rec, "error": "no model builds"}
    name, rec["params"] = found
    rec["model"] = name

    def create() -> nn.Module:
        big = rec["params"] > 30_000_000
        for kw in ({"depth": 2}, {}) if big else ({},):  # reduced depth where the model takes it (large ViTs)
            try:
                return timm.create_model(name, pretrained=False, num_classes=0, **kw)
            except Exception:
                continue
        raise RuntimeError(f"{name} does not build")

    def build() -> nn.Module:
        torch.manual_seed(0)
        model = create().eval()
        _wake(model)
        return model

    model = build()
    channels = infer_in_channels(model) or 3
    size = choose_size(model, channels)
    traced = traced_attention(model, channels, size)
    rec["attention"] = len(attention_modules(model, traced))
    rec["traced"] = len(traced)
    if not rec["attention"]:
        return rec
    x = torch.rand(2, channels, *size, generator=torch.Generator().manual_seed(1))
    return check_methods(rec, build, x, limit)


def _cell(rec: dict[str, Any]) -> str:
    if rec.get("ok"):
        return f"exact ({rec['layers']} layers; identity {rec['identity']:.0e}, alone {rec['stacked_vs_alone']:.0e})"
    if "refused" in rec:
        return "refused: " + rec["refused"].split(": ", 1)[-1][:110].replace("|", "/")
    return f"fails the checks: {json.dumps({k: rec.get(k) for k in ('identity', 'stacked_vs_alone', 'effect')})}"


def table(paths: list[str]) -> None:
    """A markdown table of the modules with attention in the JSON files (a later file's record wins)."""
    records: dict[str, dict[str, Any]] = {}
    for path in paths:
        with open(path) as f:
            records.update({r["module"]: r for r in json.load(f)})
    rows = [r for _, r in sorted(records.items()) if r.get("attention")]
    print("| module | model | LoRA (default) | adapter (default) |\n|---|---|---|---|")
    for r in rows:
        print(f"| `{r['module']}` | `{r['model']}` | {_cell(r['lora'])} | {_cell(r['adapter'])} |")
    for method in ("lora", "adapter"):
        ok = sum(1 for r in rows if r[method].get("ok"))
        print(f"\n{method}: {ok} of {len(rows)} modules with attention ({len(records)} modules measured)")


def main() -> None:
    import timm

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/timm_attention_status.json")
    ap.add_argument("--modules", default="", help="comma-separated timm.models modules (default: all)")
    ap.add_argument("--limit", type=int, default=300, help="seconds per model and method")
    ap.add_argument("--table", nargs="+", help="print the markdown table of these JSON files and stop")
    ap.add_argument("--pick", nargs="*", default=[], help="module=model: measure this model instead of the smallest")
    args = ap.parse_args()
    if args.table:
        table(args.table)
        return
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    signal.signal(signal.SIGALRM, _timeout)
    picks = dict(p.split("=", 1) for p in args.pick)
    modules = args.modules.split(",") if args.modules else sorted(timm.list_modules())
    records = []
    for module in modules:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                rec = measure(module, args.limit, picks.get(module))
            except Exception as err:
                rec = {"module": module, "error": f"{type(err).__name__}: {str(err)[:300]}"}
        records.append(rec)
        brief = {k: rec[k] for k in ("model", "attention") if k in rec}
        for method in ("lora", "adapter"):
            if method in rec:
                brief[method] = "ok" if rec[method]["ok"] else rec[method].get("refused", rec[method])
        print(module, json.dumps(brief)[:400], flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)
    with_attn = [r for r in records if r.get("attention")]
    for method in ("lora", "adapter"):
        ok = sum(1 for r in with_attn if r.get(method, {}).get("ok"))
        print(f"{method}: {ok} of {len(with_attn)} modules with attention wrap and pass the checks")


if __name__ == "__main__":
    main()
