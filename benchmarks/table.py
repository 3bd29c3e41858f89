"""Print the Markdown table of an ``attention-unet bench --json`` report, with the machine, load and ceilings.

python benchmarks/table.py benchmarks/results/batch_1_all.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from weights_convert.harness.bench import format_table


def best_by_framework(report: dict, mode: str = "forward") -> list[str]:
    """One line per framework (Keras per backend) and precision: its fastest variant's ratio to the
    matmul ceiling of that precision."""
    best: dict[tuple[str, str], dict] = {}
    for row in report["results"]:
        if row.get("gflops") is None or row["mode"] != mode:
            continue
        name = row["framework"] if row["framework"] != "keras" else f"keras/{row['backend']}"
        key = (name, row.get("precision", row["dtype"]))
        if key not in best or row["gflops"] > best[key]["gflops"]:
            best[key] = row
    lines = []
    for (name, precision), row in best.items():
        ratio = row.get("ratio_to_ceiling", row.get("ratio_to_sgemm"))
        share = "" if ratio is None else f" = {100 * ratio:.0f}% of its ceiling"
        lines.append(f"- {name}, {precision}: {row['variant']}, {row['gflops']:.1f} GFLOP/s{share}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    args = parser.parse_args()
    report = json.loads(args.report.read_text())
    machine, settings = report["machine"], report["settings"]
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    print(f"- date: {report['date']} (run took {report['duration_s']:.0f} s)")
    print(f"- machine: {machine['processor']}, {machine['cpu_count']} CPUs, {machine['platform']}")
    print(f"- versions: Python {machine['python']}, {versions}")
    print(f"- load average (1, 5, 15 min): start {report['load_avg_start']}, end {report['load_avg_end']}")
    size = "x".join(map(str, settings["size"]))
    print(
        f"- input: {settings['batch']}x{settings['config']['in_channels']}x{size}, --dtype {settings['dtype']}, ",
        end="",
    )
    print(f"{settings['device']}, median of {settings['repeats']} after {settings['warmup']} warm-up runs")
    flops = report["flops"]
    print(f"- counted FLOPs: forward {flops['forward'] / 1e9:.1f} G, training step {flops['train_step'] / 1e9:.1f} G")
    if machine.get("gpu"):
        print(f"- GPU: {machine['gpu']}")
    # Reports from before the per-precision ceilings have the float32 one only.
    ceilings = report.get("matmul") or {"float32": report["sgemm"]}
    for ceiling, measured in ceilings.items():
        if measured is None:
            print(f"- {ceiling} matmul: not measured")
            continue
        runs = ", ".join(f"{r['library']} {r['gflops']:.1f} at {r['n']}^2" for r in measured["runs"])
        print(f"- {ceiling} matmul, before and after the frameworks: {runs} GFLOP/s; the ceiling is the highest")
    print()
    print(format_table(report))
    for mode in ("forward", "train_step"):
        print(f"\nBest variant per framework, {mode}:")
        print("\n".join(best_by_framework(report, mode)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
