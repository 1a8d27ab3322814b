"""Synthetic Vaihingen: layout and formats, idempotence, determinism, and that the DSM matters."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch

from mmpeft_isprs.data import (
    IGNORE_INDEX,
    ISPRS,
    SplitSpec,
    TileSet,
    VaihingenLayout,
    colour_to_index,
    generate_synthetic_vaihingen,
    read_geotags,
    synthetic_layout,
    synthetic_splits,
)
from mmpeft_isprs.data.synthetic import MANIFEST, SYNTHETIC_VAL_IDS


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    manifest = generate_synthetic_vaihingen(root, num_tiles=3, tile_size=256, seed=0)
    return root, manifest


def test_splits_use_the_paper_ids():
    full = synthetic_splits()
    assert full["train"] == VaihingenLayout().split_ids("train", ".")
    assert full["test"] == VaihingenLayout().split_ids("test", ".")
    assert full["val"] == list(SYNTHETIC_VAL_IDS)
    assert synthetic_splits(3) == {"train": ["1"], "val": ["9"], "test": ["5"]}
    with pytest.raises(ValueError):
        synthetic_splits(2)


def test_files_formats_and_manifest(small):
    root, manifest = small
    assert manifest["splits"] == {"train": ["1"], "val": ["9"], "test": ["5"]}
    assert json.loads((root / MANIFEST).read_text()) == manifest
    for tile_id in ("1", "9", "5"):
        f = VaihingenLayout().tile_files(root, tile_id)
        top = tifffile.imread(f.inputs["optical"])
        dsm = tifffile.imread(f.inputs["dsm"])
        full = tifffile.imread(f.labels)
        eroded = tifffile.imread(f.eval_labels)
        assert top.shape == (256, 256, 3) and top.dtype == np.uint8
        assert dsm.shape == (256, 256) and dsm.dtype == np.float32 and 240 < dsm.mean() < 270
        full_idx, ero_idx = colour_to_index(full, ISPRS), colour_to_index(eroded, ISPRS)
        assert IGNORE_INDEX not in full_idx
        boundary = ero_idx == IGNORE_INDEX
        assert 0.01 < boundary.mean() < 0.3
        np.testing.assert_array_equal(ero_idx[~boundary], full_idx[~boundary])
        assert {code for code, *_ in read_geotags(f.inputs["optical"])} == {33550, 33922, 34735}


def test_tileset_reads_it_and_classes_are_present(small):
    root, _ = small
    lay = synthetic_layout(root)
    seen = np.zeros(6, int)
    for split in ("train", "val", "test"):
        ts = TileSet(lay, root, split, labels="eroded")
        seen += np.bincount(ts.load(0)["mask"].numpy().ravel(), minlength=256)[:6]
    assert (seen[:4] > 500).all() and seen[4] > 0 and seen[5] > 0  # all six classes occur
    val = VaihingenLayout(SplitSpec(val_ids=SYNTHETIC_VAL_IDS[:1]), splits={"train": ["1"], "test": ["5"]})
    assert TileSet(val, root, "val").ids == ["9"]


def test_idempotent_and_deterministic(small, tmp_path):
    root, manifest = small
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*.tif")}
    assert generate_synthetic_vaihingen(root, num_tiles=3, tile_size=256, seed=0) == manifest
    assert stamps == {p: p.stat().st_mtime_ns for p in root.rglob("*.tif")}  # nothing rewritten
    a, b = tmp_path / "a", tmp_path / "b"
    generate_synthetic_vaihingen(a, num_tiles=3, tile_size=96, seed=1)
    generate_synthetic_vaihingen(b, num_tiles=3, tile_size=96, seed=1)
    files = sorted(p.relative_to(a) for p in a.rglob("*.tif"))
    assert len(files) == 12 and all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    top = a / "top" / "top_mosaic_09cm_area1.tif"
    before = top.read_bytes()
    generate_synthetic_vaihingen(a, num_tiles=3, tile_size=96, seed=2)  # other params: regenerated
    assert top.read_bytes() != before and json.loads((a / MANIFEST).read_text())["params"]["seed"] == 2
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_synthetic_vaihingen(tmp_path / "foreign", num_tiles=3, tile_size=96)


def _features(ts: TileSet) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for i in range(len(ts)):
        s = ts.load(i)
        xs.append(torch.cat([s["optical"], s["dsm"]]).reshape(4, -1).T.numpy())
        ys.append(s["mask"].reshape(-1).numpy())
    return np.concatenate(xs), np.concatenate(ys)


def _nearest_mean_accuracy(train, test, pair, columns) -> float:
    """Balanced accuracy of a nearest-class-mean classifier between two classes."""
    (xtr, ytr), (xte, yte) = train, test
    means = [xtr[ytr == c][:, columns].mean(0) for c in pair]
    keep = np.isin(yte, pair)
    x, y = xte[keep][:, columns], yte[keep]
    dist = np.stack([((x - m) ** 2).sum(1) for m in means], 1)
    pred = np.asarray(pair)[dist.argmin(1)]
    return float(np.mean([(pred[y == c] == c).mean() for c in pair]))


@pytest.mark.parametrize("pair", [(0, 1), (2, 3)], ids=["road-vs-roof", "grass-vs-tree"])
def test_dsm_separates_what_colour_cannot(small, pair):
    root, _ = small
    lay = synthetic_layout(root)
    train = _features(TileSet(lay, root, "train", labels="eroded"))
    test = _features(TileSet(lay, root, "test", labels="eroded"))
    colour = _nearest_mean_accuracy(train, test, pair, [0, 1, 2])
    with_height = _nearest_mean_accuracy(train, test, pair, [0, 1, 2, 3])
    assert colour < 0.65, colour  # about chance (0.5) from colour alone
    assert with_height > 0.9, with_height
    assert with_height - colour > 0.3
