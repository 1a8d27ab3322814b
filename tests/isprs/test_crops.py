"""Training crops and joint transforms: random crops a pure function of (seed, epoch, index),
the same in DataLoader workers; padding; flips and rotations keep modalities and mask aligned."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmpeft_isprs.data import IGNORE_INDEX, JointFlipRotate, RandomCropDataset, TileSet, VaihingenLayout
from mmpeft_isprs.data.datasets import item_rng
from tests.helpers import assert_close
from tests.isprs.archives import make_vaihingen


def test_random_crops_deterministic_per_seed_epoch_index(tmp_path):
    make_vaihingen(tmp_path, ["1", "3", "23"], size=(40, 48))
    ts = TileSet(VaihingenLayout(), tmp_path, ["1", "3", "23"])
    a = RandomCropDataset(ts, crop_size=16, samples_per_epoch=12, seed=7)
    b = RandomCropDataset(ts, crop_size=16, samples_per_epoch=12, seed=7)
    first = [a[i] for i in range(12)]
    for i in reversed(range(12)):  # order (worker assignment) does not matter
        assert torch.equal(b[i]["optical"], first[i]["optical"]) and torch.equal(b[i]["mask"], first[i]["mask"])
    assert not all(torch.equal(a[(1, i)]["optical"], first[i]["optical"]) for i in range(12))  # epoch 1
    assert torch.equal(a[(0, 5)]["optical"], first[5]["optical"])  # a plain index is epoch 0
    assert not hasattr(a, "set_epoch")  # no epoch state: the sampler's (epoch, item) pairs say it
    assert len({x["name"] for x in first}) > 1
    # each crop is a real window of its tile
    for x in first[:4]:
        tile = ts.load(ts.ids.index(x["name"]))["optical"]
        hits = [
            (y, z) for y in range(25) for z in range(33) if torch.equal(tile[:, y : y + 16, z : z + 16], x["optical"])
        ]
        assert len(hits) == 1
    c = RandomCropDataset(ts, crop_size=16, samples_per_epoch=12, seed=8)
    assert not torch.equal(c[0]["optical"], first[0]["optical"]) or c[0]["name"] != first[0]["name"]


def test_random_crops_same_with_dataloader_workers(tmp_path):
    make_vaihingen(tmp_path, ["1", "3"], size=(40, 48))
    ts = TileSet(VaihingenLayout(), tmp_path, ["1", "3"])
    ds = RandomCropDataset(ts, crop_size=16, samples_per_epoch=8, seed=3, transforms=JointFlipRotate())
    runs = []
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=workers)
        runs.append(torch.cat([b["optical"] for b in loader]))
    assert torch.equal(runs[0], runs[1])


def test_small_tiles_are_padded_with_ignore(tmp_path):
    make_vaihingen(tmp_path, ["1"], size=(10, 12))
    ds = RandomCropDataset(TileSet(VaihingenLayout(), tmp_path, ["1"]), crop_size=16, samples_per_epoch=2)
    s = ds[0]
    assert s["optical"].shape == (3, 16, 16) and s["mask"].shape == (16, 16)
    assert (s["mask"][10:] == IGNORE_INDEX).all() and (s["mask"][:, 12:] == IGNORE_INDEX).all()
    assert (s["mask"][:10, :12] != IGNORE_INDEX).all() and float(s["optical"][:, 10:].abs().sum()) == 0.0


@pytest.mark.parametrize("rng", [np.random.default_rng(0), torch.Generator().manual_seed(0)])
def test_joint_transform_keeps_modalities_and_mask_aligned(rng):
    x = torch.arange(5 * 7).reshape(5, 7)
    sample = {"optical": torch.stack([x, x, x]).float(), "dsm": x[None].float() * 2, "mask": x.clone(), "name": "t"}
    seen = set()
    tf = JointFlipRotate(rot90=True)
    for _ in range(40):
        out = tf(sample, rng)
        assert out["name"] == "t"
        assert_close(out["optical"][1], out["mask"].float(), rel=1e-5)
        assert_close(out["dsm"][0], out["mask"].float() * 2, rel=1e-5)
        seen.add((tuple(out["mask"].shape), int(out["mask"][0, 0])))
    assert len(seen) == 8  # all 8 flip/rotation combinations occur
    flips = {int(JointFlipRotate()(sample, rng)["mask"][0, 0]) for _ in range(30)}
    assert flips == {0, 6, 28, 34}  # corners only: no rotation by default


def test_joint_transform_reproducible_from_generator():
    sample = {"mask": torch.arange(16).reshape(4, 4)}
    tf = JointFlipRotate(rot90=True)
    a = [tf(sample, item_rng(1, 2, i))["mask"] for i in range(10)]
    b = [tf(sample, item_rng(1, 2, i))["mask"] for i in range(10)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_lazy_tileset_pickles_and_feeds_workers(tmp_path):
    import pickle

    make_vaihingen(tmp_path, ["1", "3"], size=(40, 48))
    lazy = TileSet(VaihingenLayout(), tmp_path, ["1", "3"], cache=False)
    eager = TileSet(VaihingenLayout(), tmp_path, ["1", "3"])
    first = lazy.read_window(1, 2, 3, 10, 11)  # opens readers
    clone = pickle.loads(pickle.dumps(lazy))
    for k in ("optical", "dsm", "mask"):
        assert torch.equal(clone.read_window(1, 2, 3, 10, 11)[k], first[k])
        assert torch.equal(eager.read_window(1, 2, 3, 10, 11)[k], first[k])
    batches = []
    for ts, workers in ((eager, 0), (lazy, 2)):
        ds = RandomCropDataset(ts, crop_size=16, samples_per_epoch=6, seed=1)
        batches.append(
            torch.cat([b["dsm"] for b in torch.utils.data.DataLoader(ds, batch_size=3, num_workers=workers)])
        )
    assert torch.equal(batches[0], batches[1])
