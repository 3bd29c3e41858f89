"""Run ``attention-unet bench --json`` at several batch sizes for each framework's fast variants.

    python benchmarks/batch_sweep.py --out benchmarks/results
    python benchmarks/plot_batch.py benchmarks/results/sweep_*.json -o docs/benchmarks_batch.png

One bench process per (group, batch size), each with its own sgemm measurement, written to
``OUT/sweep_<group>_b<batch>.json``. The training step is swept up to ``--train-max-batch`` only:
it takes about three times as long as the forward pass.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

# The variants worth a curve (the fastest forward and training step of each, from the batch-1 table).
GROUPS = {
    "torch": ["--frameworks", "torch", "--variants", "torch.compile,channels_last"],
    "flax": ["--frameworks", "flax", "--variants", "nnx.jit"],
    "keras-tensorflow": ["--frameworks", "keras", "--keras-backends", "tensorflow", "--variants", "tf.function"],
    "keras-jax": ["--frameworks", "keras", "--keras-backends", "jax", "--variants", "jit_compile"],
    "keras-torch": ["--frameworks", "keras", "--keras-backends", "torch", "--variants", "jit_compile"],
}


def wait_for_quiet(threshold: float | None, patience_s: float = 1800) -> None:
    """On a shared machine, wait (up to ``patience_s``) until the 1-minute load average drops below ``threshold``."""
    deadline = time.monotonic() + patience_s
    while threshold is not None and os.getloadavg()[0] >= threshold and time.monotonic() < deadline:
        time.sleep(20)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--train-max-batch", type=int, default=4)
    parser.add_argument("--groups", nargs="+", choices=sorted(GROUPS), default=list(GROUPS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--quiet-load", type=float, help="before each run, wait for a 1-minute load below this")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for batch in args.batches:
        modes = "forward,train_step" if batch <= args.train_max_batch else "forward"
        for group in args.groups:
            path = args.out / f"sweep_{group}_b{batch}.json"
            command = [sys.executable, "-m", "weights_convert.harness.cli", "bench", "--json", "--batch", str(batch)]
            command += [*GROUPS[group], "--modes", modes, "--repeats", str(args.repeats), "--warmup", "1"]
            wait_for_quiet(args.quiet_load)
            print(f"{group} batch {batch}: {' '.join(command[3:])}", file=sys.stderr, flush=True)
            result = subprocess.run(command, stdout=subprocess.PIPE, text=True)
            if result.returncode != 0:
                print(f"{group} batch {batch}: bench exited with status {result.returncode}", file=sys.stderr)
                return result.returncode
            path.write_text(result.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
