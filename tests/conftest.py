import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parent.parent
# The article's own checkpoint, input and outputs, committed with the tests (see its README.md).
REFERENCE = REPO / "tests" / "data" / "reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    # No skip: the files are part of the repository, and a missing one must fail loudly.
    assert (REFERENCE / "article_state_dict.pt").is_file(), f"reference files not found in {REFERENCE}"
    return REFERENCE


@pytest.fixture(scope="session")
def article_safetensors(reference_dir, tmp_path_factory) -> Path:
    """The article checkpoint as ``.safetensors``, converted from ``article_state_dict.pt`` once per
    session: the twin is derived, never stored (tests/formats/test_convert.py checks the conversion)."""
    import weights_convert

    path = tmp_path_factory.mktemp("reference") / "article_state_dict.safetensors"
    weights_convert.convert(reference_dir / "article_state_dict.pt", path)
    return path


@pytest.fixture(scope="session")
def reference_input(reference_dir) -> np.ndarray:
    return np.load(reference_dir / "input_nchw.npy")


def rel_error(actual, expected, floor: float = 0.0) -> float:
    """max|a - b| / max(floor, max|expected|)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    return float(np.max(np.abs(actual - expected)) / max(floor, float(np.max(np.abs(expected)))))


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """``attention-unet *args`` in this process: (exit status, stdout, stderr); argparse's usage
    refusals, which exit, give their status too."""
    from weights_convert.harness import cli

    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err
