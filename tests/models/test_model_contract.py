"""What the three models keep alike (ARCHITECTURE.md sections 1-3), one test per property,
parametrized over the frameworks: the article's outputs, padding to the skip, the upsampling, the
named intermediates, the input check, every argument reaching the model, bit-exact files and the
dtype refusal. What only one framework has is in ``test_<framework>_model.py`` beside this file.

Each framework is a small adapter (``TorchModel``, ``FlaxModel``, ``KerasModel``) that takes and
returns channels-first numpy (NCHW, or NCDHW for a volume), so a test states its expectation once;
the adapters import their framework only when a case of theirs runs.
"""

import contextlib
import os

import numpy as np
import pytest

from tests.conftest import rel_error
from weights_convert.core.checkpoint import CheckpointError
from weights_convert.core.random_init import random_checkpoint
from weights_convert.core.spec import ModelConfig, parameter_count
from weights_convert.harness import reference
from weights_convert.harness.parity.tolerances import TOLERANCES, tolerance

SMALL = ModelConfig(2, 3, (4, 8, 16))
# Eager JAX compiles every op for every new shape: this is the Flax file's shared input shape (NCHW).
X_SHAPE = (2, 2, 9, 11)


def nhwc(x):
    return np.moveaxis(np.asarray(x), 1, -1)


def nchw(x):
    return np.moveaxis(np.asarray(x), -1, 1)


class TorchModel:
    layout = "NCHW"

    @staticmethod
    def package():
        import impl_torch

        return impl_torch

    @staticmethod
    def layers():
        import impl_torch.layers

        return impl_torch.layers

    @staticmethod
    def scope(dtype):
        return contextlib.nullcontext()

    @staticmethod
    def build(**kwargs):
        import impl_torch

        return impl_torch.AttentionUNet(**kwargs)

    @staticmethod
    def logits(model, x, dtype="float32"):
        """The logits of NCHW numpy ``x`` in ``dtype``, as NCHW numpy."""
        import torch

        with torch.no_grad():
            return model(torch.as_tensor(np.asarray(x), dtype=getattr(torch, dtype))).numpy()

    @staticmethod
    def intermediates(model, x):
        """(logits, named block outputs) of float32 ``x``, as NCHW numpy."""
        import torch

        with torch.no_grad():
            out, named = model(torch.as_tensor(x, dtype=torch.float32), return_intermediates=True)
        return out.numpy(), {name: value.numpy() for name, value in named.items()}

    @staticmethod
    def output_shape(model, shape):
        return TorchModel.logits(model.eval(), np.zeros(shape)).shape

    @staticmethod
    def call_on_zeros(model, shape):
        """The model called on zeros of ``shape``, in its own layout and without conversion."""
        import torch

        return model(torch.zeros(shape))

    @staticmethod
    def parameter_count(model):
        return sum(p.numel() for p in model.parameters())

    @staticmethod
    def in_eval_mode(model):
        return not model.training

    @staticmethod
    def pad_to(x, sides):
        """``x`` (channels first) zero-padded to a skip of spatial ``sides``."""
        import torch

        skip = torch.zeros((*x.shape[:2], *sides))
        return TorchModel.layers().pad_to(torch.as_tensor(x), skip).numpy()


class FlaxModel:
    layout = "NHWC"

    @staticmethod
    def package():
        import impl_flax

        return impl_flax

    @staticmethod
    def layers():
        import impl_flax.layers

        return impl_flax.layers

    @staticmethod
    def scope(dtype):
        import jax

        return jax.enable_x64(dtype == "float64")

    @staticmethod
    def build(**kwargs):
        """The module tree with shapes only: random initialization compiles per shape and is slow."""
        from flax import nnx

        import impl_flax

        return nnx.eval_shape(lambda: impl_flax.AttentionUNet(**kwargs, rngs=nnx.Rngs(0)))

    @staticmethod
    def logits(model, x, dtype="float32"):
        """Jitted: eager JAX compiles every op separately, seconds per new shape."""
        import jax.numpy as jnp
        from flax import nnx

        return nchw(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(nhwc(x), dtype)))

    @staticmethod
    def intermediates(model, x):
        """Eager, at ``X_SHAPE``: the Flax file's eager tests have compiled every op for it."""
        import jax.numpy as jnp

        out, named = model(jnp.asarray(nhwc(x), jnp.float32), return_intermediates=True)
        return nchw(out), {name: nchw(value) for name, value in named.items()}

    @staticmethod
    def output_shape(model, shape):
        import jax.numpy as jnp
        from flax import nnx

        out = nnx.eval_shape(lambda m, x: m(x), model, jnp.zeros(nhwc(np.zeros(shape)).shape))
        return (out.shape[0], out.shape[-1], *out.shape[1:-1])

    @staticmethod
    def call_on_zeros(model, shape):
        import jax.numpy as jnp

        return model(jnp.zeros(shape))

    @staticmethod
    def parameter_count(model):
        from flax import nnx

        return sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))

    @staticmethod
    def in_eval_mode(model):
        from flax import nnx

        batch_norm = FlaxModel.layers().BatchNorm
        return all(bn.use_running_average for _, bn in nnx.iter_graph(model) if isinstance(bn, batch_norm))

    @staticmethod
    def pad_to(x, sides):
        import jax.numpy as jnp

        skip = jnp.zeros((x.shape[0], *sides, x.shape[1]))
        return nchw(FlaxModel.layers().pad_to(jnp.asarray(nhwc(x)), skip))


class KerasModel:
    layout = "NHWC"

    @staticmethod
    def package():
        import impl_keras

        return impl_keras

    @staticmethod
    def layers():
        import impl_keras.layers

        return impl_keras.layers

    @staticmethod
    def scope(dtype):
        return contextlib.nullcontext()

    @staticmethod
    def build(**kwargs):
        import impl_keras

        return impl_keras.AttentionUNet(**kwargs)

    @staticmethod
    def logits(model, x, dtype="float32"):
        import keras

        return nchw(keras.ops.convert_to_numpy(model(nhwc(x).astype(dtype))))

    @staticmethod
    def intermediates(model, x):
        import keras

        out, named = model(nhwc(x).astype("float32"), return_intermediates=True)
        named = {name: nchw(keras.ops.convert_to_numpy(value)) for name, value in named.items()}
        return nchw(keras.ops.convert_to_numpy(out)), named

    @staticmethod
    def output_shape(model, shape):
        return KerasModel.logits(model, np.zeros(shape)).shape

    @staticmethod
    def call_on_zeros(model, shape):
        return model(np.zeros(shape, "float32"))

    @staticmethod
    def parameter_count(model):
        return sum(int(np.prod(v.shape)) for v in model.trainable_variables)

    @staticmethod
    def in_eval_mode(model):
        return True  # a Keras model has no mode: ``training`` is an argument of each call

    @staticmethod
    def pad_to(x, sides):
        import keras

        return nchw(keras.ops.convert_to_numpy(KerasModel.layers().pad_to(nhwc(x), sides)))


FRAMEWORKS = {"torch": TorchModel, "flax": FlaxModel, "keras": KerasModel}


# The article's checkpoint (ARCHITECTURE.md section 6).


@pytest.mark.parametrize("framework", ["torch", "flax"])
def test_reproduces_article_float32(framework, reference_dir, reference_input):
    """No noisier than the article's own float32 output: both measured against its float64 output."""
    fw = FRAMEWORKS[framework]
    model = fw.package().load(reference_dir / "article_state_dict.pt")
    expected = np.load(reference_dir / "output_eval_float64.npy")
    noise = rel_error(np.load(reference_dir / "output_eval_float32.npy"), expected, floor=1.0)
    error = rel_error(fw.logits(model, reference_input), expected, floor=1.0)
    print(f"article float32: noise {noise:.2e}, this model {error:.2e}")
    assert error <= tolerance("float32", noise)


# torch is the article's own framework and sums in its order; XLA sums convolutions in another.
ARTICLE_FLOAT64_BOUND = {"torch": "reference_float64", "flax": "float64"}


@pytest.mark.parametrize("framework", ["torch", "flax"])
def test_reproduces_article_float64(framework, reference_dir, reference_input):
    fw = FRAMEWORKS[framework]
    with fw.scope("float64"):
        model = fw.package().load(reference_dir / "article_state_dict.pt", dtype="float64")
        actual = fw.logits(model, reference_input, "float64")
    assert actual.dtype == np.float64
    expected = np.load(reference_dir / "output_eval_float64.npy")
    assert rel_error(actual, expected) <= TOLERANCES[ARTICLE_FLOAT64_BOUND[framework]]


# The layers of ARCHITECTURE.md section 3.


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_odd_size_pads_before_and_after(framework):
    """A 1-pixel difference goes after; a 3-pixel one splits 1 before, 2 after."""
    padded = FRAMEWORKS[framework].pad_to(np.ones((1, 1, 2, 2), np.float32), (5, 3))
    assert padded.shape == (1, 1, 5, 3)
    assert padded[0, 0, :, :].sum(axis=1).tolist() == [0, 2, 2, 0, 0]
    assert padded[0, 0, :, :].sum(axis=0).tolist() == [2, 2, 0]


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_odd_volume_pads_every_axis_before_and_after(framework):
    """The same rule on each of a volume's three axes: depth 2 -> 5, height 2 -> 3, width 2 -> 2."""
    padded = FRAMEWORKS[framework].pad_to(np.ones((1, 1, 2, 2, 2), np.float32), (5, 3, 2))
    assert padded.shape == (1, 1, 5, 3, 2)
    assert padded[0, 0].sum(axis=(1, 2)).tolist() == [0, 4, 4, 0, 0]
    assert padded[0, 0].sum(axis=(0, 2)).tolist() == [4, 4, 0]
    assert padded[0, 0].sum(axis=(0, 1)).tolist() == [4, 4]


def upsample_float64(framework, x):
    """Flax's and Keras' upsampling (one rule, ``weights_convert.core.upsampling``) of channels-first
    float64 ``x``: bilinear for an image, trilinear for a volume."""
    if framework == "flax":
        import jax
        import jax.numpy as jnp

        with jax.enable_x64(True):
            return nchw(FlaxModel.layers().upsample2x(jnp.asarray(nhwc(x))))
    import keras

    return nchw(keras.ops.convert_to_numpy(KerasModel.layers().Upsample2x(dtype="float64")(nhwc(x))))


UPSAMPLE_CASES = [("flax", size) for size in [(1, 1), (1, 2), (2, 3), (5, 4), (7, 13), (1, 2, 3), (3, 5, 2)]]
UPSAMPLE_CASES += [("keras", size) for size in [(1, 1), (2, 3), (5, 8), (7, 4), (2, 1, 3), (4, 3, 5)]]


@pytest.mark.parametrize("framework, size", UPSAMPLE_CASES)
def test_upsample_is_bi_or_trilinear_with_aligned_corners_as_torch(framework, size):
    import torch

    x = np.random.default_rng(0).normal(size=(2, 3, *size))
    actual = upsample_float64(framework, x)
    assert actual.shape == (2, 3, *(2 * side for side in size))
    matrices = [reference.interpolation_matrix(side) for side in size]
    spatial = "dhw"[-len(size) :]
    rule = ",".join(f"{out}{axis}" for out, axis in zip("ijk", spatial, strict=False))
    rule = f"{rule},nc{spatial}->nc{'ijk'[: len(size)]}"
    expected_by_matrices = np.einsum(rule, *matrices, x)
    np.testing.assert_allclose(actual, expected_by_matrices, rtol=0, atol=1e-14)
    # Corners are copied, and torch's align_corners=True agrees.
    corners = np.ix_(*[range(2), range(3)] + [[0, -1]] * len(size))
    assert np.array_equal(actual[corners], x[corners])
    mode = "bilinear" if len(size) == 2 else "trilinear"
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(x), scale_factor=2, mode=mode, align_corners=True
    ).numpy()
    assert rel_error(actual, expected) <= TOLERANCES["float64"]
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-14)


# The network.


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_intermediates_are_named(framework):
    fw = FRAMEWORKS[framework]
    model = fw.package().from_checkpoint(random_checkpoint(SMALL, seed=3), "float32")
    x = np.random.default_rng(0).uniform(size=X_SHAPE).astype(np.float32)
    out, named = fw.intermediates(model, x)
    assert list(named) == ["e1", "e2", "b1", "d1.ag", "d1", "d2.ag", "d2", "output"] == SMALL.block_names
    assert named["e2"].shape == (2, 8, 4, 5) and named["b1"].shape == (2, 16, 2, 2)
    assert named["d1.ag"].shape == (2, 8, 4, 5) and np.array_equal(named["output"], out)


SMALL_3D = ModelConfig(2, 2, (4, 8, 16), spatial_dims=3)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_3d_float64_matches_the_reference_at_an_odd_volume(framework):
    """``load(..., dtype="float64")`` of a 3D file takes NCDHW (torch) or NDHWC (Flax, Keras) and
    agrees with the independent NumPy computation to the float64 bound, every block named."""
    fw = FRAMEWORKS[framework]
    checkpoint = random_checkpoint(SMALL_3D, seed=5, dtype="float64")
    x = np.random.default_rng(5).uniform(size=(2, 2, 9, 12, 11))
    expected = reference.forward(checkpoint.tensors, x, config=SMALL_3D)
    with fw.scope("float64"):
        model = fw.package().from_checkpoint(checkpoint, "float64")
        actual = fw.logits(model, x, "float64")
    assert actual.shape == (2, 2, 9, 12, 11) and actual.dtype == np.float64
    assert rel_error(actual, expected["output"]) <= TOLERANCES["float64"]


# Bad inputs, channels first; the channels-last frameworks get them with the channel axis moved last.
BAD_INPUTS = [
    (2, (3, 16, 16), "got a 3-D tensor of shape {shape}"),
    (2, (1, 1, 3, 16, 16), "got a 5-D tensor"),
    (2, (1, 4, 16, 16), "expected input of shape {expected} with H, W >= 4, got {shape}"),
    (2, (1, 3, 3, 16), "got {shape}"),
    (2, (1, 3, 16, 2), "got {shape}"),
    (3, (1, 3, 16, 16), "expected input of shape {expected} with D, H, W >= 4, got a 4-D tensor"),
    (3, (1, 3, 8, 3, 8), "got {shape}"),
    (3, (1, 2, 8, 8, 8), "got {shape}"),
]
EXPECTED_INPUT = {
    (2, "channels_first"): "(N, 3, H, W)",
    (2, "channels_last"): "(N, H, W, 3)",
    (3, "channels_first"): "(N, 3, D, H, W)",
    (3, "channels_last"): "(N, D, H, W, 3)",
}


@pytest.mark.parametrize("spatial_dims, shape, fragment", BAD_INPUTS)
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_bad_input_raises_clear_value_error(framework, spatial_dims, shape, fragment):
    """One check (``core.spec.check_input_shape``), one wording, in each framework's layout."""
    fw = FRAMEWORKS[framework]
    data_format = "channels_first" if fw.layout == "NCHW" else "channels_last"
    if data_format == "channels_last" and len(shape) > 2:
        shape = (shape[0], *shape[2:], shape[1])
    expected = EXPECTED_INPUT[spatial_dims, data_format]
    model = fw.build(channels=(4, 8, 16), spatial_dims=spatial_dims)
    with pytest.raises(ValueError) as info:
        fw.call_on_zeros(model, shape)
    assert fragment.format(shape=shape, expected=expected) in str(info.value) and "\n" not in str(info.value)


FIELD_CHANGES = [
    {"in_channels": 4},
    {"out_channels": 2},
    {"channels": (4, 8, 32)},
    {"channels": (4, 12, 16)},
    {"channels": (6, 8, 16)},
    {"channels": (4, 8, 16, 32)},
    {"spatial_dims": 3},
]


@pytest.mark.parametrize("change", FIELD_CHANGES)
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_every_argument_reaches_the_model(framework, change):
    """A silently ignored argument changes neither the parameter count nor the output."""
    fw = FRAMEWORKS[framework]
    base = dict(in_channels=3, out_channels=1, channels=(4, 8, 16), spatial_dims=2)
    changed = {**base, **change}
    model = fw.build(**changed)
    assert model.config == ModelConfig(**changed)
    assert fw.parameter_count(model) == parameter_count(model.config) != parameter_count(ModelConfig(**base))
    sides = (16, 16) if changed["spatial_dims"] == 2 else (8, 8, 8)
    assert fw.output_shape(model, (1, changed["in_channels"], *sides)) == (1, changed["out_channels"], *sides)


# Checkpoints: each framework's own formats and the canonical ones.
ROUND_TRIPS = [("torch", suffix) for suffix in (".pt", ".pth", ".safetensors")]
ROUND_TRIPS += [("flax", suffix) for suffix in (".pt", ".safetensors", ".msgpack", ".orbax")]
ROUND_TRIPS += [("keras", suffix) for suffix in (".weights.h5", ".keras", ".safetensors", ".pt")]


@pytest.mark.parametrize("config", [SMALL, SMALL_3D], ids=["2d", "3d"])
@pytest.mark.parametrize("framework, suffix", ROUND_TRIPS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_save_load_round_trip_is_bit_exact(tmp_path, framework, suffix, dtype, config):
    fw = FRAMEWORKS[framework]
    package = fw.package()
    checkpoint = random_checkpoint(config, seed=3, dtype=dtype)
    with fw.scope(dtype):
        model = package.from_checkpoint(checkpoint, dtype)
        path = tmp_path / f"model{suffix}"
        package.save(model, path)
        assert sorted(os.listdir(tmp_path)) == [path.name]  # exactly that file, no leftovers
        loaded = package.load(path, dtype=dtype)
        assert loaded.config == model.config and fw.in_eval_mode(loaded)
        saved = package.to_checkpoint(model).tensors
        back = package.to_checkpoint(loaded).tensors
        with pytest.raises(CheckpointError, match="already exists"):
            package.save(model, path)
    assert list(back) == list(saved) == list(checkpoint.tensors)
    for name, value in checkpoint.tensors.items():
        assert back[name].dtype == saved[name].dtype == value.dtype, name
        assert np.array_equal(back[name], value) and np.array_equal(saved[name], value), name


UNKNOWN_DTYPE = {
    "torch": "dtype must be one of \\['float32', 'float64', 'mixed_bfloat16'\\], got 'int8'",
    "flax": "dtype must be one of \\['float32', 'float64', 'mixed_bfloat16'\\] or jnp.bfloat16, got 'int8'",
    "keras": "dtype must be one of \\['float32', 'float64', 'mixed_bfloat16'\\], got 'int8'",
}


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_load_rejects_unknown_dtype(framework, reference_dir):
    with pytest.raises(ValueError, match=UNKNOWN_DTYPE[framework]):
        FRAMEWORKS[framework].package().load(reference_dir / "article_state_dict.pt", dtype="int8")
