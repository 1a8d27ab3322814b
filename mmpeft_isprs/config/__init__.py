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

Modules: :mod:`.data`, :mod:`.train`, :mod:`.evaluation` (one per section; ``model`` is
:class:`~mmpeft_isprs.model.MFNetConfig`), :mod:`.experiment` (the whole experiment and its
cross-field checks), :mod:`.schema` (typed conversion, unknown and removed keys),
:mod:`.loading` (files and overrides).
"""

from .data import DATASETS, DataConfig, GenericConfig, ModalityConfig, SyntheticConfig, provided_modalities
from .evaluation import EvalConfig
from .experiment import ExperimentConfig, config_from_dict, upgrade_stored, validate
from .loading import (
    CONFIG_DIR,
    apply_overrides,
    bundled_configs,
    load_config,
    parse_overrides,
    resolve_config_path,
    yaml_load,
)
from .schema import REMOVED_KEYS, ConfigError
from .train import TrainConfig

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModalityConfig",
    "provided_modalities",
    "SyntheticConfig",
    "GenericConfig",
    "TrainConfig",
    "EvalConfig",
    "ExperimentConfig",
    "load_config",
    "parse_overrides",
    "apply_overrides",
    "config_from_dict",
    "bundled_configs",
    "resolve_config_path",
    "CONFIG_DIR",
    "yaml_load",
    "validate",
    "DATASETS",
    "REMOVED_KEYS",
    "upgrade_stored",
]
