"""Merging is a snapshot that ``merge_adapters()`` refreshes (issue 28; docs/concepts.md, "Merging").

The merged copies follow every change torch tracks (in-place edits under ``no_grad``,
``load_state_dict``, dtype / device moves: tests/test_stale.py). An edit through ``param.data``
bumps no version counter; seeing it would need a comparison by value on every merged forward
(a copy of each frozen weight and, on a GPU, a device sync per layer: benchmarks/merge_check_cost.py),
so it is documented instead: the merged forward keeps the merge-time weights until
``merge_adapters()`` is called again, which refreshes them."""

from __future__ import annotations

import pytest
import torch

from mmpeft import MultimodalModel, wrap_multimodal
from tests.helpers import assert_close, perturb_trainables, rel_diff
from tests.tiny_models import tiny_timm_vit

MODS = ("optical", "dsm")


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"optical": torch.rand(2, 3, 32, 32, generator=g), "dsm": torch.rand(2, 1, 32, 32, generator=g)}


def _lora() -> MultimodalModel:
    w = wrap_multimodal(tiny_timm_vit(), MODS, preset="lora")  # no mixing: every layer merges
    perturb_trainables(w)
    return w.eval()


def _tensor(w: MultimodalModel, which: str) -> torch.Tensor:
    layer = w.base_model.blocks[0].attn.qkv
    return {"lora": layer.lora_B["dsm"]["v"].weight, "frozen": layer.base_layer.weight}[which]


@pytest.mark.parametrize("which", ["lora", "frozen"])
def test_a_data_edit_after_a_merge_keeps_the_snapshot_until_merge_adapters(which: str) -> None:
    w, x = _lora(), _inputs()
    w.merge_adapters()
    with torch.no_grad():
        snapshot = w(x)
        _tensor(w, which).data.mul_(1.5)  # bypasses autograd's version counter
        kept = w(x)
        w.merge_adapters()  # the refresh
        refreshed = w(x)
        w.unmerge_adapters()
        unmerged = w(x)  # the edited weights, computed without merged copies
    for m in MODS:
        assert torch.equal(kept[m], snapshot[m])  # the merge-time weights, as documented
        assert_close(refreshed[m], unmerged[m], rel=1e-5)
    assert rel_diff(unmerged["dsm"], snapshot["dsm"]) > 1e-3  # the edit matters: the snapshot is not it


def test_an_in_place_edit_under_no_grad_is_seen_without_a_refresh() -> None:
    """The same edit through the tensor itself bumps its version counter: seen by the next merged forward."""
    w, x = _lora(), _inputs()
    w.merge_adapters()
    with torch.no_grad():
        w(x)
        _tensor(w, "lora").mul_(1.5)
        seen = w(x)
        w.unmerge_adapters()
        want = w(x)
    for m in MODS:
        assert_close(seen[m], want[m], rel=1e-5)
