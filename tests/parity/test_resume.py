"""Resume parity (``parity --mode fit --resume-at K``): training moved between frameworks through
their native training checkpoints (``.pt``, ``.orbax``, ``.keras``) is the same training as the
reference's uninterrupted run, for every ordered pair and every optimizer; a continuation that
loses part of the optimizer state fails at the pairs it moves to, and only there."""

from __future__ import annotations

import json

import numpy as np
import pytest

import impl_keras  # noqa: F401  (Keras runs in this process, under its default backend)
from weights_convert.core.random_init import random_checkpoint
from weights_convert.core.spec import ModelConfig
from weights_convert.harness import cli, parity
from weights_convert.harness.keras_worker import current_backend

TINY = ModelConfig(channels=(4, 8))
STEPS, RESUME_AT = 3, 2
RUN = {"mode": "fit", "steps": STEPS, "resume_at": RESUME_AT, "size": (16, 16), "batch": 2}


@pytest.fixture(scope="module")
def checkpoint():
    return random_checkpoint(TINY, seed=1)


def _pairs(report: parity.Report) -> dict[str, list[parity.Result]]:
    """``resume/<from>-><to>/<optimizer>`` -> its rows."""
    pairs: dict[str, list] = {}
    for row in report.results:
        pairs.setdefault("/".join(row.quantity.split("/")[:3]), []).append(row)
    return pairs


def test_every_ordered_pair_and_optimizer_resumes_exactly_in_float64(checkpoint):
    backend = current_backend()
    report = parity.check(
        checkpoint, frameworks=("torch", "flax", "keras"), keras_backends=(backend,), dtype="float64", **RUN
    )
    names = ("torch", "flax", f"keras-{backend}")
    expected = {f"resume/{a}->{b}/{o}" for a in names for b in names for o in ("sgd", "adam", "adamw")}
    pairs = _pairs(report)
    assert set(pairs) == expected
    trainable = [name for name in checkpoint.tensors if not name.rsplit(".", 1)[-1].startswith(("running", "num_"))]
    for prefix, rows in pairs.items():
        quantities = {row.quantity.removeprefix(prefix + "/") for row in rows}
        optimizer = prefix.rsplit("/", 1)[-1]
        slots = ("momentum_buffer",) if optimizer == "sgd" else ("exp_avg", "exp_avg_sq", "optimizer")
        # Every step's loss, the final parameters and statistics, and the whole optimizer state.
        assert {f"loss/step{k}" for k in range(1, STEPS + 1)} <= quantities, prefix
        assert {f"param/{name}" for name in trainable} <= quantities, prefix
        assert {q.split("/", 1)[0] for q in quantities} == {"loss", "param", "state", *slots}, prefix
        assert all(row.tolerance == 1e-10 for row in rows)
    assert report.passed, parity.format_table(report)


def test_every_keras_backend_resumes_from_and_into_every_framework(checkpoint):
    """All five targets (torch, Flax, Keras on TensorFlow, JAX and PyTorch; the backends other than
    this process's in one subprocess per phase): 25 ordered pairs, Adam, float64."""
    report = parity.check(
        checkpoint,
        frameworks=("torch", "flax", "keras"),
        keras_backends=("tensorflow", "jax", "torch"),
        dtype="float64",
        optimizer="adam",
        **RUN,
    )
    names = ("torch", "flax", "keras-tensorflow", "keras-jax", "keras-torch")
    assert set(_pairs(report)) == {f"resume/{a}->{b}/adam" for a in names for b in names}
    assert report.passed, parity.format_table(report)


def test_a_continuation_that_restarts_the_step_count_fails_where_it_resumes(checkpoint, monkeypatch):
    """torch resuming with Adam's step count back at 0 (its bias correction restarts): the pairs
    that continue in torch fail from the first parameter updated after the move (every loss is
    taken before its step's update, so the losses still agree), those that continue in Flax pass."""
    from impl_torch import training

    restore = training.from_training_checkpoint

    def forgetful(checkpoint, *args, **kwargs):
        model, optimizer = restore(checkpoint, *args, **kwargs)
        for state in optimizer.state.values():
            state["step"].zero_()
        return model, optimizer

    monkeypatch.setattr(training, "from_training_checkpoint", forgetful)
    report = parity.check(checkpoint, frameworks=("torch", "flax"), dtype="float64", optimizer="adam", **RUN)
    drift = report.first_drift()
    assert set(drift) == {"torch cpu float64"}
    assert drift["torch cpu float64"].startswith("resume/torch->torch/adam/param/")
    failing = {"/".join(r.quantity.split("/")[:2]) for r in report.failures()}
    assert failing == {"resume/torch->torch", "resume/flax->torch"}
    assert not any(r.quantity.startswith(("resume/torch->flax", "resume/flax->flax")) for r in report.failures())


def test_float32_resumes_within_the_noise_relative_bound(checkpoint):
    report = parity.check(checkpoint, frameworks=("torch", "flax"), dtype="float32", optimizer="adamw", **RUN)
    rows = report.results
    assert len(_pairs(report)) == 4 and all(row.noise is not None for row in rows)
    # The slots are shown, not gating (tolerances.INFORMATIONAL_AT_REDUCED_PRECISION); the rest gates.
    slots = ("exp_avg/", "exp_avg_sq/")
    assert all(row.informational == (row.quantity.split("/", 3)[3].startswith(slots)) for row in rows)
    assert any(row.quantity.endswith("/optimizer/step") and not row.informational for row in rows)
    assert report.passed, parity.format_table(report)


def test_the_command_runs_resumes_and_refuses_what_it_cannot_run(checkpoint, tmp_path, capsys):
    import weights_convert

    path = tmp_path / "tiny.safetensors"
    weights_convert.write(checkpoint, path)
    common = [str(path), "--frameworks", "torch", "--size", "16", "16", "--dtype", "float64"]
    run = ["--mode", "fit", "--steps", "3", "--resume-at", "1", "--optimizer", "sgd", "--report", str(tmp_path / "r")]
    assert cli.main(["parity", *common, *run]) == 0
    out = capsys.readouterr().out
    assert "resume/torch->torch/sgd/*" in out and out.strip().splitlines()[-1].startswith("PASS")
    rows = json.loads((tmp_path / "r" / "parity.json").read_text())["results"]
    assert {row["quantity"].rsplit("/", 1)[0] for row in rows} >= {"resume/torch->torch/sgd/momentum_buffer"}
    assert (tmp_path / "r" / "parity.png").stat().st_size > 0
    refusals = {
        ("--mode", "fit", "--steps", "3", "--resume-at", "3"): "--resume-at must be at least 1 and below --steps 3",
        ("--resume-at", "1"): "--resume-at moves a fit between frameworks: it needs --mode fit",
        ("--mode", "fit", "--resume-at", "1", "--data-parallel", "2"): "--resume-at does not combine with",
        ("--mode", "fit", "--resume-at", "1", "--optimizer", "adamw", "--steps", "1"): "below --steps 1",
    }
    for flags, message in refusals.items():
        assert cli.main(["parity", *common, *flags]) == 2, flags
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (flags, err)
    with pytest.raises(SystemExit) as exit_status:  # argparse's own refusal: usage, then the error
        cli.main(["parity", *common, "--mode", "fit", "--resume-at", "0"])
    assert exit_status.value.code == 2
    assert "--resume-at must be at least 1, got 0" in capsys.readouterr().err


def test_the_reference_continues_a_training_checkpoint_like_an_uninterrupted_run(checkpoint):
    """Splitting the reference's own run at K, through ``OptimizerState``, changes nothing."""
    from weights_convert.harness import reference
    from weights_convert.harness.parity.inputs import start

    tensors = checkpoint.astype("float64").tensors
    xs, ys = parity.make_inputs(TINY, 2, (16, 16), 0, STEPS)
    state = start(checkpoint, "adam").optimizer
    whole = reference.fit(tensors, xs, ys, optimizer=state, config=TINY)
    first = reference.fit(tensors, xs[:RESUME_AT], ys[:RESUME_AT], optimizer=state, config=TINY)
    assert int(first["optimizer/step"]) == RESUME_AT and int(whole["optimizer/step"]) == STEPS
    middle = {k.split("/", 1)[1]: v for k, v in first.items() if k.startswith(("param/", "state/"))}
    slots = {
        s: {k.split("/", 1)[1]: v for k, v in first.items() if k.startswith(s + "/")} for s in ("exp_avg", "exp_avg_sq")
    }
    moved = type(state)("adam", state.hyper, RESUME_AT, slots)
    rest = reference.fit(middle, xs[RESUME_AT:], ys[RESUME_AT:], optimizer=moved, config=TINY)
    for key, value in rest.items():
        if not key.startswith("loss/"):
            np.testing.assert_array_equal(value, whole[key], err_msg=key)
    np.testing.assert_array_equal(rest["loss/step1"], whole[f"loss/step{RESUME_AT + 1}"])


def conventions_table() -> str:
    """``FRAMEWORK_DIFFERENCES`` as the README's Markdown table."""
    from weights_convert.core.optimizer_state import FRAMEWORK_DIFFERENCES

    header = ("", "PyTorch", "optax / Flax NNX", "Keras 3", "how it is mapped")
    rows = [header, ("---",) * len(header), *FRAMEWORK_DIFFERENCES]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in rows)


def test_the_readme_table_of_optimizer_conventions_is_framework_differences():
    from tests.conftest import REPO

    readme = (REPO / "README.md").read_text()
    start = readme.index("<!-- optimizer conventions")
    table = readme[readme.index("\n", start) + 1 : readme.index("<!-- end of optimizer conventions -->")]
    assert table.strip() == conventions_table()
