"""The thread policy: torch threads that never oversubscribe the cores this process may use.

A torch CPU thread pool larger than the cores actually free does not degrade gracefully: its
threads wait for one another at every parallel region, and one busy process beside a training
run made the demo 11x slower with torch's default pool (issue 13; ``benchmarks/threads.py``
measures it). The policy, applied by :func:`~mmpeft_isprs.distributed.init_distributed`:

- ``train.threads=N`` (N > 0) or ``OMP_NUM_THREADS`` in the environment: N threads, as asked;
- otherwise (``train.threads=0``, the default): the cores this process may run on
  (``os.sched_getaffinity``) minus the ones other processes keep busy (the larger of the
  1-minute load average and the processes runnable right now), divided among the local ranks,
  at least 1;
- a resumed run (``--resume``) with neither: the count the run used, recorded in its ``last.pt``
  (another count is not bit-exact; the run says so when one is asked for);
- data-loader workers run single-threaded (:func:`worker_init`), whatever the main process uses.

The resolved policy is printed in the run header and stored in ``run.json``.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = ["ThreadPolicy", "resolve_threads", "apply_threads", "current_policy", "worker_init", "busy_cores"]


@dataclass(frozen=True)
class ThreadPolicy:
    """How many torch threads this process uses, and why.

    Attributes:
        threads: torch intra-op threads of this process.
        cores: cores this process may run on (its CPU affinity).
        busy: cores other processes kept busy when the policy was resolved.
        local_ranks: processes of this run on this machine (they share the free cores).
        source: ``"auto"``, ``"train.threads"`` or ``"OMP_NUM_THREADS"``.
    """

    threads: int
    cores: int
    busy: float
    local_ranks: int
    source: str

    def describe(self) -> str:
        """One line for the run header."""
        why = (
            f"{self.cores} cores, {self.busy:.1f} busy with other work, {self.local_ranks} local rank(s)"
            if self.source == "auto"
            else self.source
            if self.source.startswith("the run's")
            else f"set by {self.source}"
        )
        return f"{self.threads} torch thread(s) per process ({why}); data-loader workers 1 thread each"

    def to_dict(self) -> dict[str, Any]:
        """The fields, for ``run.json``."""
        return asdict(self)


_APPLIED: ThreadPolicy | None = None


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def _running_now(samples: int = 5) -> float:
    """Median of the system's runnable processes (``/proc/stat``) over a few samples, this one excluded."""
    counts = []
    for _ in range(samples):
        try:
            with open("/proc/stat") as f:
                line = next(x for x in f if x.startswith("procs_running"))
        except (OSError, StopIteration):
            return 0.0
        counts.append(int(line.split()[1]) - 1)
        time.sleep(0.01)
    return float(sorted(counts)[len(counts) // 2])


def busy_cores() -> float:
    """Cores kept busy by other processes: max(1-minute load average, processes runnable now)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    return max(load, _running_now())


def resolve_threads(
    requested: int = 0,
    local_ranks: int = 1,
    *,
    cores: int | None = None,
    busy: float | None = None,
    recorded: int | None = None,
    recorded_in: str = "",
) -> ThreadPolicy:
    """The policy for ``train.threads=requested`` with ``local_ranks`` processes on this machine.

    ``recorded``: the count a resumed run used (``last.pt`` in ``recorded_in``): taken instead of
    the automatic choice, which depends on the machine's load, so that a resumed run is bit-exact;
    ``train.threads`` and ``OMP_NUM_THREADS`` still win. ``cores`` and ``busy`` default to what
    the machine reports now (given in tests).
    """
    cores = _affinity() if cores is None else cores
    local_ranks = max(1, local_ranks)
    if requested > 0:
        return ThreadPolicy(requested, cores, 0.0, local_ranks, "train.threads")
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return ThreadPolicy(int(omp), cores, 0.0, local_ranks, "OMP_NUM_THREADS")
    if recorded:
        return ThreadPolicy(int(recorded), cores, 0.0, local_ranks, f"the run's count, recorded in {recorded_in}")
    busy = busy_cores() if busy is None else busy
    free = max(1, cores - int(round(busy)))
    return ThreadPolicy(max(1, free // local_ranks), cores, busy, local_ranks, "auto")


def apply_threads(policy: ThreadPolicy) -> ThreadPolicy:
    """Set torch's thread count to ``policy.threads`` and remember the policy (:func:`current_policy`)."""
    global _APPLIED
    torch.set_num_threads(policy.threads)
    _APPLIED = policy
    return policy


def current_policy() -> ThreadPolicy:
    """The policy applied last in this process (or torch's own count, labelled ``"torch"``)."""
    return _APPLIED or ThreadPolicy(torch.get_num_threads(), _affinity(), 0.0, 1, "torch")


def worker_init(worker_id: int) -> None:
    """``worker_init_fn`` of the data loaders: one torch thread per worker process."""
    del worker_id
    torch.set_num_threads(1)
