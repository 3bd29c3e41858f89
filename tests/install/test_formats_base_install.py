"""The framework-free formats: ``.weights.h5`` and ``.keras`` with h5py, zipfile and json, ``.msgpack``
with msgpack. A base install (no framework) converts between them losslessly; the files are the
ones Keras and Flax themselves write and read."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zipfile

import h5py
import numpy as np
import pytest

import weights_convert
from tests.installs import REPO, WITHOUT, environment, run_as
from weights_convert.core.flax_layout import nest, to_nnx
from weights_convert.core.random_init import random_checkpoint
from weights_convert.core.spec import ModelConfig
from weights_convert.formats import flax_msgpack_format, keras_archive_format

TINY = ModelConfig(2, 1, (4, 8))

BASE_CHAIN = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import numpy as np
    import weights_convert
    from weights_convert.core.random_init import random_checkpoint
    from weights_convert.core.spec import ModelConfig

    directory = Path(sys.argv[1])
    original = random_checkpoint(ModelConfig(2, 1, (4, 8)), seed=7)
    path = directory / "start.safetensors"
    weights_convert.write(original, path)
    for i, suffix in enumerate([".weights.h5", ".keras", ".msgpack", ".safetensors"]):
        nxt = directory / f"step{i}{suffix}"
        weights_convert.convert(path, nxt)
        path = nxt
        back = weights_convert.read(path)
        assert back.config == original.config, (suffix, back.config)
        changed = [k for k, v in original.tensors.items() if v.dtype != back.tensors[k].dtype
                   or v.tobytes() != np.ascontiguousarray(back.tensors[k]).tobytes()]
        assert changed == [], (suffix, changed)
    # A training checkpoint: .safetensors -> .keras (a compiled model's archive) -> .safetensors
    # keeps the optimizer state bit for bit.
    from weights_convert.core.optimizer_state import OptimizerState, hyperparameters
    from weights_convert.core.spec import param_specs

    rng = np.random.default_rng(8)
    trainable = [s for s in param_specs(original.config) if not s.is_buffer]
    slots = {slot: {s.name: rng.random(s.shape, np.float32) for s in trainable} for slot in ("exp_avg", "exp_avg_sq")}
    state = OptimizerState("adamw", hyperparameters("adamw", weight_decay=0.05), 3, slots)
    training = weights_convert.Checkpoint.from_tensors(original.tensors, original.config, optimizer=state)
    weights_convert.write(training, directory / "training.safetensors")
    weights_convert.convert(directory / "training.safetensors", directory / "training.keras")
    weights_convert.convert(directory / "training.keras", directory / "training_back.safetensors")
    for suffix in (".keras", "_back.safetensors"):
        back = weights_convert.read(directory / f"training{suffix}").optimizer
        assert back.header() == state.header(), (suffix, back.header())
        changed = [k for k, v in state.tensors().items() if v.tobytes() != back.tensors()[k].tobytes()]
        assert changed == [], (suffix, changed)
    # Hidden packages sit in sys.modules as None; an imported one would be a module.
    imported = {m.split(".")[0] for m, v in sys.modules.items() if v is not None}
    frameworks = sorted(imported & {"torch", "jax", "flax", "keras", "tensorflow", "orbax", "impl_torch",
                                    "impl_flax", "impl_keras"})
    assert frameworks == [], frameworks
    print("chain ok")
    """
)


def test_base_install_converts_losslessly_and_refuses_pt(tmp_path):
    """Without any framework: .safetensors -> .weights.h5 -> .keras -> .msgpack -> .safetensors is
    bit-exact, a training checkpoint's optimizer state survives .safetensors -> .keras -> .safetensors
    bit for bit, and no framework is imported; .pt is refused in one line naming the extra."""
    done = subprocess.run(
        [sys.executable, "-c", BASE_CHAIN, str(tmp_path)],
        env=environment(WITHOUT["base"]),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "chain ok" in done.stdout
    refused = run_as("base", "convert", tmp_path / "start.safetensors", tmp_path / "out.pt")
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "attention-unet[torch]" in lines[0], refused.stderr
    assert not (tmp_path / "out.pt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.pt")]  # no temporaries


def h5_layout(path) -> dict:
    """Every group and dataset of an HDF5 file: kind, attributes (checksum aside), shape, dtype
    (integers as their kind: Keras' counter is int32 under JAX, int64 under TensorFlow)."""
    layout = {}

    def visit(name, item):
        attrs = {k: str(v) for k, v in item.attrs.items()}
        if isinstance(item, h5py.Dataset):
            dtype = item.dtype.kind if item.dtype.kind in "iu" else str(item.dtype)
            layout[name] = ("dataset", attrs, item.shape, dtype)
        else:
            layout[name] = ("group", attrs)

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    # Keras names a model by how many it has built in the process (attention_u_net_2, ...): the
    # name is the one attribute that is not layout.
    layout["vars"][1].pop("name", None)
    return layout


def model_config(archive: zipfile.ZipFile) -> dict:
    """``config.json`` of a ``.keras`` archive without the model's name, which Keras picks by how many
    models the process has built (attention_u_net_2, ...)."""
    config = json.loads(archive.read("config.json"))
    config["config"].pop("name", None)
    return config


def test_keras_files_match_what_keras_writes_and_load_both_ways(tmp_path):
    """Our .weights.h5 and .keras against Keras' own save_weights / save for impl_keras.AttentionUNet:
    the same HDF5 layout and config.json; each side reads the other's files exactly."""
    keras = pytest.importorskip("keras")
    impl_keras = pytest.importorskip("impl_keras")
    from impl_keras.io import to_checkpoint

    config = TINY
    checkpoint = random_checkpoint(config, seed=11)
    model = impl_keras.from_checkpoint(checkpoint)
    model.save_weights(tmp_path / "theirs.weights.h5")
    model.save(tmp_path / "theirs.keras")
    weights_convert.write(checkpoint, tmp_path / "ours.weights.h5")
    weights_convert.write(checkpoint, tmp_path / "ours.keras")

    assert h5_layout(tmp_path / "ours.weights.h5") == h5_layout(tmp_path / "theirs.weights.h5")
    with zipfile.ZipFile(tmp_path / "ours.keras") as ours, zipfile.ZipFile(tmp_path / "theirs.keras") as theirs:
        assert [(i.filename, i.compress_type) for i in ours.infolist()] == [
            (i.filename, i.compress_type) for i in theirs.infolist()
        ]
        assert model_config(ours) == model_config(theirs)
        assert json.loads(ours.read("metadata.json")).keys() == json.loads(theirs.read("metadata.json")).keys()
        (tmp_path / "inner.weights.h5").write_bytes(ours.read("model.weights.h5"))
        (tmp_path / "theirs_inner.weights.h5").write_bytes(theirs.read("model.weights.h5"))
    assert h5_layout(tmp_path / "inner.weights.h5") == h5_layout(tmp_path / "theirs_inner.weights.h5")

    def exact(tensors) -> list[str]:
        return [k for k, v in checkpoint.tensors.items() if not np.array_equal(tensors[k], v)]

    for name in ("theirs.weights.h5", "theirs.keras"):
        read = weights_convert.read(tmp_path / name)
        assert read.config == config and exact(read.tensors) == [], name
    loaded = impl_keras.AttentionUNet(config.in_channels, config.out_channels, config.channels)
    loaded.load_weights(tmp_path / "ours.weights.h5")
    assert exact(to_checkpoint(loaded).tensors) == []
    restored = keras.saving.load_model(tmp_path / "ours.keras", safe_mode=True)
    assert type(restored) is impl_keras.AttentionUNet
    assert exact(to_checkpoint(restored).tensors) == []
    assert exact(to_checkpoint(impl_keras.load(tmp_path / "ours.keras")).tensors) == []


@pytest.mark.parametrize("chunk_size", [None, 64])
def test_msgpack_bytes_are_flax_serialization_bytes(tmp_path, monkeypatch, chunk_size):
    """Our .msgpack is byte for byte ``flax.serialization.msgpack_serialize`` of the NNX pure dict
    (with small ``MAX_CHUNK_SIZE``: Flax's chunked arrays too), and Flax restores it exactly."""
    serialization = pytest.importorskip("flax.serialization")
    if chunk_size is not None:
        monkeypatch.setattr(serialization, "MAX_CHUNK_SIZE", chunk_size)
        monkeypatch.setattr(flax_msgpack_format, "MAX_CHUNK_SIZE", chunk_size)
    checkpoint = random_checkpoint(TINY, seed=12)
    state = nest({p: np.require(v, requirements="C") for p, v in to_nnx(checkpoint).items()})
    path = tmp_path / "model.msgpack"
    weights_convert.write(checkpoint, path)
    data = path.read_bytes()
    assert data == serialization.msgpack_serialize(state)
    restored = serialization.msgpack_restore(data)
    flat, expected = _leaves(restored), _leaves(state)
    assert flat.keys() == expected.keys()
    assert all(flat[k].dtype == v.dtype and np.array_equal(flat[k], v) for k, v in expected.items())
    back = weights_convert.read(path)
    assert all(np.array_equal(back.tensors[k], v) for k, v in checkpoint.tensors.items())


def _leaves(tree, prefix=()) -> dict:
    if not isinstance(tree, dict):
        return {prefix: np.asarray(tree)}
    return {k: v for key, value in tree.items() for k, v in _leaves(value, (*prefix, key)).items()}


def test_mixed_float_dtypes_are_written_exactly(tmp_path):
    """One float16 tensor among float64 keeps its dtype through every framework-free format; the
    .keras config names the dtype that holds both (float64)."""
    checkpoint = random_checkpoint(TINY, seed=13, dtype="float64")
    mixed = dict(checkpoint.tensors)
    mixed["e1.conv.conv.0.bias"] = mixed["e1.conv.conv.0.bias"].astype(np.float16)
    checkpoint = weights_convert.Checkpoint.from_tensors(mixed, TINY)
    for suffix in (".weights.h5", ".keras", ".msgpack"):
        path = tmp_path / f"mixed{suffix}"
        weights_convert.write(checkpoint, path)
        back = weights_convert.read(path)
        for name, value in checkpoint.tensors.items():
            assert back.tensors[name].dtype == value.dtype and np.array_equal(back.tensors[name], value), name
    with zipfile.ZipFile(tmp_path / "mixed.keras") as archive:
        policy = json.loads(archive.read("config.json"))["config"]["dtype"]["config"]["name"]
    assert policy == "float64" == keras_archive_format.policy_dtype(checkpoint)
