"""MONAI itself as the external oracle: ``monai.networks.nets.AttentionUnet`` (PyPI ``monai``, a
test dependency only; the project never imports it), randomly initialised, against every
implementation and the NumPy reference in float64. Each target runs through the parity harness's
own runners (Keras under each backend in one worker process), fed the canonical checkpoint that
MONAI's ``state_dict`` becomes; so a MONAI user's file, the converter and every model are
checked against the network MONAI actually computes.
"""

import dataclasses

import numpy as np
import pytest

from tests.conftest import rel_error
from weights_convert.core.checkpoint import Checkpoint
from weights_convert.core.monai_spec import MonaiConfig
from weights_convert.harness import parity, reference
from weights_convert.harness.parity.inputs import Inputs
from weights_convert.harness.parity.request import targets_for
from weights_convert.harness.parity.runners import compute
from weights_convert.harness.parity.tolerances import tolerance

monai = pytest.importorskip("monai")
torch = pytest.importorskip("torch")
from tests.monai_nets import monai_net  # noqa: E402  (after the skip: it imports monai)

# The configs the issue names, shrunk to a 2-core CPU and folded into two: a volume; and an image
# with a stride of 1, kernel_size 5 and a 1x1 transposed convolution (a kernel below its stride:
# the upsampled rows end in bias alone). tests/models/test_<framework>_monai.py compare every
# block of each framework with MONAI's on each config separately.
CASES = {
    "3d": (MonaiConfig(2, 2, (4, 8, 16), spatial_dims=3, strides=(2, 2)), (4, 8, 12)),
    "stride1_k5_up1": (
        MonaiConfig(1, 3, (4, 8, 16, 32), strides=(2, 1, 2), kernel_size=5, up_kernel_size=1),
        (8, 12),
    ),
}


def as_checkpoint(model, config: MonaiConfig) -> Checkpoint:
    """MONAI's ``state_dict`` as the canonical checkpoint (its keys are the canonical names)."""
    tensors = {name: value.detach().numpy().copy() for name, value in model.state_dict().items()}
    return Checkpoint.from_tensors(tensors, config)


def batch(config: MonaiConfig, sides, seed: int = 1) -> Inputs:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, config.in_channels, *sides))
    target = rng.standard_normal((2, config.out_channels, *sides))
    return Inputs(x, target)


def monai_outputs(model, inputs: Inputs, train: bool) -> np.ndarray:
    model.train(train)
    with torch.no_grad():
        return model(torch.from_numpy(inputs.x)).numpy()


def monai_sgd_step(model, inputs: Inputs) -> dict[str, np.ndarray]:
    """The parameters after one step of plain SGD (lr 0.1, the parity checks' SGD) on the MSE of
    a train-mode forward, stepped by torch itself."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = torch.mean((model(torch.from_numpy(inputs.x)) - torch.from_numpy(inputs.target)) ** 2)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {name: value.detach().numpy() for name, value in model.named_parameters()}


def targets() -> list[parity.Target]:
    """Every installed framework, Keras under each installed backend, in float64."""
    selected = parity.select()
    return targets_for(selected.frameworks, selected.keras_backends, "cpu", "float64")


BOUND = tolerance("float64")
EVAL, TRAIN = parity.Run("eval", optimizers=()), parity.Run("train", optimizers=("sgd",))


@pytest.fixture(scope="module")
def oracle_cases() -> dict:
    """case -> (MONAI's results, the checkpoint and inputs every target is given)."""
    cases = {}
    for case, (config, sides) in CASES.items():
        oracle = monai_net(config)
        checkpoint, inputs = as_checkpoint(oracle, config), batch(config, sides)
        expected = {
            "eval": monai_outputs(oracle, inputs, train=False),
            "train": monai_outputs(oracle, inputs, train=True),
            "sgd": monai_sgd_step(oracle, inputs),
        }
        cases[case] = (expected, checkpoint, inputs)
    return cases


def target_results(target: parity.Target, oracle_cases: dict) -> dict:
    """case -> the target's eval logits, train-mode results and SGD step, every case's calls in
    one batch (one Keras process per backend for all of them)."""
    jobs, owners = [], []
    for case, (_, checkpoint, inputs) in oracle_cases.items():
        for run in (EVAL, TRAIN):
            calls = parity.calls_for(run, inputs)
            jobs += [(function, checkpoint, x, t, kwargs) for function, x, t, kwargs in calls]
            owners.append((case, run, len(calls)))
    outputs = iter(parity.run_jobs(target, jobs))
    results: dict = {}
    for case, run, count in owners:
        merged = parity.merge(parity.calls_for(run, oracle_cases[case][2]), [next(outputs) for _ in range(count)])
        results.setdefault(case, {}).update(merged if run is TRAIN else {"eval/output": merged["output"]})
    return results


def reference_results(oracle_cases: dict) -> dict:
    results = {}
    for case, (_, checkpoint, inputs) in oracle_cases.items():
        config, tensors = checkpoint.config, checkpoint.tensors
        steps = reference.train_steps(
            tensors, inputs.x, inputs.target, config=config, optimizers=("sgd",), forward=True
        )
        results[case] = {**steps, "eval/output": reference.forward(tensors, inputs.x, config=config)["output"]}
    return results


@pytest.fixture(scope="module")
def computed(oracle_cases) -> dict:
    """label -> case -> results, for the NumPy reference and every installed target."""
    labels = {"reference": reference_results(oracle_cases)}
    for target in targets():
        labels[target.label] = target_results(target, oracle_cases)
    return labels


@pytest.mark.parametrize("case", list(CASES))
def test_every_framework_computes_what_monai_computes(case, oracle_cases, computed):
    """Eval logits and a train-mode forward (batch statistics) of each framework, and the NumPy
    reference's, equal MONAI's own to 1e-10; then one SGD step equals MONAI's stepped by torch."""
    expected = oracle_cases[case][0]
    errors = {}
    for label, by_case in computed.items():
        results = by_case[case]
        errors[label, "eval"] = rel_error(results["eval/output"], expected["eval"])
        errors[label, "train"] = rel_error(results["output"], expected["train"])
        errors[label, "sgd"] = max(
            rel_error(results[f"step/sgd/{name}"], value) for name, value in expected["sgd"].items()
        )
    assert len(computed) >= 2  # the reference and at least torch
    failing = {key: error for key, error in errors.items() if not error <= BOUND}
    assert not failing, failing


def test_a_perturbed_monai_parameter_fails():
    """The comparison above can fail: one gate parameter changed by 1e-6 of its scale moves the
    logits far beyond the float64 bound."""
    config, sides = CASES["stride1_k5_up1"]
    oracle = monai_net(config)
    checkpoint = as_checkpoint(oracle, config)
    name = "model.1.submodule.1.submodule.1.attention.psi.0.conv.weight"
    tensors = dict(checkpoint.tensors)
    tensors[name] = tensors[name] * (1 + 1e-6)
    perturbed = dataclasses.replace(checkpoint, tensors=tensors)
    inputs = batch(config, sides)
    logits = compute(parity.Target("torch", "torch", "cpu", "float64"), perturbed, inputs, parity.Run("eval", ()))
    assert rel_error(logits["output"], monai_outputs(oracle, inputs, train=False)) > BOUND
