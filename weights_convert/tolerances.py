"""Every tolerance of the project, in one table, each with the reason for its value.

Used by the parity command, its Python API and the test suite alike. Relative error is
``max|a - b| / max|ref|`` for float64 and ``max|a - b| / max(1, max|ref|)`` for the lower
precisions (ARCHITECTURE.md section 4).
"""

TOLERANCES = {
    # Cross-framework float64 (ARCHITECTURE.md section 4): float64 rounding over ~30 layers is
    # ~1e-14; the smallest real mathematical difference (a wrong eps, a half-pixel shift) is
    # >1e-7. Anything above 1e-10 is a bug, not rounding.
    "float64": 1e-10,
    # Cross-framework float32 on CPU and on GPU with TF32 off (ARCHITECTURE.md section 4):
    # convolution algorithms sum in different orders; ~30 layers of float32 rounding (~1e-7 each)
    # stay below this.
    "float32": 1e-5,
    # Informational rows only (never gate a pass): TF32 keeps a 10-bit mantissa (~1e-3 per
    # product), bfloat16 an 8-bit one (~4e-3 per op), compounded over the network.
    "tf32": 1e-2,
    "bfloat16": 5e-2,
    # float32 gradients and optimizer steps: reported, never gating. Train-mode BatchNorm backward
    # through 20 layers is ill-conditioned in float32: PyTorch's own float32 gradients differ from
    # its float64 gradients by up to 3.8e-2 (relative, per tensor) on the default model at
    # 2x3x64x64 (2e-5 on channels (4, 8, 16)), so no cross-framework float32 bound below that means
    # anything. The gradient mathematics is gated in float64 at 1e-10.
    "float32_gradients": 5e-2,
    # The article's own float32 output, reproduced by the same torch ops on the same CPU build:
    # only summation order inside oneDNN kernels may differ.
    "reference_float32": 1e-6,
    # float64 against the article's float64 output: both are float64 evaluations of the same
    # ops, ~1e-16 apart per op; 1e-12 keeps four orders of magnitude of headroom while any
    # real difference would show at ~1e-7.
    "reference_float64": 1e-12,
}
