"""Deployment exports as parity targets (``--frameworks onnx,pt2,torchscript,savedmodel,jaxexport``).

The checkpoint is exported once per format to a temporary folder (``weights_convert.harness.export``),
each file runs in its own runtime, and its ``output`` and ``mask`` rows (an export has no
intermediate blocks) are judged under the same bounds as a framework's, at the run's input and at
a second batch (1, or 3 when the run's batch is 1) that differs from the batch of 2 traced at
export. What an export cannot run (another mode, a GPU, mixed bfloat16, ONNX in float64) is
refused by the request.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np

from weights_convert.core.checkpoint import Checkpoint
from weights_convert.harness import export as export_files
from weights_convert.harness.parity.report import Result
from weights_convert.harness.parity.request import EXPORT_TARGETS


def judge_exports(
    exports, checkpoint: Checkpoint, x: np.ndarray, expected: np.ndarray, noise, dtype: str, seed: int, say
):
    """(results, output logits by label) of every export target of ``exports``: each file judged
    on the run's input ``x`` against the float64 reference's logits ``expected`` (below float64
    with the ``output`` row's level of the run's ``noise``), and on a second batch of the same size."""
    case = export_files.ReferenceCase(x, expected, noise and {"output": noise["output"]})
    results: list[Result] = []
    outputs: dict[str, np.ndarray] = {}
    for name, verdict in _verdicts(exports, checkpoint, case, dtype, seed, say).items():
        results += _results(name, verdict, dtype)
        outputs[f"{name} cpu {dtype}"] = verdict.cases[0].logits
    return results, outputs


def _verdicts(exports, checkpoint: Checkpoint, case, dtype: str, seed: int, say) -> dict:
    """Export ``checkpoint`` once per target to a temporary folder (removed afterwards) and judge
    each file on ``case`` (the run's input and its reference) and on a second batch of the same
    size that differs from the one traced at export; target -> ``ExportCheck``."""
    batch, _, *sides = case.x.shape
    other = 3 if batch == 1 else 1
    say(f"reference: numpy float64 at batch {other} (exports)")
    second = export_files.reference_cases(checkpoint, dtype=dtype, cases=[(other, *sides)], seed=seed + 1)
    cases = [case, *second]
    verdicts = {}
    with tempfile.TemporaryDirectory(prefix="attention-unet-parity-") as directory:
        for name in exports:
            path = Path(directory) / f"model{EXPORT_TARGETS[name]}"
            fmt = export_files.FORMATS[path.suffix]
            say(f"{name}: export with {fmt.writer}, run in {fmt.runtime}")
            export_files.export(checkpoint, path, dtype=dtype, check=False)
            verdicts[name] = export_files.judge_file(path, cases, dtype=dtype, trusted=True)  # written just now
    return verdicts


def _results(name: str, verdict, dtype: str) -> list[Result]:
    """The ``output`` and ``mask`` rows of one export: at the run's input, then under
    ``batch<N>/`` at the second batch."""
    results = []
    for k, case in enumerate(verdict.cases):
        prefix = "" if k == 0 else f"batch{case.shape[0]}/"
        for row in (case.output, case.mask):
            fields = dataclasses.asdict(row) | {"quantity": prefix + row.quantity}
            results.append(Result(name, name, "cpu", dtype, "eval", **fields))
    return results
