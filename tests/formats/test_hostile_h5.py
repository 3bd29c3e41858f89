"""Hostile HDF5 in ``.weights.h5`` and inside ``.keras``: nothing is read from outside the file,
declared shapes are checked before any data is read (memory stays small), and every refusal is
one line naming the dataset, with nothing written."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
import zipfile

import h5py
import numpy as np
import pytest

import weights_convert
from tests.installs import REPO, WITHOUT, environment, run_as
from weights_convert import CheckpointError
from weights_convert.core.random_init import random_checkpoint
from weights_convert.core.spec import ModelConfig
from weights_convert.formats.keras_h5_format import CHECKSUM_ATTR, dataset_paths

TINY = ModelConfig(2, 1, (4, 8))
KERNEL = "e1/conv/conv/layers/conv2d/vars/0"  # e1.conv.conv.0.weight, HWIO (3, 3, 2, 4) float32
GAMMA = "e1/conv/conv/layers/batch_norm/vars/0"  # e1.conv.conv.1.weight, (4,) float32
SECRET = b"FOREIGN-SECRET-BYTES-" * 16


def valid_h5(path):
    assert dataset_paths(TINY)["e1.conv.conv.0.weight"] == KERNEL
    weights_convert.write(random_checkpoint(TINY, seed=21), path)


def secret_file(directory):
    """A file outside the checkpoint with recognizable bytes, exactly the kernel's size."""
    path = directory / "secret.bin"
    path.write_bytes(SECRET[: 3 * 3 * 2 * 4 * 4])
    return path


def replace_kernel(path, make) -> None:
    """Swap the e1 kernel for what ``make(group, name)`` creates, and drop the checksum."""
    with h5py.File(path, "a") as f:
        group, name = KERNEL.rsplit("/", 1)
        del f[KERNEL]
        make(f[group], name)
        del f.attrs[CHECKSUM_ATTR]


def other_h5(directory):
    path = directory / "other.h5"
    with h5py.File(path, "w") as f:
        f["data"] = np.frombuffer(secret_file(directory).read_bytes(), np.float32).reshape(3, 3, 2, 4)
    return path


def hostile_payloads(directory) -> dict:
    """Name -> a crafted .weights.h5 whose e1 kernel reads outside the file (or is an array checksum)."""
    secret, other = secret_file(directory), other_h5(directory)

    def external_storage(group, name):
        group.create_dataset(name, shape=(3, 3, 2, 4), dtype="<f4", external=[(str(secret), 0, h5py.h5f.UNLIMITED)])

    def external_link(group, name):
        group[name] = h5py.ExternalLink(str(other), "/data")

    def soft_link(group, name):
        group.file["elsewhere"] = h5py.ExternalLink(str(other), "/data")
        group[name] = h5py.SoftLink("/elsewhere")

    def virtual(group, name):
        layout = h5py.VirtualLayout(shape=(3, 3, 2, 4), dtype="<f4")
        layout[...] = h5py.VirtualSource(str(other), "data", shape=(3, 3, 2, 4))
        group.create_virtual_dataset(name, layout)

    payloads = {}
    for label, make in [
        ("external_storage", external_storage),
        ("external_link", external_link),
        ("soft_link", soft_link),
        ("virtual", virtual),
    ]:
        path = directory / f"{label}.weights.h5"
        valid_h5(path)
        replace_kernel(path, make)
        payloads[label] = path
    path = directory / "array_checksum.weights.h5"
    valid_h5(path)
    with h5py.File(path, "a") as f:
        f.attrs[CHECKSUM_ATTR] = np.array(["a", "b"], dtype=h5py.string_dtype())
    payloads["array_checksum"] = path
    return payloads


EXPECTED = {
    "external_storage": f"dataset '{KERNEL}' keeps its data in external files",
    "external_link": f"'{KERNEL}' is an external link",
    "soft_link": f"'{KERNEL}' is a soft link to '/elsewhere'",
    "virtual": f"dataset '{KERNEL}' is a virtual dataset",
    "array_checksum": f"the checksum attribute '{CHECKSUM_ATTR}' is an array of shape (2,)",
}


def refusal(path, tmp_path) -> str:
    dst = tmp_path / "out.safetensors"
    with pytest.raises(CheckpointError) as info:
        weights_convert.convert(path, dst)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert not dst.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    return message


def test_hostile_weights_h5_is_refused_naming_the_dataset(tmp_path):
    payloads = hostile_payloads(tmp_path)
    for label, path in payloads.items():
        message = refusal(path, tmp_path)
        assert EXPECTED[label] in message, (label, message)
    soft = tmp_path / "soft_only.weights.h5"
    valid_h5(soft)
    replace_kernel(soft, lambda group, name: group.__setitem__(name, h5py.SoftLink("/e1/conv/vars")))
    assert f"'{KERNEL}' is a soft link to '/e1/conv/vars'" in refusal(soft, tmp_path)
    # The command: exit 1, one line, and the foreign bytes nowhere in what it prints or writes.
    done = run_as("base", "convert", payloads["external_storage"], tmp_path / "cli.safetensors")
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "external files" in done.stderr and "FOREIGN" not in done.stderr + done.stdout
    assert not (tmp_path / "cli.safetensors").exists()
    assert not any(SECRET[:16] in p.read_bytes() for p in tmp_path.glob("out*"))


def keras_with_inner(path, edit) -> None:
    """A .keras archive whose model.weights.h5 was changed by ``edit(h5py.File)``."""
    weights_convert.write(random_checkpoint(TINY, seed=22), path)
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    inner = io.BytesIO(members["model.weights.h5"])
    with h5py.File(inner, "a") as f:
        edit(f)
    members["model.weights.h5"] = inner.getvalue()
    path.unlink()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def test_hostile_h5_inside_keras_is_refused(tmp_path):
    secret = secret_file(tmp_path)

    def external_storage(f):
        group, name = KERNEL.rsplit("/", 1)
        del f[KERNEL]
        f[group].create_dataset(name, shape=(3, 3, 2, 4), dtype="<f4", external=[(str(secret), 0, h5py.h5f.UNLIMITED)])
        del f.attrs[CHECKSUM_ATTR]

    path = tmp_path / "external.keras"
    keras_with_inner(path, external_storage)
    message = refusal(path, tmp_path)
    assert f"dataset '{KERNEL}' keeps its data in external files" in message and "FOREIGN" not in message


def test_keras_zip_safety_holds(tmp_path):
    """Member names that escape a directory and flipped member bytes (CRC-32) are refused."""
    path = tmp_path / "traversal.keras"
    weights_convert.write(random_checkpoint(TINY, seed=23), path)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("../../escape.txt", b"x")
    assert "points outside the archive" in refusal(path, tmp_path)
    flipped = tmp_path / "flipped.keras"
    weights_convert.write(random_checkpoint(TINY, seed=23), flipped)
    blob = bytearray(flipped.read_bytes())
    with zipfile.ZipFile(flipped) as archive:
        info = archive.getinfo("model.weights.h5")
        start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    blob[start + info.compress_size - 100] ^= 0xFF
    flipped.write_bytes(bytes(blob))
    assert "CRC" in refusal(flipped, tmp_path)


MEMORY_PROBE = textwrap.dedent(
    """
    import json, resource, sys
    import weights_convert
    from weights_convert import CheckpointError

    def peak_mib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    results = {}
    for path in sys.argv[1:]:
        before = peak_mib()
        try:
            weights_convert.read(path)
            message = None
        except CheckpointError as error:
            message = str(error)
        results[path] = {"message": message, "growth_mib": peak_mib() - before}
    print(json.dumps(results))
    """
)
# Reading a refused file may grow the process by this much at most (HDF5's own caches and the
# parsed metadata); each file below declares over 2 GiB of tensor data.
MEMORY_GROWTH_MIB = 64


def write_declared_only(path, config: ModelConfig) -> int:
    """A .weights.h5 with every dataset of ``config`` at its right path, shape and dtype, but no
    data stored (HDF5 allocates late); returns the bytes it declares."""
    from weights_convert.core.spec import param_specs
    from weights_convert.formats.keras_h5_format import stored_shape

    declared = 0
    paths = dataset_paths(config)
    with h5py.File(path, "w") as f:
        for spec in param_specs(config):
            dtype = "<i8" if spec.dtype_kind == "int" else "<f4"
            dataset = f.create_dataset(paths[spec.name], shape=stored_shape(spec), dtype=dtype)
            declared += dataset.size * dataset.dtype.itemsize
    return declared


def claiming(path, channels: str):
    """A .keras archive of TINY weights whose config.json claims ``channels`` instead."""
    weights_convert.write(random_checkpoint(TINY, seed=24), path)
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    config = members["config.json"].decode().replace('"channels": [4, 8]', f'"channels": {channels}')
    members["config.json"] = config.encode()
    path.unlink()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_huge_declared_shapes_are_refused_before_any_memory_is_spent(tmp_path):
    """A consistent layout declaring 3.2 GB with no data stored, one huge dataset among right ones,
    and .keras archives whose config.json claims far more channels than their weights (within and
    beyond the parameter limit): each refused before reading, the process growing by a few MiB."""
    huge = ModelConfig(2, 1, (4096, 4096))
    consistent = tmp_path / "declared_only.weights.h5"
    assert write_declared_only(consistent, huge) > 2 * 2**30
    one_huge = tmp_path / "one_huge.weights.h5"
    valid_h5(one_huge)
    with h5py.File(one_huge, "a") as f:
        del f[GAMMA]
        f.create_dataset(GAMMA, shape=(2**30,), dtype="<f4")
    claims = claiming(tmp_path / "claims.keras", "[4096, 4096]")
    absurd = claiming(tmp_path / "absurd.keras", "[100000, 100000]")
    paths = [consistent, one_huge, claims, absurd]
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, *map(str, paths)],
        env=environment(WITHOUT["base"]),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout)
    expected = {
        consistent: "datasets without their data: e1/conv/conv/layers/conv2d/vars/0 (declares",
        one_huge: f"wrong shapes: {GAMMA} (1073741824,) (expected (4,))",
        claims: "wrong shapes: e1/conv/conv/layers/conv2d/vars/0 (3, 3, 2, 4) (expected (3, 3, 2, 4096))",
        absurd: "bad config in config.json: config {'architecture': 'article', 'in_channels': 2, 'out_channels': 1, "
        "'channels': [100000, 100000], 'spatial_dims': 2}",
    }
    for path, text in expected.items():
        result = results[str(path)]
        assert result["message"] is not None and text in result["message"], result
        assert "\n" not in result["message"]
        assert result["growth_mib"] < MEMORY_GROWTH_MIB, result


def test_mixed_dtypes_in_a_foreign_h5_are_read_exactly(tmp_path):
    """A .weights.h5 holding one float16 tensor among float64 ones reads as it is, and converts
    to .keras and back unchanged (never cast, never a file its reader refuses)."""
    checkpoint = random_checkpoint(TINY, seed=25, dtype="float64")
    path = tmp_path / "mixed.weights.h5"
    weights_convert.write(checkpoint, path)
    with h5py.File(path, "a") as f:
        half = np.asarray(f[KERNEL]).astype(np.float16)
        del f[KERNEL]
        f[KERNEL] = half
        del f.attrs[CHECKSUM_ATTR]
    read = weights_convert.read(path)
    assert read.tensors["e1.conv.conv.0.weight"].dtype == np.float16
    weights_convert.convert(path, tmp_path / "mixed.keras")
    back = weights_convert.read(tmp_path / "mixed.keras")
    for name, value in read.tensors.items():
        assert back.tensors[name].dtype == value.dtype and np.array_equal(back.tensors[name], value), name
