"""The sides a model takes and an image's way to them: the smallest sides at least an image's
that fit the architecture's side rule (``core.spec.side_rule``: at least ``min_size``, a multiple of
``side_multiple``), zero padding at the end of each axis (zero is every channel's mean after
``read_image``'s normalization, as ``train --data`` pads), and a block's map resized to the window."""

from __future__ import annotations

import numpy as np

from weights_convert.core.spec import fitted_side


def fitted(config, sides) -> tuple[int, ...]:
    return tuple(fitted_side(config, side) for side in sides)


def padded(image: np.ndarray, sides) -> np.ndarray:
    """``image`` (C, *spatial) with zeros after its last position along each spatial axis, to
    ``sides`` (each at least the image's)."""
    extra = [(0, want - have) for have, want in zip(image.shape[1:], sides, strict=True)]
    if any(after < 0 for _, after in extra):
        raise ValueError(f"cannot pad an image of {image.shape[1:]} to {tuple(sides)}")
    return np.pad(image, [(0, 0), *extra])


def resized(values: np.ndarray, sides) -> np.ndarray:
    """(C, *spatial) -> (C, *sides) by nearest neighbour in proportion: output position i along an
    axis of n takes input position floor(i * m / n) of m. A gate's map at its level's resolution
    (a quarter of the window's side two levels down, rounded down) thus spans the window."""
    for axis, want in enumerate(sides, start=1):
        have = values.shape[axis]
        index = np.minimum((np.arange(want) * have) // want, have - 1)
        values = np.take(values, index, axis=axis)
    return values
