"""Sliding-window prediction over whole tiles, memory bounded.

Windows of ``window x window`` pixels at ``stride`` cover the tile; the last window of a row
or column is flush with the border, and tiles smaller than the window are zero-padded and the
prediction cropped back. Windows are read (lazily, from any :class:`WindowSource`), batched,
run through the model, and added to one ``(K, H, W)`` float32 accumulator, so a 6000x6000
tile needs the accumulators plus one batch, never the whole input on the device.

Modes:
- ``"average"``: softmax probabilities averaged over the windows covering each pixel
  (returned scores are probabilities summing to 1 per pixel);
- ``"logit_sum"``: the authors' rule (paper evaluation: window 256, stride 32): logits summed
  over overlapping windows (returned scores are those sums; argmax gives the prediction).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from functools import partial
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F

from .config import ConfigError

ModelFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def autocast(amp: str, device: torch.device) -> AbstractContextManager[Any]:
    """``torch.autocast`` for ``"bf16"``/``"fp16"``; a null context for ``"none"``."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("amp: fp16 needs a CUDA device; use bf16 on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def model_fn(model: torch.nn.Module, device: torch.device, amp: str = "none") -> ModelFn:
    """``{name: (B, C, h, w)} -> (B, K, h, w)`` float32 logits, no grad, under autocast."""

    def run(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad(), autocast(amp, device):
            return model(batch).float()

    return run


class WindowSource(Protocol):
    """Anything that reads windows of a tile: ``size`` = (H, W); ``read`` -> {name: (C, h, w)}."""

    size: tuple[int, int]

    def read(self, y0: int, x0: int, h: int, w: int) -> Mapping[str, torch.Tensor]: ...


class TensorSource:
    """A :class:`WindowSource` over in-memory tensors ``{name: (C, H, W)}`` (same H, W)."""

    def __init__(self, inputs: Mapping[str, torch.Tensor]) -> None:
        sizes = {tuple(t.shape[-2:]) for t in inputs.values()}
        if len(sizes) != 1 or any(t.ndim != 3 for t in inputs.values()):
            shapes = {k: tuple(t.shape) for k, t in inputs.items()}
            raise ValueError(f"sliding_window_predict: inputs must be (C, H, W) of one size: {shapes}")
        self.inputs = dict(inputs)
        self.size: tuple[int, int] = sizes.pop()  # type: ignore[assignment]

    def read(self, y0: int, x0: int, h: int, w: int) -> dict[str, torch.Tensor]:
        return {k: t[:, y0 : y0 + h, x0 : x0 + w] for k, t in self.inputs.items()}


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets along one axis: every ``stride``, the last one flush with the end.

    A length not above the window gives ``[0]`` (one padded window).
    """
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


_FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))


def _forward(model_fn: ModelFn, batch: dict[str, torch.Tensor], tta_flip: bool, mode: str, k: int) -> torch.Tensor:
    """Scores of a batch: (B, K, h, w) softmax ("average") or logits ("logit_sum"), TTA-averaged."""
    total = None
    flips = _FLIPS if tta_flip else _FLIPS[:1]
    for dims in flips:
        x = {n: torch.flip(t, dims) for n, t in batch.items()} if dims else batch
        logits = model_fn(x)
        b, _, h, w = next(iter(batch.values())).shape
        if logits.shape != (b, k, h, w):
            raise ValueError(f"model_fn returned {tuple(logits.shape)}, expected {(b, k, h, w)}")
        scores = logits.float().softmax(1) if mode == "average" else logits.float()
        scores = torch.flip(scores, dims) if dims else scores
        total = scores if total is None else total + scores
    return total / len(flips)  # type: ignore[operator]


def _batches(positions: Sequence[tuple[int, int]], size: int) -> Iterator[Sequence[tuple[int, int]]]:
    for i in range(0, len(positions), size):
        yield positions[i : i + size]


def _read_batch(
    source: WindowSource,
    pos: Sequence[tuple[int, int]],
    hw: tuple[int, int],
    window: int,
    device: torch.device | str | None,
) -> dict[str, torch.Tensor]:
    """Windows at ``pos`` -> {name: (B, C, window, window)} on ``device`` (zero-padded; through
    pinned memory to a CUDA device, so the copy overlaps the model's work)."""
    reads = [source.read(y, x, *hw) for y, x in pos]
    pad = (0, window - hw[1], 0, window - hw[0])
    cuda = torch.device(device).type == "cuda" if device is not None else False
    out = {}
    for name in reads[0]:
        t = F.pad(torch.stack([r[name] for r in reads]).float(), pad)
        if cuda and t.device.type == "cpu":
            t = t.pin_memory().to(device, non_blocking=True)
        out[name] = t.to(device)
    return out


def _accumulate(
    acc: torch.Tensor,
    count: torch.Tensor | None,
    scores: torch.Tensor,
    pos: Sequence[tuple[int, int]],
    hw: tuple[int, int],
) -> None:
    """acc: (K, H, W) += scores (B, K, h, w) at ``pos``; count: (H, W) += 1 there."""
    if acc.device.type == "cpu":
        # numpy views: torch's multi-threaded add on small strided slices of a large tensor
        # can be 50x slower than one thread; numpy adds in place on the same memory.
        acc_v, scores_v = acc.numpy(), scores.numpy()
        count_v = count.numpy() if count is not None else None
    else:
        acc_v, scores_v, count_v = acc, scores, count  # type: ignore[assignment]
    for (y, x), s in zip(pos, scores_v):
        acc_v[:, y : y + hw[0], x : x + hw[1]] += s
        if count_v is not None:
            count_v[y : y + hw[0], x : x + hw[1]] += 1


def _check_args(mode: str, window: int, stride: int, batch_size: int) -> None:
    if mode not in ("average", "logit_sum"):
        raise ValueError(f"sliding_window_predict: mode must be average or logit_sum, got {mode!r}")
    if not 1 <= stride <= window or batch_size < 1:
        raise ValueError(
            f"sliding_window_predict: need 1 <= stride ({stride}) <= window ({window}) "
            f"and batch_size ({batch_size}) >= 1"
        )


def _accumulators(
    k: int,
    size: tuple[int, int],
    mode: str,
    on: torch.device | str | None,
    device: torch.device | str | None,
    out_device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (K, H, W) score and (H, W) count accumulators, on ``on`` (default: the model's GPU,
    else ``out_device``)."""
    if on is None:
        on = device if device is not None and torch.device(device).type == "cuda" else out_device
    acc = torch.zeros(k, *size, dtype=torch.float32, device=on)
    return acc, (torch.zeros(*size, dtype=torch.float32, device=on) if mode == "average" else None)


def _read_ahead(
    read: Callable[[Sequence[tuple[int, int]]], dict[str, torch.Tensor]],
    batches: Sequence[Sequence[tuple[int, int]]],
    prefetch: bool,
) -> Iterator[tuple[Sequence[tuple[int, int]], dict[str, torch.Tensor]]]:
    """(positions, windows) of every batch; with ``prefetch`` the next batch is read in a
    background thread while the caller works on the current one."""
    if not prefetch:
        yield from ((pos, read(pos)) for pos in batches)
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read, batches[0])
        for i, pos in enumerate(batches):
            batch = pending.result()
            if i + 1 < len(batches):
                pending = pool.submit(read, batches[i + 1])
            yield pos, batch


@torch.no_grad()
def sliding_window_predict(
    model_fn: ModelFn,
    inputs: Mapping[str, torch.Tensor] | WindowSource,
    num_classes: int,
    window: int = 256,
    stride: int = 128,
    batch_size: int = 8,
    mode: Literal["average", "logit_sum"] = "average",
    tta_flip: bool = False,
    device: torch.device | str | None = None,
    progress: bool = False,
    on_batch: Callable[[int], None] | None = None,
    out_device: torch.device | str = "cpu",
    accumulate_on: torch.device | str | None = None,
    prefetch: bool = True,
) -> torch.Tensor:
    """Predict a whole tile by overlapping windows.

    Args:
        model_fn: ``{name: (B, C, window, window)} -> (B, K, window, window)`` logits.
        inputs: ``{name: (C, H, W)}`` tensors, or a :class:`WindowSource` (e.g.
            ``TileSet.window_reader(i)``) that reads windows lazily from disk.
        num_classes: K.
        window: window side (the model's training crop, 256 in the paper).
        stride: step between windows (1 <= stride <= window; the paper used 32).
        batch_size: windows per model call.
        mode: ``"average"`` (mean softmax) or ``"logit_sum"`` (authors: sum of logits).
        tta_flip: also predict the left-right, up-down and both-flipped windows and average.
        device: where the model runs (inputs are moved there batch by batch).
        progress: show a tqdm bar.
        on_batch: called with the number of windows of each batch once it is scored (progress
            lines of a long evaluation).
        out_device: where the returned (K, H, W) scores go.
        accumulate_on: where the accumulators live (default: ``device`` when it is a GPU, so
            the windows' scores never leave it; else ``out_device``).
        prefetch: read (and copy to ``device``) the next batch of windows in a background
            thread while the model runs on the current one.

    Returns:
        (K, H, W) float32 scores on ``out_device``: probabilities (average) or summed logits.
    """
    _check_args(mode, window, stride, batch_size)
    source = inputs if hasattr(inputs, "read") else TensorSource(inputs)  # type: ignore[arg-type]
    H, W = source.size  # type: ignore[union-attr]
    hw = (min(window, H), min(window, W))
    positions = [(y, x) for y in window_starts(H, window, stride) for x in window_starts(W, window, stride)]
    acc, count = _accumulators(num_classes, (H, W), mode, accumulate_on, device, out_device)
    batches = list(_batches(positions, batch_size))
    read = partial(_read_batch, source, hw=hw, window=window, device=device)  # type: ignore[arg-type]
    from tqdm import tqdm

    with tqdm(total=len(batches), desc="windows", disable=not progress) as bar:
        for pos, batch in _read_ahead(read, batches, prefetch):
            scores = _forward(model_fn, batch, tta_flip, mode, num_classes)[..., : hw[0], : hw[1]]
            _accumulate(acc, count, scores.to(acc.device), pos, hw)
            bar.update()
            if on_batch is not None:
                on_batch(len(pos))
    out = acc.div_(count) if count is not None else acc  # in place: no second (K, H, W)
    return out.to(out_device)


__all__ = ["sliding_window_predict", "window_starts", "WindowSource", "TensorSource", "ModelFn", "autocast", "model_fn"]
