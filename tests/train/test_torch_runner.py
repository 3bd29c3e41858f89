"""``impl_torch.runner``: the functions the parity harness runs, checked on tiny configs."""

import numpy as np
import pytest
import torch

import impl_torch
from impl_torch import runner
from tests.conftest import rel_error
from weights_convert.core.optim import OPTIMIZERS
from weights_convert.core.random_init import random_checkpoint
from weights_convert.core.spec import ModelConfig
from weights_convert.harness.parity.tolerances import TOLERANCES

CONFIG = ModelConfig(3, 1, (4, 8, 16))
STEPS = 3


def fit_data(config=CONFIG, steps=STEPS, size=(12, 10), seed=5):
    rng = np.random.default_rng(seed)
    xs = rng.uniform(size=(steps, 2, config.in_channels, *size))
    targets = rng.uniform(size=(steps, 2, config.out_channels, *size))
    return xs, targets


def hand_written_fit(checkpoint, xs, targets, optimizer):
    """The training loop written out in float64: autograd for the gradients, the optimizer updates
    spelled out from their definitions (PyTorch's Adam: eps added to the bias-corrected sqrt(v))."""
    model = impl_torch.from_checkpoint(checkpoint, "float64").train()
    params = dict(model.named_parameters())
    hyper = OPTIMIZERS[optimizer]
    m = {k: torch.zeros_like(p) for k, p in params.items()}
    v = {k: torch.zeros_like(p) for k, p in params.items()}
    results = {}
    for t, (x, target) in enumerate(zip(xs, targets, strict=True), start=1):
        loss = torch.mean((model(torch.from_numpy(x)) - torch.from_numpy(target)) ** 2)
        grads = torch.autograd.grad(loss, list(params.values()))
        results[f"loss/step{t}"] = loss.detach().numpy()
        with torch.no_grad():
            for (k, p), g in zip(params.items(), grads, strict=True):
                if optimizer == "sgd":
                    p -= hyper["lr"] * g
                    continue
                b1, b2 = hyper["b1"], hyper["b2"]
                m[k] = b1 * m[k] + (1 - b1) * g
                v[k] = b2 * v[k] + (1 - b2) * g * g
                p -= hyper["lr"] / (1 - b1**t) * m[k] / (torch.sqrt(v[k]) / (1 - b2**t) ** 0.5 + hyper["eps"])
    results.update({f"param/{k}": p.detach().numpy() for k, p in params.items()})
    results.update({f"state/{k}": v.numpy() for k, v in runner._buffers(model).items()})
    return results


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fit_float64_matches_hand_written_loop(optimizer):
    checkpoint = random_checkpoint(CONFIG, seed=4, dtype="float64")
    xs, targets = fit_data()
    actual = runner.fit(checkpoint, xs, targets, dtype="float64", optimizer=optimizer)
    expected = hand_written_fit(checkpoint, xs, targets, optimizer)
    assert list(actual) == list(expected)
    assert list(actual)[: STEPS + 1] == ["loss/step1", "loss/step2", "loss/step3", "param/e1.conv.conv.0.weight"]
    worst = {}
    for name, value in expected.items():
        assert actual[name].shape == value.shape and actual[name].dtype == value.dtype, name
        # Parameters are compared relative to their own tensor's scale (a step changes each by ~lr * g).
        worst[name] = rel_error(actual[name], value, floor=1e-30)
        assert worst[name] <= TOLERANCES["float64"], (name, worst[name])
    counter = "e1.conv.conv.1.num_batches_tracked"
    assert actual[f"state/{counter}"] == checkpoint.tensors[counter] + STEPS
    print(optimizer, "worst relative error:", max(worst.values()))


def test_fit_continues_one_optimizer():
    """Three steps of one Adam are not three fresh first steps: the state (t, m, v) carries over."""
    checkpoint = random_checkpoint(CONFIG, seed=4, dtype="float64")
    xs, targets = fit_data()
    fitted = runner.fit(checkpoint, xs, targets, dtype="float64", optimizer="adam")
    restarted = checkpoint
    for x, target in zip(xs, targets, strict=True):
        stepped = runner.fit(restarted, x[None], target[None], dtype="float64", optimizer="adam")
        tensors = dict(restarted.tensors)
        tensors.update({k.split("/", 1)[1]: v for k, v in stepped.items() if k.startswith(("param/", "state/"))})
        restarted = type(checkpoint).from_tensors(tensors, checkpoint.config)
    name = "e1.conv.conv.0.weight"
    assert rel_error(fitted[f"param/{name}"], restarted.tensors[name]) > 1e-6


def test_fit_float32_runs():
    checkpoint = random_checkpoint(CONFIG, seed=4)
    xs, targets = fit_data()
    results = runner.fit(checkpoint, xs, targets, dtype="float32", optimizer="adam")
    losses = [results[f"loss/step{k}"] for k in range(1, STEPS + 1)]
    assert all(loss.shape == () and loss.dtype == np.float32 and np.isfinite(loss) for loss in losses)
    assert results["param/output.weight"].dtype == np.float32
    counter = "e1.conv.conv.1.num_batches_tracked"
    assert results[f"state/{counter}"] == checkpoint.tensors[counter] + STEPS


def test_fit_rejects_mismatched_steps():
    checkpoint = random_checkpoint(CONFIG, seed=4)
    xs, targets = fit_data()
    with pytest.raises(
        ValueError, match=r"same number of steps \(at least 1\), got shapes \(3, 2, 3, 12, 10\) and \(2, 2, 1"
    ):
        runner.fit(checkpoint, xs, targets[:2])


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="optimizer must be one of \\['adam', 'sgd'\\], got 'rmsprop'"):
        runner.train_step(random_checkpoint(CONFIG, seed=4), *fit_data(steps=1), optimizer="rmsprop")


def test_fit_trajectory_records_every_step():
    checkpoint = random_checkpoint(CONFIG, seed=4, dtype="float64")
    xs, targets = fit_data()
    results = runner.fit(checkpoint, xs, targets, dtype="float64", optimizer="sgd", trajectory=True)
    name = "output.weight"
    path = [results[f"trajectory/step{k}/{name}"] for k in range(1, STEPS + 1)]
    assert np.array_equal(path[-1], results[f"param/{name}"])
    assert not np.array_equal(path[0], path[1]) and not np.array_equal(path[1], path[2])
    assert list(results)[-1] == f"trajectory/step{STEPS}/output.bias"


def relative_to_float64(actual: dict, exact: dict, prefix: str) -> float:
    """Worst row of ``prefix`` against float64; gradient-like rows scaled by the whole tensor group."""
    names = [k for k in exact if k.startswith(prefix) and "num_batches_tracked" not in k]
    scale = max(1.0, max(float(np.max(np.abs(exact[k]))) for k in names))
    return max(float(np.max(np.abs(actual[k] - exact[k]))) / scale for k in names)


def test_mixed_bfloat16_forward_and_train_step():
    checkpoint = random_checkpoint(CONFIG, seed=4, dtype="float64")
    float32 = checkpoint.astype("float32")
    (x,), (target,) = fit_data(steps=1)
    for train in (False, True):
        exact = runner.forward(checkpoint, x, dtype="float64", train=train)
        mixed = runner.forward(float32, x, dtype="mixed_bfloat16", train=train)
        single = runner.forward(float32, x, dtype="float32", train=train)
        assert list(mixed) == list(exact)
        assert {v.dtype for v in mixed.values()} <= {np.dtype(np.float32), np.dtype(np.int64)}
        error = relative_to_float64(mixed, exact, "")
        print(f"mixed_bfloat16 {'train' if train else 'eval'} forward vs float64: {error:.2e}")
        # Orders of magnitude only (8-bit mantissa, ~4e-3 per rounding): bfloat16 really computes
        # (float32 is ~1e-7) and nothing is broken (~1).
        assert 1e-4 < error < 1e-1
        assert not np.array_equal(mixed["output"], single["output"])
    exact = runner.train_step(checkpoint, x, target, dtype="float64", optimizer="adam")
    mixed = runner.train_step(float32, x, target, dtype="mixed_bfloat16", optimizer="adam")
    assert list(mixed) == list(exact) and {v.dtype for v in mixed.values()} == {np.dtype(np.float32)}
    error = relative_to_float64(mixed, exact, "grad/")
    print(f"mixed_bfloat16 gradients vs float64 (scaled by the largest gradient): {error:.2e}")
    # Train-mode BatchNorm backward is ill-conditioned: the NumPy bfloat16 emulation of the reference
    # shows the same order (~1e-1) on this config. Orders of magnitude only.
    assert 1e-4 < error < 1


def test_mixed_bfloat16_fit_runs():
    checkpoint = random_checkpoint(CONFIG, seed=4)
    xs, targets = fit_data()
    exact = runner.fit(checkpoint.astype("float64"), xs, targets, dtype="float64", optimizer="adam")
    mixed = runner.fit(checkpoint, xs, targets, dtype="mixed_bfloat16", optimizer="adam")
    assert list(mixed) == list(exact)
    assert {v.dtype for v in mixed.values()} == {np.dtype(np.float32), np.dtype(np.int64)}
    error = relative_to_float64(mixed, exact, "loss/")
    print(f"mixed_bfloat16 fit losses vs float64: {error:.2e}")
    assert 1e-5 < error < 1e-1  # orders of magnitude only, as above
