"""impl_keras.runner on every Keras backend: ``fit`` (one optimizer over several steps) against
PyTorch's own ``fit`` in float64, and the ``"mixed_bfloat16"`` policy through forward, train_step and
fit. Each backend runs its whole batch once (a subprocess unless it is this process's backend).

A depth-1 model (every kind of block: encoder, bridge, gate, upsampling, odd-size padding, head)
keeps the compilation of each training step short; ``test_keras_parity`` covers deeper ones."""

import numpy as np
import pytest

from impl_torch import runner as torch_runner
from tests.conftest import rel_error
from weights_convert.core.random_init import random_checkpoint
from weights_convert.core.spec import ModelConfig, param_specs
from weights_convert.harness.keras_worker import BACKENDS, Call, run_batch_in_backend
from weights_convert.harness.parity.tolerances import TOLERANCES

CONFIG = ModelConfig(3, 1, (4, 8))
CHECKPOINT = random_checkpoint(CONFIG, seed=11, dtype="float64")
CHECKPOINT_32 = CHECKPOINT.astype("float32")
STEPS = 3
_rng = np.random.default_rng(5)
XS = _rng.uniform(size=(STEPS, 2, 3, 13, 11))  # odd sizes: floors in the pools, pads in the decoder
TARGETS = _rng.normal(size=(STEPS, 2, 1, 13, 11))
MIXED = {"dtype": "mixed_bfloat16"}

# Orders of magnitude only (the noise-relative bounds are test_keras_parity's). bfloat16 keeps 8
# significant bits (rounding ~4e-3 per operation): through the network the outputs' relative error
# against float64 lands between these. Far below would mean float32 computation, far above a wrong
# one. Gradients through 20 train-mode BatchNorms are ill-conditioned: torch's own bfloat16 autocast
# is off by up to ~0.2 of the gradient's scale on this model, so only their upper bound is wider.
BFLOAT16_ERROR = (1e-4, 1e-1)
BFLOAT16_GRADIENT_ERROR = (1e-4, 1.0)
# float32 rounds at 6e-8 per operation: a loss off by more than this is not rounding.
FLOAT32_LOSS_ERROR = 1e-4

CALLS = {
    "fit_float64_sgd": Call("fit", CHECKPOINT, XS, TARGETS, {"dtype": "float64", "optimizer": "sgd"}),
    "fit_float64_adam": Call("fit", CHECKPOINT, XS, TARGETS, {"dtype": "float64", "optimizer": "adam"}),
    "fit_float32_adam": Call("fit", CHECKPOINT_32, XS, TARGETS, {"dtype": "float32", "optimizer": "adam"}),
    "mixed_eval": Call("forward", CHECKPOINT_32, XS[0], kwargs=MIXED),
    # train_step and fit with the same optimizer share the compiled functions.
    "mixed_step": Call("train_step", CHECKPOINT_32, XS[0], TARGETS[0], {**MIXED, "optimizer": "adam"}),
    "mixed_fit": Call("fit", CHECKPOINT_32, XS, TARGETS, {**MIXED, "optimizer": "adam", "trajectory": True}),
}


@pytest.fixture(scope="module")
def keras_runs():
    """backend -> {call name: results}, each backend's batch run once, on first use."""
    runs: dict[str, dict] = {}

    def get(backend: str) -> dict:
        if backend not in runs:
            runs[backend] = dict(zip(CALLS, run_batch_in_backend(backend, list(CALLS.values())), strict=True))
        return runs[backend]

    return get


@pytest.fixture(scope="module")
def torch_fits():
    cache: dict[str, dict] = {}

    def get(optimizer: str) -> dict:
        if optimizer not in cache:
            cache[optimizer] = torch_runner.fit(CHECKPOINT, XS, TARGETS, dtype="float64", optimizer=optimizer)
        return cache[optimizer]

    return get


def fit_errors(actual: dict, reference: dict) -> dict:
    """name -> relative error of every float quantity of a fit (each loss against the largest loss;
    every tensor against its own largest entry)."""
    assert list(actual) == list(reference)
    losses = [k for k in reference if k.startswith("loss/")]
    largest_loss = max(abs(float(reference[k])) for k in losses)
    return {
        k: rel_error(actual[k], reference[k], largest_loss if k in losses else 0.0)
        for k in reference
        if not k.endswith("num_batches_tracked")
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fit_float64_matches_torch(keras_runs, torch_fits, backend, optimizer):
    actual, reference = keras_runs(backend)[f"fit_float64_{optimizer}"], torch_fits(optimizer)
    trainable = [p.name for p in param_specs(CONFIG) if not p.is_buffer]
    buffers = [p.name for p in param_specs(CONFIG) if p.is_buffer]
    expected_keys = [f"loss/step{k + 1}" for k in range(STEPS)]
    expected_keys += [f"param/{n}" for n in trainable] + [f"state/{n}" for n in buffers]
    assert list(actual) == expected_keys
    assert all(actual[k].shape == () and actual[k].dtype == np.float64 for k in expected_keys[:STEPS])
    errors = fit_errors(actual, reference)
    worst = max(errors, key=errors.get)
    print(f"{backend} {optimizer} fit float64: worst {worst} {errors[worst]:.2e}")
    assert errors[worst] <= TOLERANCES["float64"], f"{backend} {optimizer}: {worst} off by {errors[worst]:.3g}"
    counters = [k for k in reference if k.endswith("num_batches_tracked")]
    assert all(actual[k] == reference[k] == CHECKPOINT.tensors[k[len("state/") :]] + STEPS for k in counters)
    # Every step moved the parameters: each loss differs from the previous one.
    assert len({float(actual[k]) for k in expected_keys[:STEPS]}) == STEPS


@pytest.mark.parametrize("backend", BACKENDS)
def test_fit_float32_runs(keras_runs, torch_fits, backend):
    actual = keras_runs(backend)["fit_float32_adam"]
    assert all(v.dtype == np.float32 for k, v in actual.items() if not k.endswith("num_batches_tracked"))
    assert all(np.isfinite(v).all() for v in actual.values())
    errors = fit_errors(actual, torch_fits("adam"))
    worst = max(errors, key=errors.get)
    losses = max(v for k, v in errors.items() if k.startswith("loss/"))
    print(f"{backend} adam fit float32 against torch float64: losses {losses:.2e}, worst {worst} {errors[worst]:.2e}")
    assert losses < FLOAT32_LOSS_ERROR


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_bfloat16_forward(keras_runs, backend):
    actual = keras_runs(backend)["mixed_eval"]
    reference = torch_runner.forward(CHECKPOINT, XS[0], dtype="float64")
    assert list(actual) == list(reference)
    assert all(v.dtype == np.float32 for v in actual.values())
    error = rel_error(actual["output"], reference["output"])
    print(f"{backend} mixed_bfloat16 eval output against float64: {error:.2e}")
    assert BFLOAT16_ERROR[0] < error < BFLOAT16_ERROR[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_bfloat16_train_step(keras_runs, backend):
    actual = keras_runs(backend)["mixed_step"]
    reference = torch_runner.train_step(CHECKPOINT, XS[0], TARGETS[0], dtype="float64", optimizer="adam")
    assert list(actual) == list(reference)
    # Gradients and steps are float32: the parameters' dtype, not the compute dtype.
    assert all(v.dtype == np.float32 for v in actual.values())
    grads = {k: v for k, v in reference.items() if k.startswith("grad/")}
    # One scale for the whole gradient: the conv biases in front of a train-mode BatchNorm have an
    # exactly zero gradient, which a per-tensor scale would compare with rounding noise.
    scale = max(float(np.max(np.abs(v))) for v in grads.values())
    grad_error = max(rel_error(actual[k], v, scale) for k, v in grads.items())
    print(f"{backend} mixed_bfloat16 gradients against float64: {grad_error:.2e}")
    assert BFLOAT16_GRADIENT_ERROR[0] < grad_error < BFLOAT16_GRADIENT_ERROR[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_bfloat16_fit(keras_runs, torch_fits, backend):
    runs = keras_runs(backend)
    actual, float32 = runs["mixed_fit"], runs["fit_float32_adam"]
    path = {k: v for k, v in actual.items() if k.startswith("trajectory/")}
    actual = {k: v for k, v in actual.items() if k not in path}
    assert list(actual) == list(float32)
    params = {k[len("param/") :]: v for k, v in actual.items() if k.startswith("param/")}
    assert len(path) == STEPS * len(params)
    assert all(np.array_equal(path[f"trajectory/step{STEPS}/{name}"], v) for name, v in params.items())
    # Parameters and running statistics stay float32; so does the loss, computed from float32 logits.
    assert all(v.dtype == np.float32 for k, v in actual.items() if not k.endswith("num_batches_tracked"))
    errors = fit_errors(actual, torch_fits("adam"))
    losses = max(v for k, v in errors.items() if k.startswith("loss/"))
    state = max(v for k, v in errors.items() if k.startswith("state/"))
    print(f"{backend} mixed_bfloat16 fit against float64: losses {losses:.2e}, running statistics {state:.2e}")
    # The losses average the squared error against O(1) targets, which hides most of the logits'
    # rounding; the running statistics average bfloat16 activations over three steps.
    assert losses < BFLOAT16_ERROR[1]
    assert BFLOAT16_ERROR[0] < state < BFLOAT16_ERROR[1]
    # bfloat16 really computes: the float32 fit from the same weights and batches ends elsewhere.
    running = [k for k in actual if k.startswith("state/") and not k.endswith("num_batches_tracked")]
    assert max(rel_error(actual[k], float32[k]) for k in running) > BFLOAT16_ERROR[0]
