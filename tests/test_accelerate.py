"""``accelerate`` trains a wrapped Hugging Face ViT (two modalities): ``Accelerator().prepare(model,
optimizer, loader)`` gives what a plain loop gives, two gloo processes give what one gives on the
same global batches, and ``mixed_precision="bf16"`` computes in bf16 with float32 masters. The
runs are :func:`tests.accelerate_worker.run`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests import accelerate_worker as worker
from tests.helpers import assert_close

pytest.importorskip("transformers")
accelerate_state = pytest.importorskip("accelerate.state")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_accelerate_state() -> Iterator[None]:
    """accelerate keeps its state in process-wide singletons: each test (and the Trainer's tests) starts clean."""
    accelerate_state.AcceleratorState._reset_state(reset_partial_state=True)
    yield
    accelerate_state.AcceleratorState._reset_state(reset_partial_state=True)


def _plain_loop(steps: int) -> dict[str, torch.Tensor]:
    """The same SGD steps without accelerate."""
    model = worker.build()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    data = worker.samples(worker.GLOBAL_BATCH * steps)
    for i in range(steps):
        batch = worker.collate(data[i * worker.GLOBAL_BATCH : (i + 1) * worker.GLOBAL_BATCH])
        model(**batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.trainable_state_dict()


def test_prepare_trains_as_a_plain_loop() -> None:
    trained, report = worker.run(steps=3)
    assert report["num_processes"] == 1 and report["steps"] == 3 and report["frozen_unchanged"]
    start = worker.build().trainable_state_dict()
    want = _plain_loop(3)
    for k, v in trained.items():
        assert not torch.equal(v, start[k]), f"{k} did not train"
        assert_close(v, want[k], rel=1e-6, msg=k)


def test_bf16_mixed_precision_keeps_float32_masters() -> None:
    """The head computes in bf16 under accelerate's autocast; trainables and their gradients stay float32."""
    trained, report = worker.run(steps=2, precision="bf16")
    assert report["head_output_dtypes"] == ["torch.bfloat16"]
    assert report["trainable_dtypes"] == ["torch.float32"] and report["grad_dtypes"] == ["torch.float32"]
    assert report["frozen_unchanged"] and all(v.dtype == torch.float32 for v in trained.values())
    want = _plain_loop(2)
    assert all(torch.isfinite(v).all() for v in trained.values())
    assert any(not torch.equal(v, want[k]) for k, v in trained.items())  # bf16 compute: not the fp32 run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_two_gloo_processes_equal_one(tmp_path: Path) -> None:
    """Two CPU processes (gloo, each half of every global batch of 4) end 3 SGD steps where one process ends."""
    out = tmp_path / "two.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += [
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(ROOT / "tests" / "accelerate_worker.py"),
    ]
    proc = subprocess.run([*cmd, str(out)], capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["num_processes"] == 2 and report["steps"] == 3 and report["frozen_unchanged"]
    from safetensors.torch import load_file

    two = load_file(str(out))
    one, _ = worker.run(steps=3)
    assert set(two) == set(one)
    for k, v in one.items():
        assert_close(two[k], v, rel=1e-5, msg=k)
