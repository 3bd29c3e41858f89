"""What only the Flax model has: JAX's x64 mode, the NNX tree, its upsampling against
``jax.image.resize``, its BatchNorm, eval/train switching, msgpack and Orbax files, ``nnx.jit`` and
optax, and mixed bfloat16 by dtype pairs; and the 3D model (``spatial_dims=3``, NDHWC) against
PyTorch's in float64, block by block, gradients and running statistics, where the tests that do
not compile a new eager shape per op are parametrized over ``spatial_dims``. What the three models
keep alike is in ``test_model_contract.py``."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import impl_flax
import impl_torch
import weights_convert
from impl_flax import export
from impl_flax.layers import BatchNorm, upsample2x
from impl_flax.trainer import canonical, gradients_fn
from tests.conftest import rel_error
from weights_convert.core.checkpoint import CheckpointError
from weights_convert.core.flax_layout import nnx_path
from weights_convert.core.random_init import random_checkpoint
from weights_convert.core.spec import ModelConfig, param_specs, parameter_count
from weights_convert.harness.parity.tolerances import TOLERANCES, tolerance

SMALL = ModelConfig(2, 3, (4, 8, 16))
# Eager JAX compiles every op for every new shape: the eager tests share one input shape.
X_SHAPE = (2, 9, 11, 2)
# The same network on volumes (NDHWC), and its input: odd and even sides, none equal, so that
# every axis pools with and without a dropped slice and pads after the upsampling.
SMALL_BY_DIMS = {2: SMALL, 3: ModelConfig(2, 3, (4, 8, 16), spatial_dims=3)}
X_SHAPE_BY_DIMS = {2: X_SHAPE, 3: (2, 9, 12, 11, 2)}
SPATIAL_DIMS = [2, 3]


def nchw(x_channels_last):
    """NHWC -> NCHW, NDHWC -> NCDHW."""
    return np.moveaxis(np.asarray(x_channels_last), -1, 1)


def channels_last(x_channels_first):
    """NCHW -> NHWC, NCDHW -> NDHWC."""
    return np.moveaxis(np.asarray(x_channels_first), 1, -1)


def small_model(seed=3, dtype="float32", config=SMALL):
    return impl_flax.from_checkpoint(random_checkpoint(config, seed=seed, dtype=dtype), dtype)


def small_input(seed=0, shape=X_SHAPE):
    return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), jnp.float32)


def abstract_model(*args, **kwargs):
    """The module tree with shapes only: random initialization compiles per shape and is slow."""
    return nnx.eval_shape(lambda: impl_flax.AttentionUNet(*args, **kwargs, rngs=nnx.Rngs(0)))


# JAX's 64-bit mode and the NNX tree.


def test_float64_without_x64_is_refused_and_x64_stays_off(reference_dir):
    if jax.config.jax_enable_x64:
        pytest.fail("x64 is on globally: another test leaked it")
    with pytest.raises(ValueError, match="float64 needs JAX's 64-bit mode"):
        impl_flax.load(reference_dir / "article_state_dict.pt", dtype="float64")
    with pytest.raises(ValueError, match="float64 needs JAX's 64-bit mode"):
        impl_flax.AttentionUNet(channels=(4, 8), dtype=jnp.float64, rngs=nnx.Rngs(0))
    assert not jax.config.jax_enable_x64


@pytest.mark.parametrize("spatial_dims", SPATIAL_DIMS)
def test_default_model_parameter_count_and_tree(spatial_dims):
    config = ModelConfig(spatial_dims=spatial_dims)
    model = nnx.eval_shape(lambda: impl_flax.AttentionUNet(spatial_dims=spatial_dims, rngs=nnx.Rngs(0)))
    assert model.config == config
    params = nnx.state(model, nnx.Param)
    count = sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(params))
    assert count == parameter_count(config) and (spatial_dims == 3 or count == 8_135_745)
    # The torch tree, path for path: nnx_path is the whole mapping, both ways.
    paths = {path for path, _ in nnx.to_flat_state(nnx.state(model))}
    assert paths == {nnx_path(p) for p in param_specs(config)}
    assert nnx_path(param_specs(config)[0]) == ("e1", "conv", "conv", 0, "kernel")
    # HWIO, DHWIO kernels.
    assert model.e1.conv.conv[0].kernel.get_value().shape == (3,) * spatial_dims + (3, 64)
    assert model.d1.ag.Wg[0].kernel.get_value().shape == (1,) * spatial_dims + (512, 256)


# Building blocks: the upsampling's trap, and BatchNorm against torch's.


def corners(x):
    """The first and last sample along every spatial axis of NHWC (NDHWC) ``x``."""
    for axis in range(1, x.ndim - 1):
        x = np.take(x, [0, -1], axis=axis)
    return x


UPSAMPLE_SHAPES = {2: (1, 5, 6, 2), 3: (1, 3, 5, 6, 2)}


@pytest.mark.parametrize("spatial_dims", SPATIAL_DIMS)
def test_upsample_is_not_half_pixel_resize(spatial_dims):
    """The trap of ARCHITECTURE.md section 3: jax.image.resize samples at half-pixel centres
    (its "trilinear" too: ``method="linear"`` on every axis it resizes)."""
    shape = UPSAMPLE_SHAPES[spatial_dims]
    x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
    doubled = (shape[0], *(2 * side for side in shape[1:-1]), shape[-1])
    resized = jax.image.resize(x, doubled, method="linear")
    assert upsample2x(x).shape == doubled
    assert float(jnp.max(jnp.abs(upsample2x(x) - resized))) > 1e-2
    # align_corners=True keeps the corners: output corners are input corners.
    np.testing.assert_array_equal(corners(upsample2x(x)), corners(x))


def test_upsample_is_trilinear_with_aligned_corners_as_torch():
    """In 3D the one rule along three axes is torch's trilinear (one kernel, eight corners): the
    same function, to float64 rounding. (2D: ``test_model_contract.py``.)"""
    x = np.random.default_rng(1).normal(size=(2, 3, 4, 5, 7))  # NCDHW
    with jax.enable_x64(True):
        actual = nchw(upsample2x(jnp.asarray(channels_last(x))))
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(x), scale_factor=2, mode="trilinear", align_corners=True
    ).numpy()
    assert actual.shape == (2, 3, 8, 10, 14)
    assert rel_error(actual, expected) <= TOLERANCES["float64"]
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-14)


BATCH_NORMS = {2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}


@pytest.mark.parametrize("spatial_dims", SPATIAL_DIMS)
def test_batchnorm_trains_like_torch(spatial_dims):
    """Batch statistics in the output; unbiased variance, momentum 0.1 (torch's convention) and
    the counter in the running state; over the batch and every spatial axis (BatchNorm3d in 3D)."""
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 3.0, size=(2, 3, 5, 4) if spatial_dims == 2 else (2, 3, 2, 5, 4))
    torch_bn = BATCH_NORMS[spatial_dims](4, eps=1e-5, momentum=0.1).double()
    with torch.no_grad():
        torch_bn.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, 4)))
        torch_bn.bias.copy_(torch.from_numpy(rng.normal(size=4)))
        expected = torch_bn(torch.from_numpy(nchw(x))).numpy()
    with jax.enable_x64(True):
        bn = BatchNorm(4, dtype=jnp.float64)
        bn.scale.set_value(jnp.asarray(torch_bn.weight.detach().numpy()))
        bn.bias.set_value(jnp.asarray(torch_bn.bias.detach().numpy()))
        actual = bn(jnp.asarray(x))
        running_var = np.asarray(bn.var.get_value())
        running_mean = np.asarray(bn.mean.get_value())
        count = int(bn.num_batches_tracked.get_value())
    assert rel_error(nchw(actual), expected) <= TOLERANCES["float64"]
    assert rel_error(running_mean, torch_bn.running_mean.numpy()) <= TOLERANCES["float64"]
    assert rel_error(running_var, torch_bn.running_var.numpy()) <= TOLERANCES["float64"]
    assert count == int(torch_bn.num_batches_tracked) == 1
    # Not the biased variance nnx.BatchNorm stores.
    assert not np.allclose(running_var, 0.9 + 0.1 * x.reshape(-1, 4).var(axis=0), rtol=1e-6)


def test_batchnorm_refuses_one_value_per_channel_in_training():
    bn = BatchNorm(3)
    with pytest.raises(ValueError, match="expected more than 1 value per channel when training"):
        bn(jnp.ones((1, 1, 1, 3)))
    bn.eval()
    assert bn(jnp.ones((1, 1, 1, 3))).shape == (1, 1, 1, 3)


def test_eval_and_train_switch_batchnorm():
    model = small_model()
    x = small_input()
    state = nnx.clone(nnx.state(model, nnx.BatchStat))
    out_eval = model(x)
    assert all(bn.use_running_average for _, bn in nnx.iter_graph(model) if isinstance(bn, BatchNorm))
    assert jax.tree.all(jax.tree.map(jnp.array_equal, state, nnx.state(model, nnx.BatchStat)))
    model.train()
    out_train = model(x)
    assert not jnp.allclose(out_eval, out_train)
    counts = [int(bn.num_batches_tracked.get_value()) for _, bn in nnx.iter_graph(model) if isinstance(bn, BatchNorm)]
    assert counts == [101] * len(counts)
    assert not jnp.array_equal(model.e1.conv.conv[1].var.get_value(), state["e1"]["conv"]["conv"][1]["var"].get_value())
    model.eval()
    np.testing.assert_array_equal(model(x), model(x))


# The network in float64 against PyTorch's, on an image and on a volume (NDHWC): every block,
# the running statistics after a train-mode forward, the gradients and the exported file.


def torch_input(spatial_dims: int, seed: int) -> np.ndarray:
    """A float64 NCHW (NCDHW) input of ``X_SHAPE_BY_DIMS``."""
    return nchw(np.random.default_rng(seed).uniform(size=X_SHAPE_BY_DIMS[spatial_dims]))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("spatial_dims", SPATIAL_DIMS)
def test_float64_forward_matches_torch(spatial_dims, train):
    """Every named block output of the same canonical weights to 1e-10 at an odd size; in train mode
    the running statistics and counters after the forward too, and in eval mode none of them moves."""
    config = SMALL_BY_DIMS[spatial_dims]
    checkpoint = random_checkpoint(config, seed=11, dtype="float64")
    x = torch_input(spatial_dims, seed=12)
    torch_model = impl_torch.from_checkpoint(checkpoint, "float64").train(train)
    with torch.no_grad():
        _, expected = torch_model(torch.from_numpy(x), return_intermediates=True)
    with jax.enable_x64(True):
        model = impl_flax.from_checkpoint(checkpoint, "float64")
        model.train() if train else model.eval()
        logits, named = nnx.jit(lambda m, x: m(x, return_intermediates=True))(model, jnp.asarray(channels_last(x)))
        state = impl_flax.to_checkpoint(model).tensors
    assert logits.shape == (*X_SHAPE_BY_DIMS[spatial_dims][:-1], config.out_channels)
    assert sorted(named) == sorted(config.block_names) and np.array_equal(named["output"], logits)
    errors = {name: rel_error(nchw(named[name]), expected[name].numpy()) for name in config.block_names}
    for name, value in torch_model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            assert state[name] == value.numpy() == checkpoint.tensors[name] + train, name
        elif train:
            errors[f"state/{name}"] = rel_error(state[name], value.numpy())
        else:
            assert np.array_equal(state[name], checkpoint.tensors[name]), name
    worst = max(errors, key=errors.get)
    print(f"{spatial_dims}D float64 {'train' if train else 'eval'}: worst {errors[worst]:.2e} ({worst})")
    assert all(error <= TOLERANCES["float64"] for error in errors.values()), worst


@pytest.mark.parametrize("spatial_dims", SPATIAL_DIMS)
def test_float64_gradients_match_torch(spatial_dims):
    """The trainer's jitted gradients (train-mode forward, mean squared error) against autograd's,
    the gradient being one vector: each entry's error relative to its largest entry."""
    config = SMALL_BY_DIMS[spatial_dims]
    checkpoint = random_checkpoint(config, seed=13, dtype="float64")
    x = torch_input(spatial_dims, seed=14)
    target = np.random.default_rng(15).normal(size=(x.shape[0], config.out_channels, *x.shape[2:]))
    torch_model = impl_torch.from_checkpoint(checkpoint, "float64").train()
    expected_loss = torch.mean((torch_model(torch.from_numpy(x)) - torch.from_numpy(target)) ** 2)
    expected_loss.backward()
    expected = {name: p.grad.numpy() for name, p in torch_model.named_parameters()}
    with jax.enable_x64(True):
        model = impl_flax.from_checkpoint(checkpoint, "float64")
        model.train()
        loss, grads = gradients_fn(model, jnp.asarray(channels_last(x)), jnp.asarray(channels_last(target)))
        actual = canonical(grads, config)
    assert list(actual) == list(expected)
    assert rel_error(loss, expected_loss.detach().numpy()) <= TOLERANCES["float64"]
    scale = max(float(np.max(np.abs(g))) for g in expected.values())
    errors = {name: float(np.max(np.abs(actual[name] - g))) / scale for name, g in expected.items()}
    worst = max(errors, key=errors.get)
    print(f"{spatial_dims}D float64 gradients: worst {errors[worst]:.2e} ({worst})")
    assert all(error <= TOLERANCES["float64"] for error in errors.values()), worst


def test_3d_export_has_a_symbolic_depth(tmp_path):
    """The ``.jaxexport`` of a 3D model takes any batch and D, H, W >= 2**depth: one file, run at
    an odd volume and at the smallest one, matches PyTorch's float64 model."""
    config = SMALL_BY_DIMS[3]
    checkpoint = random_checkpoint(config, seed=16, dtype="float64")
    path = tmp_path / "model.jaxexport"
    export.export(checkpoint, path, "float64")
    torch_model = impl_torch.from_checkpoint(checkpoint, "float64")
    for shape in [(2, 2, 9, 12, 11), (1, 2, 4, 4, 5)]:
        x = np.random.default_rng(17).uniform(size=shape)
        with torch.no_grad():
            expected = torch_model(torch.from_numpy(x)).numpy()
        actual = nchw(export.run(path, channels_last(x)))
        assert rel_error(actual, expected) <= TOLERANCES["float64"], shape
    assert not jax.config.jax_enable_x64


BAD_3D_INPUTS = [
    ((1, 16, 16, 2), "got a 4-D tensor of shape (1, 16, 16, 2)"),
    ((1, 8, 8, 8, 8, 2), "got a 6-D tensor of shape (1, 8, 8, 8, 8, 2)"),
    ((1, 3, 16, 16, 2), "got (1, 3, 16, 16, 2)"),
    ((1, 16, 16, 3, 2), "got (1, 16, 16, 3, 2)"),
    ((1, 8, 8, 8, 3), "got (1, 8, 8, 8, 3)"),
]


@pytest.mark.parametrize("shape, fragment", BAD_3D_INPUTS)
def test_3d_input_checks_are_one_line_value_errors(shape, fragment):
    """A 3D model takes NDHWC only: another rank, a side below 2**depth, another channel count are
    refused with the shape it takes, in one line."""
    model = abstract_model(channels=(4, 8, 16), in_channels=2, spatial_dims=3)
    with pytest.raises(ValueError) as info:
        model(jnp.zeros(shape))
    message = str(info.value)
    assert message.startswith("expected input of shape (N, D, H, W, 2) with D, H, W >= 4, ")
    assert fragment in message and "\n" not in message


# Checkpoints.


def test_msgpack_restores_with_flax_serialization(tmp_path):
    """The file is flax.serialization bytes of the NNX state, restorable without this package."""
    from flax import serialization

    source = small_model(seed=5)
    impl_flax.save(source, tmp_path / "model.msgpack")
    data = (tmp_path / "model.msgpack").read_bytes()
    # Flax's restore pattern: an abstract model, its state filled from the file, merged.
    graphdef, state = nnx.split(abstract_model(2, 3, (4, 8, 16)))
    nnx.replace_by_pure_dict(state, serialization.msgpack_restore(data))
    model = nnx.merge(graphdef, state)
    pure = serialization.from_bytes(nnx.to_pure_dict(nnx.state(model)), data)
    assert jax.tree.all(jax.tree.map(np.array_equal, pure, nnx.to_pure_dict(nnx.state(source))))
    model.eval()
    np.testing.assert_array_equal(model(small_input()), source(small_input()))


def test_orbax_restores_into_the_nnx_state(tmp_path):
    import orbax.checkpoint as ocp

    source = small_model(seed=6)
    impl_flax.save(source, tmp_path / "model.orbax")
    graphdef, abstract_state = nnx.split(abstract_model(2, 3, (4, 8, 16)))
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore((tmp_path / "model.orbax").absolute(), abstract_state)
    model = nnx.merge(graphdef, state)
    model.eval()
    np.testing.assert_array_equal(model(small_input()), source(small_input()))


def test_reads_an_nnx_state_saved_by_flax_itself(tmp_path):
    """Files written by plain Flax/Orbax calls (int32 counters, Variables as saved by Orbax) read
    back into the canonical form."""
    import orbax.checkpoint as ocp
    from flax import serialization

    model = small_model(seed=7)
    (tmp_path / "own.msgpack").write_bytes(serialization.to_bytes(nnx.to_pure_dict(nnx.state(model))))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save((tmp_path / "own.orbax").absolute(), nnx.state(model))
    expected = impl_flax.to_checkpoint(model)
    for name in ("own.msgpack", "own.orbax"):
        checkpoint = weights_convert.read(tmp_path / name)
        assert checkpoint.config == SMALL
        for key, value in expected.tensors.items():
            assert checkpoint.tensors[key].dtype == value.dtype and np.array_equal(checkpoint.tensors[key], value)


def _truncate(path):
    if path.is_dir():
        for chunk in (path / "ocdbt.process_0" / "d").iterdir():
            chunk.write_bytes(chunk.read_bytes()[:10])
    else:
        path.write_bytes(path.read_bytes()[:500])


@pytest.mark.parametrize(
    "suffix, damage, message",
    [
        (".msgpack", _truncate, "not a readable Flax msgpack file"),
        (".msgpack", lambda p: p.write_bytes(b"not msgpack at all"), "not a readable Flax msgpack file"),
        (".msgpack", lambda p: p.write_bytes(b"\x93\x01\x02\x03"), "expected the NNX state as a nested dict"),
        (".orbax", _truncate, "not a readable Orbax checkpoint"),
        (".orbax", lambda p: (p / "_METADATA").unlink(), "not an Orbax checkpoint (no _METADATA"),
    ],
)
def test_damaged_flax_checkpoint_is_one_line_error(tmp_path, capfd, suffix, damage, message):
    path = tmp_path / f"model{suffix}"
    weights_convert.write(random_checkpoint(SMALL, seed=3), path)
    damage(path)
    with pytest.raises(CheckpointError) as info:
        impl_flax.load(path)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert "Traceback" not in capfd.readouterr().err


def test_msgpack_with_a_foreign_tensor_lists_it(tmp_path):
    from flax import serialization

    model = small_model()
    state = nnx.to_pure_dict(nnx.state(model))
    state["e1"]["conv"]["conv"][0]["extra"] = np.zeros(3, np.float32)
    (tmp_path / "model.msgpack").write_bytes(serialization.to_bytes(state))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['e1.conv.conv.0.extra'\]"):
        weights_convert.read(tmp_path / "model.msgpack")


# nnx.jit and optax.


def test_jit_forward_matches_eager():
    """The jitted float32 forward is no noisier than the eager one, both against float64."""
    checkpoint = random_checkpoint(SMALL, seed=3, dtype="float64")
    model = impl_flax.from_checkpoint(checkpoint, "float32")
    x = small_input()
    with jax.enable_x64(True):
        expected = nnx.jit(lambda m, x: m(x))(
            impl_flax.from_checkpoint(checkpoint, "float64"), jnp.asarray(x, "float64")
        )
    noise = rel_error(model(x), expected, floor=1.0)
    error = rel_error(nnx.jit(lambda m, x: m(x))(model, x), expected, floor=1.0)
    print(f"float32 eager {noise:.2e}, jitted {error:.2e}")
    assert error <= tolerance("float32", noise)


def test_jitted_optax_train_step():
    model = small_model(seed=8, config=ModelConfig(2, 3, (4, 8)))  # one level: a quicker compile
    model.train()
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    x = small_input()
    target = jnp.asarray(np.random.default_rng(1).normal(size=(*X_SHAPE[:3], 3)), jnp.float32)

    @nnx.jit
    def step(model, optimizer, x, target):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    before = nnx.clone(nnx.state(model, nnx.Param))
    losses = [float(step(model, optimizer, x, target)) for _ in range(5)]
    assert losses[-1] < losses[0]
    after = nnx.state(model, nnx.Param)
    assert not jnp.array_equal(before["output"]["kernel"].get_value(), after["output"]["kernel"].get_value())
    assert int(model.b1.conv[4].num_batches_tracked.get_value()) == 100 + 5
    assert not jax.config.jax_enable_x64 and model.output.kernel.get_value().dtype == jnp.float32
    assert int(optimizer.step.get_value()) == 5


# Mixed precision: float32 parameters and statistics, bfloat16 compute.


def float_dtypes(model) -> set:
    """The dtypes of every parameter and running statistic (the counters are integers)."""
    values = [v.get_value() for _, v in nnx.to_flat_state(nnx.state(model))]
    return {value.dtype for value in values if jnp.issubdtype(value.dtype, jnp.floating)}


@pytest.mark.parametrize("spatial_dims", SPATIAL_DIMS)
@pytest.mark.parametrize(
    "kwargs", [{"dtype": jnp.bfloat16}, {"dtype": "mixed_bfloat16"}, {"dtype": "bfloat16", "param_dtype": "float32"}]
)
def test_mixed_bfloat16_keeps_float32_parameters(kwargs, spatial_dims):
    model = abstract_model(channels=(4, 8, 16), spatial_dims=spatial_dims, **kwargs)
    assert (model.dtype, model.param_dtype) == (jnp.bfloat16, jnp.float32)
    assert float_dtypes(model) == {np.dtype("float32")}
    assert model.e1.conv.conv[0].dtype == jnp.bfloat16 and model.d1.ag.Ws[1].dtype == jnp.bfloat16
    out = nnx.eval_shape(lambda m, x: m(x), model, jnp.zeros((1, *(16,) * spatial_dims, 3)))
    assert out.dtype == jnp.bfloat16 and out.shape == (1, *(16,) * spatial_dims, 1)


@pytest.mark.parametrize(
    "dtype, param_dtype, message",
    [
        (jnp.bfloat16, jnp.bfloat16, "bfloat16 computes with float32 parameters only (mixed precision), got"),
        ("mixed_bfloat16", "float16", "bfloat16 computes with float32 parameters only"),
        (jnp.float32, jnp.bfloat16, "dtype float32 needs param_dtype float32 (or None), got"),
        ("float32", "float64", "dtype float32 needs param_dtype float32"),
        (jnp.float16, None, "dtype must be one of ['float32', 'float64', 'mixed_bfloat16'] or jnp.bfloat16, got"),
    ],
)
def test_unsupported_dtype_pairs_are_refused(dtype, param_dtype, message):
    with pytest.raises(ValueError) as info:
        abstract_model(channels=(4, 8), dtype=dtype, param_dtype=param_dtype)
    assert message in str(info.value)
    with pytest.raises(ValueError):
        BatchNorm(3, dtype=dtype, param_dtype=param_dtype)


def test_batchnorm_takes_bfloat16_statistics_in_float32():
    """A bfloat16 input gives exactly the float32 layer's statistics and running averages (of the
    same values), and the float32 layer's output rounded to bfloat16."""
    x = jnp.asarray(np.random.default_rng(2).normal(3.0, 2.0, size=(2, 5, 4, 3)), jnp.bfloat16)
    mixed, strict = BatchNorm(3, dtype=jnp.bfloat16), BatchNorm(3)
    for bn in (mixed, strict):
        bn.scale.set_value(jnp.asarray([0.5, 1.0, 2.0]))
    out_mixed, out_strict = mixed(x), strict(jnp.asarray(x, jnp.float32))
    assert out_mixed.dtype == jnp.bfloat16 and mixed.var.get_value().dtype == jnp.float32
    np.testing.assert_array_equal(out_mixed, jnp.asarray(out_strict, jnp.bfloat16))
    np.testing.assert_array_equal(mixed.mean.get_value(), strict.mean.get_value())
    np.testing.assert_array_equal(mixed.var.get_value(), strict.var.get_value())
    mixed.eval()
    assert mixed(x).dtype == jnp.bfloat16


@pytest.mark.parametrize("spatial_dims", SPATIAL_DIMS)
def test_load_mixed_bfloat16(tmp_path, spatial_dims):
    """``load(path, dtype="mixed_bfloat16")``: float32 tensors in and out, bfloat16 compute; its
    error against float64 has bfloat16's size, not float32's, on a volume as on an image."""
    checkpoint = random_checkpoint(SMALL_BY_DIMS[spatial_dims], seed=9, dtype="float64")
    impl_flax.save(impl_flax.from_checkpoint(checkpoint, "float32"), tmp_path / "model.safetensors")
    mixed = impl_flax.load(tmp_path / "model.safetensors", dtype="mixed_bfloat16")
    assert float_dtypes(mixed) == {np.dtype("float32")}
    saved = impl_flax.to_checkpoint(mixed).tensors
    for name, value in checkpoint.astype("float32").tensors.items():
        assert saved[name].dtype == value.dtype and np.array_equal(saved[name], value), name
    x = small_input(shape=X_SHAPE_BY_DIMS[spatial_dims])
    run = nnx.jit(lambda m, x: m(x))
    out_mixed, out_float32 = run(mixed, x), run(impl_flax.from_checkpoint(checkpoint, "float32"), x)
    with jax.enable_x64(True):
        expected = run(impl_flax.from_checkpoint(checkpoint, "float64"), jnp.asarray(x, jnp.float64))
    assert out_mixed.dtype == jnp.bfloat16
    error, error32 = rel_error(out_mixed, expected, floor=1.0), rel_error(out_float32, expected, floor=1.0)
    print(f"{spatial_dims}D eval output vs float64: mixed_bfloat16 {error:.2e}, float32 {error32:.2e}")
    # Orders of magnitude only: bfloat16 keeps 8 mantissa bits (2**-8 = 3.9e-3 per rounding), so a
    # few layers land between 1e-4 and 1e-1; float32 (24 bits) stays orders of magnitude below.
    assert 1e-4 < error < 1e-1 and error32 < error / 1000
