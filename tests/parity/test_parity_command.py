"""The parity command and its Python API: exit codes, JSON shape, and that a perturbed
implementation fails and is named with its first drifting block."""

import json

import numpy as np
import pytest

import impl_torch.runner
import weights_convert
from tests.conftest import run_cli
from weights_convert.core.random_init import random_checkpoint
from weights_convert.core.spec import ModelConfig
from weights_convert.harness import cli, parity
from weights_convert.harness.parity.tolerances import tolerance

SMALL = ModelConfig(3, 2, (4, 8, 16))


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("parity") / "small.safetensors"
    weights_convert.write(random_checkpoint(SMALL, seed=4), path)
    return path


def perturb_runner(monkeypatch, name: str, delta: float = 1e-3):
    """Make impl_torch's runner see a checkpoint with one tensor nudged."""
    real_forward = impl_torch.runner.forward

    def forward(checkpoint, x, **kwargs):
        tensors = dict(checkpoint.tensors)
        tensors[name] = tensors[name] + np.asarray(delta, dtype=tensors[name].dtype)
        return real_forward(weights_convert.Checkpoint(checkpoint.config, tensors), x, **kwargs)

    monkeypatch.setattr(impl_torch.runner, "forward", forward)


def test_json_shape_and_pass(capsys, small_checkpoint):
    code, out, _ = run_cli(
        capsys,
        "parity",
        small_checkpoint,
        "--frameworks",
        "torch",
        "--dtype",
        "float64",
        "--size",
        "13",
        "17",
        "--batch",
        "3",
        "--json",
    )
    assert code == 0
    report = json.loads(out)
    assert report["passed"] is True
    assert report["config"] == {
        "architecture": "article",
        "in_channels": 3,
        "out_channels": 2,
        "channels": [4, 8, 16],
        "spatial_dims": 2,
    }
    assert (report["input_shape"], report["dtype"], report["mode"], report["seed"]) == (
        [3, 3, 13, 17],
        "float64",
        "eval",
        0,
    )
    rows = report["results"]
    assert [r["quantity"] for r in rows] == ["e1", "e2", "b1", "d1.ag", "d1", "d2.ag", "d2", "output", "mask"]
    assert all(set(r) == set(parity.RESULT_FIELDS) for r in rows[:-1])
    assert set(rows[-1]) == {*parity.RESULT_FIELDS, "agree"} and rows[-1]["agree"] == 1.0
    assert all(r["rel_diff"] <= 1e-10 and r["dtype"] == "float64" and r["mode"] == "eval" for r in rows)
    assert all(r["noise"] is None and r["tolerance"] == 1e-10 for r in rows[:-1])
    # What a CI artifact needs besides: the run and the machine it ran on.
    assert (report["batch"], report["size"], report["loss"], report["device"]) == (3, [13, 17], "mse", "cpu")
    machine = report["machine"]
    assert machine["versions"]["numpy"] == np.__version__ and machine["versions"]["torch"]
    assert machine["python"] and machine["processor"] and machine["cpu_count"] >= 1


@pytest.mark.parametrize(
    "config",
    [
        '{"in_channels": 2, "out_channels": 2, "channels": [4, 8, 16]}',
        '{"spatial_dims": 3, "channels": [4, 8]}',
        '{"architecture": "monai", "spatial_dims": 2, "in_channels": 1, "out_channels": 1, "channels": [4, 8, 16], '
        '"strides": [2, 2]}',
    ],
    ids=["article", "3d", "monai"],
)
def test_init_gives_logits_of_both_signs(capsys, tmp_path, config):
    """``init``'s seeded weights mark some pixels of every output channel foreground and some
    background (random weights alone give one sign everywhere), so the parity mask rows compare
    real decisions; the seeded default model of ``parity`` likewise."""
    from weights_convert.harness import reference
    from weights_convert.harness.parity.inputs import make_inputs

    path = tmp_path / "m.safetensors"
    code, _, err = run_cli(capsys, "init", path, "--config", config, "--seed", "3")
    assert code == 0, err
    checkpoint = weights_convert.read(path)
    side = 16 if checkpoint.config.spatial_dims == 2 else 8
    x, _ = make_inputs(checkpoint.config, 2, (side,) * checkpoint.config.spatial_dims, seed=5)
    logits = reference.forward(checkpoint.tensors, x, config=checkpoint.config)["output"]
    positive = np.mean(logits > 0, axis=(0, *range(2, logits.ndim)))
    assert np.all((positive > 0.05) & (positive < 0.95)), positive
    raw = random_checkpoint(checkpoint.config, seed=3)
    changed = [name for name in raw.tensors if not np.array_equal(raw.tensors[name], checkpoint.tensors[name])]
    assert changed == [parity.inputs.logits_bias_name(checkpoint.config)]


def test_default_parity_masks_hold_both_classes():
    x, _ = parity.make_inputs(ModelConfig(), 1, (64, 64))
    checkpoint = parity.default_checkpoint(x)
    from weights_convert.harness import reference

    logits = reference.forward(checkpoint.tensors, x, config=checkpoint.config)["output"]
    assert 0.3 < np.mean(logits > 0) < 0.7


def test_float32_train_rows_all_gate_and_carry_their_noise(capsys, small_checkpoint):
    """Gradients and optimizer steps gate in float32 too, each row bounded by its measured noise."""
    code, out, _ = run_cli(
        capsys, "parity", small_checkpoint, "--frameworks", "torch", "--mode", "train", "--size", "12", "9", "--json"
    )
    assert code == 0
    rows = json.loads(out)["results"]
    assert not any(r.get("informational") for r in rows)
    for r in rows:
        if r["quantity"] == "mask":
            continue
        assert r["noise"] is not None and r["noise"] >= 0, r
        assert r["tolerance"] == tolerance("float32", r["noise"]), r
        assert r["passed"] == (r["rel_diff"] <= r["tolerance"])
    grads = [r for r in rows if r["quantity"].startswith(("grad/", "step/"))]
    assert grads and max(r["noise"] for r in grads) > 0  # float32 noise was really measured


@pytest.mark.parametrize(
    "name, block",
    [
        ("d2.c1.conv.0.weight", "d2"),
        ("e2.conv.conv.1.running_mean", "e2"),
        ("d1.ag.Ws.0.bias", "d1.ag"),
        ("output.bias", "output"),
    ],
)
def test_perturbed_weights_fail_and_name_the_block(capsys, monkeypatch, small_checkpoint, name, block):
    perturb_runner(monkeypatch, name)
    code, out, _ = run_cli(capsys, "parity", small_checkpoint, "--frameworks", "torch", "--size", "16", "16")
    assert code == 1
    assert f"FAIL: torch cpu float32: first drift at {block}" in out
    with pytest.raises(AssertionError, match=f"torch cpu float32: first drift at {block}"):
        parity.assert_parity(small_checkpoint, frameworks=["torch"], size=(16, 16))


def test_train_mode_has_state_grad_and_step_rows(capsys, small_checkpoint):
    code, out, _ = run_cli(
        capsys,
        "parity",
        small_checkpoint,
        "--frameworks",
        "torch",
        "--mode",
        "train",
        "--dtype",
        "float64",
        "--size",
        "12",
        "9",
        "--json",
    )
    assert code == 0
    quantities = [r["quantity"] for r in json.loads(out)["results"]]
    trainable = [p.name for p in weights_convert.param_specs(SMALL) if not p.is_buffer]
    buffers = [p.name for p in weights_convert.param_specs(SMALL) if p.is_buffer]
    for prefix, names in (
        ("grad/", trainable),
        ("step/sgd/", trainable),
        ("step/adam/", trainable),
        ("state/", buffers),
    ):
        assert sorted(q[len(prefix) :] for q in quantities if q.startswith(prefix)) == sorted(names)


def test_train_mode_catches_a_wrong_running_variance(monkeypatch, small_checkpoint):
    """A biased running-variance update (the Flax/Keras default) must fail the state rows."""
    real_forward = impl_torch.runner.forward

    def biased(checkpoint, x, **kwargs):
        results = real_forward(checkpoint, x, **kwargs)
        key = "state/e1.conv.conv.1.running_var"
        results[key] = results[key] * 0.999
        return results

    monkeypatch.setattr(impl_torch.runner, "forward", biased)
    report = parity.check(small_checkpoint, frameworks=["torch"], mode="train", dtype="float64", size=(8, 8))
    assert not report.passed
    assert report.first_drift() == {"torch cpu float64": "state/e1.conv.conv.1.running_var"}


def test_report_directory(capsys, tmp_path, small_checkpoint):
    code, _, err = run_cli(
        capsys,
        "parity",
        small_checkpoint,
        "--frameworks",
        "torch",
        "--size",
        "16",
        "16",
        "--report",
        tmp_path / "report",
    )
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["parity.json", "parity.md", "parity.png"]
    assert (tmp_path / "report" / "parity.png").read_bytes()[:4] == b"\x89PNG"
    assert "d2.ag" in (tmp_path / "report" / "parity.md").read_text()


@pytest.mark.parametrize(
    "args",
    [
        ["--frameworks", "mxnet"],
        ["--keras-backends", "numpy"],
        ["--dtype", "int8"],
        ["--size", "3", "3"],
        ["--batch", "0"],
        ["--mode", "predict"],
        ["--mode", "fit", "--steps", "0"],
        ["--optimizer", "rmsprop"],
    ],
)
def test_bad_usage_exits_2(capsys, small_checkpoint, args):
    try:
        code = cli.main(["parity", str(small_checkpoint), *args])
    except SystemExit as exit_:  # argparse rejects it before running
        code = exit_.code
    assert code == 2
    assert "error:" in capsys.readouterr().err


def test_gpu_without_a_gpu_is_a_clear_usage_error(capsys, small_checkpoint):
    if parity.gpu_available("torch"):
        pytest.skip("a GPU is visible to torch; the gpu-marked tests cover it")
    code, _, err = run_cli(capsys, "parity", small_checkpoint, "--frameworks", "torch", "--device", "gpu")
    assert code == 2 and "no GPU visible to torch" in err and len(err.strip().splitlines()) == 1


def test_refused_checkpoint_exits_1(capsys, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    code, _, err = run_cli(capsys, "parity", bad, "--frameworks", "torch")
    assert code == 1 and "bad.safetensors" in err and len(err.strip().splitlines()) == 1


# Sensitivity: a relative change of one BatchNorm scale (it reaches the output in eval and train
# mode alike) that each precision must catch on the small model: 3x the smallest change caught
# (measured: 3e-10 in float64, 1e-5 in float32 eval and 3e-5 in train, 0.1 in mixed bfloat16).
SENSITIVITY = {"float64": 1e-9, "float32": 1e-4, "mixed_bfloat16": 0.3}


@pytest.mark.parametrize("dtype", sorted(SENSITIVITY))
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_small_relative_change_of_one_layer_fails_at_every_precision(monkeypatch, small_checkpoint, dtype, mode):
    name = "d2.c1.conv.4.weight"
    scale = 1 + SENSITIVITY[dtype]
    real = {function: getattr(impl_torch.runner, function) for function in ("forward", "train_step")}

    def perturbed(function):
        def run(checkpoint, *args, **kwargs):
            tensors = dict(checkpoint.tensors)
            tensors[name] = tensors[name] * np.asarray(scale, tensors[name].dtype)
            return real[function](weights_convert.Checkpoint(checkpoint.config, tensors), *args, **kwargs)

        return run

    args = dict(frameworks=["torch"], dtype=dtype, mode=mode, size=(16, 16))
    assert parity.check(small_checkpoint, **args).passed  # unperturbed: passes
    for function in real:
        monkeypatch.setattr(impl_torch.runner, function, perturbed(function))
    report = parity.check(small_checkpoint, **args)
    assert not report.passed
    assert report.first_drift() == {f"torch cpu {dtype}": "d2"}


def test_fit_report_plots_losses_and_parameter_drift(capsys, tmp_path, small_checkpoint):
    code, _, _ = run_cli(
        capsys,
        "parity",
        small_checkpoint,
        "--frameworks",
        "torch",
        "--mode",
        "fit",
        "--steps",
        "3",
        "--optimizer",
        "sgd",
        "--size",
        "16",
        "16",
        "--report",
        tmp_path / "report",
    )
    assert code == 0
    report = json.loads((tmp_path / "report" / "parity.json").read_text())
    quantities = [r["quantity"] for r in report["results"]]
    assert quantities[:3] == ["loss/step1", "loss/step2", "loss/step3"]
    assert not any(q.startswith("trajectory/") for q in quantities)
    assert (tmp_path / "report" / "parity.png").read_bytes()[:4] == b"\x89PNG"
