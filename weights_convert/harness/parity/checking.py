"""One parity run from start to verdict: the request validated (``request.make_request``), the
seeded input and weights, the float64 reference and its noise, every target computed and judged,
then the export targets, or, for a fit with ``resume_at``, every ordered pair of targets
(``parity.resume``)."""

from __future__ import annotations

import numpy as np

from weights_convert.core.precisions import NOISY
from weights_convert.harness.parity.exports import judge_exports
from weights_convert.harness.parity.inputs import Inputs, default_checkpoint, make_inputs
from weights_convert.harness.parity.judging import judge, parameter_drift, result
from weights_convert.harness.parity.noise import measure_noise
from weights_convert.harness.parity.report import Report, Result
from weights_convert.harness.parity.request import DEFAULT_BATCH, DEFAULT_STEPS, Request, make_request
from weights_convert.harness.parity.resume import judge_pairs
from weights_convert.harness.parity.runners import compute, compute_reference, loss_curve, split_trajectory


def check(
    checkpoint=None,
    *,
    frameworks=None,
    keras_backends=None,
    dtype: str = "float32",
    device: str = "cpu",
    mode: str = "eval",
    size: tuple[int, ...] | None = None,
    batch: int = DEFAULT_BATCH,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    optimizer: str | tuple[str, ...] | None = None,
    trajectory: bool = False,
    progress=None,
    data_parallel: int = 1,
    batchnorm: str = "sync",
    resume_at: int | None = None,
    config=None,
    loss: str = "mse",
) -> Report:
    """Run ``checkpoint`` (a path, a Checkpoint, or None for seeded default weights) through each
    framework and compare every quantity with the independent float64 NumPy reference: block
    outputs (eval), plus running statistics, gradients and one step of each optimizer (train, or
    of ``optimizer`` only: a name, or a tuple of names, empty for no backward pass), or the losses
    of ``steps`` training steps and the final parameters and running statistics (fit, with
    ``optimizer``, default Adam). Below float64 each row's bound is relative to the noise of the
    same reference computed at ``dtype`` (``measure_noise``). With ``trajectory`` a fit
    also records every implementation's largest parameter difference after each step
    (``Report.drift``, for the plot). A fit on ``data_parallel`` devices trains each framework
    data-parallel with ``batchnorm`` statistics, against the reference of that mode
    (``weights_convert.harness.data_parallel``). A fit with ``resume_at`` K moves training between
    every ordered pair of frameworks after K steps (``parity.resume``), with each of
    ``optimizer`` (default: all of ``RESUME_OPTIMIZERS``). ``config`` gives what a file without
    one cannot hold (a MONAI state_dict's strides). ``loss`` is the training loss of train and fit
    (``weights_convert.core.losses``; the target is then a seeded one-hot segmentation, for "mse" a
    seeded regression target). ``progress`` is called with one line per stage.

    ``frameworks`` and ``keras_backends`` default to the installed ones (``select``); one that is
    named but not installed raises ``MissingPackage`` naming what to install. Bad arguments raise
    a one-line ``ParityError``."""
    request = make_request(
        checkpoint,
        frameworks=frameworks,
        keras_backends=keras_backends,
        dtype=dtype,
        device=device,
        mode=mode,
        size=size,
        batch=batch,
        seed=seed,
        steps=steps,
        optimizer=optimizer,
        trajectory=trajectory,
        data_parallel=data_parallel,
        batchnorm=batchnorm,
        resume_at=resume_at,
        config=config,
        loss=loss,
    )
    return check_request(request, progress)


def check_request(request: Request, progress=None) -> Report:
    """The report of the validated ``request`` (see ``check``)."""
    run, dtype = request.run, request.dtype
    fit = run.mode == "fit"
    steps = run.steps if fit else None
    inputs = Inputs(*make_inputs(request.config, request.batch, request.size, request.seed, steps, loss=run.loss))
    shown_input = inputs.x[0] if fit else inputs.x
    checkpoint = default_checkpoint(shown_input) if request.checkpoint is None else request.checkpoint
    say = progress or (lambda message: None)
    for note in request.notes:
        say(note)
    common = {"mode": run.mode, "seed": request.seed, "dtype": dtype, "loss": run.loss, "device": request.device}
    if run.resume_at is not None:
        results, outputs, curves = judge_pairs(request.targets, checkpoint, inputs, run, say)
        shown = curves[run.optimizers[0]]
        return Report(results, request.config, outputs, shown, shown_input, **common, references=curves)
    say("reference: numpy float64")
    reference, reference_path = split_trajectory(compute_reference(checkpoint, inputs, run))
    noise = measure_noise(checkpoint, inputs, run, dtype, reference, say) if dtype in NOISY else None
    results: list[Result] = []
    outputs: dict[str, np.ndarray] = {}
    drifts: dict[str, np.ndarray] = {}
    for target in request.targets:
        say(f"{target.label}{' (tf32)' if target.precision == 'tf32' else ''}")
        actual, path = split_trajectory(compute(target, checkpoint, inputs, run))
        if run.trajectory and target.precision == "strict":
            drifts[target.label] = parameter_drift(path, reference_path, run.steps)
        for row, informational in judge(actual, reference, target, noise):
            quantity = ("tf32:" if target.precision == "tf32" else "") + row.quantity
            results.append(result(target, run.mode, row, quantity, informational))
        if target.precision == "strict":
            outputs[target.label] = loss_curve(actual, run) if fit else np.asarray(actual.get("output"))
    if request.exports:
        export_results, export_outputs = judge_exports(
            request.exports, checkpoint, inputs.x, reference["output"], noise, dtype, request.seed, say
        )
        results += export_results
        outputs |= export_outputs
    shown = loss_curve(reference, run) if fit else reference["output"]
    return Report(results, request.config, outputs, shown, shown_input, drift=drifts, **common)


def assert_parity(checkpoint=None, **kwargs) -> Report:
    """``check`` and raise AssertionError naming, per failing implementation, the first drifting block."""
    report = check(checkpoint, **kwargs)
    if not report.passed:
        drift = "; ".join(f"{label}: first drift at {quantity}" for label, quantity in report.first_drift().items())
        worst = max(report.failures(), key=lambda r: r.rel_diff)
        raise AssertionError(f"parity failed: {drift} (worst: {worst.quantity} rel {worst.rel_diff:.3g})")
    return report
