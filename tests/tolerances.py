"""Every tolerance the test suite uses, in one table, each with the reason for its value.

Relative error is max|a - b| / max(1, max|ref|) for float32 and max|a - b| / max|ref| for float64
(ARCHITECTURE.md section 4). The parity command reads the same numbers from
``weights_convert.parity.TOLERANCES``; this module re-exports them and adds the test-only ones.
"""

TOLERANCES = {
    # The article's own float32 output, reproduced by the same torch ops on the same CPU: only
    # summation order inside oneDNN/MKL kernels may differ between builds.
    "reference_float32": 1e-6,
    # float64 against the article's float64 output: both are float64 evaluations of the same
    # function, so differences are ~1e-16 per op; 1e-12 leaves 4 orders of magnitude of headroom
    # while catching any real mathematical difference (the smallest would be ~1e-7).
    "reference_float64": 1e-12,
    # Cross-framework float64 (ARCHITECTURE.md section 4): anything above is a bug, not rounding.
    "parity_float64": 1e-10,
    # Cross-framework float32 (ARCHITECTURE.md section 4): different conv algorithms sum in
    # different orders; ~30 layers of float32 rounding stay well below this.
    "parity_float32": 1e-5,
}
