"""The ``.keras`` archive of a compiled model as a training checkpoint: what Keras' own ``model.save``
writes after training steps reads to the canonical optimizer state exactly, what ``weights_convert``
writes is the same archive and loads with ``keras.saving.load_model`` ready to continue, and the
optimizer state survives ``.pt`` / ``.safetensors`` -> ``.keras`` -> back bit for bit."""

from __future__ import annotations

import json
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

import impl_keras
import weights_convert
from impl_keras.training import (
    from_training_checkpoint,
    load_training,
    make_optimizer,
    optimizer_state,
    save_training,
    to_training_checkpoint,
)
from tests.install.test_formats_base_install import h5_layout
from weights_convert.core.checkpoint import Checkpoint, CheckpointError
from weights_convert.core.layouts import rule
from weights_convert.core.optimizer_state import OptimizerState, UnsupportedOptimizer, hyperparameters, slot_names
from weights_convert.core.random_init import random_checkpoint
from weights_convert.core.spec import ModelConfig, param_specs

CONFIG = ModelConfig(channels=(4, 8))
SETTINGS = {"sgd": {"momentum": 0.9, "nesterov": True}, "adam": {}, "adamw": {"weight_decay": 0.05}}


def keras_steps(model, optimizer, steps: int, dtype: str, seed: int = 0) -> None:
    """``steps`` steps of mean squared error on fixed random batches (N = 2, 16x16)."""
    rng = np.random.default_rng(seed)
    variables = model.trainable_variables
    for _ in range(steps):
        x = rng.standard_normal((2, 16, 16, CONFIG.in_channels)).astype(dtype)
        target = rng.standard_normal((2, 16, 16, CONFIG.out_channels)).astype(dtype)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(x, training=True) - target) ** 2)
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))


def assert_same_state(got: OptimizerState, want: OptimizerState) -> None:
    assert got.header() == want.header()
    assert got.tensors().keys() == want.tensors().keys()
    for key, value in want.tensors().items():
        assert got.tensors()[key].dtype == value.dtype and np.array_equal(got.tensors()[key], value), key


def archive_config(path) -> dict:
    """``config.json`` without the names Keras numbers by how many it made in the process."""
    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
    config["config"].pop("name")
    config["compile_config"]["optimizer"]["config"].pop("name")
    return config


def inner_layout(path, tmp_path) -> dict:
    inner = tmp_path / f"{path.stem}.inner.weights.h5"
    with zipfile.ZipFile(path) as archive:
        inner.write_bytes(archive.read("model.weights.h5"))
    layout = h5_layout(inner)
    layout["optimizer/vars"][1].pop("name")  # torch_adam, torch_adam_1, ... by creation order
    return layout


@pytest.mark.parametrize("name, dtype", [("sgd", "float64"), ("adam", "float32"), ("adamw", "float64")])
def test_keras_own_save_reads_to_the_canonical_state_and_ours_is_the_same_archive(tmp_path, name, dtype):
    model = impl_keras.from_checkpoint(random_checkpoint(CONFIG, seed=3, dtype=dtype), dtype)
    optimizer = make_optimizer(name, dtype, **SETTINGS[name])
    model.compile(optimizer=optimizer, loss="mean_squared_error")
    keras_steps(model, optimizer, 2, dtype)
    model.save(tmp_path / "theirs.keras")
    read = weights_convert.read(tmp_path / "theirs.keras")
    native = optimizer_state(model, optimizer)
    assert native.step == 2 and set(native.slots) == set(slot_names(name, native.hyper))
    assert_same_state(read.optimizer, native)

    save_training(model, optimizer, tmp_path / "ours.keras")  # through weights_convert.write
    assert archive_config(tmp_path / "ours.keras") == archive_config(tmp_path / "theirs.keras")
    assert inner_layout(tmp_path / "ours.keras", tmp_path) == inner_layout(tmp_path / "theirs.keras", tmp_path)
    assert_same_state(weights_convert.read(tmp_path / "ours.keras").optimizer, native)


def training_checkpoint(name: str, dtype: str, step: int | None = 2, seed: int = 5, **hyper) -> Checkpoint:
    """Random model tensors with random slots at ``step`` (None: torch SGD's, which has no count; 0:
    a fresh optimizer, without slots)."""
    checkpoint = random_checkpoint(CONFIG, seed=seed, dtype=dtype)
    hyper = hyperparameters(name, **{**SETTINGS[name], **hyper})
    rng = np.random.default_rng(seed)
    slots = {
        slot: {
            spec.name: rng.standard_normal(spec.shape).astype(dtype) ** (2 if slot == "exp_avg_sq" else 1)
            for spec in param_specs(CONFIG)
            if not spec.is_buffer
        }
        for slot in slot_names(name, hyper)
        if step != 0
    }
    state = OptimizerState(name, hyper, step, slots)
    return Checkpoint.from_tensors(checkpoint.tensors, CONFIG, optimizer=state)


def test_ours_loads_with_keras_load_model_and_continues_as_load_training_and_torch(tmp_path):
    import torch

    from impl_torch.training import from_training_checkpoint as torch_training
    from impl_torch.training import save_training as torch_save_training
    from impl_torch.training import to_training_checkpoint as torch_checkpoint
    from tests.formats.test_training_checkpoints import assert_same_training

    model, optimizer = torch_training(training_checkpoint("adam", "float64", step=0, lr=0.01), "float64")
    rng = np.random.default_rng(2)
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        x = torch.tensor(rng.standard_normal((2, CONFIG.in_channels, 16, 16)))
        torch.mean(model.train()(x) ** 2).backward()
        optimizer.step()
    torch_save_training(model, optimizer, tmp_path / "t.pt")
    weights_convert.convert(tmp_path / "t.pt", tmp_path / "t.keras")
    canonical = weights_convert.read(tmp_path / "t.pt").optimizer
    assert_same_state(weights_convert.read(tmp_path / "t.keras").optimizer, canonical)

    floatx = keras.config.floatx()
    keras.config.set_floatx("float64")  # Keras makes the learning-rate variable in floatx
    try:
        loaded = keras.saving.load_model(tmp_path / "t.keras", safe_mode=True)
    finally:
        keras.config.set_floatx(floatx)
    assert type(loaded.optimizer).__name__ == "TorchAdam"
    variables = [keras.ops.convert_to_numpy(v.value) for v in loaded.optimizer.variables]
    assert int(variables[0]) == canonical.step == 2 and variables[1] == canonical.hyper["lr"] == 0.01
    specs = [spec for spec in param_specs(CONFIG) if not spec.is_buffer]
    for i, spec in enumerate(specs):
        for j, slot in enumerate(("exp_avg", "exp_avg_sq")):
            value = rule(spec).from_channels_last(variables[2 + 2 * i + j])
            assert np.array_equal(value, canonical.slots[slot][spec.name]), (slot, spec.name)

    resumed, resumed_optimizer = load_training(tmp_path / "t.keras", dtype="float64")
    keras_steps(loaded, loaded.optimizer, 1, "float64", seed=1)
    keras_steps(resumed, resumed_optimizer, 1, "float64", seed=1)
    got, want = to_training_checkpoint(loaded, loaded.optimizer), to_training_checkpoint(resumed, resumed_optimizer)
    assert got.optimizer.step == want.optimizer.step == 3
    assert all(np.array_equal(got.tensors[k], v) for k, v in want.tensors.items())
    assert_same_state(got.optimizer, want.optimizer)
    # ... and as torch's own third step on the same batch (float64)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 16, 16, CONFIG.in_channels)).transpose(0, 3, 1, 2)
    target = rng.standard_normal((2, 16, 16, CONFIG.out_channels)).transpose(0, 3, 1, 2)
    optimizer.zero_grad(set_to_none=True)
    torch.mean((model(torch.tensor(x)) - torch.tensor(target)) ** 2).backward()
    optimizer.step()
    assert_same_training(got, torch_checkpoint(model, optimizer))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_optimizer_state_round_trips_through_keras_bit_exactly(tmp_path, suffix, dtype):
    sgd_step = None if suffix == ".pt" else 4  # .pt keeps no SGD step, as torch does not
    for name, step in (("sgd", sgd_step), ("adam", 2), ("adamw", 3)):
        original = training_checkpoint(name, dtype, step=step)
        start, middle, end = (tmp_path / f"{name}{step}{tag}" for tag in (suffix, ".keras", f".back{suffix}"))
        weights_convert.write(original, start)
        weights_convert.convert(start, middle)
        weights_convert.convert(middle, end)
        for path in (start, middle, end):
            back = weights_convert.read(path)
            assert_same_state(back.optimizer, original.optimizer)
            assert all(np.array_equal(back.tensors[k], v) for k, v in original.tensors.items()), path


def test_fresh_and_foreign_optimizers(tmp_path):
    """A fresh optimizer reads back fresh (its zero slots are Keras' built optimizer); a model compiled
    with Keras' own Adam reads as weights only."""
    fresh = training_checkpoint("adamw", "float32", step=0)
    weights_convert.write(fresh, tmp_path / "fresh.keras")
    assert weights_convert.read(tmp_path / "fresh.keras").optimizer.header() == fresh.optimizer.header()
    assert weights_convert.read(tmp_path / "fresh.keras").optimizer.slots == {}

    model, _ = from_training_checkpoint(fresh)
    model.compile(optimizer=keras.optimizers.Adam(), loss="mean_squared_error")
    keras_steps(model, model.optimizer, 1, "float32")
    model.save(tmp_path / "foreign.keras")
    foreign = weights_convert.read(tmp_path / "foreign.keras")
    assert foreign.optimizer is None and foreign.config == CONFIG


def edited(path, out, config=None, weights=None):
    """A copy of the archive ``path`` at ``out`` with ``config(optimizer config)`` and
    ``weights(open h5py file)`` applied to its members."""
    import io

    import h5py

    with zipfile.ZipFile(path) as source, zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename == "config.json" and config is not None:
                document = json.loads(data)
                config(document["compile_config"]["optimizer"])
                data = json.dumps(document)
            if info.filename == "model.weights.h5" and weights is not None:
                buffer = io.BytesIO(data)
                with h5py.File(buffer, "a") as f:
                    weights(f)
                data = buffer.getvalue()
            target.writestr(info.filename, data)
    return out


def _flip(f):
    value = f["optimizer/vars/7"][()]
    f["optimizer/vars/7"][...] = -value


def _reshape(f):
    del f["optimizer/vars/2"]
    f["optimizer/vars"].create_dataset("2", data=np.zeros((3, 3, 4, 4), np.float32))


@pytest.mark.parametrize(
    "config, weights, message",
    [
        (lambda c: c["config"].update(clipnorm=1.0), None, r'with \{"clipnorm": 1.0\} has no canonical form'),
        (lambda c: c["config"].update(learning_rate={"class_name": "ExponentialDecay"}), None, "only a constant one"),
        (lambda c: c["config"].update(learning_rate=0.5), None, "learning-rate variable holds 0.1.*optimizer 0.5"),
        (None, lambda f: f["optimizer/vars"].__delitem__("5"), "holds 37 variables .* has 38"),
        (None, _reshape, r"optimizer/vars/2 has shape \(3, 3, 4, 4\) \(expected \(3, 3, 3, 4\)\)"),
        (None, _flip, "optimizer variables do not match the checksum"),
        (None, lambda f: f.__delitem__("optimizer"), "compiled with sgd but holds no optimizer variables"),
    ],
)
def test_optimizer_that_cannot_be_mapped_exactly_is_refused_in_one_line(tmp_path, config, weights, message):
    weights_convert.write(training_checkpoint("sgd", "float32"), tmp_path / "sgd.keras")
    with pytest.raises(CheckpointError, match=message) as refused:
        weights_convert.read(edited(tmp_path / "sgd.keras", tmp_path / "edited.keras", config, weights))
    assert "\n" not in str(refused.value)


def test_l2_weight_decay_to_keras_is_refused_in_one_line_and_nothing_is_written(tmp_path, capsys):
    from weights_convert.harness.cli import main

    weights_convert.write(training_checkpoint("adam", "float32", weight_decay=0.1), tmp_path / "l2.safetensors")
    assert main(["convert", str(tmp_path / "l2.safetensors"), str(tmp_path / "l2.keras")]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Keras cannot express adam with weight_decay=0.1" in error, error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l2.safetensors"]


def test_a_float32_keras_optimizer_keeps_the_learning_rate_it_was_made_with():
    """Keras holds a float32 model's learning rate in a float32 variable (1e-3 reads back as
    0.0010000000474974513); the canonical state keeps the 1e-3 it was made with."""
    import keras

    from impl_keras.io import from_checkpoint
    from impl_keras.training import make_optimizer, optimizer_state

    model = from_checkpoint(random_checkpoint(ModelConfig(channels=(4, 8)), seed=0), "float32")
    optimizer = make_optimizer("adamw", "float32", lr=1e-3)
    assert keras.backend.standardize_dtype(optimizer.learning_rate.dtype) == "float32"
    assert float(optimizer.get_config()["learning_rate"]) != 1e-3
    assert optimizer_state(model, optimizer).hyper["lr"] == 1e-3


def test_a_learning_rate_float32_cannot_hold_is_refused_for_a_float32_keras_file(tmp_path):
    checkpoint = random_checkpoint(CONFIG, seed=0).astype("float32")
    state = OptimizerState("adam", hyperparameters("adam", lr=0.1 + 1e-12), 0, {})
    path = tmp_path / "t.keras"
    with pytest.raises(UnsupportedOptimizer, match="keeps the learning rate in float32, which cannot hold lr=0.1000"):
        weights_convert.write(Checkpoint(checkpoint.config, checkpoint.tensors, optimizer=state), path)
    assert not path.exists()
    weights_convert.write(Checkpoint(checkpoint.config, checkpoint.astype("float64").tensors, optimizer=state), path)
    assert weights_convert.read(path).optimizer.hyper["lr"] == 0.1 + 1e-12
