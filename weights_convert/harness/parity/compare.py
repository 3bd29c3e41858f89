"""Framework-free comparison of named results (block outputs, running statistics, gradients,
optimizer steps, losses) against a float64 reference, in the order the network computes them, so
the first failing row names the block where two implementations start to drift.

At a reduced precision each row also carries its *noise*: how far the reference computed at that
precision is from the float64 one (``parity.measure_noise``), which sets the row's bound
(``weights_convert.harness.parity.tolerances``).

The quantities fall into groups by the first segment of their name (``grad/``, ``state/``,
``step/``, ..., the block outputs in ``block``); the gradient and each optimizer slot are one
vector each, scaled by their largest entry (``group_scale``), for their noise and their rows alike.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from weights_convert.core.optimizer_state import DEFAULTS as TRAINING_OPTIMIZERS
from weights_convert.core.optimizer_state import slot_names
from weights_convert.harness.parity.tolerances import tolerance as bound_for

# The row groups of the training checkpoints' optimizer slots (a resumed fit's ``momentum_buffer/``, ...).
SLOT_NAMES = tuple(
    dict.fromkeys(slot for name, hyper in TRAINING_OPTIMIZERS.items() for slot in slot_names(name, hyper))
)


@dataclasses.dataclass(frozen=True)
class Row:
    quantity: str
    max_abs_diff: float
    rel_diff: float
    tolerance: float
    passed: bool
    noise: float | None = None  # the row's measured noise level at the dtype; None in float64
    agree: float | None = None  # mask rows only: the fraction of all pixels whose masks agree


def rel_diff(actual: np.ndarray, reference: np.ndarray, dtype: str, scale: float | None = None) -> tuple[float, float]:
    """(max|a - b|, relative diff): scaled by max|ref| (or the given ``scale``) in float64, and by
    max(1, that) below."""
    a = np.asarray(actual, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if a.shape != r.shape:
        return float("inf"), float("inf")
    if a.size == 0:
        return 0.0, 0.0
    max_abs = float(np.max(np.abs(a - r)))
    scale = float(np.max(np.abs(r))) if scale is None else scale
    if dtype != "float64":
        scale = max(1.0, scale)
    if max_abs == 0.0:
        return 0.0, 0.0
    if not np.isfinite(max_abs):
        return float("inf"), float("inf")
    return max_abs, max_abs / scale if scale > 0 else float("inf")


def compare(
    actual: dict,
    reference: dict,
    dtype: str,
    tolerance: float | None = None,
    scale: float | None = None,
    noise: dict[str, float] | None = None,
) -> list[Row]:
    """One row per reference quantity, in the reference's order; a quantity missing from
    ``actual`` or of the wrong shape fails with an infinite difference. ``scale`` replaces each
    quantity's own max|ref| when the quantities are parts of one vector (the gradient).

    The bound is ``tolerance`` if given, else the dtype's (``weights_convert.harness.parity.tolerances``); below
    float64 that needs ``noise``, each row's measured noise level (``parity.measure_noise``), and
    each row's bound is relative to it."""
    rows = []
    for name, ref in reference.items():
        row_noise = noise[name] if noise is not None else None
        row_tolerance = bound_for(dtype, row_noise) if tolerance is None else tolerance
        if name in actual:
            max_abs, rel = rel_diff(actual[name], ref, dtype, scale)
        else:
            max_abs, rel = float("inf"), float("inf")
        rows.append(Row(name, max_abs, rel, row_tolerance, bool(rel <= row_tolerance), row_noise))
    return rows


def mask_row(output, reference: np.ndarray, bound: float, dtype: str) -> Row:
    """Thresholded masks (logit > 0) must agree on every pixel whose |reference logit| exceeds the
    output row's bound (relative, so times the output's scale). The row reports the disagreeing
    pixels among those (max_abs_diff), their fraction (rel_diff), and the fraction of all pixels
    whose masks agree (agree)."""
    if np.shape(output) != np.shape(reference):
        return Row("mask", float("inf"), float("inf"), 0.0, False, agree=0.0)
    scale = float(np.max(np.abs(reference))) if dtype == "float64" else max(1.0, float(np.max(np.abs(reference))))
    decided = np.abs(reference) > bound * scale
    differ = (np.asarray(output) > 0) != (reference > 0)
    disagree = int(np.count_nonzero(differ & decided))
    agree = 1.0 - float(np.mean(differ))
    return Row("mask", float(disagree), disagree / max(1, int(decided.sum())), 0.0, disagree == 0, agree=agree)


def group_of(name: str) -> str:
    """The row group of quantity ``name``: its first segment, or ``block`` for a block output."""
    return name.split("/", 1)[0] if "/" in name else "block"


def by_group(reference: dict) -> dict[str, dict]:
    """The reference's quantities by group, groups in order of first appearance."""
    groups: dict[str, dict] = {}
    for name, value in reference.items():
        groups.setdefault(group_of(name), {})[name] = value
    return groups


def group_scale(group: str, quantities: dict) -> float | None:
    """The gradient is one vector: its rows are scaled by its largest entry (see ``judging.judge``);
    so is each optimizer slot, a running sum of gradients (or of their squares)."""
    if group == "grad" or group in SLOT_NAMES:
        return max(float(np.max(np.abs(v))) for v in quantities.values())
    return None


def first_failure(rows: list[Row]) -> str | None:
    """The first quantity (in computation order) that fails: where the drift starts."""
    return next((row.quantity for row in rows if not row.passed), None)


def assert_rows_pass(rows: list[Row], label: str = "") -> None:
    """Raise AssertionError naming the first drifting quantity and every failing one."""
    failing = [row for row in rows if not row.passed]
    if failing:
        details = "; ".join(f"{r.quantity}: rel {r.rel_diff:.3g} > {r.tolerance:.3g}" for r in failing[:10])
        more = f" (+{len(failing) - 10} more)" if len(failing) > 10 else ""
        raise AssertionError(f"{label}first drift at {failing[0].quantity}; {details}{more}")
