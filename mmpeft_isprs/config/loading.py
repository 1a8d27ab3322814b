"""Config files and dotted command-line overrides (values parsed as YAML)."""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..model import MFNET_PRESETS
from .experiment import ExperimentConfig, config_from_dict
from .schema import ConfigError, unknown_key

__all__ = [
    "load_config",
    "parse_overrides",
    "apply_overrides",
    "bundled_configs",
    "resolve_config_path",
    "CONFIG_DIR",
    "yaml_load",
]

CONFIG_DIR = Path(__file__).parent.parent / "configs"
"""Folder of the bundled YAML files (the paper's runs, ``demo``, ``synthetic``)."""


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
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+\.[0-9]*|[0-9]+(?:\.[0-9]*)?[eE][-+]?[0-9]+)|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    """Parse YAML text as config files and overrides are parsed (see :class:`_Loader`)."""
    return yaml.load(text, Loader=_Loader)


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
                raise unknown_key(part, names, ".".join(parts[:depth]))
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
                rest = parts[depth + 1 :]
                entry_type = (typing.get_args(hint) or (str, Any))[-1]
                if len(rest) == 2 and dataclasses.is_dataclass(entry_type):  # data.modalities.nir.bands
                    entry = child.get(rest[0])
                    child[rest[0]] = entry = dict(entry) if isinstance(entry, Mapping) else {}
                    entry[rest[1]] = value
                else:
                    child[".".join(rest)] = value
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
    before = values.get("model", {}).get("backbone") if isinstance(values.get("model"), Mapping) else None
    apply_overrides(values, parsed)
    _rename_for_backbone(values, before, {k for k, _ in parsed})
    preset = values.get("model_preset")
    if isinstance(preset, str) and preset in MFNET_PRESETS:
        model = values.get("model") if isinstance(values.get("model"), Mapping) else {}
        values["model"] = {**model, **_deep_copy(MFNET_PRESETS[preset])}  # type: ignore[dict-item]
        apply_overrides(values, [(k, v) for k, v in parsed if k.startswith("model.")])
    return config_from_dict(values)


def _rename_for_backbone(values: dict[str, Any], before: Any, overridden: set[str]) -> None:
    """``model.backbone=`` on the command line renames a name and run folder that end with the file's
    backbone (``vaihingen_mmadapter_vit_b`` -> ``vaihingen_mmadapter_sam2_hiera_tiny``), unless they are
    given too: the header and the run folder say which encoder ran, and two backbones never share a folder."""
    model = values.get("model")
    after = model.get("backbone") if isinstance(model, Mapping) else None
    if (
        "model.backbone" not in overridden
        or not isinstance(before, str)
        or not isinstance(after, str)
        or before == after
    ):
        return
    suffix = f"_{before}"
    name = values.get("name")
    if "name" not in overridden and isinstance(name, str) and name.endswith(suffix):
        values["name"] = name[: -len(suffix)] + f"_{after}"
    train = values.get("train")
    run_dir = train.get("run_dir") if isinstance(train, Mapping) else None
    if "train.run_dir" not in overridden and isinstance(run_dir, str) and run_dir.endswith(suffix):
        values["train"] = {**train, "run_dir": run_dir[: -len(suffix)] + f"_{after}"}  # type: ignore[dict-item]


def _deep_copy(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in values.items()}
