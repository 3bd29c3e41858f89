"""Windows over an image and the blending of what the model says in each, in NumPy alone: MONAI's
``sliding_window_inference`` (``monai.inferers``) written out, so that every framework's windows
and weights are the same.

Windows: along each spatial axis of ``side`` positions, windows of ``window`` positions start every
``max(1, int(window * (1 - overlap)))`` positions, ``ceil((side - window) / interval) + 1`` of them,
and the last one is moved back to lie flush with the border (MONAI's ``dense_patch_slices``); a side
no longer than the window has one window at 0. The windows of an image are every combination of
the axes' starts, so they cover every pixel.

Blending: each window's output is weighted by one importance map of the window's shape, the
weighted outputs are summed over the image, and the sum is divided by the sum of the weights at
each pixel. ``"constant"`` weighs every pixel of a window alike (MONAI's default mode), so where
windows overlap their outputs are averaged; ``"gaussian"`` weighs a window's centre above its
borders, where a convolutional network sees least of its context: along each axis
``exp(-x**2 / (2 sigma**2))`` at the offset x from the window's centre ((side - 1) / 2), sigma
``SIGMA_SCALE`` times the window's side (MONAI's ``sigma_scale``), the axes multiplied, and every
weight raised to at least ``MIN_WEIGHT`` (MONAI's ``compute_importance_map``). Every weight is thus
positive, so the division is defined wherever a window lies.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

OVERLAP = 0.25  # MONAI's default: a quarter of each window shared with its neighbour
BLENDS = ("constant", "gaussian")
SIGMA_SCALE = 0.125  # MONAI's default sigma_scale
# MONAI's floor under the Gaussian's weights: a window's corners (4 sigma from its centre along
# each axis, exp(-8) = 3.4e-4 per axis) still count a little, and no weight underflows to zero.
MIN_WEIGHT = 1e-3


def starts(side: int, window: int, overlap: float = OVERLAP) -> list[int]:
    """The first positions of the windows along one axis of ``side`` positions, the last window
    flush with the border."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if window < 1:
        raise ValueError(f"a window needs at least one position, got {window}")
    if side <= window:
        return [0]
    interval = max(1, int(window * (1 - overlap)))
    count = math.ceil((side - window) / interval) + 1
    return sorted({min(k * interval, side - window) for k in range(count)})


def windows(sides, window, overlap: float = OVERLAP) -> list[tuple[slice, ...]]:
    """The windows over an image of ``sides`` (each at least the window's side), as spatial
    slices, in C order (the last axis fastest)."""
    sides, window = tuple(sides), tuple(window)
    if len(sides) != len(window):
        raise ValueError(f"a {len(window)}D window over a {len(sides)}D image")
    if any(s < w for s, w in zip(sides, window, strict=True)):
        raise ValueError(f"a window of {window} is larger than the image {sides}: pad the image first")
    axes = [starts(s, w, overlap) for s, w in zip(sides, window, strict=True)]
    return [tuple(slice(p, p + w) for p, w in zip(place, window, strict=True)) for place in itertools.product(*axes)]


def weights(window, blend: str = "constant") -> np.ndarray:
    """The importance map of one window (float64, the window's shape, every entry positive)."""
    window = tuple(window)
    if blend == "constant":
        return np.ones(window)
    if blend != "gaussian":
        raise ValueError(f"unknown blend {blend!r}; choose from {', '.join(BLENDS)}")
    profiles = []
    for side in window:
        offset = np.arange(side) - (side - 1) / 2
        sigma = max(SIGMA_SCALE * side, np.finfo(np.float64).tiny)
        profiles.append(np.exp(-0.5 * (offset / sigma) ** 2))
    importance = profiles[0]
    for profile in profiles[1:]:
        importance = np.multiply.outer(importance, profile)
    return np.maximum(importance, max(float(importance.min()), MIN_WEIGHT))


class Blend:
    """The weighted sum of window outputs over an image of ``sides`` and the sum of the weights,
    per output name; ``result(name)`` is their quotient (channels first, float64)."""

    def __init__(self, sides, importance: np.ndarray):
        self.sides = tuple(sides)
        self.importance = importance
        self.total = np.zeros(self.sides)
        self.sums: dict[str, np.ndarray] = {}

    def add(self, place: tuple[slice, ...], outputs: dict) -> None:
        """One window's outputs (name -> (C, *window) array) at ``place``."""
        self.total[place] += self.importance
        for name, value in outputs.items():
            if name not in self.sums:
                self.sums[name] = np.zeros((value.shape[0], *self.sides))
            self.sums[name][(slice(None), *place)] += self.importance * np.asarray(value, np.float64)

    def result(self, name: str) -> np.ndarray:
        if np.any(self.total == 0):
            raise ValueError(f"{int(np.sum(self.total == 0))} positions lie in no window")
        return self.sums[name] / self.total
