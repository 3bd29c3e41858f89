"""Print the Markdown table of an ``attention-unet bench --json`` report, with the machine and load.

python benchmarks/table.py benchmarks/results/batch_1_all.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from weights_convert.harness.bench import format_table


def best_by_framework(report: dict, mode: str = "forward") -> list[str]:
    """One line per framework (Keras per backend): its fastest variant's ratio to the sgemm rate."""
    best: dict[str, dict] = {}
    for row in report["results"]:
        if row.get("gflops") is None or row["mode"] != mode:
            continue
        name = row["framework"] if row["framework"] != "keras" else f"keras/{row['backend']}"
        if name not in best or row["gflops"] > best[name]["gflops"]:
            best[name] = row
    return [
        f"- {name}: {row['variant']}, {row['gflops']:.1f} GFLOP/s = {100 * row['ratio_to_sgemm']:.0f}% of sgemm"
        for name, row in best.items()
    ]


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
    print(f"- input: {settings['batch']}x{settings['config']['in_channels']}x{size} {settings['dtype']}, ", end="")
    print(f"{settings['device']}, median of {settings['repeats']} after {settings['warmup']} warm-up runs")
    flops = report["flops"]
    print(f"- counted FLOPs: forward {flops['forward'] / 1e9:.1f} G, training step {flops['train_step'] / 1e9:.1f} G")
    runs = ", ".join(f"{r['library']} {r['gflops']:.1f}" for r in report["sgemm"]["runs"])
    print(f"- sgemm {report['sgemm']['n']}^2 float32, before and after the frameworks: {runs} GFLOP/s")
    print(f"- the ceiling is the highest: {report['sgemm_gflops']:.1f} GFLOP/s ({report['sgemm']['library']})")
    print()
    print(format_table(report))
    for mode in ("forward", "train_step"):
        print(f"\nBest variant per framework, {mode}:")
        print("\n".join(best_by_framework(report, mode)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
