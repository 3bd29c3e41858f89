"""``attention-unet predict``: the windows and their blending (``harness/predict/tiling.py``),
padding to the side rule and cropping back, the files written and read back, the masks of torch,
Flax and Keras against each other, a MONAI checkpoint and a volume, and the refusals."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tifffile
from PIL import Image

import weights_convert
from tests.conftest import run_cli
from weights_convert.core.monai_spec import MonaiConfig
from weights_convert.core.random_init import random_checkpoint
from weights_convert.core.spec import ModelConfig
from weights_convert.harness import reference
from weights_convert.harness.parity.compare import mask_row, rel_diff
from weights_convert.harness.parity.inputs import centred_logits
from weights_convert.harness.parity.tolerances import tolerance
from weights_convert.harness.predict import Blend, models, predict, starts, weights, windows
from weights_convert.harness.predict.prediction import classes
from weights_convert.harness.predict.sizes import fitted, padded
from weights_convert.harness.train.data import model_image

TINY = ModelConfig(1, 1, (4, 8))
TINY_3D = ModelConfig(1, 1, (2, 4), spatial_dims=3)
MONAI = MonaiConfig(1, 1, (4, 8, 16), strides=(2, 2))
SIDES = (23, 30)


def _grey(path, sides=SIDES, seed=0, channels=None) -> None:
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(*(np.linspace(0, 1, s) for s in sides), indexing="ij")
    picture = 0.6 * np.sin(6 * yy + 4 * xx) + 0.4 * rng.uniform(0, 1, sides)
    picture = np.round(255 * (picture - picture.min()) / np.ptp(picture)).astype(np.uint8)
    Image.fromarray(picture if channels is None else np.repeat(picture[..., None], channels, -1)).save(path)


def _straddling(config, image: np.ndarray, seed: int = 3):
    """Random weights whose logits on ``image`` have both signs (``parity.inputs.centred_logits``)."""
    x = padded(image, fitted(config, image.shape[1:]))[None].astype(np.float64)
    return centred_logits(random_checkpoint(config, seed=seed), x)


# Windows and blending, framework-free.


@pytest.mark.parametrize("side, window, overlap", [(10, 4, 0.25), (23, 8, 0.5), (8, 8, 0.2), (5, 8, 0.0), (30, 7, 0.9)])
def test_windows_cover_every_position_the_last_flush_with_the_border(side, window, overlap):
    first = starts(side, window, overlap)
    assert first[0] == 0 and first[-1] == max(0, side - window)
    interval = max(1, int(window * (1 - overlap)))
    assert all(0 < b - a <= interval for a, b in itertools.pairwise(first))
    if side >= window:
        covered = np.zeros(side, int)
        for p in first:
            covered[p : p + window] += 1
        assert covered.min() >= 1
    assert starts(10, 4, 0.25) == [0, 3, 6]  # MONAI: interval int(4 * 0.75) = 3, ceil(6 / 3) + 1 windows


def test_blending_reproduces_a_constant_and_the_input_itself():
    sides, window = (13, 17, 9), (5, 8, 4)
    image = np.random.default_rng(0).normal(size=(2, *sides))
    places = windows(sides, window, 0.4)
    for blend in ("constant", "gaussian"):
        importance = weights(window, blend)
        assert importance.shape == window and importance.min() > 0 and importance.max() <= 1
        blended = Blend(sides, importance)
        for place in places:
            blended.add(place, {"constant": np.full((1, *window), 0.75), "identity": image[(slice(None), *place)]})
        coverage = np.zeros(sides)
        for place in places:
            coverage[place] += importance
        np.testing.assert_array_equal(blended.total, coverage)
        assert blended.total.min() > 0  # every position lies in a window
        if blend == "constant":
            np.testing.assert_array_equal(blended.result("constant"), 0.75)
        np.testing.assert_allclose(blended.result("constant"), 0.75, rtol=1e-15)
        np.testing.assert_allclose(blended.result("identity"), image, rtol=1e-13, atol=1e-15)
    gaussian = weights((9, 16), "gaussian")
    np.testing.assert_array_equal(gaussian, gaussian[::-1, ::-1])  # centred on the window
    assert gaussian[4, 1] == np.exp(-0.5 * (6.5 / 2) ** 2)  # 6.5 from the centre, sigma 16 / 8
    assert gaussian.min() == gaussian[4, 0] == 1e-3  # exp(-0.5 * (7.5 / 2) ** 2) = 8.8e-4, raised to MONAI's floor
    assert weights((9,), "gaussian").argmax() == 4 and weights((9,), "gaussian").max() == 1  # odd: 1 at the centre


# One image through a model.


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "cells.png"
    _grey(path)
    return path


@pytest.fixture(scope="module")
def tiny_checkpoint(image_file):
    return _straddling(TINY, model_image(image_file, TINY))


def test_one_window_is_the_model_itself_and_tiles_cover_the_image(tiny_checkpoint, image_file):
    image = model_image(image_file, TINY)
    run = models.predictor("torch", tiny_checkpoint)
    whole = predict(run, TINY, image)
    assert whole.windows == 1 and whole.logits.shape == (1, *SIDES)
    np.testing.assert_array_equal(whole.logits, run(image[None])["output"][0])
    one_tile = predict(run, TINY, image, tile=SIDES)
    np.testing.assert_array_equal(one_tile.logits, whole.logits)
    tiled = predict(run, TINY, image, tile=(8, 8), overlap=0.5, blend="gaussian", batch=3)
    assert tiled.windows == len(starts(SIDES[0], 8, 0.5)) * len(starts(SIDES[1], 8, 0.5))
    assert tiled.logits.shape == (1, *SIDES) and np.all(np.isfinite(tiled.logits))
    assert set(tiled.gates) == {"d1.ag"} and tiled.gates["d1.ag"].shape == SIDES
    assert 0 <= tiled.gates["d1.ag"].min() and tiled.gates["d1.ag"].max() <= 1
    # A tile larger than the image: the image padded to it, the prediction cropped back.
    assert predict(run, TINY, image, tile=(32, 32)).logits.shape == (1, *SIDES)


def test_odd_sides_are_padded_to_the_side_rule_and_cropped_back():
    assert fitted(MONAI, (13, 18)) == (16, 20) and fitted(TINY, (1, 5)) == (2, 5)
    image = np.random.default_rng(1).normal(size=(1, 13, 18)).astype(np.float32)
    checkpoint = random_checkpoint(MONAI, seed=1)
    run = models.predictor("torch", checkpoint)
    prediction = predict(run, MONAI, image)
    assert prediction.logits.shape == (1, 13, 18) and set(prediction.gates) == {"d1.ag", "d2.ag"}
    direct = run(padded(image, (16, 20))[None])["output"][0, :, :13, :18]
    np.testing.assert_array_equal(prediction.logits, direct)


# The command.


def _agreeing(masks: dict, checkpoint, image: np.ndarray) -> None:
    """Every framework's 0/255 mask is the float64 reference's (logit > 0) wherever that logit's
    magnitude exceeds the float32 output bound, relative to the NumPy reference's own float32
    noise on the same input (``parity.compare.mask_row``, as the parity and export checks judge
    masks)."""
    x = image[None].astype(np.float64)
    exact = reference.forward(checkpoint.tensors, x, config=TINY)["output"]
    rounded = reference.forward(checkpoint.tensors, x, config=TINY, precision="float32")["output"]
    bound = tolerance("float32", rel_diff(rounded, exact, "float32")[1])
    for framework, mask in masks.items():
        row = mask_row(mask[None, None] / 255.0 - 0.5, exact, bound, "float32")
        assert row.passed, f"{framework}: {int(row.max_abs_diff)} decided pixels differ from the reference"
        assert row.agree > 0.9, row.agree


def test_every_framework_writes_the_same_masks(tmp_path, capsys, tiny_checkpoint, image_file):
    model = tmp_path / "tiny.safetensors"
    weights_convert.write(tiny_checkpoint, model)
    masks = {}
    for framework in ("torch", "flax", "keras"):
        out = tmp_path / framework
        code, _, err = run_cli(capsys, "predict", model, image_file, "--out", out, "--framework", framework)
        assert code == 0, err
        assert f"predict {framework}" in err and "[1/1]" in err and "1 window," in err
        assert sorted(p.name for p in out.iterdir()) == ["cells_mask.png", "cells_overlay.png", "cells_prob.tif"]
        with Image.open(out / "cells_mask.png") as mask:
            assert mask.mode == "L" and mask.size == SIDES[::-1]
            masks[framework] = np.asarray(mask)
        assert set(np.unique(masks[framework])) == {0, 255}
        probabilities = tifffile.imread(out / "cells_prob.tif")
        assert probabilities.dtype == np.float32 and probabilities.shape == (1, *SIDES)
        assert 0 <= probabilities.min() and probabilities.max() <= 1
        with Image.open(out / "cells_overlay.png") as overlay:
            width, height = overlay.size
            assert overlay.format == "PNG" and height > 0 and 2.2 * height < width < 3.2 * height  # 3 panels
    image = model_image(image_file, TINY)
    logits = predict(models.predictor("torch", tiny_checkpoint), TINY, image).logits
    _agreeing(masks, tiny_checkpoint, image)
    np.testing.assert_array_equal(masks["torch"], classes(logits) * 255)


def test_a_monai_checkpoint_and_a_volume(tmp_path, capsys):
    monai = tmp_path / "monai.safetensors"
    weights_convert.write(random_checkpoint(MONAI, seed=4), monai)
    _grey(tmp_path / "odd.png", (13, 18))
    code, _, err = run_cli(capsys, "predict", monai, tmp_path / "odd.png", "--out", tmp_path / "m", "--tile", "8", "8")
    assert code == 0, err
    assert tifffile.imread(tmp_path / "m" / "odd_prob.tif").shape == (1, 13, 18)
    with Image.open(tmp_path / "m" / "odd_overlay.png") as overlay:
        assert overlay.size[0] > 3.2 * overlay.size[1]  # image, mask and two gates
    code, _, err = run_cli(capsys, "predict", monai, tmp_path / "odd.png", "--out", tmp_path / "m2", "--tile", "6", "8")
    assert code == 2 and "multiple of 4" in err and len(err.strip().splitlines()) == 1
    volume = np.random.default_rng(5).uniform(0, 1, (9, 12, 11)).astype(np.float32)
    tifffile.imwrite(tmp_path / "ct.tif", volume)
    model = tmp_path / "tiny3d.safetensors"
    weights_convert.write(_straddling(TINY_3D, model_image(tmp_path / "ct.tif", TINY_3D)), model)
    out = tmp_path / "v"
    code, _, err = run_cli(capsys, "predict", model, tmp_path / "ct.tif", "--out", out, "--tile", "4", "8", "8")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["ct_mask.tif", "ct_overlay.png", "ct_prob.tif"]
    mask = tifffile.imread(out / "ct_mask.tif")
    assert mask.shape == (9, 12, 11) and set(np.unique(mask)) == {0, 255}
    assert tifffile.imread(out / "ct_prob.tif").shape == (1, 9, 12, 11)


def test_refusals_are_one_line_and_leave_nothing(tmp_path, capsys, image_file):
    model = tmp_path / "tiny.safetensors"
    weights_convert.write(random_checkpoint(TINY, seed=2), model)
    out = tmp_path / "out"
    _grey(tmp_path / "colour.png", channels=3)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    usage = [
        (["--tile", "1", "8"], "too small for depth 1"),
        (["--tile", "8", "8", "8"], "--tile takes 2 positive sides"),
        ([image_file, "--framework", "torch"], "would write the same"),
    ]
    for extra, message in usage:
        inputs = [a for a in extra if isinstance(a, type(image_file))]
        options = [a for a in extra if a not in inputs]
        code, _, err = run_cli(capsys, "predict", model, image_file, *inputs, "--out", out, *options)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (extra, err)
    code, _, err = run_cli(capsys, "predict", model, image_file, "--out", out, "--overlap", "1")
    assert code == 2 and "--overlap must be in [0, 1), got 1.0" in err.strip().splitlines()[-1]
    assert not out.exists()
    # A missing input is found before anything runs; a refused one after the inputs before it,
    # whose files are complete, and it leaves nothing, not even a temporary file.
    code, _, err = run_cli(capsys, "predict", model, image_file, tmp_path / "missing.png", "--out", out)
    assert code == 1 and "missing.png: no such file" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
    for name, message in [("colour.png", "3 colour channels, the model takes 1"), ("broken.png", "broken.png: ")]:
        code, _, err = run_cli(capsys, "predict", model, image_file, tmp_path / name, "--out", out, "--force")
        lines = err.strip().splitlines()
        assert code == 1 and message in lines[-1] and len(lines) == 2 and "[1/2]" in lines[0], (name, err)
        assert sorted(p.name for p in out.iterdir()) == ["cells_mask.png", "cells_overlay.png", "cells_prob.tif"]
    for path in out.iterdir():
        path.unlink()
    code, _, err = run_cli(capsys, "predict", model, image_file, "--out", out)
    assert code == 0, err
    before = (out / "cells_prob.tif").read_bytes()
    code, _, err = run_cli(capsys, "predict", model, image_file, "--out", out, "--tile", "8", "8")
    assert code == 2 and "exist: pass --force to overwrite" in err and len(err.strip().splitlines()) == 1
    assert (out / "cells_prob.tif").read_bytes() == before
    code, _, err = run_cli(capsys, "predict", model, image_file, "--out", out, "--tile", "8", "8", "--force")
    assert code == 0, err
    assert (out / "cells_prob.tif").read_bytes() != before
    assert sorted(p.name for p in out.iterdir()) == ["cells_mask.png", "cells_overlay.png", "cells_prob.tif"]


def test_a_missing_package_is_named_before_anything_runs(tmp_path, capsys, monkeypatch, image_file):
    from weights_convert.core import extras

    model = tmp_path / "tiny.safetensors"
    weights_convert.write(random_checkpoint(TINY, seed=2), model)
    everything = extras.installed
    monkeypatch.setattr(extras, "installed", lambda module: module != "matplotlib" and everything(module))
    code, _, err = run_cli(capsys, "predict", model, image_file, "--out", tmp_path / "out")
    says = "attention-unet predict: error: predict needs matplotlib: pip install 'attention-unet[report]'"
    assert code == 1 and err.strip() == says
    assert not (tmp_path / "out").exists()


def test_several_classes_colour_and_grey_inputs(tmp_path, capsys):
    config = ModelConfig(3, 3, (4, 8))
    model = tmp_path / "classes.safetensors"
    weights_convert.write(random_checkpoint(config, seed=6), model)
    _grey(tmp_path / "colour.png", channels=3)
    _grey(tmp_path / "grey.png", seed=1)  # repeated to the three input channels, as train --data does
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "predict", model, tmp_path / "colour.png", tmp_path / "grey.png", "--out", out)
    assert code == 0, err
    assert "[1/2]" in err and "[2/2]" in err
    for stem in ("colour", "grey"):
        probabilities = tifffile.imread(out / f"{stem}_prob.tif")
        assert probabilities.shape == (3, *SIDES) and 0 <= probabilities.min() and probabilities.max() <= 1
        with Image.open(out / f"{stem}_mask.png") as mask:
            indices = np.asarray(mask)
        assert set(np.unique(indices)) <= {0, 1, 2}
        np.testing.assert_array_equal(indices, np.argmax(probabilities, axis=0))


def test_the_model_is_built_once_for_every_window_of_every_input(tmp_path, capsys, monkeypatch, image_file):
    from impl_torch import runner

    built = []
    build = runner.from_checkpoint
    monkeypatch.setattr(runner, "from_checkpoint", lambda *args, **kwargs: built.append(1) or build(*args, **kwargs))
    model = tmp_path / "tiny.safetensors"
    weights_convert.write(random_checkpoint(TINY, seed=2), model)
    _grey(tmp_path / "second.png", seed=2)
    code, _, err = run_cli(
        capsys, "predict", model, image_file, tmp_path / "second.png", "--out", tmp_path / "out", "--framework", "torch"
    )
    assert code == 0 and "[2/2]" in err, err
    code, _, err = run_cli(capsys, "predict", model, image_file, "--out", tmp_path / "tiles", "--tile", "8", "8")
    assert code == 0 and "20 windows" in err, err
    assert len(built) == 2  # one per run
