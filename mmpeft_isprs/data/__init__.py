"""Remote-sensing data: palettes, file I/O, layouts, tile sets, datasets, synthetic data,
prediction inputs and outputs (files <-> samples; no config, model or training logic).

A sample is a dict: ``"optical"`` float32 (3, H, W) in [0, 1], ``"dsm"`` float32 (1, H, W) in
[0, 1] (more modalities by name: :class:`ModalitySpec` entries of any layout, each with its
source file, bands and statistics, :mod:`.bands`), ``"mask"`` int64 (H, W) with
``IGNORE_INDEX`` = 255, and ``"name"`` (tile id).
"""

from .datasets import RandomCropDataset, item_rng, pad_sample
from .dsm import DataWarning, DsmNormalisation, normalise_dsm, valid_range
from .generic import GenericLayout
from .inputs import check_sizes, dsm_tensor, is_geotiff, modality_tensor, pair_inputs, pair_modalities
from .io import (
    GEO_TAGS,
    DataError,
    RasterInfo,
    TiffWindowReader,
    raster_info,
    read_geotags,
    read_image,
    read_window,
    write_tiff,
)
from .layouts import (
    POTSDAM_SPLITS,
    VAIHINGEN_SPLITS,
    Layout,
    MMHunanLayout,
    ModalitySpec,
    PotsdamLayout,
    SplitSpec,
    TileFiles,
    VaihingenLayout,
)
from .outputs import write_prediction
from .palette import (
    IGNORE_INDEX,
    ISPRS,
    MMHUNAN,
    DatasetInfo,
    colour_to_index,
    index_to_colour,
    normalise_index_labels,
)
from .synthetic import (
    SYNTHETIC_VAL_IDS,
    generate_synthetic_vaihingen,
    synthetic_layout,
    synthetic_splits,
)
from .tiles import TileSet, TileWindowReader
from .transforms import JointFlipRotate

__all__ = [
    "IGNORE_INDEX",
    "DatasetInfo",
    "ISPRS",
    "MMHUNAN",
    "colour_to_index",
    "index_to_colour",
    "normalise_index_labels",
    "DataError",
    "RasterInfo",
    "TiffWindowReader",
    "GEO_TAGS",
    "raster_info",
    "read_image",
    "read_window",
    "read_geotags",
    "write_tiff",
    "ModalitySpec",
    "TileFiles",
    "SplitSpec",
    "Layout",
    "VaihingenLayout",
    "PotsdamLayout",
    "MMHunanLayout",
    "GenericLayout",
    "VAIHINGEN_SPLITS",
    "POTSDAM_SPLITS",
    "DsmNormalisation",
    "DataWarning",
    "normalise_dsm",
    "valid_range",
    "TileSet",
    "TileWindowReader",
    "RandomCropDataset",
    "item_rng",
    "pad_sample",
    "JointFlipRotate",
    "generate_synthetic_vaihingen",
    "synthetic_layout",
    "synthetic_splits",
    "SYNTHETIC_VAL_IDS",
    "pair_inputs",
    "pair_modalities",
    "modality_tensor",
    "check_sizes",
    "dsm_tensor",
    "is_geotiff",
    "write_prediction",
]
