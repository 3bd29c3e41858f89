"""The one parity harness of the test suite: an implementation's results judged against the
independent NumPy reference exactly as ``attention-unet parity`` judges them (the float64 rows at
1e-10, the lower precisions relative to the reference's own noise at that precision)."""

from __future__ import annotations

from weights_convert.harness import parity
from weights_convert.harness.parity.compare import Row, assert_rows_pass
from weights_convert.harness.parity.tolerances import NOISY_PRECISIONS


def reference_and_noise(checkpoint, inputs: parity.Inputs, run: parity.Run, dtype: str) -> tuple[dict, dict | None]:
    """The float64 reference, and each row's noise level at ``dtype`` (None for float64)."""
    reference = parity.compute_reference(checkpoint, inputs, run)
    if dtype not in NOISY_PRECISIONS:
        return reference, None
    return reference, parity.measure_noise(checkpoint, inputs, run, dtype, reference, say=lambda message: None)


def judge(actual: dict, reference: dict, noise: dict | None, dtype: str) -> list[Row]:
    rows = [row for row, _ in parity.judge(actual, reference, parity.Target("-", "-", "cpu", dtype), noise)]
    assert rows, "nothing compared"
    return rows


def assert_matches(actual: dict, reference: dict, noise: dict | None, dtype: str, label: str = "") -> list[Row]:
    """Every reference quantity compared; raises naming the first drifting one."""
    rows = judge(actual, reference, noise, dtype)
    assert_rows_pass(rows, f"{label}: " if label else "")
    return rows


def assert_report_passes(report: parity.Report) -> parity.Report:
    failing = [f"{r.quantity} rel {r.rel_diff:.3g} > {r.tolerance:.3g}" for r in report.failures()]
    assert report.passed, f"first drift {report.first_drift()}; {failing[:8]}"
    assert report.results, "nothing compared"
    return report
