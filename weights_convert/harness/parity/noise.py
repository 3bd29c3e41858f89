"""Each row's rounding noise at a reduced precision, measured in the same run.

At float32 or mixed bfloat16 the NumPy reference is also computed at that precision, and its
difference from the float64 reference is each row's *noise*; an implementation passes a row when
its own difference is at most ``max(floor, factor * noise)`` (``parity.tolerances``). The verdict
is therefore a property of the computation, not of the CPU that runs it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from weights_convert.core.checkpoint import Checkpoint
from weights_convert.harness.parity.compare import by_group, group_scale, rel_diff
from weights_convert.harness.parity.inputs import Inputs
from weights_convert.harness.parity.request import Run
from weights_convert.harness.parity.runners import compute_reference

# Row groups computed after a backward pass, and how many reference runs (the first at the given
# weights, the others at one-ulp-dithered ones) measure their noise: see ``measure_noise``.
BACKWARD_GROUPS = ("grad", "step", "loss", "param")
NOISE_RUNS = 3


def dithered(checkpoint: Checkpoint, seed: int) -> Checkpoint:
    """``checkpoint`` with every floating tensor moved by one float32 ulp up or down at random: a
    float32 evaluation of a point as close to the weights as float32 rounding itself."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, value in checkpoint.tensors.items():
        if value.dtype.kind != "f":
            tensors[name] = value
            continue
        value32 = value.astype(np.float32)
        direction = np.where(rng.random(value.shape) < 0.5, -np.inf, np.inf).astype(np.float32)
        tensors[name] = np.nextafter(value32, direction).astype(value.dtype)
    return Checkpoint(checkpoint.config, tensors)


def measure_noise(checkpoint: Checkpoint, inputs: Inputs, run: Run, precision: str, reference: dict, say) -> dict:
    """Each row's rounding noise at ``precision``: the relative difference from the float64
    ``reference`` of the NumPy reference computed at that precision (ARCHITECTURE.md section 4).

    Rows of a forward pass (block outputs, the running statistics it updates) get their own run's
    noise. Rows downstream of a backward pass (gradients, steps, losses, parameters and optimizer
    state of a fit)
    get the largest noise of their group over NOISE_RUNS runs at weights dithered by one ulp:
    a backward pass through ReLUs and max pools makes discrete decisions (a pre-activation within
    rounding of zero), and at reduced precision which way each goes is a coin toss that moves a
    gradient entry by up to ~1e-3 of the gradient's scale. The same PyTorch float32 step on the
    default model errs 3.6e-3 or 8e-6 from float64 after a one-ulp change of the first conv's
    weights; no single run's row bounds another run's row, but the worst over a group and a few
    runs is stable."""
    forward_only = run.mode == "eval" or (run.mode == "train" and not run.optimizers)
    runs = []
    for k in range(1 if forward_only else NOISE_RUNS):
        say(f"noise: numpy {precision}" + (f" at dithered weights ({k}/{NOISE_RUNS - 1})" if k else ""))
        weights = dithered(checkpoint, seed=k) if k else checkpoint
        untraced = dataclasses.replace(run, trajectory=False)
        runs.append(compute_reference(weights, inputs, untraced, precision=precision))
    levels: dict[str, float] = {}
    for group, quantities in by_group(reference).items():
        scale = group_scale(group, quantities)
        if group in BACKWARD_GROUPS or run.mode == "fit":  # everything in a fit follows a backward pass
            worst = max(rel_diff(r[name], ref, precision, scale)[1] for r in runs for name, ref in quantities.items())
            levels.update(dict.fromkeys(quantities, worst))
        else:
            levels.update({name: rel_diff(runs[0][name], ref, precision, scale)[1] for name, ref in quantities.items()})
    return levels
