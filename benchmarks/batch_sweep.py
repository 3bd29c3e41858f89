"""Run ``attention-unet bench --json`` at several batch sizes, one JSON file per batch size.

    python benchmarks/batch_sweep.py --batches 1 2 4 8 --out benchmarks/results \\
        --variants torch.compile+channels_last,nnx.jit,jit_compile

Each run is a separate process, so every batch size starts from a fresh machine state (and a fresh
sgemm measurement). Any extra arguments after ``--`` go to the bench command unchanged. Then
``python benchmarks/plot_batch.py benchmarks/results/batch_*.json`` draws the plot.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--variants", default="torch.compile+channels_last,nnx.jit,jit_compile")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("extra", nargs="*", help="more bench arguments, after --")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for batch in args.batches:
        path = args.out / f"batch_{batch}.json"
        command = [sys.executable, "-m", "weights_convert.cli", "bench", "--json", "--batch", str(batch)]
        command += ["--variants", args.variants, "--repeats", str(args.repeats), *args.extra]
        print(f"batch {batch}: {' '.join(command[2:])}", file=sys.stderr, flush=True)
        result = subprocess.run(command, stdout=subprocess.PIPE, text=True)
        if result.returncode != 0:
            print(f"batch {batch}: bench exited with status {result.returncode}", file=sys.stderr)
            return result.returncode
        path.write_text(result.stdout)
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
