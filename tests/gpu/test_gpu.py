"""The parity suite on the visible GPU: the same harness as on the CPU, with the device as a
parameter. Run on a GPU machine with ``python -m pytest -m gpu``; skipped, with the reason, where
a framework sees no GPU."""

import pytest

from weights_convert.core.random_init import random_checkpoint
from weights_convert.core.spec import ModelConfig
from weights_convert.harness import parity

pytestmark = pytest.mark.gpu

CONFIGS = {"small": ModelConfig(3, 1, (8, 16, 32)), "default": ModelConfig()}
TARGETS = [("torch", "torch"), ("flax", "jax"), ("keras", "jax"), ("keras", "torch"), ("keras", "tensorflow")]


def require_gpu(framework, backend):
    if not parity.gpu_available(framework, (backend,)):
        pytest.skip(f"no GPU visible to {framework}" + (f" ({backend} backend)" if framework == "keras" else ""))


@pytest.mark.parametrize("framework, backend", TARGETS)
@pytest.mark.parametrize("dtype", ["float32", "float64", "mixed_bfloat16"])
@pytest.mark.parametrize("mode", ["eval", "train", "fit"])
def test_gpu_parity_small(framework, backend, dtype, mode):
    require_gpu(framework, backend)
    report = parity.assert_parity(
        random_checkpoint(CONFIGS["small"], seed=3),
        frameworks=[framework],
        keras_backends=[backend],
        dtype=dtype,
        device="gpu",
        mode=mode,
        size=(37, 53),
        batch=2,
        steps=3,
    )
    assert all(r.device == "gpu" for r in report.results)


@pytest.mark.slow
@pytest.mark.parametrize("framework, backend", TARGETS)
@pytest.mark.parametrize("dtype", ["float32", "mixed_bfloat16"])
def test_gpu_parity_default(framework, backend, dtype):
    require_gpu(framework, backend)
    parity.assert_parity(None, frameworks=[framework], keras_backends=[backend], dtype=dtype, device="gpu")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_gpu_resume_between_every_pair(dtype):
    """Training moved between the frameworks on the GPU (each saves its training checkpoint from the
    device and restores the next one onto it): every ordered pair of the targets that see a GPU,
    with the three optimizers."""
    visible = [(framework, backend) for framework, backend in TARGETS if parity.gpu_available(framework, (backend,))]
    if len(visible) < 2:
        pytest.skip(f"fewer than two targets see a GPU: {visible}")
    backends = [backend for framework, backend in visible if framework == "keras"]
    report = parity.assert_parity(
        random_checkpoint(CONFIGS["small"], seed=3),
        frameworks=list(dict.fromkeys(framework for framework, _ in visible)),
        keras_backends=backends or None,
        dtype=dtype,
        device="gpu",
        mode="fit",
        size=(37, 53),
        batch=2,
        steps=3,
        resume_at=2,
    )
    assert len({r.quantity.split("/")[1] for r in report.results}) == len(visible) ** 2
    assert all(r.device == "gpu" for r in report.results)
