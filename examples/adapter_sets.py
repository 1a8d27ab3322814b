"""Several named adapter sets on one frozen SAM encoder: a Vaihingen set and a Potsdam set,
switched without rebuilding, saved and loaded by name, counted per set, and combined where
the maths allows.

The first set of a wrapped model is named ``"default"`` (peft's name): here it is trained for
"Vaihingen"; ``add_adapter("potsdam", ...)`` adds a second set of its own kind on the same frozen
encoder (only its small tensors are new), ``set_adapter`` switches::

    python examples/adapter_sets.py            # SAM vit_tiny (random weights) at 128 px
    python examples/adapter_sets.py --tiny     # seconds, 64 px (or MMPEFT_EXAMPLES_TINY=1)

With the official ViT-B weights: ``--sam-size vit_b --img-size 1024 --checkpoint sam_vit_b_01ec64.pth``.
What it checks and prints: training one set leaves the other bit-identical and the encoder
untouched; each set reloaded by name on a fresh encoder gives its outputs again; the weighted
combination of two LoRA sets is exact; combining sets that mix modalities is refused with the reason.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from mmpeft import load_multimodal, wrap_multimodal
from mmpeft.backbones import build_sam_encoder, load_sam_checkpoint

MODALITIES = ("optical", "dsm")


def encoder(args: argparse.Namespace) -> torch.nn.Module:
    """The frozen SAM image encoder (seeded random weights, or the official file)."""
    torch.manual_seed(0)
    enc = build_sam_encoder(args.sam_size, impl="segment_anything", img_size=args.img_size)
    if args.checkpoint:
        load_sam_checkpoint(enc, args.checkpoint)
    return enc.eval()


def train(wrapped: torch.nn.Module, inputs: dict[str, torch.Tensor], seed: int, steps: int = 2) -> None:
    """A few steps of the active set on a dummy loss (the optimizer sees the active set only)."""
    opt = torch.optim.Adam([p for p in wrapped.parameters() if p.requires_grad], lr=0.02)
    target = torch.randn(wrapped(inputs)["optical"].shape, generator=torch.Generator().manual_seed(seed))
    wrapped.train()
    for _ in range(steps):
        loss = sum((o - target).square().mean() for o in wrapped(inputs).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    wrapped.eval()


def outputs(wrapped: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{set: {modality: output}} for every set of ``wrapped`` (the active set is restored)."""
    active, out = wrapped.active_adapter, {}
    for name in wrapped.adapters:
        wrapped.set_adapter(name)
        with torch.no_grad():
            out[name] = wrapped(inputs)
    wrapped.set_adapter(active)
    return out


def two_sets(wrapped: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    own = wrapped.trainable_names()
    frozen = {k: v.clone() for k, v in wrapped.state_dict().items() if k not in own}
    train(wrapped, inputs, seed=1)  # "default": the Vaihingen set (MMAdapter)
    vaihingen = {k: v.clone() for k, v in wrapped.trainable_state_dict().items()}
    wrapped.add_adapter("potsdam", preset="mmlora", rank=8)  # a set of another kind on the same encoder
    wrapped.set_adapter("potsdam")
    train(wrapped, inputs, seed=2)
    wrapped.set_adapter("default")
    same = all(torch.equal(v, vaihingen[k]) for k, v in wrapped.trainable_state_dict().items())
    assert same, "training the Potsdam set changed the Vaihingen set"
    print(f"  sets {wrapped.adapters}, active {wrapped.active_adapter!r}")
    print(f"  Vaihingen set bit-identical after training the Potsdam set: {same}")
    now = wrapped.state_dict()
    untouched = all(torch.equal(now[k], v) for k, v in frozen.items())
    assert untouched, "a frozen weight changed"
    print(f"  frozen encoder untouched ({len(frozen)} tensors, one copy shared by both sets): {untouched}")
    for name in wrapped.adapters:
        report = wrapped.count_adapter_parameters(name)
        print(f"  set {name!r}: {report.trainable:,} trainable beside {report.frozen:,} frozen parameters")


def save_and_load(wrapped: torch.nn.Module, inputs: dict[str, torch.Tensor], out: Path, args) -> None:
    want = outputs(wrapped, inputs)
    wrapped.save_pretrained(out)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    print(f"  saved: {files}")
    loaded = load_multimodal(encoder(args), out)  # "default" from the folder itself
    loaded.load_adapter(out, "potsdam")  # another set by name (from out/potsdam)
    got = outputs(loaded, inputs)
    for name in want:
        diff = max((got[name][m] - want[name][m]).abs().max().item() for m in MODALITIES)
        assert diff == 0.0, f"set {name!r} reloaded differs by {diff}"
        print(f"  set {name!r} reloaded on a fresh encoder: max diff {diff:.1e}")
    other = (want["potsdam"]["dsm"] - want["default"]["dsm"]).abs().max().item()
    print(f"  (the two sets' DSM outputs differ by {other:.2e})")


def deltas(wrapped: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    wrapped.set_adapter(name)
    return {site: layer.get_delta_weight("dsm").detach() for site, layer in wrapped.layers()}


def combine(wrapped: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    try:
        wrapped.add_weighted_adapter(["default", "potsdam"], [0.5, 0.5], "both")
    except ValueError as err:
        print(f"  combining the mixing sets is refused: {str(err)[:150]}...")
    for seed, name in ((3, "lora_a"), (4, "lora_b")):  # LoRA sets without mixing combine exactly
        wrapped.add_adapter(name, preset="lora")
        wrapped.set_adapter(name)
        train(wrapped, inputs, seed=seed)
    wrapped.add_weighted_adapter(["lora_a", "lora_b"], [0.7, -0.3], "a_minus_b")
    a, b, c = (deltas(wrapped, n) for n in ("lora_a", "lora_b", "a_minus_b"))
    diff = max((c[s] - (0.7 * a[s] - 0.3 * b[s])).abs().max().item() for s in c)
    assert diff < 1e-6, diff
    print(f"  add_weighted_adapter 0.7 * lora_a - 0.3 * lora_b: every layer's weight update exact, max diff {diff:.1e}")
    wrapped.set_adapter("default")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--tiny",
        action="store_true",
        default=bool(os.environ.get("MMPEFT_EXAMPLES_TINY")),
        help="64 px: seconds (also MMPEFT_EXAMPLES_TINY=1)",
    )
    p.add_argument("--sam-size", default="vit_tiny", help="vit_tiny (random, CPU demo), vit_b, vit_l, vit_h")
    p.add_argument("--img-size", type=int, default=None, help="input side in pixels (default 128, tiny 64)")
    p.add_argument("--checkpoint", default=None, help="local official SAM .pth, e.g. sam_vit_b_01ec64.pth")
    p.add_argument("--out", default=None, help="where to save the sets (default: a temporary directory)")
    args = p.parse_args(argv)
    args.img_size = args.img_size or (64 if args.tiny else 128)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    g = torch.Generator().manual_seed(1)
    inputs = {
        "optical": torch.rand(1, 3, args.img_size, args.img_size, generator=g),
        "dsm": torch.rand(1, 1, args.img_size, args.img_size, generator=g),
    }

    wrapped = wrap_multimodal(encoder(args), MODALITIES, preset="mmadapter")
    two_sets(wrapped, inputs)
    with tempfile.TemporaryDirectory() as tmp:
        save_and_load(wrapped, inputs, Path(args.out or tmp), args)
    combine(wrapped, inputs)
    print("adapter sets example OK")


if __name__ == "__main__":
    main()
