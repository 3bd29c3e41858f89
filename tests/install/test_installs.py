"""The command with one framework installed: each test runs it in a subprocess that sees only
what that install brings (``tests/installs.py``), on a tiny model."""

from __future__ import annotations

import pytest

import weights_convert
from tests.installs import python_as, run_as
from weights_convert.core.random_init import random_checkpoint
from weights_convert.core.spec import ModelConfig

SMALL = ("--size", "12", "10", "--batch", "1")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("installs") / "tiny.safetensors"
    weights_convert.write(random_checkpoint(ModelConfig(2, 1, (4, 8)), seed=4), path)
    return path


def table_rows(stdout: str) -> set[tuple[str, str]]:
    """(framework, backend) of every row of a parity table."""
    lines = stdout.strip().splitlines()[1:-1]
    return {tuple(line.split()[:2]) for line in lines}


def test_torch_only_parity_passes_and_names_what_it_skipped(checkpoint):
    # TF_CPP_MIN_LOG_LEVEL unset: the command itself keeps start-up logging off its stderr.
    result = run_as("torch", "parity", checkpoint, *SMALL, TF_CPP_MIN_LOG_LEVEL=None)
    assert result.returncode == 0, result.stderr
    assert table_rows(result.stdout) == {("torch", "-")}
    assert result.stdout.strip().splitlines()[-1].startswith("PASS | ")
    assert "parity: skipped flax: JAX is not installed (pip install 'attention-unet[flax]')" in result.stderr
    assert "parity: skipped keras: Keras is not installed (pip install 'attention-unet[keras]')" in result.stderr
    assert all(line.startswith("parity: ") for line in result.stderr.splitlines()), result.stderr


def test_flax_only_parity_passes(checkpoint):
    result = run_as("flax", "parity", checkpoint, *SMALL, TF_CPP_MIN_LOG_LEVEL=None)
    assert result.returncode == 0, result.stderr
    assert table_rows(result.stdout) == {("flax", "-")}
    assert "parity: skipped torch: PyTorch is not installed (pip install 'attention-unet[torch]')" in result.stderr
    assert all(line.startswith("parity: ") for line in result.stderr.splitlines()), result.stderr


def test_keras_on_jax_without_tensorflow_passes_with_no_backend_set(checkpoint):
    # KERAS_BACKEND is unset here (tests.installs.environment), and ~/.keras/keras.json may name
    # tensorflow: the installed backend is the one that runs.
    result = run_as("keras-jax", "parity", checkpoint, "--frameworks", "keras", *SMALL)
    assert result.returncode == 0, result.stderr
    assert table_rows(result.stdout) == {("keras", "jax")}
    assert "skipped keras/tensorflow: TensorFlow is not installed" in result.stderr
    assert "skipped keras/torch: PyTorch is not installed" in result.stderr


def test_tensorflow_start_up_logging_stays_off_the_command_s_stderr(checkpoint):
    result = run_as(
        "all",
        "parity",
        checkpoint,
        "--frameworks",
        "keras",
        "--keras-backends",
        "tensorflow",
        *SMALL,
        TF_CPP_MIN_LOG_LEVEL=None,
    )
    assert result.returncode == 0, result.stderr
    assert table_rows(result.stdout) == {("keras", "tensorflow")}
    assert all(line.startswith("parity: ") for line in result.stderr.splitlines()), result.stderr


def test_import_impl_keras_without_tensorflow_picks_jax():
    script = "import impl_keras, keras, os; print(keras.backend.backend(), os.environ['KERAS_BACKEND'])"
    result = python_as("no-tensorflow", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["jax", "jax"]


@pytest.mark.parametrize(
    ("install", "args", "says"),
    [
        (
            "torch",
            ["parity", "--frameworks", "flax"],
            "--frameworks flax needs JAX: pip install 'attention-unet[flax]'",
        ),
        (
            "torch",
            ["bench", "--frameworks", "keras"],
            "--frameworks keras needs Keras: pip install 'attention-unet[keras]'",
        ),
        (
            "keras-jax",
            ["parity", "--frameworks", "keras", "--keras-backends", "tensorflow"],
            "--keras-backends tensorflow needs TensorFlow: pip install 'attention-unet[tensorflow]'",
        ),
        (
            "base",
            ["parity"],
            "no framework is installed: pip install 'attention-unet[torch]' (or [flax] or [keras,jax])",
        ),
    ],
)
def test_a_missing_framework_that_is_asked_for_is_a_usage_error(checkpoint, install, args, says):
    result = run_as(install, *args[:1], checkpoint if args[0] == "parity" else "--json", *args[1:])
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [f"attention-unet {args[0]}: error: {says}"]
    assert result.stdout == ""


def test_a_file_whose_format_needs_a_missing_package_is_refused_in_one_line(checkpoint, tmp_path):
    destination = tmp_path / "model.pt"
    result = run_as("base", "convert", checkpoint, destination)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "attention-unet convert: error: .pt needs PyTorch: pip install 'attention-unet[torch]'"
    ]
    assert not destination.exists() and list(tmp_path.iterdir()) == []


def test_report_without_matplotlib_is_refused_before_the_run(checkpoint, tmp_path):
    result = run_as("torch", "parity", checkpoint, "--report", tmp_path / "report", also_hide=("matplotlib",))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "attention-unet parity: error: --report needs matplotlib: pip install 'attention-unet[report]'"
    ]
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize(("suffix", "hidden", "says"), [(".png", "PIL", "Pillow"), (".tif", "tifffile", "tifffile")])
def test_train_data_without_the_images_extra_is_refused_in_one_line(tmp_path, suffix, hidden, says):
    import numpy as np
    import tifffile
    from PIL import Image

    for sub in ("images", "masks"):
        (tmp_path / "data" / sub).mkdir(parents=True)
        path = tmp_path / "data" / sub / f"a{suffix}"
        if suffix == ".png":
            Image.new("L", (8, 8)).save(path)
        else:
            tifffile.imwrite(path, np.zeros((8, 8), np.uint8))
    result = run_as("torch", "train", "--data", tmp_path / "data", "--out", tmp_path / "run", also_hide=(hidden,))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"attention-unet train: error: reading {suffix} files needs {says}: pip install 'attention-unet[images]'"
    ]
    assert not (tmp_path / "run").exists()
