"""Parameter counts of the six MFNet configurations beside the paper's Table VI, and of MFNet on
SAM2's Hiera and DINOv2 (MMAdapter and MMLoRA, every size).

Builds every encoder on the meta device (no memory, seconds) and counts trainable encoder
parameters, DFM, decoder, frozen parameters and totals. Writes benchmarks/results/params.{json,md}.

    python benchmarks/params.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write

from mmpeft import wrap_multimodal
from mmpeft.backbones.sam_build import build_sam_encoder
from mmpeft_isprs.model import build_mfnet

# Table VI of the paper: "fine-tuning parameters in SAM's encoder + DFM and decoder" (millions)
PAPER = {
    ("adapter", "vit_b"): (14.20, 6.22),
    ("adapter", "vit_l"): (50.45, 6.22),
    ("adapter", "vit_h"): (105.06, 6.22),
    ("lora", "vit_b"): (1.03, 6.22),
    ("lora", "vit_l"): (2.75, 6.22),
    ("lora", "vit_h"): (4.59, 6.22),
}
EXPECTED_ENCODER = {
    ("adapter", "vit_b"): 14_201_880,
    ("adapter", "vit_l"): 50_454_576,
    ("adapter", "vit_h"): 105_062_464,
    ("lora", "vit_b"): 1_032_240,
    ("lora", "vit_l"): 2_752_608,
    ("lora", "vit_h"): 4_587_648,
}
SAM_MASK_DECODER, SAM_PROMPT_ENCODER = 4_058_340, 6_220  # unused parts the paper counted
#: the encoders beyond SAM (docs/mfnet.md#encoders)
OTHER_ENCODERS = (
    "sam2_hiera_tiny",
    "sam2_hiera_small",
    "sam2_hiera_base_plus",
    "sam2_hiera_large",
    "dinov2_vits14",
    "dinov2_vitb14",
    "dinov2_vitl14",
)


def count(method: str, backbone: str) -> dict[str, int]:
    with torch.device("meta"):
        model = build_mfnet(backbone=backbone, method=method, img_size=256)
    g = model.parameter_groups()
    return {
        "encoder_trainable": g["encoder (trainable)"]["trainable"],
        "dfm": g["dfm"]["trainable"],
        "decoder": g["decoder"]["trainable"],
        "frozen": g["total"]["frozen"],
        "trainable_total": g["total"]["trainable"],
        "total": g["total"]["trainable"] + g["total"]["frozen"],
    }


# LoRA variants on SAM vit_b (timm's SAM: attn.qkv, attn.proj, mlp.fc1, mlp.fc2), r=4, lora_alpha=8, fusion none
VARIANT_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
VARIANTS = {
    "lora": {},
    "rslora": {"use_rslora": True},
    "gaussian": {"init_lora_weights": "gaussian"},
    "pissa": {"init_lora_weights": "pissa"},
    "olora": {"init_lora_weights": "olora"},
    "lora_bias": {"lora_bias": True},
    "dora": {"use_dora": True},
}


def _peft_count(options: dict) -> int:
    """peft's trainable count for the same LoraConfig on the same targets (meta device). peft's
    PiSSA / OLoRA cannot initialise on the meta device; the initialisation adds no parameter, so
    they are counted with ``init_lora_weights=False``."""
    import peft

    init = options.get("init_lora_weights", "kaiming")
    kw = {**options, "init_lora_weights": True if init == "kaiming" else init}
    if init in ("pissa", "olora"):
        kw["init_lora_weights"] = False
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=VARIANT_TARGETS, **kw)
    model = peft.get_peft_model(build_sam_encoder("vit_b", device="meta"), config)
    return int(model.get_nb_trainable_parameters()[0])


def _mmpeft_count(options: dict, modalities: tuple[str, ...]) -> tuple[int, int]:
    """(trainable parameters, saved frozen buffers) of mmpeft's LoRA with ``options`` (fusion none)."""
    w = wrap_multimodal(
        build_sam_encoder("vit_b", device="meta"),
        modalities,
        "lora",
        targets=VARIANT_TARGETS,
        rank=4,
        alpha=8.0,
        fusion="none",
        efficient_attention=False,
        **options,
    )
    trainable = sum(p.numel() for p in w.parameters() if p.requires_grad)
    return trainable, sum(b.numel() for _, layer in w.layers() for b in layer.buffers() if b.numel())


def variant_counts() -> tuple[dict, list[str]]:
    """The LoRA variants' trainable counts on SAM vit_b beside peft's, as JSON data and table lines."""
    data, rows = {}, []
    for name, options in VARIANTS.items():
        one, buffers = _mmpeft_count(options, ("optical",))
        two, _ = _mmpeft_count(options, ("optical", "dsm"))
        ref = _peft_count(options)
        data[name] = {
            "options": options,
            "peft": ref,
            "mmpeft_1_modality": one,
            "mmpeft_2_modalities": two,
            "saved_frozen_buffers": buffers,
            "equal_to_peft": one == ref,
        }
        opts = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "(defaults)"
        rows.append(f"| {name} | {opts} | {ref:,} | {one:,} | {two:,} | {buffers:,} |")
        if one != ref:
            raise SystemExit(f"LoRA variant {name}: mmpeft counts {one:,} trainable parameters, peft {ref:,}")
    lines = [
        "",
        "LoRA variants on SAM vit_b (attn.qkv, attn.proj, mlp.fc1, mlp.fc2; r=4, lora_alpha=8; fusion none):",
        "",
        "| variant | options | peft | mmpeft, 1 modality | mmpeft, 2 modalities | saved frozen buffers (1 modality) |",
        "|---|---|---:|---:|---:|---:|",
        *rows,
        "",
        "Saved frozen buffers: PiSSA / OLoRA's initial (A_0, B_0), kept so that the frozen weight is never written "
        "(docs/peft.md). peft's PiSSA / OLoRA counted with init_lora_weights=False (they cannot run on the meta "
        "device).",
    ]
    return data, lines


def encoder_counts() -> tuple[dict, list[str]]:
    """MMAdapter / MMLoRA on SAM2's Hiera and DINOv2 (256 x 256, two modalities): JSON data and table lines."""
    data, rows = {}, []
    for backbone in OTHER_ENCODERS:
        for method in ("adapter", "lora"):
            c = count(method, backbone)
            data[f"{method}_{backbone}"] = c
            rows.append(
                f"| {backbone} | MM{'Adapter' if method == 'adapter' else 'LoRA'} | {c['encoder_trainable']:,} | "
                f"{c['dfm']:,} | {c['decoder']:,} | {c['trainable_total']:,} | {c['frozen']:,} | {c['total']:,} |"
            )
    lines = [
        "",
        "MFNet on other encoders (optical + DSM, 256x256; SAM2: its four stages projected into the DFM; DINOv2: "
        "a simple pyramid from blocks at 1/4, 2/4, 3/4 and all of the depth):",
        "",
        "| encoder | method | trainable encoder | DFM | decoder | trainable total | frozen | total |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]
    return data, lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows, data = [], {}
    for method in ("adapter", "lora"):
        for backbone in ("vit_b", "vit_l", "vit_h"):
            c = count(method, backbone)
            ok = c["encoder_trainable"] == EXPECTED_ENCODER[(method, backbone)]
            head = c["dfm"] + c["decoder"]
            paper_enc, paper_head = PAPER[(method, backbone)]
            data[f"{method}_{backbone}"] = {
                **c,
                "paper_encoder_M": paper_enc,
                "paper_dfm_decoder_M": paper_head,
                "encoder_matches_paper": ok,
            }
            name = f"MM{'Adapter' if method == 'adapter' else 'LoRA'} {backbone}"
            rows.append(
                f"| {name} | {c['encoder_trainable']:,} | {paper_enc:.2f} M | {c['dfm']:,} | {c['decoder']:,} "
                f"| {head:,} | {paper_head:.2f} M | {c['trainable_total']:,} | {c['frozen']:,} | {c['total']:,} |"
            )
            if not ok:
                raise SystemExit(f"{name}: encoder count {c['encoder_trainable']:,} differs from the paper's")
    variants, variant_lines = variant_counts()
    encoders, encoder_lines = encoder_counts()
    seconds = time.perf_counter() - t0
    head = data["adapter_vit_b"]["dfm"] + data["adapter_vit_b"]["decoder"]
    table = "\n".join(
        [
            "| configuration | trainable encoder | paper | DFM | decoder | DFM + decoder | paper | trainable total | frozen | total |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            f"DFM + decoder = {head:,}. The paper's 6.22 M adds SAM's unused mask decoder ({SAM_MASK_DECODER:,}) and "
            f"prompt encoder ({SAM_PROMPT_ENCODER:,}), which the authors kept in the model: "
            f"{head:,} + {SAM_MASK_DECODER:,} + {SAM_PROMPT_ENCODER:,} = {head + SAM_MASK_DECODER + SAM_PROMPT_ENCODER:,}.",
            "Frozen counts are at 256x256 input (position embedding resized to 16x16 once).",
            *encoder_lines,
            "",
            f"Built on the meta device in {seconds:.1f} s.",
            *variant_lines,
        ]
    )
    data["dfm_plus_decoder"] = head
    data["paper_6_22M_explained"] = head + SAM_MASK_DECODER + SAM_PROMPT_ENCODER
    data["lora_variants_vit_b"] = variants
    data["other_encoders"] = encoders
    data["seconds"] = seconds
    write("params", data, table, args.out)


if __name__ == "__main__":
    main()
