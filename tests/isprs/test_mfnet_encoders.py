"""MFNet on SAM2's Hiera and on DINOv2 (timm): identity at init, stacked = per-modality loop,
what trains, shapes, a short training run, save / load (tiny random encoders, no download)."""

from __future__ import annotations

import pytest
import torch

from mmpeft import reference_forward
from mmpeft_isprs.model import build_mfnet, load_mfnet, save_mfnet
from tests.helpers import assert_close, grad_scale, rel_diff
from tests.isprs.encoders import ENCODERS, S, base_encoder, inputs


def build(name: str, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_mfnet(**{**ENCODERS[name], "img_size": S, **kw})


def randomise_trainables(model: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.encoder.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (0.5 if n.endswith("lam") else 0))


def assert_maps_close(a, b, rel: float) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert_close(x, y, rel=rel)


@pytest.mark.parametrize("name", list(ENCODERS))
@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_identity_at_init(name: str, method: str) -> None:
    model = build(name, method=method).eval()
    base = base_encoder(model.config)
    x = inputs()
    with torch.no_grad():
        feats = model.encoder(x)
        for m, xm in x.items():
            want = base(xm.repeat(1, 3 // xm.shape[1], 1, 1))  # the DSM repeated to 3 channels (default stem)
            assert_maps_close(feats[m], want, rel=1e-5)


@pytest.mark.parametrize("name", list(ENCODERS))
@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_stacked_equals_per_modality_loop(name: str, method: str) -> None:
    model = build(name, method=method).eval()
    randomise_trainables(model)
    x = inputs(seed=2)
    with torch.no_grad():
        stacked = model.encoder(x)
        loop = reference_forward(model.encoder, x)
        for m in x:
            assert_maps_close(stacked[m], loop[m], rel=1e-5)
        # the updates act: the optical output is no longer the frozen encoder's
        base = base_encoder(model.config)
        assert rel_diff(stacked["optical"][-1], base(x["optical"])[-1]) > 1e-4
        logits = model(x)
        model.config.execution = "per_modality"
        assert_close(model(x), logits, rel=1e-5)


def scene(size: int = S, b: int = 2, seed: int = 3) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Smooth random optical and DSM images (8 x 8 noise upsampled) and labels read off them:
    class = (DSM > 0.5) + 2 * (mean optical > 0.5), so that the task can be learnt."""
    g = torch.Generator().manual_seed(seed)

    def up(c):
        return torch.nn.functional.interpolate(torch.rand(b, c, 8, 8, generator=g), size=(size, size), mode="bilinear")

    x = {"optical": up(3), "dsm": up(1)}
    y = (x["dsm"][:, 0] > 0.5).long() + 2 * (x["optical"].mean(1) > 0.5).long()
    return x, y


def _steps(model: torch.nn.Module, n: int, lr: float = 0.01, size: int = S) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    x, y = scene(size)
    losses = []
    for _ in range(n):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", list(ENCODERS))
@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_only_trainables_change_and_all_get_gradients(name: str, method: str) -> None:
    model = build(name, method=method)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert frozen and start
    _steps(model, 2)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
            assert not torch.equal(p, start[n]), n
        else:
            assert p.grad is None and torch.equal(p, frozen[n]), n
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith(("dfm.", "decoder.")) or "lora_" in n or "adapter_" in n or "lam" in n for n in trainable)


def test_placements_follow_the_library_presets() -> None:
    """MMLoRA: per-modality LoRA on q and v of the fused qkv, mixed LoRA on the MLP linears; MMAdapter:
    an adapter after the attention and one beside the MLP; every block of Hiera, pooled-query ones too."""
    for name, blocks in (("sam2", 4), ("dinov2", 4)):
        lora = dict(build(name, method="lora").encoder.layers())
        adapter = dict(build(name, method="adapter").encoder.layers())
        assert sorted(lora) == sorted(
            f"base_model.trunk.blocks.{i}.{s}" for i in range(blocks) for s in ("attn.qkv", "mlp.fc1", "mlp.fc2")
        )
        assert sorted(adapter) == sorted(
            f"base_model.trunk.blocks.{i}.{s}" for i in range(blocks) for s in ("attn", "mlp")
        )
        qkv = lora["base_model.trunk.blocks.1.attn.qkv"]  # Hiera: block 1 pools its queries
        assert type(qkv.lora_fusion).__name__ == "NoFusion" and list(qkv.slices) == ["q", "v"]
        assert type(lora["base_model.trunk.blocks.1.mlp.fc1"].lora_fusion).__name__ == "ScalarFusion"
        after, beside = adapter["base_model.trunk.blocks.1.attn"], adapter["base_model.trunk.blocks.1.mlp"]
        assert (after.placement, beside.placement) == ("after", "beside")
        assert (
            type(after.adapter_fusion).__name__ == "NoFusion" and type(beside.adapter_fusion).__name__ == "ScalarFusion"
        )


@pytest.mark.parametrize("name", list(ENCODERS))
@pytest.mark.parametrize("size", [256, 512])
def test_output_shapes(name: str, size: int) -> None:
    model = build(name, method="adapter", img_size=size).eval()
    x = inputs(size, b=1)
    with torch.no_grad():
        feats = model.encoder(x)["optical"]
        levels = model.dfm([feats, model.encoder(x)["dsm"]])
        logits = model(x)
    if name == "sam2":
        assert [tuple(f.shape) for f in feats] == [
            (1, 16 * 2**i, size // 4 // 2**i, size // 4 // 2**i) for i in range(4)
        ]
    else:  # 4 blocks of width 32 on the stride-16 grid (the input resized to grid * 14)
        assert [tuple(f.shape) for f in feats] == [(1, 32, size // 16, size // 16)] * 4
        assert model.encoder.base_model.input_size == (size // 16 * 14,) * 2
    assert [tuple(t.shape) for t in levels] == [(1, 256, size // s, size // s) for s in (4, 8, 16, 32)]
    assert logits.shape == (1, 6, size, size)


@pytest.mark.slow  # about 15 s each on one free CPU core
@pytest.mark.parametrize("name", list(ENCODERS))
def test_a_short_training_run_lowers_the_loss(name: str) -> None:
    model = build(name, method="lora")
    losses = _steps(model, 24, lr=1e-2)
    assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.parametrize("name", list(ENCODERS))
def test_save_and_load_reproduce_outputs(name: str, tmp_path) -> None:
    model = build(name, method="adapter")
    _steps(model, 2)
    model.eval()
    x = inputs(seed=5)
    with torch.no_grad():
        want = model(x)
    save_mfnet(model, tmp_path / "m.safetensors")
    loaded = load_mfnet(tmp_path / "m.safetensors").eval()
    # no checkpoint in the config: the frozen weights are copied as an encoder file would provide them
    loaded.encoder.base_model.load_state_dict(model.encoder.base_model.state_dict())
    with torch.no_grad():
        assert torch.equal(loaded(x), want)


@pytest.mark.parametrize("name", list(ENCODERS))
def test_missing_modality_and_no_dfm(name: str) -> None:
    """Optical alone equals the pair with every DSM sample marked absent; Table V's "without DFM"
    (the encoders' maps summed level by level, one pyramid) runs on the lists of maps."""
    model = build(name, method="lora").eval()
    randomise_trainables(model)
    x = inputs(seed=9)
    with torch.no_grad():
        alone = model({"optical": x["optical"]})
        masked = model(
            x, presence={"optical": torch.ones(2, dtype=torch.bool), "dsm": torch.zeros(2, dtype=torch.bool)}
        )
        assert_close(alone, masked, rel=1e-5)
        assert rel_diff(alone, model(x)) > 1e-5  # the DSM does count when present
        no_dfm = build(name, method="lora", dfm=False).eval()
        assert no_dfm(x).shape == (2, 6, S, S)


@pytest.mark.parametrize("name", list(ENCODERS))
def test_gradient_checkpointing_gives_the_same_gradients(name: str) -> None:
    grads = []
    for ckpt in (False, True):
        model = build(name, method="lora", grad_checkpointing=ckpt)
        randomise_trainables(model)
        x, y = scene()
        torch.nn.functional.cross_entropy(model.train()(x), y).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    scale = grad_scale(*grads)  # a gradient may be rounding noise alone: compare to the largest
    for n in grads[0]:
        assert_close(grads[0][n], grads[1][n], rel=1e-5, scale=scale, msg=n)
