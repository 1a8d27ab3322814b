"""Sliding-window stitching: exact on known class maps, equal to a naive loop, TTA, laziness."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmpeft_isprs.inference import TensorSource, sliding_window_predict, window_starts
from tests.helpers import assert_close, close

K = 4


def one_hot_inputs(h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    classes = torch.randint(0, K, (h, w), generator=g)
    onehot = F.one_hot(classes, K).permute(2, 0, 1).float()  # (K, H, W)
    return classes, {"optical": onehot, "dsm": torch.rand(1, h, w, generator=g)}


def pointwise_model(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits = 5 * one-hot of the class map at every pixel: a known function of position."""
    return 5.0 * batch["optical"]


def context_model(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Depends on the whole window (mean) and on neighbours, so overlapping windows disagree."""
    x = torch.cat([batch["optical"], batch["dsm"]], 1)  # (B, K+1, h, w)
    w = torch.arange((K) * (K + 1) * 9, dtype=torch.float32).reshape(K, K + 1, 3, 3).sin()
    return F.conv2d(x, w, padding=1) + 3 * x.mean((2, 3), keepdim=True)[:, :K]


def test_window_starts():
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(11, 4, 3) == [0, 3, 6, 7]  # last one flush with the border
    assert window_starts(4, 4, 2) == [0] and window_starts(3, 8, 2) == [0]
    assert window_starts(600, 256, 32)[-1] == 344


@pytest.mark.parametrize(
    "h,w,window,stride",
    [(40, 56, 16, 8), (37, 50, 16, 5), (33, 33, 16, 16), (10, 13, 16, 4), (16, 40, 16, 7), (9, 30, 12, 12)],
)
@pytest.mark.parametrize("mode", ["average", "logit_sum"])
def test_stitched_output_equals_known_class_map(h, w, window, stride, mode):
    classes, inputs = one_hot_inputs(h, w)
    out = sliding_window_predict(pointwise_model, inputs, K, window, stride, batch_size=3, mode=mode)
    assert out.shape == (K, h, w) and out.dtype == torch.float32
    assert torch.equal(out.argmax(0), classes)
    if mode == "average":
        expected = F.softmax(5.0 * inputs["optical"], 0)  # every window agrees at every pixel
        assert_close(out, expected, rel=1e-5)
    else:  # logit sums: 5 x (number of windows covering the pixel) on the true class
        counts = torch.zeros(h, w)
        for y in window_starts(h, window, stride):
            for x in window_starts(w, window, stride):
                counts[y : y + window, x : x + window] += 1
        assert_close(out, 5.0 * inputs["optical"] * counts, rel=1e-5)


def naive_average(model, inputs, window, stride):
    """Reference: per-pixel list of softmax vectors from every covering window, then the mean."""
    _, H, W = inputs["optical"].shape
    pad_h, pad_w = max(0, window - H), max(0, window - W)
    votes: dict[tuple[int, int], list[torch.Tensor]] = {}
    for y in window_starts(H, window, stride):
        for x in window_starts(W, window, stride):
            crop = {
                k: F.pad(v[:, y : y + window, x : x + window], (0, pad_w, 0, pad_h))[None] for k, v in inputs.items()
            }
            prob = model(crop)[0].softmax(0)
            for i in range(min(window, H)):
                for j in range(min(window, W)):
                    votes.setdefault((y + i, x + j), []).append(prob[:, i, j])
    out = torch.zeros(K, H, W)
    for (i, j), v in votes.items():
        out[:, i, j] = torch.stack(v).mean(0)
    return out


@pytest.mark.parametrize("h,w,window,stride", [(21, 26, 12, 5), (9, 17, 12, 4)])
def test_average_mode_equals_naive_loop(h, w, window, stride):
    _, inputs = one_hot_inputs(h, w, seed=1)
    fast = sliding_window_predict(context_model, inputs, K, window, stride, batch_size=4)
    assert_close(fast, naive_average(context_model, inputs, window, stride), rel=1e-5)


def test_flip_tta_with_flip_equivariant_model_equals_no_tta():
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16  # symmetric blur
    mix = torch.randn(K, K + 1, generator=torch.Generator().manual_seed(2))

    def equivariant(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = torch.cat([batch["optical"], batch["dsm"]], 1)
        x = F.conv2d(x, kernel.expand(K + 1, 1, 3, 3), padding=1, groups=K + 1)
        return torch.einsum("kc,bchw->bkhw", mix, x)

    _, inputs = one_hot_inputs(30, 23, seed=3)
    for mode in ("average", "logit_sum"):
        plain = sliding_window_predict(equivariant, inputs, K, 16, 6, mode=mode)
        tta = sliding_window_predict(equivariant, inputs, K, 16, 6, mode=mode, tta_flip=True)
        assert_close(tta, plain, rel=1e-5)
    # a model that is not flip-equivariant does change under TTA (the test can fail)
    plain = sliding_window_predict(context_model, inputs, K, 16, 6)
    assert not close(sliding_window_predict(context_model, inputs, K, 16, 6, tta_flip=True), plain, rel=1e-08)


class CountingSource:
    """A lazy window reader that records every read (as a disk-backed reader would)."""

    def __init__(self, inputs: dict[str, torch.Tensor]) -> None:
        self.inner = TensorSource(inputs)
        self.size = self.inner.size
        self.reads: list[tuple[int, int, int, int]] = []

    def read(self, y0: int, x0: int, h: int, w: int) -> dict[str, torch.Tensor]:
        self.reads.append((y0, x0, h, w))
        return self.inner.read(y0, x0, h, w)


def test_lazy_source_reads_only_windows_and_batches_are_bounded():
    classes, inputs = one_hot_inputs(50, 61, seed=4)
    source = CountingSource(inputs)
    sizes = []

    def model(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        sizes.append(batch["optical"].shape[0])
        return context_model(batch)

    lazy = sliding_window_predict(model, source, K, window=16, stride=8, batch_size=5)
    eager = sliding_window_predict(context_model, inputs, K, window=16, stride=8, batch_size=7)
    assert_close(lazy, eager, rel=1e-5)
    assert all(h == 16 and w == 16 for _, _, h, w in source.reads)
    assert len(source.reads) == len(window_starts(50, 16, 8)) * len(window_starts(61, 16, 8)) == sum(sizes)
    assert max(sizes) <= 5


def test_bad_arguments():
    _, inputs = one_hot_inputs(20, 20)
    with pytest.raises(ValueError, match="stride"):
        sliding_window_predict(pointwise_model, inputs, K, window=8, stride=9)
    with pytest.raises(ValueError, match="mode"):
        sliding_window_predict(pointwise_model, inputs, K, mode="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected"):
        sliding_window_predict(pointwise_model, inputs, K + 1, window=8, stride=8)
    with pytest.raises(ValueError, match="one size"):
        sliding_window_predict(pointwise_model, {"a": torch.zeros(1, 4, 4), "b": torch.zeros(1, 4, 5)}, K)


def test_tileset_window_reader_lazy_equals_in_memory(tmp_path):
    from mmpeft_isprs.data import TileSet, generate_synthetic_vaihingen, synthetic_layout

    generate_synthetic_vaihingen(tmp_path, num_tiles=3, tile_size=96)
    lay = synthetic_layout(tmp_path)
    lazy = TileSet(lay, tmp_path, "test", labels="none", cache=False)
    tile = TileSet(lay, tmp_path, "test", labels="none").load(0)

    def model(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = torch.cat([batch["optical"], batch["dsm"]], 1)  # (B, 4, h, w)
        return F.avg_pool2d(x, 3, 1, 1) * 4 - x.mean((2, 3), keepdim=True)

    inputs = {k: tile[k] for k in ("optical", "dsm")}
    for mode in ("average", "logit_sum"):
        a = sliding_window_predict(model, lazy.window_reader(0), 4, window=64, stride=24, mode=mode)
        b = sliding_window_predict(model, inputs, 4, window=64, stride=24, mode=mode)
        assert_close(a, b, rel=0)


def test_read_ahead_and_accumulation_place_change_nothing() -> None:
    """Windows read ahead in a thread and scores accumulated elsewhere: the same scores, bit for bit."""
    g = torch.Generator().manual_seed(5)
    inputs = {"optical": torch.rand(3, 50, 70, generator=g), "dsm": torch.rand(1, 50, 70, generator=g)}
    conv = torch.nn.Conv2d(4, 3, 3, padding=1)

    def model(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return conv(torch.cat([batch["optical"], batch["dsm"]], 1))

    ref = sliding_window_predict(model, inputs, 3, 32, 12, batch_size=4, prefetch=False)
    for kw in ({"prefetch": True}, {"prefetch": True, "accumulate_on": "cpu", "out_device": "cpu"}):
        out = sliding_window_predict(model, inputs, 3, 32, 12, batch_size=4, **kw)  # type: ignore[arg-type]
        assert torch.equal(out, ref)
    assert ref.device.type == "cpu" and ref.shape == (3, 50, 70)
