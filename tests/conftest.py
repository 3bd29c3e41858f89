import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parent.parent
REFERENCE = Path(os.environ.get("ATTENTION_UNET_REFERENCE", REPO.parent / "shared" / "reference"))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    # No skip: CI runs with ../shared beside the clone, and a missing reference must fail loudly.
    assert REFERENCE.is_dir(), f"reference files not found at {REFERENCE} (set ATTENTION_UNET_REFERENCE)"
    return REFERENCE


@pytest.fixture(scope="session")
def reference_input(reference_dir) -> np.ndarray:
    return np.load(reference_dir / "input_nchw.npy")


def rel_error(actual, expected, floor: float = 0.0) -> float:
    """max|a - b| / max(floor, max|expected|)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    return float(np.max(np.abs(actual - expected)) / max(floor, float(np.max(np.abs(expected)))))
