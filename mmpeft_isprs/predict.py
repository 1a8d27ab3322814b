"""Run a trained MFNet on tiles of any size and write index and colour maps.

Inputs are the files or folders of each modality (``--optical``, ``--dsm``, ``--input NAME=DIR``),
paired by name or tile id; outputs per tile (named by the first modality's file):

- ``<stem>_pred.png``: the class index map (uint8; 0..K-1), or ``<stem>_pred.tif`` when the
  optical input is a GeoTIFF (written on the same grid: georeferencing tags copied);
- ``<stem>_colour.png``: the prediction drawn with the data set's palette (ISPRS colours for
  ISPRS models), plus ``<stem>_colour.tif`` (georeferenced) for GeoTIFF inputs.

The optical image is scaled by its dtype's maximum (uint8 / 255) and the DSM min-max scaled per
tile, as in training (the DSM rule stored with the weights is used). The model is the one
recorded in the weights; ``--checkpoint`` is needed only when its SAM file moved. Optical and
DSM files pair by name or tile id (zero padding ignored); an unpaired file is named.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError, ExperimentConfig
from .data import (
    ISPRS,
    MMHUNAN,
    DatasetInfo,
    ModalitySpec,
    check_sizes,
    is_geotiff,
    modality_tensor,
    pair_modalities,
    read_image,
    write_prediction,
)
from .data.patterns import tile_key_of_name
from .datamodule import dsm_rule, modality_specs
from .inference import model_fn, sliding_window_predict
from .model import MFNet
from .model.fingerprint import describe_load_report, encoder_record
from .task import load_trained

__all__ = ["predict_files", "PredictOptions", "dataset_info"]


def dataset_info(model: MFNet, experiment: ExperimentConfig | None) -> DatasetInfo:
    """Class names and palette of the model's data set (ISPRS, or MMHunan for 7 classes)."""
    if experiment is not None and (
        experiment.data.dataset == "mmhunan" or experiment.data.generic.classes == "mmhunan"
    ):
        return MMHUNAN
    return MMHUNAN if model.config.num_classes == 7 else ISPRS


@dataclass
class PredictOptions:
    """Sliding-window settings of ``predict`` (see :class:`~mmpeft_isprs.config.EvalConfig`)."""

    stride: int = 128
    batch_size: int = 8
    mode: str = "average"
    tta_flip: bool = False
    amp: str = "none"
    bands: tuple[int, ...] | None = None
    progress: bool = False
    checkpoint: str | None = None
    cog: bool = False


def predict_files(
    weights: str | Path,
    optical: Sequence[str | Path],
    dsm: Sequence[str | Path],
    out_dir: str | Path,
    options: PredictOptions | None = None,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] = print,
    inputs: Mapping[str, Sequence[str | Path]] | None = None,
) -> list[Path]:
    """Predict every tile and write its maps into ``out_dir``; returns the files.

    ``optical`` and ``dsm`` are the files or folders of the modalities of these names (else the
    model's first and second);
    ``inputs`` gives any modality's by name (``{"nir": ["4_Ortho_RGBIR/"]}``). A modality read
    from the same source as a given one (Potsdam's near-infrared band of the RGBIR tiles) reuses
    its files when not given. Files pair by tile (:func:`~mmpeft_isprs.data.pair_modalities`).
    """
    opts = options or PredictOptions()
    device = torch.device(device)
    model, experiment = load_trained(weights, device, checkpoint=opts.checkpoint, key="--checkpoint", log=log)
    encoder = encoder_record(model)
    log(describe_load_report(encoder["report"], encoder["sha256"]))
    specs = _specs(model, experiment, opts.bands)
    sources, flags = _sources(model, specs, optical, dsm, inputs or {})
    info, size = dataset_info(model, experiment), model.config.size[0]
    rule = dsm_rule(experiment.data if experiment is not None else None)
    run = model_fn(model, device, opts.amp)
    written: list[Path] = []
    first = model.modalities[0]
    for files in pair_modalities(sources, flags):
        raws = {path: read_image(path) for path in dict.fromkeys(files[m] for m in model.modalities)}  # each file once
        tensors = {
            m: modality_tensor(files[m], specs[m], rule, _channels(model, m), raws[files[m]]) for m in model.modalities
        }
        check_sizes(tile_key_of_name(files[first].stem), [(files[m], tensors[m]) for m in model.modalities])
        scores = sliding_window_predict(
            run,
            tensors,
            model.config.num_classes,
            window=size,
            stride=min(opts.stride, size),
            batch_size=opts.batch_size,
            mode=opts.mode,
            tta_flip=opts.tta_flip,
            device=device,  # type: ignore[arg-type]
            progress=opts.progress,
        )
        pred = scores.argmax(0).numpy()
        geo = files[first] if is_geotiff(files[first]) else None
        written += write_prediction(pred, out_dir, files[first].stem, info, georef_from=geo, cog=opts.cog)
        log(f"{files[first].name}: {pred.shape[0]}x{pred.shape[1]} -> {written[-1].parent}")
    return written


def _channels(model: MFNet, modality: str) -> int | None:
    """The band count the model's stem of ``modality`` takes (declared or recorded in training;
    for the first modality 3 when none is known, the optical image), or None (any)."""
    stem = model.encoder.stems[modality] if modality in model.encoder.stems else None
    known = stem.in_channels if stem is not None else None
    return known if known is not None else (3 if modality == model.modalities[0] else None)


def _specs(model: MFNet, experiment: ExperimentConfig | None, bands: tuple[int, ...] | None) -> dict[str, ModalitySpec]:
    """How each of the model's modalities is read: as in its experiment's data section (the
    first one's bands replaced by ``--bands``); without one, the first as an image, the others
    as elevation."""
    known = modality_specs(experiment.data) if experiment is not None else {}
    first = model.modalities[0]
    specs = {m: known.get(m) or ModalitySpec(m, "image" if m == first else "elevation") for m in model.modalities}
    if bands is not None:
        specs[first] = dataclasses.replace(specs[first], bands=tuple(bands))
    return specs


def _sources(
    model: MFNet,
    specs: Mapping[str, ModalitySpec],
    optical: Sequence[str | Path],
    dsm: Sequence[str | Path],
    inputs: Mapping[str, Sequence[str | Path]],
) -> tuple[dict[str, Sequence[str | Path]], dict[str, str]]:
    """The files of every modality of the model, in its order, and the flag that gave them."""
    mods = list(model.modalities)
    unknown = sorted(set(inputs) - set(mods))
    if unknown:
        raise ConfigError(f"--input: this model has no modality {unknown}; it uses {mods}")
    first = "optical" if "optical" in mods else mods[0]  # --optical / --dsm: these names, else the first / second
    second = "dsm" if "dsm" in mods else mods[min(1, len(mods) - 1)]
    given: dict[str, Sequence[str | Path]] = {first: optical} if optical else {}
    flags = {first: "--optical"}
    if dsm and len(mods) == 1 and second != "dsm":
        raise ConfigError(f"--dsm: this model has no dsm modality; it uses {mods}")
    for m, files, flag in ([(second, dsm, "--dsm")] if dsm else []) + [
        (m, f, f"--input {m}=") for m, f in inputs.items()
    ]:
        if m in given:
            raise ConfigError(f"modality {m!r} is given twice, by {flags[m]} and {flag}: give it once")
        given[m] = files
        flags.setdefault(m, flag)
    sources: dict[str, Sequence[str | Path]] = {}
    for m in mods:
        if m not in given:
            same = next((g for g in given if specs[g].role == specs[m].role), None)
            if same is None:
                hint = "give --dsm as well" if m == second and not inputs else f"give --input {m}=FILE|DIR"
                raise ConfigError(f"this model uses {mods}: {hint}")
            given[m] = given[same]
            flags.setdefault(m, flags.get(same, f"--input {same}="))
        sources[m] = given[m]
        flags.setdefault(m, f"--input {m}=")
    return sources, flags
