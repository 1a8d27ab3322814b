"""MFNet with TerraTorch's geospatial encoders (issue 31): registry and timm names as ``model.backbone``,
per-block token maps into the DFM, each modality's band meaning, one epoch of optical + SAR training.

TerraTorch is the optional extra geo-fm: the tests that build its models skip, with the reason, when
it is missing; the refusal naming the extra runs everywhere. ``import terratorch`` sets float32 matmul
precision to "medium": it is put back at once, as tests/test_geo_models.py does.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mmpeft import BandMeaningWarning
from mmpeft_isprs.config import ConfigError, load_config
from mmpeft_isprs.data import write_tiff
from mmpeft_isprs.model import MFNetConfig, build_mfnet
from mmpeft_isprs.model.encoders import build_feature_encoder
from mmpeft_isprs.model.geo_encoders import wavelength_embedding
from mmpeft_isprs.model.pyramid import MultiScaleProjection
from mmpeft_isprs.task import SegmentationTask
from mmpeft_isprs.train import train
from tests.geo_fm import import_terratorch
from tests.helpers import assert_close, randomise_trainables, rel_diff
from tests.isprs.archives import SIZE, TINY, make_vaihingen_archive
from tests.isprs.runs import quiet

PRITHVI = "terratorch_prithvi_eo_v2_tiny_tl"
SMALL = {"decode_channels": 16, "window_size": 4, "decoder_heads": 2, "img_size": 64, "method": "lora"}
MODS = ["optical", "sar"]


@pytest.fixture(scope="module")
def terratorch() -> Any:
    """TerraTorch, imported with the float32 matmul precision put back (its import sets "medium")."""
    return import_terratorch()


def test_a_terratorch_name_without_the_extra_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before any work: the config refuses it (in CI, where the extra is missing, as it is)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "terratorch" else real(name, *a))
    monkeypatch.delitem(sys.modules, "terratorch", raising=False)
    for name in (PRITHVI, "clay_v1_base", "timm_prithvi_swin_B"):
        with pytest.raises(ValueError, match=r"optional extra geo-fm.*pip install 'mmpeft\[geo-fm\]'"):
            MFNetConfig(backbone=name)
    with pytest.raises(ConfigError, match=r"model.backbone.*pip install 'mmpeft\[geo-fm\]'"):
        load_config("vaihingen_mmadapter_vit_b", [f"model.backbone={PRITHVI}"])
    with pytest.raises(ValueError, match=r"unknown backbone 'clay_v2'.*TerraTorch backbone-registry name"):
        MFNetConfig(backbone="clay_v2")  # an unknown name lists TerraTorch's among the choices, importing nothing
    assert "terratorch" not in sys.modules


def test_registry_and_timm_names_resolve_and_options_are_checked(terratorch: Any) -> None:
    assert MFNetConfig(backbone=PRITHVI).backbone_kind.timm_name == PRITHVI
    assert MFNetConfig(backbone="clay_v1_base").backbone_kind.timm_name == "timm_clay_v1_base"  # timm's name
    assert MFNetConfig(backbone="prithvi_swin_B").backbone_kind.kind == "geo"
    assert torch.get_float32_matmul_precision() == "highest"  # resolving imported nothing that changed it
    with pytest.raises(
        ValueError, match=r"registry has no 'terratorch_prithvi_eo_v9'.*terratorch_prithvi_eo_v2_tiny_tl"
    ):
        MFNetConfig(backbone="terratorch_prithvi_eo_v9")
    with pytest.raises(ValueError, match=r"num_frames=3: MFNet's inputs are single images"):
        MFNetConfig(backbone=PRITHVI, encoder_kwargs={"num_frames": 3})
    with pytest.raises(ValueError, match=r"execution='per_modality'.*model.wavelengths do not act"):
        MFNetConfig(backbone="clay_v1_base", modalities=MODS, wavelengths={"sar": [3.5, 4.0]}, execution="per_modality")
    with pytest.raises(ValueError, match=r"model.wavelengths names \['dsm'\]"):
        MFNetConfig(backbone="clay_v1_base", modalities=MODS, wavelengths={"dsm": [1.0]})
    with pytest.raises(ValueError, match=r"\['wavelengths'\] apply to SAM2 / timm ViT backbones, not to SAM's"):
        MFNetConfig(backbone="vit_b", wavelengths={"dsm": [1.0]})
    with pytest.raises(ValueError, match=r"wavelengths.*dinov2_vits14"):
        MFNetConfig(backbone="dinov2_vits14", wavelengths={"dsm": [1.0]})
    with pytest.raises(
        ValueError, match=r"model.wavelengths applies to encoders whose patch embedding.*Prithvi|has none"
    ):
        build_mfnet(backbone=PRITHVI, depth=1, modalities=MODS, wavelengths={"sar": [3.5, 4.0]}, **SMALL)


def _encoder(name: str, **kw: Any) -> Any:
    cfg = MFNetConfig(backbone=name, **SMALL, **kw)
    torch.manual_seed(0)
    kind, size = cfg.backbone_kind, cfg.size
    enc, report = build_feature_encoder(name, kind, size, cfg.geo_kwargs, cfg.pyramid_blocks, depth=cfg.depth)
    assert report is None
    return enc.eval()


@pytest.mark.slow  # Clay base's blocks are 768 wide: over 5 s on the shared CPU
def test_block_maps_equal_terratorchs_own_reshape(terratorch: Any) -> None:
    """The maps of the blocks taken are TerraTorch's ``prepare_features_for_image_model`` of the
    model's own outputs (class token dropped, tokens to (B, D, h, w)), for Prithvi and for Clay
    (patch 8: built for 32 px and its 64 px input resized, a 4 x 4 grid as the stride-16 grid)."""
    x = torch.rand(2, 6, 64, 64, generator=torch.Generator().manual_seed(0))
    prithvi = _encoder(PRITHVI, depth=4, embed_dim=32, num_heads=2)
    assert len(prithvi.trunk.blocks) == 4 and prithvi.blocks_taken == [0, 1, 2, 3] and prithvi.out_channels == (32,) * 4
    with torch.no_grad():
        maps = prithvi(x)
        own = prithvi.trunk.prepare_features_for_image_model(prithvi.trunk(x))
    assert [tuple(m.shape) for m in maps] == [(2, 32, 4, 4)] * 4
    for ours, theirs in zip(maps, own):
        assert_close(ours, theirs, rel=0)
    clay = _encoder("clay_v1_base", depth=2)
    assert clay.input_size == (32, 32) and clay.patch == (8, 8) and clay.blocks_taken == [1]
    assert len(clay.trunk.clay_encoder.transformer.layers) == 2  # the other 10 blocks removed
    with torch.no_grad():
        (ours,) = clay(x)
        small = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", antialias=True)
        (theirs,) = clay.trunk.prepare_features_for_image_model(clay.trunk(small))
    assert tuple(ours.shape) == (2, 768, 4, 4)
    assert_close(ours, theirs, rel=0)
    # the embedding generated from wavelengths, where model.wavelengths go: Clay's; Prithvi has none
    assert wavelength_embedding(clay.trunk) == ("clay_encoder.patch_embedding", "waves")
    assert wavelength_embedding(prithvi.trunk) is None
    with pytest.raises(ValueError, match=r"ignores embed_dim.*768"):
        _encoder("clay_v1_base", depth=2, embed_dim=64)


@pytest.mark.slow  # two model passes per modality: over 5 s on the shared CPU
def test_prithvi_stacked_equals_each_modality_through_its_own_forward(terratorch: Any) -> None:
    """The batched pass over optical + SAR equals the per-modality reference (``execution=
    "per_modality"``: mmpeft.reference_forward) after random trainables, with the mixing LoRA."""
    torch.manual_seed(0)
    model = build_mfnet(
        backbone=PRITHVI, depth=4, embed_dim=32, num_heads=2, modalities=MODS, stems={"sar": ["conv1x1", 2]}, **SMALL
    ).eval()
    x = {"optical": torch.rand(2, 6, 64, 64), "sar": torch.rand(2, 2, 64, 64)}
    with torch.no_grad():
        before = model.encoder(x)["optical"][-1]
        randomise_trainables(model.encoder)
        assert rel_diff(model.encoder(x)["optical"][-1], before) > 1e-3  # the trainables act
        batched = model(x)
        model.config.execution = "per_modality"
        alone = model(x)
    assert_close(batched, alone, rel=1e-5)


def test_a_swin_feeds_its_four_stages(terratorch: Any) -> None:
    """Prithvi Swin (a timm name TerraTorch registers): its four NHWC stage outputs become NCHW maps at
    strides 4, 8, 16, 32, each projected into the DFM as SAM2's Hiera's; depth is refused."""
    swin = {"depths": [1, 1, 1, 1], "embed_dim": 16, "num_heads": [1, 2, 2, 4]}
    torch.manual_seed(0)
    model = build_mfnet(
        backbone="prithvi_swin_B", modalities=MODS, stems={"sar": ["conv1x1", 2]}, encoder_kwargs=swin, **SMALL
    ).eval()
    enc = model.encoder.base_model
    assert enc.layout == "stages" and enc.out_channels == (16, 32, 64, 128)
    assert isinstance(model.dfm.pyramids[0], MultiScaleProjection)
    x = {"optical": torch.rand(1, 6, 64, 64), "sar": torch.rand(1, 2, 64, 64)}
    with torch.no_grad():
        maps = model.encoder(x)["sar"]
        assert model(x).shape == (1, 6, 64, 64)
    assert [tuple(m.shape) for m in maps] == [(1, 16, 16, 16), (1, 32, 8, 8), (1, 64, 4, 4), (1, 128, 2, 2)]
    with pytest.raises(ValueError, match=r"model.depth / model.pyramid_blocks apply to per-block encoders"):
        build_mfnet(backbone="prithvi_swin_B", modalities=MODS, depth=2, encoder_kwargs=swin, **SMALL)


def test_a_local_checkpoint_is_loaded_by_the_registry_and_a_misfit_refused(terratorch: Any, tmp_path: Path) -> None:
    """model.checkpoint: a Prithvi file loads through the registry's own builder (its key conversion),
    every tensor as in the file; a file missing a tensor is refused naming it (TerraTorch only logs it)."""
    kw = {"encoder_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2}, "modalities": MODS}  # built with 2
    source = _encoder(PRITHVI, **kw).trunk.state_dict()
    kw.update(SMALL)
    torch.save(source, tmp_path / "prithvi.pt")
    model = build_mfnet(backbone=PRITHVI, checkpoint=str(tmp_path / "prithvi.pt"), stems={"sar": ["conv1x1", 2]}, **kw)
    loaded = model.encoder.base_model.trunk
    frozen = {n.replace(".base_layer", ""): p for n, p in loaded.named_parameters() if not p.requires_grad}
    assert sorted(frozen) == sorted(k for k in source if k != "pos_embed")  # pos_embed: a buffer (sin-cos)
    for key, p in frozen.items():  # the wrapped model's frozen weights sit under base_layer
        assert torch.equal(p, source[key]), key
    del source["blocks.1.mlp.fc2.weight"]
    torch.save(source, tmp_path / "short.pt")
    with pytest.raises(ValueError, match=r"model.checkpoint .*short.pt does not fit.*blocks\.1\.mlp\.fc2\.weight"):
        build_mfnet(backbone=PRITHVI, checkpoint=str(tmp_path / "short.pt"), **kw)


def _clay_sar_reference(x: torch.Tensor) -> torch.Tensor:
    """What the frozen Clay gives SAR embedded from its own wavelengths: the unwrapped model (built
    from the same seed) called by hand, its datacube holding VV / VH's wavelengths."""
    clay = _encoder("clay_v1_base", depth=2)
    small = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", antialias=True)
    with torch.no_grad():
        tokens = clay.trunk.clay_encoder(clay.trunk.datacuber(small, waves=torch.tensor([3.5, 4.0])))[-1]
    return tokens[:, 1:].transpose(1, 2).reshape(x.shape[0], 768, 4, 4)  # (B, D, h, w)


@pytest.mark.slow  # Clay base's blocks are 768 wide: over 5 s on the shared CPU
def test_clay_embeds_sar_from_its_own_wavelengths(terratorch: Any) -> None:
    """model.wavelengths: SAR's two bands embedded from VV / VH's wavelengths (no BandMeaningWarning);
    without it the 'auto' stem tiles SAR into Clay's six optical bands, which is said."""
    sar = torch.rand(1, 2, 64, 64, generator=torch.Generator().manual_seed(1))
    optical = torch.rand(1, 6, 64, 64, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    model = build_mfnet(backbone="clay_v1_base", depth=2, modalities=MODS, wavelengths={"sar": [3.5, 4.0]}, **SMALL)
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", BandMeaningWarning)
        feats = model.encoder({"optical": optical, "sar": sar})  # at init the LoRA adds nothing
    h = _clay_sar_reference(sar)
    assert_close(feats["sar"][0], h, rel=1e-5, msg="SAR embedded as SAR")
    torch.manual_seed(0)
    plain = build_mfnet(backbone="clay_v1_base", depth=2, modalities=MODS, **SMALL).eval()
    with torch.no_grad(), pytest.warns(BandMeaningWarning, match=r"'sar' has 2 band.*blue.*set_modality_arguments"):
        tiled = plain.encoder({"optical": optical, "sar": sar})["sar"][0]
    assert rel_diff(tiled, h) > 1e-2  # tiled into the optical wavelengths: another embedding


def _archive(root: Path) -> None:
    """A Vaihingen archive plus ``ms/`` (6 float bands: the optical modality) and ``sar/`` (2 bands)."""
    ids = ["1", "3", "5"]
    make_vaihingen_archive(root, ids)
    rng = np.random.default_rng(1)
    for i in ids:
        write_tiff(root / "ms" / f"ms_area{i}.tif", rng.uniform(0, 0.5, (SIZE, SIZE, 6)).astype(np.float32))
        write_tiff(root / "sar" / f"sar_area{i}.tif", rng.normal(-10, 3, (SIZE, SIZE, 2)).astype(np.float32))


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vaihingen_s2_s1")
    _archive(root)
    return root


ENCODERS = {
    "prithvi": [f"model.backbone={PRITHVI}", "model.depth=2", "model.stems={sar: [conv1x1, 2]}"],
    "clay": [
        "model.backbone=clay_v1_base",
        "model.embed_dim=null",  # Clay's builder takes no width: the base's 768
        "model.num_heads=null",
        "model.depth=2",
        "model.wavelengths={sar: [3.5, 4.0]}",
    ],
}


@pytest.mark.slow  # the registry models' build and an epoch: over 5 s on the shared CPU
@pytest.mark.parametrize("encoder", sorted(ENCODERS))
def test_one_epoch_of_optical_and_sar(
    terratorch: Any, encoder: str, archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The application's own training entry point, one epoch of 2 steps: a finite loss, the frozen
    encoder bit-identical, every LoRA tensor updated."""
    tasks: list[tuple[SegmentationTask, dict[str, torch.Tensor]]] = []

    class Recorded(SegmentationTask):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            tasks.append((self, {n: p.detach().clone() for n, p in self.model.named_parameters()}))

    monkeypatch.setattr("mmpeft_isprs.runner.trainer.SegmentationTask", Recorded)
    cfg = load_config(
        "vaihingen_mmadapter_vit_b",
        [
            f"data.root={archive}",
            "data.files.ms=ms/ms_area{id}.tif",
            "data.files.sar=sar/sar_area{id}.tif",
            "data.modalities.optical={source: ms}",
            "data.splits={train: [1, 3], test: [5]}",
            "data.val_fraction=0",
            *TINY,
            "model.modalities=[optical, sar]",
            "model.method=lora",
            *ENCODERS[encoder],
            "train.batches_per_epoch=2",
            f"train.run_dir={tmp_path / 'run'}",
        ],
    )
    result = train(cfg, log=quiet)
    assert result.finished and result.state.step == 2
    assert math.isfinite(result.history[-1]["train_loss"])
    (task, before) = tasks[0]
    after = dict(task.model.named_parameters())
    frozen = [n for n in before if n.startswith("encoder.") and not after[n].requires_grad]
    lora = [n for n in before if "lora_" in n]
    assert frozen and lora
    for n in frozen:
        assert torch.equal(after[n], before[n]), n  # bit-identical
    unchanged = [n for n in lora if torch.equal(after[n], before[n])]
    assert not unchanged, unchanged
