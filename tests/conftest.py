"""Fixtures shared by the core tests (the tiny models they build are in ``tests/tiny_models.py``)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def images() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"optical": torch.rand(2, 3, 64, 64, generator=g), "dsm": torch.rand(2, 1, 64, 64, generator=g)}


@pytest.fixture
def single_thread():
    """One torch thread for the test (tiny models run fastest so, and a 2-thread pool on busy cores crawls)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
