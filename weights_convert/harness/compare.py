"""Framework-free comparison of named results (block outputs, running statistics, gradients,
optimizer steps, losses) against a float64 reference, in the order the network computes them, so
the first failing row names the block where two implementations start to drift.

At a reduced precision each row also carries its *noise*: how far the reference computed at that
precision is from the float64 one (``parity.measure_noise``), which sets the row's bound
(``weights_convert.harness.tolerances``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from weights_convert.harness.tolerances import tolerance as bound_for


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

    The bound is ``tolerance`` if given, else the dtype's (``weights_convert.harness.tolerances``); below
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
