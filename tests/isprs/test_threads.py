"""The thread policy (issue 13): never more torch threads than free cores; workers single-threaded."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from mmpeft_isprs.threads import ThreadPolicy, apply_threads, current_policy, resolve_threads, worker_init


@pytest.fixture(autouse=True)
def _keep_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    "cores,busy,ranks,expected",
    [(2, 0.0, 1, 2), (2, 1.0, 1, 1), (2, 1.4, 1, 1), (8, 3.0, 1, 5), (8, 0.2, 4, 2), (8, 7.0, 2, 1), (4, 9.0, 1, 1)],
)
def test_auto_policy_uses_free_cores_divided_among_ranks(cores, busy, ranks, expected) -> None:
    p = resolve_threads(0, ranks, cores=cores, busy=busy)
    assert (p.threads, p.source) == (expected, "auto")
    assert f"{cores} cores" in p.describe() and "workers 1 thread" in p.describe()


def test_explicit_settings_win(monkeypatch) -> None:
    assert resolve_threads(3, 1, cores=2, busy=2.0) == ThreadPolicy(3, 2, 0.0, 1, "train.threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert resolve_threads(0, 1, cores=2, busy=2.0).threads == 5
    assert resolve_threads(2, 1, cores=2).source == "train.threads"  # the config beats the environment


def test_init_distributed_applies_the_policy() -> None:
    from mmpeft_isprs.distributed import init_distributed

    init_distributed("cpu", threads=1)
    assert torch.get_num_threads() == 1 and current_policy().source == "train.threads"
    init_distributed("cpu", threads=0)
    p = current_policy()
    assert p.source == "auto" and torch.get_num_threads() == p.threads <= p.cores
    apply_threads(ThreadPolicy(1, 1, 0.0, 1, "auto"))
    assert torch.get_num_threads() == 1


class _Threads(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> int:
        return torch.get_num_threads()


def test_loader_workers_are_single_threaded() -> None:
    torch.set_num_threads(2)
    loader = DataLoader(_Threads(), batch_size=1, num_workers=1, worker_init_fn=worker_init)
    assert [int(b) for b in loader] == [1, 1]
