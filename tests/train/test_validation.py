"""Validation in ``attention-unet train``: the segmentation metrics (``harness/metrics.py``) against
hand-computed cases and a brute force over pixel sets, the ``--val-fraction`` split, the validation
loss against the NumPy loss of the runner's forward, ``metrics.jsonl`` and ``best.<format>`` of a
run on a folder of PNG and TIFF images continued in a second run, and validation in Flax."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import tifffile
from PIL import Image

import weights_convert
from weights_convert.core.random_init import random_checkpoint
from weights_convert.core.spec import ModelConfig
from weights_convert.harness import cli
from weights_convert.harness.metrics import SegmentationCounts, hard_prediction
from weights_convert.harness.parity.tolerances import TOLERANCES
from weights_convert.harness.train import ImageFolder, Progress, SyntheticSegmentation
from weights_convert.harness.train.data import VALIDATION_STREAM, held_out
from weights_convert.harness.train.validation import METRICS_FILE, Validation, batch_loss

GREY = ModelConfig(1, 1, (4, 8))
GREY_JSON = '{"in_channels": 1, "out_channels": 1, "channels": [4, 8]}'
# Scores and losses against the same float64 arithmetic grouped otherwise (a ratio of counts, a
# weighted mean of batch losses).
REGROUPED = TOLERANCES["float64_reordered"]


def _one_hot(classes: np.ndarray, channels: int) -> np.ndarray:
    """(N, *spatial) class indices as a one-hot (N, C, *spatial) target (one channel: class > 0)."""
    if channels == 1:
        return (classes > 0)[:, None].astype(np.float64)
    return (classes[:, None] == np.arange(channels).reshape(1, -1, 1, 1)).astype(np.float64)


def _logits_for(classes: np.ndarray, channels: int) -> np.ndarray:
    """Logits whose hard prediction is ``classes``."""
    if channels == 1:
        return np.where(classes > 0, 2.0, -2.0)[:, None]
    return 3.0 * _one_hot(classes, channels) - 1.0


# Metrics.


def test_one_channel_metrics_by_hand():
    # Prediction 1 1 0 / 0 1 0 against target 1 0 0 / 1 1 0: |P & T| = 2, |P| = 3, |T| = 3.
    logits = np.array([[[[0.5, 3.0, -1.0], [-0.1, 0.2, -4.0]]]])
    target = np.array([[[[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]]])
    counts = SegmentationCounts(1)
    counts.add(logits, target)
    assert counts.classes == (1,)
    np.testing.assert_allclose(counts.dice(), [2 * 2 / (3 + 3)], rtol=REGROUPED)
    np.testing.assert_allclose(counts.iou(), [2 / 4], rtol=REGROUPED)
    assert counts.mean_dice() == pytest.approx(2 / 3, rel=REGROUPED)
    assert hard_prediction(np.zeros((1, 1, 1, 1)))[0, 0, 0] == 0  # logit 0 (probability 1/2) is background


def test_class_metrics_by_hand_with_an_absent_class():
    # Four classes over 2 x 3 pixels; class 3 is in neither prediction nor target.
    predicted = np.array([[[0, 1, 1], [2, 2, 0]]])
    actual = np.array([[[0, 1, 2], [2, 0, 0]]])
    counts = SegmentationCounts(4)
    counts.add(_logits_for(predicted, 4), _one_hot(actual, 4))
    # class 0: P {0, 5}, T {0, 4, 5}: 2 * 2 / 5, IoU 2 / 3; class 1: P {1, 2}, T {1}: 2 / 3, 1 / 2;
    # class 2: P {3, 4}, T {2, 3}: 2 / 4, 1 / 3; class 3: 0 / 0, no score.
    np.testing.assert_allclose(counts.dice(), [4 / 5, 2 / 3, 1 / 2, np.nan], rtol=REGROUPED)
    np.testing.assert_allclose(counts.iou(), [2 / 3, 1 / 2, 1 / 3, np.nan], rtol=REGROUPED)
    # The mean over the foreground classes 1..3 leaves the absent class 3 out.
    assert counts.mean_dice() == pytest.approx((2 / 3 + 1 / 2) / 2, rel=REGROUPED)


def test_class_in_only_the_prediction_scores_zero_and_none_at_all_is_nan():
    counts = SegmentationCounts(1)
    counts.add(np.full((1, 1, 2, 2), 1.0), np.zeros((1, 1, 2, 2)))
    assert counts.dice().tolist() == [0.0] and counts.iou().tolist() == [0.0] and counts.mean_dice() == 0.0
    empty = SegmentationCounts(1)
    empty.add(np.full((1, 1, 2, 2), -1.0), np.zeros((1, 1, 2, 2)))
    assert math.isnan(empty.dice()[0]) and math.isnan(empty.mean_dice())


def test_metrics_pool_the_set_not_a_mean_of_images():
    # Image A: Dice 1 on 1 pixel; image B: 4 predicted, 4 true, 2 shared (Dice 1/2). Pooled: 2 * 3 / 10.
    predicted = np.array([[[1, 0, 0, 0], [0, 0, 0, 0]], [[1, 1, 1, 1], [0, 0, 0, 0]]])
    actual = np.array([[[1, 0, 0, 0], [0, 0, 0, 0]], [[1, 1, 0, 0], [1, 1, 0, 0]]])
    counts = SegmentationCounts(1)
    counts.add(_logits_for(predicted, 1), _one_hot(actual, 1))
    assert counts.mean_dice() == pytest.approx(6 / 10, rel=REGROUPED)
    assert counts.mean_dice() != pytest.approx((1 + 1 / 2) / 2, rel=REGROUPED)


@pytest.mark.parametrize("channels", [1, 3])
def test_metrics_against_pixel_sets(channels):
    """Random logits over three batches against a brute force over sets of pixel coordinates: the
    accumulated counts are the counts of the whole set."""
    rng = np.random.default_rng(channels)
    batches = [(rng.normal(size=(n, channels, 5, 7)), rng.integers(0, max(channels, 2), (n, 5, 7))) for n in (2, 1, 3)]
    counts = SegmentationCounts(channels)
    for logits, actual in batches:
        counts.add(logits, _one_hot(actual, channels))
    expected_dice, expected_iou = [], []
    for c in (1,) if channels == 1 else range(channels):
        p, t = set(), set()
        for b, (logits, actual) in enumerate(batches):
            for n, y, x in np.ndindex(actual.shape):
                guess = int(logits[n, 0, y, x] > 0) if channels == 1 else int(np.argmax(logits[n, :, y, x]))
                truth = int(actual[n, y, x] > 0) if channels == 1 else int(actual[n, y, x])
                if guess == c:
                    p.add((b, n, y, x))
                if truth == c:
                    t.add((b, n, y, x))
        expected_dice.append(2 * len(p & t) / (len(p) + len(t)))
        expected_iou.append(len(p & t) / len(p | t))
    np.testing.assert_allclose(counts.dice(), expected_dice, rtol=REGROUPED)
    np.testing.assert_allclose(counts.iou(), expected_iou, rtol=REGROUPED)
    foreground = expected_dice if channels == 1 else expected_dice[1:]
    assert counts.mean_dice() == pytest.approx(np.mean(foreground), rel=REGROUPED)


def test_metrics_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match=r"logits \(1, 2, 3, 3\) and target \(1, 1, 3, 3\) must both be \(N, 2, ...\)"):
        SegmentationCounts(2).add(np.zeros((1, 2, 3, 3)), np.zeros((1, 1, 3, 3)))


# Validation data.


def _blobs(k: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(an 8-bit grey image of bright disks on dark noise, its 0/255 mask), seeded by ``k``."""
    rng = np.random.default_rng(k)
    yy, xx = np.mgrid[0:size, 0:size]
    mask = np.zeros((size, size), bool)
    for _ in range(2):
        cy, cx, r = rng.uniform(4, size - 4), rng.uniform(4, size - 4), rng.uniform(3, 5)
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    image = 0.3 * rng.uniform(0, 1, (size, size)) + 0.6 * mask
    return np.round(image * 255).astype(np.uint8), (mask * 255).astype(np.uint8)


def _blob_folder(root, count: int = 8, size: int = 16):
    """``count`` image pairs, PNG but for one TIFF image."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for k in range(count):
        image, mask = _blobs(k, size)
        if k == 0:
            tifffile.imwrite(root / "images" / f"b{k}.tif", image)
        else:
            Image.fromarray(image).save(root / "images" / f"b{k}.png")
        Image.fromarray(mask).save(root / "masks" / f"b{k}.png")
    return root


def test_split_is_seeded_disjoint_and_refuses_empty_sides():
    names = [f"n{k}" for k in range(10)]
    first = held_out(names, 0.3, seed=4)
    assert len(first) == 3 and set(first) <= set(names)
    assert held_out(list(reversed(names)), 0.3, seed=4) == first  # the names, not their order
    assert any(held_out(names, 0.3, seed=s) != first for s in range(5, 10))
    for fraction in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(ValueError, match="between 0 and 1"):
            held_out(names, fraction, 0)
    with pytest.raises(ValueError, match=r"of 2 image pairs holds out 0, leaving no validation image"):
        held_out(["a", "b"], 0.2, 0)
    with pytest.raises(ValueError, match=r"of 2 image pairs holds out 2, leaving no training image"):
        held_out(["a", "b"], 0.8, 0)


def test_held_out_images_never_train(tmp_path):
    folder = ImageFolder(_blob_folder(tmp_path / "data"), GREY, batch_size=3, seed=1)
    names = held_out(folder.stems, 0.25, seed=1)
    training = folder.subset([s for s in folder.stems if s not in names])
    validation = folder.subset(names)
    assert validation.stems == sorted(names) and not set(training.stems) & set(names)
    # Flips keep the sum of every image row's sorted values: the fingerprint of a sample.
    fingerprint = lambda x: np.sort(np.sort(x, axis=-1).sum(axis=-1)).round(6).tobytes()  # noqa: E731
    held = {fingerprint(x) for xs, _ in validation.validation_batches() for x in xs}
    trained = {fingerprint(x) for step in range(12) for x in training.batch(step)[0]}
    assert len(held) == 2 and len(trained) == 6 and not held & trained


def test_validation_batches_are_centred_and_in_order(tmp_path):
    folder = ImageFolder(_blob_folder(tmp_path / "data", count=3, size=20), GREY, batch_size=2, crop=(16, 16))
    batches = folder.validation_batches()
    assert [len(x) for x, _ in batches] == [2, 1]
    np.testing.assert_array_equal(batches[1][0][0], folder.images[2][:, 2:18, 2:18])
    np.testing.assert_array_equal(batches[1][1][0, 0], folder.masks[2][2:18, 2:18] > 0)
    padded = ImageFolder(tmp_path / "data", GREY, batch_size=3, crop=(24, 23)).validation_batches()[0][0]
    np.testing.assert_array_equal(padded[0][:, 2:22, 1:21], folder.images[0])  # 4 and 3 spare: 2 and 1 before
    assert not padded[0][:, :2].any() and not padded[0][:, :, :1].any()


def test_synthetic_validation_set_is_its_own_stream():
    data = SyntheticSegmentation(GREY, 4, (16, 16), seed=3)
    batches = data.validation_batches(0.2, interval=5)  # 0.2 / 0.8 * 5 * 4 = 5 images
    assert [len(x) for x, _ in batches] == [4, 1]
    np.testing.assert_array_equal(
        batches[0][0], SyntheticSegmentation(GREY, 4, (16, 16), 3, VALIDATION_STREAM).batch(0)[0]
    )
    trained = {x.tobytes() for step in range(20) for x in data.batch(step)[0]}
    assert not {x.tobytes() for batch in batches for x in batch[0]} & trained


def test_validation_refusals(tmp_path, capsys):
    data = str(_blob_folder(tmp_path / "data", count=2))
    out = str(tmp_path / "out")
    common = ["--framework", "torch", "--config", GREY_JSON, "--out", out]
    cases = [
        (["--data", data, "--val-fraction", "1.5"], "--val-fraction must be between 0 and 1"),
        (["--data", data, "--val-fraction", "0"], "--val-fraction must be between 0 and 1"),
        (["--data", data, "--val-fraction", "0.2"], "holds out 0, leaving no validation image"),
        (["--data", data, "--val-fraction", "0.8"], "holds out 2, leaving no training image"),
        (["--data", data, "--val", data, "--val-fraction", "0.5"], "both choose the validation set"),
        (["--data", data, "--val-every", "3"], "--val-every sets how often to validate"),
        (["--val-fraction", "0.5", "--val-every", "0"], "--val-every must be at least 1"),
    ]
    for args, message in cases:
        code = cli.main(["train", *common, *args])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    code = cli.main(["train", *common, "--val", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert code == 1 and "--val DIR holds DIR/images and DIR/masks" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# Validation runs.


def test_validation_loss_is_the_numpy_loss_of_the_forward(tmp_path):
    from impl_torch.runner import forward

    checkpoint = random_checkpoint(GREY, seed=5)
    x, target = SyntheticSegmentation(GREY, 3, (16, 16), seed=2).batch(0)
    logits = forward(checkpoint, x)["output"]
    expected = batch_loss("dice_bce", logits, target)
    from weights_convert.harness.reference_losses import value_and_gradient

    channels_last = np.moveaxis(logits.astype(np.float64), 1, -1), np.moveaxis(target, 1, -1)
    assert expected == float(value_and_gradient("dice_bce", *channels_last)[0])
    scores = Validation("torch", [(x, target)], "dice_bce").evaluate(checkpoint)
    assert scores.val_loss == pytest.approx(expected, rel=REGROUPED) and scores.images == 3
    counts = SegmentationCounts(1)
    counts.add(logits, target)
    np.testing.assert_array_equal(scores.counts.dice(), counts.dice())
    # Batches of 2 and 1 give the loss of the whole set as one batch; in float64, where the
    # convolutions of another batch size round differently only at the float64 bound.
    whole = Validation("torch", [(x, target)], "dice_bce", "float64").evaluate(checkpoint).val_loss
    parts = [(x[:2], target[:2]), (x[2:], target[2:])]
    split = Validation("torch", parts, "dice_bce", "float64").evaluate(checkpoint).val_loss
    assert abs(split - whole) <= TOLERANCES["float64"] * abs(whole)


def test_train_validates_improves_and_continues(tmp_path, capsys):
    """20 steps on 6 of 8 blob images (one a TIFF), validating every 10 on the other 2, then 10
    more from step 20 into the same --out: metrics.jsonl holds the three validations, the mean Dice
    rises from the first, and best.safetensors is the checkpoint of the best step. Plain SGD (lr 0.1)
    gets there in tens of steps; Adam's lr 1e-3 moves the output's bias about 1e-3 a step, and takes
    hundreds before any logit crosses 0."""
    data, out = _blob_folder(tmp_path / "data"), tmp_path / "run"
    common = ["--framework", "torch", "--data", str(data), "--val-fraction", "0.25", "--batch", "4", "--every", "10"]
    first = ["train", *common, "--config", GREY_JSON, "--optimizer", "sgd", "--steps", "20", "--out", str(out)]
    assert cli.main(first) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "10/20  loss" in err and "val loss" in err and "img/s" in err and "best validation mean Dice" in err
    lines = [line for line in err.splitlines() if "val loss" in line]
    assert len(lines) == 2 and all("dice 0." in line or "dice 1." in line for line in lines)
    again = ["train", str(out / "step_20.safetensors"), *common, "--steps", "10", "--out", str(out), "--force"]
    assert cli.main(again) == 0, capsys.readouterr().err
    capsys.readouterr()
    records = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 30]
    assert {r["images"] for r in records} == {2}  # the same split in the continued run
    assert set(records[0]) == {
        "step", "loss", "val_loss", "dice", "iou", "mean_dice", "images", "best_step", "best_mean_dice"
    }  # fmt: skip
    assert list(records[0]["dice"]) == ["1"] and records[0]["mean_dice"] == records[0]["dice"]["1"]
    best = max(records, key=lambda r: r["mean_dice"])
    assert best["mean_dice"] > records[0]["mean_dice"] + 0.3, records
    assert records[-1]["best_step"] == best["step"] and records[-1]["best_mean_dice"] == best["mean_dice"]
    assert records[-1]["val_loss"] < records[0]["val_loss"]
    kept = weights_convert.read(out / "best.safetensors")
    written = weights_convert.read(out / f"step_{best['step']}.safetensors")
    assert kept.optimizer.step == best["step"]
    for name, value in written.tensors.items():
        np.testing.assert_array_equal(kept.tensors[name], value)


def test_a_redone_run_drops_the_later_records(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    rows = [(10, 0.5, 10, 0.5), (20, 0.7, 20, 0.7), (30, 0.9, 30, 0.9)]
    lines = [{"step": s, "mean_dice": d, "best_step": b, "best_mean_dice": m} for s, d, b, m in rows]
    (out / METRICS_FILE).write_text("".join(json.dumps(line) + "\n" for line in lines))
    validation = Validation("torch", [], "dice_bce", out=str(out))
    validation.start(first_step=20)
    assert [json.loads(line)["step"] for line in (out / METRICS_FILE).read_text().splitlines()] == [10, 20]
    # best.<format> came from the dropped step 30: the run's first validation writes it afresh.
    assert validation.best_step is None and validation.best_dice == -math.inf
    kept = Validation("torch", [], "dice_bce", out=str(out))
    kept.start(first_step=20)  # now step 20's best is the last record's too
    assert (kept.best_step, kept.best_dice) == (20, 0.7)


def test_flax_validates_on_synthetic_data(tmp_path, capsys):
    out = tmp_path / "flax"
    code = cli.main(
        ["train", "--framework", "flax", "--config", GREY_JSON, "--size", "16", "16", "--batch", "2", "--steps", "2"]
        + ["--val-fraction", "0.5", "--val-every", "1", "--optimizer", "sgd", "--out", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    records = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and {r["images"] for r in records} == {2}
    assert all(np.isfinite(r["val_loss"]) for r in records) and (out / "best.safetensors").exists()


def test_progress_counts_volumes(capsys):
    progress = Progress("train torch x1", 3, 2, ".", every=100, unit="vol/s")
    progress(1, 1.0, None)
    progress.last_print = -math.inf  # a line at once, not a second later
    progress(2, 0.5, None)
    assert "vol/s" in capsys.readouterr().err


def test_val_folder_validates_every_image_centred(tmp_path, capsys):
    """--val DIR: a folder of larger images, centred in --crop; the validation set is all of it."""
    data, val = _blob_folder(tmp_path / "data", count=4), _blob_folder(tmp_path / "val", count=3, size=20)
    out = tmp_path / "run"
    code = cli.main(
        ["train", "--framework", "torch", "--config", GREY_JSON, "--data", str(data), "--val", str(val)]
        + ["--crop", "16", "16", "--batch", "2", "--steps", "2", "--val-every", "1", "--out", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    records = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert [(r["step"], r["images"]) for r in records] == [(1, 3), (2, 3)]
    assert sorted(p.name for p in out.iterdir()) == ["best.safetensors", "metrics.jsonl", "step_2.safetensors"]


def test_a_3d_run_counts_volumes(tmp_path, capsys):
    config = '{"in_channels": 1, "channels": [4, 8], "spatial_dims": 3}'
    code = cli.main(
        ["train", "--framework", "torch", "--config", config, "--size", "8", "8", "8", "--batch", "2"]
        + ["--steps", "2", "--val-fraction", "0.5", "--out", str(tmp_path / "run")]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    assert "vol/s" in err and "img/s" not in err and "val loss" in err
