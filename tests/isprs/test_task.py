"""The task layer: the fusion rule reaches the encoder and learns; the loss ignores label 255."""

from __future__ import annotations

import pytest
import torch

import mmpeft
from mmpeft_isprs.config import ConfigError, load_config
from mmpeft_isprs.distributed import DistInfo
from mmpeft_isprs.model import MFNetConfig, build_mfnet
from mmpeft_isprs.task import SegmentationTask, segmentation_loss
from tests.helpers import assert_close
from tests.isprs.runs import TINY_MFNET

MatrixFusion = mmpeft.FUSION_RULES["matrix"]  # through the public registry only


def _batch(seed: int = 0, b: int = 2, s: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "optical": torch.rand(b, 3, s, s, generator=g),
        "dsm": torch.rand(b, 1, s, s, generator=g),
        "mask": torch.randint(0, 6, (b, s, s), generator=g),
    }


def _task(fusion: str, method: str = "adapter") -> SegmentationTask:
    values = {
        "data": {"dataset": "synthetic"},
        "model": {**TINY_MFNET, "fusion": fusion, "method": method},
        "train": {"weight_decay": 0.0, "lr": 0.05},
        "eval": {"stride": 32, "val_stride": 32},
    }
    return SegmentationTask(load_config(values), DistInfo())


@pytest.mark.parametrize("method", ["adapter", "lora"])
def test_matrix_fusion_reaches_the_encoder_and_learns(method: str) -> None:
    task = _task("matrix", method)
    mixes = {n: p for n, p in task.model.named_parameters() if n.endswith("fusion.mix")}
    assert mixes, "fusion='matrix' must build learnable mixing matrices"
    assert all(p.requires_grad and p.shape == (2, 2) for p in mixes.values())
    assert not any(n.endswith("lam.optical") for n, _ in task.model.named_parameters())  # no scalar lambdas
    assert any(isinstance(m, MatrixFusion) for m in task.model.modules())
    before = {n: p.detach().clone() for n, p in mixes.items()}
    losses = [task.training_step(_batch(i)) for i in range(3)]  # weight decay 0: only gradients move them
    assert all(torch.isfinite(torch.stack(losses)))
    assert any(not torch.equal(before[n], p) for n, p in mixes.items()), "the mixing matrices never changed"
    assert set(mixes) <= set(task.model.trainable_state_dict())  # saved with the weights


def test_scalar_and_none_fusion_differ_from_matrix() -> None:
    names = {f: {n for n, _ in build_mfnet(**TINY_MFNET, fusion=f).named_parameters()} for f in ("scalar", "none")}
    assert any("fusion.lam" in n for n in names["scalar"]) and not any(".mix" in n for n in names["scalar"])
    assert not any("fusion." in n for n in names["none"])


def test_unknown_fusion_is_an_error_naming_the_known_rules() -> None:
    with pytest.raises(ValueError, match=r"unknown fusion rule 'matirx'; known: .*'matrix'.*'scalar'"):
        MFNetConfig(fusion="matirx")
    with pytest.raises(ConfigError, match="unknown fusion rule 'matirx'"):
        load_config("demo", ["model.fusion=matirx"])


def test_a_registered_fusion_rule_passes_through(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(mmpeft.FUSION_RULES, "matrix_copy", MatrixFusion)
    model = build_mfnet(**TINY_MFNET, fusion="matrix_copy")
    assert any(isinstance(m, MatrixFusion) for m in model.modules())


def test_loss_ignores_label_255() -> None:
    logits = torch.randn(1, 3, 2, 2)
    mask = torch.tensor([[[0, 255], [2, 1]]])
    expected = torch.nn.functional.cross_entropy(logits.permute(0, 2, 3, 1)[mask != 255], mask[mask != 255])
    assert_close(segmentation_loss(logits, mask), expected, rel=1e-5)
