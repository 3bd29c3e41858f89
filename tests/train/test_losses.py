"""The training losses (``weights_convert.core.losses``): the reference's hand-written gradients
against finite differences, each framework's loss against the reference's, the parity harness
training on them in every framework (float64 and float32) and failing when one framework's loss
is off, and the refusals of a loss that does not fit the model."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import rel_error
from weights_convert.core.losses import LOSSES, check_loss, default_loss
from weights_convert.core.random_init import random_checkpoint
from weights_convert.core.spec import ModelConfig
from weights_convert.harness import cli, parity, reference_losses
from weights_convert.harness.parity.inputs import segmentation_target
from weights_convert.harness.parity.tolerances import TOLERANCES


def fits(loss: str, channels: int) -> bool:
    try:
        check_loss(loss, channels)
    except ValueError:
        return False
    return True


# (loss, output channels) for every loss and every channel count it takes; 2D and 3D shapes.
CASES = [(loss, channels) for loss in LOSSES for channels in (1, 3) if fits(loss, channels)]
SHAPES = {"2d": (2, 5, 4), "3d": (2, 3, 4, 3)}  # (N, *spatial), channels last added


def logits_and_target(channels: int, shape, seed: int = 0):
    """Random logits of both signs and a one-hot target (channels last, float64)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, (*shape, channels))
    x = rng.uniform(0.0, 1.0, (shape[0], 1, *shape[1:]))
    t = np.moveaxis(segmentation_target(x, channels), 1, -1)
    return z, t


@pytest.mark.parametrize("dims", SHAPES)
@pytest.mark.parametrize("loss, channels", CASES)
def test_reference_gradient_matches_finite_differences(loss, channels, dims):
    z, t = logits_and_target(channels, SHAPES[dims])
    value, gradient = reference_losses.value_and_gradient(loss, z, t)
    h = 1e-6
    numeric = np.zeros_like(z)
    for index in np.ndindex(z.shape):
        plus, minus = z.copy(), z.copy()
        plus[index] += h
        minus[index] -= h
        numeric[index] = (
            reference_losses.value_and_gradient(loss, plus, t)[0]
            - reference_losses.value_and_gradient(loss, minus, t)[0]
        ) / (2 * h)
    assert np.max(np.abs(numeric - gradient)) <= TOLERANCES["finite_differences"] * np.max(np.abs(gradient))
    assert np.isfinite(value) and value > 0


def test_reference_losses_at_known_points():
    """Values the definitions give by hand: a perfect prediction has Dice loss ~0, logits of 0 have
    BCE log 2 and a C-class CE of log C."""
    t = np.zeros((1, 4, 4, 1))
    t[0, :2] = 1.0
    confident = np.where(t > 0, 40.0, -40.0)
    assert reference_losses.value_and_gradient("dice", confident, t)[0] < 1e-6
    assert reference_losses.value_and_gradient("bce", np.zeros_like(t), t)[0] == pytest.approx(np.log(2))
    onehot = np.eye(3)[np.arange(16) % 3].reshape(1, 4, 4, 3)
    assert reference_losses.value_and_gradient("ce", np.zeros_like(onehot), onehot)[0] == pytest.approx(np.log(3))


def _torch_value_and_gradient(loss, z, t):
    import torch

    from impl_torch import losses

    logits = torch.tensor(np.moveaxis(z, -1, 1), requires_grad=True)
    value = losses.loss_value(loss, logits, torch.tensor(np.moveaxis(t, -1, 1)))
    value.backward()
    return float(value), np.moveaxis(logits.grad.numpy(), 1, -1)


def _flax_value_and_gradient(loss, z, t):
    import jax

    from impl_flax import losses

    with jax.enable_x64(True):
        value, gradient = jax.value_and_grad(lambda logits: losses.loss_value(loss, logits, t))(z)
        return float(value), np.asarray(gradient)


@pytest.mark.parametrize("framework", ["torch", "flax"])
@pytest.mark.parametrize("dims", SHAPES)
@pytest.mark.parametrize("loss, channels", CASES)
def test_framework_losses_match_the_reference_in_float64(loss, channels, dims, framework):
    z, t = logits_and_target(channels, SHAPES[dims], seed=1)
    expected_value, expected_gradient = reference_losses.value_and_gradient(loss, z, t)
    value, gradient = {"torch": _torch_value_and_gradient, "flax": _flax_value_and_gradient}[framework](loss, z, t)
    assert abs(value - expected_value) <= TOLERANCES["float64"] * abs(expected_value)
    assert rel_error(gradient, expected_gradient) <= TOLERANCES["float64"]


TINY_1 = ModelConfig(2, 1, (4, 8, 16))
TINY_3 = ModelConfig(2, 3, (4, 8, 16))
SIZE = (19, 13)


@pytest.mark.parametrize("config, loss", [(TINY_1, "dice_bce"), (TINY_3, "dice_ce")], ids=["dice_bce", "dice_ce"])
def test_fit_on_segmentation_losses_passes_in_every_framework_in_float64(config, loss):
    report = parity.check(
        random_checkpoint(config, seed=3), dtype="float64", mode="fit", steps=3, size=SIZE, batch=2, loss=loss
    )
    assert report.passed, [r.quantity for r in report.results if not r.passed][:8]
    assert {r.framework for r in report.results} == {"torch", "flax", "keras"}


def test_fit_on_dice_bce_passes_in_float32():
    report = parity.check(
        random_checkpoint(TINY_1, seed=3), frameworks=("torch", "flax"), dtype="float32", mode="fit", steps=3,
        size=SIZE, batch=2, loss="dice_bce",
    )  # fmt: skip
    assert report.passed, [r.quantity for r in report.results if not r.passed][:8]


def test_a_wrong_loss_in_one_framework_fails_parity(monkeypatch):
    """torch's Dice with another smoothing constant: its gradients drift from the reference's, and
    the first drift is named; the other framework still passes."""
    import impl_torch.losses

    monkeypatch.setattr(impl_torch.losses, "DICE_SMOOTH_NR", 1.0)
    report = parity.check(
        random_checkpoint(TINY_1, seed=3), frameworks=("torch", "flax"), dtype="float64", mode="train",
        optimizer="sgd", size=SIZE, batch=2, loss="dice",
    )  # fmt: skip
    assert not report.passed
    failing = {r.framework for r in report.results if not r.passed}
    assert failing == {"torch"}
    assert report.first_drift()["torch cpu float64"].startswith("grad/")


def test_segmentation_targets_are_one_hot_with_every_class():
    x = np.random.default_rng(0).uniform(0, 1, (2, 3, 9, 12, 11))
    for channels in (1, 2, 4):
        t = segmentation_target(x, channels)
        assert t.shape == (2, channels, 9, 12, 11)
        if channels == 1:
            assert set(np.unique(t)) == {0.0, 1.0}
        else:
            assert np.all(t.sum(axis=1) == 1)
            assert np.all(t.mean(axis=(0, 2, 3, 4)) > 0.1)


def test_losses_that_do_not_fit_the_model_are_usage_errors(tmp_path, capsys):
    one, three = tmp_path / "one.safetensors", tmp_path / "three.safetensors"
    import weights_convert

    weights_convert.write(random_checkpoint(TINY_1), one)
    weights_convert.write(random_checkpoint(TINY_3), three)
    for args in (
        ["parity", three, "--mode", "train", "--loss", "bce"],
        ["parity", one, "--mode", "fit", "--loss", "dice_ce"],
        ["train", one, "--loss", "ce", "--out", tmp_path / "out", "--steps", "1"],
    ):
        code = cli.main(list(map(str, args)))
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "loss" in err
    assert not (tmp_path / "out").exists()
    assert default_loss(1) == "dice_bce" and default_loss(3) == "dice_ce"


def test_train_minimises_the_default_loss():
    """torch, 50 Adam steps of the default Dice + BCE on the synthetic blobs: the last ten losses
    are well below the first."""
    from impl_torch import trainer
    from weights_convert.harness.train.data import SyntheticSegmentation

    config = ModelConfig(1, 1, (4, 8))
    checkpoint = random_checkpoint(config, seed=0)
    data = SyntheticSegmentation(config, 4, (16, 16), seed=0)
    results = trainer.train(checkpoint, data, steps=50, optimizer="adam", loss=default_loss(1))
    first = float(results["loss/step1"])
    last_ten = np.mean([float(results[f"loss/step{k}"]) for k in range(41, 51)])
    assert last_ten < 0.9 * first, (first, last_ten)
