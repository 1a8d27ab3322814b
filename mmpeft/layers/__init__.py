"""Multimodal wrapper layers."""
from .adapter import ACTIVATIONS, MultimodalAdapter
from .base import Execution, MultimodalLayer, multimodal_layers, only_modality, present_modalities, set_execution
from .lora import MultimodalLoRA

__all__ = [
    "ACTIVATIONS",
    "Execution",
    "MultimodalAdapter",
    "MultimodalLayer",
    "MultimodalLoRA",
    "multimodal_layers",
    "only_modality",
    "present_modalities",
    "set_execution",
]
