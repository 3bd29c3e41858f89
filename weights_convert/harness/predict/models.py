"""The model ``predict`` runs, in one framework, built once for all windows of all images:
``impl_<framework>.runner.predictor`` (eval mode, the named block outputs channels first). Keras runs
in this process under its backend (``KERAS_BACKEND``, or the first installed), imported quietly
as ``train`` imports it."""

from __future__ import annotations


def predictor(framework: str, checkpoint, *, dtype: str = "float32", device: str = "cpu"):
    """A function of a channels-first batch -> ``{block name: channels-first array}``."""
    if framework == "torch":
        from impl_torch import runner
    elif framework == "flax":
        from impl_flax import runner
    elif framework == "keras":
        from weights_convert.harness.quiet import quiet_import

        quiet_import("impl_keras")
        from impl_keras import runner
    else:
        raise ValueError(f"unknown framework {framework!r}")
    return runner.predictor(checkpoint, dtype=dtype, device=device)
