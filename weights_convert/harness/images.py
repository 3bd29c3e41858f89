"""Image and volume files through the libraries the field trusts: PNG and JPEG through Pillow,
TIFF (2D images, multi-page stacks and volumes) through tifffile.

``read_image(path, spatial_dims)``: a float32 channels-first array, (C, H, W) or (C, D, H, W).
Grey (1 channel) or colour (3, alpha dropped; a palette or CMYK image is converted to RGB), 8- or
16-bit integers or float (TIFF). Each channel is normalized on its own, over the whole image:
``(x - mean) / std`` (population standard deviation, in float64, then cast), so every channel has
mean 0 and standard deviation 1; a constant channel (std 0) becomes zeros.

``read_mask(path, out_channels, spatial_dims)``: an int64 array of class indices, (H, W) or
(D, H, W), by one of these rules, else refused naming the values found:

- a bilevel image (Pillow mode "1", a bool TIFF): True is class 1;
- 8-bit grey: values in {0, 255} are a binary mask (255 is class 1); otherwise the values are class
  indices, each below ``max(out_channels, 2)``;
- 16- or 32-bit integers (a label map): with one output channel, instance labels, every label > 0
  the foreground (class 1); with several, class indices below ``out_channels``;
- a palette ("P") PNG: the class is the palette index (PASCAL VOC's convention). Index 255, VOC's
  "void" border, is refused: the training loss has no ignored class, and mapping void to
  background would teach the network that object borders are background; map it to a class first;
- an RGB, RGBA or grey+alpha mask is refused (which colour is which class is ambiguous).

``write_mask(path, classes)``: class indices as an 8-bit (16-bit above 255 classes) grey PNG for
2D, a TIFF stack for 3D; ``write_image(path, array)``: an array as the file its extension names
(test fixtures and, later, predictions).

Every refusal is an ``ImageError`` (a ``ValueError``), one line naming the file and the problem:
anything but a regular file (a directory, a FIFO, ``/dev/zero`` under any name, a symbolic link to
one) before it is opened for reading; an image declaring more than ``MAX_PIXELS`` pixels (or
``MAX_VALUES`` values) from its header, before anything is decoded (Pillow's own
decompression-bomb check stays on behind it and is turned into the same refusal); truncated or
corrupt files; an extension other than .png, .jpg, .jpeg, .tif, .tiff. Memory while reading stays
within a small multiple of the decoded image the header declares.
"""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

import numpy as np

from weights_convert.core.extras import IMAGE_PACKAGES, require

# 8192 x 8192 pixels, or a 512 x 512 x 256 volume: above any single image or CT volume of the
# public segmentation sets (a whole-slide image is tiled before training), 256 MiB per channel as
# float32. Below Pillow's own bomb threshold (89,478,485 pixels), which stays on behind it.
MAX_PIXELS = 2**26
# The values of an RGBA image at the pixel limit: channels beyond that count against the pixels.
MAX_VALUES = 4 * MAX_PIXELS

# extension -> the reader (and the format Pillow is allowed to find in the file)
EXTENSIONS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF"}
# tifffile's axis codes: samples and channels, and those a 3D volume's depth may carry
CHANNEL_AXES = "SC"
DEPTH_AXES = "ZQITP"
# TIFF compressions (tag 259). Without imagecodecs tifffile inflates Deflate with a plain
# zlib.decompress, unbounded (a 2 MB strip can inflate to 2 GB), LZMA and Zstandard likewise, and
# PackBits in pure Python into a list (64-fold expansion, 8 bytes an entry): Deflate strips are
# first inflated here in a streaming pass bounded by the page's declared size; the others need
# imagecodecs, whose decoders tifffile bounds by the declared size.
UNCOMPRESSED = 1
DEFLATE = (8, 32946, 50013)
INFLATE_CHUNK = 2**20


class ImageError(ValueError):
    """An image or mask file that cannot be read or trusted; the message is one line for the user."""


def _refuse(path, problem: str) -> ImageError:
    return ImageError(f"{path}: {' '.join(str(problem).split())}")


# Opening: a regular file only, checked before and after it is opened.


def _open_regular(path) -> object:
    """``path`` opened for binary reading, after ``os.stat`` (following links) shows a regular
    file; ``O_NONBLOCK`` so that a FIFO swapped in after the check cannot block the open, and the
    opened file is checked again to be the one that was checked."""
    try:
        before = os.stat(path)
    except OSError as error:
        raise _refuse(path, error.strerror or error) from None
    if not stat.S_ISREG(before.st_mode):
        raise _refuse(path, f"not a regular file ({_kind(before.st_mode)}): only image files are read")
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        raise _refuse(path, error.strerror or error) from None
    after = os.fstat(descriptor)
    if not stat.S_ISREG(after.st_mode) or (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
        os.close(descriptor)
        raise _refuse(path, "changed while it was opened")
    return os.fdopen(descriptor, "rb")


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a plain file"


def _reader(path) -> str:
    """The format an extension names; an ImageError for any other, and MissingPackage when its
    library is not installed."""
    suffix = Path(path).suffix.lower()
    if suffix not in EXTENSIONS:
        raise _refuse(path, f"unknown image extension {suffix or '(none)'}: read are {', '.join(EXTENSIONS)}")
    reader = EXTENSIONS[suffix]
    require((IMAGE_PACKAGES[reader],), f"reading {suffix} files")
    return reader


def _check_size(path, pixels: int, values: int, shape) -> None:
    if pixels > MAX_PIXELS or values > MAX_VALUES:
        raise _refuse(
            path,
            f"declares {' x '.join(map(str, shape))} ({pixels} pixels), above the limit of {MAX_PIXELS} pixels "
            f"({MAX_VALUES} values): refused before decoding",
        )


# Reading: Pillow (PNG, JPEG), tifffile (TIFF), each to (array, kind) with the channels last.


def _read_pillow(path, format_name: str, spatial_dims: int, palette_indices: bool):
    """(the decoded array, (H, W) or (H, W, C), and Pillow's mode); a palette image as its indices
    when ``palette_indices`` (a mask), else as its colours."""
    from PIL import Image

    if spatial_dims != 2:
        raise _refuse(path, f"{format_name} holds 2D images; a {spatial_dims}D model reads TIFF stacks")
    with _open_regular(path) as file:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(file, formats=["PNG", "JPEG"])  # lazy: the header only
                width, height = image.size
                bands = len(image.getbands())
                _check_size(path, width * height, width * height * bands, (height, width))
                image.load()
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise _refuse(path, f"refused before decoding: {error}") from None
        except Image.UnidentifiedImageError:
            raise _refuse(path, "not a PNG or JPEG file (Pillow finds no image in it)") from None
        except Exception as error:  # noqa: BLE001 - any decoder failure is a corrupt file
            raise _refuse(path, f"cannot be read as {format_name} ({type(error).__name__}: {error})") from None
        mode = image.mode
        if mode == "P" and not palette_indices:
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            image = image.convert("RGB")
        return np.asarray(image), mode


def _read_tiff(path, spatial_dims: int):
    """(the series as an array with the channel axis last, if any, and "TIFF")."""
    import tifffile

    with _open_regular(path) as file:
        try:
            with tifffile.TiffFile(file, name=Path(path).name) as tiff:
                if not tiff.series:
                    raise _refuse(path, "TIFF without an image")
                series = tiff.series[0]
                shape, axes, dtype = tuple(series.shape), series.axes, np.dtype(series.dtype)
                values = int(np.prod(shape, dtype=np.float64))
                channel = [i for i, a in enumerate(axes) if a in CHANNEL_AXES and shape[i] > 1]
                pixels = values // (shape[channel[0]] if channel else 1)
                _check_size(path, pixels, values, shape)
                if dtype.kind not in "biuf":
                    raise _refuse(path, f"TIFF of {dtype} values: integers, bool or float are read")
                _check_compression(path, tiff, file)
                array = series.asarray(maxworkers=1)
        except ImageError:
            raise
        except Exception as error:  # noqa: BLE001 - any decoder failure is a corrupt file
            raise _refuse(path, f"cannot be read as TIFF ({type(error).__name__}: {error})") from None
    return _tiff_layout(path, array, axes, spatial_dims), "TIFF"


def _check_compression(path, tiff, file) -> None:
    """Without imagecodecs: every Deflate strip or tile inflated once, in a streaming pass, to at
    most its page's declared size, and any other compression refused (tifffile would decode it
    without a bound); with imagecodecs tifffile bounds every decoder by the declared size."""
    from weights_convert.core.extras import installed

    if installed("imagecodecs"):
        return
    import zlib

    for page in tiff.pages:
        compression = int(page.compression)
        if compression == UNCOMPRESSED:
            continue
        if compression not in DEFLATE:
            raise _refuse(
                path,
                f"TIFF compression {page.compression.name}: read only with imagecodecs installed "
                f"(pip install imagecodecs), which bounds its memory",
            )
        limit = page.nbytes
        for offset, count in zip(page.dataoffsets, page.databytecounts, strict=True):
            inflater, inflated, left = zlib.decompressobj(), 0, count
            file.seek(offset)
            while left > 0 and not inflater.eof:
                stored = file.read(min(left, INFLATE_CHUNK))
                if not stored:
                    break
                left -= len(stored)
                while stored and inflated <= limit:
                    inflated += len(inflater.decompress(stored, INFLATE_CHUNK))
                    stored = inflater.unconsumed_tail
                if inflated > limit:
                    raise _refuse(
                        path,
                        f"TIFF strip at offset {offset} inflates beyond its page's declared {limit} bytes: "
                        f"refused before decoding",
                    )


def _tiff_layout(path, array: np.ndarray, axes: str, spatial_dims: int) -> np.ndarray:
    """The series with its size-1 axes gone and its channel axis (samples, or channels) last:
    (H, W[, C]) in 2D, (D, H, W[, C]) in 3D; a refusal naming the shape otherwise."""
    keep = [i for i, side in enumerate(array.shape) if side > 1 or axes[i] in "YX"]
    kept_axes = "".join(axes[i] for i in keep)
    array = array.reshape([array.shape[i] for i in keep])
    channels = [i for i, a in enumerate(kept_axes) if a in CHANNEL_AXES]
    if len(channels) > 1:
        raise _refuse(path, f"TIFF of shape {array.shape} (axes {kept_axes}) has two channel axes")
    if channels:
        array = np.moveaxis(array, channels[0], -1)
        kept_axes = kept_axes.replace(kept_axes[channels[0]], "") + "C"
    spatial = len(kept_axes) - (1 if channels else 0)
    if spatial != spatial_dims or (spatial == 3 and kept_axes[0] not in DEPTH_AXES):
        found = f"{spatial} spatial axes" if spatial != spatial_dims else f"axis {kept_axes[0]} in front"
        raise _refuse(
            path,
            f"TIFF of shape {array.shape} (axes {kept_axes}): {found}, a {spatial_dims}D model reads "
            f"{'H W' if spatial_dims == 2 else 'D H W (a stack of pages)'}, with or without a channel axis",
        )
    return array


def _read(path, spatial_dims: int, mask: bool):
    reader = _reader(path)
    if reader == "TIFF":
        return _read_tiff(path, spatial_dims)
    return _read_pillow(path, reader, spatial_dims, palette_indices=mask)


def read_image(path, spatial_dims: int = 2) -> np.ndarray:
    """The image at ``path`` as float32 (C, H, W), or (C, D, H, W) for ``spatial_dims`` 3, C 1 (grey)
    or 3 (colour; alpha dropped) or a TIFF's own channels, each channel normalized to mean 0 and
    standard deviation 1 (a constant channel: zeros)."""
    array, _ = _read(path, spatial_dims, mask=False)
    if array.ndim == spatial_dims:
        array = array[..., None]
    if array.shape[-1] in (2, 4) and not Path(path).suffix.lower().startswith(".tif"):
        array = array[..., :-1]  # grey+alpha or RGBA: the alpha band dropped
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    channels_first = np.moveaxis(array, -1, 0).astype(np.float64)
    if not np.all(np.isfinite(channels_first)):
        raise _refuse(path, "holds NaN or infinite values")
    axes = tuple(range(1, channels_first.ndim))
    mean = channels_first.mean(axis=axes, keepdims=True)
    std = channels_first.std(axis=axes, keepdims=True)
    normalized = np.where(std > 0, (channels_first - mean) / np.where(std > 0, std, 1), 0.0)
    return normalized.astype(np.float32)


def read_mask(path, out_channels: int, spatial_dims: int = 2) -> np.ndarray:
    """The class index of every pixel of the mask at ``path``, int64 (H, W) or (D, H, W), by the
    rules of the module's docstring; an ImageError naming the values found when none fits."""
    array, mode = _read(path, spatial_dims, mask=True)
    if array.ndim != spatial_dims or mode in ("RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr"):
        found = f"mode {mode}" if mode != "TIFF" else f"{array.shape[-1]} channels"
        raise _refuse(
            path,
            f"a mask must have one channel (grey, palette or a label map), this one has {found}: "
            f"which colour is which class is ambiguous",
        )
    if array.dtype.kind == "f":
        raise _refuse(path, f"a mask of {array.dtype} values: masks hold integer class indices or labels")
    if array.dtype == np.bool_ or mode == "1":
        return array.astype(np.int64)
    values = np.unique(array)
    classes = max(out_channels, 2)
    if mode == "P":
        if 255 in values:
            raise _refuse(
                path,
                f"palette index 255 (PASCAL VOC's void border) in {int(np.sum(array == 255))} pixels: training "
                f"has no ignored class; map void to a class first",
            )
        return _indices(path, array, values, classes, "palette indices", "the palette index is the class")
    if array.dtype.itemsize == 1 and array.dtype.kind == "u":
        if set(values.tolist()) <= {0, 255}:
            return (array == 255).astype(np.int64)
        return _indices(path, array, values, classes, "8-bit values", "nor is it a binary mask of 0 and 255")
    if out_channels == 1:
        if values.size and values[0] < 0:
            raise _refuse(path, f"label map with negative labels, e.g. {int(values[0])}")
        return (array > 0).astype(np.int64)
    hint = "with several output channels a label map holds class indices; with one, labels > 0 are the foreground"
    return _indices(path, array, values, out_channels, "labels", hint)


def _indices(path, array: np.ndarray, values: np.ndarray, classes: int, what: str, hint: str) -> np.ndarray:
    """``array`` as class indices when every value is one below ``classes``, else a refusal naming
    the values found (the first 10) and ``hint``."""
    outside = values[(values < 0) | (values >= classes)]
    if outside.size:
        more = f" and {values.size - 10} more" if values.size > 10 else ""
        found = ", ".join(str(int(v)) for v in values[:10]) + more
        raise _refuse(
            path,
            f"{what} {found} in a mask for {classes} classes: {int(outside[0])} is no class 0..{classes - 1} ({hint})",
        )
    return array.astype(np.int64)


# Writing.


def write_mask(path, classes: np.ndarray) -> None:
    """Class indices, (H, W) as an 8-bit grey PNG (16-bit above 255), (D, H, W) as a TIFF stack."""
    classes = np.asarray(classes)
    dtype = np.uint8 if classes.max(initial=0) <= 255 else np.uint16
    write_image(path, classes.astype(dtype), grey=True)


def write_image(path, array: np.ndarray, *, grey: bool = False) -> None:
    """``array`` as the file its extension names: (H, W) or (H, W, 3) through Pillow (PNG, JPEG, with
    its own mode for the dtype), anything else through tifffile (TIFF). ``grey``: a TIFF of grey
    planes whatever the array's last side (tifffile would store a last side of 3 as RGB), as class
    indices, a volume 3 wide and channels-first probabilities are."""
    reader = _reader(path)
    array = np.asarray(array)
    if reader == "TIFF":
        import tifffile

        tifffile.imwrite(path, array, **({"photometric": "minisblack"} if grey else {}))
        return
    from PIL import Image

    Image.fromarray(array).save(path)
