"""``read``, ``write`` and ``convert``: every format through the canonical form, writes atomic."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from weights_convert.core.checkpoint import Checkpoint, CheckpointError
from weights_convert.core.spec import ModelConfig
from weights_convert.formats import format_for


def read(path, *, config: ModelConfig | None = None, allow_nonfinite: bool = False) -> Checkpoint:
    """Read any supported checkpoint into the canonical form and validate it.

    ``config``, when given, must agree with the file's own config (if it carries one) and with
    every tensor shape; otherwise the config comes from the file or is inferred from shapes.
    """
    path = Path(path)
    fmt = format_for(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if fmt.is_directory != path.is_dir():
        kind = "a directory" if fmt.is_directory else "a file"
        raise CheckpointError(f"{path}: a {fmt.name} checkpoint must be {kind}")
    tensors, file_config = fmt.load_module().read(path)
    if config is not None and file_config is not None and config != file_config:
        raise CheckpointError(
            f"{path}: the given config {config.to_dict()} contradicts the file's {file_config.to_dict()}"
        )
    return Checkpoint.from_tensors(tensors, config or file_config, allow_nonfinite=allow_nonfinite, source=str(path))


def write(checkpoint: Checkpoint, path, *, force: bool = False) -> None:
    """Write ``checkpoint`` in the format named by ``path``'s extension.

    Atomic: the data goes to a temporary sibling first and is renamed into place only when
    complete, so a failure never leaves a partial file. An existing ``path`` is kept unless ``force``.
    """
    path = Path(path)
    fmt = format_for(path)
    if path.exists() and not force:
        raise CheckpointError(f"{path}: already exists (pass --force to overwrite)")
    Checkpoint.from_tensors(checkpoint.tensors, checkpoint.config, allow_nonfinite=True, source="checkpoint to write")
    with _atomic_target(path, fmt.is_directory) as tmp:
        fmt.load_module().write(checkpoint, tmp)


def convert(
    src, dst, *, dtype=None, force: bool = False, allow_nonfinite: bool = False, config: ModelConfig | None = None
) -> Checkpoint:
    """Read ``src``, optionally cast floating tensors to ``dtype``, write ``dst``; returns what was written."""
    dst = Path(dst)
    format_for(dst).load_module()  # an unknown extension or a missing package fails before any reading
    if dst.exists() and not force:
        raise CheckpointError(f"{dst}: already exists (pass --force to overwrite)")
    checkpoint = read(src, config=config, allow_nonfinite=allow_nonfinite)
    if dtype is not None:
        checkpoint = checkpoint.astype(dtype)
    write(checkpoint, dst, force=force)
    return checkpoint


@contextlib.contextmanager
def _atomic_target(path: Path, is_directory: bool):
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise CheckpointError(f"{path}: the directory {parent} does not exist")
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    # The format's writer sees a name with the right extension that does not exist yet.
    tmp = tmp_dir / path.name
    try:
        yield tmp
        if not tmp.exists():
            raise CheckpointError(f"{path}: the writer produced no output")
        if is_directory and path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
