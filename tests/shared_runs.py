"""The small model and batch of the training checks, and Keras backend results shared between tests
that make the same runner calls.

``test_framework_parity``, ``test_keras_parity`` and ``test_parity_all`` check training on one
model at one batch shape (``SMALL_CONFIG`` at ``SMALL_SIZE``, batch 2), and in 3D on one more
(``SMALL_3D_CONFIG`` at ``SMALL_3D_SIZE``): the frameworks that run
in the test process (Flax, and Keras under the process's backend) compile each training step
once per dtype for all of them.

``run_batch`` is ``run_batch_in_backend`` that records each call's results under the call's
content (backend, function, the checkpoint's config and tensors, the arrays, the keyword
arguments), and answers a batch whose every call it has recorded without running it again. The
parity command's Keras rows for ``SMALL_CHECKPOINT`` at ``SMALL_SIZE`` are the very calls that
``test_keras_parity`` runs, so ``test_parity_all`` judges those results, computed once in the
session, instead of starting each backend again; run alone, it computes them itself.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from weights_convert.core.checkpoint import Checkpoint
from weights_convert.core.random_init import random_checkpoint
from weights_convert.core.spec import ModelConfig
from weights_convert.harness import keras_worker

# Depth 2 at 19x13: floors in both pools and pads in both decoder levels, on an odd height and width.
SMALL_CONFIG = ModelConfig(3, 2, (4, 8, 16))
SMALL_SIZE = (19, 13)
SMALL_CHECKPOINT = random_checkpoint(SMALL_CONFIG, seed=1, dtype="float64")
# The same in 3D, a volume of odd sides: what the 3D training checks run.
SMALL_3D_CONFIG = ModelConfig(2, 2, (4, 8, 16), spatial_dims=3)
SMALL_3D_SIZE = (9, 12, 11)
SMALL_3D_CHECKPOINT = random_checkpoint(SMALL_3D_CONFIG, seed=1, dtype="float64")

_run_batch_in_backend = keras_worker.run_batch_in_backend
_recorded: dict[tuple, dict] = {}


def _digest(*arrays) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        if array is None:
            digest.update(b"none")
            continue
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def call_key(backend: str, call: keras_worker.Call) -> tuple | None:
    """The content of ``call`` under ``backend``; None for a call read from a file or one that
    continues a training checkpoint's optimizer (not recorded)."""
    checkpoint = call.checkpoint
    if not isinstance(checkpoint, Checkpoint) or getattr(checkpoint, "optimizer", None) is not None:
        return None
    names = sorted(checkpoint.tensors)
    tensors = _digest(*(checkpoint.tensors[name] for name in names))
    kwargs = json.dumps(call.kwargs, sort_keys=True, default=repr)
    config = json.dumps(checkpoint.config.to_dict(), sort_keys=True)
    return backend, call.function, config, tuple(names), tensors, _digest(call.x, call.target), kwargs


def run_batch(backend: str, calls: list[keras_worker.Call]) -> list[dict]:
    """``run_batch_in_backend(backend, calls)``, answered from the record when every call is in it."""
    keys = [call_key(backend, call) for call in calls]
    if all(key is not None and key in _recorded for key in keys):
        return [dict(_recorded[key]) for key in keys]
    outputs = _run_batch_in_backend(backend, calls)
    for key, output in zip(keys, outputs, strict=True):
        if key is not None:
            _recorded[key] = dict(output)
    return outputs
