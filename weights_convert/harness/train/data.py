"""The training data of ``attention-unet train``: every source has ``batch(step)`` -> (x, target),
the global channels-first batch (NCHW, or NCDHW in 3D) of step ``step`` (from 0). Seeded synthetic
images or volumes (``SyntheticSegmentation``),
a folder of images (or volumes) and masks (``ImageFolder``, read through
``weights_convert.harness.images``: Pillow and tifffile), and a source's batches from a later step
on (``FromStep``, for a continued run)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from weights_convert.core.spec import ModelConfig
from weights_convert.harness.images import EXTENSIONS, ImageError, read_image, read_mask


def model_image(path, config: ModelConfig) -> np.ndarray:
    """The image (or volume) at ``path`` as the model takes it: ``read_image``'s normalized
    channels-first float32, grey repeated to ``config.in_channels``; an ``ImageError`` when its
    channels are neither one nor the model's. ``train --data`` and ``predict`` read through it."""
    image = read_image(path, config.spatial_dims)
    if image.shape[0] == 1:
        image = np.repeat(image, config.in_channels, axis=0)
    if image.shape[0] != config.in_channels:
        raise ImageError(f"{path}: {image.shape[0]} colour channels, the model takes {config.in_channels}")
    return image


# Data sources.


@dataclasses.dataclass
class SyntheticSegmentation:
    """Seeded images (or volumes, for a 3D config) of ellipse (ellipsoid) blobs on noise and their
    one-hot masks: with one output channel, 1 inside every blob; with C, class 0 is the background
    and each blob is one of the classes 1..C-1 (a later blob covers an earlier one). Step k's batch
    depends on (seed, k) only, so every process of a data-parallel run draws the same one."""

    config: ModelConfig
    batch_size: int
    size: tuple[int, ...]  # H W, or D H W
    seed: int = 0

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, step])
        dims = len(self.size)
        grid = np.meshgrid(*(np.linspace(0, 1, side) for side in self.size), indexing="ij")
        c_in, c_out = self.config.in_channels, self.config.out_channels
        x = 0.15 * rng.uniform(0, 1, (self.batch_size, c_in, *self.size))
        target = np.zeros((self.batch_size, c_out, *self.size))
        if c_out > 1:
            target[:, 0] = 1.0  # the background, until a blob covers it
        for n in range(self.batch_size):
            for _ in range(rng.integers(1, 5)):
                centre = rng.uniform(0.15, 0.85, dims)
                radii = rng.uniform(0.06, 0.22, dims)
                inside = sum(((axis - c) / r) ** 2 for axis, c, r in zip(grid, centre, radii, strict=True)) <= 1
                x[n][:, inside] += rng.uniform(0.4, 0.85, (c_in, 1))
                if c_out == 1:
                    target[n, 0, inside] = 1.0
                else:
                    target[n, :, inside] = 0.0
                    target[n, rng.integers(1, c_out), inside] = 1.0
        return np.clip(x, 0, 1), target


class CropNeeded(ValueError):
    """The images of a folder differ in size and no crop size was given: a usage error."""


class ImageFolder:
    """``directory/images/<stem>.<ext>`` with ``directory/masks/<stem>.<ext>`` (.png, .jpg, .jpeg,
    .tif, .tiff; the two extensions may differ), read once through ``weights_convert.harness.images``:
    images normalized per channel (mean 0, standard deviation 1), grey repeated to the model's input
    channels; masks as class indices, one-hot encoded to the output channels (one output channel:
    the target is class > 0; C: channel j is class j). In 3D every file is a TIFF stack, a volume.

    Each sample is cropped to ``crop``: a random window where the image is larger; where it is
    smaller, placed at a random offset and padded with zeros (the image's mean, after normalization)
    and class 0 in the mask; then flipped along each spatial axis with probability 1/2. ``crop``
    defaults to the images' size when they all agree (``CropNeeded`` otherwise). Batches cycle
    through the pairs in a seeded order, reshuffled every epoch; the order, the windows and the
    flips of step k depend on (seed, k) only, so a continued run sees the batches of the
    uninterrupted one."""

    def __init__(self, directory, config: ModelConfig, batch_size: int, seed: int = 0, crop=None):
        directory = Path(directory)
        for folder in (directory, directory / "images", directory / "masks"):
            if not folder.is_dir():
                raise ValueError(f"{folder}: no such directory (--data DIR holds DIR/images and DIR/masks)")
        images, masks = _by_stem(directory / "images"), _by_stem(directory / "masks")
        stems = sorted(set(images) & set(masks))
        if not stems:
            others = sorted({p.suffix or p.name for sub in ("images", "masks") for p in (directory / sub).iterdir()})
            read = ", ".join(EXTENSIONS)
            found = f" (found {', '.join(others)}: only {read} are read)" if others else ""
            raise ValueError(f"{directory}: no images/<name>.<ext> with a masks/<name>.<ext> of the same name{found}")
        unpaired = sorted(set(images) ^ set(masks))
        if unpaired:
            lone = images.get(unpaired[0]) or masks[unpaired[0]]
            raise ValueError(f"{directory}: {len(unpaired)} files without a partner, e.g. {lone}")
        dims = config.spatial_dims
        self.images = [model_image(images[stem], config) for stem in stems]
        self.masks = [read_mask(masks[stem], config.out_channels, dims) for stem in stems]
        for stem, image, mask in zip(stems, self.images, self.masks, strict=True):
            if image.shape[1:] != mask.shape:
                raise ValueError(f"{images[stem]}: image of {image.shape[1:]} but its mask {masks[stem]} {mask.shape}")
        sizes = sorted({image.shape[1:] for image in self.images})
        if crop is None and len(sizes) > 1:
            raise CropNeeded(
                f"--data {directory}: the images differ in size ({', '.join(map(str, sizes[:3]))}"
                f"{', ...' if len(sizes) > 3 else ''}): pass --crop {' '.join(['SIDE'] * dims)}"
            )
        self.crop = tuple(crop) if crop is not None else sizes[0]
        self.config, self.batch_size, self.seed = config, batch_size, seed

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.images)
        positions = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        index = [np.random.default_rng([self.seed, 0, p // n]).permutation(n)[p % n] for p in positions]
        augment = np.random.default_rng([self.seed, 1, step])
        xs, targets = [], []
        for i in index:
            x, classes = self._window(self.images[i], self.masks[i], augment)
            flips = tuple(axis for axis in range(len(self.crop)) if augment.random() < 0.5)
            xs.append(np.flip(x, axis=tuple(a + 1 for a in flips)))
            targets.append(np.flip(self._one_hot(classes), axis=tuple(a + 1 for a in flips)))
        return np.stack(xs).astype(np.float64), np.stack(targets)

    def _window(self, image: np.ndarray, mask: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
        """``image`` (C, ...) and ``mask`` cropped or padded to ``self.crop`` at a random offset."""
        x = np.zeros((image.shape[0], *self.crop), image.dtype)
        classes = np.zeros(self.crop, mask.dtype)
        source, target = [], []
        for side, want in zip(mask.shape, self.crop, strict=True):
            offset = int(rng.integers(0, abs(side - want) + 1))
            length = min(side, want)
            source.append(slice(offset, offset + length) if side > want else slice(0, length))
            target.append(slice(offset, offset + length) if want > side else slice(0, length))
        x[(slice(None), *target)] = image[(slice(None), *source)]
        classes[tuple(target)] = mask[tuple(source)]
        return x, classes

    def _one_hot(self, classes: np.ndarray) -> np.ndarray:
        if self.config.out_channels == 1:
            return (classes > 0)[None].astype(np.float64)
        channels = np.arange(self.config.out_channels).reshape(-1, *([1] * classes.ndim))
        return (classes[None] == channels).astype(np.float64)


def _by_stem(folder: Path) -> dict[str, Path]:
    """stem -> file of every readable extension in ``folder``; a ValueError naming a stem with two."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in EXTENSIONS:
            continue
        if path.stem in found:
            raise ValueError(f"{folder}: two files for {path.stem}, {found[path.stem].name} and {path.name}: keep one")
        found[path.stem] = path
    return found


@dataclasses.dataclass
class FromStep:
    """``data``'s batches from step ``start`` on: ``batch(k)`` is ``data.batch(start + k)``, so that a
    continued run trains on the batches the uninterrupted run would have."""

    data: object
    start: int

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        return self.data.batch(self.start + step)
