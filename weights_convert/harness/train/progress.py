"""The progress of ``attention-unet train``: the bar on stderr, the checkpoints and the validations
(``validation.Validation``), as the training loop's ``on_step``."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path


@dataclasses.dataclass
class Progress:
    """``on_step`` of the training loops: the bar on stderr and the checkpoints every ``every``
    steps and after the last (``out/step_<k>.<suffix>``). The loop counts its steps from 1; the run's
    step numbers go on from ``first_step`` (the step of the checkpoint it continues). Each
    checkpoint is the loop's snapshot, a training checkpoint, or its model tensors alone with
    ``weights_only``. SGD's step is set to the run's step: its update does not use the count, and
    torch's SGD keeps none (it reads as 0, or None with momentum).

    With ``validation``, every ``validate_every`` steps and after the last the checkpoint of that
    step is validated; its line (ended, one per validation) adds the validation loss and mean Dice.
    ``unit`` names what a sample is in the throughput: "img/s", or "vol/s" for a 3D model.
    Picklable: a spawned process runs it."""

    label: str
    steps: int
    batch_size: int
    out: str
    every: int
    suffix: str = "safetensors"
    force: bool = False
    first_step: int = 0
    weights_only: bool = False
    validation: object = None  # a ``Validation``, or None
    validate_every: int = 0
    unit: str = "img/s"
    width: int = 24
    start: float | None = None
    last_print: float = 0.0

    def __call__(self, step: int, loss: float, snapshot) -> None:
        import weights_convert

        now = time.perf_counter()
        if step == 1 or self.start is None:
            self.start = now  # the first step compiles: throughput is timed from its end
        rate = (step - 1) * self.batch_size / (now - self.start) if step > 1 and now > self.start else None
        run_step, last = self.first_step + step, self.first_step + self.steps
        written = ""
        save = run_step % self.every == 0 or step == self.steps
        validate = self.validation is not None and (run_step % self.validate_every == 0 or step == self.steps)
        checkpoint = self.checkpoint(snapshot(), run_step) if save or validate else None
        if validate:
            record = self.validation(run_step, loss, checkpoint)
            self.start += time.perf_counter() - now  # the throughput is the training's: validation time out
            written += f"  val loss {record['val_loss']:.5g}  dice {_score(record['mean_dice'])}"
        if save:
            path = Path(self.out) / f"step_{run_step:0{len(str(last))}d}.{self.suffix}"
            weights_convert.write(checkpoint, path, force=self.force)
            written += f"  wrote {path.name}"
        done = int(self.width * step / self.steps)
        bar = "#" * done + "-" * (self.width - done)
        speed = f"{rate:8.1f} {self.unit}" if rate else "  warming up"
        line = f"{self.label} [{bar}] {run_step}/{last}  loss {loss:.5g}  {speed}{written}"
        tty = sys.stderr.isatty()
        if tty or written or step == self.steps or now - self.last_print >= 1.0:
            end = "" if tty and step < self.steps and not written else "\n"
            print(("\r" if tty else "") + line, end=end, file=sys.stderr, flush=True)
            self.last_print = now

    def checkpoint(self, snapshot, run_step: int):
        """What is written after step ``run_step`` of the run: ``snapshot``, SGD's step set to
        ``run_step``, or its model tensors alone with ``weights_only``."""
        if self.weights_only:
            return snapshot.weights_only()
        if snapshot.optimizer.name != "sgd":
            return snapshot  # Adam's count is its bias correction: every framework keeps it
        return dataclasses.replace(snapshot, optimizer=dataclasses.replace(snapshot.optimizer, step=run_step))


def _score(value) -> str:
    """A mean Dice for the bar: four decimals, or "-" when no class had a score."""
    return "-" if value is None else f"{value:.4f}"
