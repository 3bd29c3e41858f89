"""``attention-unet train``: the data sources, the training
checkpoints it writes, a run continued from one in another framework (on 2 devices) against the
uninterrupted run, and its refusals. (The data-parallel parity checks are in ``test_data_parallel.py``.)"""

from __future__ import annotations

import dataclasses
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import weights_convert
from tests.sessions import run_jax_session
from weights_convert.core.data_parallel import training_hyperparameters
from weights_convert.core.optimizer_state import OptimizerState
from weights_convert.core.random_init import random_checkpoint
from weights_convert.core.spec import ModelConfig
from weights_convert.harness import cli
from weights_convert.harness.parity.tolerances import TOLERANCES
from weights_convert.harness.train import ImageFolder, SyntheticSegmentation

TINY = ModelConfig(channels=(4, 8))


def _pattern(h: int, w: int, channels: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise, in [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    smooth = np.stack([(yy * (c + 1) + xx) % 1 for c in range(channels)], axis=-1)
    noisy = rng.uniform(0, 1, (h, w, channels))
    return np.where((np.arange(h) % 3 == 0)[:, None, None], noisy, smooth)


def _save(path, image: np.ndarray) -> None:
    """An (H, W) or (H, W, 3) array in [0, 1] as an 8-bit PNG, through Pillow."""
    Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(path)


def _folder(root, count=5, size=(16, 16)):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for k in range(count):
        image = _pattern(*size, 3, seed=k)
        _save(root / "images" / f"{k}.png", image)
        _save(root / "masks" / f"{k}.png", (image[..., 0] > 0.5).astype(float))
    return root


def test_image_folder_batches(tmp_path):
    data = ImageFolder(_folder(tmp_path / "data"), TINY, batch_size=4, seed=1)
    x, target = data.batch(0)
    assert x.shape == (4, 3, 16, 16) and target.shape == (4, 1, 16, 16)
    assert set(np.unique(target)) == {0.0, 1.0}
    # Two batches of 4 from 5 pairs: every pair in the first epoch's 5 positions, none twice.
    first_epoch = np.concatenate([data.batch(0)[0], data.batch(1)[0][:1]])
    assert len({a.tobytes() for a in first_epoch}) == 5
    np.testing.assert_array_equal(data.batch(1)[0], ImageFolder(tmp_path / "data", TINY, 4, seed=1).batch(1)[0])


def test_image_folder_refusals(tmp_path):
    root = _folder(tmp_path / "data")
    _save(root / "images" / "extra.png", _pattern(16, 16, 3))
    with pytest.raises(ValueError, match=r"without a partner, e.g. .*extra\.png"):
        ImageFolder(root, TINY, 2)
    _save(root / "masks" / "extra.png", _pattern(12, 16, 1)[..., 0] > 0.5)
    with pytest.raises(ValueError, match=r"extra\.png: image of \(16, 16\) but its mask .*extra\.png \(12, 16\)"):
        ImageFolder(root, TINY, 2)


def test_synthetic_data_is_seeded_segmentation():
    data = SyntheticSegmentation(TINY, 3, (16, 16), seed=5)
    x, target = data.batch(2)
    np.testing.assert_array_equal(x, SyntheticSegmentation(TINY, 3, (16, 16), seed=5).batch(2)[0])
    assert not np.array_equal(x, data.batch(3)[0])
    assert x.shape == (3, 3, 16, 16) and 0 <= x.min() and x.max() <= 1
    assert set(np.unique(target)) == {0.0, 1.0}
    # The masked pixels are the bright ones: the task is learnable.
    assert x.mean(axis=1)[target[:, 0] == 1].mean() > x.mean(axis=1)[target[:, 0] == 0].mean() + 0.2


def test_train_on_image_folder_writes_checkpoints(tmp_path, start, capsys):
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
    # A training checkpoint: plain SGD, which torch counts no steps of, at the run's step.
    assert (final.optimizer.name, final.optimizer.step, final.optimizer.slots) == ("sgd", 3, {})
    assert final.optimizer.hyper == training_hyperparameters("sgd") and final.optimizer.hyper["lr"] == 0.1


def test_train_refusals(tmp_path, start, capsys):
    training = tmp_path / "training.safetensors"
    adam = OptimizerState("adam", training_hyperparameters("adam"), 0, {})
    weights_convert.write(dataclasses.replace(weights_convert.read(start), optimizer=adam), training)
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
        ([str(start), "--out", new, "--format", "weights.h5"], "holds no optimizer state"),
        ([str(training), "--out", new, "--optimizer", "sgd"], "continues its own adam optimizer"),
    ]
    for args, message in cases:
        code = cli.main(["train", *args])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and not (tmp_path / "new").exists()
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "masks").mkdir()
    code = cli.main(["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "new")])
    err = capsys.readouterr().err
    assert code == 1 and "no images/<name>.<ext> with a masks/<name>.<ext>" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------------------------
# Training checkpoints: a run continued in another framework, on 2 devices, is the uninterrupted run.

RESUME_SESSION = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import weights_convert
    from weights_convert.harness import cli

    start, work = sys.argv[1], Path(sys.argv[2])
    common = ["--dtype", "float64", "--batch", "4", "--size", "16", "16", "--every", "1"]
    runs = [  # (out, checkpoint, options): torch 3 steps; torch 1 step on 2 processes, continued by the others
        ("full", start, ["--framework", "torch", "--steps", "3"]),
        ("part", start, ["--framework", "torch", "--data-parallel", "2", "--steps", "1"]),
        ("flax", "part/step_1.safetensors", ["--framework", "flax", "--data-parallel", "2", "--steps", "2"]),
        ("keras", "part/step_1.safetensors", ["--framework", "keras", "--data-parallel", "2", "--steps", "2"]),
        ("torch", "flax/step_2.safetensors", ["--framework", "torch", "--steps", "1", "--optimizer", "adam"]),
        # A fresh optimizer from step 2's weights alone, written weights only.
        ("fresh", "weights_2.safetensors", ["--steps", "1", "--format", "weights.h5", "--weights-only"]),
        # Keras in float32, whose learning-rate variable is float32.
        ("keras32", start, ["--framework", "keras", "--steps", "1", "--optimizer", "adamw", "--dtype", "float32"]),
    ]
    out = {}
    for name, checkpoint, options in runs:
        checkpoint = checkpoint if checkpoint == start else str(work / checkpoint)
        if name == "fresh":
            weights_convert.write(weights_convert.read(work / "full/step_2.safetensors").weights_only(), checkpoint)
        # The last --dtype given wins.
        code = cli.main(["train", checkpoint, *common, *options, "--out", str(work / name)])
        out[name] = {"code": code, "written": sorted(p.name for p in (work / name).iterdir())}
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory) -> tuple[Path, dict, str]:
    """(the directory of ``RESUME_SESSION``'s runs, their exit codes and files, its stderr): one
    subprocess with 2 JAX host devices, Keras on JAX and x64 on (as ``test_data_parallel``'s)."""
    work = tmp_path_factory.mktemp("train_resume")
    start = work / "start.safetensors"
    weights_convert.write(random_checkpoint(TINY, seed=4), start)
    results, stderr = run_jax_session(RESUME_SESSION, start, work, devices=2)
    return work, results, stderr


def _training_quantities(path) -> tuple[dict, int]:
    """(every model tensor and optimizer slot, the optimizer step) of a training checkpoint."""
    checkpoint = weights_convert.read(path)
    return {**checkpoint.tensors, **checkpoint.optimizer.tensors()}, checkpoint.optimizer.step


def _scales(quantities: dict) -> dict:
    """Each quantity's scale: its largest entry; for an optimizer slot the largest entry of the
    whole slot, as the parity checks scale it (a running sum of the gradient, which is one vector:
    the conv biases in front of a BatchNorm have an exact gradient of zero, their slots rounding
    noise)."""
    slots: dict[str, float] = {}
    for key, value in quantities.items():
        if key.startswith("optimizer/"):
            slot = key.split("/")[1]
            slots[slot] = max(slots.get(slot, 0.0), float(np.max(np.abs(value))))
    return {
        key: slots[key.split("/")[1]] if key.startswith("optimizer/") else float(np.max(np.abs(value)))
        for key, value in quantities.items()
    }


def test_train_continues_in_every_framework(resumed_runs):
    """torch's step 1 on 2 processes, continued for 2 steps by Flax and by Keras (2 devices each),
    and Flax's step 2 continued by torch on one: every step_3 is the uninterrupted torch run's
    step 3 within the float64 bound, parameters, running statistics and Adam's slots and step."""
    work, runs, stderr = resumed_runs
    expected = {
        "full": ["step_1.safetensors", "step_2.safetensors", "step_3.safetensors"],
        "part": ["step_1.safetensors"],
        "flax": ["step_2.safetensors", "step_3.safetensors"],
        "keras": ["step_2.safetensors", "step_3.safetensors"],
        "torch": ["step_3.safetensors"],
        "fresh": ["step_1.weights.h5"],
        "keras32": ["step_1.safetensors"],
    }
    assert {name: run["code"] for name, run in runs.items()} == dict.fromkeys(expected, 0), stderr[-3000:]
    assert {name: run["written"] for name, run in runs.items()} == expected
    assert "continuing" in stderr and "adam (lr=0.001" in stderr and "step 1" in stderr
    for name, step in (("part", 1), ("flax", 2), ("flax", 3), ("keras", 2), ("keras", 3), ("torch", 3)):
        actual, actual_step = _training_quantities(work / name / f"step_{step}.safetensors")
        reference, reference_step = _training_quantities(work / "full" / f"step_{step}.safetensors")
        assert set(actual) == set(reference) and actual_step == reference_step == step
        assert "optimizer/exp_avg_sq/e1.conv.conv.0.weight" in actual
        for key, scale in _scales(reference).items():
            difference = float(np.max(np.abs(actual[key] - reference[key])))
            assert difference <= TOLERANCES["float64"] * scale, (name, step, key, difference, scale)


def test_train_continuation_can_fail(resumed_runs):
    """The comparison above tells a continuation apart from a fresh start: step 2's weights alone
    (written weights only, in a format without optimizer state) start a fresh optimizer at step 0,
    whose one step (on step 1's batch) lands far from the uninterrupted run's step 3."""
    work, _, _ = resumed_runs
    fresh = weights_convert.read(work / "fresh" / "step_1.weights.h5")
    assert fresh.optimizer is None
    full = weights_convert.read(work / "full" / "step_3.safetensors")
    name = "e1.conv.conv.0.weight"
    difference = float(np.max(np.abs(fresh.tensors[name] - full.tensors[name])))
    assert difference > 1e3 * TOLERANCES["float64"] * float(np.max(np.abs(full.tensors[name])))


def test_train_checkpoint_inspects_as_training_checkpoint(resumed_runs, capsys):
    """The optimizer, its step and its hyperparameters as the run set them: a float32 Keras run
    writes lr 1e-3, not its float32 learning-rate variable's 0.0010000000474974513."""
    work, _, _ = resumed_runs
    for path, name, step in (("keras/step_3.safetensors", "adam", 3), ("keras32/step_1.safetensors", "adamw", 1)):
        assert cli.main(["inspect", "--json", str(work / path)]) == 0
        info = json.loads(capsys.readouterr().out)
        assert (info["optimizer"], info["step"]) == (name, step)
        assert info["hyperparameters"] == training_hyperparameters(name)
