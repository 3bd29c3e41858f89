"""Cross-framework parity: the same checkpoint and input through every implementation, each
result compared with a float64 reference, block by block.

The reference is an independent float64 NumPy computation (``weights_convert.harness.reference``) that
shares no code with any implementation: block outputs, and in train mode the updated running
statistics, the gradients of the loss and one SGD and one Adam step; in fit mode the loss at every
step of an N-step training run and the final parameters and running statistics. So every
framework, PyTorch included, is checked against something that is not itself, and a parity run
needs no framework but the ones under test.

At a reduced precision (float32, mixed bfloat16) each row's bound is relative to the rounding
noise of the same reference computed at that precision (``noise``, ``tolerances``); float64 rows
must agree to 1e-10. Rows come in computation order, so the first failing row names the block
where an implementation starts to drift.

Python API for users' CI::

    from weights_convert.harness import parity
    report = parity.check("model.safetensors", frameworks=("torch", "flax"), dtype="float64")
    parity.assert_parity("model.safetensors")          # raises AssertionError naming the drift

The package, in the order its modules build on each other:

- ``request``: the arguments validated once into a frozen ``Request`` (``make_request``), the
  installed frameworks (``select``), ``Target`` and ``Run``;
- ``inputs``: the seeded input, default weights and a resumed fit's training checkpoint;
- ``tolerances`` (every bound, with its reason) and ``compare`` (rows against the reference);
- ``report``: ``Report``/``Result``, the table, the summary line and the JSON;
- ``runners``: each target through its runner (Keras through ``harness.keras_worker``) and the reference;
- ``noise``: each row's noise, from reference runs at the precision (``measure_noise``);
- ``judging``: an implementation's rows under their bounds (``judge``);
- ``resume`` (a fit moved between frameworks) and ``exports`` (deployment exports as targets);
- ``checking``: ``check`` and ``assert_parity``, the whole run; ``plots``: ``write_report``.
"""

from __future__ import annotations

from weights_convert.harness.parity.checking import assert_parity, check, check_request
from weights_convert.harness.parity.inputs import Inputs, default_checkpoint, make_inputs
from weights_convert.harness.parity.judging import judge
from weights_convert.harness.parity.noise import measure_noise
from weights_convert.harness.parity.plots import write_report
from weights_convert.harness.parity.report import RESULT_FIELDS, Report, Result, format_table, summary_line
from weights_convert.harness.parity.request import (
    DEFAULT_BATCH,
    DEFAULT_STEPS,
    DEVICES,
    DTYPES,
    EXPORT_TARGETS,
    FRAMEWORKS,
    KERAS_BACKENDS,
    MODES,
    OPTIMIZER_NAMES,
    RESUME_OPTIMIZERS,
    ParityError,
    Request,
    Run,
    Selection,
    Target,
    gpu_available,
    make_request,
    select,
)
from weights_convert.harness.parity.runners import calls_for, compute, compute_reference, merge, run_jobs

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_STEPS",
    "DEVICES",
    "DTYPES",
    "EXPORT_TARGETS",
    "FRAMEWORKS",
    "KERAS_BACKENDS",
    "MODES",
    "OPTIMIZER_NAMES",
    "RESULT_FIELDS",
    "RESUME_OPTIMIZERS",
    "Inputs",
    "ParityError",
    "Report",
    "Request",
    "Result",
    "Run",
    "Selection",
    "Target",
    "assert_parity",
    "calls_for",
    "check",
    "check_request",
    "compute",
    "compute_reference",
    "default_checkpoint",
    "format_table",
    "gpu_available",
    "judge",
    "make_inputs",
    "make_request",
    "measure_noise",
    "merge",
    "run_jobs",
    "select",
    "summary_line",
    "write_report",
]
