"""Every tolerance of the project, in one table, each with the reason for its value.

Used by the parity command, its Python API and the test suite alike.

A fixed bound is a number. A noise-relative bound is ``max(floor, factor * noise)``
(ARCHITECTURE.md section 4). ``noise`` is measured per
row and in the same run: the relative difference between the independent NumPy reference
computed at the precision under test (``weights_convert.harness.reference`` with ``precision="float32"``
or ``"mixed_bfloat16"``) and the same reference in float64. An implementation passes a row when
its own difference from the float64 reference is at most that bound: "no noisier than the
reference computation itself, up to a constant". float64 has no noise to measure; its bound is
fixed.

Relative error is ``max|a - b| / max|ref|`` in float64 and ``max|a - b| / max(1, max|ref|)`` at
the lower precisions; gradient rows divide by the largest entry of the whole gradient.
"""

from __future__ import annotations

import dataclasses

from weights_convert.core.precisions import NOISY


@dataclasses.dataclass(frozen=True)
class NoiseBound:
    """``max(floor, factor * noise)`` for a row whose reference shows ``noise`` at this precision."""

    factor: float
    floor: float

    def tolerance(self, noise: float) -> float:
        return max(self.floor, self.factor * noise)


TOLERANCES = {
    # Cross-framework float64 (ARCHITECTURE.md section 4): float64 rounding over ~30 layers is
    # ~1e-14; the smallest real mathematical difference (a wrong eps, a half-pixel shift) is
    # >1e-7. Anything above 1e-10 is a bug, not rounding. Holds for outputs, statistics,
    # gradients, optimizer steps and 10-step fits alike.
    "float64": 1e-10,
    # float32 (CPU, and GPU with TF32 off). The frameworks' convolutions sum in other orders and
    # with other blockings than NumPy's sgemm, so their error is a small multiple of the NumPy
    # float32 noise of the same row. Largest ratio measured (AMD EPYC, default model and the test
    # configs, eval/train/fit, torch, Flax and Keras on all three backends): 5.2 on a block output
    # (torch, default model, 64x64, b1), 3.9 on a running statistic, 3.6 on a gradient. 16 is
    # that ratio with a margin of 3, for other CPUs' kernels. The floor is 8 float32 ulps (2**-24
    # each) of the row's scale: a row whose reference noise happens to be zero (an exactly
    # representable result) still allows a few roundings of the final value.
    "float32": NoiseBound(factor=16.0, floor=8 * 2.0**-24),
    # Mixed bfloat16 (parameters and statistics float32, convolutions and activations bfloat16).
    # Each framework rounds to bfloat16 at its own places (torch autocast on the GPU keeps the
    # upsampling in float32, Keras' mixed policy rounds every layer's output, Flax what its dtype
    # says) and the NumPy emulation at yet others; the errors are nonetheless within 2.5 times
    # the emulation's noise in every row measured (same cases as float32). 8 is that ratio with
    # a margin of 3. The floor is two bfloat16 ulps (2**-8 each): one rounding of the result
    # and one of its input.
    "mixed_bfloat16": NoiseBound(factor=8.0, floor=2 * 2.0**-8),
    # TF32 rows on the GPU are informational only (never gate): TF32 keeps a 10-bit mantissa
    # (~1e-3 per product), compounded over the network; the strict float32 rows are the check.
    "tf32": 1e-2,
    # float64 against the article's float64 output: both are float64 evaluations of the same
    # ops, ~1e-16 apart per op; 1e-12 keeps four orders of magnitude of headroom while any
    # real difference would show at ~1e-7.
    "reference_float64": 1e-12,
    # Two float64 NumPy evaluations of the same few operations (an optimizer step, a mean of
    # shard losses) in another order or grouping, inside the project's own reference code: each
    # operation rounds by at most half an ulp (1.1e-16 relative), and a few dozen of them stay
    # below ~50 ulps. 1e-14 is that; a wrong formula (a missing bias correction, lr applied twice)
    # is off by 1e-3 or more.
    "float64_reordered": 1e-14,
    # A hand-written float64 gradient against central differences with a step of 1e-6 (relative to
    # the value): the truncation error is ~h**2 (1e-12) and the rounding ~1e-16 / h (1e-10), both
    # relative to the gradient's largest magnitude; 1e-6 is far above both, while a wrong formula
    # (a missing factor, a smoothing term in the wrong place) is off by 1e-3 or more.
    "finite_differences": 1e-6,
}

NOISY_PRECISIONS = NOISY  # the precisions whose bounds are relative to the measured noise

# Rows that are shown but do not gate at the NOISY_PRECISIONS: a resumed fit's optimizer slots
# (``parity --resume-at``). A slot is a running sum of the last gradients (or of their squares),
# and a gradient taken at a trained state flips with any single ReLU or max-pool decision that
# float32 rounding takes the other way: one output channel's kernel gradient moves by up to ~1e-3
# of the gradient's scale. Measured: Flax float32, ModelConfig(3, 1, (8, 16, 32)) at 37x53, at its
# own state after 2 Adam steps, off float64 by 3.9e-4 on 70 entries of one kernel, where torch and
# the NumPy float32 reference agree with float64 to 1e-7 and Flax itself does at every one-ulp
# dithered neighbour; exp_avg then differs by 3.9e-5 against a measured noise of 7.3e-8. The
# reference's noise runs only see such a flip by chance, so no noise-relative bound holds for these
# rows; the parameters and losses after the step, which Adam's normalisation and the learning rate
# damp, gate instead, and in float64 the slots gate at 1e-10 like every row.
INFORMATIONAL_AT_REDUCED_PRECISION = ("momentum_buffer", "exp_avg", "exp_avg_sq")


def tolerance(precision: str, noise: float | None = None) -> float:
    """The bound of one row at ``precision`` given its measured ``noise`` (unused by fixed bounds)."""
    bound = TOLERANCES[precision]
    if not isinstance(bound, NoiseBound):
        return bound
    if noise is None:
        raise ValueError(f"the {precision} bound is relative to the reference's noise, and none was measured")
    return bound.tolerance(noise)
