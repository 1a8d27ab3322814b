"""Training steps of the benchmarked schemes, built from a scheme spec.

A spec is a scheme name with optional ``+modifiers``, e.g. ``ours+bf16+base+compile=model``:

- names: ``ours`` (stacked pass, ``mmpeft.runtime.attention``), ``ours_ckpt`` (and gradient
  checkpointing), ``ours_padded`` (the encoder's own blocks), ``per_modality`` (the same layers
  modality after modality: the authors' scheme), ``per_modality_sam`` (on segment-anything's
  encoder), ``floor`` (the frozen timm SAM encoder alone, forward + backward of the stacked
  batch), ``floor_efficient`` (the floor with ``mmpeft.runtime.attention``);
- ``bf16`` / ``fp16``: autocast (overrides the command's ``--amp`` for this scheme), ``fp32``: none;
- ``base``: frozen weights kept in the autocast dtype (``base_dtype``; bf16 without autocast);
- ``compile=blocks`` (regional, ``MultimodalModel.compile_blocks``), ``compile=model``
  (``torch.compile`` of the whole model), ``compile=model-ro`` (``mode="reduce-overhead"``:
  CUDA graphs);
- ``queries=real|all|auto``: the windows' attention calls of ``mmpeft.runtime.attention``;
- ``relpos=mask|channels``: how ``mmpeft.runtime.attention`` adds the relative positions (an
  additive mask, or extra query/key channels with no mask);
- ``foreach``: the optimizer's multi-tensor implementation (a few kernels per step instead of
  a few per tensor; the default on CUDA, not on CPU).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

NAMES = ("ours", "ours_ckpt", "ours_padded", "per_modality", "per_modality_sam", "floor", "floor_efficient")
COMPILE = ("none", "blocks", "model", "model-ro")


@dataclass
class Spec:
    """A parsed scheme spec (see the module doc)."""

    name: str
    amp: str | None = None  # None: the command's --amp
    base: bool = False
    compile: str = "none"
    queries: str = "auto"
    relpos: str = "mask"
    foreach: bool | None = None

    @classmethod
    def parse(cls, text: str) -> Spec:
        name, *mods = text.split("+")
        if name not in NAMES:
            raise ValueError(f"unknown scheme {name!r} in {text!r}; known: {NAMES}")
        spec = cls(name)
        for mod in mods:
            key, _, val = mod.partition("=")
            if key in ("bf16", "fp16", "fp32") and not val:
                spec.amp = key
            elif key == "base" and not val:
                spec.base = True
            elif key == "foreach" and not val:
                spec.foreach = True
            elif key == "compile" and val in COMPILE:
                spec.compile = val
            elif key == "queries" and val in ("real", "all", "auto"):
                spec.queries = val
            elif key == "relpos" and val in ("mask", "channels"):
                spec.relpos = val
            else:
                raise ValueError(f"unknown modifier {mod!r} in scheme {text!r}")
        return spec

    def amp_of(self, args: argparse.Namespace) -> str:
        return self.amp or args.amp


def _dtype(amp: str) -> Any:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)


def compile_options(mode: str | None = None) -> dict[str, Any]:
    """torch.compile options; ``MMPEFT_BENCH_COMPILE_BACKEND`` (e.g. ``aot_eager``) replaces
    Inductor in smoke tests of the scripts (no mode then)."""
    backend = os.environ.get("MMPEFT_BENCH_COMPILE_BACKEND")
    if backend:
        return {"backend": backend}
    return {"mode": mode} if mode else {}


def compile_model(model: Any, how: str, encoder: Any = None) -> Any:
    """``how``: "none", "blocks" (``encoder.compile_blocks``, in place), "model", "model-ro"."""
    import torch

    if how == "blocks":
        encoder.compile_blocks(**compile_options())
        return model
    if how in ("model", "model-ro"):
        return torch.compile(model, **compile_options("reduce-overhead" if how == "model-ro" else None))
    return model


def _inputs(args: argparse.Namespace, dev: Any) -> tuple[dict[str, Any], Any]:
    import torch

    size = (args.size, args.size)
    x = {"optical": torch.rand(args.batch, 3, *size, device=dev), "dsm": torch.rand(args.batch, 1, *size, device=dev)}
    return x, torch.randint(0, 6, (args.batch, *size), device=dev)


def quick_sizes(backbone: str) -> dict[str, Any]:
    """``MFNetConfig`` overrides of ``--quick``: a tiny encoder of the kind ``backbone`` names."""
    from mmpeft.backbones import SAM_SPECS
    from mmpeft_isprs.model.encoders import resolve_backbone

    kind = resolve_backbone(backbone, tuple(SAM_SPECS)).kind
    if kind == "sam2":
        return {"embed_dim": 16, "num_heads": 1, "encoder_kwargs": {"stages": [1, 1, 1, 1], "global_att_blocks": []}}
    return {"embed_dim": 64, "depth": 4, "num_heads": 2}


def _floor_encoder(args: argparse.Namespace, spec: Spec) -> Any:
    """The frozen encoder of ``args.backbone`` alone (timm's SAM, or the SAM2 / ViT feature encoder)."""
    from mmpeft.backbones import SAM_SPECS, build_sam_encoder, replace_spec
    from mmpeft.runtime.attention import enable_efficient_attention
    from mmpeft_isprs.model import MFNetConfig
    from mmpeft_isprs.model.encoders import build_feature_encoder

    if args.backbone not in SAM_SPECS:
        cfg = MFNetConfig(
            backbone=args.backbone, img_size=args.size, **(quick_sizes(args.backbone) if args.quick else {})
        )
        encoder, _ = build_feature_encoder(
            cfg.backbone, cfg.backbone_kind, cfg.size, cfg.timm_kwargs, cfg.pyramid_blocks
        )
        return encoder.requires_grad_(False)
    sam = (
        SAM_SPECS[args.backbone]
        if not args.quick
        else replace_spec(SAM_SPECS["vit_tiny"], embed_dim=64, depth=4, num_heads=2, global_attn_indexes=(0, 1, 2, 3))
    )
    encoder = build_sam_encoder(sam, impl="timm", img_size=(args.size, args.size)).requires_grad_(False)
    if spec.name == "floor_efficient":
        enable_efficient_attention(encoder, spec.queries, spec.relpos)
    return encoder


def floor_step(args: argparse.Namespace, spec: Spec) -> Callable[[], None]:
    """The frozen encoder alone: forward + backward of the stacked batch (input gradients)."""
    import torch

    dev, amp = torch.device(args.device), _dtype(spec.amp_of(args))
    x, _ = _inputs(args, dev)
    with dev:
        encoder = _floor_encoder(args, spec)
    if spec.base and amp is not None:
        encoder.to(amp)
    stacked = torch.cat([x["optical"], x["dsm"].repeat(1, 3, 1, 1)], 0)  # (2B, 3, H, W)
    if spec.base and amp is not None:
        stacked = stacked.to(amp)
    run = compile_model(encoder, spec.compile) if spec.compile != "blocks" else encoder
    if spec.compile == "blocks":
        for block in encoder.blocks if hasattr(encoder, "blocks") else encoder.trunk.blocks:
            block.compile(**compile_options())

    def step() -> None:
        inp = stacked.clone().requires_grad_(True)
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            out = run(inp)  # SAM: one map; SAM2 / ViT: a list of maps
        sum(o.float().mean() for o in (out if isinstance(out, list) else [out])).backward()

    return step


def build_model(args: argparse.Namespace, spec: Spec, method: str, **config: Any) -> tuple[Any, Any]:
    """The MFNet of ``spec`` built directly on ``args.device``: (model, what to call: the model
    or its compiled form). ``config``: further ``MFNetConfig`` fields."""
    import torch

    from mmpeft_isprs.model import build_mfnet

    kw: dict[str, Any] = dict(backbone=args.backbone, method=method, img_size=args.size, **config)
    if args.quick:
        kw.update(quick_sizes(args.backbone))
    with torch.device(args.device):
        model = build_mfnet(**kw)
    model.encoder.set_nonfinite("off")  # as the training task does: inputs are checked on the CPU batch
    queries = config.get("efficient_attention", True)
    if spec.relpos != "mask" and queries:
        model.encoder.enable_efficient_attention("auto" if queries is True else str(queries), spec.relpos)
    if spec.base:
        model.encoder.set_base_dtype(_dtype(spec.amp_of(args)) or torch.bfloat16)
    return model, compile_model(model, spec.compile, model.encoder)


def model_step(args: argparse.Namespace, spec: Spec, method: str) -> Callable[[], None]:
    """One MFNet training step (SGD with momentum, cross-entropy) of ``spec``."""
    import torch

    dev, amp = torch.device(args.device), _dtype(spec.amp_of(args))
    x, y = _inputs(args, dev)
    model, run = build_model(
        args,
        spec,
        method,
        impl="segment_anything" if spec.name == "per_modality_sam" else "timm",
        execution="per_modality" if spec.name.startswith("per_modality") else "batched",
        grad_checkpointing=spec.name == "ours_ckpt",
        efficient_attention=spec.queries if spec.name in ("ours", "ours_ckpt") else False,
    )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4, foreach=spec.foreach)
    scaler = torch.amp.GradScaler(enabled=amp == torch.float16)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            loss = torch.nn.functional.cross_entropy(run(x).float(), y, ignore_index=255)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step


def make_step(args: argparse.Namespace, scheme: str, method: str) -> Callable[[], None]:
    """Build one scheme's model (directly on ``args.device``) and return one training step."""
    import torch

    torch.manual_seed(0)
    spec = Spec.parse(scheme)
    return floor_step(args, spec) if spec.name.startswith("floor") else model_step(args, spec, method)


def count_ops(step: Callable[[], None], device: str) -> dict[str, int]:
    """Operator calls of one step from ``torch.profiler``: top-level ``aten::`` calls (those not
    issued by another aten op: what eager dispatches), all aten calls, and CUDA kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    events = prof.events()
    aten = [e for e in events if e.name.startswith("aten::")]
    top = [e for e in aten if not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))]
    kernels = [
        e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA") and e.name != "Activity Buffer Request"
    ]
    return {"aten_top": len(top), "aten_all": len(aten), "cuda_kernels": len(kernels)}
