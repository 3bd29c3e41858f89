"""MONAI's AttentionUnet in Flax NNX (``impl_flax.MonaiAttentionUNet``, docs/architecture.md section
1b) against ``monai.networks.nets.AttentionUnet`` itself, the test-only oracle: randomly initialised,
with random BatchNorm statistics and PReLU slopes, its ``state_dict`` loaded through the canonical
checkpoint. In float64 every named block output (read off MONAI's modules by forward hooks), the
train-mode output and running statistics, the gradients and the exported file agree to 1e-10 on
images and volumes, strides of 1, kernels of 5 and an up kernel smaller than its stride; the
transposed convolution alone against torch's; the NNX tree, the round trip of every tensor, the
file formats, dropout and mixed bfloat16.

Dropout is 0 wherever outputs are compared in train mode: its masks are random streams that MONAI
and JAX do not share (section 1b)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import impl_flax
import weights_convert
from impl_flax import export, runner, trainer
from impl_flax.layers import ConvTranspose, Dropout
from impl_flax.training import load_training, make_optimizer, save_training, to_training_checkpoint
from tests.conftest import rel_error
from weights_convert.core.checkpoint import Checkpoint
from weights_convert.core.flax_layout import to_nnx
from weights_convert.core.monai_spec import MonaiConfig, down_prefix, level_prefix
from weights_convert.harness.parity.tolerances import TOLERANCES

monai_nets = pytest.importorskip("monai.networks.nets")
from tests.monai_nets import monai_net  # noqa: E402  (after the skip: it imports monai)

FLOAT64 = TOLERANCES["float64"]  # 1e-10

# name -> (config, input shape NCHW / NCDHW). Small channels and sides: one compile each.
CASES = {
    "2d": (MonaiConfig(2, 3, (4, 8, 16), strides=(2, 2)), (2, 2, 8, 12)),
    "3d": (MonaiConfig(2, 3, (4, 8, 16), spatial_dims=3, strides=(2, 2)), (2, 2, 4, 8, 12)),
    "stride1_kernel5": (MonaiConfig(2, 3, (4, 8, 16, 32), strides=(2, 1, 2), kernel_size=5), (2, 2, 8, 12)),
    # An up kernel smaller than its stride: the transposed convolution's last rows are bias alone.
    "up_kernel1": (MonaiConfig(2, 3, (4, 8, 16), strides=(2, 2), up_kernel_size=1), (2, 2, 8, 12)),
}
# One level has every kind of layer (head, down block, gate, upconv, merge, output) at half the
# compile of two: the backward pass, whose float64 compile is the slowest step here, runs on it.
ONE_LEVEL = MonaiConfig(2, 3, (4, 8), strides=(2,))
ONE_LEVEL_SHAPE = (2, 2, 8, 12)


@pytest.fixture(autouse=True)
def x64_unchanged():
    """float64 runs switch JAX's x64 on in a scope only (as in test_flax_model.py)."""
    before = jax.config.jax_enable_x64
    yield
    assert jax.config.jax_enable_x64 == before


def nchw(x_channels_last):
    """NHWC -> NCHW, NDHWC -> NCDHW."""
    return np.moveaxis(np.asarray(x_channels_last), -1, 1)


def channels_last(x_channels_first):
    """NCHW -> NHWC, NCDHW -> NDHWC."""
    return np.moveaxis(np.asarray(x_channels_first), 1, -1)


def checkpoint_of(net: torch.nn.Module, config: MonaiConfig) -> Checkpoint:
    """MONAI's state_dict as a canonical checkpoint, its own keys, validated against ``config``; copies,
    not views of the torch tensors, which a train-mode forward updates in place."""
    return Checkpoint.from_tensors({k: v.detach().numpy().copy() for k, v in net.state_dict().items()}, config)


def case(name: str, seed: int = 0):
    """(config, MONAI's net, its checkpoint, a float64 channels-first input) of ``CASES[name]``
    (or of ``ONE_LEVEL``)."""
    config, shape = CASES[name] if name != "one_level" else (ONE_LEVEL, ONE_LEVEL_SHAPE)
    net = monai_net(config, seed)
    x = np.random.default_rng(seed + 100).normal(size=shape)
    return config, net, checkpoint_of(net, config), x


def monai_blocks(net: torch.nn.Module, config: MonaiConfig, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every named block output (``config.block_names``) of MONAI's forward on ``x``, by forward hooks
    on the module each name is the output of: the head, each level's down block, its upconv, its
    gate's psi and its merge, the output conv."""
    modules = {"e1": "model.0", "output": "model.2"}
    for level in range(config.depth):
        modules[f"e{level + 2}" if level < config.depth - 1 else "b1"] = down_prefix(config, level)
        j = config.depth - level
        layer = level_prefix(level)
        modules.update({f"d{j}.up": f"{layer}.upconv", f"d{j}.ag": f"{layer}.attention.psi", f"d{j}": f"{layer}.merge"})
    outputs, hooks = {}, []
    for name, path in modules.items():

        def keep(module, inputs, output, name=name):
            outputs[name] = output.detach().numpy()

        hooks.append(net.get_submodule(path).register_forward_hook(keep))
    with torch.no_grad():
        outputs["logits"] = net(torch.from_numpy(x)).numpy()
    for hook in hooks:
        hook.remove()
    return outputs


# One jitted forward for every test: compiled once per model shape and mode.
forward = nnx.jit(lambda model, x: model(x, return_intermediates=True))


def flax_blocks(model, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every named block output of the Flax model on the channels-first ``x``, channels first."""
    logits, named = forward(model, jnp.asarray(channels_last(x)))
    assert np.array_equal(named["output"], logits) and sorted(named) == sorted(model.block_names)
    return {name: nchw(named[name]) for name in model.block_names}  # jit sorts the keys


def expected_shapes(config: MonaiConfig, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """The block shapes (channels first) section 1b gives: level i runs at the input's sides divided
    by the first i strides, with channels[i]; its down block divides by one stride more; each
    decoder is at its level's sides, the gate map with one channel."""
    n, _, *sides = shape
    c = config.channels

    def at(level: int, channels: int) -> tuple[int, ...]:
        scale = int(np.prod(config.strides[:level]))
        return (n, channels, *(side // scale for side in sides))

    shapes = {"e1": at(0, c[0]), "output": at(0, config.out_channels)}
    for level in range(config.depth):
        shapes[f"e{level + 2}" if level < config.depth - 1 else "b1"] = at(level + 1, c[level + 1])
        j = config.depth - level
        shapes.update({f"d{j}.up": at(level, c[level]), f"d{j}.ag": at(level, 1), f"d{j}": at(level, c[level])})
    return shapes


def errors(actual: dict, expected: dict, names) -> dict[str, float]:
    return {name: rel_error(actual[name], expected[name]) for name in names}


def assert_within(errors_by_name: dict[str, float], what: str, bound: float = FLOAT64) -> None:
    worst = max(errors_by_name, key=errors_by_name.get)
    print(f"{what}: worst {errors_by_name[worst]:.2e} ({worst})")
    assert errors_by_name[worst] <= bound, f"{what}: {worst} off by {errors_by_name[worst]:.2e}"


# The NNX tree and the round trip.


def test_state_paths_are_the_layout_of_a_monai_checkpoint():
    """The model's whole NNX state (no dropout: parameters and BatchNorm state only) is exactly
    ``flax_layout.to_nnx`` of MONAI's state_dict, shapes and all: MONAI's tree, Sequential indices
    as integers, transposed kernels (*k, out, in)."""
    config, _, checkpoint, _ = case("3d")
    model = impl_flax.from_checkpoint(checkpoint)
    state = {path: variable.get_value() for path, variable in nnx.to_flat_state(nnx.state(model))}
    layout = to_nnx(checkpoint)
    assert set(state) == set(layout)
    assert all(state[path].shape == value.shape for path, value in layout.items())
    up = model.model[1].upconv.up.conv.kernel.get_value()
    assert up.shape == (3, 3, 3, 4, 8)  # (*k, out = channels[0], in = channels[1])
    assert model.model[1].merge.adn.A.negative_slope.get_value().shape == (1,)
    fresh = nnx.eval_shape(lambda: impl_flax.MonaiAttentionUNet(config, rngs=nnx.Rngs(0)))
    assert {path for path, _ in nnx.to_flat_state(nnx.state(fresh))} == set(layout)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_round_trip_is_bit_exact(dtype):
    """``to_checkpoint(from_checkpoint(checkpoint))`` gives back every tensor, dtype and bits (the
    counters as int64, the transposed kernels through their transpose and back)."""
    config, _ = CASES["stride1_kernel5"]
    net = monai_net(config, seed=3, dtype=getattr(torch, dtype))
    checkpoint = checkpoint_of(net, config)
    with jax.enable_x64(dtype == "float64"):
        back = impl_flax.to_checkpoint(impl_flax.from_checkpoint(checkpoint, dtype))
    assert back.config == config and list(back.tensors) == list(checkpoint.tensors)
    for name, value in checkpoint.tensors.items():
        assert back.tensors[name].dtype == value.dtype and np.array_equal(back.tensors[name], value), name


# float64 against MONAI.


@pytest.mark.parametrize("name", list(CASES))
def test_float64_eval_matches_monai(name):
    """Every named block output, shape and value, and the logits, to 1e-10 (max |a - b| / max |b|)."""
    config, net, checkpoint, x = case(name)
    expected = monai_blocks(net.eval(), config, x)
    with jax.enable_x64(True):
        actual = flax_blocks(impl_flax.from_checkpoint(checkpoint, "float64"), x)
    assert list(actual) == config.block_names
    assert {k: v.shape for k, v in actual.items()} == expected_shapes(config, x.shape)
    assert rel_error(actual["output"], expected["logits"]) <= FLOAT64
    assert_within(errors(actual, expected, config.block_names), f"{name} float64 eval")


def test_float64_train_matches_monai_and_its_running_statistics():
    """A train-mode forward (batch statistics, dropout 0) through the parity harness's
    ``runner.forward``: every block to 1e-10, every running mean and variance after it (torch's
    unbiased variance, momentum 0.1) too, and the counters exactly. On a volume, where BatchNorm and
    InstanceNorm take three spatial axes (the gradients' train-mode forward is an image's)."""
    name = "3d"
    config, net, checkpoint, x = case(name, seed=1)
    expected = monai_blocks(net.train(), config, x)
    result = runner.forward(checkpoint, x, dtype="float64", train=True)
    assert list(result)[: len(config.block_names)] == config.block_names
    found = errors(result, expected, config.block_names)
    buffers = {key: value.numpy() for key, value in net.named_buffers()}
    assert sorted(key for key in result if key.startswith("state/")) == sorted(f"state/{key}" for key in buffers)
    for key, value in buffers.items():
        if key.endswith("num_batches_tracked"):
            assert result[f"state/{key}"] == value == checkpoint.tensors[key] + 1, key
        else:
            assert not np.array_equal(value, checkpoint.tensors[key]), key
            found[f"state/{key}"] = rel_error(result[f"state/{key}"], value)
    assert_within(found, f"{name} float64 train")


def train_input(config: MonaiConfig, x: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """(input, a random target), channels last, for a train step of ``x``."""
    target = np.random.default_rng(5).normal(size=(x.shape[0], config.out_channels, *x.shape[2:]))
    return jnp.asarray(channels_last(x)), jnp.asarray(channels_last(target))


def test_float64_gradients_match_monai():
    """The trainer's jitted gradients (train-mode forward, mean squared error) against MONAI's
    autograd, each entry relative to the largest of the whole gradient."""
    config, net, checkpoint, x = case("one_level", seed=2)
    with jax.enable_x64(True):
        inputs, target = train_input(config, x)
        loss = torch.mean((net.train()(torch.from_numpy(x)) - torch.from_numpy(nchw(target).copy())) ** 2)
        loss.backward()
        expected = {name: p.grad.numpy() for name, p in net.named_parameters()}
        model = impl_flax.from_checkpoint(checkpoint, "float64")
        model.train()
        value, grads = trainer.gradients_fn(model, inputs, target, "mse")  # train_step_fn's call
        actual = trainer.canonical(grads, config)
    assert list(actual) == list(expected)
    found = {"loss": rel_error(value, loss.detach().numpy())}
    scale = max(float(np.max(np.abs(g))) for g in expected.values())
    found.update({name: float(np.max(np.abs(actual[name] - g))) / scale for name, g in expected.items()})
    assert_within(found, "float64 gradients")


def test_a_perturbed_parameter_fails_the_comparison():
    """The 1e-10 bound is sensitive: the same comparison fails when one MONAI-only tensor moves by
    1e-7 (a PReLU slope, one transposed-conv weight) or one gate BatchNorm variance by 1e-7."""
    config, net, checkpoint, x = case("2d", seed=6)
    expected = monai_blocks(net.eval(), config, x)["logits"]
    perturbations = [
        "model.1.merge.adn.A.weight",
        "model.1.upconv.up.conv.weight",
        "model.1.attention.psi.1.running_var",
    ]

    def error(tensors: dict) -> float:
        model = impl_flax.from_checkpoint(Checkpoint.from_tensors(tensors, config), "float64")
        return rel_error(flax_blocks(model, x)["output"], expected)

    with jax.enable_x64(True):
        found = {"unperturbed": error(checkpoint.tensors)}
        for key in perturbations:
            moved = checkpoint.tensors[key].copy()
            moved.flat[0] += 1e-7
            found[key] = error({**checkpoint.tensors, key: moved})
    print({key: f"{error:.1e}" for key, error in found.items()})
    assert found.pop("unperturbed") <= FLOAT64
    assert all(error > FLOAT64 for error in found.values()), found


# The transposed convolution alone.


@pytest.mark.parametrize("kernel, stride", [(3, 2), (3, 1), (5, 2), (1, 2), (3, 3)])
def test_conv_transpose_is_torchs(kernel, stride):
    """``ConvTranspose`` is torch's ``conv_transpose2d(padding=(k - 1) / 2, output_padding=s - 1)``
    with its bias, on odd and even sides: each side n becomes n * s."""
    rng = np.random.default_rng(kernel * 10 + stride)
    x = rng.normal(size=(2, 3, 5, 6))  # NCHW
    weight, bias = rng.normal(size=(3, 4, kernel, kernel)), rng.normal(size=4)  # torch's (in, out, *k)
    expected = torch.nn.functional.conv_transpose2d(
        *map(torch.from_numpy, (x, weight, bias)), stride=stride, padding=kernel // 2, output_padding=stride - 1
    ).numpy()
    with jax.enable_x64(True):
        layer = ConvTranspose(3, 4, (kernel, kernel), stride, dtype="float64", param_dtype=None, rngs=nnx.Rngs(0))
        layer.kernel.set_value(jnp.asarray(weight.transpose(2, 3, 1, 0)))  # (*k, out, in)
        layer.bias.set_value(jnp.asarray(bias))
        actual = nchw(nnx.jit(lambda layer, x: layer(x))(layer, jnp.asarray(channels_last(x))))
        if (kernel, stride) == (3, 2):
            # The trap: 'SAME' padding is another function here (it starts one row later).
            same = jax.lax.conv_transpose(
                jnp.asarray(channels_last(x)), layer.kernel.get_value(), (2, 2), "SAME", transpose_kernel=True
            )
            assert rel_error(nchw(same) + bias[:, None, None], expected) > 0.1
    assert actual.shape == (2, 4, 5 * stride, 6 * stride) == expected.shape
    assert rel_error(actual, expected) <= FLOAT64


# Dropout.


def random_draws(model, x: jax.Array) -> int:
    """How many random masks a forward of ``model`` draws: the ``random_bits`` of its traced program
    (traced, not compiled: drawing the bits compiles slowly on a CPU), nested programs included."""
    graphdef, state = nnx.split(model)
    closed = jax.make_jaxpr(lambda state, x: nnx.merge(graphdef, state)(x))(state, x)

    def count(jaxpr) -> int:
        found = 0
        for eqn in jaxpr.eqns:
            found += eqn.primitive.name == "random_bits"
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        found += count(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        found += count(sub)
        return found

    return count(closed.jaxpr)


def test_dropout_is_active_in_train_mode_only():
    """With dropout, eval mode is MONAI's eval output (dropout is the identity there) and draws no
    mask; train mode draws one per Dropout (the head's two, the down block's two, the merge's; the
    upconv has none, as in MONAI). The streams are no part of the checkpoint, which round-trips."""
    config = MonaiConfig(2, 3, (4, 8), strides=(2,), dropout=0.3)
    net = monai_net(config, seed=7)
    checkpoint = checkpoint_of(net, config)
    x = np.random.default_rng(8).normal(size=ONE_LEVEL_SHAPE)
    expected = monai_blocks(net.eval(), config, x)["logits"]
    with jax.enable_x64(True):
        model = impl_flax.from_checkpoint(checkpoint, "float64")
        inputs = jnp.asarray(channels_last(x))
        assert rel_error(flax_blocks(model, x)["output"], expected) <= FLOAT64
        assert random_draws(model, inputs) == 0
        model.train()
        assert random_draws(model, inputs) == 5
        tensors = impl_flax.to_checkpoint(model).tensors
    assert all(np.array_equal(tensors[k], v) for k, v in checkpoint.tensors.items())
    streams = nnx.to_flat_state(nnx.state(model, nnx.RngState))
    assert len(streams) == 2 * 5  # a key and a count per Dropout


def test_dropout_layer():
    """Train mode zeroes about ``rate`` of the values and scales the rest by 1 / (1 - rate), a new
    mask per call; eval mode is the identity; a rate of 0 is the identity in train mode too and
    holds no stream."""
    layer = Dropout(0.5, rngs=nnx.Rngs(dropout=1))
    ones = jnp.ones((2, 8, 12, 4))
    run = nnx.jit(lambda layer, x: layer(x))
    first, second = np.asarray(run(layer, ones)), np.asarray(run(layer, ones))
    assert set(np.unique(first)) == {0.0, 2.0} and 0.3 < np.mean(first == 0) < 0.7
    assert not np.array_equal(first, second)
    layer.eval()
    assert layer(ones) is ones
    identity = Dropout(0.0, rngs=nnx.Rngs(0))
    assert identity.rngs is None and not identity.deterministic and identity(ones) is ones


# Mixed bfloat16.


def test_mixed_bfloat16_runs_with_float32_parameters():
    """bfloat16 compute, every block output and the logits bfloat16, float32 parameters and
    statistics (the checkpoint comes back as it went in); the logits close to MONAI's in float32."""
    config, net, _, x = case("2d", seed=9)
    checkpoint = checkpoint_of(net.float(), config)
    mixed = impl_flax.from_checkpoint(checkpoint, "mixed_bfloat16")
    floats = {v.get_value().dtype for _, v in nnx.to_flat_state(nnx.state(mixed, nnx.Param))}
    assert (mixed.dtype, mixed.param_dtype) == (jnp.bfloat16, jnp.float32) and floats == {np.dtype("float32")}
    logits, named = forward(mixed, jnp.asarray(channels_last(x), jnp.float32))
    assert {value.dtype for value in named.values()} == {np.dtype(jnp.bfloat16)}
    with torch.no_grad():
        reference = channels_last(net.eval()(torch.from_numpy(x).float()).numpy())  # MONAI in float32
    error = rel_error(logits, reference, floor=1.0)
    print(f"mixed_bfloat16 vs float32 logits: {error:.2e}")
    # A loose sanity bound: bfloat16 keeps 8 significant bits (2**-8 = 3.9e-3 per rounding), and
    # about twenty roundings in a row land between 1e-4 and a few percent; float32 would be ~1e-7.
    assert 1e-4 < error < 5e-2
    saved = impl_flax.to_checkpoint(mixed).tensors
    assert all(np.array_equal(saved[k], v) and saved[k].dtype == v.dtype for k, v in checkpoint.tensors.items())


# Files: MONAI's own state_dict, the Flax formats, training checkpoints and the export.


def test_load_a_monai_state_dict_with_and_without_its_config(tmp_path):
    """A bare MONAI state_dict (``torch.save``) loads with ``config=``; without it the strides and
    dropout are assumed and a UserWarning says so. Saved as .msgpack and .safetensors, it reads back
    with its config and every tensor."""
    config, net, checkpoint, x = case("stride1_kernel5", seed=10)
    torch.save(net.state_dict(), tmp_path / "monai.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = impl_flax.load(tmp_path / "monai.pt", config=config)
    assert model.config == config
    with pytest.warns(UserWarning, match="strides 2 at each level, dropout 0.0 assumed"):
        assumed = impl_flax.load(tmp_path / "monai.pt")
    assert assumed.config.strides == (2, 2, 2) and assumed.config.channels == config.channels
    # .safetensors keeps the config; a Flax .msgpack holds the NNX state alone, so it takes config= too.
    for suffix, given in ((".safetensors", None), (".msgpack", config)):
        impl_flax.save(model, tmp_path / f"model{suffix}")
        back = weights_convert.read(tmp_path / f"model{suffix}", config=given)
        assert back.config == config and list(back.tensors) == list(checkpoint.tensors)
        for name, value in checkpoint.astype("float32").tensors.items():
            assert back.tensors[name].dtype == value.dtype and np.array_equal(back.tensors[name], value), name


def test_training_checkpoint_round_trip(tmp_path):
    """``save_training`` / ``load_training`` of a MONAI model and its Adam state after one step of
    the trainer's (the gradients' compile of ``test_float64_gradients_match_monai``)."""
    config, _, checkpoint, x = case("one_level", seed=11)
    with jax.enable_x64(True):
        model = impl_flax.from_checkpoint(checkpoint, "float64")
        model.train()
        optimizer = make_optimizer(model, "adam", lr=1e-3)
        trainer.train_step_fn(model, optimizer, *train_input(config, x))
        save_training(model, optimizer, tmp_path / "train.safetensors")
        loaded, loaded_optimizer = load_training(tmp_path / "train.safetensors", dtype="float64")
        saved, restored = to_training_checkpoint(model, optimizer), to_training_checkpoint(loaded, loaded_optimizer)
    assert isinstance(loaded, impl_flax.MonaiAttentionUNet) and restored.config == config
    assert restored.optimizer.step == saved.optimizer.step == 1
    assert all(np.array_equal(saved.tensors[k], restored.tensors[k]) for k in saved.tensors)
    assert not np.array_equal(saved.tensors["model.2.conv.weight"], checkpoint.tensors["model.2.conv.weight"])
    for slot, tensors in saved.optimizer.slots.items():  # exp_avg, exp_avg_sq of every parameter
        assert list(tensors) == list(restored.optimizer.slots[slot])
        assert all(np.array_equal(value, restored.optimizer.slots[slot][k]) for k, value in tensors.items()), slot


def test_export_takes_multiples_of_the_strides(tmp_path):
    """The ``.jaxexport`` of a MONAI model has sides that are symbolic multiples of the strides'
    product: one file runs at two volumes and matches MONAI in float64, and refuses another side."""
    config = MonaiConfig(2, 3, (4, 8, 16), spatial_dims=3, strides=(2, 1))  # sides: multiples of 2
    net = monai_net(config, seed=12)
    path = tmp_path / "monai.jaxexport"
    export.export(checkpoint_of(net, config), path, "float64")
    for shape in [(1, 2, 4, 8, 12), (2, 2, 6, 2, 4)]:
        x = np.random.default_rng(13).normal(size=shape)
        expected = monai_blocks(net.eval(), config, x)["logits"]
        assert rel_error(nchw(export.run(path, channels_last(x))), expected) <= FLOAT64
    with pytest.raises(ValueError, match="Division had remainder 1 when computing the value of 'depth'"):
        export.run(path, np.zeros((1, 5, 8, 12, 2)))  # a depth of 5 is no multiple of 2
