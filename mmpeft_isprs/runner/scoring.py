"""Scoring trained weights on a split of an experiment's data, with the results as files: the one
evaluation path of ``mmpeft-isprs eval`` (``--subsets`` included) and of the demo."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..config import ConfigError, ExperimentConfig
from ..data import TileSet, read_image
from ..datamodule import ISPRSDataModule
from ..distributed import DistInfo, barrier
from ..model import MFNet, MFNetFile
from ..model.fingerprint import describe_load_report, load_report_dict, short_hash
from ..task import EncoderFile, EvalResult, encoder_file, load_trained, read_weights
from ..task.evaluation import eval_windows
from ..task.subsets import evaluate_subsets, modality_subsets
from .logs import TextLog
from .progress import EvalProgress
from .records import logged_warnings
from .subsets import report_subsets

__all__ = ["score_weights", "eval_folder", "check_eval_folder"]


def score_weights(
    cfg: ExperimentConfig,
    weights: str | Path | MFNetFile,
    *,
    subsets: bool = False,
    info: DistInfo | None = None,
    out_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
    notes: Sequence[str] = (),
) -> EvalResult:
    """Load ``weights``, score ``cfg.eval.split``, write ``metrics.json`` (rank 0).

    ``weights``: a path, or the file already read (:func:`~mmpeft_isprs.task.read_weights`): it is
    opened once. The model is the one stored in ``weights`` (its own MFNet config);
    ``model.checkpoint`` of ``cfg`` replaces the SAM path saved with it when set (e.g. the file
    moved). An encoder file whose SHA-256 is not the one recorded in the weights is a warning
    naming both hashes, and the evaluation gets a folder of its own (``..._encoder_<hash>``).
    ``subsets``: also score every non-empty subset of the model's modalities, print them
    side by side and write ``subsets.json`` (the result's ``subsets``). Progress lines (windows
    done / total, elapsed, ETA) go to ``log`` while it runs.
    Outputs in ``out_dir`` (default ``<run_dir>/`` :func:`eval_folder`, named by the protocol; a
    folder holding another protocol's evaluation is refused): ``metrics.json``, ``figures/`` and, with
    ``eval.save_predictions``, ``predictions/<tile>_pred.*`` and ``<tile>_colour.png``. Every line
    printed (``notes`` first, warnings included) is appended to ``eval.log`` beside the weights (the
    run folder, beside ``log.csv``), timestamped, once the evaluation starts.
    """
    info = info or DistInfo()
    stored = weights if isinstance(weights, MFNetFile) else read_weights(weights)
    encoder = encoder_file(stored, cfg.model.checkpoint)
    folder = eval_folder(cfg, stored.path, subsets) + (
        f"_encoder_{short_hash(encoder.sha256)}" if encoder.differs else ""
    )
    out = Path(out_dir) if out_dir is not None else Path(cfg.train.run_dir) / folder
    again = check_eval_folder(out, _protocol(cfg, str(stored.path), encoder.sha256))  # every rank, before any work
    text = TextLog(Path(stored.path).parent / "eval.log", log, hold=True) if info.is_main else None
    say = text if text is not None else log
    with logged_warnings(text.write_file if text is not None else _ignore):
        model, tiles = _open(cfg, stored, info, say, [f"== evaluation of {stored.path} into {out}", *notes], encoder)
        if text is not None:
            text.release()  # the evaluation starts: the lines held so far go to eval.log
            if again:
                _clear_earlier(out, say)
        return _score(cfg, model, tiles, (str(stored.path), encoder), out, subsets, info, say)


def _ignore(_: str) -> None:
    return None


def _open(
    cfg: ExperimentConfig,
    stored: MFNetFile,
    info: DistInfo,
    say: Callable[[str], None],
    notes: Sequence[str],
    encoder: EncoderFile,
) -> tuple[MFNet, TileSet]:
    """The model of ``stored`` and the tiles to score (everything that can fail, before any work)."""
    for note in notes if info.is_main else ():
        say(note)
    model, _ = load_trained(stored, info.device, checkpoint=cfg.model.checkpoint, log=say if info.is_main else None)
    if info.is_main:
        say(describe_load_report(load_report_dict(model.load_report), encoder.sha256))
        if list(model.modalities) != list(cfg.model.modalities):
            say(f"note: the weights use modalities {list(model.modalities)} (config: {cfg.model.modalities})")
    e = cfg.eval
    return model, ISPRSDataModule(cfg, info, say).tiles(e.split, labels=e.labels)


def _score(
    cfg: ExperimentConfig,
    model: MFNet,
    tiles: TileSet,
    source: tuple[str, EncoderFile],
    out: Path,
    subsets: bool,
    info: DistInfo,
    log: Callable[[str], None],
) -> EvalResult:
    """Score ``model`` on ``tiles`` (every modality subset with ``subsets``) and write the files (rank 0)."""
    e, (weights, encoder) = cfg.eval, source
    preds = out / "predictions" if e.save_predictions else None
    runs = modality_subsets(model.modalities) if subsets else [tuple(model.modalities)]
    progress = None
    if info.is_main:
        windows = eval_windows(tiles, model.config.size[0], e.stride) * len(runs)  # over all ranks
        own = eval_windows(tiles, model.config.size[0], e.stride, info) * len(runs)
        shared = f"; {info.world_size} processes, progress lines count rank 0's {own}" if info.world_size > 1 else ""
        log(
            f"{cfg.name}: scoring {e.split} split, {len(tiles)} tiles, {windows} windows"
            + (f" ({len(runs)} modality subsets)" if subsets else "")
            + shared
        )
        progress = EvalProgress(log, own, what="eval (rank 0)" if info.world_size > 1 else "eval")
    results = evaluate_subsets(
        model, tiles, cfg, info=info, subsets=runs, out_dir=preds, progress=progress, log=log if subsets else None
    )
    result = next(iter(results.values()))
    if info.is_main:
        _write_metrics(out, cfg, (weights, encoder.sha256), tiles, model.config.size[0], result, info, log)
        figures = draw_figures(out / "figures", tiles, preds, result, cfg.name, model.modalities)
        if figures:
            log(f"figures ({len(figures)}) in {out / 'figures'}: " + ", ".join(p.name for p in figures))
        if subsets:
            report_subsets(out, cfg, weights, len(tiles), results, log)
    barrier()
    if subsets:
        result.subsets = results
    return result


def eval_folder(cfg: ExperimentConfig, weights: str | Path, subsets: bool = False) -> str:
    """The folder of an evaluation in its run folder, named by its protocol, so that another
    protocol never replaces it: ``eval_<split>_stride<S>_<mode>_<labels>`` plus ``_tta``,
    ``_subsets`` and the weights' name when not ``best``."""
    e, stem = cfg.eval, Path(weights).name.split(".")[0]
    name = f"eval_{e.split}_stride{e.stride}_{e.mode}_{e.labels}" + ("_tta" if e.tta_flip else "")
    return name + ("_subsets" if subsets else "") + ("" if stem == "best" else f"_{stem}")


def _protocol(cfg: ExperimentConfig, weights: str, encoder: str | None = None) -> dict[str, object]:
    """What names an evaluation (the window is the weights' model's; ``encoder``: the encoder file's SHA-256)."""
    e = cfg.eval
    return {
        "split": e.split,
        "labels": e.labels,
        "stride": e.stride,
        "mode": e.mode,
        "tta_flip": e.tta_flip,
        "weights": weights,
        "encoder_sha256": encoder,
    }


def check_eval_folder(out: Path, protocol: dict[str, object]) -> bool:
    """Refuse to write into ``out`` when it holds the evaluation of another protocol or weights;
    True when it holds an earlier evaluation of the same protocol (to be replaced), else False."""
    path = out / "metrics.json"
    if not path.is_file():
        return False
    saved = json.loads(path.read_text())
    before = {**saved.get("protocol", {}), "weights": saved.get("weights")}
    # a key an older metrics.json lacks (encoder_sha256) is taken as the same
    changed = [f"{k} {before.get(k)!r} -> {v!r}" for k, v in protocol.items() if before.get(k, v) != v]
    if changed:
        raise ConfigError(
            f"{out} holds an evaluation of another protocol ({'; '.join(changed)}): give another --out "
            "(or leave it out: each protocol gets its own folder) or remove the folder"
        )
    return True


def _clear_earlier(out: Path, log: Callable[[str], None]) -> None:
    """Say that ``out``'s earlier evaluation of the same protocol is replaced, and remove its
    predictions, figures and subsets.json so that none of them outlives it (this run writes its own)."""
    log(f"note: {out} holds an earlier evaluation of the same protocol and weights; it is replaced")
    for sub in ("predictions", "figures"):
        if (out / sub).is_dir():
            shutil.rmtree(out / sub)
    (out / "subsets.json").unlink(missing_ok=True)


def _write_metrics(
    out: Path,
    cfg: ExperimentConfig,
    source: tuple[str, str | None],
    tiles: TileSet,
    window: int,
    result: EvalResult,
    info: DistInfo,
    log: Callable[[str], None],
) -> None:
    e, (weights, encoder) = cfg.eval, source
    protocol = {**_protocol(cfg, weights, encoder), "window": window, "tiles": tiles.ids, "world_size": info.world_size}
    protocol.pop("weights")
    payload = {
        "weights": weights,
        "encoder_sha256": encoder,
        "protocol": protocol,
        "seconds": result.seconds,
        **result.metrics,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(payload, indent=1))
    log(f"{cfg.name}: {e.split} split, {len(tiles)} tiles, stride {e.stride}, {e.labels} labels")
    log(result.table)
    log(f"metrics written to {out / 'metrics.json'}")


def draw_figures(
    out: Path,
    tiles: TileSet,
    preds: Path | None,
    result: EvalResult,
    name: str,
    modalities: Sequence[str] | None = None,
) -> list[Path]:
    """The confusion-matrix figure and, when predictions were written, one side-by-side figure per
    tile: the ``modalities`` the model takes (default: every modality of the tiles), in its order."""
    try:
        from .figures import confusion_figure, sample_panels, tile_figure
    except ImportError:  # matplotlib: pip install matplotlib (part of the isprs extra)
        return []
    info = tiles.layout.info
    paths = [
        confusion_figure(
            out / "confusion.png", result.confusion.mat.cpu().numpy(), info.class_names, f"{name}: confusion matrix"
        )
    ]
    for i, tile in enumerate(tiles.ids if preds is not None else []):
        stem = tile.replace("/", "_")
        pred_file = next(iter(sorted(preds.glob(f"{stem}_pred.*"))), None)  # type: ignore[union-attr]
        if pred_file is None:
            continue
        sample = tiles.load(i)
        elevation = [m.name for m in tiles.modalities if m.kind == "elevation"]
        paths.append(
            tile_figure(
                out / f"tile_{stem}.png",
                f"{name}: tile {tile}",
                sample_panels(sample, modalities or tiles.modality_names),
                None,
                np.asarray(sample[tiles.label_key]),
                read_image(pred_file),
                info,
                elevation,
            )
        )
    return paths
