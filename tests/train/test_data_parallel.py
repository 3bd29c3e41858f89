"""Data-parallel training: the NumPy reference shard by shard, the parity command on 2 devices in
every framework (torch: 2 gloo processes; Flax and Keras: 2 JAX host devices) with both BatchNorm
modes, and ``attention-unet train`` on 2 devices handing its checkpoint from framework to framework.

The frameworks run in ONE subprocess (``SESSION``): JAX takes its number of host devices from
``XLA_FLAGS`` when it starts, and Keras its backend when imported, so the process is started with
2 host devices, Keras on JAX and x64 on; torch forks its 2 processes from it."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

import weights_convert
from tests.sessions import run_jax_session
from weights_convert.core.random_init import random_checkpoint
from weights_convert.core.spec import ModelConfig
from weights_convert.harness import cli, parity, reference
from weights_convert.harness.parity import make_inputs
from weights_convert.harness.parity.tolerances import TOLERANCES, tolerance

TINY = ModelConfig(channels=(4, 8))
DEVICES, BATCH, SIZE, STEPS = 2, 4, (16, 16), 3

SESSION = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import weights_convert
    from weights_convert.harness import cli, parity

    checkpoint, work = sys.argv[1], Path(sys.argv[2])
    out = {}
    common = dict(mode="fit", steps=3, optimizer="sgd", data_parallel=2, batch=4, size=(16, 16))
    for batchnorm in ("sync", "local"):
        report = parity.check(checkpoint, dtype="float64", batchnorm=batchnorm, keras_backends=("jax",), **common)
        out[f"float64/{batchnorm}"] = report.to_json()
    # A volume, float64, sync BatchNorm: 3D data parallelism in every framework.
    from weights_convert.core.random_init import random_checkpoint
    from weights_convert.core.spec import ModelConfig
    volume = random_checkpoint(ModelConfig(2, 1, (4, 8), spatial_dims=3), seed=0)
    report = parity.check(volume, dtype="float64", batchnorm="sync", keras_backends=("jax",),
                          **{**common, "steps": 2, "size": (5, 6, 7)})
    out["float64/sync/3d"] = report.to_json()
    # float32 under the noise-relative bound (torch only: the JAX programs would compile again).
    report = parity.check(checkpoint, frameworks=("torch",), dtype="float32", batchnorm="local", **common)
    out["float32/local"] = report.to_json()
    # train: torch on 2 processes, resumed by Flax and then Keras on 2 devices each; in float64 at the
    # parity run's shapes, so that Flax's jitted step compiled above is reused.
    previous = checkpoint
    for framework, batchnorm in (("torch", "local"), ("flax", "sync"), ("keras", "local")):
        args = ["train", previous, "--framework", framework, "--data-parallel", "2", "--batchnorm", batchnorm,
                "--steps", "2", "--every", "1", "--batch", "4", "--size", "16", "16", "--optimizer", "sgd",
                "--dtype", "float64",
                "--out", str(work / framework)]
        code = cli.main(args)
        written = sorted(p.name for p in (work / framework).iterdir())
        out[f"train/{framework}"] = {"code": code, "written": written}
        previous = str(work / framework / written[-1])
    import numpy as np
    start, final = weights_convert.read(checkpoint), weights_convert.read(previous)
    changed = max(float(np.max(np.abs(final.tensors[k] - v))) for k, v in start.tensors.items())
    finite = all(bool(np.all(np.isfinite(v))) for v in final.tensors.values())
    out["train/final"] = {"config": final.config.to_dict(), "changed": changed, "finite": finite}
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data_parallel") / "tiny.safetensors"
    weights_convert.write(random_checkpoint(TINY, seed=0), path)
    return path


@pytest.fixture(scope="module")
def session(tiny_checkpoint, tmp_path_factory) -> tuple[dict, str]:
    """(the results of ``SESSION``, its stderr)."""
    work = tmp_path_factory.mktemp("data_parallel_session")
    return run_jax_session(SESSION, tiny_checkpoint, work, devices=DEVICES)


def _inputs():
    return make_inputs(TINY, BATCH, SIZE, seed=0, steps=STEPS)


# ---------------------------------------------------------------------------------------------
# The NumPy reference shard by shard.


def test_reference_shards_average_the_parts_gradients():
    """One SGD step with 2 shards is the mean of the halves' own gradients (each half with its own
    BatchNorm statistics), the loss the mean of their losses, the statistics half 0's."""
    tensors = random_checkpoint(TINY, seed=1).astype("float64").tensors
    xs, targets = _inputs()
    fitted = reference.fit(tensors, xs[:1], targets[:1], optimizer="sgd", config=TINY, shards=2)
    halves = [reference.gradients(tensors, xs[0, h : h + 2], targets[0, h : h + 2], config=TINY) for h in (0, 2)]
    lr = 0.1
    name = "e1.conv.conv.0.weight"
    expected = tensors[name] - lr * (halves[0][f"grad/{name}"] + halves[1][f"grad/{name}"]) / 2
    np.testing.assert_allclose(fitted[f"param/{name}"], expected, rtol=0, atol=TOLERANCES["float64_reordered"])
    mean_loss = (halves[0]["loss"] + halves[1]["loss"]) / 2
    np.testing.assert_allclose(fitted["loss/step1"], mean_loss, rtol=TOLERANCES["float64_reordered"])
    stat = "e1.conv.conv.1.running_var"
    np.testing.assert_array_equal(fitted[f"state/{stat}"], halves[0][f"state/{stat}"])
    # The two BatchNorm modes are different functions: shard-wise statistics move the parameters.
    whole = reference.fit(tensors, xs[:1], targets[:1], optimizer="sgd", config=TINY)
    assert np.max(np.abs(whole[f"param/{name}"] - fitted[f"param/{name}"])) > 1e-4


def test_reference_refuses_uneven_shards():
    tensors = random_checkpoint(TINY, seed=1).tensors
    xs, targets = _inputs()
    with pytest.raises(ValueError, match="does not split into 3 equal shards"):
        reference.fit(tensors, xs, targets, optimizer="sgd", config=TINY, shards=3)


# ---------------------------------------------------------------------------------------------
# The parity command on 2 devices.


@pytest.mark.parametrize("batchnorm", ["sync", "local"])
def test_parity_float64_every_framework(session, batchnorm):
    """torch (DDP, 2 gloo processes), Flax (2 host devices) and Keras/JAX (DataParallel) each
    match the float64 reference of the mode within 1e-10: sync = one device on the whole batch,
    local = shard by shard with the gradients averaged and device 0's running statistics."""
    report = session[0][f"float64/{batchnorm}"]
    rows = report["results"]
    assert {(r["framework"], r["backend"]) for r in rows} == {("torch", "torch"), ("flax", "flax"), ("keras", "jax")}
    quantities = {r["quantity"].split("/", 1)[0] for r in rows}
    assert quantities == {"loss", "param", "state"}
    worst = max(rows, key=lambda r: r["rel_diff"])
    assert report["passed"], worst
    assert worst["rel_diff"] <= tolerance("float64") and worst["tolerance"] == tolerance("float64")


def test_parity_float64_every_framework_on_a_volume(session):
    """The same on a 3D checkpoint (a 4x2x5x6x7 batch per step, split over 2 devices)."""
    report = session[0]["float64/sync/3d"]
    rows = report["results"]
    assert report["config"]["spatial_dims"] == 3 and report["input_shape"][2:] == [5, 6, 7]
    assert {(r["framework"], r["backend"]) for r in rows} == {("torch", "torch"), ("flax", "flax"), ("keras", "jax")}
    worst = max(rows, key=lambda r: r["rel_diff"])
    assert report["passed"], worst
    assert worst["rel_diff"] <= tolerance("float64")


def test_parity_float32_local_within_noise_bound(session):
    report = session[0]["float32/local"]
    assert report["passed"], [r for r in report["results"] if not r["passed"]][:3]
    assert all(r["noise"] is not None and r["tolerance"] >= r["rel_diff"] for r in report["results"])


def test_modes_are_told_apart(tiny_checkpoint):
    """The comparison can fail: a local-statistics training run (the shard-by-shard reference
    itself) passes against the parity reference of its mode and fails against the sync one."""
    checkpoint = weights_convert.read(tiny_checkpoint).astype("float64")
    xs, targets = _inputs()
    local = reference.fit(checkpoint.tensors, xs, targets, optimizer="sgd", config=TINY, shards=2)
    target = parity.Target("torch", "torch", "cpu", "float64")
    for batchnorm, expected in (("local", True), ("sync", False)):
        run = parity.Run("fit", ("sgd",), STEPS, data_parallel=2, batchnorm=batchnorm)
        mode_reference = parity.compute_reference(checkpoint, parity.Inputs(xs, targets), run)
        verdicts = [row.passed for row, _ in parity.judge(local, mode_reference, target)]
        assert all(verdicts) is expected, batchnorm


def test_refusals(tiny_checkpoint, capsys):
    common = {"frameworks": ("torch",), "size": SIZE, "data_parallel": 2}
    with pytest.raises(parity.ParityError, match="needs --mode fit"):
        parity.check(tiny_checkpoint, mode="eval", batch=4, **common)
    with pytest.raises(parity.ParityError, match="does not split into 2 equal shards"):
        parity.check(tiny_checkpoint, mode="fit", batch=3, **common)
    with pytest.raises(parity.ParityError, match="runs on the jax backend"):
        parity.check(
            tiny_checkpoint,
            mode="fit",
            batch=4,
            frameworks=("keras",),
            keras_backends=("tensorflow",),
            size=SIZE,
            data_parallel=2,
        )
    with pytest.raises(SystemExit) as exit_:
        cli.main(["parity", str(tiny_checkpoint), "--mode", "fit", "--data-parallel", "2", "--batchnorm", "both"])
    assert exit_.value.code == 2
    assert "--batchnorm: invalid choice: 'both'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# attention-unet train on 2 devices, resumed across frameworks.


def test_train_hands_checkpoints_across_frameworks(session):
    results, stderr = session
    # Each run continues the previous one's training checkpoint: its SGD and its step numbers.
    for framework, steps in (("torch", (1, 2)), ("flax", (3, 4)), ("keras", (5, 6))):
        run = results[f"train/{framework}"]
        assert run["code"] == 0
        assert run["written"] == [f"step_{k}.safetensors" for k in steps]
        label = "keras/jax" if framework == "keras" else framework  # Keras trains data-parallel on JAX
        assert f"train {label} x2" in stderr
    assert "img/s" in stderr


def test_train_checkpoints_are_canonical_and_trained(session):
    """The last checkpoint of the chain reads back with the starting config, every tensor finite,
    and its parameters moved by the 6 training steps."""
    final = session[0]["train/final"]
    assert final["config"] == TINY.to_dict()
    assert final["finite"] and final["changed"] > 1e-3
