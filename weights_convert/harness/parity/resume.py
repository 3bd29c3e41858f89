"""Resume parity (``attention-unet parity --mode fit --steps N --resume-at K``): training moved from
one framework to another mid-run is the same training.

Every target trains K steps from one training checkpoint (the model and a fresh optimizer,
``start``) and saves a training checkpoint in its framework's native format (``NATIVE_FORMATS``:
``save_training``). Each saved checkpoint is converted (``weights_convert.convert``, lossless) to
every target's native format, the target's own included, and training continues there for the
remaining N - K steps from the restored optimizer. Each ordered pair ``<from>-><to>`` then has the
losses of all N steps (the first K from ``<from>``'s run), and the parameters, running statistics
and optimizer state (``weights_convert.core.optim.state_results``) after the last step, judged
(``judge_pairs``) against the reference's uninterrupted run of the same optimizer, which starts
from the same training checkpoint (``parity.inputs.start``). Its rows are ``resume/<from>-><to>/<optimizer>/...``; the
optimizer slots gate in float64 only (``tolerances.INFORMATIONAL_AT_REDUCED_PRECISION``).

The optimizers are the training checkpoints' (``weights_convert.core.optimizer_state.DEFAULTS``):
SGD with momentum 0.9, Adam, and AdamW with decoupled weight decay 0.01, so that step counts,
moments and momentum buffers all cross the framework boundary. Each target's runner does the
training (its ``fit`` from a training checkpoint, through ``runners.run_jobs``); Keras under a
backend other than this process's runs in one subprocess per phase for every optimizer and pair
(``weights_convert.harness.keras_worker``).
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from weights_convert.core.checkpoint import Checkpoint
from weights_convert.core.precisions import NOISY, param_dtype
from weights_convert.formats.io import convert, write
from weights_convert.harness.parity.compare import group_of
from weights_convert.harness.parity.inputs import Inputs, start
from weights_convert.harness.parity.judging import judge, result
from weights_convert.harness.parity.noise import measure_noise
from weights_convert.harness.parity.request import Run, Target
from weights_convert.harness.parity.runners import compute_reference, loss_curve, run_jobs
from weights_convert.harness.parity.tolerances import INFORMATIONAL_AT_REDUCED_PRECISION

# The format each framework's own training checkpoints take (``save_training`` writes it natively).
NATIVE_FORMATS = {"torch": ".pt", "flax": ".orbax", "keras": ".keras"}


def judge_pairs(targets: list[Target], checkpoint: Checkpoint, inputs: Inputs, run: Run, say):
    """(results, loss curves, the reference's curve of each optimizer) of a fit with
    ``run.resume_at``: for each optimizer the reference's uninterrupted run and its noise, then
    every ordered pair of the (strict) ``targets`` judged against it."""
    dtype = targets[0].dtype
    references, noises = {}, {}
    for name in run.optimizers:
        single = dataclasses.replace(run, optimizers=(name,))
        say(f"reference: numpy float64, {name}")
        references[name] = compute_reference(checkpoint, inputs, single)
        noisy = dtype in NOISY
        noises[name] = measure_noise(checkpoint, inputs, single, dtype, references[name], say) if noisy else None
    strict = [target for target in targets if target.precision == "strict"]
    parameters = checkpoint.astype(param_dtype(dtype))
    pairs = train_pairs(strict, parameters, inputs.x, inputs.target, run.resume_at, run.optimizers, say, run.loss)
    results, outputs = [], {}
    shown_only = INFORMATIONAL_AT_REDUCED_PRECISION if dtype in NOISY else ()
    for (name, source, target), actual in pairs.items():
        prefix = f"resume/{pair_label(source, target)}/{name}"
        for row, informational in judge(actual, references[name], target, noises[name]):
            informational = informational or group_of(row.quantity) in shown_only
            results.append(result(target, "fit", row, f"{prefix}/{row.quantity}", informational))
        outputs[prefix] = loss_curve(actual, run)
    return results, outputs, {name: loss_curve(reference, run) for name, reference in references.items()}


def pair_label(source, target) -> str:
    """``<from>-><to>``, each a framework (``keras-<backend>`` for Keras: the label is one segment
    of a row's ``/``-separated name)."""
    return f"{_slug(source)}->{_slug(target)}"


def _name(target) -> str:
    return f"keras/{target.backend}" if target.framework == "keras" else target.framework


def _file(directory: Path, stem: str, target) -> Path:
    return directory / f"{stem}{NATIVE_FORMATS[target.framework]}"


def train_pairs(targets, checkpoint: Checkpoint, xs, ys, resume_at: int, optimizers, say, loss: str = "mse") -> dict:
    """``(optimizer, from target, to target) -> results`` of every ordered pair of ``targets`` (see
    the module doc): ``loss/step<k>`` for k = 1..len(xs), then what the ``to`` target's ``fit``
    returns after the last step, training on ``loss``. ``checkpoint`` is in the targets' parameter dtype."""
    losses = {} if loss == "mse" else {"loss": loss}  # "mse" is every runner's default
    head, tail = (xs[:resume_at], ys[:resume_at]), (xs[resume_at:], ys[resume_at:])
    results = {}
    with tempfile.TemporaryDirectory(prefix="attention-unet-resume-") as tmp:
        tmp = Path(tmp)
        starts = {name: tmp / f"start-{name}.safetensors" for name in optimizers}
        for name, path in starts.items():
            write(start(checkpoint, name), path)
        first, saved = {}, {}
        for source in targets:
            say(f"{_name(source)}: {resume_at} steps, then save_training to {NATIVE_FORMATS[source.framework]}")
            jobs = []
            for name in optimizers:
                saved[name, source] = _file(tmp, f"{name}-{_slug(source)}", source)
                kwargs = {"optimizer": name, "save_to": str(saved[name, source]), **losses}
                jobs.append(("fit", starts[name], *head, kwargs))
            first.update(zip(((name, source) for name in optimizers), run_jobs(source, jobs), strict=True))
        for target in targets:
            say(f"{_name(target)}: load_training from every target, {len(tail[0])} more steps")
            jobs, keys = [], []
            for name in optimizers:
                for source in targets:
                    moved = _file(tmp, f"{name}-{_slug(source)}-to-{_slug(target)}", target)
                    convert(saved[name, source], moved)
                    jobs.append(("fit", moved, *tail, {"optimizer": name, **losses}))
                    keys.append((name, source, target))
            for key, continued in zip(keys, run_jobs(target, jobs), strict=True):
                results[key] = _joined(first[key[:2]], continued, resume_at)
    return results


def _slug(target) -> str:
    return _name(target).replace("/", "-")


def _joined(first: dict, continued: dict, resume_at: int) -> dict:
    """The losses of both runs, renumbered as one run's, then the continued run's final quantities."""
    losses = {k: v for k, v in first.items() if k.startswith("loss/")}
    for key, value in continued.items():
        if key.startswith("loss/step"):
            losses[f"loss/step{resume_at + int(key.removeprefix('loss/step'))}"] = value
    return losses | {k: v for k, v in continued.items() if not k.startswith("loss/")}
