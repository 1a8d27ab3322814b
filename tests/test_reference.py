"""reference_forward: every family run modality by modality through its own forward equals the
stacked run (mixing presets, three modalities), and it sees what the stacked run cannot: a module
that cuts a batch-less table into "modalities" (as timm vit_relpos's position MLP, once the
wrap-time probe and the first forward's check are bypassed)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from mmpeft import reference_forward, wrap_multimodal
from mmpeft.runtime.verify import WrapError
from tests import backbone_cases as tb
from tests.backbone_cases import main_tensor as _tensor
from tests.backbone_cases import randomise_family_trainables as _randomise_trainables
from tests.helpers import assert_close, rel_diff

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread is fastest

MODS3 = ("optical", "dsm", "sar")
KINDS = [("b", k, m) for k in tb.BACKBONES for m in ("lora", "adapter")] + [("f", k, m) for k, m in tb.FAMILY_CASES]


def _build(table: str, kind: str) -> Any:
    torch.manual_seed(0)
    return (tb.BACKBONES[kind][0] if table == "b" else tb.FAMILY_MODELS[kind][0])().eval()


def _inputs(size: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {m: torch.rand(2, 3 if m == "optical" else 1, size, size, generator=g) for m in MODS3}


@pytest.mark.parametrize(("table", "kind", "method"), KINDS)
def test_reference_equals_the_stacked_run_on_every_family(table: str, kind: str, method: str) -> None:
    size = (tb.BACKBONES[kind] if table == "b" else tb.FAMILY_MODELS[kind])[1]
    w = wrap_multimodal(_build(table, kind), MODS3, method)  # the paper's presets: mixing layers
    _randomise_trainables(w)
    x = _inputs(size)
    with torch.no_grad():
        stacked = w(x)
        ref = reference_forward(w, x)
    for m in MODS3:
        assert_close(_tensor(ref[m]), _tensor(stacked[m]), rel=2e-05)
    assert all(layer.reference is None for _, layer in w.layers())  # left as it was


class _TableNet(nn.Module):
    """Tokens plus a position term from a linear over a (3, 16, 8) table that has no batch axis
    (as timm vit_relpos's position MLP over its relative-coordinate table)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 8, 8)  # 32 px -> 4 x 4 tokens
        self.register_buffer("table", torch.randn(3, 16, 8))
        self.pos = nn.Linear(8, 8)
        self.head = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)  # (B, 16, 8)
        return self.head(t + self.pos(self.table).sum(0))  # (16, 8) broadcast over the batch


def test_reference_sees_a_table_cut_into_modalities() -> None:
    torch.manual_seed(0)
    w = wrap_multimodal(_TableNet(), MODS3, "lora", targets=["pos", "head"], fusion="none", probe=False)
    _randomise_trainables(w)
    x = _inputs(32)
    with pytest.raises(WrapError, match=r"base_model\.pos"):  # the first forward's check names it
        w(x)
    w.skip_call_check()  # past the checks, the stacked run cuts the table into 3 "modalities" ...
    with torch.no_grad():
        stacked, ref = w(x), reference_forward(w, x)  # ... and the reference shows it
    assert rel_diff(stacked["optical"], ref["optical"]) > 1e-4
    with pytest.raises(ValueError, match=r"pos runs on a \(3, 16, 8\)"):  # the wrap-time probe refuses it
        wrap_multimodal(_TableNet(), MODS3, "lora", targets=["pos", "head"], fusion="none", probe=(32, 32))


def test_the_authors_execution_names_what_it_needs() -> None:
    from mmpeft import per_modality_forward

    w = wrap_multimodal(tb.BACKBONES["timm_vit"][0](), MODS3, "lora")
    with pytest.raises(TypeError, match=r"SAM-style.*reference_forward"):
        per_modality_forward(w, _inputs(32))
