"""Procedural urban scenes for the synthetic Vaihingen-like data set (numpy only).

A scene is a class map (0 impervious, 1 building, 2 low vegetation, 3 tree, 4 car, 5 clutter),
an IRRG image and a DSM in metres. It is built so that elevation carries information the
image alone does not:

- building roofs are drawn from the same grey colour/texture distribution as roads and
  plazas: only the DSM (roofs 4-14 m above ground) tells them apart;
- trees and low vegetation share one colour/texture distribution: only height differs
  (crowns 4-16 m, grass below 0.4 m);
- cars are small, brightly coloured and about 1.5 m high; clutter is random colour, 0.3-2.5 m;
- terrain slopes and undulates, every object gets its own colour jitter, illumination varies
  smoothly, and pixel noise and blur are added, so the task is not trivial.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMPERVIOUS, BUILDING, LOW_VEG, TREE, CAR, CLUTTER = range(6)

_GREY = np.array([128.0, 122.0, 126.0])  # IRRG of roads and roofs (same for both)
_VEG = np.array([192.0, 96.0, 108.0])  # IRRG of grass and trees (NIR high; same for both)


@dataclass
class Scene:
    """One synthetic tile.

    Attributes:
        classes: (H, W) uint8 class indices (ISPRS order).
        image: (H, W, 3) uint8 IRRG.
        dsm: (H, W) float32 absolute elevation in metres.
    """

    classes: np.ndarray
    image: np.ndarray
    dsm: np.ndarray


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """(size, size) float32 noise, unit variance on a ``cells`` grid, bilinearly upsampled."""
    grid = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    t = np.linspace(0.0, cells, size, dtype=np.float32)
    i0 = np.minimum(t.astype(np.int64), cells - 1)
    f = t - i0
    rows = grid[i0] * (1 - f)[:, None] + grid[i0 + 1] * f[:, None]  # (size, cells+1)
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]


def box_blur(x: np.ndarray, r: int = 1) -> np.ndarray:
    """Mean over a (2r+1)^2 square (edges replicated). x: (H, W) or (H, W, C)."""
    pad = [(r, r), (r, r)] + [(0, 0)] * (x.ndim - 2)
    p = np.pad(x.astype(np.float32), pad, mode="edge")
    c = np.cumsum(np.cumsum(p, axis=0), axis=1)
    c = np.pad(c, [(1, 0), (1, 0)] + [(0, 0)] * (x.ndim - 2))
    k = 2 * r + 1
    s = c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]
    return s / (k * k)


def _rect(size: int, cy: float, cx: float, a: float, b: float, angle: float):
    """Rotated rectangle (half sizes a along ``angle``, b across) -> (slices, mask, v coord)."""
    ext = int(np.ceil(np.hypot(a, b))) + 1
    y0, y1 = max(0, int(cy) - ext), min(size, int(cy) + ext + 1)
    x0, x1 = max(0, int(cx) - ext), min(size, int(cx) + ext + 1)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    c, s = np.cos(angle), np.sin(angle)
    u = (xx - cx) * c + (yy - cy) * s
    v = -(xx - cx) * s + (yy - cy) * c
    mask = (np.abs(u) <= a) & (np.abs(v) <= b)
    return (slice(y0, y1), slice(x0, x1)), mask, v


def _disc(size: int, cy: float, cx: float, r: float):
    """Disc -> (slices, mask, normalised distance d/r)."""
    ext = int(np.ceil(r)) + 1
    y0, y1 = max(0, int(cy) - ext), min(size, int(cy) + ext + 1)
    x0, x1 = max(0, int(cx) - ext), min(size, int(cx) + ext + 1)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    d = np.hypot(yy - cy, xx - cx) / r
    return (slice(y0, y1), slice(x0, x1)), d <= 1.0, d


class _Canvas:
    """Class map, per-pixel base colour and height above ground, painted object by object."""

    def __init__(self, rng: np.random.Generator, size: int) -> None:
        self.rng, self.size = rng, size
        self.cls = np.full((size, size), LOW_VEG, np.uint8)
        self.colour = np.empty((size, size, 3), np.float32)
        self.colour[:] = _VEG + 12 * smooth_noise(rng, size, 6)[..., None]  # meadow patches
        self.height = 0.25 * np.abs(smooth_noise(rng, size, 24))  # grass 0..~0.4 m

    def paint(self, sl, mask, cls: int, colour: np.ndarray, height: np.ndarray | float) -> None:
        self.cls[sl][mask] = cls
        self.colour[sl][mask] = colour
        h = np.broadcast_to(np.asarray(height, np.float32), mask.shape)
        self.height[sl][mask] = h[mask]

    def jitter(self, base: np.ndarray, amount: float) -> np.ndarray:
        """An object's colour: base + brightness shift + small per-channel tint."""
        return base + self.rng.normal(0, amount) + self.rng.normal(0, amount / 3, 3)


def _roads(cv: _Canvas, scale: float) -> list[float]:
    rng, n = cv.rng, cv.size
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    angles = []
    for _ in range(int(rng.integers(1, 4))):
        angle = float(rng.choice([0.0, np.pi / 2]) + rng.normal(0, 0.12))
        py, px = rng.uniform(0.15 * n, 0.85 * n, 2)
        dist = np.abs(-(xx - px) * np.sin(angle) + (yy - py) * np.cos(angle))
        width = rng.uniform(12, 22) * scale
        mask = dist <= width
        cv.paint((slice(None), slice(None)), mask, IMPERVIOUS, cv.jitter(_GREY, 14), 0.0)
        angles.append(angle)
    for _ in range(int(rng.integers(2, 7) * (n / 512) ** 2)):  # plazas, yards: flat grey boxes
        angle = float(rng.choice(angles) + rng.normal(0, 0.05))
        sl, mask, _ = _rect(n, *rng.uniform(0, n, 2), *rng.uniform(14, 50, 2) * scale, angle)
        cv.paint(sl, mask, IMPERVIOUS, cv.jitter(_GREY, 14), 0.0)
    return angles


def _buildings(cv: _Canvas, angles: list[float], scale: float) -> None:
    rng, n = cv.rng, cv.size
    target = int(rng.integers(8, 15) * (n / 512) ** 2) + 1
    placed = 0
    for _ in range(target * 10):
        if placed >= target:
            break
        a, b = rng.uniform(16, 60, 2) * scale
        angle = float(rng.choice(angles) + rng.normal(0, 0.05))
        sl, mask, v = _rect(n, *rng.uniform(0, n, 2), a, b, angle)
        if mask.sum() < 50 or ((cv.cls[sl] != LOW_VEG) & mask).mean() > 0.03:
            continue  # keep buildings off roads and other buildings (touching is fine)
        roof = rng.uniform(4, 14) + (rng.uniform(1, 3) * (1 - np.abs(v) / b) if rng.random() < 0.3 else 0.0)
        cv.paint(sl, mask, BUILDING, cv.jitter(_GREY, 14), roof)
        placed += 1


def _cars(cv: _Canvas, angles: list[float], scale: float) -> None:
    rng, n = cv.rng, cv.size
    ys, xs = np.nonzero(cv.cls == IMPERVIOUS)
    if len(ys) == 0:
        return
    for _ in range(int(rng.integers(6, 16) * (n / 512) ** 2) + 1):
        j = int(rng.integers(len(ys)))
        angle = float(rng.choice(angles) + (np.pi / 2 if rng.random() < 0.2 else 0.0))
        sl, mask, _ = _rect(n, ys[j], xs[j], 10 * scale, 4.5 * scale, angle)
        if (cv.cls[sl][mask] != IMPERVIOUS).any():
            continue  # fully on a road or plaza, not on another car
        colour = rng.uniform(20, 245, 3) if rng.random() < 0.7 else np.full(3, rng.uniform(30, 230))
        cv.paint(sl, mask, CAR, colour, rng.normal(1.5, 0.12))


def _clutter(cv: _Canvas, scale: float) -> None:
    rng, n = cv.rng, cv.size
    for _ in range(int(rng.integers(2, 6) * (n / 512) ** 2) + 1):
        sl, mask, d = _disc(n, *rng.uniform(0, n, 2), rng.uniform(5, 14) * scale)
        mask &= (d + 0.3 * rng.standard_normal(d.shape) <= 1.0) & (cv.cls[sl] != BUILDING)
        cv.paint(sl, mask, CLUTTER, rng.uniform(30, 230, 3), rng.uniform(0.3, 2.5))


def _trees(cv: _Canvas, scale: float) -> None:
    rng, n = cv.rng, cv.size
    centre = rng.uniform(0, n, 2)
    for _ in range(int(rng.integers(30, 60) * (n / 512) ** 2) + 1):
        r = rng.uniform(8, 22) * scale
        if rng.random() < 0.5:  # grow a grove next to the previous tree
            centre = np.clip(centre + rng.normal(0, 1.6 * r, 2), 0, n - 1)
        else:
            centre = rng.uniform(0, n, 2)
        sl, mask, d = _disc(n, *centre, r)
        mask &= cv.cls[sl] != BUILDING
        top = rng.uniform(4, 16)
        crown = top * (0.55 + 0.45 * np.sqrt(np.clip(1 - d**2, 0, 1)))
        crown = np.maximum(crown, np.where(cv.cls[sl] == TREE, cv.height[sl], 0))
        cv.paint(sl, mask, TREE, cv.jitter(_VEG, 12), crown)


def render_scene(rng: np.random.Generator, size: int = 512, scale: float = 1.0) -> Scene:
    """Draw one scene.

    Args:
        rng: the only source of randomness.
        size: tile side in pixels.
        scale: object size multiplier (1.0 suits 512-pixel tiles).

    Returns:
        The class map, IRRG image and DSM of the tile.
    """
    cv = _Canvas(rng, size)
    angles = _roads(cv, scale)
    _buildings(cv, angles, scale)
    _cars(cv, angles, scale)
    _clutter(cv, scale)
    _trees(cv, scale)
    texture = 9 * smooth_noise(rng, size, max(4, size // 6))[..., None]  # fine texture
    light = 1 + 0.1 * smooth_noise(rng, size, 3)[..., None]
    img = box_blur((cv.colour + texture) * light, 1)
    img += 7 * rng.standard_normal((size, size, 3), dtype=np.float32)
    terrain = 250 + smooth_noise(rng, size, 2) * 1.2 + np.linspace(0, rng.uniform(-3, 3), size)[None, :]
    dsm = box_blur(terrain + cv.height, 1)
    dsm += 0.12 * rng.standard_normal((size, size), dtype=np.float32)
    return Scene(cv.cls, np.clip(img, 0, 255).astype(np.uint8), dsm.astype(np.float32))


def boundary_mask(classes: np.ndarray, radius: int = 2) -> np.ndarray:
    """(H, W) bool: pixels within ``radius`` (disc) of a different class (ISPRS erosion)."""
    H, W = classes.shape
    out = np.zeros((H, W), bool)
    p = np.pad(classes, radius, mode="edge")
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if (dy or dx) and dy * dy + dx * dx <= radius * radius:
                out |= p[radius + dy : radius + dy + H, radius + dx : radius + dx + W] != classes
    return out


__all__ = ["Scene", "render_scene", "boundary_mask", "smooth_noise", "box_blur"]
