"""Running the compared quantities: each target through its implementation's runner, and the
independent NumPy reference.

Every implementation is fed the canonical checkpoint through its converter (``from_checkpoint``)
and returns results in canonical layouts, so what comes back is framework-free. torch and Flax run
in this process (``runner_of``); Keras runs under the requested backend through
``weights_convert.harness.keras_worker``, in one process for all of a target's calls; a
data-parallel fit runs on its devices (``weights_convert.harness.data_parallel``).
"""

from __future__ import annotations

import contextlib

import numpy as np

from weights_convert.core.checkpoint import Checkpoint
from weights_convert.core.precisions import jax_matmul_precision, param_dtype, torch_tf32
from weights_convert.harness import data_parallel as dp
from weights_convert.harness import keras_worker, reference
from weights_convert.harness.parity.inputs import Inputs, start
from weights_convert.harness.parity.request import Run, Target


def runner_of(framework: str):
    """The runner of torch or flax (Keras runs through ``weights_convert.harness.keras_worker``)."""
    if framework == "torch":
        from impl_torch import runner
    else:
        from impl_flax import runner
    return runner


def matmul_precision(target: Target):
    """Strict rows run with TF32 off (ARCHITECTURE.md section 4); tf32 rows with it on."""
    if target.device != "gpu" or target.framework == "keras":
        return contextlib.nullcontext()  # Keras runs its backends with their strict settings (see impl_keras.runner)
    allow = target.precision == "tf32"
    return torch_tf32(allow) if target.framework == "torch" else jax_matmul_precision(allow)


def calls_for(run: Run, inputs: Inputs) -> list[tuple[str, np.ndarray, np.ndarray | None, dict]]:
    """The runner calls of one run: (function name, x, target or None, keyword arguments)."""
    loss = {} if run.loss == "mse" else {"loss": run.loss}  # "mse" is every runner's default
    if run.mode == "fit":
        kwargs = {"optimizer": run.optimizers[0], **({"trajectory": True} if run.trajectory else {}), **loss}
        kwargs |= dp.fit_kwargs(run.data_parallel, run.batchnorm)
        return [("fit", inputs.x, inputs.target, kwargs)]
    calls = [("forward", inputs.x, None, {"train": run.mode == "train"})]
    if run.mode == "train":
        calls += [("train_step", inputs.x, inputs.target, {"optimizer": name, **loss}) for name in run.optimizers]
    return calls


def merge(calls, outputs: list[dict]) -> dict:
    """One dict of every quantity, in computation order: the gradient once (every step of a train
    run starts from the same weights and batch), each step under ``step/<optimizer>/``."""
    results: dict = {}
    for (function, _, _, kwargs), output in zip(calls, outputs, strict=True):
        for name, value in output.items():
            if function != "train_step":
                results[name] = value
            elif name.startswith("grad/"):
                results.setdefault(name, value)
            elif name.startswith("step/"):
                results[name.replace("step/", f"step/{kwargs['optimizer']}/", 1)] = value
    return results


def run_calls(impl: Target, checkpoint: Checkpoint, calls) -> list[dict]:
    """Run ``calls`` (see ``calls_for``) with the implementation ``impl`` (``run_jobs``), or, for a
    data-parallel fit, on its devices (``weights_convert.harness.data_parallel``)."""
    if any(dp.is_data_parallel(kwargs) for *_, kwargs in calls):
        common = {"device": impl.device, "dtype": impl.dtype}
        return [dp.fit(impl.framework, checkpoint, x, t, **kwargs, **common) for _, x, t, kwargs in calls]
    return run_jobs(impl, [(function, checkpoint, x, target, kwargs) for function, x, target, kwargs in calls])


def run_jobs(impl: Target, jobs) -> list[dict]:
    """Each ``(function, checkpoint or its path, x, target or None, keyword arguments)`` run by the
    runner of ``impl`` at its device and dtype. Keras runs them all in one process of the requested
    backend (a subprocess unless it is this one's)."""
    common = {"device": impl.device, "dtype": impl.dtype}
    if impl.framework == "keras":
        batch = [
            keras_worker.Call(function, checkpoint, x, target, {**kwargs, **common})
            for function, checkpoint, x, target, kwargs in jobs
        ]
        return keras_worker.run_batch_in_backend(impl.backend, batch)
    runner = runner_of(impl.framework)
    with matmul_precision(impl):
        return [
            getattr(runner, function)(checkpoint, x, *([] if target is None else [target]), **kwargs, **common)
            for function, checkpoint, x, target, kwargs in jobs
        ]


def compute(impl: Target, checkpoint: Checkpoint, inputs: Inputs, run: Run) -> dict:
    """Every compared quantity of one implementation, in computation order."""
    parameters = checkpoint.astype(param_dtype(impl.dtype))
    calls = calls_for(run, inputs)
    return merge(calls, run_calls(impl, parameters, calls))


def compute_reference(checkpoint: Checkpoint, inputs: Inputs, run: Run, precision: str = "float64") -> dict:
    """The same quantities from the independent NumPy reference, computed at ``precision`` (a
    train run's block outputs, statistics and every optimizer's step from one pass)."""
    tensors, common = checkpoint.tensors, {"config": checkpoint.config, "precision": precision}
    if run.resume_at is not None:
        ((optimizer,),) = (run.optimizers,)
        state = start(checkpoint, optimizer).optimizer
        return reference.fit(tensors, inputs.x, inputs.target, optimizer=state, loss=run.loss, **common)
    if run.mode == "fit":
        ((_, x, target, kwargs),) = calls_for(run, inputs)
        return reference.fit(tensors, x, target, **dp.reference_kwargs(kwargs), **common)
    if run.mode == "train" and run.optimizers:
        return reference.train_steps(
            tensors, inputs.x, inputs.target, optimizers=run.optimizers, forward=True, loss=run.loss, **common
        )
    return reference.forward(tensors, inputs.x, train=run.mode == "train", **common)


def split_trajectory(results: dict) -> tuple[dict, dict]:
    """(the compared quantities, the ``trajectory/`` entries of a fit)."""
    path = {k: v for k, v in results.items() if k.startswith("trajectory/")}
    return {k: v for k, v in results.items() if k not in path}, path


def loss_curve(results: dict, run: Run) -> np.ndarray:
    """The losses of a fit, step by step."""
    return np.array([float(results.get(f"loss/step{k}", np.nan)) for k in range(1, run.steps + 1)])
