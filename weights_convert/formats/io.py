"""``read``, ``write`` and ``convert``: every format through the canonical form; writes atomic and exclusive.

A write goes to a hidden temporary folder beside the destination, ``.NAME.<random>.tmp``, and the
finished file or directory is then put in place by an operation that fails when the destination
exists (a hard link for a file, a no-replace rename for a directory). A destination that appears
while the conversion runs is therefore never overwritten; only ``force`` replaces one, atomically.

SIGTERM and SIGINT during a write remove the temporary folder, then act as they would have
(SIGTERM ends the process with its conventional status, SIGINT raises ``KeyboardInterrupt``).
SIGKILL, or the machine stopping, cannot be caught: it can leave the temporary folder
``.NAME.<random>.tmp`` beside the destination, possibly holding a partial file. The destination
itself is then the old one, or absent; never partial.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from weights_convert.core.checkpoint import Checkpoint, CheckpointError
from weights_convert.core.spec import ModelConfig
from weights_convert.formats import format_for

# The signals a write cleans up after; SIGKILL cannot be caught (see the module docstring).
CLEANUP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


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
    tensors, file_config, *rest = fmt.load_module().read(path)
    optimizer = rest[0] if rest else None
    if config is not None and file_config is not None and config != file_config:
        raise CheckpointError(
            f"{path}: the given config {config.to_dict()} contradicts the file's {file_config.to_dict()}"
        )
    return Checkpoint.from_tensors(
        tensors, config or file_config, allow_nonfinite=allow_nonfinite, source=str(path), optimizer=optimizer
    )


def holds_optimizer(path) -> bool:
    """Whether the format named by ``path`` keeps a training checkpoint's optimizer state (its
    module sets ``HOLDS_OPTIMIZER = True``; its ``read`` then returns the state as a third item)."""
    return getattr(format_for(path).load_module(), "HOLDS_OPTIMIZER", False)


def write(checkpoint: Checkpoint, path, *, force: bool = False, weights_only: bool = False) -> None:
    """Write ``checkpoint`` in the format named by ``path``'s extension.

    Atomic and exclusive: the data goes to a temporary sibling first and is put in place only when
    complete, by an operation that fails if ``path`` exists by then (unless ``force``), so a failure
    or a signal never leaves a partial file and nothing is overwritten that was not checked.

    A checkpoint mixing floating dtypes is written only by a format that keeps each tensor's dtype
    (its module sets ``KEEPS_MIXED_DTYPES = True``); any other refuses it in one line.

    A training checkpoint (with ``optimizer``) is written only to a format that holds the optimizer
    state (``holds_optimizer``); to any other only with ``weights_only``, which drops the state.
    """
    path = Path(path)
    fmt = format_for(path)
    if path.exists() and not force:
        raise CheckpointError(f"{path}: already exists (pass force=True to overwrite)")
    Checkpoint.from_tensors(
        checkpoint.tensors,
        checkpoint.config,
        allow_nonfinite=True,
        source="checkpoint to write",
        optimizer=checkpoint.optimizer,
    )
    module = fmt.load_module()
    if checkpoint.optimizer is not None and (weights_only or not getattr(module, "HOLDS_OPTIMIZER", False)):
        if not weights_only:
            raise CheckpointError(
                f"{path}: a {fmt.name} file holds no optimizer state, and the checkpoint has "
                f"{checkpoint.optimizer.name} state at step {checkpoint.optimizer.step}; pass --weights-only to drop it"
            )
        checkpoint = checkpoint.weights_only()
    dtypes = checkpoint.float_dtypes
    if len(dtypes) > 1 and not getattr(module, "KEEPS_MIXED_DTYPES", False):
        mix = ", ".join(
            f"{dtype} ({len(names)} tensor{'s' * (len(names) > 1)}, first {names[0]})"
            for dtype, names in dtypes.items()
        )
        raise CheckpointError(
            f"{path}: a {fmt.name} file holds one floating dtype, but the checkpoint mixes {mix}; "
            f"pass --dtype to choose one"
        )
    with _signals_clean_up(), _atomic_target(path, fmt.is_directory, force=force) as tmp:
        module.write(checkpoint, tmp)


def convert(
    src,
    dst,
    *,
    dtype=None,
    force: bool = False,
    allow_nonfinite: bool = False,
    allow_overflow: bool = False,
    config: ModelConfig | None = None,
    weights_only: bool = False,
) -> Checkpoint:
    """Read ``src``, optionally cast floating tensors to ``dtype``, write ``dst``; returns what was read
    (optimizer state included; ``weights_only`` drops it from what is written, see ``write``).

    A cast that turns a finite value into inf is refused unless ``allow_overflow``.
    """
    dst = Path(dst)
    format_for(dst).load_module()  # an unknown extension or a missing package fails before any reading
    if dst.exists() and not force:
        raise CheckpointError(f"{dst}: already exists (pass force=True to overwrite)")
    checkpoint = read(src, config=config, allow_nonfinite=allow_nonfinite)
    if dtype is not None:
        checkpoint = checkpoint.astype(dtype, allow_overflow=allow_overflow)
    write(checkpoint, dst, force=force, weights_only=weights_only)
    return checkpoint


class _Interrupted(BaseException):
    """A cleanup signal arrived during a write; a BaseException, so no writer's ``except Exception`` eats it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _signals_clean_up():
    """Turn SIGTERM and SIGINT into ``_Interrupted`` inside the block (so the temporary folder's
    cleanup runs), then restore the previous handlers and deliver the signal to them.

    Only in the main thread (Python runs signal handlers there alone), and only for signals not
    ignored. A second signal while the first is being cleaned up after waits for the cleanup."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def interrupt(signum, frame):
        if not received:  # later ones wait until the cleanup of the first is done
            received.append(signum)
            raise _Interrupted(signum)

    previous = {}
    for signum in CLEANUP_SIGNALS:
        handler = signal.getsignal(signum)
        if handler is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, interrupt)
    try:
        yield
    except _Interrupted:
        pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:
            # The previous handler acts now: by default SIGTERM ends the process (status 128 + 15)
            # and SIGINT raises KeyboardInterrupt.
            signal.raise_signal(received[0])
    if received:  # a handler that returned: the write is undone, so say so
        raise CheckpointError(f"interrupted by {signal.Signals(received[0]).name}; nothing was written")


@contextlib.contextmanager
def _atomic_target(path: Path, is_directory: bool, *, force: bool):
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
        modes_from_umask(tmp)
        if not force:
            _place_exclusively(tmp, path, is_directory)
        elif is_directory and path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def modes_from_umask(tmp: Path) -> None:
    """Every file and folder of the output with the mode the umask gives a new one (0o644 and 0o755
    under umask 022), whatever the writer did: some libraries write through a private temporary
    file (mode 0o600), and the temporary folder itself is created 0o700."""
    umask = os.umask(0)
    os.umask(umask)
    paths = [tmp, *tmp.rglob("*")] if tmp.is_dir() else [tmp]
    for item in paths:
        if not item.is_symlink():
            item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)


# errno values meaning "this filesystem cannot do that here" rather than a real failure
_UNSUPPORTED = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL, errno.EXDEV, errno.EMLINK}


def _place_exclusively(tmp: Path, path: Path, is_directory: bool) -> None:
    """Move the finished ``tmp`` to ``path``, failing with one line if ``path`` exists by now."""
    appeared = CheckpointError(f"{path}: appeared while converting; kept as it is (pass force=True to overwrite)")
    try:
        if is_directory:
            _rename_no_replace(tmp, path)
        else:
            os.link(tmp, path)  # the temporary name goes with its folder
        return
    except FileExistsError:
        raise appeared from None
    except OSError as error:
        if error.errno not in _UNSUPPORTED:
            raise
    # No hard links or no renameat2 here: claim the name with an exclusive create, then replace what
    # was claimed (a rename of a directory onto the empty directory claimed, or of a file onto the
    # empty file claimed). Whatever else appears is kept, and the rename fails on a filled directory.
    try:
        if is_directory:
            os.mkdir(path)
        else:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        raise appeared from None
    os.replace(tmp, path)


def _rename_no_replace(src: Path, dst: Path) -> None:
    """``renameat2(RENAME_NOREPLACE)``: rename failing with FileExistsError if ``dst`` exists (Linux);
    OSError(ENOSYS) where the C library does not have it."""
    rename = getattr(_libc(), "renameat2", None)
    if rename is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    at_cwd, rename_noreplace = -100, 1
    if rename(at_cwd, os.fsencode(src), at_cwd, os.fsencode(dst), rename_noreplace) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(dst))


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
