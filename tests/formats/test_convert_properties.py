"""Property tests of the converter: random configs through random chains of every format are
lossless; random corruption of a file never ends in anything but a one-line CheckpointError (the
command's refusal, see tests/formats/test_convert.py) and never writes the destination."""

import os

import ml_dtypes
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import weights_convert
from weights_convert.core.checkpoint import CheckpointError
from weights_convert.core.random_init import random_checkpoint
from weights_convert.core.spec import ModelConfig
from weights_convert.formats import FORMATS

SUFFIXES = [f.suffixes[0] for f in FORMATS]
FLOAT_DTYPES = ["float32", "float64", "float16", "bfloat16"]
# Each example writes real files (and the Keras ones build a model): few examples, no deadline.
PROPERTY = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

configs = st.builds(
    ModelConfig,
    in_channels=st.integers(1, 4),
    out_channels=st.integers(1, 3),
    channels=st.lists(st.integers(1, 6), min_size=2, max_size=4).map(tuple),
    spatial_dims=st.sampled_from([2, 3]),
)


def same_bits(a, b) -> list[str]:
    """Names of tensors that differ in dtype, shape or any bit."""
    assert list(a.tensors) == list(b.tensors)
    return [
        name
        for name, x in a.tensors.items()
        if x.dtype != b.tensors[name].dtype
        or x.shape != b.tensors[name].shape
        or x.tobytes() != b.tensors[name].tobytes()
    ]


@PROPERTY
@given(
    config=configs,
    chain=st.lists(st.sampled_from(SUFFIXES), min_size=1, max_size=4),
    dtype=st.sampled_from(FLOAT_DTYPES),
    seed=st.integers(0, 2**16),
)
def test_random_chains_are_lossless(tmp_path_factory, config, chain, dtype, seed):
    directory = tmp_path_factory.mktemp("chain")
    original = random_checkpoint(config, seed=seed).astype(dtype)
    # Special values must survive too: signed zero, subnormals, extremes of the dtype.
    first = next(k for k in original.tensors if k.endswith("conv.0.weight"))
    info = ml_dtypes.finfo(original.tensors[first].dtype)
    original.tensors[first].flat[:4] = np.array([-0.0, info.smallest_subnormal, info.max, -info.tiny])
    path = directory / "start.safetensors"
    weights_convert.write(original, path)
    for i, suffix in enumerate(chain):
        nxt = directory / f"step{i}{suffix}"
        weights_convert.convert(path, nxt)
        path = nxt
        back = weights_convert.read(path)
        assert back.config == config
        assert same_bits(back, original) == [], f"changed after {[*chain[: i + 1]]}"


CORRUPTIBLE = [s for s in SUFFIXES if s != ".orbax"]  # a directory, not a byte string
# Formats whose readers verify a checksum of the tensor bytes (safetensors metadata SHA-256, zip
# CRC-32s, the .weights.h5 root attribute). A Flax .msgpack is the bare NNX state, with no room
# for one: a flipped byte inside a float there is indistinguishable from a different model.
CHECKSUMMED = {".safetensors", ".pt", ".pth", ".keras", ".weights.h5"}


@PROPERTY
@given(
    suffix=st.sampled_from(CORRUPTIBLE),
    how=st.sampled_from(["truncate", "flip", "overwrite"]),
    # Positions as fractions of the file: some writers' output size varies (zip timestamps).
    where=st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=1, max_size=8),
    byte=st.integers(0, 255),
)
def test_random_corruption_never_tracebacks_nor_writes(tmp_path_factory, suffix, how, where, byte):
    directory = tmp_path_factory.mktemp("corrupt")
    source = directory / f"model{suffix}"
    original = random_checkpoint(ModelConfig(2, 1, (3, 5)), seed=1)
    weights_convert.write(original, source)
    blob = bytearray(source.read_bytes())
    positions = [int(f * len(blob)) for f in where]
    if how == "truncate":
        blob = blob[: positions[0]]
    else:
        for position in positions:
            blob[position] = blob[position] ^ 0xFF if how == "flip" else byte
    source.write_bytes(bytes(blob))
    dst = directory / "out.safetensors"
    try:
        weights_convert.convert(source, dst)
    except CheckpointError as error:  # the command prints exactly this message, on one line
        assert "\n" not in str(error) and str(source) in str(error)
        assert sorted(p.name for p in directory.iterdir()) == [source.name]  # no DST, no temporaries
    else:
        written = weights_convert.read(dst)
        assert written.config == original.config
        if suffix in CHECKSUMMED:
            # Only a change the format cannot see (bytes no reader looks at) may pass, and then
            # the tensors must be exactly the original ones.
            assert same_bits(written, original) == []


def test_read_raises_checkpoint_error_not_others(tmp_path):
    """The API, not just the command, turns garbage into CheckpointError for every format."""
    for suffix in CORRUPTIBLE:
        path = tmp_path / f"junk{suffix}"
        path.write_bytes(os.urandom(256))
        try:
            weights_convert.read(path)
        except CheckpointError:
            continue
        raise AssertionError(f"{suffix}: random bytes were accepted")
