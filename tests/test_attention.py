"""mmpeft.runtime.attention: padding-free windows and fused attention compute the stock blocks' function."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mmpeft import only_modality, set_execution, wrap_multimodal
from mmpeft.runtime.attention import disable_efficient_attention, efficient_attention_blocks, enable_efficient_attention
from mmpeft.runtime.checkpointing import disable_gradient_checkpointing, enable_gradient_checkpointing
from mmpeft.tuners import MultimodalAdapter, MultimodalLoRA
from tests.helpers import assert_close, close, grad_scale
from tests.tiny_models import tiny_sam, tiny_timm_sam, tiny_timm_vit

ENCODERS = {"segment_anything": tiny_sam, "timm": tiny_timm_sam}


def _perturb(model: nn.Module, seed: int = 1) -> None:
    """Non-zero LoRA B / adapter up weights and lambdas away from 0.5: every update matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("impl", sorted(ENCODERS))
@pytest.mark.parametrize("img_size", [64, 96, 80])  # grid 4 (pads to 6), 6 (no padding), 5 (pads to 6)
def test_bare_encoder_matches_stock_blocks(impl: str, img_size: int) -> None:
    enc = ENCODERS[impl](img_size=img_size)
    x = torch.randn(3, 3, img_size, img_size)
    with torch.no_grad():
        ref = enc(x)
        names = enable_efficient_attention(enc)
        out = enc(x)
    assert names == ["blocks.0", "blocks.1"]
    assert_close(out, ref, rel=1e-5)
    assert disable_efficient_attention(enc) == 2
    assert efficient_attention_blocks(enc) == []
    assert "forward" not in vars(enc.blocks[0])  # the class's own forward again
    with torch.no_grad():
        assert torch.equal(enc(x), ref)


def test_qkv_and_proj_see_only_real_tokens() -> None:
    enc = tiny_timm_sam(img_size=64)  # grid 4x4, window 3: the stock block projects 6x6 padded tokens
    enable_efficient_attention(enc)
    seen: dict[str, list[tuple[int, ...]]] = {"qkv": [], "proj": []}
    block = enc.blocks[0]
    block.attn.qkv.register_forward_hook(lambda m, i, o: seen["qkv"].append(tuple(i[0].shape)))
    block.attn.proj.register_forward_hook(lambda m, i, o: seen["proj"].append(tuple(i[0].shape)))
    with torch.no_grad():
        enc(torch.randn(2, 3, 64, 64))
    # the real 4x4 grid, and one zero token per image whose projection fills the padding
    assert seen["qkv"] == [(2, 4, 4, 32), (2, 1, 1, 32)]
    assert seen["proj"] == [(2, 4, 4, 32)]
    seen["qkv"].clear()
    disable_efficient_attention(enc)
    with torch.no_grad():
        enc(torch.randn(2, 3, 64, 64))
    assert seen["qkv"] == [(2 * 4, 9, 32)]  # stock: 4 windows of 3x3 per image, padding included


@pytest.mark.parametrize("impl", sorted(ENCODERS))
@pytest.mark.parametrize("preset", ["mmlora", "mmadapter_authors", "mmadapter"])
def test_wrapped_outputs_and_gradients_match(impl: str, preset: str) -> None:
    """Same outputs and same gradients of every trainable tensor, with and without."""
    results = []
    for efficient in (False, True):
        enc = ENCODERS[impl](img_size=80)
        model = wrap_multimodal(enc, ("optical", "dsm"), preset=preset, efficient_attention=efficient)
        assert bool(efficient_attention_blocks(model)) == efficient
        _perturb(model)
        model.train()
        x = {"optical": torch.randn(2, 3, 80, 80), "dsm": torch.randn(2, 1, 80, 80)}
        out = model(x)
        loss = sum((o * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in out.values())
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert grads and all(g.abs().sum() > 0 for g in grads.values())
        results.append(({k: v.detach() for k, v in out.items()}, grads))
    (out0, g0), (out1, g1) = results
    for k in out0:
        assert_close(out1[k], out0[k], rel=1e-5)
    assert g0.keys() == g1.keys()
    scale = grad_scale(g0, g1)  # a gradient may be rounding noise alone: compare to the largest
    for n in g0:
        assert_close(g1[n], g0[n], rel=1e-5, scale=scale, msg=n)


@pytest.mark.parametrize("preset", ["mmlora", "mmadapter_authors"])
def test_loop_execution_matches_batched(preset: str) -> None:
    model = wrap_multimodal(tiny_timm_sam(img_size=64), ("optical", "dsm"), preset=preset)
    _perturb(model)
    x = {"optical": torch.randn(2, 3, 64, 64), "dsm": torch.randn(2, 1, 64, 64)}
    with torch.no_grad():
        batched = model(x)
        set_execution(model, "loop")
        loop = model(x)
    for k in batched:
        assert_close(loop[k], batched[k], rel=1e-5)


def test_adapt_output_equals_forward_in_every_mode() -> None:
    base = nn.Linear(8, 8)
    x = torch.randn(6, 5, 8)
    for fusion in ("scalar", "none"):
        ad = MultimodalAdapter(
            base, ("a", "b"), in_features=8, hidden=2, placement="after", init="default", fusion=fusion
        )
        with torch.no_grad():
            for mode in ("batched", "loop"):
                ad.execution = mode  # type: ignore[assignment]
                assert_close(ad.adapt_output(base(x)), ad(x), rel=1e-5)
    with torch.no_grad(), only_modality(ad, "b"):  # fusion "none": one modality alone
        assert_close(ad.adapt_output(base(x[:2])), ad(x[:2]), rel=1e-5)
    ad.enable_adapters(False)
    assert torch.equal(ad.adapt_output(x), x)
    beside = MultimodalAdapter(base, ("a", "b"), in_features=8, hidden=2, placement="beside")
    with pytest.raises(ValueError, match="after"):
        beside.adapt_output(x)


@pytest.mark.parametrize("order", ["efficient_first", "checkpointing_first"])
def test_composes_with_gradient_checkpointing(order: str) -> None:
    """In float64, where the two attention paths' rounding differences vanish (the gradients
    are small sums of large terms of both signs: in float32 they differ by 3e-3 of the largest)."""
    x = {"optical": torch.randn(2, 3, 64, 64).double(), "dsm": torch.randn(2, 1, 64, 64).double()}

    def run(model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.train()
        model.zero_grad()
        out = model(x)
        (out["optical"].square().mean() + out["dsm"].mean()).backward()
        return out["optical"].detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = wrap_multimodal(tiny_timm_sam(img_size=64), ("optical", "dsm"), preset="mmlora", efficient_attention=False)
    _perturb(plain.double())
    ref_out, ref_grads = run(plain)
    model = wrap_multimodal(tiny_timm_sam(img_size=64), ("optical", "dsm"), preset="mmlora", efficient_attention=False)
    _perturb(model.double())
    calls: list[tuple[int, ...]] = []
    if order == "efficient_first":
        enable_efficient_attention(model)
        enable_gradient_checkpointing(model.base_model)
    else:
        enable_gradient_checkpointing(model.base_model)
        enable_efficient_attention(model)
    model.base_model.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    out, grads = run(model)
    # the efficient forward ran, and ran again in backward (recomputation)
    assert calls.count((4, 4, 4, 32)) == 2
    assert_close(out, ref_out, rel=1e-5)
    scale = grad_scale(ref_grads, grads)  # a gradient may be rounding noise alone
    for n in ref_grads:
        assert_close(grads[n], ref_grads[n], rel=1e-9, scale=scale, msg=n)
    disable_efficient_attention(model)
    disable_gradient_checkpointing(model.base_model)
    assert "forward" not in vars(model.base_model.blocks[0])


def test_deepcopy_binds_the_copy() -> None:
    model = wrap_multimodal(tiny_sam(img_size=64), ("optical", "dsm"), preset="mmlora")
    _perturb(model)
    twin = copy.deepcopy(model)
    x = {"optical": torch.randn(1, 3, 64, 64), "dsm": torch.randn(1, 1, 64, 64)}
    with torch.no_grad():
        before = model(x)["optical"]
        qkv = twin.base_model.blocks[0].attn.qkv
        assert isinstance(qkv, MultimodalLoRA)
        qkv.base_layer.weight.mul_(2)  # changes the twin only
        assert torch.equal(model(x)["optical"], before)
        assert not close(twin(x)["optical"], before, rel=1e-08)


def test_rel_pos_table_of_another_length_is_resized_like_sam() -> None:
    enc = tiny_sam(img_size=64)
    glob = enc.blocks[1].attn  # global block: table of 2*4-1 = 7 rows; give it 5
    g = torch.Generator().manual_seed(3)
    glob.rel_pos_h = nn.Parameter(torch.randn(5, glob.rel_pos_h.shape[1], generator=g))
    glob.rel_pos_w = nn.Parameter(torch.randn(9, glob.rel_pos_w.shape[1], generator=g))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = enc(x)
        enable_efficient_attention(enc)
        assert_close(enc(x), ref, rel=1e-5)


def test_other_blocks_are_left_alone() -> None:
    vit = tiny_timm_vit()
    assert enable_efficient_attention(vit) == []
    model = wrap_multimodal(tiny_timm_vit(), ("optical", "dsm"), preset="mmlora")
    assert efficient_attention_blocks(model) == []


@pytest.mark.parametrize("impl", sorted(ENCODERS))
def test_bf16_autocast_matches_stock_blocks(impl: str) -> None:
    """Under bf16 autocast (the GPU training setting) both paths agree to bf16 precision."""
    x = {"optical": torch.randn(2, 3, 64, 64), "dsm": torch.randn(2, 1, 64, 64)}
    outs = []
    for efficient in (False, True):
        model = wrap_multimodal(
            ENCODERS[impl](img_size=64), ("optical", "dsm"), preset="mmlora", efficient_attention=efficient
        )
        _perturb(model)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(model(x)["dsm"].float())
    assert outs[1].abs().max() > 0.1  # not trivially small
    assert_close(outs[1], outs[0], rel=0.05)


@pytest.mark.parametrize("impl", ["timm", "segment_anything"])
@pytest.mark.parametrize("img_size", [(96, 64), (64, 112)])  # padding along one side only; both sides
def test_rectangular_grids(impl: str, img_size: tuple[int, int]) -> None:
    from mmpeft.backbones import build_sam_encoder, replace_spec

    torch.manual_seed(0)
    spec = replace_spec("vit_tiny", embed_dim=32, depth=2, num_heads=2, window_size=3, global_attn_indexes=(1,))
    enc = build_sam_encoder(spec, impl=impl, img_size=img_size).eval()  # type: ignore[arg-type]
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "rel_pos" in name:
                p.normal_(0, 0.1)
        x = torch.randn(2, 3, *img_size)
        ref = enc(x)
        assert len(enable_efficient_attention(enc)) == 2
        assert_close(enc(x), ref, rel=1e-5)
