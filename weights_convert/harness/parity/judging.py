"""Judging one implementation's quantities against the float64 reference: a row per quantity, in
computation order, under the bound of ``parity.tolerances`` (1e-10 in float64, a multiple of the
row's measured noise below, a fixed informational bound for TF32 rows), and the report's results
made of those rows."""

from __future__ import annotations

import dataclasses

import numpy as np

from weights_convert.harness.parity.compare import Row, by_group, compare, group_scale, mask_row
from weights_convert.harness.parity.report import Result
from weights_convert.harness.parity.request import Target
from weights_convert.harness.parity.tolerances import tolerance


def judge(actual: dict, reference: dict, target: Target, noise: dict | None = None) -> list[tuple[Row, bool]]:
    """(row, informational) for every quantity: block outputs, the mask, running statistics,
    gradients, optimizer steps, losses and fitted parameters. Each row's bound is the dtype's:
    1e-10 in float64, relative to the row's measured ``noise`` level (``measure_noise``) below;
    TF32 rows are informational.

    Gradient rows are scaled by the largest entry of the whole gradient, not of each tensor: the
    gradient is one vector, and the conv biases in front of a train-mode BatchNorm have an exact
    gradient of zero (the BatchNorm subtracts the batch mean), so their own max|ref| is rounding
    noise (~1e-17) and a per-tensor ratio would compare noise with noise."""
    dtype = target.dtype
    informational = target.precision != "strict"
    fixed = tolerance("tf32") if informational else None
    judged: list[tuple[Row, bool]] = []
    for group, quantities in by_group(reference).items():
        rows = compare(actual, quantities, dtype, fixed, group_scale(group, quantities), None if fixed else noise)
        judged += [(row, informational) for row in rows]
        if group == "block" and "output" in quantities:
            output_row = next(row for row in rows if row.quantity == "output")
            judged.append(
                (mask_row(actual.get("output"), reference["output"], output_row.tolerance, dtype), informational)
            )
    return judged


def result(target: Target, mode: str, row: Row, quantity: str, informational: bool) -> Result:
    """``row`` of ``target`` as a report's result, under the name ``quantity``."""
    fields = dataclasses.asdict(row) | {"quantity": quantity}
    return Result(
        target.framework, target.backend, target.device, target.dtype, mode, **fields, informational=informational
    )


def parameter_drift(path: dict, reference_path: dict, steps: int) -> np.ndarray:
    """max |parameter - reference parameter| over every parameter, after each step."""
    curve = np.full(steps, np.nan)
    for k in range(1, steps + 1):
        prefix = f"trajectory/step{k}/"
        diffs = [
            float(np.max(np.abs(np.asarray(path[name], np.float64) - np.asarray(ref, np.float64))))
            for name, ref in reference_path.items()
            if name.startswith(prefix) and name in path and np.shape(path[name]) == np.shape(ref)
        ]
        curve[k - 1] = max(diffs, default=np.nan)
    return curve
