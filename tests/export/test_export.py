"""Deployment exports (ONNX, torch.export, TorchScript, SavedModel, jax.export) of a 2D and a 3D
checkpoint run in their own runtimes and compared with the float64 NumPy reference at an odd size
and two batch sizes, as ``attention-unet export`` checks them; perturbed exports fail; refusals are
one line.

Each format is exported once per dimension (exporters take seconds); the SavedModel is exported in
this process when its Keras backend is TensorFlow, else in one subprocess that has it.
"""

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from tests.installs import run_as
from weights_convert.core.monai_spec import MonaiConfig
from weights_convert.core.random_init import random_checkpoint
from weights_convert.core.spec import ModelConfig, param_specs
from weights_convert.formats.io import write
from weights_convert.harness import cli, export
from weights_convert.harness.parity.tolerances import tolerance

CONFIG = ModelConfig(3, 2, (4, 8, 16))  # depth 2: min size 4; checked at 2x37x53 and 1x7x5
CHECKPOINT = random_checkpoint(CONFIG, seed=3)
CONFIG_3D = ModelConfig(2, 2, (4, 8, 16), spatial_dims=3)  # checked at 2x9x11x13 and 1x7x5x9
SUFFIXES = (".onnx", ".pt2", ".torchscript", ".savedmodel", ".jaxexport")
FLOAT64_SUFFIXES = (".torchscript", ".jaxexport")  # the fast exporters; .pt2 and .savedmodel keep float64 too


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("export_source") / "tiny.safetensors"
    write(CHECKPOINT, path)
    return path


@dataclasses.dataclass
class Exported:
    """A checkpoint's exports: (suffix, dtype) -> (path, verdict), and the sizes its tests use."""

    checkpoint: object
    files: dict
    checked_shapes: list  # the check's inputs (channels first)
    other_size: tuple  # a size neither exported nor checked
    parity_size: tuple

    def __getitem__(self, key):
        return self.files[key]


# MONAI's network with a stride of 1 and a 1x1 transposed convolution: sides in multiples of 2.
CONFIG_MONAI = MonaiConfig(3, 2, (4, 8, 6), strides=(1, 2), up_kernel_size=1)

# case -> (checkpoint, the check's input shapes, a size unseen by export and check, parity's --size)
CASES = {
    "2d": (CHECKPOINT, [(2, 3, 37, 53), (1, 3, 7, 5)], (9, 6), (13, 11)),
    "3d": (random_checkpoint(CONFIG_3D, seed=3), [(2, 2, 9, 11, 13), (1, 2, 7, 5, 9)], (5, 9, 6), (9, 7, 5)),
    "monai": (random_checkpoint(CONFIG_MONAI, seed=3), [(2, 3, 6, 10), (1, 3, 2, 4)], (8, 4), (4, 6)),
}


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory) -> Exported:
    """The 2D, the 3D or MONAI's checkpoint's exports, each exported and checked once."""
    checkpoint, *sizes = CASES[request.param]
    directory = tmp_path_factory.mktemp(f"exports_{request.param}")
    source = directory / "source.safetensors"
    write(checkpoint, source)
    results = {}
    cases = [(suffix, "float32") for suffix in SUFFIXES] + [(suffix, "float64") for suffix in FLOAT64_SUFFIXES]
    for suffix, dtype in cases:
        path = directory / f"model_{dtype}{suffix}"
        results[suffix, dtype] = (path, export.export(source, path, dtype=dtype))
    return Exported(checkpoint, results, *sizes)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_float32_export_matches_reference_at_odd_size_and_two_batches(exported, suffix):
    path, verdict = exported[suffix, "float32"]
    assert path.exists() and verdict.passed, verdict.line()
    assert [case.shape for case in verdict.cases] == exported.checked_shapes
    for case in verdict.cases:
        # the bound is the float32 table's, relative to the noise the reference itself shows
        assert case.output.tolerance == tolerance("float32", case.output.noise)
        assert case.output.rel_diff <= case.output.tolerance and case.mask.passed


@pytest.mark.parametrize("suffix", FLOAT64_SUFFIXES)
def test_float64_export_matches_reference_to_1e_10(exported, suffix):
    path, verdict = exported[suffix, "float64"]
    assert verdict.passed, verdict.line()
    assert all(case.output.tolerance == tolerance("float64") for case in verdict.cases)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_layout_and_dynamic_sizes(exported, suffix):
    """Each file runs in its layout (channels first or last) at a batch of 3 and a size not checked."""
    path, _ = exported[suffix, "float32"]
    fmt = export.format_for(path)
    in_channels = exported.checkpoint.config.in_channels
    x = np.random.default_rng(0).random((3, in_channels, *exported.other_size)).astype(np.float32)
    logits = export.run(path, x, trusted=True)  # channels first in and out; transposed for channels-last files
    assert logits.shape == (3, 2, *exported.other_size)
    channels_last = fmt.data_format == "channels_last"
    raw = fmt.module().run(path, np.ascontiguousarray(np.moveaxis(x, 1, -1) if channels_last else x))
    assert raw.shape == ((3, *exported.other_size, 2) if channels_last else (3, 2, *exported.other_size))


@pytest.mark.parametrize("suffix", (".torchscript", ".jaxexport", ".pt2"))
def test_runtime_refuses_input_below_min_size(exported, suffix):
    path, _ = exported[suffix, "float32"]
    in_channels, sides = exported.checkpoint.config.in_channels, exported.other_size
    with pytest.raises(Exception):  # noqa: B017 - each runtime raises its own error type
        export.run(path, np.zeros((1, in_channels, 3, *sides[1:]), np.float32), trusted=True)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_an_export_file_runs_only_when_the_caller_vouches_for_it(exported, monkeypatch, suffix):
    """Export files are programs: without ``trusted=True`` the runtime is never reached."""
    path, _ = exported[suffix, "float32"]
    module = export.format_for(path).module()
    ran = []
    monkeypatch.setattr(module, "run", lambda *args: ran.append(args))
    x = np.zeros((1, 3, 8, 8), np.float32)
    for call in (lambda: export.run(path, x), lambda: export.check_file(path, exported.checkpoint)):
        with pytest.raises(export.ExportError, match="is a program .* pass trusted=True only for a file you made"):
            call()
    assert ran == []


def head_weight(config) -> str:
    """The canonical name of the 1x1 head's kernel (``output.weight``, MONAI's ``model.2.conv.weight``)."""
    return [spec.name for spec in param_specs(config) if spec.leaf == "weight"][-1]


def test_perturbed_onnx_weight_fails_the_check(exported, tmp_path):
    import onnx
    from onnx import numpy_helper

    path, _ = exported[".onnx", "float32"]
    model = onnx.load(str(path))
    head = head_weight(exported.checkpoint.config)
    initializer = next(t for t in model.graph.initializer if t.name == head)  # the 1x1 head
    weights = numpy_helper.to_array(initializer) * np.float32(1 + 1e-3)
    initializer.CopyFrom(numpy_helper.from_array(weights, initializer.name))
    perturbed = tmp_path / "perturbed.onnx"
    onnx.save(model, str(perturbed))
    verdict = export.check_file(perturbed, exported.checkpoint, trusted=True)
    assert not verdict.passed and "FAILED" in verdict.line()


def test_export_of_other_weights_fails_the_check(exported):
    """A correct file checked against a checkpoint one weight away: the check sees it."""
    path, _ = exported[".torchscript", "float64"]
    other = exported.checkpoint.astype("float64")
    head = head_weight(other.config)
    other.tensors[head] = other.tensors[head] * (1 + 1e-6)
    assert not export.check_file(path, other, dtype="float64", trusted=True).passed


@pytest.fixture
def flax_exports_other_weights(monkeypatch):
    """``impl_flax.export.export`` writing other weights than it is given (one bias moved by 0.01)."""
    import impl_flax.export

    real_export = impl_flax.export.export

    def export_other_weights(checkpoint, path, dtype):
        other = checkpoint.astype("float32")
        other.tensors["output.bias"] = other.tensors["output.bias"] + 0.01
        real_export(other, path, dtype)

    monkeypatch.setattr(impl_flax.export, "export", export_other_weights)


def test_cli_failed_check_writes_nothing(source, tmp_path, flax_exports_other_weights, capsys):
    """An export whose file computes something else (one weight changed) is refused: exit 1, the
    FAILED verdict on stdout, no file."""
    dst = tmp_path / "model.jaxexport"
    assert cli.main(["export", str(source), str(dst)]) == 1
    out = capsys.readouterr().out.strip()
    assert out.startswith("export check FAILED") and "\n" not in out
    assert not dst.exists() and list(tmp_path.iterdir()) == []


def test_cli_exports_and_prints_one_line_verdict(source, tmp_path, capsys):
    dst = tmp_path / "model.torchscript"
    assert cli.main(["export", str(source), str(dst)]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("export check passed") and "\n" not in out and dst.is_file()


@pytest.mark.parametrize(
    "name, args, message",
    [
        ("model.xyz", [], "unknown export format '.xyz'"),
        ("model.onnx", ["--dtype", "float64"], ".onnx export supports float32 only"),
        ("existing.jaxexport", [], "already exists (pass --force to overwrite)"),
    ],
)
def test_cli_refusals_are_one_line_and_write_nothing(source, tmp_path, capsys, name, args, message):
    (tmp_path / "existing.jaxexport").write_bytes(b"keep me")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert cli.main(["export", str(source), str(tmp_path / name), *args]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "existing.jaxexport").read_bytes() == b"keep me"


def test_missing_package_names_the_extra(source, tmp_path):
    result = run_as("flax", "export", source, tmp_path / "model.onnx")
    assert result.returncode == 1
    assert ".onnx export needs PyTorch: pip install 'attention-unet[torch]'" in result.stderr
    assert not (tmp_path / "model.onnx").exists()


PARITY_TARGETS = ("onnx", "pt2", "torchscript", "savedmodel", "jaxexport")


def test_parity_over_every_export_target_at_odd_size_and_two_batches(exported, monkeypatch):
    """``parity.check`` with the five export targets: each with output and mask rows at the run's
    batch-2 input (13x11, or 9x7x5) and at batch 1 (the export traced batch 2), all passing within
    the framework rows' noise-relative bounds. The files are this module's float32 exports of the
    same checkpoint (``exported``; exporting takes seconds per format), copied where the parity run
    writes each."""
    import shutil

    from weights_convert.harness import parity

    def copy_module_export(checkpoint, path, *, dtype, check):
        assert checkpoint is exported.checkpoint and (dtype, check) == ("float32", False)
        made, _ = exported[Path(path).suffix, dtype]
        (shutil.copytree if made.is_dir() else shutil.copyfile)(made, path)

    monkeypatch.setattr(export, "export", copy_module_export)
    report = parity.check(exported.checkpoint, frameworks=PARITY_TARGETS, size=exported.parity_size, batch=2)
    assert report.passed, parity.format_table(report)
    quantities = ["output", "mask", "batch1/output", "batch1/mask"]
    assert [(r.framework, r.quantity) for r in report.results] == [
        (name, quantity) for name in PARITY_TARGETS for quantity in quantities
    ]
    for r in report.results:
        if r.quantity.endswith("output"):
            assert r.tolerance == tolerance("float32", r.noise) and r.rel_diff <= r.tolerance
    assert {label: np.shape(output) for label, output in report.outputs.items()} == {
        f"{name} cpu float32": (2, 2, *exported.parity_size) for name in PARITY_TARGETS
    }


def test_parity_of_an_export_of_other_weights_fails_at_output(flax_exports_other_weights):
    """An export that writes other weights (one bias moved) fails its parity row, named ``output``."""
    from weights_convert.harness import parity

    report = parity.check(CHECKPOINT, frameworks=("jaxexport",), size=(13, 11), batch=2)
    assert not report.passed
    assert report.first_drift() == {"jaxexport cpu float32": "output"}
    failing = {r.quantity for r in report.failures()}
    assert {"output", "batch1/output"} <= failing


@pytest.mark.parametrize(
    "args, message",
    [
        (["--frameworks", "onnx", "--mode", "train"], "an export computes the eval forward only; use --mode eval"),
        (["--frameworks", "torch,onnx", "--dtype", "float64"], "--frameworks onnx is float32 only"),
        (["--frameworks", "pt2", "--dtype", "mixed_bfloat16"], "exports are float32 or float64"),
    ],
)
def test_parity_export_refusals_are_one_line_usage_errors(source, capsys, args, message):
    assert cli.main(["parity", str(source), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_parity_export_target_missing_package_names_the_extra(source):
    result = run_as("flax", "parity", source, "--frameworks", "onnx")
    assert result.returncode == 2
    assert "--frameworks onnx needs PyTorch: pip install 'attention-unet[torch]'" in result.stderr
