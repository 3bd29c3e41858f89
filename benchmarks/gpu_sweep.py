"""Run ``attention-unet bench --device gpu --json`` for each precision and batch size on the visible GPU.

    python benchmarks/gpu_sweep.py --out benchmarks/results
    python benchmarks/table.py benchmarks/results/gpu_mixed_bfloat16_b32.json
    python benchmarks/plot_batch.py benchmarks/results/gpu_*.json -o docs/benchmarks_gpu.png

One bench process per (dtype, batch size), each measuring its own matmul ceilings (float32, tf32 and
bfloat16), written to ``OUT/gpu_<dtype>_b<batch>.json``. ``--dtype float32`` gives the strict
float32 rows and the tf32 rows; ``mixed_bfloat16`` the bfloat16 rows. Inside each run every
framework has its own process (the bench does this on a GPU), so none holds memory another needs.
Arguments after ``--`` go to every bench command (e.g. ``-- --variants eager,nnx.jit --modes forward``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--dtypes", nargs="+", choices=["float32", "mixed_bfloat16"], default=["mixed_bfloat16", "float32"]
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="after --: more bench options")
    args = parser.parse_args()
    extra = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
    args.out.mkdir(parents=True, exist_ok=True)
    for dtype in args.dtypes:
        for batch in args.batches:
            path = args.out / f"gpu_{dtype}_b{batch}.json"
            command = [sys.executable, "-m", "weights_convert.harness.cli", "bench", "--device", "gpu", "--json"]
            command += ["--dtype", dtype, "--batch", str(batch), "--repeats", str(args.repeats), *extra]
            print(f"{dtype} batch {batch}: {' '.join(command[3:])}", file=sys.stderr, flush=True)
            result = subprocess.run(command, stdout=subprocess.PIPE, text=True)
            if result.returncode != 0:
                print(f"{dtype} batch {batch}: bench exited with status {result.returncode}", file=sys.stderr)
                return result.returncode
            path.write_text(result.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
