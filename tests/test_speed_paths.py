"""The GPU-speed switches leave the function unchanged: bf16 frozen base, attention query modes,
regional and whole-model compilation (CPU; Inductor itself in the slow test)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmpeft import wrap_multimodal
from mmpeft.runtime.attention import resolve_queries
from mmpeft.runtime.blocks import runner_of, set_block_features
from tests.helpers import assert_close, grad_scale
from tests.tiny_models import tiny_timm_sam

X = {
    "optical": torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)),
    "dsm": torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(3)),
}


def _model(preset: str = "mmadapter", **kw: object) -> nn.Module:
    model = wrap_multimodal(tiny_timm_sam(img_size=64), ("optical", "dsm"), preset=preset, **kw)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _loss(out: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum((o.float() * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in out.values())  # type: ignore[return-value]


@pytest.mark.parametrize("preset", ["mmadapter", "mmlora"])
def test_bf16_base_matches_autocast_and_keeps_fp32_masters(preset: str) -> None:
    ref_model, model = _model(preset), _model(preset, base_dtype="bf16")
    own = {id(t) for t in model.trainable_tensors()}
    assert own and all(t.dtype == torch.float32 for t in model.trainable_tensors())
    frozen = [p for p in model.base_model.parameters() if id(p) not in own]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert model.compute_dtype == torch.bfloat16
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = ref_model(X)["optical"].float()
        out = model(X)["optical"].float()
    # documented tolerance: bf16 rounding of the frozen weights themselves (8 mantissa bits)
    assert_close(out, ref, rel=3e-2)
    # without autocast too: inputs are cast after the stems, outputs come in bf16
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        out = model(X)
        assert out["dsm"].dtype == torch.bfloat16
        _loss(out).backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)
        opt.step()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, before[n]), n  # frozen weights bit-identical after steps
    assert all(v.dtype == torch.float32 for v in model.trainable_state_dict().values())


def test_base_dtype_names_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown dtype 'bf15'"):
        _model(base_dtype="bf15")
    model = _model(base_dtype=torch.bfloat16)
    model.set_base_dtype(None)
    assert model.compute_dtype is None
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("preset", ["mmadapter", "mmlora", "mmadapter_authors"])
def test_attention_query_modes_match_stock_blocks(preset: str) -> None:
    """Both query modes with both ways of adding the relative positions (an additive mask, or
    extra q/k channels) equal the stock blocks: outputs and every trainable gradient."""
    results = []
    for mode in (False, ("real", "mask"), ("real", "channels"), ("all", "mask"), ("all", "channels")):
        model = _model(preset, efficient_attention=False).train()
        if mode:
            assert model.enable_efficient_attention(*mode)
        out = model(X)
        _loss(out).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((out["optical"].detach(), grads))
    (ref, g0), *others = results
    for out, grads in others:
        assert_close(out, ref, rel=1e-5)
        scale = grad_scale(g0, grads)  # a gradient may be rounding noise alone
        for n in g0:
            assert_close(grads[n], g0[n], rel=1e-5, scale=scale, msg=n)


def test_rel_pos_channels_use_no_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """ "channels" calls SDPA without a mask (so that fused kernels may run); "mask" (the default) with one."""
    calls: list[bool] = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*a, **k):  # type: ignore[no-untyped-def]
        calls.append(k.get("attn_mask") is not None)
        return real(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    model = _model()
    model(X)
    assert calls and all(calls)
    calls.clear()
    model.enable_efficient_attention("all", "channels")
    model(X)
    assert calls and not any(calls)
    with pytest.raises(ValueError, match="rel_pos must be one of"):
        model.enable_efficient_attention("all", "bias")


def test_auto_queries_resolve_per_device() -> None:
    assert resolve_queries("auto", torch.device("cuda")) == "all"
    assert resolve_queries("auto", torch.device("cpu")) == "real"
    assert resolve_queries("real", torch.device("cuda")) == "real"
    with pytest.raises(ValueError, match="queries must be one of"):
        _model().enable_efficient_attention("some")


def test_block_features_compose_and_clear() -> None:
    model = _model()
    block = model.base_model.blocks[0]
    runner = runner_of(block)
    assert runner is not None and runner.efficient is not None and not runner.checkpoint
    assert model.set_grad_checkpointing() == ["blocks.0", "blocks.1"]
    assert runner_of(block) is runner and runner.checkpoint
    model.disable_efficient_attention()
    assert runner.efficient is None and "forward" in vars(block)  # still checkpointed
    model.set_grad_checkpointing(False)
    assert "forward" not in vars(block)  # no feature left: the class's own forward
    block.forward = lambda x: x  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="instance forward set by other code"):
        set_block_features(block, checkpoint=True)


def _train_steps(model: nn.Module, run: nn.Module, steps: int = 3) -> list[torch.Tensor]:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, foreach=True)
    outs = []
    for _ in range(steps):
        opt.zero_grad()
        out = run(X)
        _loss(out).backward()
        opt.step()
        outs.append(out["optical"].detach())
    return outs


@pytest.mark.parametrize("how", ["blocks", pytest.param("model", marks=pytest.mark.slow)])  # whole model: ~17 s
def test_compiled_equals_eager_without_recompilation(how: str) -> None:
    """Dynamo + AOT autograd (the graphs Inductor would compile) give the eager function, step
    after step, compile once (two block graphs: windowed and global), and never again."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    eager = _model().train()
    ref = _train_steps(eager, eager)
    model = _model().train()
    if how == "blocks":
        assert model.compile_blocks(backend="aot_eager") == ["blocks.0", "blocks.1"]
        run: nn.Module = model
    else:
        run = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: no graph break, capturable
    frames = []
    for i, out in enumerate(_train_steps(model, run)):
        frames.append(counters["stats"]["unique_graphs"])  # graphs captured so far
        assert_close(out, ref[i], rel=1e-5)
    assert frames[0] >= 1 and frames[-1] == frames[0]  # compiled in the first step only


def test_compile_blocks_needs_repeated_blocks() -> None:
    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch_embed = nn.Conv2d(3, 8, 8, 8)
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.patch_embed(x).flatten(2).transpose(1, 2))

    model = wrap_multimodal(Flat(), ("optical", "dsm"), targets=["fc"])
    with pytest.raises(ValueError, match="no list of repeated blocks"):
        model.compile_blocks()


@pytest.mark.slow
def test_inductor_compiled_blocks_equal_eager() -> None:
    """Inductor's generated code (CPU) computes the eager function, forward and gradients."""
    torch._dynamo.reset()
    eager, model = _model().train(), _model().train()
    model.compile_blocks()
    for m in (eager, model):
        _loss(m(X)).backward()
    assert_close(model(X)["dsm"], eager(X)["dsm"], rel=1e-4)
    scale = grad_scale({n: p.grad for n, p in eager.named_parameters() if p.requires_grad})
    for (n, p), q in zip(eager.named_parameters(), model.parameters()):
        if p.requires_grad:
            assert_close(q.grad, p.grad, rel=1e-4, scale=scale, msg=n)


def test_preset_refuses_to_override_an_explicit_option() -> None:
    with pytest.raises(ValueError, match=r"the preset fixes \['placement'\]"):
        wrap_multimodal(tiny_timm_sam(), ("optical", "dsm"), "adapter", placement="beside")
    with pytest.raises(ValueError, match=r"the preset fixes \['slices'\]"):
        wrap_multimodal(tiny_timm_sam(), ("optical", "dsm"), "lora", slices=("k",))


def test_trainables_are_found_structurally_not_by_name() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch_embed = nn.Conv2d(3, 8, 8, 8)
            self.adapter_head = nn.Linear(8, 8)  # a base module whose name looks like mmpeft's
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.adapter_head(self.fc(self.patch_embed(x).flatten(2).transpose(1, 2)))

    model = wrap_multimodal(Odd(), ("optical", "dsm"), targets=["fc"])
    saved = model.trainable_state_dict()
    assert saved and not any(k.startswith("base_model.adapter_head") for k in saved)
    own = model.trainable_tensors()
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(t) for t in own if t.requires_grad}
    constants = {id(b) for b in model.buffers()}  # the fusion rules' constant (unsaved) parts
    assert all(t.requires_grad or id(t) in constants for t in own)
