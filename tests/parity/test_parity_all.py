"""The parity command across all three frameworks and every Keras backend: the project's
acceptance checks, and a perturbed implementation that must fail with its drifting block named."""

import json

import numpy as np
import pytest

import impl_flax.runner
import weights_convert
from tests import shared_runs
from weights_convert.core.random_init import random_checkpoint
from weights_convert.core.spec import ModelConfig
from weights_convert.harness import cli, keras_worker

ALL_TARGETS = {("torch", "torch"), ("flax", "flax"), ("keras", "tensorflow"), ("keras", "jax"), ("keras", "torch")}
SMALL_SIZE = ["--size", *map(str, shared_runs.SMALL_SIZE)]


@pytest.fixture
def small_checkpoint(tmp_path, monkeypatch):
    """``shared_runs.SMALL_CHECKPOINT`` as a file, and Keras calls answered from the session's record:
    the training rows' Keras calls are those test_keras_parity runs (see ``tests.shared_runs``)."""
    monkeypatch.setattr(keras_worker, "run_batch_in_backend", shared_runs.run_batch)
    path = tmp_path / "small.safetensors"
    weights_convert.write(shared_runs.SMALL_CHECKPOINT, path)
    return path


def run_json(capsys, *args):
    code = cli.main([*map(str, args), "--json"])
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_main_job_passes(capsys):
    """`attention-unet parity` with no arguments: the README's main job."""
    code, report = run_json(capsys, "parity")
    assert code == 0 and report["passed"]
    assert {(r["framework"], r["backend"]) for r in report["results"]} == ALL_TARGETS


@pytest.mark.slow
def test_article_checkpoint_float64_everywhere(capsys, reference_dir):
    code, report = run_json(capsys, "parity", reference_dir / "article_state_dict.pt", "--dtype", "float64")
    assert code == 0 and report["passed"]
    assert {(r["framework"], r["backend"]) for r in report["results"]} == ALL_TARGETS
    assert max(r["rel_diff"] for r in report["results"]) <= 1e-10


def test_train_float64_everywhere(capsys, small_checkpoint):
    """Running statistics, gradients and one SGD and one Adam step, in every framework and backend."""
    code, report = run_json(capsys, "parity", small_checkpoint, "--mode", "train", "--dtype", "float64", *SMALL_SIZE)
    failing = [r["quantity"] for r in report["results"] if not r["passed"]]
    assert code == 0 and report["passed"], failing[:10]
    rows = report["results"]
    assert {(r["framework"], r["backend"]) for r in rows} == ALL_TARGETS
    for prefix in ("state/", "grad/", "step/sgd/", "step/adam/"):
        per_target = {(r["framework"], r["backend"]) for r in rows if r["quantity"].startswith(prefix)}
        assert per_target == ALL_TARGETS, prefix


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["--mode", "fit", "--steps", "3", "--optimizer", "adam", "--dtype", "float64"], id="fit-float64"),
        pytest.param(["--mode", "fit", "--steps", "3", "--dtype", "float32"], id="fit-float32"),
        pytest.param(["--mode", "train", "--dtype", "mixed_bfloat16"], id="train-mixed_bfloat16"),
    ],
)
def test_fit_and_mixed_precision_everywhere(capsys, small_checkpoint, args):
    code, report = run_json(capsys, "parity", small_checkpoint, *args, *SMALL_SIZE)
    failing = [(r["framework"], r["backend"], r["quantity"]) for r in report["results"] if not r["passed"]]
    assert code == 0 and report["passed"], failing[:10]
    assert {(r["framework"], r["backend"]) for r in report["results"]} == ALL_TARGETS
    assert not any(r.get("informational") for r in report["results"])


@pytest.fixture
def small_3d_checkpoint(tmp_path, monkeypatch):
    """``shared_runs.SMALL_3D_CHECKPOINT`` as a file; Keras calls answered as for ``small_checkpoint``."""
    monkeypatch.setattr(keras_worker, "run_batch_in_backend", shared_runs.run_batch)
    path = tmp_path / "small3d.safetensors"
    weights_convert.write(shared_runs.SMALL_3D_CHECKPOINT, path)
    return path


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["--mode", "train", "--dtype", "float64"], id="train-float64"),
        pytest.param(["--mode", "train", "--dtype", "float32"], id="train-float32"),
        pytest.param(["--mode", "train", "--dtype", "mixed_bfloat16"], id="train-mixed_bfloat16"),
        pytest.param(["--mode", "fit", "--steps", "3", "--optimizer", "adam", "--dtype", "float64"], id="fit-float64"),
    ],
)
def test_3d_everywhere(capsys, small_3d_checkpoint, args):
    """A 3D checkpoint at an odd volume (``--size D H W``) in every framework and backend: block
    outputs, running statistics, gradients and steps (or a fit), float64 rows within 1e-10."""
    size = ["--size", *map(str, shared_runs.SMALL_3D_SIZE), "--batch", "2"]
    code, report = run_json(capsys, "parity", small_3d_checkpoint, *args, *size)
    rows = report["results"]
    failing = [(r["framework"], r["backend"], r["quantity"]) for r in rows if not r["passed"]]
    assert code == 0 and report["passed"], failing[:10]
    assert {(r["framework"], r["backend"]) for r in rows} == ALL_TARGETS
    assert report["config"]["spatial_dims"] == 3 and report["input_shape"] == [2, 2, *shared_runs.SMALL_3D_SIZE]
    prefixes = ("state/", "grad/", "step/sgd/", "step/adam/") if "train" in args else ("loss/", "param/", "state/")
    for prefix in prefixes:
        per_target = {(r["framework"], r["backend"]) for r in rows if r["quantity"].startswith(prefix)}
        assert per_target == ALL_TARGETS, prefix
    if "float64" in args:
        assert max(r["rel_diff"] for r in rows) <= 1e-10


def test_perturbed_flax_weights_fail_and_name_the_block(capsys, monkeypatch, tmp_path):
    path = tmp_path / "small.safetensors"
    weights_convert.write(random_checkpoint(ModelConfig(3, 1, (4, 8, 16)), seed=9), path)
    real_forward = impl_flax.runner.forward

    def perturbed(checkpoint, x, **kwargs):
        tensors = dict(checkpoint.tensors)
        tensors["d1.ag.output.0.weight"] = tensors["d1.ag.output.0.weight"] * np.float32(1.001)
        return real_forward(weights_convert.Checkpoint(checkpoint.config, tensors), x, **kwargs)

    monkeypatch.setattr(impl_flax.runner, "forward", perturbed)
    code = cli.main(["parity", str(path), "--frameworks", "torch,flax", "--size", "16", "16"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL: flax cpu float32: first drift at d1.ag" in out
    assert "torch" not in out.splitlines()[-1]
