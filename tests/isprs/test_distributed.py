"""Distributed training and evaluation: sharding, and 2 CPU ranks (gloo) equal to 1 rank."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmpeft_isprs.datamodule import EpochBatchSampler
from mmpeft_isprs.demo import QUICK_OVERRIDES, demo_config
from mmpeft_isprs.distributed import DistInfo, all_gather_object, barrier, init_distributed, shard, sum_tensor
from mmpeft_isprs.evaluate import evaluate


def test_single_process_needs_no_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed, info.backend) == (0, 1, True, False, None)
    t = torch.ones(3)
    assert sum_tensor(t) is t and all_gather_object({"a": 1}) == [{"a": 1}]
    barrier()


def test_shards_cover_everything_once() -> None:
    items = list(range(11))
    parts = [shard(items, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == items and all(parts)
    # each global batch is split into contiguous per-rank slices: the same crops as one process
    one = list(EpochBatchSampler(epoch=2, start=1, batches=3, batch_size=4))
    two = [list(EpochBatchSampler(2, 1, 3, 4, rank=r, world=2)) for r in range(2)]
    assert [a + b for a, b in zip(*two)] == one


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow  # two torchrun processes: ~30 s on 2 cores
def test_torchrun_two_cpu_ranks_match_one(tmp_path: Path) -> None:
    """`torchrun --nproc_per_node 2 -m mmpeft_isprs demo --quick`: DDP training (gloo) then evaluation
    sharded over the ranks; the same weights scored in one process give the identical confusion matrix.
    About 10-13 s on 2 idle cores (two processes start and import torch), so not marked slow."""
    extra = ["data.synthetic.num_tiles=10", "train.batch_size=2"]  # 2 test tiles, so both ranks score one
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "mmpeft_isprs",
        "demo",
        "--quick",
        "--out",
        str(tmp_path),
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("DSM gain") == 1  # only rank 0 prints
    assert "2 process(es)" in proc.stdout
    run = tmp_path / "optical_dsm"
    two = json.loads((run / "test" / "metrics.json").read_text())
    assert two["protocol"]["world_size"] == 2 and len(two["protocol"]["tiles"]) == 2
    cfg = demo_config(tmp_path, None, True, extra, "optical_dsm", ["optical", "dsm"])
    one = evaluate(cfg, run / "best.safetensors", info=DistInfo(), out_dir=tmp_path / "single", log=lambda _: None)
    assert one.metrics["confusion"] == two["confusion"]
    assert one.metrics["pixels"] == two["pixels"] > 0
    assert QUICK_OVERRIDES  # the quick budget is what ran
    steps = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert steps and all("rank-0 loss" in line for line in steps)  # the step line says whose loss it is
    # eval under torchrun: the note once, the header counts every rank's windows
    cmd = [
        *cmd[: cmd.index("mmpeft_isprs") + 1],
        "eval",
        "demo",
        "--weights",
        str(run / "best.safetensors"),
        "--out",
        str(tmp_path / "two"),
        *extra,
    ]
    cmd[cmd.index("--master_port") + 1] = str(_free_port())
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("note: using the experiment saved with") == 1
    lines: list[str] = []
    evaluate(cfg, run / "best.safetensors", info=DistInfo(), out_dir=tmp_path / "one", log=lines.append)
    single = next(line for line in lines if "scoring test split" in line)
    header = next(line for line in proc.stdout.splitlines() if "scoring test split" in line)
    assert header.startswith(f"{single}; 2 processes, progress lines count rank 0's")
