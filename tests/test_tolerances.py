"""The suite compares floats relative to their magnitudes (tests/helpers.py): the helper's own
arithmetic on hand-computed cases, and no test file using an absolute tolerance."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_close, close, grad_scale, rel_diff

TESTS = Path(__file__).resolve().parent
#: absolute-tolerance comparisons the suite must not use (spelt in pieces so this file passes)
FORBIDDEN = re.compile(r"\b(" + "at" + r"ol\s*=|torch\.all" + r"close\(|torch\.testing\.assert_" + r"close\()")


def test_the_bound_scales_with_the_magnitude() -> None:
    a = torch.tensor([10.0, -3.0, 0.0], dtype=torch.float64)  # exact arithmetic for the hand-computed values
    got = rel_diff(a + torch.tensor([1.5e-5, 0.0, 0.0], dtype=torch.float64), a)
    assert got == pytest.approx(1.5e-5 / 10.000015, rel=1e-12)  # over the larger magnitude of the two
    assert close(a + 1.5e-5, a, rel=1e-5)  # the Intel case: 1.5e-5 on maps of magnitude ~10
    assert not close(a / 10 + 1.5e-5, a / 10, rel=1e-5)  # the same absolute error on magnitude ~1
    assert rel_diff(torch.zeros(3), torch.zeros(3)) == 0.0
    assert rel_diff(torch.zeros(2), torch.tensor([0.0, 1e-30])) == 1.0
    assert close(a, a.clone(), rel=0)  # rel=0: bit-identical
    with pytest.raises(AssertionError, match="relative difference 0.1 > 1e-05"):
        assert_close(torch.tensor([1.0, 0.9]), torch.tensor([1.0, 1.0]))


def test_a_family_scale_for_tensors_that_are_rounding_noise() -> None:
    grads = {"big": torch.tensor([2.0, -4.0]), "noise": torch.tensor([1e-20, -3e-20])}
    other = {"big": torch.tensor([2.0, -4.0]), "noise": torch.tensor([-1e-20, 2e-20])}
    assert grad_scale(grads, other) == 4.0
    assert not close(grads["noise"], other["noise"], rel=1e-5)  # against themselves: all noise
    assert close(grads["noise"], other["noise"], rel=1e-5, scale=grad_scale(grads, other))


def test_no_test_file_uses_an_absolute_tolerance() -> None:
    found = []
    for path in sorted(TESTS.rglob("*.py")):
        if path.name == "helpers.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if FORBIDDEN.search(line):
                found.append(f"{path.relative_to(TESTS)}:{number}: {line.strip()}")
    assert not found, "compare with tests.helpers.assert_close / close (relative):\n" + "\n".join(found)
