"""Confusion matrix and metrics against numbers computed by hand."""

from __future__ import annotations

import json

import pytest
import torch

from mmpeft_isprs.data import ISPRS
from mmpeft_isprs.metrics import ConfusionMatrix, compute_metrics, format_table

# rows = true class, columns = predicted class
HAND = [[5, 1, 0], [2, 3, 1], [0, 1, 7]]
NAMES = ("a", "b", "c")


def pixels_from(mat: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    pred, true = [], []
    for t, row in enumerate(mat):
        for p, n in enumerate(row):
            pred += [p] * n
            true += [t] * n
    return torch.tensor(pred), torch.tensor(true)


def test_update_builds_the_matrix_and_skips_ignored():
    pred, true = pixels_from(HAND)
    perm = torch.randperm(len(pred), generator=torch.Generator().manual_seed(0))
    pred, true = pred[perm], true[perm]
    cm = ConfusionMatrix(3)
    cm.update(pred[:7].reshape(7, 1), true[:7].reshape(7, 1))  # any shape
    cm.update(pred[7:], true[7:])
    cm.update(torch.tensor([0, 2, 1]), torch.tensor([255, 255, 255]))  # ignored
    assert cm.mat.tolist() == HAND


def test_metrics_equal_hand_computed_values():
    cm = ConfusionMatrix(3)
    cm.mat += torch.tensor(HAND)
    m = compute_metrics(cm, NAMES, eval_classes=(0, 1))
    # 20 pixels, 15 on the diagonal
    assert m["OA"] == pytest.approx(15 / 20)
    # true sums 6, 6, 8; predicted sums 7, 5, 8
    assert m["precision"] == pytest.approx({"a": 5 / 7, "b": 3 / 5, "c": 7 / 8})
    assert m["recall"] == pytest.approx({"a": 5 / 6, "b": 3 / 6, "c": 7 / 8})
    assert m["F1"] == pytest.approx({"a": 10 / 13, "b": 6 / 11, "c": 14 / 16})
    assert m["IoU"] == pytest.approx({"a": 5 / 8, "b": 3 / 8, "c": 7 / 9})
    assert m["mF1"] == pytest.approx((10 / 13 + 6 / 11) / 2)  # class c left out
    assert m["mIoU"] == pytest.approx(0.5)
    # chance agreement (6*7 + 6*5 + 8*8) / 20^2 = 0.34; kappa = (0.75 - 0.34) / 0.66
    assert m["kappa"] == pytest.approx(0.41 / 0.66)
    assert m["support"] == {"a": 6, "b": 6, "c": 8} and m["pixels"] == 20
    assert m["confusion"] == HAND
    assert json.loads(json.dumps(m)) == m


def test_absent_class_left_out_of_the_means_and_perfect_prediction():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1]))
    m = compute_metrics(cm, NAMES, eval_classes=(0, 1, 2))
    # class c: no pixel labelled, none predicted -> absent, not an IoU of 0 in the mean
    assert m["OA"] == 1.0 and m["absent"] == ["c"] and m["eval_classes"] == ["a", "b"]
    assert m["mIoU"] == pytest.approx(1.0) and m["mF1"] == pytest.approx(1.0)
    assert m["kappa"] == pytest.approx(1.0)
    table = format_table(m, NAMES)
    assert "\nc" + " " * 23 + "absent (no pixel labelled or predicted)\n" in table
    assert table.splitlines()[-1].endswith("(means over a, b; absent, left out: c)")
    # labelled but never predicted is not absent: IoU 0 enters the mean
    cm2 = ConfusionMatrix(3)
    cm2.update(torch.tensor([0, 0, 0]), torch.tensor([0, 0, 2]))
    m2 = compute_metrics(cm2, NAMES, eval_classes=(0, 1, 2))
    assert m2["absent"] == ["b"] and m2["mIoU"] == pytest.approx((2 / 3 + 0) / 2)


def test_merge_and_all_reduce_hooks():
    a, b = ConfusionMatrix(3), ConfusionMatrix(3)
    a.mat += torch.tensor(HAND)
    b.mat += torch.eye(3, dtype=torch.int64)
    assert a.merge(b).mat.tolist() == [[6, 1, 0], [2, 4, 1], [0, 1, 8]]
    seen = []
    a.all_reduce(lambda t: (seen.append(t.clone()), t * 2)[1])  # returns the "sum of 2 ranks"
    assert a.mat.tolist() == [[12, 2, 0], [4, 8, 2], [0, 2, 16]] and len(seen) == 1

    def in_place(t: torch.Tensor) -> None:
        t.mul_(0)

    a.all_reduce(in_place)  # reduces in place and returns None
    assert int(a.mat.sum()) == 0
    b.all_reduce()  # no process group: unchanged
    assert b.mat.tolist() == torch.eye(3, dtype=torch.int64).tolist()


def test_bad_inputs_raise():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="labels outside"):
        cm.update(torch.tensor([0]), torch.tensor([3]))
    with pytest.raises(ValueError, match="predictions outside"):
        cm.update(torch.tensor([5]), torch.tensor([0]))
    with pytest.raises(ValueError, match="pred"):
        cm.update(torch.zeros(2, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="names"):
        compute_metrics(cm, ("a", "b"), (0,))


def test_isprs_oa_counts_clutter_but_means_do_not():
    cm = ConfusionMatrix(6)
    # everything right except clutter, which is always wrong (predicted as impervious)
    cm.update(torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([0, 1, 2, 3, 4, 5]))
    m = compute_metrics(cm, ISPRS.class_names, ISPRS.eval_classes)
    assert m["OA"] == pytest.approx(5 / 6)
    assert m["mIoU"] == pytest.approx((0.5 + 4) / 5) and m["IoU"]["clutter"] == 0.0
    table = format_table(m, ISPRS.class_names)
    lines = table.splitlines()
    assert [line.split("  ")[0].strip() for line in lines[1:7]] == list(ISPRS.class_names)
    assert "mIoU 90.00" in table and "OA 83.33" in table
