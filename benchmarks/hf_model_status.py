"""The status of 22 Hugging Face vision backbones, measured on tiny random configs (transformers 5).

Each model of ``tests/hf_zoo.py`` (``MODELS``: the 22 counted; ``EXTRAS``: measured beside them, a
CNN that must be refused among them) is built from a small config (random weights), its attention
found (by name or by what it computes, :mod:`mmpeft.targeting.attention_trace`), then wrapped by
default (no hints) with ``wrap_multimodal(model, ["optical", "sar"], method)`` for LoRA and the
adapter, with the checks of ``benchmarks/timm_attention_status.py``: identity at init, the stacked
batch equal to each modality alone after seeded random trainables (relative, bound 1e-4), an
effect of the trainables (above 1e-4) once near-zero inits are set to 1.

Writes JSON (``--out``, default ``benchmarks/results/hf_model_status.json``) and prints a markdown
table; ``--pick a,b`` measures a subset. About a minute on two CPU cores.

    python benchmarks/hf_model_status.py
    python benchmarks/hf_model_status.py --pick mobilevitv2,maskformer_swin
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import warnings
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.timm_attention_status import _cell, _timeout, _wake, check_methods  # the same checks as timm's
from mmpeft.targeting.attention_trace import traced_attention
from mmpeft.targeting.coverage import attention_modules
from tests.hf_zoo import EXTRAS, MODELS, build, input_size


def measure(name: str, limit: int) -> dict[str, Any]:
    rec: dict[str, Any] = {"model": name, "class": {**MODELS, **EXTRAS}[name][0], "counted": name in MODELS}

    def make() -> torch.nn.Module:
        model = build(name)
        _wake(model)
        return model

    model = make()
    rec["params"] = sum(p.numel() for p in model.parameters())
    size = input_size(name)
    traced = traced_attention(model, 3, (size, size))
    rec["attention"] = len(attention_modules(model, traced))
    rec["traced"] = len(traced)
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    return check_methods(rec, make, x, limit)


def table(records: list[dict[str, Any]]) -> str:
    import transformers

    lines = ["| model | class | attention modules | LoRA (default) | adapter (default) |", "|---|---|---|---|---|"]
    for r in records:
        cells = [_cell(r[m]) if m in r else r.get("error", "") for m in ("lora", "adapter")]
        extra = "" if r["counted"] else " (extra)"
        lines.append(
            f"| `{r['model']}`{extra} | `{r['class']}` | {r.get('attention', '-')} | {cells[0]} | {cells[1]} |"
        )
    counted = [r for r in records if r["counted"]]
    lines.append("")
    for method in ("lora", "adapter"):
        ok = sum(1 for r in counted if r.get(method, {}).get("ok"))
        lines.append(f"{method}: {ok} of {len(counted)} Hugging Face models (transformers {transformers.__version__})")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/hf_model_status.json")
    ap.add_argument("--pick", default="", help="comma-separated names of tests/hf_zoo.py (default: all)")
    ap.add_argument("--limit", type=int, default=120, help="seconds per model and method")
    args = ap.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    signal.signal(signal.SIGALRM, _timeout)
    names = args.pick.split(",") if args.pick else [*MODELS, *EXTRAS]
    records = []
    for name in names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                rec = measure(name, args.limit)
            except Exception as err:
                rec = {"model": name, "class": "", "counted": name in MODELS, "error": f"{type(err).__name__}: {err}"}
        records.append(rec)
        print(name, json.dumps({k: rec[k].get("ok", rec[k]) if k in rec else None for k in ("lora", "adapter")}))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(records, f, indent=1)
    print(table(records))


if __name__ == "__main__":
    main()
