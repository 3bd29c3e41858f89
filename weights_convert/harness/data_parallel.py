"""Data parallelism in the parity harness and the ``train`` command: which implementation module
trains on D devices, what the float64 reference computes for each BatchNorm mode, and the checks
of a data-parallel request.

- ``batchnorm="sync"`` trains on the global batch's statistics: the reference is the single-device
  training run on the whole batch (``reference.fit`` as it is).
- ``batchnorm="local"`` trains on each device's own statistics: the reference is computed shard by
  shard with the gradients averaged, as DDP does (``reference.fit(..., shards=D)``), and the
  running statistics are device 0's.

The implementations: each framework's trainer (``impl_<framework>/trainer.py``) runs the one loop
of ``weights_convert.core.loop`` with its ``distributed.py`` pieces: DDP over D processes, gloo or
nccl (torch); a sharded batch under ``nnx.jit``, ``jax.shard_map`` for local statistics (Flax);
``keras.distribution.DataParallel``, JAX backend only (Keras).
"""

from __future__ import annotations

from weights_convert.core.data_parallel import BATCHNORM_MODES

KERAS_BACKEND = "jax"  # the one Keras backend with data-parallel training here (keras.distribution)


def module(framework: str):
    """The ``trainer`` module of ``framework`` ("torch", "flax" or "keras"): ``train`` and ``fit``
    on one device or D."""
    if framework == "torch":
        from impl_torch import trainer
    elif framework == "flax":
        from impl_flax import trainer
    elif framework == "keras":
        from impl_keras import trainer
    else:
        raise ValueError(f"unknown framework {framework!r}")
    return trainer


def checked(frameworks, keras_backends, mode: str, batch: int, devices: int, batchnorm: str) -> tuple[str, ...]:
    """The Keras backends a data-parallel parity run uses (JAX only), after checking the request;
    a ValueError in one line otherwise."""
    if batchnorm not in BATCHNORM_MODES:
        raise ValueError(f"unknown batchnorm {batchnorm!r}; choose from {', '.join(BATCHNORM_MODES)}")
    if not isinstance(devices, int) or devices < 1:
        raise ValueError(f"--data-parallel must be a positive number of devices, got {devices!r}")
    if devices == 1:
        return tuple(keras_backends)
    if mode != "fit":
        raise ValueError(f"--data-parallel trains: it needs --mode fit, got --mode {mode}")
    if batch % devices:
        raise ValueError(f"--batch {batch} does not split into {devices} equal shards (--data-parallel {devices})")
    if "keras" in frameworks and KERAS_BACKEND not in keras_backends:
        raise ValueError(
            f"Keras data-parallel training runs on the {KERAS_BACKEND} backend (keras.distribution); "
            f"add it to --keras-backends or leave keras out of --frameworks"
        )
    return (KERAS_BACKEND,)


def fit_kwargs(devices: int, batchnorm: str) -> dict:
    """The keyword arguments a fit call carries for ``devices`` devices (none for one)."""
    return {"data_parallel": devices, "batchnorm": batchnorm} if devices > 1 else {}


def is_data_parallel(kwargs: dict) -> bool:
    return kwargs.get("data_parallel", 1) > 1


def fit(framework: str, checkpoint, xs, targets, **kwargs) -> dict:
    """``fit`` of ``framework``'s trainer (the runner's results, on D devices)."""
    return module(framework).fit(checkpoint, xs, targets, **kwargs)


def reference_kwargs(kwargs: dict) -> dict:
    """``reference.fit``'s keyword arguments for a fit call's ``kwargs``: ``shards=D`` for local
    BatchNorm statistics, none for synchronized ones (the single-device run on the whole batch)."""
    devices, batchnorm = kwargs.get("data_parallel", 1), kwargs.get("batchnorm", "sync")
    rest = {k: v for k, v in kwargs.items() if k not in ("data_parallel", "batchnorm")}
    return rest | ({"shards": devices} if batchnorm == "local" and devices > 1 else {})
