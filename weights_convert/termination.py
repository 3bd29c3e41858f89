"""How the project's processes end on a signal: the command, and every worker it starts.

- ``exit_on_sigterm``: SIGTERM raises ``SystemExit(143)`` in the main thread, so the process ends as
  on an error: every ``finally`` and context manager on the way out runs (temporary folders are
  removed, child processes ended) and then ``atexit`` handlers (TensorFlow removes the
  ``__autograph_generated_file*.py`` modules it wrote to the temporary directory). Python's
  default ends the process at once, leaving all of them behind. The command line and every worker's
  entry point call it first.
- ``die_with_parent``: on Linux, a worker gets SIGTERM when the process that started it ends, even
  by SIGKILL (``prctl(PR_SET_PDEATHSIG)``), so no worker outlives its parent.
- ``end_process``: a child still running when its parent gives up on it (an error, a signal) gets
  SIGTERM, ``GRACE_S`` seconds to clean up after itself, then SIGKILL.
- ``CHILD_PARENT_VARIABLE``: the parent's process ID, set in a worker's environment by
  ``weights_convert.processes.environment``; ``die_with_parent`` ends a worker whose parent is
  already gone when it starts.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading

# SIGTERM's conventional exit status: 128 + the signal's number.
SIGTERM_STATUS = 128 + signal.SIGTERM
# How long a child asked to end (SIGTERM) may take to clean up before it is killed.
GRACE_S = 5.0
CHILD_PARENT_VARIABLE = "ATTENTION_UNET_PARENT_PID"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _exit(signum, frame):
    raise SystemExit(SIGTERM_STATUS)


def exit_on_sigterm() -> None:
    """From now on SIGTERM raises ``SystemExit(143)`` (see the module doc). Only from the main
    thread, where Python runs signal handlers; a SIGTERM the process ignores stays ignored."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) != signal.SIG_IGN:
        signal.signal(signal.SIGTERM, _exit)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """On Linux: ``sig`` to this process when its parent ends; if the parent named by
    ``CHILD_PARENT_VARIABLE`` has already ended (before this call could ask), exit now. Elsewhere
    nothing: the parent's ``end_process`` remains."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return  # not available here: the parent's end_process remains
    expected = os.environ.get(CHILD_PARENT_VARIABLE)
    if expected is not None and expected.isdigit() and os.getppid() != int(expected):
        raise SystemExit(SIGTERM_STATUS)


def end_process(process: subprocess.Popen | object, grace_s: float = GRACE_S) -> None:
    """End ``process`` (a ``subprocess.Popen`` or a ``multiprocessing.Process``) if it still runs:
    SIGTERM, ``grace_s`` seconds, then SIGKILL; returns once it has ended."""
    if isinstance(process, subprocess.Popen):
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(grace_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return
    if process.is_alive():
        process.terminate()
        process.join(grace_s)
        if process.is_alive():
            process.kill()
            process.join()
