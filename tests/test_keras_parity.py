"""Keras against the PyTorch reference on every backend: TensorFlow in this process, JAX and PyTorch
in one subprocess each (the backend is fixed when Keras is imported).

Every Keras quantity is compared with PyTorch in float64 through ``weights_convert.compare``: block
outputs in eval and train mode, running statistics, gradients, one SGD and one Adam step, the
article's reference outputs from its ``.pt`` file, and files in the Keras formats. All the work of a
backend runs as one batch (``impl_keras.runner.run_batch_in_backend``), once per session.
"""

import numpy as np
import pytest

import impl_keras
import weights_convert
from impl_keras.runner import BACKENDS, Call, run_batch_in_backend
from impl_torch import runner as torch_runner
from weights_convert.compare import assert_rows_pass, compare, first_failure, rel_diff
from weights_convert.random_init import random_checkpoint
from weights_convert.spec import ModelConfig, param_specs
from weights_convert.tolerances import TOLERANCES

CONFIG = ModelConfig(3, 2, (4, 8, 16))  # odd input size below: floors in the pools, pads in the decoder
DEEPER = ModelConfig(2, 1, (4, 8, 16, 32))
CHECKPOINT = random_checkpoint(CONFIG, seed=1, dtype="float64")
CHECKPOINT_32 = CHECKPOINT.astype("float32")
DEEPER_CHECKPOINT = random_checkpoint(DEEPER, seed=2, dtype="float64")
_rng = np.random.default_rng(0)
X = _rng.uniform(size=(2, 3, 19, 13))
TARGET = _rng.normal(size=(2, 2, 19, 13))
DEEPER_X = _rng.uniform(size=(1, 2, 24, 17))

# One parameter changed on the Keras side only: the comparison must fail and name its block.
PERTURBED_NAME = "d1.ag.Ws.0.weight"  # the skip's 1x1 conv in the deepest gate: first seen in "d1.ag"
PERTURBED = weights_convert.Checkpoint(CONFIG, dict(CHECKPOINT.tensors))
PERTURBED.tensors[PERTURBED_NAME] = PERTURBED.tensors[PERTURBED_NAME] * (1 + 1e-6)


def cases(reference_dir, keras_files) -> dict:
    """name -> (Call, the torch float64 call giving its reference)."""
    x64 = {"dtype": "float64"}
    ref_x = np.load(reference_dir / "input_nchw.npy")
    article = str(reference_dir / "article_state_dict.pt")
    return {
        "eval_float64": Call("forward", CHECKPOINT, X, kwargs=x64),
        "eval_float64_deeper": Call("forward", DEEPER_CHECKPOINT, DEEPER_X, kwargs=x64),
        "eval_float32": Call("forward", CHECKPOINT_32, X, kwargs={"dtype": "float32"}),
        "train_float64": Call("forward", CHECKPOINT, X, kwargs={**x64, "train": True}),
        "train_float32": Call("forward", CHECKPOINT_32, X, kwargs={"dtype": "float32", "train": True}),
        "sgd_float64": Call("train_step", CHECKPOINT, X, TARGET, {**x64, "optimizer": "sgd"}),
        "adam_float64": Call("train_step", CHECKPOINT, X, TARGET, {**x64, "optimizer": "adam"}),
        "perturbed": Call("forward", PERTURBED, X, kwargs=x64),
        "article_float32": Call("forward", article, ref_x, kwargs={"dtype": "float32"}),
        "article_float64": Call("forward", article, ref_x, kwargs=x64),
        **{f"file{suffix}": Call("forward", path, X, kwargs=x64) for suffix, path in keras_files.items()},
    }


def torch_reference(name: str) -> dict:
    if name.startswith(("eval", "perturbed", "file")):
        checkpoint, x = (DEEPER_CHECKPOINT, DEEPER_X) if name.endswith("deeper") else (CHECKPOINT, X)
        return torch_runner.forward(checkpoint, x, dtype="float64")
    if name.startswith("train"):
        return torch_runner.forward(CHECKPOINT, X, dtype="float64", train=True)
    optimizer = name.split("_")[0]
    return torch_runner.train_step(CHECKPOINT, X, TARGET, dtype="float64", optimizer=optimizer)


@pytest.fixture(scope="session")
def keras_files(tmp_path_factory) -> dict:
    """CHECKPOINT saved by Keras (this process's backend) in both Keras formats."""
    directory = tmp_path_factory.mktemp("keras_files")
    model = impl_keras.from_checkpoint(CHECKPOINT, "float64")
    paths = {suffix: str(directory / f"model{suffix}") for suffix in (".weights.h5", ".keras")}
    for path in paths.values():
        impl_keras.save(model, path)
    return paths


@pytest.fixture(scope="session")
def keras_runs(reference_dir, keras_files):
    """backend -> {case name: Keras results}, each backend's batch run once, on first use."""
    calls = cases(reference_dir, keras_files)
    runs: dict[str, dict] = {}

    def get(backend: str) -> dict:
        if backend not in runs:
            results = run_batch_in_backend(backend, list(calls.values()))
            runs[backend] = dict(zip(calls, results, strict=True))
        return runs[backend]

    return get


@pytest.fixture(scope="session")
def torch_runs():
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            cache[name] = torch_reference(name)
        return cache[name]

    return get


def only(results: dict, prefix: str = "", exclude=()) -> dict:
    """The quantities named ``prefix...`` (block outputs for ""), minus ``exclude``."""
    if prefix:
        return {k: v for k, v in results.items() if k.startswith(prefix) and k not in exclude}
    return {k: v for k, v in results.items() if "/" not in k}


def check(actual: dict, reference: dict, dtype: str, label: str):
    rows = compare(actual, reference, dtype)
    assert rows, f"{label}: nothing compared"
    assert_rows_pass(rows, f"{label}: ")
    return rows


def zero_gradient_biases(config: ModelConfig) -> set[str]:
    """``grad/`` names of conv biases that feed a BatchNorm: in training mode the BatchNorm
    subtracts the batch mean, so their gradient is exactly zero and both frameworks return
    rounding noise (~1e-17); a relative error of noise against noise means nothing."""
    names = {p.name for p in param_specs(config)}
    result = set()
    for p in param_specs(config):
        parent, _, index = p.module.rpartition(".")
        if (
            p.layer != "bn"
            and p.leaf == "bias"
            and index.isdigit()
            and f"{parent}.{int(index) + 1}.running_mean" in names
        ):
            result.add(f"grad/{p.name}")
    return result


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["eval_float64", "eval_float64_deeper"])
def test_eval_float64(keras_runs, torch_runs, backend, case):
    check(only(keras_runs(backend)[case]), only(torch_runs(case)), "float64", f"{backend} {case}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_float32(keras_runs, torch_runs, backend):
    rows = check(keras_runs(backend)["eval_float32"], torch_runs("eval_float32"), "float32", backend)
    assert [r.quantity for r in rows] == ["e1", "e2", "b1", "d1.ag", "d1", "d2.ag", "d2", "output"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_train_mode_forward_and_running_statistics(keras_runs, torch_runs, backend, dtype):
    actual, reference = keras_runs(backend)[f"train_{dtype}"], torch_runs(f"train_{dtype}")
    check(only(actual), only(reference), dtype, f"{backend} train outputs ")
    state = check(only(actual, "state/"), only(reference, "state/"), dtype, f"{backend} running statistics ")
    assert len(state) == len([p for p in param_specs(CONFIG) if p.is_buffer])
    counters = [k for k in reference if k.endswith("num_batches_tracked")]
    assert all(actual[k] == reference[k] == CHECKPOINT.tensors[k[len("state/") :]] + 1 for k in counters)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_float64(keras_runs, torch_runs, backend):
    actual, reference = keras_runs(backend)["sgd_float64"], torch_runs("sgd_float64")
    gradient = only(reference, "grad/")
    # One vector, scaled by its largest entry (as the parity command does): the conv biases in
    # front of a train-mode BatchNorm have an exactly zero gradient, ~1e-17 of rounding noise on
    # both sides, which a per-tensor scale would compare with itself.
    scale = max(float(np.max(np.abs(v))) for v in gradient.values())
    rows = compare(only(actual, "grad/"), gradient, "float64", scale=scale)
    assert_rows_pass(rows, f"{backend} gradients: ")
    assert len(rows) == len([p for p in param_specs(CONFIG) if not p.is_buffer])
    zero = zero_gradient_biases(CONFIG)
    assert all(np.max(np.abs(gradient[name])) <= TOLERANCES["float64"] * scale for name in zero)
    assert all(np.max(np.abs(v)) > TOLERANCES["float64"] * scale for k, v in gradient.items() if k not in zero)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_one_optimizer_step_float64(keras_runs, torch_runs, backend, optimizer):
    actual, reference = keras_runs(backend)[f"{optimizer}_float64"], torch_runs(f"{optimizer}_float64")
    rows = check(only(actual, "step/"), only(reference, "step/"), "float64", f"{backend} {optimizer} step ")
    assert len(rows) == len([p for p in param_specs(CONFIG) if not p.is_buffer])
    # The step moved every parameter whose gradient is not zero (comparing unchanged weights
    # would prove nothing).
    still = {k for k, v in only(reference, "step/").items() if np.array_equal(v, CHECKPOINT.tensors[k[len("step/") :]])}
    assert {f"grad/{k[len('step/') :]}" for k in still} <= zero_gradient_biases(CONFIG)


@pytest.mark.parametrize("backend", BACKENDS)
def test_perturbed_parameter_fails_and_names_its_block(keras_runs, torch_runs, backend):
    rows = compare(keras_runs(backend)["perturbed"], torch_runs("perturbed"), "float64")
    assert first_failure(rows) == "d1.ag"
    assert all(r.passed for r in rows[:3])  # e1, e2, b1 do not see the change
    with pytest.raises(AssertionError, match="first drift at d1.ag"):
        assert_rows_pass(rows)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_reproduces_article_outputs(keras_runs, reference_dir, backend, dtype):
    """``impl_keras.load(article_state_dict.pt, dtype)`` under each backend gives the article's output."""
    output = keras_runs(backend)[f"article_{dtype}"]["output"]
    expected = np.load(reference_dir / f"output_eval_{dtype}.npy")
    _, rel = rel_diff(output, expected, dtype)
    assert rel <= TOLERANCES[dtype], f"{backend} {dtype}: rel {rel:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("suffix", [".weights.h5", ".keras"])
def test_keras_files_load_under_every_backend(keras_runs, torch_runs, backend, suffix):
    """Files Keras wrote under this process's backend, loaded by ``impl_keras.load`` under each."""
    check(keras_runs(backend)[f"file{suffix}"], torch_runs("eval_float64"), "float64", f"{backend} {suffix} ")
