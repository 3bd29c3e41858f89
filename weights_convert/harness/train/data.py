"""The training data of ``attention-unet train``: every source has ``batch(step)`` -> (x, target),
the global channels-first batch (NCHW, or NCDHW in 3D) of step ``step`` (from 0). Seeded synthetic
images or volumes (``SyntheticSegmentation``),
a folder of images (or volumes) and masks (``ImageFolder``, read through
``weights_convert.harness.images``: Pillow and tifffile), and a source's batches from a later step
on (``FromStep``, for a continued run).

The validation data: a folder's pairs split by ``held_out`` (a seeded choice of names), and every
source's ``validation_batches``: the fixed batches a validation runs on (a folder's images in name
order, centred; the synthetic data's own seeded stream, which no training batch draws from)."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import numpy as np

from weights_convert.core.losses import one_hot
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
    depends on (seed, k) only, so every process of a data-parallel run draws the same one.

    ``stream`` 0 is the training data; another stream draws other images from the same seed (the
    validation set's, stream ``VALIDATION_STREAM``): step k of stream s > 0 depends on (seed, k, s)."""

    config: ModelConfig
    batch_size: int
    size: tuple[int, ...]  # H W, or D H W
    seed: int = 0
    stream: int = 0

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, step, self.stream] if self.stream else [self.seed, step])
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

    def validation_batches(self, fraction: float, interval: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """The fixed validation set of ``--val-fraction fraction`` with a validation every
        ``interval`` steps: as many images, drawn from stream ``VALIDATION_STREAM``, as a split of
        each interval's training images would hold out, ``fraction / (1 - fraction)`` times the
        ``interval * batch_size`` images trained on between two validations (at least one), in
        batches of ``batch_size`` (the last one smaller)."""
        count = max(1, round(fraction / (1 - fraction) * interval * self.batch_size))
        held_out = dataclasses.replace(self, stream=VALIDATION_STREAM)
        batches = [held_out.batch(k) for k in range(math.ceil(count / self.batch_size))]
        last = count - (len(batches) - 1) * self.batch_size
        batches[-1] = tuple(part[:last] for part in batches[-1])
        return batches


VALIDATION_STREAM = 1  # the synthetic validation images' stream: never a training batch's (stream 0)


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
    uninterrupted one. ``option`` names the command-line option in the refusals.

    ``validation_batches()`` are the pairs in name order, each centred in ``crop`` (cropped or padded
    equally on both sides, the extra pixel of an odd difference after), never flipped;
    ``subset(names)`` is the folder of some of its pairs (a split's two sides)."""

    def __init__(self, directory, config: ModelConfig, batch_size: int, seed: int = 0, crop=None, option="--data"):
        directory = Path(directory)
        for folder in (directory, directory / "images", directory / "masks"):
            if not folder.is_dir():
                raise ValueError(f"{folder}: no such directory ({option} DIR holds DIR/images and DIR/masks)")
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
                f"{option} {directory}: the images differ in size ({', '.join(map(str, sizes[:3]))}"
                f"{', ...' if len(sizes) > 3 else ''}): pass --crop {' '.join(['SIDE'] * dims)}"
            )
        self.crop = tuple(crop) if crop is not None else sizes[0]
        self.config, self.batch_size, self.seed = config, batch_size, seed
        self.directory, self.stems = directory, stems

    def subset(self, names) -> ImageFolder:
        """This folder with only the pairs ``names`` (stems), in name order, at the same crop."""
        keep = [i for i, stem in enumerate(self.stems) if stem in set(names)]
        if not keep:
            raise ValueError(f"{self.directory}: none of the names {sorted(names)[:3]} is a pair of this folder")
        subset = copy.copy(self)
        subset.stems = [self.stems[i] for i in keep]
        subset.images = [self.images[i] for i in keep]
        subset.masks = [self.masks[i] for i in keep]
        return subset

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
            targets.append(np.flip(one_hot(classes, self.config.out_channels), axis=tuple(a + 1 for a in flips)))
        return np.stack(xs).astype(np.float64), np.stack(targets)

    def validation_batches(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every pair in name order, centred in ``crop`` and not flipped, in batches of
        ``batch_size`` (the last one smaller)."""
        samples = [self._window(image, mask, None) for image, mask in zip(self.images, self.masks, strict=True)]
        batches = []
        for start in range(0, len(samples), self.batch_size):
            chosen = samples[start : start + self.batch_size]
            x = np.stack([x for x, _ in chosen]).astype(np.float64)
            batches.append((x, np.stack([one_hot(classes, self.config.out_channels) for _, classes in chosen])))
        return batches

    def _window(self, image: np.ndarray, mask: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
        """``image`` (C, ...) and ``mask`` cropped or padded to ``self.crop`` at a random offset, or
        centred when ``rng`` is None."""
        x = np.zeros((image.shape[0], *self.crop), image.dtype)
        classes = np.zeros(self.crop, mask.dtype)
        source, target = [], []
        for side, want in zip(mask.shape, self.crop, strict=True):
            spare = abs(side - want)
            offset = spare // 2 if rng is None else int(rng.integers(0, spare + 1))
            length = min(side, want)
            source.append(slice(offset, offset + length) if side > want else slice(0, length))
            target.append(slice(offset, offset + length) if want > side else slice(0, length))
        x[(slice(None), *target)] = image[(slice(None), *source)]
        classes[tuple(target)] = mask[tuple(source)]
        return x, classes


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


def held_out(names, fraction: float, seed: int) -> list[str]:
    """The names a ``--val-fraction fraction`` split holds out for validation: ``round(fraction *
    len(names))`` of them, the first of a permutation of the sorted names seeded by (seed, 2) (a
    stream of its own: 0 orders the batches, 1 draws the crops and flips), so the split depends on
    the seed, the names and the fraction alone, and a continued run with the same ``--seed`` holds
    out the same ones. A ValueError naming the problem for a fraction outside (0, 1) or a split
    leaving no image on either side."""
    names = sorted(names)
    if not 0 < fraction < 1:
        raise ValueError(f"--val-fraction must be between 0 and 1 (both excluded), got {fraction}")
    count = round(fraction * len(names))
    if count == 0 or count == len(names):
        side = "validation" if count == 0 else "training"
        raise ValueError(
            f"--val-fraction {fraction} of {len(names)} image pairs holds out {count}, leaving no {side} image"
        )
    order = np.random.default_rng([seed, 2]).permutation(len(names))
    return sorted(names[i] for i in order[:count])


@dataclasses.dataclass
class FromStep:
    """``data``'s batches from step ``start`` on: ``batch(k)`` is ``data.batch(start + k)``, so that a
    continued run trains on the batches the uninterrupted run would have."""

    data: object
    start: int

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        return self.data.batch(self.start + step)
