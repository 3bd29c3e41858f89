"""Flax NNX against the PyTorch float64 reference, through both parity runners and the converter:
block outputs in eval and train mode, running statistics, gradients, one SGD and one Adam step."""

import jax
import numpy as np
import pytest

import weights_convert
from impl_flax import runner as flax_runner
from impl_torch import runner as torch_runner
from weights_convert.compare import assert_rows_pass, compare, first_failure
from weights_convert.random_init import random_checkpoint
from weights_convert.spec import ModelConfig, param_specs

SMALL = [
    pytest.param(ModelConfig(3, 1, (4, 8, 16)), (16, 16), id="depth2-16x16"),
    pytest.param(ModelConfig(3, 1, (4, 8, 16)), (37, 53), id="depth2-37x53"),
    pytest.param(ModelConfig(2, 3, (8, 16, 32, 64, 128)), (45, 33), id="depth4-45x33"),
]


@pytest.fixture(autouse=True)
def x64_unchanged():
    """float64 runs switch x64 on in a scope only; no test may leave it changed."""
    before = jax.config.jax_enable_x64
    yield
    assert jax.config.jax_enable_x64 == before


def inputs(config: ModelConfig, size, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 1.0, (batch, config.in_channels, *size))
    target = rng.normal(0.0, 1.0, (batch, config.out_channels, *size))
    return x, target


def pre_batchnorm_convs(config: ModelConfig) -> list[str]:
    """Convs whose output goes straight into a BatchNorm (``X.i`` followed by ``X.i+1``)."""
    bns = {p.module for p in param_specs(config) if p.layer == "bn"}
    convs = []
    for p in param_specs(config):
        parent, _, index = p.module.rpartition(".")
        if p.layer != "bn" and p.leaf == "weight" and index.isdigit() and f"{parent}.{int(index) + 1}" in bns:
            convs.append(p.module)
    return convs


def check(actual: dict, reference: dict, dtype: str, label: str, tolerance=None) -> None:
    """Every reference quantity compared (weights_convert.compare), the first drift named.

    Gradient rows are scaled by the largest entry of the whole gradient, as the parity command
    does: the conv biases in front of a train-mode BatchNorm have an exactly zero gradient (the
    BatchNorm subtracts the batch mean), so their own max|ref| is rounding noise.
    """
    grads = {k: v for k, v in reference.items() if k.startswith("grad/")}
    others = {k: v for k, v in reference.items() if k not in grads}
    rows = compare(actual, others, dtype, tolerance)
    if grads:
        scale = max(float(np.max(np.abs(v))) for v in grads.values())
        rows += compare(actual, grads, dtype, tolerance, scale=scale)
    assert len(rows) == len(reference) and rows, "nothing compared"
    assert_rows_pass(rows, f"{label}: ")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("config, size", SMALL)
def test_eval_forward(config, size, dtype):
    checkpoint = random_checkpoint(config, seed=1, dtype="float64")
    x, _ = inputs(config, size)
    reference = torch_runner.forward(checkpoint, x, dtype="float64")
    actual = flax_runner.forward(checkpoint.astype(dtype), x, dtype=dtype)
    assert list(actual) == list(reference)
    assert actual["output"].shape == (2, config.out_channels, *size)
    check(actual, reference, dtype, f"eval {dtype}")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("config, size", SMALL)
def test_train_forward_and_running_statistics(config, size, dtype):
    checkpoint = random_checkpoint(config, seed=2, dtype="float64")
    x, _ = inputs(config, size, seed=1)
    reference = torch_runner.forward(checkpoint, x, dtype="float64", train=True)
    actual = flax_runner.forward(checkpoint.astype(dtype), x, dtype=dtype, train=True)
    # Every BatchNorm's running mean, running variance (unbiased) and counter after one batch.
    assert sorted(k for k in actual if k.startswith("state/")) == sorted(k for k in reference if k.startswith("state/"))
    assert all(int(actual[k]) == 101 for k in actual if k.endswith("num_batches_tracked"))
    check(actual, reference, dtype, f"train {dtype}")


# Odd sizes here (the pad after upsampling is in the backward pass too); the even-sized gradients
# come from the article test below.
STEPS = [
    pytest.param(ModelConfig(3, 1, (4, 8, 16)), (37, 53), "sgd", id="depth2-37x53-sgd"),
    pytest.param(ModelConfig(3, 1, (4, 8, 16)), (37, 53), "adam", id="depth2-37x53-adam"),
    pytest.param(ModelConfig(2, 3, (8, 16, 32, 64, 128)), (45, 33), "sgd", id="depth4-45x33-sgd"),
]


@pytest.mark.parametrize("config, size, optimizer", STEPS)
def test_gradients_and_optimizer_step_float64(config, size, optimizer):
    checkpoint = random_checkpoint(config, seed=3, dtype="float64")
    x, target = inputs(config, size, seed=2)
    reference = torch_runner.train_step(checkpoint, x, target, dtype="float64", optimizer=optimizer)
    actual = flax_runner.train_step(checkpoint, x, target, dtype="float64", optimizer=optimizer)
    trainable = [p.name for p in param_specs(config) if not p.is_buffer]
    assert sorted(actual) == sorted([f"grad/{n}" for n in trainable] + [f"step/{n}" for n in trainable])
    # The step moved every parameter that has a gradient (it is not the identity).
    moved = [n for n in trainable if not np.array_equal(actual[f"step/{n}"], checkpoint.tensors[n])]
    assert len(moved) >= len(trainable) - len(pre_batchnorm_convs(config))
    check(actual, reference, "float64", optimizer)


@pytest.mark.parametrize(
    "name, block",
    [("e2.conv.conv.3.weight", "e2"), ("d1.ag.Ws.1.running_var", "d1.ag"), ("d2.c1.conv.0.bias", "d2")],
)
def test_a_perturbed_parameter_fails_and_names_its_block(name, block):
    """A parity check that cannot fail proves nothing: change one tensor on the Flax side only."""
    config = ModelConfig(3, 1, (4, 8, 16))
    checkpoint = random_checkpoint(config, seed=4, dtype="float64")
    x, _ = inputs(config, (16, 16))
    reference = torch_runner.forward(checkpoint, x, dtype="float64")
    perturbed = weights_convert.Checkpoint(checkpoint.config, dict(checkpoint.tensors))
    perturbed.tensors[name] = perturbed.tensors[name] * (1 + 1e-6)
    rows = compare(flax_runner.forward(perturbed, x, dtype="float64"), reference, "float64")
    assert first_failure(rows) == block
    with pytest.raises(AssertionError, match=f"first drift at {block};"):
        assert_rows_pass(rows)


# The default configuration, once, on the article's own checkpoint and input.


@pytest.fixture(scope="module")
def article(reference_dir, reference_input):
    checkpoint = weights_convert.read(reference_dir / "article_state_dict.pt").astype("float64")
    return checkpoint, reference_input


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_article_eval(article, reference_dir, dtype):
    checkpoint, x = article
    actual = flax_runner.forward(checkpoint.astype(dtype), x, dtype=dtype)
    expected = np.load(reference_dir / f"output_eval_{dtype}.npy")
    check({"output": actual["output"]}, {"output": expected}, dtype, "article output")
    check(actual, torch_runner.forward(checkpoint, x, dtype="float64"), dtype, f"article eval {dtype}")


@pytest.mark.slow
def test_article_train_mode_gradients_and_steps(article):
    """Train mode on the article's weights; the input is a 16x24 crop of the reference input, which
    keeps torch's float64 backward pass short while every BatchNorm still sees 12+ values per channel."""
    checkpoint, x = article
    x = x[:, :, :16, :24]
    target = np.random.default_rng(5).normal(0.0, 1.0, (x.shape[0], 1, *x.shape[2:]))
    reference = torch_runner.forward(checkpoint, x, dtype="float64", train=True)
    check(flax_runner.forward(checkpoint, x, dtype="float64", train=True), reference, "float64", "article train")
    for optimizer in ("sgd", "adam"):
        reference = torch_runner.train_step(checkpoint, x, target, dtype="float64", optimizer=optimizer)
        actual = flax_runner.train_step(checkpoint, x, target, dtype="float64", optimizer=optimizer)
        if optimizer == "adam":  # the same gradients as for SGD: compare the step only
            actual, reference = ({k: v for k, v in r.items() if k.startswith("step/")} for r in (actual, reference))
        check(actual, reference, "float64", f"article {optimizer}")
