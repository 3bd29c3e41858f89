"""Hostile checkpoint files and destination hazards, one test per class, each payload crafted here:
a destination that appears during a write, signals during a write, overflowing casts, mixed float
dtypes, absurd configs, long lists of problems, Orbax arrays declaring far more than the model, links
out of an Orbax directory, and the .pt refusals, each one line whatever the framework prints."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import weights_convert
from weights_convert.core.checkpoint import CheckpointError
from weights_convert.core.random_init import random_checkpoint
from weights_convert.core.spec import MAX_PARAMETERS, ModelConfig
from weights_convert.formats import format_for

TINY = ModelConfig(2, 1, (3, 5))


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture(scope="module")
def tiny_orbax(tmp_path_factory):
    path = tmp_path_factory.mktemp("orbax") / "tiny.orbax"
    weights_convert.write(random_checkpoint(TINY, seed=3), path)
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".orbax"])
def test_destination_that_appears_during_a_write_is_kept(tmp_path, monkeypatch, suffix):
    module = format_for(f"x{suffix}").load_module()
    original_write = module.write
    dst = tmp_path / f"out{suffix}"

    def someone_else_creates_dst(checkpoint, path):
        original_write(checkpoint, path)
        if suffix == ".orbax":
            dst.mkdir()
            (dst / "theirs").write_text("precious")
        else:
            dst.write_text("precious")

    monkeypatch.setattr(module, "write", someone_else_creates_dst)
    with pytest.raises(CheckpointError, match="appeared while converting"):
        weights_convert.write(random_checkpoint(TINY), dst)
    kept = dst / "theirs" if suffix == ".orbax" else dst
    assert kept.read_text() == "precious"
    assert listing(tmp_path) == [dst.name]  # no temporary folder left
    monkeypatch.setattr(module, "write", original_write)
    weights_convert.write(random_checkpoint(TINY, seed=4), dst, force=True)  # force replaces it
    assert weights_convert.read(dst).tensors["output.bias"] == random_checkpoint(TINY, seed=4).tensors["output.bias"]


SLOW_WRITER = """
import signal, sys, time
from pathlib import Path
import weights_convert

# Python's own SIGINT handler, also where the parent ignores SIGINT (a shell's background job
# starts so, and Python then keeps ignoring it).
signal.signal(signal.SIGINT, signal.default_int_handler)
from weights_convert.core.random_init import random_checkpoint
from weights_convert.core.spec import ModelConfig
from weights_convert.formats import format_for

module = format_for("x.safetensors").load_module()

def slow_write(checkpoint, path):
    Path(path).write_bytes(b"partial")
    print("writing", flush=True)
    time.sleep(60)

module.write = slow_write
weights_convert.write(random_checkpoint(ModelConfig(2, 1, (3, 5))), sys.argv[1])
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_a_write_leaves_nothing_behind(tmp_path, signum):
    directory = tmp_path / "out"
    directory.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITER, str(directory / "model.safetensors")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == "writing"
    assert len(listing(directory)) == 1  # the temporary folder, holding a partial file
    process.send_signal(signum)
    process.communicate(timeout=30)
    # Ended by the signal, as without the cleanup (an uncaught KeyboardInterrupt ends Python by SIGINT).
    assert process.returncode == -signum
    assert listing(directory) == []


def test_overflowing_cast_is_refused_unless_allowed(tmp_path):
    checkpoint = random_checkpoint(TINY)
    checkpoint.tensors["b1.conv.3.weight"][0, 0, 1, 1] = 1.0e5
    checkpoint.tensors["output.weight"][0, 0, 0, 0] = -7.0e4
    src = tmp_path / "big.safetensors"
    weights_convert.write(checkpoint, src)
    checkpoint.astype("bfloat16")  # whose range holds 1e5: no refusal
    with pytest.raises(CheckpointError) as refusal:
        weights_convert.convert(src, tmp_path / "half.pt", dtype="float16")
    message = str(refusal.value)
    assert "\n" not in message
    assert "b1.conv.3.weight has max |value| 100000" in message and "65504" in message
    assert "1 more tensor" in message and "--allow-overflow" in message
    assert listing(tmp_path) == ["big.safetensors"]
    weights_convert.convert(src, tmp_path / "half.pt", dtype="float16", allow_overflow=True)
    written = weights_convert.read(tmp_path / "half.pt", allow_nonfinite=True)
    assert written.tensors["b1.conv.3.weight"][0, 0, 1, 1] == np.inf
    huge = random_checkpoint(TINY).astype("float64")
    huge.tensors["e1.conv.conv.0.bias"][0] = 1e39
    with pytest.raises(CheckpointError, match=r"casting to bfloat16 overflows to inf: e1.conv.conv.0.bias .* 1e\+39"):
        huge.astype("bfloat16")


def test_mixed_float_dtypes_are_kept_exactly_or_refused(tmp_path, monkeypatch):
    mixed = random_checkpoint(TINY).astype("float64")
    mixed.tensors["d1.ag.Wg.0.weight"] = mixed.tensors["d1.ag.Wg.0.weight"].astype(np.float16)
    assert list(mixed.float_dtypes) == ["float64", "float16"]
    for suffix in (".safetensors", ".pt", ".orbax", ".weights.h5", ".keras", ".msgpack"):  # every writer keeps them
        path = tmp_path / f"mixed{suffix}"
        weights_convert.write(mixed, path)
        back = weights_convert.read(path)
        for name, value in mixed.tensors.items():
            assert back.tensors[name].dtype == value.dtype and back.tensors[name].tobytes() == value.tobytes(), name
    # A format that holds one floating dtype (its module does not declare KEEPS_MIXED_DTYPES) refuses.
    monkeypatch.delattr(format_for("x.pt").load_module(), "KEEPS_MIXED_DTYPES")
    with pytest.raises(
        CheckpointError, match=r"mixes float64 \(51 tensors, .*\), float16 \(1 tensor, first d1.ag.Wg.0.weight\)"
    ):
        weights_convert.write(mixed, tmp_path / "one-dtype.pt")
    assert not any(p.name.startswith((".one-dtype", "one-dtype")) for p in tmp_path.iterdir())


@pytest.mark.parametrize("channels", [[1] * 200_000, [10**9, 4]])
def test_absurd_config_is_refused_up_front(tmp_path, channels):
    from safetensors.numpy import save_file

    path = tmp_path / "absurd.safetensors"
    metadata = {"format_version": "1", "config": json.dumps({"channels": channels})}
    save_file(random_checkpoint(TINY).tensors, str(path), metadata=metadata)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="bad config in metadata") as refusal:
        weights_convert.read(path)
    assert time.perf_counter() - start < 2.0
    assert len(str(refusal.value)) < 400 and "\n" not in str(refusal.value)
    with pytest.raises(ValueError, match="MAX_PARAMETERS"):
        ModelConfig(channels=(4096, 8192, 16384))
    assert weights_convert.parameter_count(ModelConfig(channels=(256, 512, 1024, 2048, 4096))) < MAX_PARAMETERS


def test_list_valued_errors_are_capped(tmp_path):
    state = {k: torch.from_numpy(v.copy()) for k, v in random_checkpoint(TINY).tensors.items()}
    state.update({f"extra.{i:03d}": torch.zeros(1) for i in range(50)})
    path = tmp_path / "many.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as refusal:
        weights_convert.read(path)
    message = str(refusal.value)
    assert "'extra.009'] and 40 more" in message and "extra.010" not in message


def write_ocdbt_values(checkpoint: Path, values: dict[bytes, bytes]) -> None:
    import tensorstore as ts

    store = ts.KvStore.open({"driver": "ocdbt", "base": checkpoint.absolute().as_uri() + "/"}).result()
    for key, value in values.items():
        store.write(key, value).result()


def test_orbax_array_declaring_far_more_than_the_model_is_refused_before_restoring(tmp_path, tiny_orbax):
    import resource
    import shutil

    import tensorstore as ts

    bomb = tmp_path / "bomb.orbax"
    shutil.copytree(tiny_orbax, bomb)
    # 400 MB of zeros declared in one chunk that compresses to a few KB: the array and its data agree.
    elements = 3 * 3 * 2 * 5_000_000
    zarr = {"shape": [3, 3, 2, 5_000_000], "chunks": [3, 3, 2, 5_000_000], "dtype": "<f4"}
    source = ts.open(
        {"driver": "zarr", "kvstore": "memory://", "metadata": {**zarr, "compressor": {"id": "zstd", "level": 1}}},
        create=True,
    ).result()
    source[...] = np.zeros(zarr["shape"], np.float32)
    chunk = source.kvstore.read("0.0.0.0").result().value
    assert len(chunk) < elements // 1000
    key = b"e1.conv.conv.0.kernel.value"
    metadata = json.loads(source.kvstore.read(".zarray").result().value)
    write_ocdbt_values(bomb, {key + b"/.zarray": json.dumps(metadata).encode(), key + b"/0.0.0.0": chunk})
    del source
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match="more than the 1e\\+09 any checkpoint may claim"):
        weights_convert.read(bomb)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 100_000  # nothing near the 400 MB was materialized


def test_orbax_links_out_of_the_directory_are_refused(tmp_path, tiny_orbax):
    import shutil

    linked = tmp_path / "linked.orbax"
    shutil.copytree(tiny_orbax, linked)
    data = next((linked / "d").iterdir())
    data.unlink()
    data.symlink_to(next((tiny_orbax / "d").iterdir()))  # same bytes, but outside the directory
    with pytest.raises(CheckpointError, match=f"symbolic links .*{data.name}"):
        weights_convert.read(linked)


class RunsCode:
    def __reduce__(self):
        return (os.system, ("true",))


# Each case runs the command's main() with its own stderr file (fd 2 itself, so whatever torch,
# Orbax or absl print lands there), all in one process to import the frameworks once.
REFUSALS = """
import json, os, sys
from weights_convert.harness.cli import main
results = []
for case in json.loads(sys.argv[1]):
    with open(case["stderr"], "w") as err:
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            code = main(["convert", case["src"], case["dst"]])
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
    results.append(code)
print(json.dumps(results))
"""


def test_refusals_are_one_line_whatever_the_framework_prints(tmp_path, tiny_orbax):
    import shutil

    state = {k: torch.from_numpy(v.copy()) for k, v in random_checkpoint(TINY).tensors.items()}
    (tmp_path / "raw.pt").write_bytes(pickle.dumps(state, protocol=4))
    torch.save({**state, 7: torch.zeros(1), "zzz": torch.zeros(1)}, tmp_path / "keys.pt")
    torch.save({**state, "payload": RunsCode()}, tmp_path / "global.pt")
    torch.save(state, tmp_path / "whole.pt")
    whole = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[: len(whole) - 300])
    damaged = tmp_path / "damaged.orbax"
    shutil.copytree(tiny_orbax, damaged)
    (damaged / "_CHECKPOINT_METADATA").unlink()  # Orbax and absl log warnings about both of these
    (damaged / "_METADATA").write_text((tiny_orbax / "_METADATA").read_text()[:100])
    expected = {
        "raw.pt": "refused: a raw pickle, not a file torch.save writes",
        "keys.pt": "keys that are not strings (a state_dict's are names): [7]",
        "global.pt": "(Trying to load unsupported GLOBAL posix.system whose module posix is blocked.)",
        "cut.pt": "not a readable PyTorch checkpoint (neither a zip archive nor a torch.save file)",
        "damaged.orbax": "not an Orbax checkpoint",
    }
    cases = [
        {
            "src": str(tmp_path / name),
            "dst": str(tmp_path / f"out{i}.safetensors"),
            "stderr": str(tmp_path / f"{i}.err"),
        }
        for i, name in enumerate(expected)
    ]
    result = subprocess.run(
        [sys.executable, "-c", REFUSALS, json.dumps(cases)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [1] * len(cases)
    for case, (name, fragment) in zip(cases, expected.items(), strict=True):
        lines = Path(case["stderr"]).read_text().splitlines()
        assert len(lines) == 1, (name, lines)
        assert fragment in lines[0] and name in lines[0], lines[0]
        assert not Path(case["dst"]).exists()
