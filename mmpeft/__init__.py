"""mmpeft: parameter-efficient multimodal fine-tuning of frozen vision transformers.

The modality axis rides in the batch: a wrapped model runs its frozen weights once over all
modalities stacked as ``(M*B, ...)`` and learns only small per-modality LoRA / adapter modules
whose updates are mixed across modalities by a fusion rule.
"""

__version__ = "0.1.0"

from .config import AdapterConfig, LoRAConfig, MultimodalConfig, StemConfig  # noqa: E402
from .fusion import FUSION_RULES, Fusion, build_fusion, register_fusion  # noqa: E402
from .io import load_multimodal, save_multimodal  # noqa: E402
from .layers import MultimodalAdapter, MultimodalLayer, MultimodalLoRA, only_modality, set_execution  # noqa: E402
from .params import ParamReport, count_parameters, trainable_summary  # noqa: E402
from .targets import FAMILIES, PRESETS, detect_family, match_targets  # noqa: E402
from .wrap import MultimodalModel, build_config, wrap_multimodal  # noqa: E402

__all__ = [
    "AdapterConfig",
    "FAMILIES",
    "FUSION_RULES",
    "Fusion",
    "LoRAConfig",
    "MultimodalAdapter",
    "MultimodalConfig",
    "MultimodalLayer",
    "MultimodalLoRA",
    "MultimodalModel",
    "PRESETS",
    "ParamReport",
    "StemConfig",
    "build_config",
    "build_fusion",
    "count_parameters",
    "detect_family",
    "load_multimodal",
    "match_targets",
    "only_modality",
    "register_fusion",
    "save_multimodal",
    "set_execution",
    "trainable_summary",
    "wrap_multimodal",
]
