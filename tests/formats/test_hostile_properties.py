"""Property test: random byte flips and truncations of a tiny checkpoint in .safetensors, .pt and
.orbax never take reading past a memory bound and, where the format has a checksum, never return
different tensors without an error. All examples run in one subprocess, which measures its own
peak resident memory."""

import json
import subprocess
import sys

# Peak resident memory the reads may add, in MiB, beyond the process after one clean read of each
# format (frameworks imported, caches warm). The tiny checkpoint is about 10 KB; a damaged file that
# claimed a large model would need far more than this.
MEMORY_BOUND_MIB = 64

EXAMPLES = """
import json, resource, shutil, sys, tempfile
from pathlib import Path
from hypothesis import given, settings, strategies as st
import weights_convert
from weights_convert.core.checkpoint import CheckpointError
from weights_convert.core.random_init import random_checkpoint
from weights_convert.core.spec import ModelConfig

CHECKSUMMED = {".safetensors", ".pt"}  # Orbax stores no checksum of its array data
root = Path(tempfile.mkdtemp(prefix="hostile_properties_"))
original = random_checkpoint(ModelConfig(2, 1, (3, 5)), seed=1)
clean = {}
for suffix in (".safetensors", ".pt", ".orbax"):
    clean[suffix] = root / f"clean{suffix}"
    weights_convert.write(original, clean[suffix])
    weights_convert.read(clean[suffix])
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
outcomes = {"refused": 0, "accepted": 0}


@settings(max_examples=int(sys.argv[1]), deadline=None, database=None)
@given(
    suffix=st.sampled_from([".safetensors", ".pt", ".orbax"]),
    how=st.sampled_from(["truncate", "flip"]),
    which=st.integers(0, 50),
    where=st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=1, max_size=4),
)
def check(suffix, how, which, where):
    work = root / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    path = work / f"model{suffix}"
    if suffix == ".orbax":
        shutil.copytree(clean[suffix], path)
        files = sorted(p for p in path.rglob("*") if p.is_file())
        target = files[which % len(files)]
    else:
        shutil.copy(clean[suffix], path)
        target = path
    blob = bytearray(target.read_bytes())
    positions = [int(f * len(blob)) for f in where]
    if how == "truncate":
        blob = blob[: positions[0]]
    else:
        for position in positions:
            blob[position] ^= 0xFF
    target.write_bytes(bytes(blob))
    try:
        back = weights_convert.read(path)
    except CheckpointError as error:
        assert "\\n" not in str(error)
        outcomes["refused"] += 1
        return
    outcomes["accepted"] += 1
    if suffix in CHECKSUMMED:
        changed = [k for k, v in original.tensors.items() if back.tensors[k].tobytes() != v.tobytes()]
        assert changed == [], (suffix, how, changed)


check()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
shutil.rmtree(root)
print(json.dumps({"grown_kib": peak - baseline, **outcomes}))
"""


def test_damaged_files_stay_within_memory_and_never_change_tensors_silently():
    result = subprocess.run([sys.executable, "-c", EXAMPLES, "40"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["refused"] > 0  # the damage reaches the readers
    assert report["grown_kib"] < MEMORY_BOUND_MIB * 1024, report
