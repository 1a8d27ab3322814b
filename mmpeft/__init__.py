"""mmpeft: parameter-efficient multimodal fine-tuning of frozen vision transformers.

The modality axis rides in the batch: a wrapped model runs its frozen weights once over all
modalities stacked as ``(M*B, ...)`` and learns only small per-modality LoRA / adapter modules
whose updates are mixed across modalities by a fusion rule.
"""

from ._version import __version__ as __version__
from .config import AdapterConfig, LoRAConfig, MultimodalConfig, StemConfig
from .errors import (
    MmpeftError,
    MmpeftFileNotFoundError,
    MmpeftKeyError,
    MmpeftStateError,
    MmpeftTypeError,
    MmpeftValueError,
    MmpeftWarning,
)
from .interop.lockstep_reference import reference_forward
from .interop.reference import per_modality_forward
from .model.geo import BandMeaningWarning, set_modality_arguments
from .model.geo_embeddings import set_modality_embeddings
from .model.multimodal import MultimodalModel
from .model.params import ParamReport, count_parameters, is_trainable_name, trainable_summary
from .model.wrap import build_config, load_multimodal, plan_targets, save_multimodal, wrap_multimodal
from .runtime.matmul import MatmulPrecisionWarning
from .runtime.presence import (
    NonFiniteInputError,
    Presence,
    check_finite,
    dropout_rates,
    modality_dropout,
    presence_tensor,
)
from .targeting.targets import FAMILIES, PRESETS, detect_family, match_targets, register_family
from .tuners import (
    METHODS,
    MergeError,
    Method,
    MultimodalAdapter,
    MultimodalLayer,
    MultimodalLoRA,
    MultimodalLoRAConv2d,
    only_modality,
    register_method,
    set_execution,
)
from .tuners.fusion import FUSION_RULES, Fusion, build_fusion, register_fusion
from .utils import atomic_write, resolve_dtype, state_mismatches

__all__ = [
    "MmpeftError",
    "MmpeftFileNotFoundError",
    "MmpeftKeyError",
    "MmpeftStateError",
    "MmpeftTypeError",
    "MmpeftValueError",
    "MmpeftWarning",
    "METHODS",
    "MergeError",
    "MatmulPrecisionWarning",
    "BandMeaningWarning",
    "set_modality_arguments",
    "set_modality_embeddings",
    "Method",
    "reference_forward",
    "register_method",
    "AdapterConfig",
    "atomic_write",
    "build_config",
    "build_fusion",
    "check_finite",
    "count_parameters",
    "detect_family",
    "dropout_rates",
    "FAMILIES",
    "Fusion",
    "FUSION_RULES",
    "is_trainable_name",
    "load_multimodal",
    "LoRAConfig",
    "match_targets",
    "modality_dropout",
    "MultimodalAdapter",
    "MultimodalConfig",
    "MultimodalLayer",
    "MultimodalLoRA",
    "MultimodalLoRAConv2d",
    "MultimodalModel",
    "NonFiniteInputError",
    "only_modality",
    "ParamReport",
    "per_modality_forward",
    "Presence",
    "presence_tensor",
    "plan_targets",
    "PRESETS",
    "register_family",
    "register_fusion",
    "resolve_dtype",
    "save_multimodal",
    "set_execution",
    "state_mismatches",
    "StemConfig",
    "trainable_summary",
    "wrap_multimodal",
]
