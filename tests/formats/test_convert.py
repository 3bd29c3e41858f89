"""The converter's contract for the framework-free formats (.safetensors, .pt): lossless round
trips, foreign wrappers, and every kind of hostile or broken input refused with a one-line error,
a non-zero exit and nothing written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import weights_convert
from weights_convert.core.checkpoint import CheckpointError
from weights_convert.core.monai_spec import MonaiConfig
from weights_convert.core.random_init import random_checkpoint
from weights_convert.core.spec import ModelConfig
from weights_convert.formats import format_for

SMALL = ModelConfig(2, 3, (4, 8, 16))


def cli(*args, cwd=None):
    """Run the command in a fresh process, as users do."""
    return subprocess.run(
        [sys.executable, "-m", "weights_convert.harness.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )


def assert_refused(result, *fragments):
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def assert_same_tensors(a, b):
    assert list(a.tensors) == list(b.tensors)
    for name in a.tensors:
        x, y = a.tensors[name], b.tensors[name]
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), name


@pytest.fixture
def small_safetensors(tmp_path):
    path = tmp_path / "small.safetensors"
    weights_convert.write(random_checkpoint(SMALL, seed=5), path)
    return path


def save_state_dict(obj, path):
    torch.save(obj, path)
    return path


def torch_state(checkpoint):
    return {k: torch.from_numpy(v.copy()) for k, v in checkpoint.tensors.items()}


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_safetensors_pt_round_trip_bit_exact(tmp_path, dtype):
    original = random_checkpoint(SMALL, seed=1).astype(dtype)
    weights_convert.write(original, tmp_path / "a.safetensors")
    weights_convert.convert(tmp_path / "a.safetensors", tmp_path / "b.pt")
    weights_convert.convert(tmp_path / "b.pt", tmp_path / "c.pth")
    weights_convert.convert(tmp_path / "c.pth", tmp_path / "d.safetensors")
    for name in ("a.safetensors", "b.pt", "c.pth", "d.safetensors"):
        assert_same_tensors(weights_convert.read(tmp_path / name), original)


def test_dtype_cast_keeps_counters(tmp_path, small_safetensors):
    written = weights_convert.convert(small_safetensors, tmp_path / "half.pt", dtype="float16")
    counters = {k: v for k, v in written.tensors.items() if k.endswith("num_batches_tracked")}
    assert counters and all(v.dtype == np.int64 and int(v) == 100 for v in counters.values())
    assert {str(v.dtype) for k, v in written.tensors.items() if k not in counters} == {"float16"}


def assert_same_as_state_dict(tensors: dict, state: dict, ordered: bool = True):
    """``tensors`` (name -> numpy array) hold the bytes, dtypes and shapes of torch ``state``."""
    assert (list(tensors) == list(state)) if ordered else (sorted(tensors) == sorted(state))
    for name, tensor in state.items():
        expected = tensor.numpy()
        actual = np.asarray(tensors[name])
        assert (actual.dtype, actual.shape) == (expected.dtype, expected.shape), name
        assert actual.tobytes() == expected.tobytes(), name


def test_article_checkpoint_converts_losslessly(tmp_path, reference_dir, article_safetensors):
    """The article's ``.pt`` to ``.safetensors`` (the session's twin) and back to ``.pt``, each file
    checked against readers that are not the converter's: torch's own and the safetensors package's."""
    from safetensors.numpy import load_file

    original = torch.load(reference_dir / "article_state_dict.pt", weights_only=True)
    assert len(original) == 148
    assert_same_as_state_dict(load_file(article_safetensors), original, ordered=False)
    assert_same_as_state_dict(weights_convert.read(article_safetensors).tensors, original)
    weights_convert.convert(article_safetensors, tmp_path / "back.pt")
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert_same_as_state_dict({name: tensor.numpy() for name, tensor in back.items()}, original)


@pytest.mark.parametrize("wrap", ["state_dict", "model", "module", "state_dict+module"])
def test_foreign_pt_wrappers_are_accepted(tmp_path, wrap):
    checkpoint = random_checkpoint(SMALL, seed=2)
    state = torch_state(checkpoint)
    if "module" in wrap:
        state = {f"module.{k}": v for k, v in state.items()}
    if wrap.startswith("state_dict"):
        state = {"state_dict": state, "epoch": 3}
    elif wrap == "model":
        state = {"model": state, "optimizer": {"lr": torch.tensor(0.1)}}
    path = save_state_dict(state, tmp_path / "wrapped.pt")
    assert_same_tensors(weights_convert.read(path), checkpoint)


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_that_runs_code_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    state = torch_state(random_checkpoint(SMALL))
    state["payload"] = RunsCode(marker)
    path = save_state_dict(state, tmp_path / "evil.pt")
    result = cli("convert", path, tmp_path / "out.safetensors")
    assert_refused(result, "evil.pt", "refused", "arbitrary code execution")
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()
    with pytest.raises(CheckpointError, match="refused"):
        weights_convert.read(path)
    assert not marker.exists()


def test_nothing_but_tensors_in_a_state_dict(tmp_path):
    state = torch_state(random_checkpoint(SMALL))
    state["e1.conv.conv.0.weight"] = [1.0, 2.0]
    path = save_state_dict(state, tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match=r"entries that are not tensors: \['e1.conv.conv.0.weight'\]"):
        weights_convert.read(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("keep", [0, 7, 100, 0.5, 0.99])
def test_truncated_files_are_refused(tmp_path, small_safetensors, suffix, keep):
    source = tmp_path / f"full{suffix}"
    weights_convert.convert(small_safetensors, source)
    data = source.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep
    broken = tmp_path / f"cut{suffix}"
    broken.write_bytes(data[:cut])
    dst = tmp_path / "out.safetensors"
    assert_refused(cli("convert", broken, dst), str(broken))
    assert not dst.exists()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_flipped_tensor_byte_is_detected(tmp_path, small_safetensors, suffix):
    source = tmp_path / f"full{suffix}"
    weights_convert.convert(small_safetensors, source)
    data = bytearray(source.read_bytes())
    needle = weights_convert.read(source).tensors["output.weight"].tobytes()
    data[data.find(needle) + 1] ^= 0x40
    source.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        weights_convert.read(source)


def test_unknown_extensions_are_refused(tmp_path, small_safetensors):
    assert_refused(cli("convert", small_safetensors, tmp_path / "out.onnx"), "out.onnx", "unknown checkpoint extension")
    odd = tmp_path / "model.bin"
    odd.write_bytes(b"\0" * 16)
    assert_refused(cli("inspect", odd), "model.bin", "unknown checkpoint extension")
    assert not (tmp_path / "out.onnx").exists()


def test_missing_unexpected_and_misshapen_tensors_are_all_named(tmp_path):
    state = torch_state(random_checkpoint(SMALL))
    del state["d2.ag.Ws.1.running_var"], state["e1.conv.conv.4.bias"]
    state["d9.extra.weight"] = torch.zeros(3)
    state["d1.c1.conv.0.weight"] = torch.zeros(8, 20, 3, 3)
    state["output.bias"] = torch.zeros(2)
    path = save_state_dict(state, tmp_path / "bad.pt")
    result = cli("convert", path, tmp_path / "out.safetensors")
    assert_refused(
        result,
        "missing tensors ['d2.ag.Ws.1.running_var', 'e1.conv.conv.4.bias']",
        "unexpected tensors ['d9.extra.weight']",
        "d1.c1.conv.0.weight (8, 20, 3, 3) (expected (8, 24, 3, 3))",
        "output.bias (2,) (expected (3,))",
    )
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_values_refused_unless_allowed(tmp_path, value):
    checkpoint = random_checkpoint(SMALL)
    checkpoint.tensors["b1.conv.3.weight"][0, 0, 1, 1] = value
    checkpoint.tensors["output.bias"][0] = value
    src = tmp_path / "nan.safetensors"
    weights_convert.write(checkpoint, src)
    dst = tmp_path / "out.pt"
    assert_refused(
        cli("convert", src, dst), "non-finite values", "['b1.conv.3.weight', 'output.bias']", "--allow-nonfinite"
    )
    assert not dst.exists()
    assert cli("convert", src, dst, "--allow-nonfinite").returncode == 0
    assert_same_tensors(weights_convert.read(dst, allow_nonfinite=True), checkpoint)


def test_config_that_contradicts_the_tensors_is_refused(tmp_path, small_safetensors):
    wrong = json.dumps({"in_channels": 2, "out_channels": 3, "channels": [4, 8, 32]})
    dst = tmp_path / "out.pt"
    assert_refused(cli("convert", small_safetensors, dst, "--config", wrong), "contradicts")
    bare = tmp_path / "bare.pt"
    weights_convert.convert(small_safetensors, bare)
    assert_refused(cli("convert", bare, dst, "--config", wrong), "wrong shapes for config", "b1.conv.0.weight")
    assert not dst.exists()
    right = json.dumps(SMALL.to_dict())
    assert cli("convert", bare, dst, "--config", right).returncode == 0


def test_bad_config_in_metadata_is_refused(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "meta.safetensors"
    tensors = random_checkpoint(SMALL).tensors
    save_file(tensors, str(path), metadata={"format_version": "1", "config": '{"channels": [4]}'})
    with pytest.raises(CheckpointError, match="bad config in metadata: channels needs at least two entries"):
        weights_convert.read(path)


def test_existing_destination_is_kept_unless_force(tmp_path, small_safetensors):
    dst = tmp_path / "out.pt"
    dst.write_bytes(b"precious")
    assert_refused(cli("convert", small_safetensors, dst), "already exists", "--force")
    assert dst.read_bytes() == b"precious"
    assert cli("convert", small_safetensors, dst, "--force").returncode == 0
    assert_same_tensors(weights_convert.read(dst), weights_convert.read(small_safetensors))


def test_failed_write_leaves_nothing_behind(tmp_path, small_safetensors, monkeypatch):
    """A writer that dies half-way leaves neither DST nor temporary files, and keeps an old DST."""
    module = format_for("x.pt").load_module()

    def dies_half_way(checkpoint, path):
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "write", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        weights_convert.convert(small_safetensors, tmp_path / "new.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.safetensors"]
    old = tmp_path / "old.pt"
    old.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        weights_convert.convert(small_safetensors, old, force=True)
    assert old.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.pt", "small.safetensors"]


def test_missing_source_and_directory(tmp_path):
    assert_refused(cli("convert", tmp_path / "none.pt", tmp_path / "o.safetensors"), "no such file")
    assert_refused(cli("inspect", tmp_path / "none.safetensors"), "no such file")
    assert_refused(cli("convert", __file__.replace(".py", ".pt"), tmp_path / "nodir" / "o.safetensors"), "no such file")


def test_bad_usage_exits_2(tmp_path):
    for args in (["convert", "only-one.pt"], ["convert", "a.pt", "b.pt", "--dtype", "int8"], ["frobnicate"]):
        result = cli(*args)
        assert result.returncode == 2, (args, result.stderr)


def test_inspect_reports_every_fact(small_safetensors):
    result = cli("inspect", small_safetensors, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["format"] == "safetensors" and info["config"] == SMALL.to_dict()
    assert info["tensors"] == len(weights_convert.param_table(SMALL))
    assert info["parameters"] == weights_convert.parameter_count(SMALL)
    counters = sum(1 for p in weights_convert.param_specs(SMALL) if p.leaf == "num_batches_tracked")
    assert counters == 14  # 2 BatchNorms per conv block (5 blocks) + 2 per gate (2 gates)
    assert info["dtypes"] == {"float32": info["tensors"] - counters, "int64": counters}


@pytest.mark.parametrize(
    "src_suffix, dst_suffix, forbidden",
    [
        (".safetensors", ".safetensors", ["torch", "jax", "tensorflow", "keras", "flax"]),
        (".safetensors", ".pt", ["jax", "tensorflow", "keras", "flax"]),
        (".pt", ".safetensors", ["jax", "tensorflow", "keras", "flax"]),
    ],
)
def test_framework_free_conversions_import_no_framework(tmp_path, small_safetensors, src_suffix, dst_suffix, forbidden):
    src = tmp_path / f"src{src_suffix}"
    weights_convert.convert(small_safetensors, src, force=True)
    code = (
        "import sys, weights_convert.harness.cli as c\n"
        f"assert c.main(['convert', {str(src)!r}, {str(tmp_path / ('dst' + dst_suffix))!r}]) == 0\n"
        f"print(sorted(m for m in {forbidden!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_convert_names_every_dtype_of_a_mixed_checkpoint(tmp_path, capsys):
    """float16 weights with float32 BatchNorm statistics stay mixed, and the summary line says so."""
    from weights_convert.harness.cli import main

    tensors = random_checkpoint(SMALL, seed=5).tensors
    state = {k: torch.from_numpy(v.astype(np.float16) if k.endswith("weight") else v) for k, v in tensors.items()}
    src = save_state_dict(state, tmp_path / "mixed.pt")
    assert main(["convert", str(src), str(tmp_path / "mixed.safetensors")]) == 0
    written = weights_convert.read(tmp_path / "mixed.safetensors").float_dtypes
    summary = capsys.readouterr().err.strip().splitlines()[0]
    assert f"{len(written['float16'])} float16, {len(written['float32'])} float32" in summary, summary


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig(2, 2, (4, 8, 16), spatial_dims=3),
        MonaiConfig(2, 2, (4, 8, 16), spatial_dims=3, kernel_size=(3, 5, 3), up_kernel_size=1),
    ],
    ids=["article", "monai"],
)
def test_a_3d_training_checkpoint_crosses_every_format_bit_for_bit(tmp_path, config):
    """OIDHW kernels (and MONAI's transposed ones) and their Adam slots through every format and
    back to .safetensors: the weights unchanged in each, the optimizer state in each format that
    holds one, the config still 3D and of its architecture (what a format without a config cannot
    hold, MONAI's strides and dropout, said to be assumed)."""
    from weights_convert.core.optimizer_state import OptimizerState, hyperparameters
    from weights_convert.core.spec import param_specs
    from weights_convert.formats import FORMATS
    from weights_convert.formats.io import holds_optimizer

    original = random_checkpoint(config, seed=6)
    first = param_specs(config)[0]
    rng = np.random.default_rng(6)
    trainable = [spec for spec in param_specs(config) if not spec.is_buffer]
    slots = {slot: {s.name: rng.random(s.shape, np.float32) for s in trainable} for slot in ("exp_avg", "exp_avg_sq")}
    state = OptimizerState("adam", hyperparameters("adam"), 3, slots)
    training = weights_convert.Checkpoint.from_tensors(original.tensors, config, optimizer=state)
    source = tmp_path / "start.safetensors"
    weights_convert.write(training, source)
    for fmt in FORMATS:
        path = tmp_path / f"m{fmt.suffixes[0]}"
        keeps_state = holds_optimizer(path)
        weights_convert.convert(source, path, weights_only=not keeps_state)
        back_path = tmp_path / f"back_from{fmt.suffixes[0]}.safetensors"
        weights_convert.convert(path, back_path)
        for read in (weights_convert.read(path), weights_convert.read(back_path)):
            assert read.config == config, fmt.suffixes
            assert read.tensors[first.name].shape == first.shape and len(first.shape) == 5
            assert_same_tensors(read, original)
        if config.architecture == "monai":
            assert bool(weights_convert.read(path).assumed) == (not fmt.holds_config), fmt.suffixes
            if keeps_state:
                assert read.optimizer.header() == state.header(), fmt.suffixes
                changed = [
                    k for k, v in state.tensors().items() if v.tobytes() != read.optimizer.tensors()[k].tobytes()
                ]
                assert changed == [], (fmt.suffixes, changed)
