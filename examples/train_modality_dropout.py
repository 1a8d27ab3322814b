"""Training loop: a timm ViT classifier on three modalities (optical, near-infrared, DSM) with
modality dropout, MMLoRA mixing, and a head trained in full.

Each step draws a presence mask with ``mmpeft.modality_dropout`` (a dropped modality of a sample
neither gives nor receives mixing, and its output is not used), averages the logits of the
present modalities and trains the LoRA, the lambdas and the head. Synthetic data (the class is
coded in the inputs' mean) so that it runs anywhere::

    python examples/train_modality_dropout.py            # vit_tiny, 4 blocks, 64 px, 60 steps
    python examples/train_modality_dropout.py --tiny     # seconds (or MMPEFT_EXAMPLES_TINY=1)

What it checks and prints: the loss falls; the frozen weights are bit-identical after training;
every trainable tensor received a gradient; a sample's absent modality leaves its output
untouched by the others; the model predicts from any subset of the modalities.
"""

from __future__ import annotations

import argparse
import os

import timm
import torch
import torch.nn.functional as F

from mmpeft import modality_dropout, wrap_multimodal

MODALITIES = ("optical", "nir", "dsm")
CHANNELS = {"optical": 3, "nir": 1, "dsm": 1}
RATES = {"optical": 0.2, "nir": 0.3, "dsm": 0.3}  # chance to drop each modality of each sample


def build(size: int, depth: int, classes: int) -> torch.nn.Module:
    """A timm ViT-Tiny (random weights here; ``pretrained=True`` for real use), frozen and wrapped:
    MMLoRA (the paper's placement, found from the model) and the new head trained in full."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=size, depth=depth, num_classes=classes)
    return wrap_multimodal(vit, MODALITIES, preset="mmlora", modules_to_save=["head"])


def batch(n: int, size: int, classes: int, g: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Synthetic samples: every modality's mean says the class (so any subset can learn it)."""
    labels = torch.randint(classes, (n,), generator=g)
    level = (labels.float() / (classes - 1)).view(n, 1, 1, 1)
    return {m: level + 0.3 * torch.randn(n, c, size, size, generator=g) for m, c in CHANNELS.items()}, labels


def fused_logits(out: dict[str, torch.Tensor], presence: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """The mean of the present modalities' logits, per sample: (B, classes)."""
    keep = torch.stack([presence[m] if presence else torch.ones(len(out[m]), dtype=torch.bool) for m in out])  # (M, B)
    logits = torch.stack(list(out.values()))  # (M, B, classes)
    w = keep.float().unsqueeze(-1)
    return (logits * w).sum(0) / w.sum(0)


def train(model: torch.nn.Module, args: argparse.Namespace) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    g = torch.Generator().manual_seed(1)
    losses, seen = [], set()
    model.train()
    for step in range(args.steps):
        inputs, labels = batch(args.batch, args.size, args.classes, g)
        presence = modality_dropout(RATES, MODALITIES, args.batch, generator=g)
        loss = F.cross_entropy(fused_logits(model(inputs, presence=presence), presence), labels)
        opt.zero_grad()
        loss.backward()
        seen |= {i for i, p in enumerate(params) if p.grad is not None and p.grad.abs().sum() > 0}
        opt.step()
        losses.append(loss.item())
        if step % max(1, args.steps // 5) == 0:
            kept = {m: int(v.sum()) for m, v in presence.items()}
            print(f"  step {step:3d}  loss {loss.item():.3f}  samples kept per modality {kept}")
    assert len(seen) == len(params), f"{len(params) - len(seen)} trainable tensors never received a gradient"
    print(f"  every one of the {len(params)} trainable tensors received a gradient")
    return losses


def check_absent(model: torch.nn.Module, args: argparse.Namespace) -> float:
    """Sample 0 without its DSM: its optical output must not depend on its DSM input at all."""
    model.eval()
    inputs, _ = batch(2, args.size, args.classes, torch.Generator().manual_seed(5))
    presence = {m: torch.tensor([m != "dsm", True]) for m in MODALITIES}
    changed = {**inputs, "dsm": inputs["dsm"] + torch.randn_like(inputs["dsm"])}
    with torch.no_grad():
        a, b = model(inputs, presence=presence), model(changed, presence=presence)
    diff = (a["optical"][0] - b["optical"][0]).abs().max().item()
    assert diff == 0.0 and (a["optical"][1] - b["optical"][1]).abs().max() > 0, "presence did not cut the mixing"
    return diff


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--tiny",
        action="store_true",
        default=bool(os.environ.get("MMPEFT_EXAMPLES_TINY")),
        help="a 2-block ViT at 32 px, 25 steps: seconds (also MMPEFT_EXAMPLES_TINY=1)",
    )
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    args = p.parse_args(argv)
    args.size, depth = (32, 2) if args.tiny else (64, 4)
    args.steps = args.steps or (25 if args.tiny else 60)
    args.classes = 4
    torch.set_num_threads(min(2, torch.get_num_threads()))

    model = build(args.size, depth, args.classes)
    model.print_trainable_parameters()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = train(model, args)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first, f"the loss did not fall: {first:.3f} -> {last:.3f}"
    print(f"  loss fell: mean of the first 5 steps {first:.3f} -> last 5 steps {last:.3f}")
    same = all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if n in frozen)
    assert same, "a frozen weight changed"
    print(f"  frozen weights bit-identical after {args.steps} steps: {same} ({len(frozen)} tensors)")
    print(f"  an absent DSM leaves that sample's optical output unchanged: max diff {check_absent(model, args):.1e}")
    inputs, labels = batch(16, args.size, args.classes, torch.Generator().manual_seed(9))
    with torch.no_grad():
        for subset in (MODALITIES, ("optical",), ("nir", "dsm")):
            out = model({m: inputs[m] for m in subset})  # any non-empty subset of the modalities
            acc = (fused_logits(out, None).argmax(1) == labels).float().mean().item()
            print(f"  accuracy from {'+'.join(subset)}: {acc:.2f}")
    print("train example OK")


if __name__ == "__main__":
    main()
