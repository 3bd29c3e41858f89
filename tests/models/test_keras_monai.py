"""impl_keras.MonaiAttentionUNet against MONAI's own ``monai.networks.nets.AttentionUnet`` (MONAI
1.6.1, the oracle: the project's code never imports it), float64, and its Keras files.

MONAI's network is built and randomised here (random BatchNorm statistics and affines, random PReLU
slopes), its ``state_dict`` becomes the canonical checkpoint as it is, and every Keras backend runs
the same cases in one subprocess per backend (``python -m tests.models.test_keras_monai JOB_DIR``,
``keras_results``): every named block in eval mode, a train-mode forward (dropout 0) with the
running statistics after it, a checkpoint with one perturbed parameter, and the transposed
convolution alone against torch's. The files (``.weights.h5``, ``.keras``) are tested in this
process, under its own backend.
"""

from __future__ import annotations

import copy
import functools
import json
import sys
import tempfile
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import keras
import numpy as np
import pytest

import impl_keras
import weights_convert
from impl_keras.io import keras_variables, to_checkpoint
from tests.conftest import rel_error
from tests.install.test_formats_base_install import h5_layout, model_config
from weights_convert.core.checkpoint import Checkpoint
from weights_convert.core.frameworks import KERAS_BACKENDS
from weights_convert.core.monai_spec import ASSUMED, MonaiConfig
from weights_convert.processes import environment, load_arrays, run_module

# The contract's float64 bound (docs/architecture.md section 4), relative to max |expected|.
FLOAT64 = 1e-10
BATCH = 2
# name -> (config, input sides): 2D, a 3D volume with a stride of 1 and 5x5x5 kernels, and 1x1
# transposed convolutions (k < s: the full output is shorter than torch's) with a kernel of two sides.
CASES = {
    "2d": (MonaiConfig(2, 3, (4, 8, 16), strides=(2, 2)), (8, 12)),
    "3d": (MonaiConfig(2, 3, (4, 8, 16, 32), spatial_dims=3, strides=(2, 1, 2), kernel_size=5), (4, 8, 12)),
    "up1": (MonaiConfig(2, 3, (4, 8, 16), strides=(2, 2), kernel_size=(3, 5), up_kernel_size=1), (8, 12)),
}
TRAIN_CASE = "2d"
# A parameter changed by 1e-3 of its value, which the float64 comparison must catch.
PERTURBED = ("model.1.submodule.1.merge.adn.A.weight", 1e-3)
# (kernel side, stride) of the transposed convolution alone: k > s, k = s, k < s, stride 1.
TRANSPOSED = [(3, 2), (3, 1), (5, 2), (1, 2), (3, 3)]
TRANSPOSED_SHAPE = (BATCH, 3, 5, 7)  # odd sides
TRANSPOSED_OUT = 2


def inputs(case: str) -> np.ndarray:
    config, sides = CASES[case]
    return np.random.default_rng(len(case)).normal(size=(BATCH, config.in_channels, *sides))


# ----------------------------------------------------------------------------------------------
# MONAI, the oracle


@functools.cache
def monai_network(case: str):
    """MONAI's AttentionUnet of ``case``, float64, eval mode, every tensor random (one per case:
    ``monai_blocks`` runs a copy, as a train-mode forward changes the running statistics)."""
    import torch
    from monai.networks.nets import AttentionUnet

    config, _ = CASES[case]
    torch.manual_seed(0)
    net = AttentionUnet(
        config.spatial_dims,
        config.in_channels,
        config.out_channels,
        config.channels,
        config.strides,
        config.kernel_size,
        config.up_kernel_size,
        config.dropout,
    ).double()
    generator = torch.Generator().manual_seed(1)

    def uniform(tensor, low, high):
        tensor.copy_(low + (high - low) * torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype))

    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                uniform(module.weight, 0.5, 1.5)
                uniform(module.bias, -0.2, 0.2)
                uniform(module.running_mean, -0.2, 0.2)
                uniform(module.running_var, 0.5, 1.5)
                module.num_batches_tracked.fill_(3)
            elif isinstance(module, torch.nn.PReLU):
                uniform(module.weight, 0.05, 0.45)
    return net.eval()


def monai_checkpoint(case: str) -> Checkpoint:
    """MONAI's state_dict as it is: its keys are the canonical names."""
    net = monai_network(case)
    return Checkpoint.from_tensors({k: v.numpy() for k, v in net.state_dict().items()}, CASES[case][0])


def monai_blocks(case: str, train: bool = False) -> dict[str, np.ndarray]:
    """The named block outputs of MONAI's network (NCHW / NCDHW), read by forward hooks on the
    modules ``config.block_names`` stand for; after a train-mode forward also ``state/<name>``,
    every running statistic."""
    import torch

    net = copy.deepcopy(monai_network(case)).train(train)
    modules = {"e1": net.model[0], "output": net.model[2]}
    levels, layer = [], net.model[1]
    while True:
        levels.append(layer)
        if not isinstance(layer.submodule, torch.nn.Sequential):
            break
        layer = layer.submodule[1]
    depth = len(levels)
    for level, layer in enumerate(levels):
        down = layer.submodule[0] if isinstance(layer.submodule, torch.nn.Sequential) else layer.submodule
        modules["b1" if level == depth - 1 else f"e{level + 2}"] = down
        j = depth - level
        modules.update({f"d{j}.up": layer.upconv, f"d{j}.ag": layer.attention.psi, f"d{j}": layer.merge})
    named = {}
    for name, module in modules.items():
        module.register_forward_hook(lambda _, __, out, name=name: named.__setitem__(name, out.detach().numpy()))
    with torch.no_grad():
        net(torch.from_numpy(inputs(case)))
    results = {name: named[name] for name in CASES[case][0].block_names}
    if train:
        buffers = ("running_mean", "running_var", "num_batches_tracked")
        results.update({f"state/{k}": v.numpy() for k, v in net.state_dict().items() if k.endswith(buffers)})
    return results


def transposed_case(k: int, s: int) -> dict[str, np.ndarray]:
    """Input, torch-layout weight (in, out, k, k) and bias of one transposed convolution, and torch's
    ``conv_transpose2d(padding=(k - 1) / 2, output_padding=s - 1)`` of them."""
    import torch

    rng = np.random.default_rng(10 * k + s)
    arrays = {
        "x": rng.normal(size=TRANSPOSED_SHAPE),
        "weight": rng.normal(size=(TRANSPOSED_SHAPE[1], TRANSPOSED_OUT, k, k)),
        "bias": rng.normal(size=TRANSPOSED_OUT),
    }
    torch_arrays = {name: torch.from_numpy(value) for name, value in arrays.items()}
    expected = torch.nn.functional.conv_transpose2d(
        torch_arrays["x"], torch_arrays["weight"], torch_arrays["bias"], s, (k - 1) // 2, s - 1
    )
    return {**arrays, "expected": expected.numpy()}


# ----------------------------------------------------------------------------------------------
# Keras, one subprocess per backend


def keras_results(job_dir: Path) -> dict[str, np.ndarray]:
    """Every case under this process's backend: ``<case>/<block>`` (eval), ``train/<block or
    state/...>``, ``perturbed/<block>``, ``transposed/<k>x<s>/<data format>`` (channels first)."""
    from impl_keras import runner
    from impl_keras.layers import ConvTranspose, default_data_format

    arrays = load_arrays(job_dir / "inputs.npz")
    results = {}

    def forward(name: str, case: str, train: bool = False):
        checkpoint = weights_convert.read(job_dir / f"{name}.safetensors")
        named = runner.forward(checkpoint, arrays[f"{case}/x"], dtype="float64", train=train)
        results.update({f"{name}/{key}": value for key, value in named.items()})

    for case in CASES:
        forward(case, case)
    forward("train", TRAIN_CASE, train=True)
    forward("perturbed", TRAIN_CASE)
    for k, s in TRANSPOSED:
        prefix = f"transposed/{k}x{s}"
        for data_format in sorted({default_data_format(), "channels_last"}):
            layer = ConvTranspose(TRANSPOSED_OUT, (k, k), s, data_format, dtype="float64")
            x = arrays[f"{prefix}/x"]
            x = x if data_format == "channels_first" else np.moveaxis(x, 1, -1)
            layer.build(x.shape)
            layer.kernel.assign(arrays[f"{prefix}/weight"].transpose(2, 3, 1, 0))  # (k, k, out, in)
            layer.bias.assign(arrays[f"{prefix}/bias"])
            y = keras.ops.convert_to_numpy(layer(keras.ops.convert_to_tensor(x)))
            results[f"{prefix}/{data_format}"] = y if data_format == "channels_first" else np.moveaxis(y, -1, 1)
    return results


def backend_results(backend: str) -> dict[str, np.ndarray]:
    """``keras_results`` under ``backend`` (raising its subprocess's failure, if it failed)."""
    results = all_backend_results()[backend]
    if isinstance(results, Exception):
        raise results
    return results


@functools.cache
def all_backend_results() -> dict[str, dict[str, np.ndarray] | Exception]:
    """``keras_results`` under every backend: one subprocess each (JAX with x64, as float64 needs),
    all three at once, since each spends most of its time starting up or compiling alone."""
    checkpoints = {case: monai_checkpoint(case) for case in CASES}
    checkpoints["train"] = checkpoints[TRAIN_CASE]
    name, factor = PERTURBED
    tensors = dict(checkpoints[TRAIN_CASE].tensors)
    tensors[name] = tensors[name] * (1 + factor)
    checkpoints["perturbed"] = Checkpoint.from_tensors(tensors, CASES[TRAIN_CASE][0])
    arrays = {f"{case}/x": inputs(case) for case in CASES}
    for k, s in TRANSPOSED:
        case = transposed_case(k, s)
        arrays.update({f"transposed/{k}x{s}/{key}": case[key] for key in ("x", "weight", "bias")})
    with tempfile.TemporaryDirectory(prefix="keras-monai-") as tmp, ThreadPoolExecutor(len(KERAS_BACKENDS)) as pool:
        job_dir = Path(tmp)
        for name, checkpoint in checkpoints.items():
            weights_convert.write(checkpoint, job_dir / f"{name}.safetensors")
        np.savez(job_dir / "inputs.npz", **arrays)
        runs = {backend: pool.submit(run_backend, job_dir, backend) for backend in KERAS_BACKENDS}
        return {backend: run.exception() or run.result() for backend, run in runs.items()}


def run_backend(job_dir: Path, backend: str) -> dict[str, np.ndarray]:
    """``python -m tests.models.test_keras_monai JOB_DIR`` under ``backend``, and its results."""
    env = environment(KERAS_BACKEND=backend, JAX_ENABLE_X64="1")
    run_module(__name__, job_dir, env=env, what=f"MONAI's model in Keras under {backend}")
    return load_arrays(job_dir / f"results_{backend}.npz")


def main(argv: list[str]) -> int:
    """The subprocess: ``keras_results`` of the job directory ``argv[0]`` to its
    ``results_<backend>.npz``."""
    job_dir = Path(argv[0])
    np.savez(job_dir / f"results_{keras.backend.backend()}.npz", **keras_results(job_dir))
    return 0


def assert_blocks_match(results: dict, prefix: str, expected: dict, label: str) -> None:
    """Every expected array, in order, within the float64 bound; a failure names the first block off."""
    for name, value in expected.items():
        actual = results[f"{prefix}/{name}"]
        if name.endswith("num_batches_tracked"):
            assert np.array_equal(actual, value), f"{label}: {name}"
            continue
        error = rel_error(actual, value)
        assert error <= FLOAT64, f"{label}: {name} differs from MONAI's by {error:.2e}"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", KERAS_BACKENDS)
def test_eval_matches_monai(backend, case):
    """Every named block in eval mode, MONAI's own network's to 1e-10."""
    assert_blocks_match(backend_results(backend), case, monai_blocks(case), f"{backend} {case}")


@pytest.mark.parametrize("backend", KERAS_BACKENDS)
def test_train_mode_and_running_statistics_match_monai(backend):
    """A train-mode forward (batch statistics; dropout 0) and every running statistic after it."""
    expected = monai_blocks(TRAIN_CASE, train=True)
    assert any(key.startswith("state/") for key in expected)
    assert_blocks_match(backend_results(backend), "train", expected, f"{backend} train")


@pytest.mark.parametrize("backend", KERAS_BACKENDS)
def test_a_perturbed_parameter_fails_the_comparison(backend):
    error = rel_error(backend_results(backend)["perturbed/output"], monai_blocks(TRAIN_CASE)["output"])
    assert error > 1e3 * FLOAT64, f"{PERTURBED[0]} changed by {PERTURBED[1]}: only {error:.2e} off"


@pytest.mark.parametrize("backend", KERAS_BACKENDS)
def test_block_shapes(backend):
    """Skips and down blocks at each level's sides (strides 1 included), the transposed
    convolutions back at the level's sides, the gate one channel, logits at the input's."""
    results = backend_results(backend)
    for case, (config, sides) in CASES.items():
        c, depth = config.channels, config.depth
        level_sides = [np.array(sides)]
        for stride in config.strides:
            level_sides.append(level_sides[-1] // stride)
        expected = {"e1": (c[0], level_sides[0]), "output": (config.out_channels, level_sides[0])}
        for level in range(depth):
            expected["b1" if level == depth - 1 else f"e{level + 2}"] = (c[level + 1], level_sides[level + 1])
            j = depth - level
            expected.update({f"d{j}.up": (c[level], level_sides[level]), f"d{j}.ag": (1, level_sides[level])})
            expected[f"d{j}"] = (c[level], level_sides[level])
        assert set(expected) == set(config.block_names)
        for name, (channels, at) in expected.items():
            assert results[f"{case}/{name}"].shape == (BATCH, channels, *at), f"{backend} {case} {name}"


@pytest.mark.parametrize(("k", "s"), TRANSPOSED)
@pytest.mark.parametrize("backend", KERAS_BACKENDS)
def test_transposed_convolution_is_torchs(backend, k, s):
    """``ConvTranspose`` alone, in each layout the backend computes in, against torch's
    ``conv_transpose2d(padding=(k - 1) / 2, output_padding=s - 1)`` on odd sides."""
    expected = transposed_case(k, s)["expected"]
    results = backend_results(backend)
    outputs = {key: value for key, value in results.items() if key.startswith(f"transposed/{k}x{s}/")}
    assert outputs
    for key, value in outputs.items():
        assert value.shape == (BATCH, TRANSPOSED_OUT, 5 * s, 7 * s), key
        assert rel_error(value, expected) <= FLOAT64, key


# ----------------------------------------------------------------------------------------------
# In this process: the model as a Keras model, and its files


def test_input_of_a_side_that_is_no_multiple_is_refused_in_one_line():
    config, _ = CASES["3d"]  # strides (2, 1, 2): sides must be multiples of 4
    model = impl_keras.MonaiAttentionUNet(**config.to_dict())
    with pytest.raises(ValueError, match="^expected input of shape .* multiples of 4") as info:
        model(np.zeros((1, 4, 8, 10, 2), "float32"))
    assert "\n" not in str(info.value)


def test_keras_rebuilds_the_model_from_its_config_and_dropout_keeps_no_checkpoint_tensor():
    """``get_config`` -> ``keras.saving`` gives the same model class and config (and a block its
    own class); with dropout the Dropouts' random state is the one variable outside the canonical
    tree, and dropout acts in training only."""
    config = MonaiConfig(2, 3, (4, 8, 16), strides=(2, 1), dropout=0.5)
    model = impl_keras.MonaiAttentionUNet(**config.to_dict())
    rebuilt = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(model))
    assert type(rebuilt) is impl_keras.MonaiAttentionUNet and rebuilt.config == config
    # MONAI's ConvBlock and the article's, each under its own registered name.
    head = model.model.layers[0]
    assert type(keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(head))) is type(head)
    assert keras.saving.get_registered_object("attention_unet>ConvBlock") is impl_keras.model.ConvBlock
    mapped = {id(v) for v in keras_variables(model).values()}
    assert {v.name for v in model.variables if id(v) not in mapped} == {"seed_generator_state"}
    x = np.random.default_rng(0).normal(size=(2, 4, 6, 2)).astype("float32")
    evaluated = keras.ops.convert_to_numpy(model(x))
    assert np.array_equal(evaluated, keras.ops.convert_to_numpy(model(x)))
    assert not np.allclose(keras.ops.convert_to_numpy(model(x, training=True)), evaluated)


def exact(tensors: dict, checkpoint: Checkpoint) -> list[str]:
    """The names whose tensor differs from ``checkpoint``'s in value or dtype."""
    return [
        k for k, v in checkpoint.tensors.items() if not (np.array_equal(tensors[k], v) and tensors[k].dtype == v.dtype)
    ]


def test_weights_files_round_trip_bit_exact(tmp_path):
    """A MONAI checkpoint through ``.weights.h5`` and ``.keras``: every tensor bit for bit. The
    ``.keras`` keeps the config (strides and dropout included); a ``.weights.h5`` has it inferred,
    strides and dropout assumed and said so, and ``config=`` gives the real one."""
    config = MonaiConfig(2, 3, (4, 8, 16, 32), spatial_dims=3, strides=(2, 1, 2), kernel_size=5, dropout=0.1)
    checkpoint = Checkpoint.from_tensors(monai_checkpoint("3d").tensors, config)
    h5, archive = tmp_path / "monai.weights.h5", tmp_path / "monai.keras"
    weights_convert.write(checkpoint, h5)
    weights_convert.write(checkpoint, archive)
    from_archive = weights_convert.read(archive)
    assert from_archive.config == config and from_archive.assumed == {}
    assert exact(from_archive.tensors, checkpoint) == []
    inferred = weights_convert.read(h5)
    assert inferred.config == MonaiConfig(2, 3, (4, 8, 16, 32), spatial_dims=3, kernel_size=5)
    assert inferred.assumed == ASSUMED and exact(inferred.tensors, checkpoint) == []
    assert weights_convert.read(h5, config=config).config == config
    with pytest.warns(UserWarning, match="strides 2 at each level, dropout 0.0 assumed"):
        impl_keras.load(h5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert impl_keras.load(h5, config=config).config == config


def test_keras_own_files_match_ours_and_read_back(tmp_path):
    """``save_weights`` and ``save`` of the Keras model: the HDF5 tree and ``config.json`` of
    ``weights_convert.write``'s, each read back by the other side exactly; the ``.weights.h5``
    with the config inferred from its shapes."""
    config = CASES["2d"][0]  # strides 2 and no dropout: what an inferred config assumes
    checkpoint = monai_checkpoint("2d").astype("float32")
    model = impl_keras.from_checkpoint(checkpoint)
    model.save_weights(tmp_path / "theirs.weights.h5")
    model.save(tmp_path / "theirs.keras")
    weights_convert.write(checkpoint, tmp_path / "ours.weights.h5")
    weights_convert.write(checkpoint, tmp_path / "ours.keras")
    assert h5_layout(tmp_path / "ours.weights.h5") == h5_layout(tmp_path / "theirs.weights.h5")
    with zipfile.ZipFile(tmp_path / "ours.keras") as ours, zipfile.ZipFile(tmp_path / "theirs.keras") as theirs:
        assert model_config(ours) == model_config(theirs)
        assert json.loads(ours.read("config.json"))["class_name"] == "MonaiAttentionUNet"
    for name in ("theirs.weights.h5", "theirs.keras"):
        read = weights_convert.read(tmp_path / name)
        assert read.config == config and exact(read.tensors, checkpoint) == [], name
    loaded = impl_keras.MonaiAttentionUNet(**config.to_dict())
    loaded.load_weights(tmp_path / "ours.weights.h5")
    assert exact(to_checkpoint(loaded).tensors, checkpoint) == []
    restored = keras.saving.load_model(tmp_path / "ours.keras", safe_mode=True)
    assert type(restored) is impl_keras.MonaiAttentionUNet and restored.config == config
    assert exact(to_checkpoint(restored).tensors, checkpoint) == []


def test_training_archive_keeps_the_optimizer_state(tmp_path):
    """A compiled MONAI model after an Adam step, saved by Keras: ``weights_convert`` reads every
    slot under its own name (Keras' ``trainable_variables`` order is MONAI's state_dict order), and
    ``load_training`` restores them."""
    from impl_keras.training import load_training, make_optimizer, optimizer_state

    config = CASES["up1"][0]
    model = impl_keras.from_checkpoint(monai_checkpoint("up1").astype("float32"))
    optimizer = make_optimizer("adam")
    rng = np.random.default_rng(0)
    gradients = [rng.normal(size=v.shape).astype("float32") for v in model.trainable_variables]
    optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
    model.compile(optimizer=optimizer, loss="mean_squared_error")
    model.save(tmp_path / "trained.keras")
    state = optimizer_state(model, optimizer)
    read = weights_convert.read(tmp_path / "trained.keras")
    assert read.config == config and read.optimizer.step == 1
    restored = optimizer_state(*load_training(tmp_path / "trained.keras"))
    for slot, tensors in state.slots.items():
        for name, value in tensors.items():
            assert np.array_equal(read.optimizer.slots[slot][name], value), f"{slot} {name}"
            assert np.array_equal(restored.slots[slot][name], value), f"{slot} {name}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
