"""The training data of ``attention-unet train``: every source has ``batch(step)`` -> (x, target),
the global channels-first batch (NCHW, or NCDHW in 3D) of step ``step`` (from 0). Seeded synthetic
images or volumes (``SyntheticSegmentation``),
a folder of PNG images and masks (``PngFolder``, read by ``read_png``: zlib and NumPy only), and a
source's batches from a later step on (``FromStep``, for a continued run)."""

from __future__ import annotations

import dataclasses
import struct
import zlib
from pathlib import Path

import numpy as np

from weights_convert.core.spec import ModelConfig

# PNG files: 8- and 16-bit greyscale, grey+alpha, RGB and RGBA, not interlaced.
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> samples per pixel


def read_png(path) -> np.ndarray:
    """(H, W, C) float64 in [0, 1] (C = 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA); a ValueError naming the
    file and the problem for anything else (palette, bit depths below 8, interlacing, corruption)."""
    data = Path(path).read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError(f"{path}: not a PNG file")
    chunks, offset = {}, len(PNG_SIGNATURE)
    idat = []
    while offset + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        body = data[offset + 8 : offset + 8 + length]
        crc = data[offset + 8 + length : offset + 12 + length]
        if len(body) != length or len(crc) != 4 or zlib.crc32(kind + body) != struct.unpack(">I", crc)[0]:
            raise ValueError(f"{path}: corrupt PNG chunk {kind!r}")
        if kind == b"IDAT":
            idat.append(body)
        chunks.setdefault(kind, body)
        offset += 12 + length
        if kind == b"IEND":
            break
    if b"IHDR" not in chunks or not idat:
        raise ValueError(f"{path}: PNG without a header or image data")
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    if colour not in PNG_CHANNELS or depth not in (8, 16) or interlace:
        raise ValueError(
            f"{path}: PNG colour type {colour}, bit depth {depth}, interlace {interlace}: only 8- or 16-bit "
            f"grey, grey+alpha, RGB or RGBA without interlacing is read"
        )
    channels, width_bytes = PNG_CHANNELS[colour], depth // 8
    bpp = channels * width_bytes  # bytes per pixel
    stride = width * bpp
    try:
        raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8)
    except zlib.error as error:
        raise ValueError(f"{path}: corrupt PNG image data ({error})") from None
    if raw.size != height * (stride + 1):
        raise ValueError(f"{path}: PNG image data of {raw.size} bytes, expected {height * (stride + 1)}")
    rows = raw.reshape(height, stride + 1)
    image = np.zeros((height, stride), np.uint8)
    previous = np.zeros(stride, np.uint8)
    for y in range(height):
        image[y] = previous = _unfilter(rows[y, 0], rows[y, 1:], previous, bpp, path)
    if width_bytes == 2:
        image = image.reshape(height, width * channels, 2).astype(np.uint16)
        values, top = (image[..., 0] << 8) | image[..., 1], 65535.0
    else:
        values, top = image, 255.0
    return values.reshape(height, width, channels).astype(np.float64) / top


def _unfilter(kind: int, line: np.ndarray, previous: np.ndarray, bpp: int, path) -> np.ndarray:
    """One scanline with its PNG filter undone (arithmetic modulo 256)."""
    if kind == 0:
        return line
    if kind == 2:  # Up
        return line + previous
    if kind == 1:  # Sub: a running sum along the row, per byte of the pixel
        padded = np.zeros(-(-line.size // bpp) * bpp, np.int64)
        padded[: line.size] = line
        return (np.cumsum(padded.reshape(-1, bpp), axis=0).reshape(-1)[: line.size] % 256).astype(np.uint8)
    if kind not in (3, 4):
        raise ValueError(f"{path}: unknown PNG filter {kind}")
    out = np.zeros(line.size + bpp, np.int64)  # bpp zeros in front: the pixel left of the first
    up = np.concatenate([np.zeros(bpp, np.int64), previous.astype(np.int64)])
    line = line.astype(np.int64)
    for i in range(bpp, line.size + bpp, bpp):
        a, b, c = out[i - bpp : i], up[i : i + bpp], up[i - bpp : i]
        if kind == 3:  # Average
            predictor = (a + b) // 2
        else:  # Paeth
            p = a + b - c
            pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
            predictor = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
        out[i : i + bpp] = (line[i - bpp : i] + predictor) % 256
    return out[bpp:].astype(np.uint8)


def write_png(path, image: np.ndarray) -> None:
    """An (H, W), (H, W, 1) or (H, W, 3) array in [0, 1] as an 8-bit grey or RGB PNG."""
    image = np.asarray(image, np.float64)
    image = image[..., None] if image.ndim == 2 else image
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"write_png takes (H, W), (H, W, 1) or (H, W, 3), got shape {image.shape}")
    height, width, channels = image.shape
    pixels = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8).reshape(height, width * channels)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), pixels], axis=1).tobytes()  # filter 0 per row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0 if channels == 1 else 2, 0, 0, 0)
    Path(path).write_bytes(
        PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


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


class PngFolder:
    """``directory/images/<name>.png`` and ``directory/masks/<name>.png`` pairs, all one size, read
    once. Images: grey, or RGB(A) (alpha dropped), with the model's input channels (grey is repeated
    to fill them). Masks: grey; with one output channel, mask > 0 is the target; with C, the mask's
    8-bit values 0..C-1 are class indices, one-hot encoded. Batches cycle through the pairs in a
    seeded order, reshuffled every epoch."""

    def __init__(self, directory, config: ModelConfig, batch_size: int, seed: int = 0):
        directory = Path(directory)
        for folder in (directory, directory / "images", directory / "masks"):
            if not folder.is_dir():
                raise ValueError(f"{folder}: no such directory (--data DIR holds DIR/images and DIR/masks)")
        images = {p.stem: p for p in sorted((directory / "images").glob("*.png"))}
        masks = {p.stem: p for p in sorted((directory / "masks").glob("*.png"))}
        names = sorted(set(images) & set(masks))
        if not names:
            others = sorted({p.suffix or p.name for sub in ("images", "masks") for p in (directory / sub).iterdir()})
            found = f" (found {', '.join(others)}: only .png is read)" if others else ""
            raise ValueError(f"{directory}: no images/<name>.png with a masks/<name>.png of the same name{found}")
        unpaired = sorted(set(images) ^ set(masks))
        if unpaired:
            raise ValueError(f"{directory}: {len(unpaired)} PNG files without a partner, e.g. {unpaired[0]}.png")
        self.x = self._stack([(images[n], self._image(images[n], config)) for n in names])
        self.target = self._stack([(masks[n], self._mask(masks[n], config)) for n in names])
        if self.x.shape[2:] != self.target.shape[2:]:
            raise ValueError(f"{directory}: images are {self.x.shape[2:]} but masks {self.target.shape[2:]}")
        if min(self.x.shape[2:]) < config.min_size:
            raise ValueError(
                f"{directory}: images of {self.x.shape[2:]} are below the model's minimum {config.min_size}"
            )
        self.batch_size, self.seed = batch_size, seed

    @staticmethod
    def _stack(arrays: list) -> np.ndarray:
        """One array of (path, CHW array) pairs; a ValueError naming the first of another size."""
        first = arrays[0][1].shape[1:]
        for path, array in arrays:
            if array.shape[1:] != first:
                raise ValueError(f"{path}: {array.shape[1:]} pixels, the first file has {first}: sizes must agree")
        return np.stack([array for _, array in arrays])

    @staticmethod
    def _image(path: Path, config: ModelConfig) -> np.ndarray:
        image = read_png(path)
        image = image[..., :3] if image.shape[2] in (3, 4) else image[..., :1]  # alpha dropped
        if image.shape[2] == 1:
            image = np.repeat(image, config.in_channels, axis=2)
        if image.shape[2] != config.in_channels:
            raise ValueError(f"{path}: {image.shape[2]} colour channels, the model takes {config.in_channels}")
        return image.transpose(2, 0, 1)

    @staticmethod
    def _mask(path: Path, config: ModelConfig) -> np.ndarray:
        mask = read_png(path)[..., 0]
        if config.out_channels == 1:
            return (mask > 0)[None].astype(np.float64)
        classes = np.round(mask * 255).astype(int)
        if classes.max() >= config.out_channels:
            raise ValueError(f"{path}: class {classes.max()} in a mask for {config.out_channels} output channels")
        return (classes[None] == np.arange(config.out_channels)[:, None, None]).astype(np.float64)

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.x)
        positions = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs = positions // n
        index = [
            np.random.default_rng([self.seed, e]).permutation(n)[p % n] for p, e in zip(positions, epochs, strict=True)
        ]
        return self.x[index], self.target[index]


@dataclasses.dataclass
class FromStep:
    """``data``'s batches from step ``start`` on: ``batch(k)`` is ``data.batch(start + k)``, so that a
    continued run trains on the batches the uninterrupted run would have."""

    data: object
    start: int

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        return self.data.batch(self.start + step)
