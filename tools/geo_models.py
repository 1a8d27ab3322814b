"""The geospatial foundation models of TerraTorch's backbone registry, wrapped as a user would.

Each model of issue 31's list is built from TerraTorch's ``BACKBONE_REGISTRY`` (or torchgeo's
``torchgeo.models``, which TerraTorch installs: Scale-MAE, CROMA, CopernicusFM) with random weights
(``pretrained=False``) at reduced depth / width where the builder takes it, and wrapped for
``("optical", "sar")`` with ``wrap_multimodal(model, ("optical", "sar"), "lora")``, no hint (TerraMind,
which has one patch embedding per modality, for its own keys ``("S2L2A", "S1GRD")``: each modality
through its own embedding). A wrapped model is then checked: identity at init (each modality's
output equal to the base model's on that modality's stem output; TerraMind's: the base model called
with that modality alone, ``model({"S1GRD": x})``) and, after random trainables, the stacked batch equal to each
modality alone (``tests.helpers.rel_diff``, 1e-4 relative; the worst of every tensor of the outputs:
each block's where the model returns one per block). Float32 matmuls at "highest" (``import
terratorch`` sets "medium"). Writes ``benchmarks/results/geo_models.json`` and ``.md``.

    python tools/geo_models.py [--models prithvi_eo_v2 dofa ...] [--update]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.helpers import randomise_trainables, rel_diff  # noqa: E402

HLS6 = ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"]
SAR_BANDS = 2


class KeywordInput(nn.Module):
    """What a user writes for a model that takes its image by keyword and other arguments:
    ``forward(x)`` calls ``model(**{keyword: x}, **extra)`` and returns ``output[key]`` (or the output)."""

    def __init__(self, model: nn.Module, keyword: str, key: str | None = None, **extra: Any) -> None:
        super().__init__()
        self.model, self.keyword, self.key, self.extra = model, keyword, key, extra
        if "wavelengths" in extra:  # held as DOFA's registry wrapper holds them: the channels are read off it
            self.wavelengths = extra["wavelengths"]

    def forward(self, x: torch.Tensor) -> Any:
        extra = {k: v(x) if callable(v) else v for k, v in self.extra.items()}
        out = self.model(**{self.keyword: x}, **extra)
        return out[self.key] if self.key is not None else out


def _registry(name: str, **kw: Any) -> Any:
    def build() -> nn.Module:
        from terratorch.registry import BACKBONE_REGISTRY

        return BACKBONE_REGISTRY.build(name, pretrained=False, **kw)

    return build


def _torchgeo(name: str, **kw: Any) -> Any:
    def build() -> nn.Module:
        import torchgeo.models as tg

        return getattr(tg, name)(**kw)

    return build


def _scalemae() -> nn.Module:
    from torchgeo.models.scale_mae import ScaleMAE

    return ScaleMAE(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2)


def _croma_optical() -> nn.Module:  # its forward takes x_sar= / x_optical=: a user's one-line wrapper
    return KeywordInput(
        _torchgeo("croma_base", weights=None, modalities=["optical"])(), "x_optical", "optical_encodings"
    )


def _copernicusfm() -> nn.Module:  # spectral mode: wavelengths / bandwidths (nm) and metadata (NaN: unknown)
    model = _torchgeo("copernicusfm_base", weights=None)()  # its builder fixes the depth (12)
    waves, widths = [490.0, 560.0, 665.0, 842.0], [65.0, 35.0, 30.0, 115.0]
    return KeywordInput(
        model,
        "x",
        None,
        metadata=lambda x: torch.full((x.shape[0], 4), float("nan")),
        wavelengths=waves,
        bandwidths=widths,
    )


#: the modality names a row wraps for (optical first, then SAR), where not ("optical", "sar")
NAMES: dict[str, tuple[str, str]] = {"terramind": ("S2L2A", "S1GRD")}

#: name -> (builder, what the row stands for)
MODELS: dict[str, tuple[Any, str]] = {
    "prithvi_eo_v2": (
        _registry("terratorch_prithvi_eo_v2_tiny_tl", bands=HLS6, depth=2, embed_dim=64, num_heads=2, img_size=64),
        "Prithvi-EO v2 tiny (TL), 2 blocks",
    ),
    "prithvi_eo_v2_time": (
        _registry(
            "terratorch_prithvi_eo_v2_tiny_tl",
            bands=HLS6,
            depth=2,
            embed_dim=64,
            num_heads=2,
            img_size=64,
            num_frames=3,
        ),
        "Prithvi-EO v2 tiny, 3 frames (B, C, T, H, W)",
    ),
    "prithvi_swin": (
        _registry("timm_prithvi_swin_B", depths=(1, 1, 1, 1), embed_dim=32, num_heads=(1, 2, 4, 8)),
        "Prithvi Swin B layout, 1 block per stage, width 32",
    ),
    "scalemae": (_scalemae, "torchgeo ScaleMAE, 2 blocks, width 64"),
    "ssl4eo_vit": (
        _registry(
            "terratorch_ssl4eos12_vit_small_patch16_224_sentinel2_all_moco", model_bands=HLS6, depth=2, img_size=64
        ),
        "SSL4EO-S12 ViT-S/16, 2 blocks",
    ),
    "ssl4eo_resnet": (
        _registry("terratorch_ssl4eos12_resnet18_sentinel2_all_moco", model_bands=HLS6),
        "SSL4EO-S12 ResNet-18",
    ),
    "satlas_swin": (_registry("terratorch_satlas_swin_t_sentinel2_si_ms", model_bands=HLS6), "Satlas Swin V2-T"),
    "terramind": (_registry("terratorch_terramind_v1_tiny", modalities=["S2L2A", "S1GRD"]), "TerraMind v1 tiny"),
    "dofa": (
        _registry("terratorch_dofa_small_patch16_224", model_bands=HLS6, img_size=64),
        "DOFA small (registry wrapper, wavelengths fixed at build)",
    ),
    "clay": (_registry("timm_clay_v1_base", img_size=64, features_only=True), "Clay v1 base (encoder)"),
    "croma_optical": (_croma_optical, "CROMA base, optical encoder (called by keyword)"),
    "croma_pair": (_torchgeo("croma_base", weights=None, modalities=["sar", "optical"]), "CROMA base, both encoders"),
    "copernicusfm": (_copernicusfm, "CopernicusFM base, spectral mode, in a wrapper holding its wavelengths"),
}


def _tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor of an output, in order (a list of block outputs: each block's)."""
    if isinstance(out, torch.Tensor):
        return [out]
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else []
    return [t for v in values for t in _tensors(v)]


def _worst(a: Any, b: Any) -> float:
    """The largest relative difference between the tensors of two outputs of the same structure."""
    pairs = list(zip(_tensors(a), _tensors(b), strict=True))
    return max(rel_diff(x, y) for x, y in pairs)


def _inputs(wrapped: Any, model: nn.Module) -> dict[str, torch.Tensor]:
    from mmpeft.targeting.geo import input_shape
    from mmpeft.targeting.inputs import choose_size

    channels = int(wrapped.in_channels)
    size = choose_size(model, channels)
    g = torch.Generator().manual_seed(0)
    optical, sar = wrapped.modalities
    return {
        optical: torch.rand(input_shape(model, 2, channels, size), generator=g),
        sar: torch.rand(input_shape(model, 2, SAR_BANDS, size), generator=g),
    }


def _stems(channels: int, sar: str) -> dict[str, Any]:
    """SAR's 2 bands tile into an even channel count; into 3 (RGB) slots they need a stem."""
    return {} if channels % SAR_BANDS == 0 else {"stems": {sar: ("conv1x1", SAR_BANDS)}}


def _identity(wrapped: Any, x: dict[str, torch.Tensor]) -> float:
    """Each modality's output at init against the base model on that modality's stem output (a model
    with one patch embedding per modality, TerraMind: called with that modality alone, by its key)."""
    from mmpeft.model.geo_embeddings import embedding_holder

    own = embedding_holder(wrapped.base_model) is not None
    with torch.no_grad():
        out = wrapped(x)
        with wrapped.disable_adapters():
            ref = {m: wrapped.base_model({m: x[m]} if own else wrapped.stems[m](x[m])) for m in x}
    return max(_worst(out[m], ref[m]) for m in x)


def _alone(wrapped: Any, x: dict[str, torch.Tensor]) -> float:
    """After random trainables (the preset without mixing): the stacked batch vs each modality alone."""
    randomise_trainables(wrapped)
    with torch.no_grad():
        together = wrapped(x)
        return max(_worst(together[m], wrapped({m: x[m]})[m]) for m in x)


def _mmpeft_warnings(caught: list[Any]) -> list[str]:
    return sorted({type(w.message).__name__ for w in caught if "mmpeft" in type(w.message).__module__})


def _checked(row: dict[str, Any], spare: nn.Module, wrapped: Any) -> dict[str, Any]:
    from mmpeft import wrap_multimodal

    names = wrapped.modalities
    x = _inputs(wrapped, spare)
    stems = _stems(int(wrapped.in_channels), names[1])
    if stems:  # the wrap as first called cannot take 2 bands into 3 slots: the same wrap with a SAR stem
        torch.manual_seed(0)
        wrapped = wrap_multimodal(MODELS[row["model"]][0]().eval(), names, "lora", **stems)
        row["note"] = "SAR through stems={'sar': ('conv1x1', 2)} (2 bands do not tile into 3)"
    routes = getattr(wrapped, "_embedding_routes", {})
    if routes:
        row["note"] = "each through its own embedding: " + ", ".join(f"{m} -> {e}" for m, e in routes.items())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            row["identity"] = _identity(wrapped, x)
            row["stacked_vs_alone"] = _alone(wrap_multimodal(spare, names, preset="lora", **stems), x)
        except Exception as err:
            return {**row, "status": "fails at its forward", "reason": f"{type(err).__name__}: {err}"[:400]}
    row["warnings"] = sorted(set(row["warnings"]) | set(_mmpeft_warnings(caught)))
    row["status"] = "wraps" if row["identity"] <= 1e-4 and row["stacked_vs_alone"] <= 1e-4 else "wrong"
    return row


def survey(name: str) -> dict[str, Any]:
    from mmpeft import wrap_multimodal

    build, what = MODELS[name]
    row: dict[str, Any] = {"model": name, "what": what}
    t0 = time.perf_counter()
    try:
        torch.manual_seed(0)
        model = build().eval()
    except Exception as err:  # the registry's builder refused these arguments
        return {**row, "status": "build failed", "reason": f"{type(err).__name__}: {err}"[:300]}
    row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
    torch.manual_seed(0)
    spare = build().eval()  # a second copy for the preset without mixing (built again: not a deepcopy)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            wrapped = wrap_multimodal(model, NAMES.get(name, ("optical", "sar")), "lora")  # as first called: no hint
    except Exception as err:
        return {**row, "status": "refused", "reason": f"{type(err).__name__}: {err}"[:400]}
    row["warnings"], row["layers"] = _mmpeft_warnings(caught), len(list(wrapped.layers()))
    row = _checked(row, spare, wrapped)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | built | status | LoRA layers | identity at init | stacked vs alone | warnings / reason |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        nums = [f"{r[k]:.1e}" if k in r else "-" for k in ("identity", "stacked_vs_alone")]
        note = r.get("reason") or "; ".join([", ".join(r.get("warnings", [])), r.get("note", "")]).strip("; ")
        lines.append(
            f"| `{r['model']}` | {r['what']} | {r['status']} | {r.get('layers', '-')} | {nums[0]} | {nums[1]} | {note} |"
        )
    wraps = sum(r["status"] == "wraps" for r in rows)
    return "\n".join(lines) + f"\n\n{wraps} of {len(rows)} wrap as first called.\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "geo_models"))
    parser.add_argument("--update", action="store_true", help="replace only these models' rows of the --out JSON")
    args = parser.parse_args(argv)
    import terratorch  # noqa: F401  (sets the float32 matmul precision to "medium": set back below)

    torch.set_float32_matmul_precision("highest")
    rows = []
    for name in args.models:
        rows.append(survey(name))
        print(json.dumps(rows[-1]), flush=True)
    if args.update:  # the other rows as the last full run wrote them, in the table's order
        fresh = {r["model"]: r for r in rows}
        old = json.loads(Path(args.out + ".json").read_text())["rows"]
        rows = [fresh.pop(r["model"], r) for r in old] + list(fresh.values())
    meta = {"torch": torch.__version__, "terratorch": importlib.metadata.version("terratorch"), "device": "cpu"}
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    Path(args.out + ".md").write_text(_markdown(rows))
    print(_markdown(rows))


if __name__ == "__main__":
    main()
