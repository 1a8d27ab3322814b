"""``last.pt``: everything needed to continue a run, written atomically, and the resume checks.

A checkpoint holds the task's state (trainable tensors, optimiser, scheduler, scaler), the
counters (:class:`TrainState`), every rank's RNG states and the resolved config. Resuming
restores all of it, so a resumed run reaches the same weights as an uninterrupted one, bit for
bit on CPU. Only :data:`RESUMABLE_CHANGES` may differ in the config of the resumed run.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmpeft import atomic_write

from ..config import ConfigError, ExperimentConfig, upgrade_stored
from ..distributed import DistInfo, all_gather_object, barrier
from ..task import SegmentationTask
from ..threads import current_policy

__all__ = [
    "CHECKPOINT",
    "BEST",
    "LAST_WEIGHTS",
    "FORMAT",
    "RESUMABLE_CHANGES",
    "TrainState",
    "load_checkpoint",
    "check_resumable",
    "resume_checkpoint",
    "clear_run",
    "recorded_threads",
    "save_checkpoint",
    "restore_checkpoint",
    "seed_process",
]

CHECKPOINT = "last.pt"
BEST = "best.safetensors"
LAST_WEIGHTS = "last.safetensors"
FORMAT = "mmpeft_isprs.train/1"
RESUMABLE_CHANGES = (  # config fields that may differ when a run is resumed
    "train.resume",
    "train.overwrite",
    "train.epochs",
    "train.num_workers",
    "train.device",
    "train.threads",
    "train.log_every",
    "train.progress",
    "train.tensorboard",
    "train.val_every",
    "train.checkpoint_every",
    "data.root",
    "data.cache",
    "model.checkpoint",
)


@dataclass
class TrainState:
    """Counters that locate a run: ``epoch`` (0-based) and ``batch`` (within it) come next."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    best_miou: float = -1.0
    best_epoch: int = 0
    loss_sum: float = 0.0  # of the current epoch's steps so far (rank-local; per rank in last.pt)
    seconds: float = 0.0  # training time of the current epoch so far


# --------------------------------------------------------------------------- RNG
def seed_process(seed: int, rank: int) -> None:
    """Seed torch (dropout: distinct per rank), numpy and random for the training loop."""
    torch.manual_seed(seed * 1_000_003 + 1 + rank)
    np.random.seed((seed * 1_000_003 + rank) % 2**32)
    random.seed(seed * 1_000_003 + rank)


def _rng_state(device: torch.device) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# --------------------------------------------------------------------------- reading and checks
def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(
            _flat(v, f"{prefix}{k}.")
            if isinstance(v, dict) and k not in ("stems", "folders", "modalities")
            else {f"{prefix}{k}": v}
        )
    return out


def recorded_threads(run_dir: Path) -> int | None:
    """The torch thread count of the run whose ``last.pt`` is in ``run_dir`` (None: none recorded)."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, ValueError):  # not a checkpoint: resume_checkpoint says so
        return None
    threads = ckpt.get("threads") if isinstance(ckpt, dict) else None
    return int(threads) if threads else None


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a ``last.pt`` (tensors only, no code: ``weights_only``)."""
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: {path} not found (train once without --resume first)")
    ckpt = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a training checkpoint written by mmpeft-isprs train")
    return ckpt


def check_resumable(saved: dict[str, Any], cfg: ExperimentConfig, path: Path) -> None:
    """Raise ConfigError unless ``cfg`` differs from the run's config only in :data:`RESUMABLE_CHANGES`."""
    old, new = _flat(upgrade_stored(saved)), _flat(cfg.to_dict())
    diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES]
    if diff:
        listing = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:6])
        raise ConfigError(
            f"cannot resume {path}: the config differs from the run's ({listing}); only {', '.join(RESUMABLE_CHANGES)} may change"
        )


def resume_checkpoint(cfg: ExperimentConfig, info: DistInfo, clear: bool = True) -> dict[str, Any] | None:
    """The checkpoint to continue (``train.resume``), checked; None for a fresh run in an unused folder.

    With ``train.overwrite`` the earlier run's files are removed here, or, with ``clear=False``, by
    :func:`clear_run` once every check has passed (a refused run leaves the earlier one as it was)."""
    run_dir = Path(cfg.train.run_dir)
    path = run_dir / CHECKPOINT
    if cfg.train.resume:
        ckpt = load_checkpoint(path, "cpu")
        check_resumable(ckpt["config"], cfg, path)
        if len(ckpt["rng"]) != info.world_size:
            raise ConfigError(
                f"{path} was written by {len(ckpt['rng'])} process(es); resume it with as many (now {info.world_size})"
            )
        return ckpt
    earlier = [name for name in (CHECKPOINT, "config.yaml", "log.csv", BEST) if (run_dir / name).exists()]
    if earlier and cfg.train.overwrite:
        if clear:
            clear_run(cfg, info)
    elif earlier:
        raise ConfigError(
            f"{run_dir} already holds {' and '.join(earlier)} from an earlier run: add --resume "
            "(train.resume=true) to continue it, --overwrite (train.overwrite=true) to replace it, or "
            "choose another train.run_dir"
        )
    return None


def clear_run(cfg: ExperimentConfig, info: DistInfo) -> None:
    """Remove an earlier run's files from ``train.run_dir`` (``--overwrite``; rank 0, the others wait)."""
    run_dir = Path(cfg.train.run_dir)
    if cfg.train.overwrite and not cfg.train.resume:
        if info.is_main:
            for name in (
                CHECKPOINT,
                "config.yaml",
                "log.csv",
                BEST,
                LAST_WEIGHTS,
                "run.json",
                "figures",
                "metrics",
                "tensorboard",
                "train.log",
                "eval.log",
            ):
                _remove(run_dir / name)
            for folder in run_dir.glob("eval_*"):  # their metrics describe the replaced weights
                _remove(folder)
        barrier()


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


# --------------------------------------------------------------------------- writing and restoring
def save_checkpoint(
    path: Path, task: SegmentationTask, state: TrainState, cfg: ExperimentConfig, info: DistInfo
) -> None:
    """Write ``last.pt`` atomically (rank 0; every rank's RNG state gathered)."""
    rngs = all_gather_object({**_rng_state(info.device), "loss_sum": state.loss_sum})
    if info.is_main:
        ckpt = {
            "format": FORMAT,
            **task.state_dict(),
            "state": dataclasses.asdict(state),
            "rng": rngs,
            "config": cfg.to_dict(),
            "threads": current_policy().threads,
        }  # reused on resume (another count is not bit-exact)
        atomic_write(path, lambda p: torch.save(ckpt, p))
    barrier()


def restore_checkpoint(ckpt: dict[str, Any], task: SegmentationTask, info: DistInfo) -> TrainState:
    """Load ``ckpt`` into ``task`` and this rank's RNGs; returns the counters."""
    task.load_state_dict(ckpt)
    state = TrainState(**ckpt["state"])
    rng = ckpt["rng"][info.rank]
    _set_rng_state(rng, info.device)
    state.loss_sum = float(rng["loss_sum"])  # this rank's own
    return state
