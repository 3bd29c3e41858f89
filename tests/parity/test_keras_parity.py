"""Keras on every backend against the independent NumPy reference, judged as the parity command
judges: TensorFlow, JAX and PyTorch each in one batch (a subprocess unless it is this process's
backend, which is fixed when Keras is imported).

Block outputs in eval and train mode, running statistics, gradients, one SGD and one Adam step and
multi-step fits, in float64 (1e-10), float32 and mixed bfloat16 (relative to the reference's own
noise at that precision), of an image model and (train mode, a float64 fit) of a volume one; the
article's outputs from its ``.pt`` file, and files in the Keras formats.
"""

import numpy as np
import pytest

import impl_keras
import weights_convert
from tests import shared_runs
from tests.harness import assert_matches, judge, reference_and_noise
from weights_convert.core.random_init import random_checkpoint
from weights_convert.core.spec import ModelConfig, param_specs
from weights_convert.harness import parity
from weights_convert.harness.keras_worker import BACKENDS, Call
from weights_convert.harness.parity.compare import first_failure

# Depth 2 at an odd size: floors in the pools, pads in the decoder. The model and batch that
# test_parity_all's training rows run too: their Keras calls are these, answered from this run.
CONFIG, CHECKPOINT = shared_runs.SMALL_CONFIG, shared_runs.SMALL_CHECKPOINT
DEEPER = ModelConfig(2, 1, (4, 8, 16, 32))
DEEPER_CHECKPOINT = random_checkpoint(DEEPER, seed=2, dtype="float64")
INPUTS = parity.Inputs(*parity.make_inputs(CONFIG, 2, shared_runs.SMALL_SIZE))
DEEPER_INPUTS = parity.Inputs(*parity.make_inputs(DEEPER, 1, (24, 17)))
FIT_INPUTS = parity.Inputs(*parity.make_inputs(CONFIG, 2, shared_runs.SMALL_SIZE, steps=3))
# The same in 3D: the volume test_parity_all's 3D rows run too.
CONFIG_3D, CHECKPOINT_3D = shared_runs.SMALL_3D_CONFIG, shared_runs.SMALL_3D_CHECKPOINT
INPUTS_3D = parity.Inputs(*parity.make_inputs(CONFIG_3D, 2, shared_runs.SMALL_3D_SIZE))
FIT_INPUTS_3D = parity.Inputs(*parity.make_inputs(CONFIG_3D, 2, shared_runs.SMALL_3D_SIZE, steps=3))
# Cases by dimension: the suffix of their names and their checkpoint.
DIMENSIONS = {"2d": ("", CHECKPOINT), "3d": ("_3d", CHECKPOINT_3D)}
DTYPES = ["float64", "float32", "mixed_bfloat16"]
# A mixed-bfloat16 fit runs on the JAX backend only: its step is the mixed train case's, which every
# backend runs, and the fit adds the loop, one code path (every other case here is also a row of
# test_parity_all's runs over every backend, which answer it from this run's record).
ONE_BACKEND = "jax"


def runs_on(name: str, backend: str) -> bool:
    """Whether the case ``name`` is in ``backend``'s batch."""
    return name != "fit_mixed_bfloat16" or backend == ONE_BACKEND


# One parameter changed on the Keras side only: the comparison must fail and name its block.
PERTURBED_NAME = "d1.ag.Ws.0.weight"  # the skip's 1x1 conv in the deepest gate: first seen in "d1.ag"
PERTURBED = weights_convert.Checkpoint(CONFIG, dict(CHECKPOINT.tensors))
PERTURBED.tensors[PERTURBED_NAME] = PERTURBED.tensors[PERTURBED_NAME] * (1 + 1e-6)
PERTURBED_3D = weights_convert.Checkpoint(CONFIG_3D, dict(CHECKPOINT_3D.tensors))
PERTURBED_3D.tensors[PERTURBED_NAME] = PERTURBED_3D.tensors[PERTURBED_NAME] * (1 + 1e-6)


def cases(reference_dir, keras_files) -> dict:
    """name -> (checkpoint given to Keras, checkpoint of the reference, inputs, run, dtype)."""
    article = str(reference_dir / "article_state_dict.pt")
    article_checkpoint = weights_convert.read(article)
    article_inputs = parity.Inputs(np.load(reference_dir / "input_nchw.npy"), None)
    eval_, train = parity.Run("eval"), parity.Run("train")
    fit = parity.Run("fit", ("adam",), steps=3)
    table = {}
    for dtype in DTYPES:
        table[f"eval_{dtype}"] = (CHECKPOINT, CHECKPOINT, INPUTS, eval_, dtype)
        table[f"train_{dtype}"] = (CHECKPOINT, CHECKPOINT, INPUTS, train, dtype)
        table[f"fit_{dtype}"] = (CHECKPOINT, CHECKPOINT, FIT_INPUTS, fit, dtype)
        table[f"train_{dtype}_3d"] = (CHECKPOINT_3D, CHECKPOINT_3D, INPUTS_3D, train, dtype)
    table["fit_float64_3d"] = (CHECKPOINT_3D, CHECKPOINT_3D, FIT_INPUTS_3D, fit, "float64")
    table["perturbed_3d"] = (PERTURBED_3D, CHECKPOINT_3D, INPUTS_3D, eval_, "float64")
    table["eval_float64_deeper"] = (DEEPER_CHECKPOINT, DEEPER_CHECKPOINT, DEEPER_INPUTS, eval_, "float64")
    table["perturbed"] = (PERTURBED, CHECKPOINT, INPUTS, eval_, "float64")
    for dtype in ("float32", "float64"):
        table[f"article_{dtype}"] = (article, article_checkpoint, article_inputs, eval_, dtype)
    for suffix, path in keras_files.items():
        table[f"file{suffix}"] = (path, CHECKPOINT, INPUTS, eval_, "float64")
    return table


def keras_calls(source, inputs, run, dtype) -> list[Call]:
    if isinstance(source, weights_convert.Checkpoint):
        source = source.astype("float32" if dtype == "mixed_bfloat16" else dtype)
    return [
        Call(function, source, x, target, {**kwargs, "dtype": dtype, "device": "cpu"})
        for function, x, target, kwargs in parity.calls_for(run, inputs)
    ]


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
def table(reference_dir, keras_files):
    return cases(reference_dir, keras_files)


@pytest.fixture(scope="session")
def keras_runs(table):
    """backend -> {case name: Keras results (merged as the parity command merges them)}, each
    backend's whole batch run once, on first use."""
    runs: dict[str, dict] = {}

    def get(backend: str) -> dict:
        if backend not in runs:
            batches = {
                name: keras_calls(source, inputs, run, dtype)
                for name, (source, _, inputs, run, dtype) in table.items()
                if runs_on(name, backend)
            }
            flat = [call for calls in batches.values() for call in calls]
            outputs = iter(shared_runs.run_batch(backend, flat))
            runs[backend] = {
                name: parity.merge(parity.calls_for(table[name][3], table[name][2]), [next(outputs) for _ in calls])
                for name, calls in batches.items()
            }
        return runs[backend]

    return get


@pytest.fixture(scope="session")
def references(table):
    cache: dict[str, tuple] = {}

    def get(name: str) -> tuple[dict, dict | None]:
        if name not in cache:
            _, checkpoint, inputs, run, dtype = table[name]
            cache[name] = reference_and_noise(checkpoint, inputs, run, dtype)
        return cache[name]

    return get


def check(keras_runs, references, backend: str, name: str, dtype: str):
    reference, noise = references(name)
    return assert_matches(keras_runs(backend)[name], reference, noise, dtype, f"{backend} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_eval(keras_runs, references, backend, dtype):
    rows = check(keras_runs, references, backend, f"eval_{dtype}", dtype)
    assert [r.quantity for r in rows] == ["e1", "e2", "b1", "d1.ag", "d1", "d2.ag", "d2", "output", "mask"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_deeper(keras_runs, references, backend):
    check(keras_runs, references, backend, "eval_float64_deeper", "float64")


@pytest.mark.parametrize("dims", DIMENSIONS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_train_statistics_gradients_and_steps(keras_runs, references, backend, dtype, dims):
    suffix, checkpoint = DIMENSIONS[dims]
    rows = check(keras_runs, references, backend, f"train_{dtype}{suffix}", dtype)
    specs = param_specs(checkpoint.config)
    trainable = len([p for p in specs if not p.is_buffer])
    for prefix, count in (("state/", len(specs) - trainable), ("grad/", trainable)):
        assert len([r for r in rows if r.quantity.startswith(prefix)]) == count, prefix
    actual = keras_runs(backend)[f"train_{dtype}{suffix}"]
    counters = [k for k in actual if k.endswith("num_batches_tracked")]
    assert counters and all(actual[k] == checkpoint.tensors[k[len("state/") :]] + 1 for k in counters)


@pytest.mark.parametrize(
    "dtype, backend", [(dtype, backend) for backend in BACKENDS for dtype in DTYPES if runs_on(f"fit_{dtype}", backend)]
)
def test_fit(keras_runs, references, backend, dtype):
    rows = check(keras_runs, references, backend, f"fit_{dtype}", dtype)
    assert [r.quantity for r in rows[:3]] == ["loss/step1", "loss/step2", "loss/step3"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fit_3d(keras_runs, references, backend):
    rows = check(keras_runs, references, backend, "fit_float64_3d", "float64")
    assert [r.quantity for r in rows[:3]] == ["loss/step1", "loss/step2", "loss/step3"]


@pytest.mark.parametrize("dims", DIMENSIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_perturbed_parameter_fails_and_names_its_block(keras_runs, references, backend, dims):
    suffix, _ = DIMENSIONS[dims]
    reference, _ = references(f"perturbed{suffix}")
    rows = judge(keras_runs(backend)[f"perturbed{suffix}"], reference, None, "float64")
    assert first_failure(rows) == "d1.ag"
    assert all(r.passed for r in rows[:3])  # e1, e2, b1 do not see the change


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_reproduces_article_outputs(keras_runs, references, backend, dtype):
    """``impl_keras.load(article_state_dict.pt, dtype)`` under each backend matches the reference."""
    check(keras_runs, references, backend, f"article_{dtype}", dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("suffix", [".weights.h5", ".keras"])
def test_keras_files_load_under_every_backend(keras_runs, references, backend, suffix):
    """Files Keras wrote under this process's backend, loaded by ``impl_keras.load`` under each."""
    check(keras_runs, references, backend, f"file{suffix}", "float64")
