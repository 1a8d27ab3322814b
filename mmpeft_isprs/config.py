"""Experiment configuration: data, model, training and evaluation, read from YAML.

An experiment is one YAML file with four sections (``data``, ``model``, ``train``, ``eval``)
plus a ``name``. Any field can be changed on the command line with a dotted override whose
value is parsed as YAML::

    mmpeft-isprs train vaihingen_mmadapter_vit_b data.root=/data/vaihingen train.lr=0.005 \\
        model.modalities=[optical] eval.tta_flip=true

Keys that do not exist are errors that name the key and the closest known keys (a typo never
silently trains the default). Values are checked against the field types. Every field has a
default, so a YAML file only needs what differs; ``ExperimentConfig.to_dict()`` gives the full,
resolved configuration (it is written into every run folder and checkpoint).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, Union

import yaml

from .model import MFNET_PRESETS, MFNetConfig

__all__ = [
    "ConfigError", "DataConfig", "SyntheticConfig", "GenericConfig", "TrainConfig", "EvalConfig",
    "ExperimentConfig", "load_config", "parse_overrides", "apply_overrides", "config_from_dict",
    "bundled_configs", "resolve_config_path", "CONFIG_DIR", "yaml_load",
]  # fmt: skip

CONFIG_DIR = Path(__file__).parent / "configs"
"""Folder of the bundled YAML files (the paper's runs, ``demo``, ``synthetic``)."""

DATASETS = ("vaihingen", "potsdam", "mmhunan", "generic", "synthetic")


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key at fault."""


# --------------------------------------------------------------------------- sections
@dataclass
class SyntheticConfig:
    """The synthetic Vaihingen-layout data set (``data.dataset: synthetic``), generated if missing.

    Attributes:
        num_tiles: tiles to generate, 3..19 (19 = 12 train, 3 val, 4 test, the paper's ids).
        tile_size: side of each tile in pixels.
        seed: scene seed.
    """

    num_tiles: int = 19
    tile_size: int = 512
    seed: int = 0


@dataclass
class GenericConfig:
    """Your own tiles (``data.dataset: generic``): one folder per modality plus labels.

    Attributes:
        modalities: modality name -> ``"image"`` (scaled by dtype max) or ``"elevation"``
            (DSM scaling); read from ``root/<name>/<stem>.<ext>`` unless ``folders`` says otherwise.
        folders: modality name -> folder name, where they differ.
        label_dir: folder of the labels.
        eval_label_dir: folder of eroded labels used for scoring (null: ``label_dir``).
        label_format: ``"index"`` (class indices) or ``"colour"`` (palette colours).
        classes: ``"isprs"`` (6 classes) or ``"mmhunan"`` (7 classes): names, palette, means.
    """

    modalities: dict[str, str] = field(default_factory=lambda: {"optical": "image", "dsm": "elevation"})
    folders: dict[str, str] = field(default_factory=dict)
    label_dir: str = "labels"
    eval_label_dir: str | None = None
    label_format: Literal["index", "colour"] = "index"
    classes: Literal["isprs", "mmhunan"] = "isprs"


@dataclass
class DataConfig:
    """Where the tiles are and how they are split, scaled and cropped.

    Attributes:
        dataset: ``vaihingen``, ``potsdam``, ``mmhunan``, ``generic`` or ``synthetic``.
        root: data folder (layouts in docs/isprs.md).
        split: ``"paper"`` (the published runs' tiles) or ``"official"`` (ISPRS benchmark split).
        val_ids: tiles used for model selection (taken out of training; test tiles are an error).
        val_fraction: instead of ``val_ids``, hold out this fraction of the training tiles.
        val_seed: seed of the ``val_fraction`` draw.
        dsm_scaling: ``"tile"`` (per-tile min-max to [0, 1], the paper), ``"global"``
            (fixed ``dsm_min``/``dsm_max``) or ``"none"``.
        dsm_min, dsm_max: bounds for ``dsm_scaling: global``.
        dsm_nodata: DSM value meaning "no data" (NaN is always no data).
        dsm_fill: ``"min"`` (fill no-data with the tile minimum) or ``"raise"``.
        potsdam_bands: ``"rgb"`` (the paper) or ``"irrg"`` from Potsdam's RGBIR tiles.
        crop_size: training crop side; null = ``model.img_size`` (they must be equal).
        tile_weights: ``"uniform"`` (every tile equally likely, the authors) or ``"area"``.
        cache: keep decoded tiles in memory (false: read windows from disk).
        synthetic: options of the synthetic data set.
        generic: options of the generic layout.
    """

    dataset: Literal["vaihingen", "potsdam", "mmhunan", "generic", "synthetic"] = "vaihingen"
    root: str = "data/vaihingen"
    split: Literal["paper", "official"] = "paper"
    val_ids: list[str] = field(default_factory=list)
    val_fraction: float = 0.0
    val_seed: int = 0
    dsm_scaling: Literal["tile", "global", "none"] = "tile"
    dsm_min: float | None = None
    dsm_max: float | None = None
    dsm_nodata: float | None = None
    dsm_fill: Literal["min", "raise"] = "min"
    potsdam_bands: Literal["rgb", "irrg"] = "rgb"
    crop_size: int | None = None
    tile_weights: Literal["uniform", "area"] = "uniform"
    cache: bool = True
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    generic: GenericConfig = field(default_factory=GenericConfig)


@dataclass
class TrainConfig:
    """Optimisation, schedule, checkpoints and logging (defaults = the published runs).

    Attributes:
        run_dir: folder of this run (config, logs, ``last.pt``, ``best.safetensors``).
        epochs: number of epochs (50).
        batches_per_epoch: optimiser steps per epoch (1000).
        batch_size: images per step over all processes (10; 4 for vit_h); divided among ranks.
        optimizer: ``"sgd"`` (the paper) or ``"adamw"``.
        lr, momentum, weight_decay: SGD 0.01 / 0.9 / 5e-4 on every trainable tensor.
        milestones, gamma: LR x ``gamma`` at these epochs (25, 35, 45; 0.1).
        seed: seeds the model init, the crops (with epoch and index) and dropout.
        num_workers: DataLoader worker processes per rank.
        amp: mixed precision: ``"none"``, ``"bf16"`` (CPU or GPU) or ``"fp16"`` (GPU, GradScaler).
        grad_checkpointing: recompute encoder blocks in backward (sets ``model.grad_checkpointing``).
        flips: random horizontal and vertical flips (the authors).
        rotations: also random 90-degree rotations (the paper's text; not the authors' code).
        checkpoint_every: also write ``last.pt`` every N steps (0: at epoch ends only).
        val_every: validate every N epochs (and always after the last one).
        resume: continue from ``run_dir/last.pt`` (what ``--resume`` sets).
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``.
        threads: torch CPU threads per process (0: torch's default, divided among local ranks).
        tensorboard: also log to TensorBoard when it is installed.
        progress: show a progress bar (rank 0).
    """

    run_dir: str = "runs/default"
    epochs: int = 50
    batches_per_epoch: int = 1000
    batch_size: int = 10
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: list[int] = field(default_factory=lambda: [25, 35, 45])
    gamma: float = 0.1
    seed: int = 0
    num_workers: int = 2
    amp: Literal["none", "bf16", "fp16"] = "none"
    grad_checkpointing: bool = False
    flips: bool = True
    rotations: bool = False
    checkpoint_every: int = 0
    val_every: int = 1
    resume: bool = False
    device: str = "auto"
    threads: int = 0
    tensorboard: bool = True
    progress: bool = True


@dataclass
class EvalConfig:
    """Sliding-window evaluation of whole tiles.

    Attributes:
        window: window side; null = ``model.img_size`` (they must be equal).
        stride: step between windows (32 in the paper; 128 runs 16x fewer windows).
        val_stride: stride of the per-epoch validation during training.
        mode: ``"average"`` (mean softmax) or ``"logit_sum"`` (the authors' sum of logits).
        tta_flip: average over flipped windows as well (4x the cost).
        batch_size: windows per forward pass.
        split: tiles to score (``test``; ``val`` or ``train`` also work).
        labels: ``"eroded"`` (ISPRS protocol: boundaries ignored) or ``"full"``.
        save_predictions: write index and colour maps of every tile (``eval`` command).
        amp: autocast during evaluation (``none``, ``bf16``, ``fp16``).
    """

    window: int | None = None
    stride: int = 128
    val_stride: int = 128
    mode: Literal["average", "logit_sum"] = "average"
    tta_flip: bool = False
    batch_size: int = 8
    split: str = "test"
    labels: Literal["eroded", "full"] = "eroded"
    save_predictions: bool = False
    amp: Literal["none", "bf16", "fp16"] = "none"


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

    @property
    def window(self) -> int:
        """The evaluation window side (= ``model.img_size``)."""
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
        raise ConfigError(f"model_preset: unknown {cfg.model_preset!r}" + (f"; did you mean {', '.join(close)}?" if close else "")
                          + f" (known: {', '.join(MFNET_PRESETS)})")  # fmt: skip
    h, w = m.size
    _need(h == w, "model.img_size", f"training crops are square; got {h}x{w}")
    fix = f"must equal model.img_size ({h}); the MFNet is built for one input size, set model.img_size instead"
    _need(d.crop_size is None or d.crop_size == h, "data.crop_size", fix)
    _need(e.window is None or e.window == h, "eval.window", fix)
    _need(not (d.val_ids and d.val_fraction), "data.val_ids", "give val_ids or val_fraction, not both")
    _need(0.0 <= d.val_fraction < 1.0, "data.val_fraction", f"must be in [0, 1), got {d.val_fraction}")
    if d.dsm_scaling == "global":
        _need(d.dsm_min is not None and d.dsm_max is not None, "data.dsm_min", "dsm_scaling: global needs dsm_min and dsm_max")
    for key, value in (("train.epochs", t.epochs), ("train.batches_per_epoch", t.batches_per_epoch),
                       ("train.batch_size", t.batch_size), ("train.val_every", t.val_every),
                       ("eval.batch_size", e.batch_size)):  # fmt: skip
        _need(value >= 1, key, f"must be >= 1, got {value}")
    _need(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _need(t.num_workers >= 0 and t.checkpoint_every >= 0 and t.threads >= 0, "train",
          "num_workers, checkpoint_every and threads must be >= 0")  # fmt: skip
    _need(list(t.milestones) == sorted(t.milestones), "train.milestones", f"must increase, got {t.milestones}")
    _need(t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:"), "train.device",
          f"must be auto, cpu or cuda[:N], got {t.device!r}")  # fmt: skip
    _need(1 <= e.stride <= h and 1 <= e.val_stride <= h, "eval.stride",
          f"stride and val_stride must be in 1..window ({h}), got {e.stride} and {e.val_stride}")  # fmt: skip
    classes = 7 if d.dataset == "mmhunan" or (d.dataset == "generic" and d.generic.classes == "mmhunan") else 6
    _need(m.num_classes == classes, "model.num_classes",
          f"{d.dataset} has {classes} classes, the model {m.num_classes}")  # fmt: skip
    if d.dataset == "generic":
        known = set(d.generic.modalities)
        bad = [x for x in m.modalities if x not in known]
        _need(not bad, "model.modalities", f"{bad} not among data.generic.modalities {sorted(known)}")
        kinds = set(d.generic.modalities.values()) - {"image", "elevation"}
        _need(not kinds, "data.generic.modalities", f"kinds must be image or elevation, got {sorted(kinds)}")
    else:
        bad = [x for x in m.modalities if x not in ("optical", "dsm")]
        _need(not bad, "model.modalities", f"{d.dataset} provides optical and dsm, not {bad}")


# --------------------------------------------------------------------------- typed conversion
def _unknown_key(key: str, known: Sequence[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key.split(".")[-1], list(known), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(_join(where, c)) for c in close)}?" if close else ""
    return ConfigError(f"unknown config key {_join(where, key)!r}{hint} (known in {where or 'top level'}: {', '.join(known)})")


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints accepted as floats, dataclasses from dicts)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(o) for o in options)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp) or (str, Any)
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    return _scalar(value, tp, key)


def _scalar(value: Any, tp: Any, key: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)  # tile ids such as 1 or 2_10 may be read as numbers
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _build(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """Instantiate dataclass ``cls`` from ``values``; unknown keys and bad types are errors."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise _unknown_key(str(key), names, where)
        kwargs[key] = _coerce(value, hints[key], _join(where, key))
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from None


def config_from_dict(values: Mapping[str, Any]) -> ExperimentConfig:
    """Build and validate an :class:`ExperimentConfig` from a (possibly partial) nested dict."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"a config must be a mapping of sections, got {type(values).__name__}")
    return _build(ExperimentConfig, values, "")


# --------------------------------------------------------------------------- overrides and files
class _Loader(yaml.SafeLoader):
    """YAML without the YAML 1.1 number traps: ``2_10`` (a Potsdam tile id) stays a string
    instead of the integer 210, ``010`` is not octal, and ``5e-4`` is a float."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?(0|[1-9][0-9]*)$"), list("-+0123456789"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+\.[0-9]*|[0-9]+(?:\.[0-9]*)?[eE][-+]?[0-9]+)|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    """Parse YAML text as config files and overrides are parsed (see :class:`_Loader`)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def parse_overrides(items: Sequence[str]) -> list[tuple[str, Any]]:
    """``["train.lr=0.005", "model.modalities=[optical]"]`` -> ``[(dotted key, YAML value)]``."""
    out = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip() or key != key.strip():
            raise ConfigError(f"override {item!r} is not of the form key.sub=value (e.g. train.lr=0.005)")
        try:
            value = yaml_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from None
        out.append((key, value))
    return out


def apply_overrides(values: dict[str, Any], overrides: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (in place; returns it). Keys are checked against the schema."""
    for key, value in overrides:
        parts = key.split(".")
        cls: Any = ExperimentConfig
        node = values
        for depth, part in enumerate(parts):
            names = [f.name for f in dataclasses.fields(cls)]
            if part not in names:
                raise _unknown_key(part, names, ".".join(parts[:depth]))
            hint = typing.get_type_hints(cls)[part]
            if depth == len(parts) - 1:
                node[part] = value
            elif dataclasses.is_dataclass(hint):
                child = node.get(part)
                node[part] = child = dict(child) if isinstance(child, Mapping) else {}
                node, cls = child, hint
            else:  # a dict-valued field: the rest of the key is one entry (model.stems.dsm)
                if typing.get_origin(hint) not in (dict, Mapping):
                    raise ConfigError(f"override {key!r}: {'.'.join(parts[: depth + 1])} is not a section")
                child = node.get(part)
                node[part] = child = dict(child) if isinstance(child, Mapping) else {}
                child[".".join(parts[depth + 1 :])] = value
                break
    return values


def bundled_configs() -> list[str]:
    """Names of the YAML files shipped in ``mmpeft_isprs/configs`` (without ``.yaml``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A YAML path, or the name of a bundled config (``vaihingen_mmadapter_vit_b``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = CONFIG_DIR / f"{path.name}{'' if path.suffix in ('.yaml', '.yml') else '.yaml'}"
    if path.parent == Path(".") and bundled.is_file():
        return bundled
    close = difflib.get_close_matches(path.stem, bundled_configs(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else " (mmpeft-isprs list-configs shows the bundled ones)"
    raise ConfigError(f"config file {str(name_or_path)!r} not found{hint}")


def load_config(source: str | Path | Mapping[str, Any], overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a YAML file (or a bundled config name, or a dict), apply dotted overrides, validate.

    Raises:
        ConfigError: missing file, invalid YAML, unknown key (with close matches), wrong type,
            inconsistent values.
    """
    if isinstance(source, Mapping):
        values: Any = dict(source)
    else:
        path = resolve_config_path(source)
        try:
            values = yaml_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from None
        if not isinstance(values, Mapping):
            raise ConfigError(f"{path}: expected a mapping of sections (data, model, train, eval)")
    values = _deep_copy(values)
    parsed = parse_overrides(overrides)
    apply_overrides(values, parsed)
    preset = values.get("model_preset")
    if isinstance(preset, str) and preset in MFNET_PRESETS:
        model = values.get("model") if isinstance(values.get("model"), Mapping) else {}
        values["model"] = {**model, **_deep_copy(MFNET_PRESETS[preset])}  # type: ignore[dict-item]
        apply_overrides(values, [(k, v) for k, v in parsed if k.startswith("model.")])
    return config_from_dict(values)


def _deep_copy(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in values.items()}
