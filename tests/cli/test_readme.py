"""The README's examples, run as written.

What runs: every ```python and every ```sh block of README.md, in README order, in ONE fresh
subprocess (this interpreter, ``PYTHONPATH`` = this clone, ``TF_CPP_MIN_LOG_LEVEL=3``,
``KERAS_BACKEND`` as the suite has it, on the CPU):

- The ```python blocks run in one Python session, one namespace, as a reader pasting them into one
  interpreter would: a later block may use what an earlier one imported or defined. Keras fixes its
  backend at import and ``jax_enable_x64`` is process-wide, so running them in a process of their own
  keeps that state out of the rest of the suite. A block that defines ``test_*`` functions (the CI
  example of the Parity section) has them called, as pytest would.
- The ```sh blocks are ``attention-unet`` commands, run with ``bash -euo pipefail`` between the
  Python blocks around them; ``attention-unet`` is this interpreter's ``python -m
  weights_convert.harness.cli`` (the console script's ``main``).
- Where: a fresh temporary directory standing for the root of a clone. It holds only ``tests/data``,
  a symbolic link to this clone's, so the README's paths relative to the clone's root
  (``tests/data/reference/article_state_dict.pt``) resolve, and every file the examples write lands
  in the temporary directory, never in the clone.

What does not run: ```bash blocks (setting up a venv, the test suite, the GPU suite; ``.ci/run`` runs
the Quick start's) and ```text blocks (command synopses). Any other fence fails
``test_every_fence_is_marked``, so a new block is either run or explicitly not.

A block that raises or exits non-zero fails ``test_readme_blocks_run``, naming its README line.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

from tests.conftest import REPO

README = REPO / "README.md"

RUN = ("python", "sh")  # the fences this test runs
NOT_RUN = ("bash", "text")  # setup commands and synopses
FENCE = re.compile(r"^```(.*)$")


def readme_blocks(text: str) -> list[tuple[str, int, str]]:
    """Every fenced block of ``text``: (info string, line of its first code line, code)."""
    blocks, lines, index = [], text.splitlines(), 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        index += 1
        if not opening:
            continue
        start = index
        while not lines[index].startswith("```"):
            index += 1
        blocks.append((opening.group(1).strip(), start + 1, "\n".join(lines[start:index]) + "\n"))
        index += 1
    return blocks


# Runs the blocks given as JSON in argv[1]; exit status 1, naming the README line, at the first failure.
DRIVER = r"""
import json, os, subprocess, sys, traceback

namespace = {"__name__": "__readme__"}
for kind, line, code in json.loads(open(sys.argv[1]).read()):
    print(f"=== README.md line {line} ({kind})", flush=True)
    if kind == "sh":
        if subprocess.run(["bash", "-euo", "pipefail", "-c", code]).returncode:
            sys.exit(f"README.md: the sh block at line {line} failed")
        continue
    before = dict(namespace)
    try:
        exec(compile("\n" * (line - 1) + code, "README.md", "exec"), namespace)
        for name, value in list(namespace.items()):
            if name.startswith("test_") and callable(value) and before.get(name) is not value:
                print(f"=== calling {name}()", flush=True)
                value()
    except BaseException:
        traceback.print_exc()
        sys.exit(f"README.md: the python block at line {line} failed")
print("=== all README blocks ran", flush=True)
sys.stderr.flush()
os._exit(0)  # skips the frameworks' interpreter teardown (seconds), nothing left to write
"""


def test_every_fence_is_marked():
    kinds = [kind for kind, _, _ in readme_blocks(README.read_text())]
    unmarked = sorted({kind or "(none)" for kind in kinds} - set(RUN + NOT_RUN))
    assert not unmarked, f"README.md fences must be one of {RUN + NOT_RUN}, found {unmarked}"
    assert kinds.count("python") >= 8 and kinds.count("sh") >= 2, kinds


def test_readme_blocks_run(tmp_path):
    blocks = [block for block in readme_blocks(README.read_text()) if block[0] in RUN]
    clone = tmp_path / "clone"
    (clone / "tests").mkdir(parents=True)
    (clone / "tests" / "data").symlink_to(REPO / "tests" / "data", target_is_directory=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    command = bin_dir / "attention-unet"
    command.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m weights_convert.harness.cli "$@"\n')
    command.chmod(0o755)
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "JAX_PLATFORMS": "cpu",
        "CUDA_VISIBLE_DEVICES": "",
        "PATH": os.pathsep.join((str(bin_dir), os.environ.get("PATH", ""))),
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    }
    top_level = set(os.listdir(REPO))
    process = subprocess.run(
        [sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "blocks.json")],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = process.stdout + process.stderr
    assert process.returncode == 0, output[-6000:]
    assert "=== all README blocks ran" in process.stdout
    assert "=== calling test_my_checkpoint_is_the_same_function_everywhere()" in process.stdout
    written = {path.name for path in clone.iterdir()}
    assert {"model.safetensors", "model.msgpack", "model.keras", "t.pt", "t.orbax"} <= written, written
    assert not {name for name in set(os.listdir(REPO)) - top_level if not name.startswith(".")}, "wrote into the clone"
