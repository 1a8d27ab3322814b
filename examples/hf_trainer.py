"""Train a two-modality wrap of a Hugging Face ``ViTForImageClassification`` with the Trainer:
optical (3 channels) and DSM (1 channel) images of four synthetic classes.

The wrapped model goes to the Trainer as it is: its forward names ``pixel_values`` and
``labels`` (the Trainer keeps those columns and finds the label names), with ``labels=`` its
output carries ``"loss"`` (the mean of the two modalities' losses) and ``num_items_in_batch``
makes gradient accumulation exact. ``MultimodalTrainer`` (the stock Trainer saving mmpeft's adapter
files) writes checkpoints that ``load_multimodal`` reads and ``resume_from_checkpoint`` continues::

    python examples/hf_trainer.py            # a 4-block ViT at 64 px, 60 steps
    python examples/hf_trainer.py --tiny     # seconds: 2 blocks at 32 px, 16 steps (or MMPEFT_EXAMPLES_TINY=1)

What it checks and prints: ``evaluate()`` gives ``eval_loss``, lower after training on the
training samples; a checkpoint holds
the trainables and config only and reproduces the trained model exactly on a fresh base; a run
resumed from its middle checkpoint ends where the uninterrupted run ends; the frozen weights
are bit-identical after training.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import transformers

from mmpeft import load_multimodal, wrap_multimodal
from mmpeft.interop.trainer import MultimodalTrainer

MODALITIES = ("optical", "dsm")


def base_model(args: argparse.Namespace) -> torch.nn.Module:
    """A seeded ViT classifier (4 classes) built from a config: no download."""
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(
        hidden_size=args.width,
        num_hidden_layers=args.depth,
        num_attention_heads=4,
        intermediate_size=2 * args.width,
        image_size=args.img_size,
        patch_size=16,
        num_labels=4,
    )
    return transformers.ViTForImageClassification(cfg)


def samples(n: int, size: int, seed: int) -> list[dict[str, Any]]:
    """Class c: the optical image brighter in quadrant c, the DSM higher there (a learnable rule)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        c = int(torch.randint(0, 4, (), generator=g))
        optical, dsm = torch.rand(3, size, size, generator=g) * 0.5, torch.rand(1, size, size, generator=g) * 0.5
        h = size // 2
        rows, cols = slice((c // 2) * h, (c // 2 + 1) * h), slice((c % 2) * h, (c % 2 + 1) * h)
        optical[:, rows, cols] += 0.5
        dsm[:, rows, cols] += 0.5
        out.append({"pixel_values": {"optical": optical, "dsm": dsm}, "labels": torch.tensor(c)})
    return out


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """{"pixel_values": {modality: (B, c, H, W)}, "labels": (B,)}: the default collator stacks no dicts."""
    x = {m: torch.stack([s["pixel_values"][m] for s in batch]) for m in MODALITIES}
    return {"pixel_values": x, "labels": torch.stack([s["labels"] for s in batch])}


def trainer(args: argparse.Namespace, out: Path, data: tuple[list, list]) -> MultimodalTrainer:
    model = wrap_multimodal(
        base_model(args), MODALITIES, preset="mmlora", stems={"dsm": ("repeat", 1)}, modules_to_save=["classifier"]
    )
    targs = transformers.TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=2e-2,
        max_steps=args.steps,
        save_strategy="steps",
        save_steps=args.steps // 2,
        logging_steps=args.steps // 2,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    return MultimodalTrainer(model, targs, train_dataset=data[0], eval_dataset=data[1], data_collator=collate)


def check_checkpoint(args: argparse.Namespace, t: MultimodalTrainer, folder: Path, batch: dict[str, Any]) -> None:
    files = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".json") and "state" not in p.name)
    assert files == ["adapter_model.safetensors", "mmpeft_config.json"], files
    size = (folder / "adapter_model.safetensors").stat().st_size / 1024
    print(f"  {folder.name} holds {files} ({size:.0f} KiB), no model.safetensors")
    loaded = load_multimodal(base_model(args), folder)
    t.model.eval()
    with torch.no_grad():
        want, got = t.model(**batch), loaded(**batch)
    diff = max((got[m].logits - want[m].logits).abs().max().item() for m in MODALITIES)
    assert diff == 0.0, diff
    print(f"  load_multimodal({folder.name}) on a fresh base reproduces the trained model: max diff {diff:.1e}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--tiny",
        action="store_true",
        default=bool(os.environ.get("MMPEFT_EXAMPLES_TINY")),
        help="2 blocks at 32 px, 16 steps: seconds (also MMPEFT_EXAMPLES_TINY=1)",
    )
    p.add_argument("--out", default=None, help="the Trainer's output_dir (default: a temporary directory)")
    args = p.parse_args(argv)
    args.depth, args.width, args.img_size, args.steps = (2, 32, 32, 16) if args.tiny else (4, 64, 64, 60)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    data = (samples(32, args.img_size, seed=1), samples(16, args.img_size, seed=2))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        t = trainer(args, out / "run", data)
        frozen = {n: q.clone() for n, q in t.model.named_parameters() if not q.requires_grad}
        before = t.evaluate(data[0])["eval_loss"]  # on the training samples: the loss the steps lower
        t.train()
        after = t.evaluate(data[0])["eval_loss"]
        print(f"  eval_loss (mean of the modalities' losses) on the training samples: {before:.4f} before, ", end="")
        print(f"{after:.4f} after {args.steps} steps (batch 4, 2 accumulated)")
        assert after < before, (before, after)
        same = all(torch.equal(q, frozen[n]) for n, q in t.model.named_parameters() if n in frozen)
        assert same
        print(f"  frozen weights bit-identical after training: {same}")
        check_checkpoint(args, t, out / "run" / f"checkpoint-{args.steps}", collate(data[1][:4]))
        resumed = trainer(args, out / "resumed", data)
        resumed.train(resume_from_checkpoint=str(out / "run" / f"checkpoint-{args.steps // 2}"))
        a, b = t.model.trainable_state_dict(), resumed.model.trainable_state_dict()
        diff = max((a[k] - b[k]).abs().max().item() for k in a)
        assert diff <= 1e-6 * max(v.abs().max().item() for v in a.values()), diff
        print(
            f"  resumed from checkpoint-{args.steps // 2}: ends where the uninterrupted run ends, max diff {diff:.1e}"
        )
    print("hf trainer example OK")


if __name__ == "__main__":
    main()
