"""``attention-unet train`` on one device: the PNG reader against Pillow, the data sources, the
checkpoints it writes and its refusals. (Two devices and the hand-over between frameworks are in
``test_data_parallel.py``.)"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import weights_convert
from weights_convert.core.random_init import random_checkpoint
from weights_convert.core.spec import ModelConfig
from weights_convert.harness import cli
from weights_convert.harness.train import PngFolder, SyntheticSegmentation, read_png, write_png

TINY = ModelConfig(channels=(4, 8))


def _pattern(h: int, w: int, channels: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise: rows where Pillow's adaptive filtering picks each PNG filter."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    smooth = np.stack([(yy * (c + 1) + xx) % 1 for c in range(channels)], axis=-1)
    noisy = rng.uniform(0, 1, (h, w, channels))
    return np.where((np.arange(h) % 3 == 0)[:, None, None], noisy, smooth)


@pytest.mark.parametrize(
    ("mode", "channels", "dtype", "top"),
    [("L", 1, np.uint8, 255), ("RGB", 3, np.uint8, 255), ("RGBA", 4, np.uint8, 255), ("I;16", 1, np.uint16, 65535)],
)
def test_read_png_matches_pillow(tmp_path, mode, channels, dtype, top):
    values = np.round(_pattern(23, 37, channels) * top).astype(dtype)
    path = tmp_path / "image.png"
    image = Image.fromarray(values[..., 0] if channels == 1 else values)
    assert image.mode == mode
    image.save(path)
    expected = np.asarray(Image.open(path)).reshape(23, 37, channels) / top
    np.testing.assert_array_equal(read_png(path), expected)
    assert np.array_equal(read_png(path), values.reshape(23, 37, channels) / top)


def _encode_with_filters(values: np.ndarray) -> bytes:
    """An 8-bit RGB PNG whose rows use the five filters in turn (PNG spec section 9), byte by byte."""
    import struct
    import zlib

    h, w, bpp = values.shape
    rows, previous = [], [0] * (w * bpp)
    for y in range(h):
        line, kind, out = [int(v) for v in values[y].reshape(-1)], y % 5, []
        for i, byte in enumerate(line):
            a = line[i - bpp] if i >= bpp else 0
            b, c = previous[i], previous[i - bpp] if i >= bpp else 0
            p = a + b - c
            paeth = (
                a if abs(p - a) <= abs(p - b) and abs(p - a) <= abs(p - c) else (b if abs(p - b) <= abs(p - c) else c)
            )
            out.append((byte - (0, a, b, (a + b) // 2, paeth)[kind]) % 256)
        rows.append(bytes([kind, *out]))
        previous = line

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b"")


def test_read_png_every_filter(tmp_path):
    values = np.round(_pattern(11, 7, 3, seed=3) * 255).astype(np.uint8)
    (tmp_path / "filters.png").write_bytes(_encode_with_filters(values))
    np.testing.assert_array_equal(read_png(tmp_path / "filters.png"), values / 255)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "filters.png")), values)


def test_write_png_round_trip(tmp_path):
    image = np.round(_pattern(9, 14, 3) * 255) / 255
    write_png(tmp_path / "rgb.png", image)
    write_png(tmp_path / "grey.png", image[..., 0])
    np.testing.assert_array_equal(read_png(tmp_path / "rgb.png"), image)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "grey.png")) / 255, image[..., 0])


def test_read_png_refuses_corrupt_and_unsupported(tmp_path):
    path = tmp_path / "bad.png"
    write_png(path, _pattern(8, 8, 1))
    data = bytearray(path.read_bytes())
    data[60] ^= 0xFF  # inside the image data: its CRC no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"bad\.png: corrupt PNG chunk b'IDAT'"):
        read_png(path)
    Image.fromarray(np.zeros((8, 8), np.uint8)).convert("P").save(tmp_path / "palette.png")
    with pytest.raises(ValueError, match="colour type 3"):
        read_png(tmp_path / "palette.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="not a PNG file"):
        read_png(tmp_path / "text.png")


def _folder(root, count=5, size=(16, 16)):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for k in range(count):
        image = _pattern(*size, 3, seed=k)
        write_png(root / "images" / f"{k}.png", image)
        write_png(root / "masks" / f"{k}.png", (image[..., 0] > 0.5).astype(float))
    return root


def test_png_folder_batches(tmp_path):
    data = PngFolder(_folder(tmp_path / "data"), TINY, batch_size=4, seed=1)
    x, target = data.batch(0)
    assert x.shape == (4, 3, 16, 16) and target.shape == (4, 1, 16, 16)
    assert set(np.unique(target)) == {0.0, 1.0}
    # Two batches of 4 from 5 pairs: every pair in the first epoch's 5 positions, none twice.
    first_epoch = np.concatenate([data.batch(0)[0], data.batch(1)[0][:1]])
    assert len({a.tobytes() for a in first_epoch}) == 5
    np.testing.assert_array_equal(data.batch(1)[0], PngFolder(tmp_path / "data", TINY, 4, seed=1).batch(1)[0])


def test_png_folder_refusals(tmp_path):
    root = _folder(tmp_path / "data")
    write_png(root / "images" / "extra.png", _pattern(16, 16, 3))
    with pytest.raises(ValueError, match="without a partner, e.g. extra.png"):
        PngFolder(root, TINY, 2)
    write_png(root / "masks" / "extra.png", _pattern(12, 16, 1))
    with pytest.raises(ValueError, match=r"extra\.png: \(12, 16\) pixels, the first file has \(16, 16\)"):
        PngFolder(root, TINY, 2)


def test_synthetic_data_is_seeded_segmentation():
    data = SyntheticSegmentation(TINY, 3, (16, 16), seed=5)
    x, target = data.batch(2)
    np.testing.assert_array_equal(x, SyntheticSegmentation(TINY, 3, (16, 16), seed=5).batch(2)[0])
    assert not np.array_equal(x, data.batch(3)[0])
    assert x.shape == (3, 3, 16, 16) and 0 <= x.min() and x.max() <= 1
    assert set(np.unique(target)) == {0.0, 1.0}
    # The masked pixels are the bright ones: the task is learnable.
    assert x.mean(axis=1)[target[:, 0] == 1].mean() > x.mean(axis=1)[target[:, 0] == 0].mean() + 0.2


@pytest.fixture()
def start(tmp_path):
    path = tmp_path / "start.safetensors"
    weights_convert.write(random_checkpoint(TINY, seed=2), path)
    return path


def test_train_on_png_folder_writes_checkpoints(tmp_path, start, capsys):
    out = tmp_path / "run"
    code = cli.main(
        ["train", str(start), "--framework", "torch", "--data", str(_folder(tmp_path / "data")), "--steps", "3"]
        + ["--every", "2", "--batch", "2", "--optimizer", "sgd", "--out", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["step_2.safetensors", "step_3.safetensors"]
    assert "train torch x1 [" in err and "img/s" in err and "3/3  loss" in err
    first, final = weights_convert.read(start), weights_convert.read(out / "step_3.safetensors")
    assert final.config == TINY
    assert max(float(np.max(np.abs(final.tensors[k] - v))) for k, v in first.tensors.items()) > 1e-3
    counter = "e1.conv.conv.1.num_batches_tracked"
    assert int(final.tensors[counter]) == int(first.tensors[counter]) + 3


def test_train_refusals(tmp_path, start, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    new = str(tmp_path / "new")
    cases = [
        ([str(start), "--out", str(out)], "exists and is not an empty directory"),
        ([str(start), "--out", new, "--batch", "3", "--data-parallel", "2"], "does not split into"),
        ([str(start), "--out", new, "--format", "nope"], "--format nope"),
        ([str(start), "--out", new, "--steps", "0"], "--steps must be at least 1"),
        (["--out", new, "--config", "{bad"], "bad --config"),
        ([str(start), "--out", new, "--config", '{"channels": [4, 8]}'], "a CHECKPOINT brings its own config"),
    ]
    for args, message in cases:
        code = cli.main(["train", *args])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and not (tmp_path / "new").exists()
    (tmp_path / "empty" / "images").mkdir(parents=True)
    code = cli.main(["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "new")])
    err = capsys.readouterr().err
    assert code == 1 and "no images/<name>.png with a masks/<name>.png" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "new").exists()
