"""mmpeft quickstart: multimodal LoRA on a SAM encoder and on a timm ViT, optical + DSM.

Runs in a few seconds on a CPU with randomly initialised, small backbones::

    python examples/quickstart.py
    python examples/quickstart.py --tiny     # smaller still: 32 px (or MMPEFT_EXAMPLES_TINY=1)

With the official SAM ViT-B weights from a local file (no download is attempted)::

    python examples/quickstart.py --sam-size vit_b --img-size 256 --checkpoint sam_vit_b_01ec64.pth

Steps: build the backbones, wrap them for ("optical", "dsm"), print the trainable-parameter
summary, run one SGD step on a dummy loss, save only the trained tensors, rebuild the frozen
backbone, reload, and check the outputs are identical.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch import nn

from mmpeft import count_parameters, load_multimodal, wrap_multimodal
from mmpeft.backbones import build_sam_encoder, load_sam_checkpoint


def build_sam(size: str, img_size: int, checkpoint: str | None, seed: int = 0) -> nn.Module:
    """A frozen-to-be SAM image encoder: random (seeded) or loaded from an official .pth file."""
    torch.manual_seed(seed)  # random weights must be rebuilt identically before reloading adapters
    encoder = build_sam_encoder(size, impl="segment_anything", img_size=img_size)
    if checkpoint is not None:
        report = load_sam_checkpoint(encoder, checkpoint)  # e.g. "sam_vit_b_01ec64.pth"
        print(
            f"  loaded {len(report.loaded)} tensors from {checkpoint} ({len(report.dropped)} prompt/mask-decoder keys dropped)"
        )
    return encoder.eval()


def build_vit(img_size: int, seed: int = 0) -> nn.Module:
    """A timm ViT-Tiny cut to 4 blocks (random weights; pretrained=True and full depth for real use)."""
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img_size, depth=4, num_classes=0).eval()


def dummy_batch(img_size: int, batch: int = 2) -> dict[str, torch.Tensor]:
    """Optical (B, 3, H, W) in [0, 1] and a min-max scaled DSM (B, 1, H, W)."""
    g = torch.Generator().manual_seed(1)
    return {
        "optical": torch.rand(batch, 3, img_size, img_size, generator=g),
        "dsm": torch.rand(batch, 1, img_size, img_size, generator=g),
    }


def train_step(wrapped: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """One SGD step on a dummy loss; only the trainable (LoRA, lambda) tensors are optimised."""
    params = [p for p in wrapped.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    wrapped.train()
    out = wrapped(batch)  # {"optical": ..., "dsm": ...}
    g = torch.Generator().manual_seed(2)
    loss = sum((o - torch.randn(o.shape, generator=g)).pow(2).mean() for o in out.values())  # dummy targets
    opt.zero_grad()
    loss.backward()
    opt.step()
    wrapped.eval()
    return loss.item()


def demo(name: str, build: Callable[[], nn.Module], batch: dict[str, torch.Tensor], out_dir: Path) -> None:
    print(f"\n== {name} ==")
    base = build()
    wrapped = wrap_multimodal(base, modalities=("optical", "dsm"), method="lora")  # the paper's MMLoRA
    print("  wrapped layers:", len(list(wrapped.layers())), "e.g.", next(wrapped.layers())[0])
    print("  ", end="")
    wrapped.print_trainable_parameters()
    print(count_parameters(wrapped))

    with torch.no_grad():
        out = wrapped(batch)
    print("  outputs:", {m: tuple(o.shape) for m, o in out.items()})

    frozen = {n: p.detach().clone() for n, p in wrapped.named_parameters() if not p.requires_grad}
    loss = train_step(wrapped, batch)
    print(f"  one SGD step on a dummy loss: loss = {loss:.4f}")
    unchanged = all(torch.equal(frozen[n], p) for n, p in wrapped.named_parameters() if n in frozen)
    assert unchanged, "a frozen weight changed"
    print(f"  {len(frozen)} frozen tensors unchanged: {unchanged}")

    directory = out_dir / name
    wrapped.save_pretrained(str(directory))
    size_kb = sum(f.stat().st_size for f in directory.iterdir()) / 1024
    print(f"  saved {sorted(f.name for f in directory.iterdir())} to {directory} ({size_kb:.0f} KiB)")

    reloaded = load_multimodal(build(), directory)  # a freshly built frozen backbone + saved tensors
    with torch.no_grad():
        a, b = wrapped(batch), reloaded(batch)
    same = all(torch.equal(a[m], b[m]) for m in a)
    assert same, "reloaded model differs"
    print("  reloaded with load_multimodal: outputs identical:", same)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sam-size", default="vit_tiny", help="vit_tiny (random, CPU demo), vit_b, vit_l, vit_h")
    p.add_argument(
        "--tiny",
        action="store_true",
        default=bool(os.environ.get("MMPEFT_EXAMPLES_TINY")),
        help="the smallest run: 32 px inputs (seconds; also MMPEFT_EXAMPLES_TINY=1)",
    )
    p.add_argument(
        "--img-size", type=int, default=None, help="input side in pixels (multiple of 16; default 64, tiny 32)"
    )
    p.add_argument("--checkpoint", default=None, help="local official SAM .pth, e.g. sam_vit_b_01ec64.pth")
    p.add_argument("--out", default=None, help="where to save the adapters (default: a temporary directory)")
    args = p.parse_args(argv)
    args.img_size = args.img_size or (32 if args.tiny else 64)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    batch = dummy_batch(args.img_size)
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(args.out or tmp)
        demo("sam_encoder", lambda: build_sam(args.sam_size, args.img_size, args.checkpoint), batch, out_dir)
        demo("timm_vit", lambda: build_vit(args.img_size), batch, out_dir)
    print("\nquickstart OK")


if __name__ == "__main__":
    main()
