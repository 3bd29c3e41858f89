"""``weights_convert.harness.images`` against Pillow's and tifffile's own reading of the same files,
its mask rules, the hostile files it refuses (in one line, in bounded time and memory), and
``ImageFolder`` with ``attention-unet train --data`` on mixed formats and sizes, in 2D and 3D."""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image

import weights_convert
from tests.conftest import REPO
from weights_convert.core.extras import installed
from weights_convert.core.spec import ModelConfig
from weights_convert.harness import cli
from weights_convert.harness.images import MAX_PIXELS, ImageError, read_image, read_mask, write_mask
from weights_convert.harness.train import CropNeeded, FromStep, ImageFolder

TINY = ModelConfig(channels=(4, 8))
TINY_3D = ModelConfig(channels=(4, 8), spatial_dims=3, in_channels=1)


def _normalized(array: np.ndarray) -> np.ndarray:
    """(C, ...) float64, each channel to mean 0 and standard deviation 1: the documented rule."""
    array = array.astype(np.float64)
    axes = tuple(range(1, array.ndim))
    return (array - array.mean(axis=axes, keepdims=True)) / array.std(axis=axes, keepdims=True)


def _pattern(shape, top, seed=0, dtype=np.uint8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, top + 1, shape).astype(dtype)


# Formats: each against its library's own reading.


@pytest.mark.parametrize(
    ("name", "values"),
    [
        ("grey.png", _pattern((13, 17), 255)),
        ("rgb.png", _pattern((13, 17, 3), 255)),
        ("rgba.png", _pattern((13, 17, 4), 255)),
        ("grey16.png", _pattern((13, 17), 65535, dtype=np.uint16)),
        ("rgb.jpg", _pattern((16, 24, 3), 255)),
        ("grey.jpeg", _pattern((16, 24), 255)),
    ],
)
def test_pillow_formats_match_pillow(tmp_path, name, values):
    path = tmp_path / name
    Image.fromarray(values).save(path)
    decoded = np.asarray(Image.open(path))
    decoded = decoded[..., None] if decoded.ndim == 2 else decoded[..., :3]  # alpha dropped
    image = read_image(path, 2)
    assert image.dtype == np.float32 and image.shape == (decoded.shape[2], *values.shape[:2])
    np.testing.assert_allclose(image, _normalized(np.moveaxis(decoded, -1, 0)), atol=2e-6)
    assert np.allclose(image.mean(axis=(1, 2)), 0, atol=1e-5) and np.allclose(image.std(axis=(1, 2)), 1, atol=1e-5)


@pytest.mark.parametrize(
    ("values", "spatial_dims"),
    [
        (_pattern((14, 19), 65535, dtype=np.uint16), 2),  # 2D microscopy
        (np.random.default_rng(1).normal(0, 3, (14, 19)).astype(np.float32), 2),
        (_pattern((14, 19, 3), 255), 2),  # RGB, samples last
        (_pattern((9, 12, 11), 65535, dtype=np.uint16), 3),  # a stack of pages: a volume
    ],
)
@pytest.mark.parametrize("compression", [None, "zlib"])
def test_tiff_matches_tifffile(tmp_path, values, spatial_dims, compression):
    path = tmp_path / "image.tif"
    tifffile.imwrite(path, values, compression=compression, rowsperstrip=5)
    decoded = tifffile.imread(path)
    decoded = decoded[None] if decoded.ndim == spatial_dims else np.moveaxis(decoded, -1, 0)
    image = read_image(path, spatial_dims)
    assert image.dtype == np.float32 and image.shape == decoded.shape
    np.testing.assert_allclose(image, _normalized(decoded), atol=2e-6)


def test_multipage_tiff_written_page_by_page_is_a_volume(tmp_path):
    volume = _pattern((5, 8, 9), 255, seed=4)
    with tifffile.TiffWriter(tmp_path / "pages.tiff") as tiff:
        for page in volume:
            tiff.write(page, metadata=None)
    assert len(tifffile.TiffFile(tmp_path / "pages.tiff").pages) == 5
    np.testing.assert_allclose(read_image(tmp_path / "pages.tiff", 3), _normalized(volume[None]), atol=2e-6)
    with pytest.raises(ImageError, match=r"pages\.tiff: TIFF of shape \(5, 8, 9\).*a 2D model reads H W"):
        read_image(tmp_path / "pages.tiff", 2)
    Image.fromarray(volume[0]).save(tmp_path / "flat.png")
    with pytest.raises(ImageError, match=r"flat\.png: PNG holds 2D images; a 3D model reads TIFF stacks"):
        read_image(tmp_path / "flat.png", 3)


def test_a_constant_image_is_zeros(tmp_path):
    Image.fromarray(np.full((8, 8), 77, np.uint8)).save(tmp_path / "flat.png")
    image = read_image(tmp_path / "flat.png")
    assert image.shape == (1, 8, 8) and not image.any()


# Masks: each rule, and each refusal naming what it found.


def test_mask_rules(tmp_path):
    rng = np.random.default_rng(2)
    binary = np.where(rng.random((10, 12)) > 0.5, 255, 0).astype(np.uint8)
    Image.fromarray(binary).save(tmp_path / "binary.png")
    np.testing.assert_array_equal(
        read_mask(tmp_path / "binary.png", 1), np.asarray(Image.open(tmp_path / "binary.png")) == 255
    )
    np.testing.assert_array_equal(read_mask(tmp_path / "binary.png", 2), binary // 255)

    indices = rng.integers(0, 3, (10, 12)).astype(np.uint8)
    Image.fromarray(indices).save(tmp_path / "indices.png")
    np.testing.assert_array_equal(
        read_mask(tmp_path / "indices.png", 3), np.asarray(Image.open(tmp_path / "indices.png"))
    )

    Image.fromarray(binary > 0).save(tmp_path / "bilevel.png")
    assert Image.open(tmp_path / "bilevel.png").mode == "1"
    np.testing.assert_array_equal(
        read_mask(tmp_path / "bilevel.png", 1), np.asarray(Image.open(tmp_path / "bilevel.png"))
    )

    labels = (rng.integers(0, 4, (10, 12)) * rng.integers(1, 3000, (10, 12))).astype(np.uint16)
    Image.fromarray(labels).save(tmp_path / "labels.png")
    stored = np.asarray(Image.open(tmp_path / "labels.png"))
    assert stored.dtype == np.uint16 and stored.max() > 255
    np.testing.assert_array_equal(read_mask(tmp_path / "labels.png", 1), stored > 0)  # instances: foreground
    with pytest.raises(ImageError, match=r"labels\.png: labels 0, .* in a mask for 3 classes: \d+ is no class 0\.\.2"):
        read_mask(tmp_path / "labels.png", 3)
    tifffile.imwrite(tmp_path / "classes.tif", indices.astype(np.uint16))
    np.testing.assert_array_equal(read_mask(tmp_path / "classes.tif", 3), tifffile.imread(tmp_path / "classes.tif"))

    palette = Image.frombytes("P", (12, 10), indices.tobytes())
    palette.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [200] * (253 * 3))
    palette.save(tmp_path / "palette.png")
    assert Image.open(tmp_path / "palette.png").mode == "P"
    np.testing.assert_array_equal(
        read_mask(tmp_path / "palette.png", 3), np.asarray(Image.open(tmp_path / "palette.png"))
    )

    volume = (rng.random((9, 12, 11)) > 0.5).astype(np.uint8) * 255
    tifffile.imwrite(tmp_path / "volume.tif", volume)
    np.testing.assert_array_equal(
        read_mask(tmp_path / "volume.tif", 1, 3), tifffile.imread(tmp_path / "volume.tif") > 0
    )


def test_mask_refusals(tmp_path):
    rng = np.random.default_rng(3)
    void = rng.integers(0, 3, (10, 12)).astype(np.uint8)
    void[0] = 255  # VOC's border
    palette = Image.frombytes("P", (12, 10), void.tobytes())
    palette.putpalette(list(range(256)) * 3)
    palette.save(tmp_path / "void.png")
    Image.fromarray(rng.integers(0, 255, (10, 12, 3)).astype(np.uint8)).save(tmp_path / "rgb.png")
    unknown = np.zeros((10, 12), np.uint8)
    unknown[2:4, 2:4], unknown[5, 5] = 255, 7
    Image.fromarray(unknown).save(tmp_path / "unknown.png")
    tifffile.imwrite(tmp_path / "float.tif", rng.random((10, 12)).astype(np.float32))
    cases = {
        "void.png": "palette index 255 (PASCAL VOC's void border) in 12 pixels",
        "rgb.png": "a mask must have one channel (grey, palette or a label map), this one has mode RGB",
        "unknown.png": "8-bit values 0, 7, 255 in a mask for 2 classes: 7 is no class 0..1",
        "float.tif": "a mask of float32 values",
    }
    for name, message in cases.items():
        with pytest.raises(ImageError) as caught:
            read_mask(tmp_path / name, 1)
        text = str(caught.value)
        assert text.startswith(f"{tmp_path / name}: ") and message in text and "\n" not in text, text


def test_write_mask_round_trip(tmp_path):
    classes = np.random.default_rng(5).integers(0, 4, (9, 12, 11))
    write_mask(tmp_path / "m.png", classes[0])
    write_mask(tmp_path / "m.tif", classes)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "m.png")), classes[0])
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "m.tif"), classes)
    np.testing.assert_array_equal(read_mask(tmp_path / "m.tif", 4, 3), classes)


# Hostile files: refused in one line, in bounded time and memory.


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_declaring(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height 8-bit grey pixels, with a tiny IDAT."""
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + _chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + _chunk(b"IEND", b"")


def _paeth_png(values: np.ndarray) -> bytes:
    """An 8-bit RGB PNG whose every row uses the Paeth filter (PNG spec section 9.4)."""
    h, w, bpp = values.shape
    data = values.astype(np.int64).reshape(h, w * bpp)
    up = np.vstack([np.zeros((1, w * bpp), np.int64), data[:-1]])
    left = np.hstack([np.zeros((h, bpp), np.int64), data[:, :-bpp]])
    corner = np.hstack([np.zeros((h, bpp), np.int64), up[:, :-bpp]])
    p = left + up - corner
    pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - corner)
    predictor = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, corner))
    rows = np.hstack([np.full((h, 1), 4), (data - predictor) % 256]).astype(np.uint8)
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + _chunk(b"IDAT", zlib.compress(rows.tobytes())) + _chunk(b"IEND", b"")


def test_a_paeth_filtered_png_decodes_fast(tmp_path):
    values = _pattern((46, 46, 3), 255, seed=6)
    (tmp_path / "paeth.png").write_bytes(_paeth_png(values))
    assert 5000 < (tmp_path / "paeth.png").stat().st_size < 8000
    started = time.perf_counter()
    image = read_image(tmp_path / "paeth.png")
    assert time.perf_counter() - started < 2.0
    np.testing.assert_allclose(image, _normalized(np.moveaxis(values, -1, 0)), atol=2e-6)


def _deflate_bomb_tiff(path, mebibytes: int) -> None:
    """A valid 64 x 64 Deflate TIFF whose one strip is replaced by a stream inflating to
    ``mebibytes`` MiB of zeros (tifffile alone, without imagecodecs, inflates all of it)."""
    tifffile.imwrite(path, np.zeros((64, 64), np.uint8), compression="zlib", rowsperstrip=64, metadata=None)
    deflate, zeros = zlib.compressobj(9), bytes(2**20)
    bomb = b"".join([*(deflate.compress(zeros) for _ in range(mebibytes)), deflate.flush()])
    end = path.stat().st_size
    with open(path, "ab") as file:
        file.write(bomb)
    with tifffile.TiffFile(path, mode="r+b") as tiff:
        tiff.pages[0].tags["StripOffsets"].overwrite([end])
        tiff.pages[0].tags["StripByteCounts"].overwrite([len(bomb)])


READ_HOSTILE = """
import json, os, resource, sys, time
from weights_convert.harness.images import read_image, read_mask
out = {}
for name in sys.argv[1:]:
    before, started = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    try:
        (read_mask if name.startswith("mask") else read_image)(name, *((1,) if name.startswith("mask") else ()))
        out[name] = {"refusal": None}
    except ValueError as error:
        out[name] = {"refusal": str(error), "type": type(error).__name__}
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out[name].update(kib=after - before, seconds=time.perf_counter() - started)
print("RESULT " + json.dumps(out))
"""


def test_hostile_files_are_refused_in_one_line_in_bounded_time_and_memory(tmp_path):
    (tmp_path / "bomb.png").write_bytes(_png_declaring(50000, 50000))
    assert (tmp_path / "bomb.png").stat().st_size < 2000
    (tmp_path / "over.png").write_bytes(_png_declaring(8193, 8192))  # our limit, below Pillow's
    assert 8193 * 8192 > MAX_PIXELS and 8193 * 8192 < Image.MAX_IMAGE_PIXELS
    tifffile.imwrite(tmp_path / "tbomb.tif", np.zeros((8, 8), np.uint8), metadata=None)
    with tifffile.TiffFile(tmp_path / "tbomb.tif", mode="r+b") as tiff:
        tiff.pages[0].tags["ImageWidth"].overwrite(40000)
        tiff.pages[0].tags["ImageLength"].overwrite(40000)
    _deflate_bomb_tiff(tmp_path / "zbomb.tif", mebibytes=200)
    os.symlink("/dev/zero", tmp_path / "zero.png")
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "folder.png").mkdir()
    Image.fromarray(_pattern((40, 40, 3), 255)).save(tmp_path / "whole.png")
    Image.fromarray(_pattern((40, 40, 3), 255)).save(tmp_path / "whole.jpg")
    tifffile.imwrite(tmp_path / "whole.tif", _pattern((40, 40), 255))
    for name in ("whole.png", "whole.jpg", "whole.tif"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut_{name}").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("not an image")
    Image.fromarray(_pattern((8, 8, 3), 255)).save(tmp_path / "mask_rgb.png")
    expected = {
        "bomb.png": "refused before decoding",
        "over.png": f"declares 8192 x 8193 ({8193 * 8192} pixels), above the limit of {MAX_PIXELS} pixels",
        "tbomb.tif": "declares 40000 x 40000 (1600000000 pixels), above the limit",
        "zbomb.tif": "inflates beyond its page's declared 4096 bytes",
        "zero.png": "not a regular file (a character device)",
        "fifo.png": "not a regular file (a FIFO)",
        "folder.png": "not a regular file (a directory)",
        "cut_whole.png": "cannot be read as PNG",
        "cut_whole.jpg": "cannot be read as JPEG",
        "cut_whole.tif": "cannot be read as TIFF",
        "text.png": "not a PNG or JPEG file",
        "mask_rgb.png": "this one has mode RGB",
    }
    if not installed("imagecodecs"):  # tifffile would decode PackBits without a bound
        Image.fromarray(_pattern((8, 8), 255)).save(tmp_path / "packbits.tif", compression="packbits")
        expected["packbits.tif"] = "TIFF compression PACKBITS: read only with imagecodecs installed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", READ_HOSTILE, *expected],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert time.perf_counter() - started < 60 and done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.split("RESULT ", 1)[1])
    for name, message in expected.items():
        result = results[name]
        assert result["type"] == "ImageError" and message in result["refusal"], (name, result)
        assert result["refusal"].startswith(f"{name}: ") and "\n" not in result["refusal"], (name, result)
        assert result["seconds"] < 5, (name, result)
    for name in ("bomb.png", "over.png", "tbomb.tif", "zbomb.tif"):  # the first reads grow the heap for imports
        assert results[name]["kib"] < 64 * 1024, (name, results[name])


# ImageFolder and `attention-unet train --data`.


def _folder(root, config=TINY):
    """Images in PNG, TIFF and JPEG at different sizes, masks in PNG, TIFF (a 16-bit label map) and
    a palette PNG; or, for a 3D config, TIFF stacks of about 9 x 12 x 11."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(7)
    if config.spatial_dims == 3:
        for k, shape in enumerate([(9, 12, 11), (10, 11, 12), (9, 12, 11)]):
            tifffile.imwrite(root / "images" / f"v{k}.tif", _pattern(shape, 65535, seed=k, dtype=np.uint16))
            tifffile.imwrite(root / "masks" / f"v{k}.tiff", (rng.random(shape) > 0.6).astype(np.uint8) * 255)
        return root
    Image.fromarray(_pattern((20, 24, 3), 255, seed=1)).save(root / "images" / "a.png")
    Image.fromarray(np.where(rng.random((20, 24)) > 0.5, 255, 0).astype(np.uint8)).save(root / "masks" / "a.png")
    tifffile.imwrite(root / "images" / "b.tif", _pattern((14, 22), 65535, seed=2, dtype=np.uint16))
    labels = (rng.integers(0, 2, (14, 22)) * rng.integers(1, 900, (14, 22))).astype(np.uint16)
    tifffile.imwrite(root / "masks" / "b.tiff", labels)
    Image.fromarray(_pattern((24, 18, 3), 255, seed=3)).save(root / "images" / "c.jpg")
    palette = Image.frombytes("P", (18, 24), rng.integers(0, 2, (24, 18)).astype(np.uint8).tobytes())
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.save(root / "masks" / "c.png")
    return root


def test_image_folder_crops_flips_and_is_seeded_per_step(tmp_path):
    root = _folder(tmp_path / "data")
    with pytest.raises(CropNeeded, match=r"the images differ in size .*: pass --crop SIDE SIDE"):
        ImageFolder(root, TINY, 2)
    data = ImageFolder(root, TINY, batch_size=4, seed=3, crop=(16, 16))
    x, target = data.batch(0)
    assert x.shape == (4, 3, 16, 16) and target.shape == (4, 1, 16, 16)
    assert set(np.unique(target)) == {0.0, 1.0}
    again = ImageFolder(root, TINY, batch_size=4, seed=3, crop=(16, 16))
    for step in (0, 5):
        np.testing.assert_array_equal(data.batch(step)[0], again.batch(step)[0])
        np.testing.assert_array_equal(data.batch(step)[1], again.batch(step)[1])
    np.testing.assert_array_equal(FromStep(again, 4).batch(1)[0], data.batch(5)[0])
    assert not np.array_equal(data.batch(1)[0], data.batch(2)[0])
    # A window larger than an image: padded with zeros (the normalized mean) and class 0.
    big = ImageFolder(root, TINY, batch_size=3, seed=0, crop=(26, 26))
    x, target = big.batch(0)
    assert x.shape == (3, 3, 26, 26)
    empty = np.all(x == 0, axis=1)
    assert empty.mean() > 0.2 and not target[:, 0][empty].any()


def test_image_folder_flips_every_axis(tmp_path):
    root = tmp_path / "one"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    image = _pattern((6, 7), 255, seed=8)
    Image.fromarray(image).save(root / "images" / "a.png")
    Image.fromarray(np.where(image > 128, 255, 0).astype(np.uint8)).save(root / "masks" / "a.png")
    data = ImageFolder(root, dataclasses.replace(TINY, in_channels=1), batch_size=1, seed=0)
    plain = _normalized(image[None].astype(float))[0]
    variants = {"none": plain, "rows": plain[::-1], "columns": plain[:, ::-1], "both": plain[::-1, ::-1]}
    seen = set()
    for step in range(24):
        x, target = data.batch(step)
        match = [name for name, v in variants.items() if np.allclose(x[0, 0], v, atol=1e-5)]
        assert len(match) == 1, step
        flipped_mask = {"none": image, "rows": image[::-1], "columns": image[:, ::-1], "both": image[::-1, ::-1]}
        np.testing.assert_array_equal(target[0, 0], flipped_mask[match[0]] > 128)
        seen.add(match[0])
    assert seen == set(variants)


def test_image_folder_refusals(tmp_path):
    root = _folder(tmp_path / "data")
    Image.fromarray(_pattern((8, 8), 255)).save(root / "images" / "a.tif")
    with pytest.raises(ValueError, match=r"two files for a, a\.png and a\.tif: keep one"):
        ImageFolder(root, TINY, 2, crop=(8, 8))
    (root / "images" / "a.tif").unlink()
    Image.fromarray(_pattern((8, 8), 255)).save(root / "images" / "lone.png")
    with pytest.raises(ValueError, match=r"1 files without a partner, e\.g\. .*lone\.png"):
        ImageFolder(root, TINY, 2, crop=(8, 8))
    Image.fromarray(_pattern((9, 8), 1)).save(root / "masks" / "lone.png")
    with pytest.raises(ValueError, match=r"lone\.png: image of \(8, 8\) but its mask .*lone\.png \(9, 8\)"):
        ImageFolder(root, TINY, 2, crop=(8, 8))


def test_train_on_mixed_formats_and_sizes(tmp_path, start, capsys):
    root = _folder(tmp_path / "data")
    common = ["train", str(start), "--framework", "torch", "--data", str(root), "--steps", "2", "--batch", "2"]
    code = cli.main([*common, "--out", str(tmp_path / "no")])
    err = capsys.readouterr().err
    assert (
        code == 2 and "differ in size" in err and "pass --crop SIDE SIDE" in err and len(err.strip().splitlines()) == 1
    )
    code = cli.main([*common, "--crop", "16", "16", "16", "--out", str(tmp_path / "no")])
    err = capsys.readouterr().err
    assert code == 2 and "--crop takes 2 positive sides" in err and not (tmp_path / "no").exists()
    code = cli.main(["train", str(start), "--crop", "16", "16", "--out", str(tmp_path / "no")])
    err = capsys.readouterr().err
    assert code == 2 and "--crop crops the images of --data DIR" in err and not (tmp_path / "no").exists()
    code = cli.main([*common, "--crop", "16", "12", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["step_2.safetensors"]
    first, final = weights_convert.read(start), weights_convert.read(tmp_path / "run" / "step_2.safetensors")
    assert max(float(np.max(np.abs(final.tensors[k] - v))) for k, v in first.tensors.items()) > 1e-4


def test_train_3d_on_tiff_stacks(tmp_path, capsys):
    root = _folder(tmp_path / "volumes", TINY_3D)
    config = json.dumps({"channels": [4, 8], "spatial_dims": 3, "in_channels": 1})
    args = ["train", "--framework", "torch", "--config", config, "--data", str(root), "--crop", "8", "8", "8"]
    code = cli.main([*args, "--steps", "2", "--batch", "2", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 0, err
    final = weights_convert.read(tmp_path / "run" / "step_2.safetensors")
    assert final.config.spatial_dims == 3 and final.optimizer.step == 2


def test_train_refuses_a_hostile_data_file_in_one_line(tmp_path, capsys):
    root = _folder(tmp_path / "data")
    (root / "images" / "a.png").unlink()
    os.symlink("/dev/zero", root / "images" / "a.png")
    code = cli.main(["train", "--data", str(root), "--crop", "8", "8", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert err.startswith("attention-unet train: error: ") and "a.png: not a regular file (a character device)" in err
    assert not (tmp_path / "run").exists()


def test_a_volume_three_wide_is_written_as_grey_planes(tmp_path):
    # tifffile stores a last side of 3 as RGB unless told otherwise; a mask is class indices.
    classes = np.arange(60).reshape(4, 5, 3) % 2
    write_mask(tmp_path / "narrow.tif", classes)
    np.testing.assert_array_equal(read_mask(tmp_path / "narrow.tif", 1, spatial_dims=3), classes)
