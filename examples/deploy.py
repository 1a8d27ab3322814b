"""Deployment: from a trained multimodal LoRA to what runs in production.

A timm ViT wrapped for optical + DSM with per-modality LoRA that does not mix modalities (preset
"lora": the MMLoRA attention rule everywhere), trained a few steps, then:

1. ``merge_adapters()``: every update folded into per-modality weight copies (same outputs,
   no LoRA products per forward); ``unmerge_adapters()`` gives the frozen weights back;
2. ``merge_and_unload("dsm")``: a plain timm model for the DSM alone (no mmpeft module left),
   fed the DSM after its stem (repeated to 3 channels);
3. ``export_peft(wrapped, "optical", dir)``: a peft adapter directory for the plain model, loaded
   with ``peft.PeftModel.from_pretrained`` (skipped when peft is not installed);
4. ``save_pretrained`` and ``load_multimodal`` for inference (eval mode, nothing trainable).

Every step prints the largest difference to the wrapped model's own output and fails above 1e-4::

    python examples/deploy.py            # vit_tiny, 4 blocks, 64 px
    python examples/deploy.py --tiny     # seconds (or MMPEFT_EXAMPLES_TINY=1)
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import timm
import torch

from mmpeft import load_multimodal, wrap_multimodal
from mmpeft.interop.peft_interop import export_peft

TOLERANCE = 1e-4


def build(size: int, depth: int) -> torch.nn.Module:
    """The frozen backbone, rebuilt identically wherever the adapters are loaded (seeded here;
    ``pretrained=True`` in real use)."""
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=size, depth=depth, num_classes=0).eval()


def train(wrapped: torch.nn.Module, inputs: dict[str, torch.Tensor], steps: int = 5) -> None:
    """A few steps on a dummy loss, so that the LoRA updates are far from zero."""
    opt = torch.optim.Adam([p for p in wrapped.parameters() if p.requires_grad], lr=0.05)
    wrapped.train()
    for _ in range(steps):
        loss = sum((o - torch.linspace(-2, 2, o.shape[-1])).square().mean() for o in wrapped(inputs).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    wrapped.eval()


def report(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    diff = (got - want).abs().max().item()
    print(f"  {what}: max diff {diff:.1e}")
    assert diff <= TOLERANCE, f"{what}: {diff} > {TOLERANCE}"


def merge_steps(wrapped: torch.nn.Module, inputs: dict[str, torch.Tensor], want: dict[str, torch.Tensor], args) -> None:
    names = wrapped.merge_adapters()
    with torch.no_grad():
        merged = wrapped(inputs)
    for m in want:
        report(f"merged output equals unmerged ({m}, {len(names)} layers merged)", merged[m], want[m])
    wrapped.unmerge_adapters()
    plain = wrapped.merge_and_unload("dsm")  # a copy: the wrapper stays usable
    assert not any("mmpeft" in type(mod).__module__ for mod in plain.modules())
    with torch.no_grad():
        out = plain(inputs["dsm"].repeat(1, 3, 1, 1))  # the DSM after its stem
    report(f"merge_and_unload('dsm'): a plain {type(plain).__name__} equals the wrapped DSM output", out, want["dsm"])


def peft_step(
    wrapped: torch.nn.Module, inputs: dict[str, torch.Tensor], want: dict[str, torch.Tensor], out: Path, args
) -> None:
    try:
        import peft
    except ImportError:
        print("  export_peft: skipped (pip install peft)")
        return
    export_peft(wrapped, "optical", out / "peft_optical")
    model = peft.PeftModel.from_pretrained(build(args.size, args.depth), str(out / "peft_optical")).eval()
    with torch.no_grad():
        got = model(inputs["optical"])
    report("export_peft('optical') loaded by peft.PeftModel.from_pretrained", got, want["optical"])


def load_step(
    wrapped: torch.nn.Module, inputs: dict[str, torch.Tensor], want: dict[str, torch.Tensor], out: Path, args
) -> None:
    wrapped.save_pretrained(out / "mmpeft")
    size = sum(f.stat().st_size for f in (out / "mmpeft").iterdir()) / 1024
    model = load_multimodal(build(args.size, args.depth), out / "mmpeft")  # for inference
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        got = model(inputs)
    for m in want:
        report(f"load_multimodal for inference ({size:.0f} KiB of adapters; {m})", got[m], want[m])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--tiny",
        action="store_true",
        default=bool(os.environ.get("MMPEFT_EXAMPLES_TINY")),
        help="a 2-block ViT at 32 px: seconds (also MMPEFT_EXAMPLES_TINY=1)",
    )
    p.add_argument("--out", default=None, help="where to write the files (default: a temporary directory)")
    args = p.parse_args(argv)
    args.size, args.depth = (32, 2) if args.tiny else (64, 4)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    g = torch.Generator().manual_seed(1)
    inputs = {
        "optical": torch.rand(2, 3, args.size, args.size, generator=g),
        "dsm": torch.rand(2, 1, args.size, args.size, generator=g),
    }

    wrapped = wrap_multimodal(build(args.size, args.depth), ("optical", "dsm"), preset="lora")
    train(wrapped, inputs)
    with torch.no_grad():
        want = wrapped(inputs)
        base = build(args.size, args.depth)(inputs["optical"])
    print(f"  the trained LoRA changes the optical output by {(want['optical'] - base).abs().max().item():.2e}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        merge_steps(wrapped, inputs, want, args)
        peft_step(wrapped, inputs, want, out, args)
        load_step(wrapped, inputs, want, out, args)
    print("deploy example OK")


if __name__ == "__main__":
    main()
