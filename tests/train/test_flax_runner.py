"""``impl_flax.runner``: the functions the parity harness runs, checked on tiny configs: multi-step
fits against PyTorch in float64, and the mixed bfloat16 precision."""

import jax
import numpy as np
import pytest

from impl_flax import runner, trainer
from impl_torch import runner as torch_runner
from tests.conftest import rel_error
from weights_convert.core.random_init import random_checkpoint
from weights_convert.core.spec import ModelConfig, param_specs
from weights_convert.harness.parity.tolerances import TOLERANCES

# One level and one batch shape for every test here: each new shape or config compiles the training
# step again (seconds of XLA time each). The odd size pads after upsampling, forward and backward.
CONFIG = ModelConfig(3, 1, (4, 8))
STEPS = 3
SIZE = (13, 11)


@pytest.fixture(autouse=True)
def x64_unchanged():
    """float64 runs switch x64 on in a scope only; no test may leave it changed."""
    before = jax.config.jax_enable_x64
    yield
    assert jax.config.jax_enable_x64 == before


def fit_data(steps=STEPS, seed=5):
    rng = np.random.default_rng(seed)
    xs = rng.uniform(size=(steps, 2, CONFIG.in_channels, *SIZE))
    targets = rng.uniform(size=(steps, 2, CONFIG.out_channels, *SIZE))
    return xs, targets


def checkpoint64(seed=4):
    return random_checkpoint(CONFIG, seed=seed, dtype="float64")


# fit in float64 against PyTorch's (one torch.optim optimizer over every step).


def zero_gradient_biases(config: ModelConfig) -> set[str]:
    """Biases of the convs right in front of a train-mode BatchNorm: their gradient is exactly zero
    (the BatchNorm subtracts the batch mean), so what Adam makes of it is amplified rounding noise."""
    bns = {p.module for p in param_specs(config) if p.layer == "bn"}
    biases = set()
    for p in param_specs(config):
        parent, _, index = p.module.rpartition(".")
        if p.layer != "bn" and p.leaf == "bias" and index.isdigit() and f"{parent}.{int(index) + 1}" in bns:
            biases.add(p.name)
    return biases


def move_errors(actual: dict, expected: dict, checkpoint) -> dict:
    """The moves of the parameters in a fit (a few lr * g, far below the parameters' own scale),
    relative to the largest move, as gradients are compared."""
    trainable = [n.split("/", 1)[1] for n in expected if n.startswith("param/")]
    moves = {n: (actual[f"param/{n}"], expected[f"param/{n}"] - checkpoint.tensors[n]) for n in trainable}
    largest = max(float(np.max(np.abs(move))) for _, move in moves.values())
    return {
        f"move/{name}": float(np.max(np.abs(value - checkpoint.tensors[name] - move))) / largest
        for name, (value, move) in moves.items()
        if name not in zero_gradient_biases(checkpoint.config)
    }


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fit_float64_matches_torch(optimizer):
    checkpoint = checkpoint64()
    xs, targets = fit_data()
    actual = runner.fit(checkpoint, xs, targets, dtype="float64", optimizer=optimizer)
    expected = torch_runner.fit(checkpoint, xs, targets, dtype="float64", optimizer=optimizer)
    assert list(actual) == list(expected)
    assert list(actual)[: STEPS + 1] == ["loss/step1", "loss/step2", "loss/step3", "param/e1.conv.conv.0.weight"]
    errors = {}
    for name, value in expected.items():
        assert actual[name].shape == value.shape and actual[name].dtype == value.dtype, name
        # Losses, parameters and statistics, each relative to its own scale.
        errors[name] = rel_error(actual[name], value, floor=1e-30)
    errors.update(move_errors(actual, expected, checkpoint))
    worst = max(errors, key=errors.get)
    print(f"fit float64 {optimizer}: worst relative error {errors[worst]:.2e} ({worst})")
    assert all(error <= TOLERANCES["float64"] for error in errors.values()), worst
    counter = "e1.conv.conv.1.num_batches_tracked"
    assert actual[f"state/{counter}"] == checkpoint.tensors[counter] + STEPS


def test_fit_compiles_the_step_once(monkeypatch):
    """One jitted step for every step and every fit of the same shapes: the loss is traced at most
    once (never, when an earlier test already compiled these shapes)."""
    traced = []

    def loss_fn(*args):
        traced.append(1)
        return original(*args)

    original = trainer.loss_fn
    monkeypatch.setattr(trainer, "loss_fn", loss_fn)
    checkpoint = checkpoint64().astype("float32")
    for _ in range(2):
        runner.fit(checkpoint, *fit_data(), dtype="float32", optimizer="adam")
    assert len(traced) <= 1


def test_fit_trajectory_records_every_step():
    xs, targets = fit_data()
    results = runner.fit(checkpoint64(), xs, targets, dtype="float64", optimizer="sgd", trajectory=True)
    name = "output.weight"
    path = [results[f"trajectory/step{k}/{name}"] for k in range(1, STEPS + 1)]
    assert np.array_equal(path[-1], results[f"param/{name}"])
    assert not np.array_equal(path[0], path[1]) and not np.array_equal(path[1], path[2])
    assert list(results)[-1] == f"trajectory/step{STEPS}/output.bias"


@pytest.mark.parametrize("dtype", ["float32", "mixed_bfloat16"])
def test_fit_runs_below_float64(dtype):
    checkpoint = checkpoint64()
    xs, targets = fit_data()
    results = runner.fit(checkpoint.astype("float32"), xs, targets, dtype=dtype, optimizer="adam")
    expected = torch_runner.fit(checkpoint, xs, targets, dtype="float64", optimizer="adam")
    assert list(results) == list(expected)
    losses = [results[f"loss/step{k}"] for k in range(1, STEPS + 1)]
    assert all(loss.shape == () and loss.dtype == np.float32 and np.isfinite(loss) for loss in losses)
    # Parameters and running statistics stay float32 under mixed precision.
    assert {v.dtype for k, v in results.items() if not k.endswith("num_batches_tracked")} == {np.dtype("float32")}
    counter = "e1.conv.conv.1.num_batches_tracked"
    assert results[f"state/{counter}"] == checkpoint.tensors[counter] + STEPS
    error = max(rel_error(results[k], expected[k], floor=1.0) for k in expected if k.startswith("loss/"))
    print(f"fit {dtype}: losses vs float64 {error:.2e}")
    # Orders of magnitude only (the parity harness holds the exact bounds): float32 rounding
    # (~6e-8) stays far below 1e-4, bfloat16 rounding (~4e-3) stays below 1e-1.
    assert error < (1e-4 if dtype == "float32" else 1e-1)


def test_fit_rejects_mismatched_steps():
    xs, targets = fit_data()
    with pytest.raises(
        ValueError, match=r"same number of steps \(at least 1\), got shapes \(3, 2, 3, 13, 11\) and \(2,"
    ):
        runner.fit(checkpoint64(), xs, targets[:2])
    with pytest.raises(ValueError, match="got shapes \\(0, 2, 3, 13, 11\\)"):
        runner.fit(checkpoint64(), xs[:0], targets[:0])


def test_unknown_optimizer_and_dtype_are_refused():
    xs, targets = fit_data(steps=1)
    with pytest.raises(ValueError, match="optimizer must be one of \\['adam', 'sgd'\\], got 'rmsprop'"):
        runner.fit(checkpoint64(), xs, targets, optimizer="rmsprop")
    with pytest.raises(ValueError, match="dtype must be one of \\['float32', 'float64', 'mixed_bfloat16'\\], got 'bf"):
        runner.forward(checkpoint64(), xs[0], dtype="bfloat16")


def test_matmul_precision_is_highest_unless_the_caller_chose():
    """TF32 stays off by default on a GPU; a caller's explicit choice (the parity command's TF32
    rows) is kept."""
    with runner._scope("float32", "cpu"):
        assert jax.config.jax_default_matmul_precision == "highest"
    with jax.default_matmul_precision("tensorfloat32"), runner._scope("mixed_bfloat16", "cpu"):
        assert jax.config.jax_default_matmul_precision == "tensorfloat32"


# Mixed bfloat16: float32 parameters, bfloat16 compute, float32 results.


def test_mixed_bfloat16_forward_and_train_step():
    checkpoint = checkpoint64()
    xs, targets = fit_data(steps=1)
    x, target = xs[0], targets[0]
    errors, outputs = {}, {}
    for mode in ("eval", "train"):
        expected = torch_runner.forward(checkpoint, x, dtype="float64", train=mode == "train")
        mixed = runner.forward(checkpoint.astype("float32"), x, dtype="mixed_bfloat16", train=mode == "train")
        assert list(mixed) == list(expected)
        assert all(v.dtype == np.float32 for k, v in mixed.items() if not k.endswith("num_batches_tracked"))
        errors[f"{mode} output"] = rel_error(mixed["output"], expected["output"], floor=1.0)
        outputs[mode] = mixed["output"], expected["output"]
    # bfloat16 really computes: the outputs are not the float32 run's.
    strict = runner.forward(checkpoint.astype("float32"), x, dtype="float32")["output"]
    assert not np.array_equal(outputs["eval"][0], strict)
    errors["eval float32 output"] = rel_error(strict, outputs["eval"][1], floor=1.0)
    expected = torch_runner.train_step(checkpoint, x, target, dtype="float64", optimizer="adam")
    mixed = runner.train_step(checkpoint.astype("float32"), x, target, dtype="mixed_bfloat16", optimizer="adam")
    assert list(mixed) == list(expected) and {v.dtype for v in mixed.values()} == {np.dtype("float32")}
    grads = [k for k in expected if k.startswith("grad/")]
    scale = max(float(np.max(np.abs(expected[k]))) for k in grads)
    errors["gradient"] = max(float(np.max(np.abs(mixed[k] - expected[k]))) for k in grads) / scale
    print("mixed_bfloat16 vs float64:", {k: f"{v:.2e}" for k, v in errors.items()})
    # Orders of magnitude only (the parity harness holds the exact bounds): bfloat16 keeps 8
    # mantissa bits (2**-8 = 3.9e-3 per rounding), so the outputs land between 1e-4 and 1e-1,
    # while float32 stays far below; the gradient, through 20 train-mode BatchNorms, within 1.
    assert 1e-4 < errors["eval output"] < 1e-1 and 1e-4 < errors["train output"] < 1e-1
    assert errors["eval float32 output"] < 1e-5 and errors["gradient"] < 1


# A 3D model (NCDHW in and out of the runner, NDHWC inside) through the same functions.
CONFIG_3D = ModelConfig(2, 1, (4, 8), spatial_dims=3)
SIZE_3D = (5, 7, 6)


def test_3d_forward_and_fit_float64_match_torch():
    """The runner's layout changes and the trainer's feed are rank-generic: a train-mode forward
    (blocks and running statistics) and a two-step SGD fit of a volume match PyTorch's in float64."""
    checkpoint = random_checkpoint(CONFIG_3D, seed=6, dtype="float64")
    rng = np.random.default_rng(7)
    xs = rng.uniform(size=(2, 2, CONFIG_3D.in_channels, *SIZE_3D))
    targets = rng.uniform(size=(2, 2, CONFIG_3D.out_channels, *SIZE_3D))
    forward = runner.forward(checkpoint, xs[0], dtype="float64", train=True)
    expected_forward = torch_runner.forward(checkpoint, xs[0], dtype="float64", train=True)
    actual = runner.fit(checkpoint, xs, targets, dtype="float64", optimizer="sgd")
    expected = torch_runner.fit(checkpoint, xs, targets, dtype="float64", optimizer="sgd")
    assert list(forward) == list(expected_forward) and list(actual) == list(expected)
    assert forward["output"].shape == (2, CONFIG_3D.out_channels, *SIZE_3D)
    errors = {f"forward/{name}": rel_error(forward[name], value) for name, value in expected_forward.items()}
    errors.update({f"fit/{name}": rel_error(actual[name], value, floor=1e-30) for name, value in expected.items()})
    errors.update(move_errors(actual, expected, checkpoint))
    worst = max(errors, key=errors.get)
    print(f"3D forward and fit float64: worst relative error {errors[worst]:.2e} ({worst})")
    assert all(error <= TOLERANCES["float64"] for error in errors.values()), worst
