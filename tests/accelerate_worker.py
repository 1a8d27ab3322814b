"""A few SGD steps of a wrapped Hugging Face ViT through ``accelerate`` (tests/test_accelerate.py).

Run in the test process (one process), or launched as several CPU processes (gloo)::

    python -m torch.distributed.run --nproc_per_node 2 tests/accelerate_worker.py OUT.safetensors

Every process takes ``4 / num_processes`` samples of each global batch of 4 (accelerate's
prepared loader hands process r the batches r, r + n, ...), so every run sees the same global
batches; the main process writes the trained tensors and a JSON report next to ``OUT``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # launched as a script
    sys.path.insert(0, str(ROOT))

MODS = ("optical", "dsm")
GLOBAL_BATCH = 4


def build() -> Any:
    """The seeded two-modality wrap of a tiny ``ViTForImageClassification`` (trainables randomised)."""
    from mmpeft import wrap_multimodal
    from tests.helpers import randomise_trainables
    from tests.hf_zoo import vit_classifier

    return randomise_trainables(wrap_multimodal(vit_classifier(), MODS, preset="mmlora", stems={"dsm": ("repeat", 1)}))


def samples(n: int) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(1)
    return [
        {
            "pixel_values": {"optical": torch.rand(3, 32, 32, generator=g), "dsm": torch.rand(1, 32, 32, generator=g)},
            "labels": torch.randint(0, 4, (), generator=g),
        }
        for _ in range(n)
    ]


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    x = {m: torch.stack([s["pixel_values"][m] for s in batch]) for m in MODS}
    return {"pixel_values": x, "labels": torch.stack([s["labels"] for s in batch])}


def run(steps: int = 3, precision: str = "no") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(trained trainables, report) after ``steps`` SGD steps through ``Accelerator().prepare``."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, mixed_precision=precision)
    model = build()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    per_process = GLOBAL_BATCH // accelerator.num_processes
    loader = torch.utils.data.DataLoader(samples(GLOBAL_BATCH * steps), batch_size=per_process, collate_fn=collate)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    wrapped = accelerator.unwrap_model(model)
    seen: set[str] = set()
    hook = wrapped.base_model.classifier.register_forward_hook(lambda m, i, o: seen.add(str(o.dtype)))
    losses = []
    for batch in loader:
        out = model(**batch)
        accelerator.backward(out["loss"])
        grads = {str(p.grad.dtype) for p in wrapped.parameters() if p.requires_grad and p.grad is not None}
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(out["loss"].detach()))
    hook.remove()
    trainables = {k: v.detach().clone() for k, v in wrapped.trainable_state_dict().items()}
    report = {
        "num_processes": accelerator.num_processes,
        "steps": len(losses),
        "losses": losses,
        "trainable_dtypes": sorted({str(p.dtype) for p in wrapped.parameters() if p.requires_grad}),
        "grad_dtypes": sorted(grads),
        "head_output_dtypes": sorted(seen),
        "frozen_unchanged": all(torch.equal(p, frozen[n]) for n, p in wrapped.named_parameters() if n in frozen),
    }
    return trainables, report


def main(argv: list[str]) -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    trainables, report = run()
    import accelerate

    if accelerate.PartialState().is_main_process:
        save_file({k: v.contiguous() for k, v in trainables.items()}, argv[0])
        Path(argv[0]).with_suffix(".json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
