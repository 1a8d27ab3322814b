"""The multimodal methods, in the shape of peft's tuners: per method its config and its layer
(``lora/``, ``adapter/``), one registry (:data:`METHODS`) and one layer contract (:mod:`.base`,
merging in :mod:`.merging`), with the layers' maths beside them: fusion rules (:mod:`.fusion`),
the fused low-rank products (:mod:`.lowrank`), tuple outputs (:mod:`.outputs`) and the lockstep
reference's layer state (:mod:`.lockstep`).

May import: :mod:`mmpeft.utils` only."""

from .adapter import ACTIVATIONS, AdapterConfig, MultimodalAdapter
from .base import (
    Execution,
    MergeError,
    MultimodalLayer,
    by_modality,
    multimodal_layers,
    only_modality,
    present_modalities,
    set_execution,
)
from .lora import LoRAConfig, MultimodalLoRA, MultimodalLoRAConv2d
from .registry import METHODS, Method, get_method, method_of, register_method

__all__ = [
    "ACTIVATIONS",
    "AdapterConfig",
    "Execution",
    "LoRAConfig",
    "METHODS",
    "MergeError",
    "Method",
    "MultimodalAdapter",
    "MultimodalLayer",
    "MultimodalLoRA",
    "MultimodalLoRAConv2d",
    "by_modality",
    "get_method",
    "method_of",
    "multimodal_layers",
    "only_modality",
    "present_modalities",
    "register_method",
    "set_execution",
]
