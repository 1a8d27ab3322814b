"""The stock Hugging Face ``Trainer`` trains a wrapped ``ViTForImageClassification`` (two
modalities): the forward's named ``pixel_values`` / ``labels`` keep the columns and give the label
names, the output's ``"loss"`` is the mean of the modalities' losses, ``num_items_in_batch`` makes
accumulation exact; :class:`mmpeft.interop.trainer.MultimodalTrainer` checkpoints in mmpeft's
adapter format, which ``load_multimodal`` reads and ``resume_from_checkpoint`` continues from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from mmpeft import load_multimodal, wrap_multimodal
from tests.helpers import assert_close, randomise_trainables
from tests.hf_zoo import vit_classifier

transformers = pytest.importorskip("transformers")
from mmpeft.interop.trainer import MultimodalTrainer  # noqa: E402  (imports transformers)

MODS = ("optical", "dsm")


def _wrapped() -> Any:
    w = wrap_multimodal(vit_classifier(), MODS, preset="mmlora", stems={"dsm": ("repeat", 1)})
    return randomise_trainables(w)  # LoRA B at zero would leave A without a gradient at the first step


class _Data(torch.utils.data.Dataset):
    """Samples as a user's dataset gives them: the inputs under the base model's name, the labels,
    and a column the model does not take (dropped by ``remove_unused_columns``)."""

    def __init__(self, n: int, seed: int = 1) -> None:
        g = torch.Generator().manual_seed(seed)
        self.optical, self.dsm = torch.rand(n, 3, 32, 32, generator=g), torch.rand(n, 1, 32, 32, generator=g)
        self.labels = torch.randint(0, 4, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        x = {"optical": self.optical[i], "dsm": self.dsm[i]}
        return {"pixel_values": x, "labels": self.labels[i], "tile_name": f"tile_{i}"}


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """{"pixel_values": {modality: (B, c, H, W)}, "labels": (B,)} (the default collator stacks no dict)."""
    assert all("tile_name" not in s for s in samples), "remove_unused_columns kept a column the model does not take"
    x = {m: torch.stack([s["pixel_values"][m] for s in samples]) for m in MODS}
    return {"pixel_values": x, "labels": torch.stack([s["labels"] for s in samples])}


def _batch(data: _Data, n: int) -> dict[str, Any]:
    """The first ``n`` samples as the Trainer hands them to the model (the extra column dropped)."""
    return collate([{k: v for k, v in data[i].items() if k != "tile_name"} for i in range(n)])


def _args(out: Path, **kw: Any) -> Any:
    base = dict(output_dir=str(out), report_to=[], use_cpu=True, seed=0, save_strategy="no", disable_tqdm=True)
    return transformers.TrainingArguments(**{**base, **kw})


def _trainables(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.trainable_state_dict().items()}


def _train(trainer_class: Any, out: Path, data: Any, dtype: torch.dtype = torch.float32, **kw: Any) -> tuple[Any, Any]:
    model = _wrapped().to(dtype)
    trainer = trainer_class(model, _args(out, **kw), train_dataset=data, eval_dataset=data, data_collator=collate)
    trainer.train()
    return model, trainer


def test_accumulation_equals_the_large_batch(tmp_path: Path) -> None:
    """Batch 2 x 2 accumulated against batch 4, SGD (an update proportional to the gradient, so a
    loss off by the accumulation factor shows: it was 2.000x before ``num_items_in_batch``). In
    float64, so that the updates (~1e-3 of weights ~0.1) are compared far above rounding."""
    data = _Data(8)
    start = _trainables(_wrapped().double())
    sgd = dict(optim="sgd", learning_rate=0.5, max_steps=2, lr_scheduler_type="constant")
    big, _ = _train(transformers.Trainer, tmp_path / "a", data, torch.float64, per_device_train_batch_size=4, **sgd)
    acc, _ = _train(
        transformers.Trainer,
        tmp_path / "b",
        data,
        torch.float64,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        **sgd,
    )
    for k, v in _trainables(big).items():
        assert v.dtype == torch.float64 and not torch.equal(v, start[k]), f"{k} did not train in float64"
        assert_close(_trainables(acc)[k] - start[k], v - start[k], rel=1e-6, msg=k)


def test_columns_labels_and_eval_loss(tmp_path: Path) -> None:
    """``remove_unused_columns`` (default) keeps ``pixel_values`` and ``labels`` (the collator
    asserts the extra column went), the label names are found, ``evaluate()`` gives ``eval_loss``:
    the mean over the modalities of each modality's mean loss, computed here by hand.
    ``compute_metrics`` gets one prediction per modality (model order) with its ``logits``
    (peft's model: the logits alone)."""
    data = _Data(6)
    model, trainer = _train(transformers.Trainer, tmp_path, data, max_steps=1, per_device_eval_batch_size=6)
    assert trainer.args.remove_unused_columns and trainer.label_names == ["labels"]
    assert trainer.model_accepts_loss_kwargs
    seen: list[Any] = []
    trainer.compute_metrics = lambda p: seen.append(p.predictions) or {}
    metrics = trainer.evaluate()
    batch = _batch(data, len(data))
    model.eval()
    with torch.no_grad():
        out = model(**batch)
        logits = {m: out[m].logits for m in MODS}
    by_hand = sum(torch.nn.functional.cross_entropy(logits[m], batch["labels"]) for m in MODS) / len(MODS)
    assert_close(torch.tensor(metrics["eval_loss"]), by_hand, rel=1e-5)
    assert_close(out.loss, by_hand, rel=1e-6)
    assert list(out) == ["loss", *MODS] and out.outputs().keys() == set(MODS)
    assert isinstance(seen[0], tuple) and len(seen[0]) == len(MODS)
    for m, prediction in zip(MODS, seen[0]):
        assert_close(torch.as_tensor(prediction["logits"]), logits[m], rel=1e-6)


def test_checkpoints_hold_the_adapter_files_and_load(tmp_path: Path) -> None:
    """Every checkpoint and ``save_model`` hold mmpeft's files (the trainables and config only, no
    ``model.safetensors``); ``load_multimodal`` on a fresh base reproduces the trained model exactly."""
    data = _Data(8)
    model, trainer = _train(
        MultimodalTrainer,
        tmp_path,
        data,
        max_steps=2,
        per_device_train_batch_size=4,
        save_strategy="steps",
        save_steps=1,
    )
    trainer.save_model(str(tmp_path / "final"))
    trained = model.trainable_state_dict()
    for folder in (tmp_path / "checkpoint-2", tmp_path / "final"):
        assert (folder / "adapter_model.safetensors").is_file() and not (folder / "model.safetensors").exists()
        assert json.loads((folder / "mmpeft_config.json").read_text())["format"] == "mmpeft"
        with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
            assert set(f.keys()) == set(trained)
        loaded = load_multimodal(vit_classifier(), folder)
        batch = _batch(data, 4)
        model.eval()
        with torch.no_grad():
            want, got = model(**batch), loaded(**batch)
        for m in MODS:
            assert_close(got[m].logits, want[m].logits, rel=0)
    assert (tmp_path / "checkpoint-1" / "optimizer.pt").is_file()  # the rest of a checkpoint is the Trainer's


@pytest.mark.parametrize("trainer_class", [MultimodalTrainer, transformers.Trainer], ids=["mmpeft", "stock"])
def test_resume_continues_the_run(trainer_class: Any, tmp_path: Path) -> None:
    """A run resumed from its step-2 checkpoint ends where the uninterrupted 4-step run ends (AdamW:
    the optimizer state comes back too), from mmpeft's checkpoint files and from the stock
    Trainer's own (the whole state dict in ``model.safetensors``)."""
    data = _Data(8)
    kw = dict(max_steps=4, per_device_train_batch_size=2, save_strategy="steps", save_steps=2)
    whole, _ = _train(trainer_class, tmp_path, data, **kw)
    stock = trainer_class is transformers.Trainer
    assert (tmp_path / "checkpoint-2" / "model.safetensors").is_file() == stock
    if stock:  # no config in it: load_multimodal says what wrote it and the way
        with pytest.raises(FileNotFoundError, match="stock transformers.Trainer.*MultimodalTrainer"):
            load_multimodal(vit_classifier(), tmp_path / "checkpoint-2")
    model = _wrapped()
    trainer = trainer_class(model, _args(tmp_path / "r", **kw), train_dataset=data, data_collator=collate)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert trainer.state.global_step == 4
    want = _trainables(whole)
    for k, v in _trainables(model).items():
        assert_close(v, want[k], rel=1e-6, msg=k)


def test_one_modality_trains_as_peft_does_with_the_stock_trainer(tmp_path: Path) -> None:
    """peft's model through the stock Trainer is the reference: a one-modality, non-mixing wrap
    exported to peft (the same weights), both trained with batch 2 x 2 accumulated (SGD): the same
    label names and loss-kwargs handling, the same trained outputs and ``eval_loss``. Kept
    differences (docs/peft.md): the wrapped forward names ``inputs`` / ``pixel_values`` /
    ``labels`` / ``presence`` rather than every parameter of the base model's forward, and the
    stock Trainer saves it as a whole state dict (``MultimodalTrainer`` saves the adapter files)."""
    peft = pytest.importorskip("peft")
    from mmpeft.interop.peft_interop import export_peft

    ours = randomise_trainables(wrap_multimodal(vit_classifier(), ("optical",), preset="lora"))
    export_peft(ours, "optical", tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(vit_classifier(), str(tmp_path / "peft"), is_trainable=True)
    data = _Data(8)

    def plain(samples: list[dict[str, Any]]) -> dict[str, Any]:
        return {"pixel_values": torch.stack([s["pixel_values"]["optical"] for s in samples]), **_labels(samples)}

    def one(samples: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "pixel_values": {"optical": torch.stack([s["pixel_values"]["optical"] for s in samples])},
            **_labels(samples),
        }

    kw = dict(optim="sgd", learning_rate=0.5, max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    results = {}
    for name, model, collator in (("peft", theirs, plain), ("mmpeft", ours, one)):
        trainer = transformers.Trainer(
            model, _args(tmp_path / name, **kw), train_dataset=data, eval_dataset=data, data_collator=collator
        )
        trainer.train()
        assert trainer.label_names == ["labels"] and trainer.model_accepts_loss_kwargs
        model.eval()
        with torch.no_grad():
            logits = model(**collator([data[i] for i in range(8)]))
        results[name] = (trainer.evaluate()["eval_loss"], logits)
    assert_close(results["mmpeft"][1]["optical"].logits, results["peft"][1].logits, rel=1e-5)
    assert_close(torch.tensor(results["mmpeft"][0]), torch.tensor(results["peft"][0]), rel=1e-5)


def _labels(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {"labels": torch.stack([s["labels"] for s in samples])}


def test_activation_checkpointing_trains_the_same(tmp_path: Path) -> None:
    """``activation_checkpointing=True`` (the Trainer calls ``activation_checkpointing_enable``):
    the base model checkpoints its layers and every trainable ends where it ends without it."""
    data = _Data(4)
    kw = dict(optim="sgd", learning_rate=0.5, max_steps=2, per_device_train_batch_size=2)
    plain, _ = _train(transformers.Trainer, tmp_path / "a", data, **kw)
    checkpointed, _ = _train(transformers.Trainer, tmp_path / "b", data, activation_checkpointing=True, **kw)
    assert checkpointed.base_model.is_activation_checkpointing and not plain.base_model.is_activation_checkpointing
    want = _trainables(plain)
    for k, v in _trainables(checkpointed).items():
        assert_close(v, want[k], rel=1e-6, msg=k)
    with pytest.raises(TypeError, match="set_grad_checkpointing"):
        wrap_multimodal(
            torch.nn.Sequential(torch.nn.Linear(4, 4)), MODS, targets=["0"], in_channels=4, probe=False
        ).activation_checkpointing_enable()


def test_a_named_set_trains_checkpoints_and_resumes(tmp_path: Path) -> None:
    """As peft lays out several adapters: the checkpoint holds ``"default"`` in the folder and set
    ``"b"`` in ``b/``; resuming with ``"b"`` active loads ``b/`` into it, and ``"default"`` stays as built."""
    data = _Data(8)

    def two_sets() -> Any:
        model = _wrapped()
        model.add_adapter("b", preset="lora")
        model.set_adapter("b")
        return randomise_trainables(model, seed=7)

    kw = dict(max_steps=4, per_device_train_batch_size=2, save_strategy="steps", save_steps=2)
    whole = two_sets()
    MultimodalTrainer(whole, _args(tmp_path, **kw), train_dataset=data, data_collator=collate).train()
    folder = tmp_path / "checkpoint-2"
    assert (folder / "mmpeft_config.json").is_file() and (folder / "b" / "adapter_model.safetensors").is_file()
    model = two_sets()
    trainer = MultimodalTrainer(model, _args(tmp_path / "r", **kw), train_dataset=data, data_collator=collate)
    trainer.train(resume_from_checkpoint=str(folder))
    want = _trainables(whole)
    for k, v in _trainables(model).items():
        assert_close(v, want[k], rel=1e-6, msg=k)
    model.set_adapter("default")
    built = _trainables(_wrapped())
    for k, v in _trainables(model).items():
        assert torch.equal(v, built[k]), f"set 'default' changed: {k}"


def test_load_best_model_at_end_reads_the_adapter_files(tmp_path: Path) -> None:
    """``load_best_model_at_end``: the best checkpoint's adapter files come back into the model (also
    after the trainables were changed since: the load is what sets them)."""
    from mmpeft.model.io import read_adapter

    data = _Data(8)
    kw = dict(max_steps=4, per_device_train_batch_size=2, eval_strategy="steps", eval_steps=2, save_steps=2)
    model, trainer = _train(MultimodalTrainer, tmp_path, data, save_strategy="steps", load_best_model_at_end=True, **kw)
    best = trainer.state.best_model_checkpoint
    assert best is not None and not (Path(best) / "model.safetensors").exists()
    saved = read_adapter(best)[0]
    assert all(torch.equal(v, saved[k]) for k, v in model.trainable_state_dict().items())
    randomise_trainables(model, seed=11)
    trainer._load_best_model()
    assert all(torch.equal(v, saved[k]) for k, v in model.trainable_state_dict().items())


def test_label_smoothing_smooths_each_modality(tmp_path: Path) -> None:
    """``label_smoothing_factor``: the stock Trainer reads ``outputs["logits"]`` (a multimodal
    output has one per modality) and stops naming the fix; MultimodalTrainer's loss is the mean
    over the modalities of each one's smoothed cross-entropy, computed here by hand, also under
    gradient accumulation (``num_items_in_batch``)."""
    data = _Data(4)
    batch = _batch(data, 4)
    with pytest.raises(KeyError, match="MultimodalTrainer, which smooths each modality's loss"):
        _train(transformers.Trainer, tmp_path / "stock", data, max_steps=1, label_smoothing_factor=0.1)
    model = _wrapped()
    trainer = MultimodalTrainer(model, _args(tmp_path / "ours", label_smoothing_factor=0.1), data_collator=collate)
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        half = trainer.compute_loss(model, dict(batch), num_items_in_batch=8)  # this micro-batch is half of 8
        logits = {m: model(pixel_values=batch["pixel_values"])[m].logits for m in MODS}
    ce = torch.nn.functional.cross_entropy
    by_hand = sum(ce(logits[m], batch["labels"], label_smoothing=0.1) for m in MODS) / len(MODS)
    assert_close(loss, by_hand, rel=1e-6)
    assert_close(half, by_hand / 2, rel=1e-6)
    model.train()
    trainer.train_dataset, trainer.args.max_steps = data, 1
    start = _trainables(model)
    trainer.train()
    assert any(not torch.equal(v, start[k]) for k, v in _trainables(model).items())


@pytest.mark.parametrize(("problem", "num_labels"), [("regression", 1), ("multi_label_classification", 3)])
def test_accumulation_is_exact_for_regression_and_multi_label_heads(
    tmp_path: Path, problem: str, num_labels: int
) -> None:
    """transformers' MSE / BCE losses ignore ``num_items_in_batch`` (the plain model's accumulated
    update is 2.000x the large batch's too): each modality's loss is made a sum over that count,
    so batch 2 x 2 accumulated updates as batch 4 does (it was 2.000x), in float64."""
    g = torch.Generator().manual_seed(0)
    shape = (8,) if num_labels == 1 else (8, num_labels)
    labels = torch.rand(shape, generator=g, dtype=torch.float64)
    labels = labels if problem == "regression" else (labels > 0.5).double()
    x = {"optical": torch.rand(8, 3, 32, 32, generator=g), "dsm": torch.rand(8, 1, 32, 32, generator=g)}
    data = [{"pixel_values": {m: v[i].double() for m, v in x.items()}, "labels": labels[i]} for i in range(8)]
    sgd = dict(optim="sgd", learning_rate=0.5, max_steps=1, lr_scheduler_type="constant", max_grad_norm=0.0)
    updates = []
    for batch, accumulate in ((4, 1), (2, 2)):
        base = vit_classifier(num_labels=num_labels, problem_type=problem)
        model = randomise_trainables(wrap_multimodal(base, MODS, preset="mmlora", stems={"dsm": ("repeat", 1)}))
        model = model.double()
        start = _trainables(model)
        args = _args(
            tmp_path / str(batch), per_device_train_batch_size=batch, gradient_accumulation_steps=accumulate, **sgd
        )
        transformers.Trainer(model, args, train_dataset=data, data_collator=collate).train()
        updates.append({k: v - start[k] for k, v in _trainables(model).items()})
    for k, big in updates[0].items():
        assert big.abs().max() > 0, f"{k} did not train"
        assert_close(updates[1][k], big, rel=1e-6, msg=k)


def test_a_modality_named_loss_keeps_its_output_without_labels(tmp_path: Path) -> None:
    """Without labels= a classifier's outputs became a MultimodalOutput, whose "loss" is the
    combined loss: a modality named "loss" was dropped from the smoothed loss (1.397947, the other
    modality's alone, instead of the mean 1.398586). It stays a plain dict, and the smoothed loss
    covers both."""
    model = wrap_multimodal(vit_classifier(), ("loss", "dsm"), preset="mmlora", stems={"dsm": ("repeat", 1)})
    model.eval()
    x = {"loss": torch.rand(2, 3, 32, 32), "dsm": torch.rand(2, 1, 32, 32)}
    labels = torch.tensor([0, 1])
    trainer = MultimodalTrainer(model, _args(tmp_path, label_smoothing_factor=0.1))
    with torch.no_grad():
        out = model(pixel_values=x)
        loss = trainer.compute_loss(model, {"pixel_values": x, "labels": labels})
    assert list(out) == ["loss", "dsm"] and not hasattr(out, "outputs")
    ce = torch.nn.functional.cross_entropy
    assert_close(loss, sum(ce(out[m].logits, labels, label_smoothing=0.1) for m in ("loss", "dsm")) / 2, rel=1e-6)


def test_label_smoothing_on_a_model_of_ones_own_is_refused_naming_the_way(tmp_path: Path) -> None:
    from tests.tiny_models import tiny_timm_vit

    model = wrap_multimodal(tiny_timm_vit(), MODS, "lora", targets=["qkv"])
    with pytest.raises(ValueError, match="give compute_loss_func= a loss over each modality's output"):
        MultimodalTrainer(model, _args(tmp_path, label_smoothing_factor=0.1))
