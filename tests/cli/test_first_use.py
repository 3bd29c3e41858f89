"""What a new user meets first, with the README and ``--help`` only: the install's extras, file
modes, the default framework, a quiet terminal, clear refusals, ``--version`` and defaults in
``--help``, a bench that waits for the steady state, named ONNX axes, wrapped checkpoints, and
README claims that match the code."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import tomllib
import torch

import weights_convert
from tests.cli.test_cli_usage import TINY, run_cli
from tests.conftest import REPO
from tests.installs import run_as
from weights_convert.core.random_init import random_checkpoint

TINY_JSON = '{"channels": [4, 8]}'
README = (REPO / "README.md").read_text()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("first_use") / "tiny.safetensors"
    weights_convert.write(random_checkpoint(TINY, seed=2), path)
    return path


def one_line_error(result, command: str, code: int) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"attention-unet {command}: error: "), lines
    return lines[0]


def test_the_flax_extra_brings_what_jaxexport_needs(tiny, tmp_path):
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(p.startswith("flatbuffers") for p in extras["flax"])
    out = tmp_path / "m.jaxexport"
    result = run_as("flax", "export", tiny, out, also_hide=("flatbuffers",))
    line = one_line_error(result, "export", 1)
    assert line.endswith(".jaxexport export needs flatbuffers: pip install 'attention-unet[flax]'")
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".msgpack", ".weights.h5", ".keras", ".orbax"])
def test_written_files_have_the_mode_the_umask_gives(tiny, tmp_path, suffix):
    previous = os.umask(0o022)
    try:
        out = tmp_path / f"m{suffix}"
        weights_convert.convert(tiny, out)
    finally:
        os.umask(previous)
    for path in [out, *out.rglob("*")] if out.is_dir() else [out]:
        assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path


def test_train_defaults_to_an_installed_framework_and_names_the_option(tmp_path):
    args = ("--steps", "1", "--batch", "2", "--size", "16", "16", "--config", TINY_JSON)
    result = run_as("flax", "train", "--out", tmp_path / "a", *args)
    assert result.returncode == 0, result.stderr
    assert "train flax x1 [" in result.stderr and (tmp_path / "a" / "step_1.safetensors").exists()
    refused = run_as("flax", "train", "--framework", "torch", "--out", tmp_path / "b", *args)
    line = one_line_error(refused, "train", 2)
    assert line.endswith("--framework torch: PyTorch is not installed (pip install 'attention-unet[torch]')")
    assert not (tmp_path / "b").exists()


def test_keras_training_keeps_tensorflow_logging_off_and_names_its_backend(tmp_path):
    args = ("--steps", "1", "--batch", "2", "--size", "16", "16", "--config", TINY_JSON)
    result = run_as("all", "train", "--framework", "keras", "--out", tmp_path / "k", *args, KERAS_BACKEND="tensorflow")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("train keras/tensorflow x1 ["), lines
    assert lines[1].startswith("trained steps 1..1 in ")
    refused = run_as(
        "all",
        "train",
        "--framework",
        "keras",
        "--data-parallel",
        "2",
        "--out",
        tmp_path / "d",
        *args,
        KERAS_BACKEND="tensorflow",
    )
    line = one_line_error(refused, "train", 2)
    assert "runs on the JAX backend" in line and "KERAS_BACKEND=jax" in line and "Error:" not in line
    assert not (tmp_path / "d").exists()


def test_a_data_folder_that_is_not_there_or_holds_no_image(capsys, tmp_path):
    missing = tmp_path / "nosuchdir"
    code, _, err = run_cli(capsys, "train", "--data", missing, "--out", tmp_path / "o")
    assert code == 1 and err.strip() == (
        f"attention-unet train: error: {missing}: no such directory (--data DIR holds DIR/images and DIR/masks)"
    )
    for sub in ("images", "masks"):
        (tmp_path / "bmp" / sub).mkdir(parents=True)
        (tmp_path / "bmp" / sub / "a.bmp").write_bytes(b"BM")
    code, _, err = run_cli(capsys, "train", "--data", tmp_path / "bmp", "--out", tmp_path / "o")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "(found .bmp: only .png, .jpg, .jpeg, .tif, .tiff are read)" in err
    (tmp_path / "bmp" / "images" / "a.jpg").write_bytes(b"\xff\xd8\xff")  # three bytes of a JPEG signature
    (tmp_path / "bmp" / "masks" / "a.png").write_bytes(b"\x89PNG\r\n")
    code, _, err = run_cli(capsys, "train", "--data", tmp_path / "bmp", "--out", tmp_path / "o")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "a.jpg: not a PNG or JPEG file" in err
    assert not (tmp_path / "o").exists()


def test_a_mistyped_option_gets_the_subcommand_usage_and_the_option_meant(capsys):
    code, out, err = run_cli(capsys, "parity", "--dtpye", "float64")
    assert code == 2 and out == ""
    assert err.startswith("usage: attention-unet parity ")
    assert err.strip().endswith("error: unrecognized arguments: --dtpye (did you mean --dtype?)")
    code, _, err = run_cli(capsys, "parity", "--dtyp", "float64")  # no abbreviations
    assert code == 2 and "unrecognized arguments: --dtyp" in err


def test_version_and_the_defaults_in_help(capsys):
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"attention-unet {version}" == f"attention-unet {weights_convert.__version__}"
    expected = {
        "train": ("--steps STEPS", "100"),
        "parity": ("--batch BATCH", "2"),
        "bench": ("--warmup WARMUP", "2"),
    }
    for command, (option, default) in expected.items():
        _, out, _ = run_cli(capsys, command, "--help")
        text = " ".join(out.split())
        assert option in text and f"(default: {default})" in text, command
    sizes = {"train": "64 64, or 32 32 32", "parity": "64 64, or 32 32 32", "bench": "256 256, or 64 64 64"}
    for command, size in sizes.items():
        _, out, _ = run_cli(capsys, command, "--help")
        assert f"(default: {size})" in " ".join(out.split()), command
    _, out, _ = run_cli(capsys, "train", "--help")
    assert all(f"(default: {d})" in " ".join(out.split()) for d in ("8", "50"))
    _, out, _ = run_cli(capsys, "parity", "--help")  # what a row's bound is, in one line
    assert "within its bound: 1e-10 in float64, a multiple of the rounding noise measured" in " ".join(out.split())


def test_the_bench_waits_for_the_steady_state():
    from weights_convert.harness.bench.timing import MAX_EXTRA_WARMUP, time_runs

    durations = iter([0.06, 0.03, 0.012, 0.002, 0.002, *[0.002] * 50])
    timing = time_runs(lambda: time.sleep(next(durations)), lambda _: None, repeats=2, warmup=1, label="test")
    assert timing["steady"] and timing["warmup_calls"] >= 4 and timing["median_ms"] < 10
    assert timing["first_call_s"] >= 0.06
    alternating = iter([0.001, 0.01] * 50)
    timing = time_runs(lambda: time.sleep(next(alternating)), lambda _: None, repeats=1, warmup=3, label="test")
    assert not timing["steady"] and timing["warmup_calls"] == 3 + MAX_EXTRA_WARMUP


def test_onnx_exports_name_their_axes_and_state_the_minimum_size(tiny, tmp_path):
    import onnx

    out = tmp_path / "m.onnx"
    assert run_as("all", "export", tiny, out, "--no-check").returncode == 0
    proto = onnx.load(str(out))
    for value in (proto.graph.input[0], proto.graph.output[0]):
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        assert dims[0] == "batch" and dims[2:] == ["height", "width"], dims
    metadata = {p.key: p.value for p in proto.metadata_props}
    assert metadata["min_size"] == str(TINY.min_size) and metadata["layout"] == "NCHW"


def test_a_wrapped_state_dict_is_recognised_or_its_prefix_named(capsys, tiny, tmp_path):
    tensors = weights_convert.read(tiny).tensors
    lightning = {"state_dict": {f"model.{k}": torch.from_numpy(np.array(v)) for k, v in tensors.items()}}
    torch.save(lightning, tmp_path / "lightning.pt")
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "lightning.pt", "--json")
    assert code == 0 and '"channels": [4, 8]' in out
    from safetensors.numpy import save_file

    save_file({f"net.body.{k}": np.ascontiguousarray(v) for k, v in tensors.items()}, tmp_path / "wrapped.safetensors")
    code, _, err = run_cli(capsys, "inspect", tmp_path / "wrapped.safetensors")
    assert code == 1 and "the names carry the prefix 'net.body.'" in err


def test_readme_claims_match_the_code():
    from impl_torch.training import make_optimizer
    from weights_convert.core.optim import DEFAULTS

    model = torch.nn.Linear(1, 1)
    assert make_optimizer(model, "adam").defaults["eps"] == DEFAULTS["adam"]["eps"] == 1e-5
    assert "Adam's eps is 1e-5, not torch's 1e-8" in " ".join(README.split())
    assert "keras.ops.convert_to_numpy" in README
    assert "3.6 GB" not in README and README.count("3.8 GB") >= 2
    training = " ".join(README.split("## Training", 1)[1].split("### Continue", 1)[0].split())
    from weights_convert.core.losses import default_loss

    assert f"`--loss` (default `{default_loss(1)}` for one output channel, `{default_loss(3)}` for several" in training
    assert "cropped to `--crop`" in training and "to mean 0 and standard deviation 1" in training
    from weights_convert.harness.images import MAX_PIXELS

    assert f"more than {MAX_PIXELS:,} pixels" in " ".join(README.split())


def test_a_config_nested_too_deep_is_a_usage_error(capsys, tiny, tmp_path):
    deep = "[" * 3000 + "]" * 3000
    commands = [
        ("init", tmp_path / "i.safetensors", "--config", deep),
        ("convert", tiny, tmp_path / "c.pt", "--config", deep),
        ("export", tiny, tmp_path / "e.pt2", "--config", deep),
        ("train", "--out", tmp_path / "t", "--config", deep),
    ]
    for command, *args in commands:
        code, _, err = run_cli(capsys, command, *args)
        lines = err.strip().splitlines()
        assert code == 2 and lines[-1].endswith("the JSON nests too deep"), (command, err[-300:])
        assert len(lines[-1]) < 300 and "Traceback" not in err, command
    assert list(tmp_path.iterdir()) == []
