"""MFNet assembled from mmpeft: shapes, what trains, save/load, SAM checkpoints, presets."""

from __future__ import annotations

import pytest
import torch

from mmpeft.backbones import SAM_SPECS, replace_spec
from mmpeft_isprs.model import MFNET_PRESETS, MFNetConfig, build_mfnet, load_mfnet, mfnet_preset, save_mfnet

TINY = dict(backbone="vit_tiny", embed_dim=32, depth=2, num_heads=2)


def _inputs(size: tuple[int, int], b: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"optical": torch.rand(b, 3, *size, generator=g), "dsm": torch.rand(b, 1, *size, generator=g)}


@pytest.mark.parametrize("size", [(256, 256), (448, 448), (256, 384)])
def test_shapes_at_every_stage(size: tuple[int, int]) -> None:
    model = build_mfnet(**TINY, img_size=list(size), method="adapter").eval()
    x = _inputs(size, b=1)
    h, w = size[0] // 16, size[1] // 16
    with torch.no_grad():
        feats = model.encoder(x)
        assert all(f.shape == (1, 256, h, w) for f in feats.values())
        levels = model.dfm([feats["optical"], feats["dsm"]])
        assert [tuple(t.shape[-2:]) for t in levels] == [(4 * h, 4 * w), (2 * h, 2 * w), (h, w), (h // 2, w // 2)]
        logits = model(x)
    assert logits.shape == (1, 6, *size)


S = 128  # small inputs keep the training tests fast (any multiple of 32 works)


def _train_steps(model, steps: int = 2) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9, weight_decay=5e-4)
    model.train()
    x = _inputs((S, S))
    y = torch.randint(0, 6, (2, S, S))
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y, ignore_index=255).backward()
        opt.step()


@pytest.mark.parametrize("method", ["adapter", "lora"])
def test_gradients_only_in_what_trains(method: str) -> None:
    model = build_mfnet(**TINY, method=method, img_size=S)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    _train_steps(model, steps=2)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None and torch.equal(p, frozen[n]), n
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith(("dfm.", "decoder.")) or "lora_" in n or "adapter_" in n for n in trainable)


def test_exact_save_and_load_of_a_trained_model(tmp_path) -> None:
    model = build_mfnet(**TINY, method="adapter", img_size=S)
    _train_steps(model)
    model.eval()
    x = _inputs((S, S), seed=3)
    with torch.no_grad():
        expected = model(x)
    path = tmp_path / "mfnet.safetensors"
    save_mfnet(model, path)
    # the file holds only what trains: no frozen encoder tensor
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if k.startswith("encoder.") and "adapter_" not in k]
    torch.manual_seed(123)  # a different random frozen encoder would change the output ...
    loaded = load_mfnet(path).eval()
    # ... so copy the frozen weights, as a SAM checkpoint would provide them
    loaded.encoder.base_model.load_state_dict(model.encoder.base_model.state_dict())
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_save_load_with_sam_checkpoint_reproduces_outputs(tmp_path) -> None:
    from tests.tiny_models import official_sam_state as official_state

    spec = replace_spec(SAM_SPECS["vit_tiny"], embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,))
    ckpt = tmp_path / "sam_tiny.pth"
    torch.save(official_state(spec), ckpt)
    model = build_mfnet(**TINY, method="lora", checkpoint=str(ckpt), img_size=S)
    assert model.load_report is not None and not model.load_report.missing
    _train_steps(model)
    model.eval()
    x = _inputs((S, S), seed=4)
    with torch.no_grad():
        expected = model(x)
    save_mfnet(model, tmp_path / "m.safetensors")
    loaded = load_mfnet(tmp_path / "m.safetensors").eval()  # SAM path from the saved config
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    other = tmp_path / "other.pth"
    torch.save(official_state(spec, seed=9), other)
    with torch.no_grad():  # a different SAM file gives a different model
        assert not torch.equal(load_mfnet(tmp_path / "m.safetensors", checkpoint=str(other)).eval()(x), expected)


def test_bad_sizes_are_explained() -> None:
    with pytest.raises(ValueError, match="multiples of 32"):
        MFNetConfig(img_size=250)
    model = build_mfnet(**TINY)
    with pytest.raises(ValueError, match="built for 256x256"):
        model(_inputs((320, 320), b=1))
    with pytest.raises(ValueError, match="multiples of 32"):
        model(_inputs((250, 250), b=1))
    x = _inputs((256, 256), b=1)
    x["dsm"] = x["dsm"][..., :128]
    with pytest.raises(ValueError, match="same batch and spatial sizes"):
        model(x)
    with pytest.raises(ValueError, match="unknown MFNet config keys \\['bakbone'\\]"):
        build_mfnet({"bakbone": "vit_b"})


PAPER_ENCODER = {
    ("vit_b", "adapter"): 14_201_880,
    ("vit_l", "adapter"): 50_454_576,
    ("vit_h", "adapter"): 105_062_464,
    ("vit_b", "lora"): 1_032_240,
    ("vit_l", "lora"): 2_752_608,
    ("vit_h", "lora"): 4_587_648,
}


@pytest.mark.parametrize("backbone,method", sorted(PAPER_ENCODER))
def test_table_vi_counts_of_full_models(backbone: str, method: str) -> None:
    with torch.device("meta"):
        model = build_mfnet(backbone=backbone, method=method)
    groups = model.parameter_groups()
    assert groups["encoder (trainable)"]["trainable"] == PAPER_ENCODER[(backbone, method)]
    assert groups["dfm"]["trainable"] + groups["decoder"]["trainable"] == 2_158_238
    if (backbone, method) == ("vit_b", "adapter"):  # checkpoint: ~16.4 M parameters, well under 100 MB
        n = sum(v.numel() for v in model.trainable_state_dict().values())
        assert 16_360_118 <= n < 16_400_000 and n * 4 < 100e6


@pytest.mark.parametrize("name", sorted(MFNET_PRESETS))
def test_every_preset_builds_and_runs(name: str) -> None:
    cfg = mfnet_preset(name, **TINY, img_size=S)
    model = build_mfnet(cfg).eval()
    x = _inputs((S, S), b=1)
    with torch.no_grad():
        out = model({m: x[m] for m in cfg.modalities})
    assert out.shape == (1, 6, S, S)
    frozen_encoder = name == "t4_optical_frozen"
    assert any(p.requires_grad for n, p in model.encoder.named_parameters()) != frozen_encoder
    if name.startswith("authors"):
        rel = [p for n, p in model.encoder.named_parameters() if "rel_pos" in n]
        assert rel and all(float(p.abs().sum()) == 0.0 for p in rel)
