"""impl_keras under this process's backend (TensorFlow unless KERAS_BACKEND says otherwise), what
only Keras has: its upsampling against Keras' own, its BatchNorm, its behaviour as a Keras model
(summary, eval/train, fit), TorchAdam, and its files (.weights.h5, .keras). What the three models
keep alike is in ``test_model_contract.py``."""

import functools
import io
import json
import os
import subprocess
import sys
import zipfile
from contextlib import redirect_stdout

import keras
import numpy as np
import pytest
import torch

import impl_keras
import weights_convert
from impl_keras import TorchAdam
from impl_keras.io import check_dtype, keras_variables, to_checkpoint
from impl_keras.layers import BatchNorm, Upsample2x
from tests.conftest import REPO
from weights_convert.core.checkpoint import CheckpointError
from weights_convert.core.optim import OPTIMIZERS
from weights_convert.core.random_init import random_checkpoint
from weights_convert.core.spec import ModelConfig
from weights_convert.harness import reference
from weights_convert.harness.keras_worker import BACKENDS, Call, run_batch_in_backend
from weights_convert.harness.parity import compare
from weights_convert.harness.parity.tolerances import TOLERANCES

SMALL = ModelConfig(2, 3, (4, 8, 16))
SMALL_3D = ModelConfig(2, 3, (4, 8, 16), spatial_dims=3)
# By spatial_dims: the tiny model and an odd input size (floors in the pools, pads in the decoder).
CONFIGS = {2: SMALL, 3: SMALL_3D}
SIZES = {2: (12, 10), 3: (9, 12, 11)}
DIMS = sorted(CONFIGS)


def numpy(x) -> np.ndarray:
    return keras.ops.convert_to_numpy(x)


def test_keras_upsampling_is_a_different_function():
    """Why Upsample2x exists: Keras' bilinear UpSampling2D samples at half-pixel centres."""
    x = np.random.default_rng(0).normal(size=(1, 5, 8, 3))
    ours = numpy(Upsample2x(dtype="float64")(x))
    theirs = numpy(keras.layers.UpSampling2D(interpolation="bilinear", dtype="float64")(x))
    assert np.max(np.abs(ours - theirs)) > 1e-2


def test_default_model_parameter_count_and_summary():
    model = impl_keras.AttentionUNet()
    assert isinstance(model, keras.Model) and model.built
    assert sum(int(np.prod(v.shape)) for v in model.trainable_variables) == 8_135_745
    out = io.StringIO()
    with redirect_stdout(out):
        model.summary()
    assert "Trainable params: 8,135,745" in out.getvalue()


@pytest.mark.parametrize("dims", DIMS)
def test_layer_paths_are_the_canonical_tree(dims):
    model = impl_keras.AttentionUNet(channels=(4, 8, 16), spatial_dims=dims)
    paths = {v.path.split("/", 1)[1] for v in model.variables}
    assert "e1/conv/conv/0/kernel" in paths and "d1/ag/Wg/1/moving_variance" in paths
    assert "d2/ag/output/0/bias" in paths and "output/kernel" in paths and "b1/conv/4/num_batches_tracked" in paths
    assert len(keras_variables(model)) == len(model.variables)


@pytest.mark.parametrize("dims", DIMS)
def test_float64_model(dims):
    model = impl_keras.AttentionUNet(channels=(4, 8, 16), spatial_dims=dims, dtype="float64")
    assert {v.dtype for v in model.variables} == {"float64", keras.backend.standardize_dtype("int")}
    out = model(np.zeros((1, *(8,) * dims, 3)))
    assert keras.backend.standardize_dtype(out.dtype) == "float64" and tuple(out.shape) == (1, *(8,) * dims, 1)


@pytest.mark.parametrize("dims", DIMS)
def test_eval_uses_running_statistics_and_train_updates_them(dims):
    checkpoint = random_checkpoint(CONFIGS[dims], seed=4)
    model = impl_keras.from_checkpoint(checkpoint)
    x = np.random.default_rng(0).uniform(size=(2, *SIZES[dims], 2)).astype("float32")
    first = numpy(model(x, training=False))
    assert np.array_equal(first, numpy(model(x)))  # the default is inference
    unchanged = to_checkpoint(model).tensors
    assert all(np.array_equal(unchanged[k], v) for k, v in checkpoint.tensors.items())
    train = numpy(model(x, training=True))
    assert np.max(np.abs(train - first)) > 1e-3  # batch statistics differ from the running ones
    after = to_checkpoint(model).tensors
    assert after["e1.conv.conv.1.num_batches_tracked"] == checkpoint.tensors["e1.conv.conv.1.num_batches_tracked"] + 1
    assert not np.allclose(after["d2.c1.conv.4.running_var"], checkpoint.tensors["d2.c1.conv.4.running_var"])


def test_fit_trains_in_training_mode(tmp_path):
    model = impl_keras.AttentionUNet(1, 1, (4, 8))
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(8, 8, 8, 1)).astype("float32")
    y = (x > 0.5).astype("float32")
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss=keras.losses.BinaryCrossentropy(from_logits=True))
    before = to_checkpoint(model).tensors
    history = model.fit(x, y, batch_size=4, epochs=2, verbose=0)
    after = to_checkpoint(model).tensors
    assert np.isfinite(history.history["loss"]).all()
    assert after["e1.conv.conv.1.num_batches_tracked"] == 4  # 2 epochs x 2 batches, BatchNorm in training mode
    assert not np.array_equal(after["e1.conv.conv.0.weight"], before["e1.conv.conv.0.weight"])
    assert not np.array_equal(after["b1.conv.1.running_mean"], before["b1.conv.1.running_mean"])
    # save_weights of a trained model also holds the optimizer's state, which the reader skips.
    path = tmp_path / "trained.weights.h5"
    model.save_weights(path)
    read = weights_convert.read(path)
    assert all(np.array_equal(read.tensors[k], v) for k, v in after.items())


@pytest.mark.parametrize(
    ("dims", "shape"), [(3, (2, 12, 11, 2)), (3, (2, 9, 12, 11, 3)), (3, (2, 9, 3, 11, 2)), (2, (2, 9, 12, 11, 2))]
)
def test_input_of_another_rank_or_size_is_refused_in_one_line(dims, shape):
    model = impl_keras.AttentionUNet(**CONFIGS[dims].to_dict())
    with pytest.raises(ValueError, match="^expected input of shape") as info:
        model(np.zeros(shape, "float32"))
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------
# 3D against the PyTorch model, on every backend

X_3D = np.random.default_rng(1).normal(size=(2, SMALL_3D.in_channels, *SIZES[3]))  # NCDHW
TARGET_3D = np.random.default_rng(2).normal(size=(2, SMALL_3D.out_channels, *SIZES[3]))
CHECKPOINT_3D = random_checkpoint(SMALL_3D, seed=7, dtype="float64")
# name -> (function, kwargs) of both runners: named block outputs in eval and in train mode (with
# the running statistics after it), and the gradients and update of one SGD step.
RUNS_3D = {
    "eval": ("forward", {"train": False}),
    "train": ("forward", {"train": True}),
    "step": ("train_step", {"optimizer": "sgd"}),
}


def runner_call(function, kwargs) -> Call:
    return Call(function, CHECKPOINT_3D, X_3D, TARGET_3D if function == "train_step" else None, kwargs)


@functools.lru_cache(maxsize=1)
def torch_runs_3d() -> dict:
    from impl_torch import runner

    runs = {}
    for name, (function, kwargs) in RUNS_3D.items():
        call = runner_call(function, {**kwargs, "dtype": "float64"})
        targets = () if call.target is None else (call.target,)
        runs[name] = getattr(runner, function)(call.checkpoint, call.x, *targets, **call.kwargs)
    return runs


@pytest.mark.parametrize("backend", BACKENDS)
def test_3d_float64_matches_torch_on_every_backend(backend):
    """Block outputs (eval and train), running statistics, gradients and one SGD step of the 3D model
    at an odd volume, float64, under each backend in one batch (a subprocess unless it is this
    process's): the PyTorch model's to 1e-10."""
    calls = [runner_call(function, {**kwargs, "dtype": "float64"}) for function, kwargs in RUNS_3D.values()]
    results = dict(zip(RUNS_3D, run_batch_in_backend(backend, calls), strict=True))
    for run, expected in torch_runs_3d().items():
        assert set(results[run]) == set(expected), run
        # As the parity command judges: the gradient is one vector, scaled by its largest entry
        # (a conv bias before a BatchNorm has a gradient of rounding noise only).
        for group, quantities in compare.by_group(expected).items():
            scale = compare.group_scale(group, quantities)
            rows = compare.compare(results[run], quantities, "float64", scale=scale)
            compare.assert_rows_pass(rows, f"{backend} {run} {group}")


def test_3d_mixed_bfloat16_model():
    """float32 variables, bfloat16 blocks in 3D, as in 2D; a training-mode call counts its batch."""
    checkpoint = random_checkpoint(SMALL_3D, seed=8)
    model = impl_keras.from_checkpoint(checkpoint, "mixed_bfloat16")
    assert {v.dtype for v in model.variables} == {"float32", keras.backend.standardize_dtype("int")}
    x = np.random.default_rng(0).uniform(size=(2, *SIZES[3], 2)).astype("float32")
    out, named = model(x, training=True, return_intermediates=True)
    assert all(keras.backend.standardize_dtype(v.dtype) == "bfloat16" for v in named.values())
    assert tuple(out.shape) == (2, *SIZES[3], SMALL_3D.out_channels)
    counter = "e1.conv.conv.1.num_batches_tracked"
    assert to_checkpoint(model).tensors[counter] == checkpoint.tensors[counter] + 1


# ----------------------------------------------------------------------------------------------
# Mixed precision and PyTorch's Adam


def test_mixed_bfloat16_model(reference_dir):
    """float32 variables, bfloat16 computation; load / from_checkpoint / to_checkpoint in float32."""
    model = impl_keras.load(reference_dir / "article_state_dict.pt", dtype="mixed_bfloat16")
    assert model.dtype_policy.name == "mixed_bfloat16" and check_dtype(model.dtype_policy) == "mixed_bfloat16"
    assert {v.dtype for v in model.variables} == {"float32", keras.backend.standardize_dtype("int")}
    x = np.load(reference_dir / "input_nchw.npy").transpose(0, 2, 3, 1)
    out, named = model(x.astype("float32"), return_intermediates=True)
    assert all(keras.backend.standardize_dtype(v.dtype) == "bfloat16" for v in named.values())
    expected = np.load(reference_dir / "output_eval_float64.npy").transpose(0, 2, 3, 1)
    error = np.max(np.abs(numpy(keras.ops.cast(out, "float32")) - expected)) / np.max(np.abs(expected))
    print(f"article model, mixed_bfloat16 against float64: {error:.2e}")
    assert 1e-4 < error < 1e-1  # bfloat16 (8 bits, ~4e-3 per rounding): orders of magnitude only
    before = to_checkpoint(model).tensors
    model(x.astype("float32"), training=True)
    tensors = to_checkpoint(model).tensors
    assert {str(v.dtype) for v in tensors.values()} == {"float32", "int64"}
    counter = "e1.conv.conv.1.num_batches_tracked"
    assert tensors[counter] == before[counter] + 1


def test_mixed_batch_norm_statistics_are_float32():
    """bfloat16 in, float32 statistics and running averages, bfloat16 out (as keras.layers.BatchNormalization)."""
    layer = BatchNorm(dtype="mixed_bfloat16")
    rng = np.random.default_rng(0)
    # Mean ~100 with spread 1: a bfloat16 mean (spacing 0.5 there) would be off by up to 0.25.
    x = (100 + rng.normal(size=(4, 6, 5, 3))).astype("float32")
    y = layer(x, training=True)
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    assert layer.moving_mean.dtype == layer.gamma.dtype == "float32"
    rounded = numpy(keras.ops.cast(keras.ops.cast(x, "bfloat16"), "float64")).reshape(-1, 3)
    expected_mean = 0.1 * rounded.mean(axis=0)
    expected_var = 0.9 + 0.1 * rounded.var(axis=0, ddof=1)
    np.testing.assert_allclose(numpy(layer.moving_mean), expected_mean, rtol=TOLERANCES["float32"].floor)
    np.testing.assert_allclose(numpy(layer.moving_variance), expected_var, rtol=TOLERANCES["float32"].floor)


def test_bfloat16_upsampling_samples_at_float32_positions():
    """At n = 200 bfloat16 positions would be off by up to half a pixel; float32 ones (as torch's
    kernel uses for bfloat16) leave only the rounding of the result."""
    x = np.random.default_rng(0).normal(size=(1, 200, 3, 2))
    x_bf16 = keras.ops.cast(x, "bfloat16")
    actual = numpy(keras.ops.cast(Upsample2x(dtype="mixed_bfloat16")(x_bf16), "float64"))
    rounded = numpy(keras.ops.cast(x_bf16, "float64"))
    matrix_h, matrix_w = reference.interpolation_matrix(200), reference.interpolation_matrix(3)
    expected = np.einsum("ih,nhwc,jw->nijc", matrix_h, rounded, matrix_w)
    assert np.max(np.abs(actual - expected)) <= 2.0**-8 * np.max(np.abs(expected))  # one bfloat16 rounding


def adam_trajectories(grads: list[np.ndarray], **hyper) -> dict:
    """Parameters after each step of torch.optim.Adam, TorchAdam and Keras' Adam, float64."""
    start = np.linspace(-1, 1, grads[0].size).reshape(grads[0].shape)
    param = torch.nn.Parameter(torch.from_numpy(start.copy()))
    torch_adam = torch.optim.Adam([param], lr=hyper["lr"], betas=(hyper["b1"], hyper["b2"]), eps=hyper["eps"])
    keras_args = dict(learning_rate=hyper["lr"], beta_1=np.float64(hyper["b1"]), beta_2=np.float64(hyper["b2"]))
    floatx = keras.config.floatx()
    keras.config.set_floatx("float64")  # the learning rate variable is floatx
    try:
        optimizers = {
            "torch_adam": TorchAdam(**keras_args, epsilon=hyper["eps"]),
            "keras_adam": keras.optimizers.Adam(**keras_args, epsilon=np.float64(hyper["eps"])),
        }
        variables = {name: keras.Variable(start, dtype="float64") for name in optimizers}
    finally:
        keras.config.set_floatx(floatx)
    paths = {"torch": [], "torch_adam": [], "keras_adam": []}
    for g in grads:
        param.grad = torch.from_numpy(g.copy())
        torch_adam.step()
        paths["torch"].append(param.detach().numpy().copy())
        for name, optimizer in optimizers.items():
            optimizer.apply_gradients([(keras.ops.convert_to_tensor(g), variables[name])])
            paths[name].append(numpy(variables[name]))
    return paths


def test_torch_adam_is_torchs_update_at_every_step():
    hyper = OPTIMIZERS["adam"]
    rng = np.random.default_rng(0)
    # Gradients near eps, where its placement matters, and far above it.
    grads = [rng.normal(size=(3, 4)) * scale for scale in (1e-5, 1e-4, 1e-5, 1.0, 1e-5)]
    paths = adam_trajectories(grads, **hyper)
    start = np.linspace(-1, 1, 12).reshape(3, 4)
    for t in range(len(grads)):
        torchs = paths["torch"][t]
        moved = np.max(np.abs(torchs - start))
        assert np.max(np.abs(paths["torch_adam"][t] - torchs)) <= TOLERANCES["float64"] * moved, t
        # Keras' own Adam (eps before the bias correction) is another update, far outside the bound.
        assert np.max(np.abs(paths["keras_adam"][t] - torchs)) > 1e3 * TOLERANCES["float64"] * moved, t
    # Keras' own Adam state: the same variables (iterations, learning rate, momentums, velocities).
    variable = keras.Variable(np.zeros(3, "float32"))
    ours, theirs = TorchAdam(), keras.optimizers.Adam()
    ours.build([variable])
    theirs.build([variable])
    assert [v.path.split("/", 1)[1] for v in ours.variables] == [v.path.split("/", 1)[1] for v in theirs.variables]
    assert len(ours.variables) == 4


def test_torch_adam_refuses_weight_decay():
    with pytest.raises(ValueError, match="TorchAdam takes no weight_decay"):
        TorchAdam(weight_decay=1e-4)


# ----------------------------------------------------------------------------------------------
# Files


def test_h5_reader_reads_what_save_weights_writes(tmp_path):
    """The converter's h5py reader against Keras' own writer, and Keras' reader against ours."""
    checkpoint = random_checkpoint(SMALL, seed=5)
    path = tmp_path / "keras.weights.h5"
    impl_keras.from_checkpoint(checkpoint).save_weights(path)
    read = weights_convert.read(path)
    assert read.config == SMALL
    assert all(
        np.array_equal(read.tensors[k], v) and read.tensors[k].dtype == v.dtype for k, v in checkpoint.tensors.items()
    )
    ours = tmp_path / "ours.weights.h5"
    weights_convert.write(checkpoint, ours)
    model = impl_keras.AttentionUNet(SMALL.in_channels, SMALL.out_channels, SMALL.channels)
    model.load_weights(ours)
    assert all(np.array_equal(v, checkpoint.tensors[k]) for k, v in to_checkpoint(model).tensors.items())


def test_keras_archive_loads_with_plain_load_model_in_a_fresh_process(tmp_path):
    checkpoint = random_checkpoint(SMALL, seed=6)
    path = tmp_path / "model.keras"
    model = impl_keras.from_checkpoint(checkpoint)
    impl_keras.save(model, path)
    x = np.random.default_rng(0).uniform(size=(1, 10, 12, 2)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    script = (
        "import sys, numpy as np, keras, impl_keras\n"
        "model = keras.saving.load_model(sys.argv[1])\n"
        "assert type(model) is impl_keras.AttentionUNet, type(model)\n"
        "np.save(sys.argv[3], keras.ops.convert_to_numpy(model(np.load(sys.argv[2]))))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = tmp_path / "out.npy"
    done = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "x.npy"), str(out)], env=env)
    assert done.returncode == 0
    assert np.array_equal(np.load(out), numpy(model(x)))


@pytest.mark.parametrize("writer", ["keras", "impl_keras"])
def test_3d_keras_archive_round_trips_through_load_model(tmp_path, writer):
    """A 3D ``.keras`` file, written by Keras' ``model.save`` or by ``impl_keras.save`` (the
    converter's writer), loads with plain ``keras.saving.load_model`` as the same 3D model, and
    the converter reads it back bit for bit (Keras saves a Conv3D under ``conv3d``)."""
    checkpoint = random_checkpoint(SMALL_3D, seed=9)
    model = impl_keras.from_checkpoint(checkpoint)
    path = tmp_path / "volume.keras"
    model.save(path) if writer == "keras" else impl_keras.save(model, path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is impl_keras.AttentionUNet and loaded.config == SMALL_3D
    read = weights_convert.read(path)
    assert read.config == SMALL_3D and all(np.array_equal(read.tensors[k], v) for k, v in checkpoint.tensors.items())
    assert all(np.array_equal(v, checkpoint.tensors[k]) for k, v in to_checkpoint(loaded).tensors.items())
    x = np.random.default_rng(0).uniform(size=(1, *SIZES[3], 2)).astype("float32")
    assert np.array_equal(numpy(loaded(x)), numpy(model(x)))


def one_line_error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        weights_convert.read(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_keras_archive_with_a_lambda_layer_is_refused(tmp_path):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Lambda(lambda t: t * 2)])
    path = tmp_path / "lambda.keras"
    model.save(path)
    assert "Lambda" in one_line_error(path) or "lambda" in one_line_error(path)


def test_keras_archive_with_an_unknown_class_is_refused(tmp_path):
    path = tmp_path / "unknown.keras"
    impl_keras.save(impl_keras.from_checkpoint(random_checkpoint(SMALL)), path)
    with zipfile.ZipFile(path) as z:
        files = {name: z.read(name) for name in z.namelist()}
    config = json.loads(files["config.json"])
    config["registered_name"] = config["class_name"] = "evil>Payload"
    files["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    assert "Payload" in one_line_error(path)


def test_keras_archive_of_another_model_is_refused(tmp_path):
    path = tmp_path / "dense.keras"
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save(path)
    assert "not an impl_keras.AttentionUNet" in one_line_error(path)


@pytest.mark.parametrize("suffix", [".weights.h5", ".keras"])
@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_keras_files_give_one_line_errors(tmp_path, suffix, damage):
    path = tmp_path / f"model{suffix}"
    impl_keras.save(impl_keras.from_checkpoint(random_checkpoint(SMALL)), path)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(data[:200] + bytes(len(data) - 200))
    else:
        path.write_bytes(b"")
    one_line_error(path)


def test_h5_file_of_another_model_is_refused(tmp_path):
    path = tmp_path / "dense.weights.h5"
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.save_weights(path)
    one_line_error(path)


def test_float64_under_jax_without_x64_is_refused():
    """JAX without x64 would silently compute a float64 model in float32."""
    script = "import impl_keras\nimpl_keras.AttentionUNet(channels=(4, 8), dtype='float64')\n"
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_ENABLE_X64": "0", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode != 0
    assert "ValueError: float64 is not available under the jax backend" in done.stderr
    assert "JAX_ENABLE_X64=1" in done.stderr
