"""Experiment configs: bundled files, dotted overrides, typed values, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmpeft_isprs.config import (
    ConfigError,
    ExperimentConfig,
    bundled_configs,
    config_from_dict,
    load_config,
    parse_overrides,
    resolve_config_path,
    yaml_load,
)

PAPER = [
    f"{d}_{m}_{b}"
    for d in ("vaihingen", "potsdam", "mmhunan")
    for m in ("mmadapter", "mmlora")
    for b in ("vit_b", "vit_l", "vit_h")
]


def test_bundled_configs_cover_the_paper_runs() -> None:
    assert set(bundled_configs()) == {*PAPER, "demo", "synthetic", "potsdam_rgb_nir_dsm_mmadapter_vit_b"}
    for name in PAPER:
        cfg = load_config(name)
        dataset, method, backbone = name.split("_", 2)
        assert cfg.name == name and cfg.data.dataset == dataset and cfg.model.backbone == backbone
        assert cfg.model.method == ("adapter" if method == "mmadapter" else "lora") and cfg.model.fusion == "scalar"
        assert cfg.train.batch_size == (4 if backbone == "vit_h" else 10)
        t, e = cfg.train, cfg.eval
        assert (t.epochs, t.batches_per_epoch, t.optimizer, t.lr, t.momentum, t.weight_decay) == (
            50,
            1000,
            "sgd",
            0.01,
            0.9,
            5e-4,
        )
        assert (t.milestones, t.gamma, t.flips, t.rotations) == ([25, 35, 45], 0.1, True, False)
        assert (cfg.model.size, e.stride, e.mode) == ((256, 256), 32, "logit_sum")
        assert cfg.model.num_classes == (7 if dataset == "mmhunan" else 6)
        assert e.labels == ("full" if dataset == "mmhunan" else "eroded")
        assert Path(cfg.model.checkpoint).name.startswith(f"sam_{backbone}_")


def test_overrides_are_yaml_typed() -> None:
    cfg = load_config(
        "demo",
        [
            "train.lr=5e-3",
            "model.modalities=[optical]",
            "data.val_ids=[9, 2_10, 010]",
            "train.milestones=[2, 4]",
            "eval.tta_flip=true",
            "model.stems.dsm=conv",
        ],
    )
    assert cfg.train.lr == 0.005 and isinstance(cfg.train.lr, float)
    assert cfg.model.modalities == ["optical"]
    assert cfg.data.val_ids == ["9", "2_10", "010"]  # Potsdam ids stay strings, no octal
    assert cfg.train.milestones == [2, 4] and cfg.eval.tta_flip is True
    assert cfg.model.stems == {"dsm": "conv"}
    assert yaml_load("5e-4") == 5e-4 and yaml_load("2_10") == "2_10"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trian.lr=1", "unknown config key 'trian'; did you mean 'train'"),
        ("train.lrr=0.1", "unknown config key 'train.lrr'; did you mean 'train.lr'"),
        ("data.synthetic.tile_sise=64", "'data.synthetic.tile_sise'; did you mean 'data.synthetic.tile_size'"),
        ("model.backbon=vit_b", "did you mean 'model.backbone'"),
        ("train.lr=fast", "train.lr: expected a number, got 'fast'"),
        ("train.epochs=2.5", "train.epochs: expected an integer"),
        ("train.amp=fp8", "train.amp: must be one of ['none', 'bf16', 'fp16']"),
        ("model.backbone=vit_x", "unknown backbone 'vit_x'"),
        ("data.crop_size=128", "data.crop_size was removed: the training crop side is model.img_size"),
        ("eval.window=128", "eval.window was removed: the evaluation window is model.img_size"),
        ("train.grad_checkpointing=true", "train.grad_checkpointing moved to the model config"),
        ("model.fusion=scalr", "unknown fusion rule 'scalr'; known:"),
        ("model.num_classes=7", "model.num_classes: synthetic has 6 classes"),
        ("model.modalities=[optical, sar]", "model.modalities"),
        ("model_preset=t4_lorra", "did you mean t4_lora"),
        ("train.lr", "not of the form key.sub=value"),
        ("train.lr.x=1", "train.lr is not a section"),
        ("eval.stride=999", "eval.stride"),
    ],
)
def test_errors_name_the_key(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("demo", [override])
    assert expected in str(info.value)


def test_unknown_key_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("name: x\ntrain:\n  epochs: 2\n  batch_sise: 4\n")
    with pytest.raises(ConfigError, match=r"'train.batch_sise'; did you mean 'train.batch_size'"):
        load_config(path)
    path.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)


def test_missing_config_suggests_bundled_names() -> None:
    with pytest.raises(ConfigError, match="did you mean vaihingen_mmadapter_vit_b"):
        resolve_config_path("vaihingen_mmadaptor_vit_b")
    assert resolve_config_path("demo").name == "demo.yaml"


def test_partial_file_takes_defaults_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("name: mine\ndata: {dataset: potsdam, potsdam_bands: irrg, val_ids: [2_10]}\n")
    cfg = load_config(path, ["train.epochs=3"])
    assert cfg.data.potsdam_bands == "irrg" and cfg.data.val_ids == ["2_10"] and cfg.train.epochs == 3
    assert cfg.train.lr == 0.01 and cfg.crop_size == 256
    again = config_from_dict(yaml_load(cfg.to_yaml()))
    assert again == cfg and isinstance(again, ExperimentConfig)


def test_model_preset_applies_under_command_line_overrides() -> None:
    cfg = load_config("vaihingen_mmadapter_vit_l", ["model_preset=t4_optical_lora", "model.rank=8"])
    assert (cfg.model.method, cfg.model.fusion, cfg.model.modalities, cfg.model.rank) == (
        "lora",
        "none",
        ["optical"],
        8,
    )
    assert cfg.model.backbone == "vit_l"  # the rest of the file's model section stays
    exact = load_config("vaihingen_mmadapter_vit_b", ["model_preset=authors_mmadapter"])
    assert exact.model.preset == "mmadapter_authors" and exact.model.zero_rel_pos is True
    assert config_from_dict(exact.to_dict()) == exact  # recorded, not applied twice


def test_parse_overrides() -> None:
    assert parse_overrides(["a.b=1", "c=[x, y]", "d="]) == [("a.b", 1), ("c", ["x", "y"]), ("d", "")]
    with pytest.raises(ConfigError):
        parse_overrides(["=3"])
