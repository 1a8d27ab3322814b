"""Fixtures of the application's tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmpeft_isprs.data import generate_synthetic_vaihingen


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic_vaihingen(root, num_tiles=3, tile_size=96)
    return root
