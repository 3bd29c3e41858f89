"""Signals to the command and to the processes it starts: SIGTERM ends the command as an error does,
its workers with it and its temporary folders removed, whichever runtime made them; a worker dies
with its parent even when the parent is killed (``weights_convert.termination``).

Each command runs with a ``TMPDIR`` of its own, which must be empty once it has ended."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import weights_convert
from weights_convert.core.random_init import random_checkpoint
from weights_convert.core.spec import ModelConfig
from weights_convert.processes import environment
from weights_convert.termination import SIGTERM_STATUS

TINY = ModelConfig(1, 1, (4, 8))
# Long enough for a worker that survives its parent to be seen; an ended one is gone within a second.
WORKERS_END_S = 10


def descendants(pid: int) -> set[int]:
    """The processes below ``pid`` (from /proc), zombies excluded."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    living = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            living.add(pid)
    return living


def left_in(tmpdir: Path) -> list[str]:
    """What is in ``tmpdir`` but torch's compile cache (``torchinductor_<user>``), which torch keeps
    there on purpose, for later processes to reuse."""
    return sorted(p.name for p in tmpdir.iterdir() if not p.name.startswith("torchinductor_"))


def wait_for(condition, what: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def start(args: list[str], tmpdir: Path) -> subprocess.Popen:
    """The command ``attention-unet *args`` with ``TMPDIR=tmpdir``."""
    command = [sys.executable, "-m", "weights_convert.harness.cli", *map(str, args)]
    env = environment(TMPDIR=str(tmpdir))
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def tmpdir_and_checkpoint(tmp_path):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    checkpoint = tmp_path / "tiny.safetensors"
    weights_convert.write(random_checkpoint(TINY, seed=0), checkpoint)
    return tmpdir, checkpoint


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_data_parallel_workers_end_with_the_command(tmp_path, tmpdir_and_checkpoint, signum):
    """``train --data-parallel 2`` (torch, gloo): its two workers are blocked in collectives with each
    other when the command gets the signal; none outlives it, and after SIGTERM the rendezvous folder
    is gone too (SIGKILL leaves no chance to remove it)."""
    tmpdir, checkpoint = tmpdir_and_checkpoint
    args = ["train", checkpoint, "--framework", "torch", "--data-parallel", "2", "--steps", "100000"]
    process = start(
        [*args, "--batch", "2", "--size", "16", "16", "--every", "100000", "--out", tmp_path / "out"], tmpdir
    )
    workers = wait_for(lambda: len(descendants(process.pid)) >= 2 and descendants(process.pid), "two workers")
    wait_for(lambda: list(tmpdir.glob("torch-ddp-*/rendezvous")), "the rendezvous file")
    time.sleep(1.0)  # into the training steps
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == (SIGTERM_STATUS if signum == signal.SIGTERM else -signal.SIGKILL), stderr
    wait_for(lambda: not alive(workers), "the workers to end", timeout=WORKERS_END_S)
    if signum == signal.SIGTERM:
        assert left_in(tmpdir) == []
        assert "Traceback" not in stderr


def test_sigterm_during_parity_of_exports_removes_its_folder(tmpdir_and_checkpoint):
    """``parity --frameworks torchscript``: the exported program's folder goes with the command."""
    tmpdir, checkpoint = tmpdir_and_checkpoint
    process = start(["parity", checkpoint, "--frameworks", "torchscript", "--size", "16", "16"], tmpdir)
    wait_for(lambda: list(tmpdir.glob("attention-unet-parity-*/*")), "the exported file")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == SIGTERM_STATUS, stderr
    assert left_in(tmpdir) == []


def test_sigterm_during_a_savedmodel_export_removes_tensorflow_s_files(tmp_path, tmpdir_and_checkpoint):
    """``export ... .savedmodel``: TensorFlow writes the code it generates to the temporary
    directory (``__autograph_generated_file*.py``) and removes it only at a normal exit; after
    SIGTERM it is gone, as is any SavedModel."""
    pytest.importorskip("tensorflow")
    tmpdir, checkpoint = tmpdir_and_checkpoint
    process = start(["export", checkpoint, tmp_path / "model.savedmodel"], tmpdir)
    wait_for(lambda: list(tmpdir.rglob("__autograph_generated_file*")), "TensorFlow's generated code")
    workers = descendants(process.pid)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == SIGTERM_STATUS, stderr
    assert not alive(workers)
    assert left_in(tmpdir) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.safetensors", "tmp"]


WORKER_OF_A_KILLED_PARENT = """
import sys
from weights_convert.processes import environment, run_child

child = "from weights_convert import termination; termination.die_with_parent(); import time; time.sleep(120)"
print("started", flush=True)
run_child([sys.executable, "-c", child], env=environment())
"""


def test_a_worker_dies_with_its_parent_when_the_parent_is_killed(tmp_path):
    """A worker started by ``run_child`` that called ``die_with_parent``: SIGKILL to its parent ends it."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    parent = subprocess.Popen(
        [sys.executable, "-c", WORKER_OF_A_KILLED_PARENT], env=environment(TMPDIR=str(tmpdir)), stdout=subprocess.PIPE
    )
    assert parent.stdout.readline().strip() == b"started"
    [worker] = wait_for(lambda: descendants(parent.pid), "the worker")
    parent.kill()
    parent.wait(30)
    wait_for(lambda: not alive({worker}), "the worker to end", timeout=WORKERS_END_S)
