"""The command's rough edges: usage errors that name the argument, messages in the command's own
terms, output another command can take back, and what a newcomer sees at start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

import weights_convert
from tests.conftest import run_cli
from weights_convert.core.checkpoint import CheckpointError
from weights_convert.core.random_init import random_checkpoint
from weights_convert.core.spec import ModelConfig
from weights_convert.harness import cli, keras_worker, parity

TINY = ModelConfig(3, 1, (4, 8))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("usage") / "tiny.safetensors"
    weights_convert.write(random_checkpoint(TINY, seed=2), path)
    return path


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["parity", "{tiny}", "--seed", "-1"], "--seed must be non-negative, got -1"),
        (["init", "{tmp}/x.safetensors", "--seed", "-1"], "--seed must be non-negative, got -1"),
        (["parity", "{tiny}", "--batch", "0"], "--batch must be at least 1, got 0"),
        (["bench", "--batch", "0"], "batch must be a positive integer"),
        (["parity", "{tiny}", "--mode", "fit", "--steps", "0"], "--steps must be at least 1, got 0"),
    ],
)
def test_bad_counts_are_usage_errors_naming_the_argument(capsys, tiny, tmp_path, args, names):
    code, out, err = run_cli(capsys, *(a.format(tiny=tiny, tmp=tmp_path) for a in args))
    assert code == 2
    assert names in err.strip().splitlines()[-1]
    assert "size" not in err.strip().splitlines()[-1]
    assert out == "" and list(tmp_path.iterdir()) == []


def test_top_level_help_has_no_markup(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "attention-unet" in out
    assert "``" not in out


def test_inspect_prints_the_config_that_convert_takes_back(capsys, tiny, tmp_path):
    code, out, _ = run_cli(capsys, "inspect", tiny)
    assert code == 0
    config_text = next(line for line in out.splitlines() if line.startswith("config")).split(None, 1)[1]
    assert json.loads(config_text) == TINY.to_dict()
    code, _, err = run_cli(capsys, "convert", tiny, tmp_path / "same.safetensors", "--config", config_text)
    assert code == 0, err
    other = json.dumps({**TINY.to_dict(), "out_channels": 2})
    code, _, err = run_cli(capsys, "convert", tiny, tmp_path / "other.safetensors", "--config", other)
    assert code == 1 and not (tmp_path / "other.safetensors").exists()


def test_overwrite_hint_in_each_interface_s_own_terms(capsys, tiny, tmp_path):
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep")
    with pytest.raises(CheckpointError, match=r"pass force=True to overwrite"):
        weights_convert.convert(tiny, existing)
    code, _, err = run_cli(capsys, "convert", tiny, existing)
    assert code == 1 and "pass --force to overwrite" in err and "force=True" not in err
    assert existing.read_bytes() == b"keep"


def test_bfloat16_safetensors_reads_back_in_a_new_process(capsys, tiny, tmp_path):
    bf16 = tmp_path / "bf16.safetensors"
    assert run_cli(capsys, "convert", tiny, bf16, "--dtype", "bfloat16")[0] == 0
    # A new interpreter, so nothing imported ml_dtypes before the read.
    result = subprocess.run(
        [sys.executable, "-m", "weights_convert.harness.cli", "inspect", str(bf16), "--json"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    floating = sum(value.dtype.kind == "f" for value in weights_convert.read(tiny).tensors.values())
    assert json.loads(result.stdout)["dtypes"]["bfloat16"] == floating


def test_msgpack_to_pt_warns_of_nothing(capsys, tiny, tmp_path):
    msgpack = tmp_path / "e.msgpack"
    assert run_cli(capsys, "convert", tiny, msgpack)[0] == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = run_cli(capsys, "convert", msgpack, tmp_path / "z.pt")
    assert code == 0, err
    assert [str(w.message) for w in caught if "writable" in str(w.message)] == []


def test_framework_start_up_logging_is_off_unless_the_user_set_it(capsys, monkeypatch, tiny):
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    monkeypatch.setenv("GRPC_VERBOSITY", "DEBUG")
    assert run_cli(capsys, "inspect", tiny)[0] == 0
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "3"
    assert os.environ["GRPC_VERBOSITY"] == "DEBUG"


def test_report_that_exists_is_refused_before_the_run(capsys, tiny, tmp_path):
    report = tmp_path / "report"
    report.mkdir()
    code, out, err = run_cli(capsys, "parity", tiny, "--frameworks", "torch", "--report", report)
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [
        f"attention-unet parity: error: --report {report}: already exists (pass --force to overwrite)"
    ]
    assert list(report.iterdir()) == []


def test_parity_table_ends_with_a_one_line_summary(capsys, tiny):
    code, out, _ = run_cli(capsys, "parity", tiny, "--frameworks", "torch", "--size", "12", "10", "--seed", "3")
    assert code == 0
    last = out.strip().splitlines()[-1]
    verdict, rows, config, run = last.split(" | ")
    assert verdict == "PASS"
    rows_count = len(out.strip().splitlines()) - 2  # header and summary
    assert rows.startswith(f"{rows_count} rows, largest error ") and "% of its bound (torch cpu float32 " in rows
    largest = float(rows.split("largest error ", 1)[1].split("%", 1)[0])
    assert 0 < largest <= 100
    assert json.loads(config.removeprefix("config ")) == TINY.to_dict()
    assert run == "size 12x10, batch 2, seed 3, float32, eval"


def test_selection_defaults_to_installed_and_honours_keras_backend(monkeypatch):
    from weights_convert.core import extras

    real = extras.installed
    monkeypatch.setattr(extras, "installed", lambda module: module not in ("jax", "flax") and real(module))
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    selection = parity.select()
    assert selection.frameworks == ("torch", "keras") and selection.keras_backends == ("torch",)
    assert selection.skipped == ("skipped flax: JAX is not installed (pip install 'attention-unet[flax]')",)
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    selection = parity.select()
    assert selection.frameworks == ("torch",)
    assert selection.skipped[-1] == (
        "skipped keras: no Keras backend is installed: JAX is not installed (pip install 'attention-unet[jax]')"
    )
    with pytest.raises(extras.MissingPackage, match=r"^--frameworks keras under KERAS_BACKEND=jax needs JAX"):
        parity.select(("keras",))


def test_last_error_line_of_a_traceback():
    stderr = (
        "some warning\n"
        "Traceback (most recent call last):\n"
        '  File "x.py", line 1, in <module>\n'
        "    import keras\n"
        "ImportError: first\n\n"
        "During handling of the above exception, another exception occurred:\n\n"
        "Traceback (most recent call last):\n"
        '  File "y.py", line 2, in <module>\n'
        "    import tensorflow\n"
        "ModuleNotFoundError: No module named 'tensorflow'\n"
        "  more detail\n"
    )
    assert keras_worker.last_error_line(stderr) == "ModuleNotFoundError: No module named 'tensorflow'"
    assert keras_worker.last_error_line("killed\n") == "killed"


def test_a_failing_backend_reports_its_last_error_line(monkeypatch, tiny):
    from tests.installs import environment

    # The worker under Keras' torch backend, with torch hidden from it.
    monkeypatch.setattr(keras_worker, "_runs_here", lambda backend, calls: False)
    for name, value in environment(("torch",)).items():
        monkeypatch.setenv(name, value)
    call = keras_worker.Call("forward", tiny, np.zeros((1, 3, 8, 8)), kwargs={"dtype": "float32"})
    with pytest.raises(keras_worker.BackendFailed) as failed:
        keras_worker.run_batch_in_backend("torch", [call])
    message = str(failed.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith("Keras under torch failed (exit 1): ") and "torch" in message.split(": ", 1)[1]


def test_keras_summary_shows_output_shapes():
    import impl_keras

    lines: list[str] = []
    impl_keras.AttentionUNet(3, 1, (4, 8)).summary(print_fn=lambda line, **_: lines.append(line))
    table = "\n".join(lines)
    assert "?" not in table
    assert "8)" in next(line for line in table.splitlines() if "b1 (ConvBlock)" in line)


def test_train_data_without_the_images_extra_names_it(monkeypatch, tmp_path, capsys):
    from PIL import Image

    from weights_convert.core import extras

    for sub in ("images", "masks"):
        (tmp_path / "data" / sub).mkdir(parents=True)
        Image.new("L", (8, 8)).save(tmp_path / "data" / sub / "a.png")
    real = extras.installed
    monkeypatch.setattr(extras, "installed", lambda module: module != "PIL" and real(module))
    code = cli.main(["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.strip().endswith("reading .png files needs Pillow: pip install 'attention-unet[images]'")
    assert not (tmp_path / "run").exists()
