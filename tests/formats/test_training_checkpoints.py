"""Training checkpoints: the canonical optimizer state, its files, and resumed training across
frameworks. One step in framework A, save, load in framework B, one more step, must equal two steps
in A (float64, ``TOLERANCES["float64"]``); the canonical definitions must equal the NumPy reference
optimizer of the parity harness and ``torch.optim``."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch

import weights_convert
from weights_convert.core.checkpoint import CheckpointError
from weights_convert.core.optimizer_state import OptimizerState, UnsupportedOptimizer, hyperparameters, reference_step
from weights_convert.core.random_init import random_checkpoint
from weights_convert.core.spec import ModelConfig
from weights_convert.harness.parity.tolerances import TOLERANCES
from weights_convert.harness.reference import Optimizer as ReferenceOptimizer

CONFIG = ModelConfig(channels=(4, 8))
TOLERANCE = TOLERANCES["float64"]

# The settings each pair of frameworks runs: SGD with momentum and nesterov, Adam, AdamW. SGD's L2
# weight decay is checked between torch and Flax alone (Keras cannot express it, see below).
SETTINGS = {
    "sgd": {"momentum": 0.9, "nesterov": True},
    "adam": {},
    "adamw": {"weight_decay": 0.05},
}


def relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def batches(steps: int):
    """The first ``steps`` of one fixed run of six batches (N = 2, 16x16)."""
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((6, 2, CONFIG.in_channels, 16, 16))
    targets = rng.standard_normal((6, 2, CONFIG.out_channels, 16, 16))
    return xs[:steps], targets[:steps]


# --- the canonical definitions -------------------------------------------------------------------


def test_canonical_definitions_equal_the_parity_reference_optimizer():
    rng = np.random.default_rng(1)
    params = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
    for name, canonical in (("sgd", {"momentum": 0.0}), ("adam", {})):
        reference, state, ours = (
            ReferenceOptimizer(name),
            OptimizerState(name, hyperparameters(name, **canonical), 0, {}),
            dict(params),
        )
        theirs = dict(params)
        for _ in range(3):
            grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
            ours, state = reference_step(ours, grads, state)
            theirs = reference.step(theirs, grads)
        for key in params:
            assert relative(ours[key], theirs[key]) < TOLERANCES["float64_reordered"], (name, key)


@pytest.mark.parametrize(
    "name, hyper",
    [
        ("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
        ("sgd", {"momentum": 0.8}),
        ("adam", {"weight_decay": 0.1}),
        ("adamw", {"weight_decay": 0.3, "lr": 0.01}),
    ],
)
def test_canonical_definitions_equal_torch_optim(name, hyper):
    from impl_torch.training import make_optimizer

    rng = np.random.default_rng(2)
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.tensor(rng.standard_normal((3, 4))))
    model.config = CONFIG
    optimizer = make_optimizer(model, name, **hyper)
    params, state = {"w": model.w.detach().numpy().copy()}, OptimizerState(name, hyperparameters(name, **hyper), 0, {})
    for _ in range(3):
        grad = rng.standard_normal((3, 4))
        model.w.grad = torch.tensor(grad)
        optimizer.step()
        params, state = reference_step(params, {"w": grad}, state)
    assert relative(model.w.detach().numpy(), params["w"]) < TOLERANCES["float64_reordered"]


def test_settings_outside_the_canonical_definitions_are_refused_in_one_line():
    from impl_keras.training import make_optimizer as keras_optimizer

    with pytest.raises(UnsupportedOptimizer, match="Keras cannot express sgd with weight_decay=0.1"):
        keras_optimizer("sgd", weight_decay=0.1)
    with pytest.raises(UnsupportedOptimizer, match="one of sgd, adam, adamw, got 'rmsprop'"):
        hyperparameters("rmsprop")
    model, _ = torch_model_and_optimizer("adam")
    dampened = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.5)
    from impl_torch.training import optimizer_state

    with pytest.raises(UnsupportedOptimizer, match=r"torch sgd with \{'dampening': 0.5\} has no canonical form"):
        optimizer_state(model, dampened)


# --- files ---------------------------------------------------------------------------------------


def torch_model_and_optimizer(name: str, steps: int = 1, **hyper):
    from impl_torch.io import from_checkpoint
    from impl_torch.training import make_optimizer

    model = from_checkpoint(random_checkpoint(CONFIG, seed=3), "float64").train()
    optimizer = make_optimizer(model, name, **{**SETTINGS[name], **hyper})
    torch_steps(model, optimizer, *batches(steps))
    return model, optimizer


def torch_steps(model, optimizer, xs, targets) -> None:
    for x, target in zip(xs, targets, strict=True):
        optimizer.zero_grad(set_to_none=True)
        loss = torch.mean((model(torch.tensor(x)) - torch.tensor(target)) ** 2)
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_training_checkpoint_round_trips_exactly(tmp_path, suffix):
    from impl_torch.training import load_training, save_training, to_training_checkpoint

    model, optimizer = torch_model_and_optimizer("adamw", steps=2)
    path = tmp_path / f"t{suffix}"
    save_training(model, optimizer, path)
    back = weights_convert.read(path)
    written = to_training_checkpoint(model, optimizer)
    assert (
        back.optimizer.header()
        == written.optimizer.header()
        == {
            "name": "adamw",
            "hyper": hyperparameters("adamw", weight_decay=0.05),
            "step": 2,
        }
    )
    for name, value in written.optimizer.tensors().items():
        assert np.array_equal(back.optimizer.tensors()[name], value), name
    assert "optimizer/exp_avg/e1.conv.conv.0.weight" in back.optimizer.tensors()
    _, loaded = load_training(path, dtype="float64")
    assert loaded.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]


def test_convert_carries_the_state_and_weights_only_drops_it_only_when_asked(tmp_path):
    from impl_torch.training import save_training

    model, optimizer = torch_model_and_optimizer("sgd")
    save_training(model, optimizer, tmp_path / "t.pt")
    weights_convert.convert(tmp_path / "t.pt", tmp_path / "t.safetensors")
    weights_convert.convert(tmp_path / "t.safetensors", tmp_path / "u.pt")
    first, last = weights_convert.read(tmp_path / "t.pt"), weights_convert.read(tmp_path / "u.pt")
    assert first.optimizer.header() == last.optimizer.header()
    assert all(np.array_equal(last.optimizer.tensors()[k], v) for k, v in first.optimizer.tensors().items())
    with pytest.raises(CheckpointError, match="holds no optimizer state.*pass --weights-only to drop it"):
        weights_convert.convert(tmp_path / "t.pt", tmp_path / "t.weights.h5")
    assert not (tmp_path / "t.weights.h5").exists()
    weights_convert.convert(tmp_path / "t.pt", tmp_path / "t.weights.h5", weights_only=True)
    assert weights_convert.read(tmp_path / "t.weights.h5").optimizer is None


def test_hostile_optimizer_sections_are_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    from impl_torch.training import save_training

    model, optimizer = torch_model_and_optimizer("adam")
    save_training(model, optimizer, tmp_path / "t.safetensors")
    with safe_open(str(tmp_path / "t.safetensors"), "np") as f:
        metadata = f.metadata()
    tensors = load_file(str(tmp_path / "t.safetensors"))
    del metadata["sha256"]
    wrong_shape = dict(tensors, **{"optimizer/exp_avg/output.weight": np.zeros((1, 2, 3))})
    save_file(wrong_shape, str(tmp_path / "shape.safetensors"), metadata=metadata)
    with pytest.raises(CheckpointError, match="optimizer tensor 'optimizer/exp_avg/output.weight' has shape"):
        weights_convert.read(tmp_path / "shape.safetensors")
    missing = {k: v for k, v in tensors.items() if k != "optimizer/exp_avg_sq/output.bias"}
    save_file(missing, str(tmp_path / "missing.safetensors"), metadata=metadata)
    with pytest.raises(CheckpointError, match=r"exp_avg_sq misses \['output.bias'\]"):
        weights_convert.read(tmp_path / "missing.safetensors")
    save_file(tensors, str(tmp_path / "hyper.safetensors"), metadata={**metadata, "optimizer": '{"name": "adam"}'})
    with pytest.raises(CheckpointError, match="optimizer metadata must be an object with name, hyper and step"):
        weights_convert.read(tmp_path / "hyper.safetensors")


# --- resumed training across frameworks ----------------------------------------------------------


def _flax_gradients():
    from flax import nnx

    from impl_flax.runner import loss_fn

    return nnx.jit(nnx.grad(loss_fn))


def flax_steps(model, optimizer, xs, targets) -> None:
    """The gradients jitted (one compile for every test: same model, any optimizer), the update eager."""
    gradients = FLAX_GRADIENTS.setdefault("gradients", _flax_gradients())
    for x, target in zip(xs, targets, strict=True):
        grads = gradients(
            model, jax.numpy.asarray(x.transpose(0, 2, 3, 1)), jax.numpy.asarray(target.transpose(0, 2, 3, 1))
        )
        optimizer.update(model, grads)


FLAX_GRADIENTS: dict = {}


def keras_steps(model, optimizer, xs, targets) -> None:
    import tensorflow as tf

    variables = model.trainable_variables
    for x, target in zip(xs, targets, strict=True):
        with tf.GradientTape() as tape:
            output = model(x.transpose(0, 2, 3, 1), training=True)
            loss = tf.reduce_mean((output - target.transpose(0, 2, 3, 1)) ** 2)
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))


def framework(name: str):
    """(training module, function running steps on (model, optimizer, xs, targets))."""
    if name == "torch":
        from impl_torch import training

        return training, torch_steps
    if name == "flax":
        from impl_flax import training

        return training, flax_steps
    from impl_keras import training

    return training, keras_steps


def start(name: str, **hyper):
    """A float64 training checkpoint with a fresh optimizer ``name`` (``SETTINGS`` and ``hyper``)."""
    checkpoint = random_checkpoint(CONFIG, seed=3, dtype="float64")
    state = OptimizerState(name, hyperparameters(name, **{**SETTINGS[name], **hyper}), 0, {})
    return weights_convert.Checkpoint.from_tensors(checkpoint.tensors, CONFIG, optimizer=state)


def resume(tmp_path, source: str, target: str, checkpoint, suffix: str):
    """Step 1 in ``source``, saved to ``a<suffix>``, converted to ``b.safetensors``, loaded in
    ``target`` for step 2; step 2 in ``source`` too. Returns (target's, source's) training checkpoint
    after step 2."""
    xs, targets = batches(2)
    source_training, source_run = framework(source)
    target_training, target_run = framework(target)
    model, optimizer = source_training.from_training_checkpoint(checkpoint, "float64")
    source_run(model, optimizer, xs[:1], targets[:1])
    source_training.save_training(model, optimizer, tmp_path / f"a{suffix}")
    source_run(model, optimizer, xs[1:], targets[1:])  # saving changed nothing: this is two straight steps
    weights_convert.convert(tmp_path / f"a{suffix}", tmp_path / "b.safetensors")
    resumed, resumed_optimizer = target_training.load_training(tmp_path / "b.safetensors", dtype="float64")
    target_run(resumed, resumed_optimizer, xs[1:], targets[1:])
    got = target_training.to_training_checkpoint(resumed, resumed_optimizer)
    return got, source_training.to_training_checkpoint(model, optimizer)


def assert_same_training(got, want) -> None:
    """Every model tensor within the float64 bound of its own scale (counters equal); every optimizer
    slot within the bound of that slot's largest value over all tensors: the first moments of conv
    biases in front of a train-mode BatchNorm are the running mean of zero gradients, rounding
    noise of ~1e-18 that only the slot's overall scale measures meaningfully."""
    for key, value in want.tensors.items():
        if value.dtype.kind in "iu":
            assert np.array_equal(got.tensors[key], value), key
        else:
            assert relative(got.tensors[key], value) < TOLERANCE, key
    if want.optimizer.step is not None and got.optimizer.step is not None:
        assert got.optimizer.step == want.optimizer.step
    assert got.optimizer.tensors().keys() == want.optimizer.tensors().keys()
    for slot, values in want.optimizer.slots.items():
        scale = max(float(np.max(np.abs(v))) for v in values.values())
        for key, value in values.items():
            difference = float(np.max(np.abs(got.optimizer.slots[slot][key] - value)))
            assert difference / scale < TOLERANCE, (slot, key, difference / scale)


NATIVE = {"torch": ".pt", "flax": ".safetensors", "keras": ".safetensors"}


@pytest.mark.parametrize(
    "source, target, name",
    [
        ("torch", "flax", "adam"),
        ("flax", "keras", "sgd"),
        ("keras", "torch", "adamw"),
        ("torch", "keras", "adamw"),
        ("flax", "torch", "adam"),
        ("keras", "flax", "sgd"),
    ],
)
def test_one_step_saved_loaded_and_continued_equals_two_steps(tmp_path, source, target, name):
    with jax.enable_x64(True):
        got, want = resume(tmp_path, source, target, start(name), NATIVE[source])
    assert_same_training(got, want)


def test_torch_sgd_l2_weight_decay_resumes_in_flax(tmp_path):
    with jax.enable_x64(True):
        got, want = resume(tmp_path, "torch", "flax", start("sgd", weight_decay=0.1), ".pt")
    assert_same_training(got, want)


def test_inspect_shows_the_optimizer_and_convert_drops_it_only_with_weights_only(tmp_path, capsys):
    from impl_torch.training import save_training
    from weights_convert.harness.cli import main

    model, optimizer = torch_model_and_optimizer("adam", steps=2)
    save_training(model, optimizer, tmp_path / "t.pt")
    assert main(["convert", str(tmp_path / "t.pt"), str(tmp_path / "t.safetensors")]) == 0
    assert "optimizer state: adam at step 2, kept" in capsys.readouterr().err
    assert main(["inspect", "--json", str(tmp_path / "t.safetensors")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["optimizer"], info["step"], info["hyperparameters"]) == ("adam", 2, hyperparameters("adam"))
    assert main(["convert", str(tmp_path / "t.safetensors"), str(tmp_path / "t.weights.h5")]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "pass --weights-only to drop it" in error
    assert not (tmp_path / "t.weights.h5").exists()
    assert main(["convert", "--weights-only", str(tmp_path / "t.safetensors"), str(tmp_path / "t.weights.h5")]) == 0
    assert "optimizer state: adam at step 2, dropped (--weights-only)" in capsys.readouterr().err
    assert main(["inspect", "--json", str(tmp_path / "t.weights.h5")]) == 0
    assert "optimizer" not in json.loads(capsys.readouterr().out)


def test_three_adam_steps_in_torch_then_three_in_flax_through_orbax_equal_six_in_torch(tmp_path):
    from impl_flax import load_training
    from impl_flax.training import to_training_checkpoint as flax_checkpoint
    from impl_torch import save_training
    from impl_torch.training import from_training_checkpoint
    from impl_torch.training import to_training_checkpoint as torch_checkpoint
    from weights_convert.harness.cli import main

    xs, targets = batches(6)
    model, optimizer = from_training_checkpoint(start("adam"), "float64")
    torch_steps(model, optimizer, xs[:3], targets[:3])
    save_training(model, optimizer, tmp_path / "t.pt")
    torch_steps(model, optimizer, xs[3:], targets[3:])
    assert main(["convert", str(tmp_path / "t.pt"), str(tmp_path / "t.orbax")]) == 0
    assert main(["inspect", str(tmp_path / "t.orbax")]) == 0
    with jax.enable_x64(True):
        resumed, resumed_optimizer = load_training(tmp_path / "t.orbax", dtype="float64")
        flax_steps(resumed, resumed_optimizer, xs[3:], targets[3:])
        got = flax_checkpoint(resumed, resumed_optimizer)
    want = torch_checkpoint(model, optimizer)
    assert got.optimizer.step == want.optimizer.step == 6
    assert_same_training(got, want)


@pytest.mark.parametrize("suffix", [".msgpack", ".orbax"])
def test_flax_files_hold_the_native_optimizer_state(tmp_path, suffix):
    import flax.serialization
    import orbax.checkpoint as ocp
    from flax import nnx

    from impl_flax.io import from_checkpoint
    from impl_flax.training import make_optimizer, optimizer_state
    from impl_torch.training import save_training

    model, optimizer = torch_model_and_optimizer("sgd", weight_decay=0.1)
    save_training(model, optimizer, tmp_path / "t.pt")
    weights_convert.convert(tmp_path / "t.pt", tmp_path / f"t{suffix}")
    written = weights_convert.read(tmp_path / "t.pt")
    back = weights_convert.read(tmp_path / f"t{suffix}")
    assert back.optimizer.header() == written.optimizer.header()
    assert all(np.array_equal(back.optimizer.tensors()[k], v) for k, v in written.optimizer.tensors().items())
    # Flax's own restore, into an optimizer of the same transformation
    with jax.enable_x64(True):
        flax_model = from_checkpoint(written, "float64")
        flax_optimizer = make_optimizer(flax_model, "sgd", **written.optimizer.hyper)
        state = nnx.state(flax_optimizer)
        if suffix == ".msgpack":
            restored = flax.serialization.msgpack_restore((tmp_path / "t.msgpack").read_bytes())["optimizer"]
            nnx.replace_by_pure_dict(state, restored)
        else:
            target = {"model": nnx.state(flax_model), "optimizer": state, "hyperparameters": None}
            with ocp.StandardCheckpointer() as checkpointer:
                metadata = checkpointer.metadata(tmp_path / "t.orbax").item_metadata
                target["hyperparameters"] = jax.tree.map(
                    lambda m: np.zeros(m.shape, m.dtype), metadata.tree["hyperparameters"]
                )
                state = checkpointer.restore((tmp_path / "t.orbax").absolute(), target)["optimizer"]
        nnx.update(flax_optimizer, state)
        native = optimizer_state(flax_model, flax_optimizer)
    for key, value in written.optimizer.tensors().items():
        assert np.array_equal(native.tensors()[key], value), key


def test_plain_sgd_has_no_slots_at_any_step(tmp_path):
    """SGD without momentum keeps nothing per parameter: Flax and Keras count its steps, and such a
    state at step 4 is written and read back as it is; a stateful optimizer without slots is not."""
    checkpoint = random_checkpoint(CONFIG, seed=0)
    plain = OptimizerState("sgd", hyperparameters("sgd", momentum=0.0), 4, {})
    path = tmp_path / "plain.safetensors"
    weights_convert.write(dataclasses.replace(checkpoint, optimizer=plain), path)
    assert weights_convert.read(path).optimizer.header() == plain.header()
    with pytest.raises(CheckpointError, match="at step 4 but has no"):
        OptimizerState("sgd", hyperparameters("sgd"), 4, {}).check(CONFIG)
