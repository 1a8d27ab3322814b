"""TerraTorch for the tests that need the optional extra geo-fm: imported with the float32 matmul
precision put back (``import terratorch`` sets ``torch.set_float32_matmul_precision("medium")``,
after which every later float32 matmul would run in bf16 / TF32 and wraps would warn), skipped with
the reason when it is missing, and a fixture holding "highest" around a test."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

REASON = "the optional extra geo-fm (pip install 'mmpeft[geo-fm]')"


def import_terratorch() -> Any:
    """``terratorch``, or the test skipped naming the extra; the matmul precision as it was."""
    before = torch.get_float32_matmul_precision()
    try:
        return pytest.importorskip("terratorch", reason=REASON)
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.fixture
def highest_precision() -> Iterator[None]:
    """float32 matmuls at "highest" during the test, the precision as it was after."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)
