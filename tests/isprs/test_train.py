"""Training: bit-identical resume, atomic checkpoints, train + eval end to end on tiny data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mmpeft_isprs.config import ConfigError, load_config
from mmpeft_isprs.datamodule import EpochBatchSampler
from mmpeft_isprs.evaluate import evaluate
from mmpeft_isprs.runner import CHECKPOINT, load_checkpoint
from mmpeft_isprs.task import load_trained
from mmpeft_isprs.train import train
from tests.isprs.runs import quiet, tiny_config


def assert_same_run(a: Path, b: Path) -> None:
    """Every tensor of the two checkpoints (model, optimizer, scheduler, counters) is identical."""
    ca, cb = load_checkpoint(a / CHECKPOINT), load_checkpoint(b / CHECKPOINT)
    assert ca["model"].keys() == cb["model"].keys()
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0
    for i in sa:
        assert torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"]), i
    assert ca["scheduler"] == cb["scheduler"]
    for key in ("epoch", "batch", "step", "best_miou", "best_epoch"):
        assert ca["state"][key] == cb["state"][key], key


def test_resume_reaches_the_same_weights_bit_for_bit(data_root: Path, tmp_path: Path) -> None:
    straight = train(tiny_config(data_root, tmp_path / "straight"), log=quiet)
    assert straight.finished and straight.state.step == 6
    # interrupted at the end of epoch 1, resumed for epoch 2
    first = train(tiny_config(data_root, tmp_path / "epoch"), max_steps=3, log=quiet)
    assert not first.finished and first.state.epoch == 1
    train(tiny_config(data_root, tmp_path / "epoch", "train.resume=true"), log=quiet)
    assert_same_run(tmp_path / "straight", tmp_path / "epoch")
    # interrupted mid-epoch (step 4 = batch 1 of epoch 2), resumed with other loader workers
    mid = train(tiny_config(data_root, tmp_path / "mid", num_workers=1), max_steps=4, log=quiet)
    assert (mid.state.epoch, mid.state.batch) == (1, 1)
    train(tiny_config(data_root, tmp_path / "mid", "train.resume=true", num_workers=2), log=quiet)
    assert_same_run(tmp_path / "straight", tmp_path / "mid")
    rows = (tmp_path / "mid" / "log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["epoch", "1", "2"]
    # a different seed really changes the result (the comparison above can fail)
    train(tiny_config(data_root, tmp_path / "seed1", seed=1), log=quiet)
    other = load_checkpoint(tmp_path / "seed1" / CHECKPOINT)["model"]
    ref = load_checkpoint(tmp_path / "straight" / CHECKPOINT)["model"]
    assert any(not torch.equal(other[k], ref[k]) for k in ref)


def test_resume_refuses_a_changed_config_and_an_existing_run(data_root: Path, tmp_path: Path) -> None:
    train(tiny_config(data_root, tmp_path / "run", epochs=1, batches_per_epoch=1), log=quiet)
    with pytest.raises(ConfigError, match=r"train.lr: 0.01 -> 0.02"):
        train(
            tiny_config(data_root, tmp_path / "run", "train.resume=true", epochs=1, batches_per_epoch=1, lr=0.02),
            log=quiet,
        )
    with pytest.raises(ConfigError, match="already holds last.pt"):
        train(tiny_config(data_root, tmp_path / "run", epochs=1, batches_per_epoch=1), log=quiet)
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        train(tiny_config(data_root, tmp_path / "new", "train.resume=true"), log=quiet)


def test_checkpoint_is_never_half_written(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    train(tiny_config(data_root, run, epochs=1, batches_per_epoch=1), log=quiet)
    before = (run / CHECKPOINT).read_bytes()
    real_save = torch.save

    def crash(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        train(tiny_config(data_root, run, "train.resume=true", epochs=2, batches_per_epoch=1), log=quiet)
    monkeypatch.setattr(torch, "save", real_save)
    assert (run / CHECKPOINT).read_bytes() == before
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []  # no temp files left
    assert load_checkpoint(run / CHECKPOINT)["state"]["step"] == 1


def test_train_then_evaluate_end_to_end(data_root: Path, tmp_path: Path) -> None:
    messages: list[str] = []
    cfg = tiny_config(data_root, tmp_path / "run", "eval.save_predictions=true", epochs=2, batches_per_epoch=2)
    result = train(cfg, log=messages.append)
    run = tmp_path / "run"
    for name in ("config.yaml", "log.csv", "last.pt", "best.safetensors", "last.safetensors", "metrics/epoch_002.json"):
        assert (run / name).is_file(), name
    assert any("building" in m and "mIoU" in m for m in messages)  # per-class table printed each epoch
    per_epoch = json.loads((run / "metrics" / f"epoch_{result.state.best_epoch:03d}.json").read_text())
    assert set(per_epoch["IoU"]) == {"impervious surfaces", "building", "low vegetation", "tree", "car", "clutter"}
    # best.safetensors rebuilds the model that was validated: same confusion matrix on the val tiles
    val = evaluate(
        load_config(cfg.to_dict(), ["eval.split=val", "eval.stride=64"]),
        run / "best.safetensors",
        out_dir=tmp_path / "val",
        log=quiet,
    )
    assert val.metrics["confusion"] == per_epoch["confusion"]
    test = evaluate(cfg, run / "best.safetensors", log=messages.append)
    saved = json.loads((run / "eval_test_stride32_average_eroded" / "metrics.json").read_text())
    assert saved["confusion"] == test.metrics["confusion"] and saved["protocol"]["labels"] == "eroded"
    assert 0.0 <= saved["mIoU"] <= 1.0 and saved["pixels"] > 0
    preds = sorted(p.name for p in (run / "eval_test_stride32_average_eroded" / "predictions").iterdir())
    assert preds == ["5_colour.png", "5_colour.tif", "5_pred.tif"]
    model, experiment = load_trained(run / "best.safetensors")
    assert experiment == cfg and model.config.num_classes == 6


def test_bf16_autocast_and_grad_checkpointing_train(data_root: Path, tmp_path: Path) -> None:
    cfg = tiny_config(
        data_root, tmp_path / "run", "train.amp=bf16", "model.grad_checkpointing=true", epochs=1, batches_per_epoch=1
    )
    result = train(cfg, log=quiet)
    assert result.finished and torch.isfinite(torch.tensor(result.history[0]["train_loss"]))
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        train(tiny_config(data_root, tmp_path / "fp16", "train.amp=fp16", "train.device=cpu"), log=quiet)


def test_missing_data_is_reported_before_training(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "nowhere", tmp_path / "run", "data.dataset=vaihingen")
    with pytest.raises(ConfigError, match="data.root: folder .*nowhere not found"):
        train(cfg, log=quiet)
    (tmp_path / "nowhere").mkdir()
    with pytest.raises(ValueError, match="missing file"):
        train(cfg, log=quiet)
    assert not (tmp_path / "run").exists()  # nothing was built or written


def test_batch_sampler_skips_consumed_batches() -> None:
    full = list(EpochBatchSampler(epoch=3, start=0, batches=4, batch_size=4))
    assert full[0] == [(3, 0), (3, 1), (3, 2), (3, 3)] and len(full) == 4
    assert list(EpochBatchSampler(3, 2, 4, 4)) == full[2:]
    with pytest.raises(ConfigError, match="divisible"):
        EpochBatchSampler(0, 0, 4, 3, rank=0, world=2)


def test_generic_layout_of_your_own_tiles(tmp_path: Path) -> None:
    """Your own tiles: folders per split and modality, index labels, a validation hold-out."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, stems in (("train", ["a", "b"]), ("test", ["c"])):
        for stem in stems:
            for folder, shape in (("optical", (80, 72, 3)), ("ndsm", (80, 72)), ("labels", (80, 72))):
                (tmp_path / "data" / split / folder).mkdir(parents=True, exist_ok=True)
                high = 6 if folder == "labels" else 255
                Image.fromarray(rng.integers(0, high, shape, dtype=np.uint8)).save(
                    tmp_path / "data" / split / folder / f"{stem}.png"
                )
    cfg = tiny_config(
        tmp_path / "data",
        tmp_path / "run",
        "data.dataset=generic",
        "data.val_fraction=0.5",
        "data.generic.folders={dsm: ndsm}",
        epochs=1,
        batches_per_epoch=1,
    )
    result = train(cfg, log=quiet)
    assert result.finished and result.state.best_epoch == 1
    metrics = evaluate(cfg, result.best, log=quiet).metrics
    assert metrics["pixels"] == 80 * 72  # one test tile, every pixel labelled
