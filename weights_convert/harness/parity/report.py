"""The report of a parity run: its results (one per compared row, in computation order), the
verdict, the human table (``format_table``), the one-line summary and the JSON rows.

Every strict row gates the verdict; informational rows (TF32 on a GPU, a resumed fit's optimizer
slots below float64) are shown but do not. ``first_drift`` names, per failing implementation, the
first quantity that fails: the block where it starts to drift.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from weights_convert.core.spec import ModelConfig
from weights_convert.harness.machine import machine_info

RESULT_FIELDS = (
    "framework",
    "backend",
    "device",
    "dtype",
    "mode",
    "quantity",
    "max_abs_diff",
    "rel_diff",
    "noise",
    "tolerance",
    "passed",
)


@dataclasses.dataclass(frozen=True)
class Result:
    framework: str
    backend: str
    device: str
    dtype: str
    mode: str
    quantity: str
    max_abs_diff: float
    rel_diff: float
    tolerance: float
    passed: bool
    informational: bool = False
    noise: float | None = None
    agree: float | None = None  # mask rows: the fraction of all pixels whose masks agree

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Report:
    results: list[Result]
    config: ModelConfig
    outputs: dict[str, np.ndarray]  # target label -> output logits (channels first), or losses per step in fit mode
    reference_output: np.ndarray  # the float64 reference's logits, or its losses per step in fit mode
    input: np.ndarray
    mode: str = "eval"
    drift: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # fit: max |param - ref| per step
    seed: int = 0
    dtype: str = "float32"
    # a resumed fit: the reference's loss curve of each optimizer (``reference_output`` is the first's)
    references: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    loss: str = "mse"  # the training loss of train and fit
    device: str = "cpu"

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results if not r.informational)

    def failures(self) -> list[Result]:
        return [r for r in self.results if not r.passed and not r.informational]

    def first_drift(self) -> dict[str, str]:
        """For each failing implementation, the first quantity (in computation order) that fails."""
        drift: dict[str, str] = {}
        for r in self.failures():
            drift.setdefault(_label(r), r.quantity)
        return drift

    def to_json(self) -> dict:
        """The verdict, the run (config, input shape channels first, batch, size, seed, dtype, mode,
        loss, device), the machine (platform, processor, Python and every framework's version) and
        every row: what a CI artifact needs to say what was checked where."""
        shape = list(np.shape(self.input))
        run = {"config": self.config.to_dict(), "input_shape": shape, "batch": shape[0], "size": shape[2:]}
        return {
            "passed": self.passed,
            **run,
            "seed": self.seed,
            "dtype": self.dtype,
            "mode": self.mode,
            "loss": self.loss,
            "device": self.device,
            "machine": machine_info(self.device),
            "results": [_json_row(r) for r in self.results],
        }


def _label(r: Result) -> str:
    backend = f"/{r.backend}" if r.framework == "keras" else ""
    return f"{r.framework}{backend} {r.device} {r.dtype}"


def _json_row(r: Result) -> dict:
    row = {field: getattr(r, field) for field in RESULT_FIELDS}
    for key in ("max_abs_diff", "rel_diff", "noise"):
        if row[key] is not None and not np.isfinite(row[key]):
            row[key] = None  # JSON has no inf; None means "missing or misshapen"
    if r.agree is not None:
        row["agree"] = r.agree
    if r.informational:
        row["informational"] = True
    return row


def format_table(report: Report, verbose: bool = False) -> str:
    """The human table. Gradient, statistics, step and parameter groups are folded to their worst
    row (with a count) unless ``verbose``; failing rows are always listed. ``noise`` is the
    reference's own difference at the dtype, which sets the row's tolerance."""
    header = ("framework", "backend", "device", "dtype", "quantity", "max abs diff", "rel diff", "noise", "tolerance")
    header += ("pass",)
    lines = []
    for key, group in _grouped(report.results, verbose):
        r, count = group
        quantity = (
            r.quantity
            if count == 1
            else f"{key} ({count} tensors, worst {r.quantity.removeprefix(key.removesuffix('*'))})"
        )
        if r.agree is not None:
            quantity += f" ({r.agree:.2%} agree)"
        status = "info" if r.informational else ("ok" if r.passed else "FAIL")
        noise = "-" if r.noise is None else f"{r.noise:.3g}"
        lines.append(
            (
                r.framework,
                r.backend if r.framework == "keras" else "-",
                r.device,
                r.dtype,
                quantity,
                f"{r.max_abs_diff:.3g}",
                f"{r.rel_diff:.3g}",
                noise,
                f"{r.tolerance:.3g}",
                status,
            )
        )
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    out = [
        "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *lines]
    ]
    return "\n".join([*out, summary_line(report)])


def summary_line(report: Report) -> str:
    """The verdict and the run in one line: PASS (or FAIL and where each implementation first
    drifts), the number of rows, the largest gating error as a percentage of its bound, the model
    config, input size, batch, seed, dtype and mode."""
    drift = report.first_drift()
    verdict = "PASS" if report.passed else "FAIL: " + "; ".join(f"{k}: first drift at {v}" for k, v in drift.items())
    gating = [r for r in report.results if not r.informational and r.tolerance > 0]
    rows = f"{len(report.results)} rows"
    if gating:
        worst = max(gating, key=lambda r: r.rel_diff / r.tolerance)
        share = 100 * worst.rel_diff / worst.tolerance
        rows += f", largest error {share:.2g}% of its bound ({_label(worst)} {worst.quantity})"
    batch, _, *sides = np.shape(report.input)
    config = json.dumps(report.config.to_dict())
    run = f"size {'x'.join(map(str, sides))}, batch {batch}, seed {report.seed}, {report.dtype}, {report.mode}"
    return f"{verdict} | {rows} | config {config} | {run}"


FOLDED = ("state", "grad", "step/sgd", "step/adam", "param")


def _fold(name: str) -> str | None:
    """The folded group of a row: one of ``FOLDED``, or a whole ``resume/<from>-><to>/<optimizer>``."""
    if name.startswith("resume/"):
        return "/".join(name.split("/")[:3])
    return next((p for p in FOLDED if name.startswith(p + "/")), None)


def _grouped(results: list[Result], verbose: bool):
    """Rows to print: each block row as is; grad/, state/, step/<optimizer>/ and param/ folded per
    implementation, and each pair and optimizer of a resumed fit."""
    groups: dict[tuple, list] = {}
    order = []
    for r in results:
        name = r.quantity.removeprefix("tf32:")
        prefix = _fold(name)
        if verbose or prefix is None or not r.passed:
            key = (id(r),)
            groups[key] = [r, 1, r.quantity]
            order.append(key)
            continue
        key = (_label(r), r.informational, prefix)
        if key not in groups:
            groups[key] = [r, 0, r.quantity.removesuffix(name) + prefix + "/*"]
            order.append(key)
        group = groups[key]
        group[1] += 1
        if r.rel_diff / r.tolerance > group[0].rel_diff / group[0].tolerance:
            group[0] = r
    for key in order:
        r, count, label = groups[key]
        yield label, (r, count)
