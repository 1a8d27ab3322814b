"""The experiment: ``name``, ``model_preset`` and the four sections, validated across fields."""

from __future__ import annotations

import copy
import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..model import MFNET_PRESETS, MFNetConfig
from .checks import check_files, check_fills, check_stems
from .data import DataConfig, provided_modalities
from .evaluation import EvalConfig
from .schema import ConfigError, build_dataclass
from .train import TrainConfig

__all__ = ["ExperimentConfig", "validate", "config_from_dict", "upgrade_stored"]


@dataclass
class ExperimentConfig:
    """One experiment: ``name`` plus the ``data``, ``model``, ``train`` and ``eval`` sections.

    ``model_preset`` names an entry of :data:`~mmpeft_isprs.model.MFNET_PRESETS` (a row of the
    paper's Tables IV/V, or ``authors_mmadapter``/``authors_mmlora``). :func:`load_config`
    applies it on top of the file's ``model`` section; ``model.*`` overrides on the command
    line still win. Here it is only recorded (``model`` already holds the merged values).
    """

    name: str = "experiment"
    model_preset: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: MFNetConfig = field(default_factory=MFNetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        validate(self)

    @property
    def crop_size(self) -> int:
        """The training crop side (= ``model.img_size``)."""
        return self.model.size[0]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML/JSON-serialisable) of every field."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The resolved configuration as YAML text."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------- validation
def _need(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")


def validate(cfg: ExperimentConfig) -> None:
    """Cross-field checks; raise :class:`ConfigError` naming the key."""
    d, t, e, m = cfg.data, cfg.train, cfg.eval, cfg.model
    if cfg.model_preset is not None and cfg.model_preset not in MFNET_PRESETS:
        close = difflib.get_close_matches(cfg.model_preset, list(MFNET_PRESETS), n=3, cutoff=0.5)
        raise ConfigError(
            f"model_preset: unknown {cfg.model_preset!r}"
            + (f"; did you mean {', '.join(close)}?" if close else "")
            + f" (known: {', '.join(MFNET_PRESETS)})"
        )
    h, w = m.size
    _need(h == w, "model.img_size", f"training crops are square; got {h}x{w}")
    _need(not (d.val_ids and d.val_fraction), "data.val_ids", "give val_ids or val_fraction, not both")
    _need(0.0 <= d.val_fraction < 1.0, "data.val_fraction", f"must be in [0, 1), got {d.val_fraction}")
    if d.dsm_scaling == "global":
        _need(
            d.dsm_min is not None and d.dsm_max is not None,
            "data.dsm_min",
            "dsm_scaling: global needs dsm_min and dsm_max",
        )
    for key, value in (
        ("train.epochs", t.epochs),
        ("train.batches_per_epoch", t.batches_per_epoch),
        ("train.batch_size", t.batch_size),
        ("train.val_every", t.val_every),
        ("eval.batch_size", e.batch_size),
    ):
        _need(value >= 1, key, f"must be >= 1, got {value}")
    _need(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _need(
        t.num_workers >= 0 and t.checkpoint_every >= 0 and t.threads >= 0,
        "train",
        "num_workers, checkpoint_every and threads must be >= 0",
    )
    _need(list(t.milestones) == sorted(t.milestones), "train.milestones", f"must increase, got {t.milestones}")
    _need(
        t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:"),
        "train.device",
        f"must be auto, cpu or cuda[:N], got {t.device!r}",
    )
    _need(
        1 <= e.stride <= h and 1 <= e.val_stride <= h,
        "eval.stride",
        f"stride and val_stride must be in 1..window ({h}), got {e.stride} and {e.val_stride}",
    )
    classes = 7 if d.dataset == "mmhunan" or (d.dataset == "generic" and d.generic.classes == "mmhunan") else 6
    _need(
        m.num_classes == classes, "model.num_classes", f"{d.dataset} has {classes} classes, the model {m.num_classes}"
    )
    if d.dataset == "generic":
        kinds = set(d.generic.modalities.values()) - {"image", "elevation"}
        _need(not kinds, "data.generic.modalities", f"kinds must be image or elevation, got {sorted(kinds)}")
    known = provided_modalities(d)
    bad = [x for x in m.modalities if x not in known]
    where = "data.generic.modalities" if d.dataset == "generic" else "its optical and dsm"
    _need(
        not bad,
        "model.modalities",
        f"{d.dataset} provides {known} ({where} and data.modalities), not {bad}; "
        "add a modality with data.modalities.<name>={source: ..., bands: [...]} or a raster of its own with "
        "data.files.<name>=<pattern with {id}>",
    )
    check_files(d, m)
    check_fills(d)
    check_stems(d, m)


def config_from_dict(values: Mapping[str, Any]) -> ExperimentConfig:
    """Build and validate an :class:`ExperimentConfig` from a (possibly partial) nested dict."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"a config must be a mapping of sections, got {type(values).__name__}")
    return build_dataclass(ExperimentConfig, values, "")


def upgrade_stored(values: Mapping[str, Any]) -> dict[str, Any]:
    """A resolved config written by an earlier version (``last.pt``, weights metadata) in today's schema.

    ``data.crop_size`` and ``eval.window`` could only equal ``model.img_size`` and are dropped;
    ``train.grad_checkpointing`` was OR-ed into ``model.grad_checkpointing`` and moves there.
    Files people write get an error for these keys instead (:data:`~.schema.REMOVED_KEYS`).
    """
    out = copy.deepcopy(dict(values))
    out.get("data", {}).pop("crop_size", None)
    out.get("eval", {}).pop("window", None)
    if out.get("train", {}).pop("grad_checkpointing", False):
        out.setdefault("model", {})["grad_checkpointing"] = True
    return out
