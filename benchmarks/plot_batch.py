"""Throughput against batch size, per framework, from ``attention-unet bench --json`` reports.

    python benchmarks/plot_batch.py benchmarks/results/batch_*.json -o docs/benchmarks_batch.png

One panel per mode (eval forward, training step); one line per framework (and Keras backend), each
point the best variant at that batch size (per precision, for reports that name one). The black lines
are the matmul ceilings (float32 dashed, tf32 dash-dotted, bfloat16 dotted) in images/s: what the
counted FLOPs would allow at each measured matmul rate.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MODES = {"forward": "eval forward", "train_step": "training step (SGD, MSE)"}


def best_points(reports: list[dict]) -> dict:
    """mode -> "framework/backend" -> batch -> (images/s, variant) of the fastest variant."""
    points: dict = {mode: {} for mode in MODES}
    for report in reports:
        for row in report["results"]:
            if row.get("images_per_s") is None:
                continue
            name = row["framework"] if row["framework"] != "keras" else f"keras/{row['backend']}"
            if "precision" in row:
                name = f"{name} {row['precision']}"
            series = points[row["mode"]].setdefault(name, {})
            best = series.get(row["batch"])
            if best is None or row["images_per_s"] > best[0]:
                series[row["batch"]] = (row["images_per_s"], row["variant"])
    return points


def ceiling(reports: list[dict], mode: str, precision: str = "float32") -> dict[int, float]:
    """images/s at the ``precision`` matmul rate (the highest measured among the reports), per batch size."""
    out: dict[int, float] = {}
    for report in reports:
        batch = report["settings"]["batch"]
        rate = report.get("matmul_gflops", {"float32": report["sgemm_gflops"]}).get(precision)
        if mode in report["settings"]["modes"] and rate:
            out[batch] = max(out.get(batch, 0.0), rate * 1e9 / (report["flops"][mode] / batch))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", type=Path, nargs="+")
    parser.add_argument("-o", "--output", type=Path, default=Path("docs/benchmarks_batch.png"))
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = [json.loads(path.read_text()) for path in args.reports]
    points = best_points(reports)
    first = reports[0]
    size = "x".join(map(str, first["settings"]["size"]))
    fig, axes = plt.subplots(1, len(MODES), figsize=(12, 4.6))
    for ax, (mode, title) in zip(axes, MODES.items(), strict=True):
        for name, series in sorted(points[mode].items()):
            batches = sorted(series)
            ax.plot(batches, [series[b][0] for b in batches], marker="o", label=name)
            for b in batches:
                ax.annotate(series[b][1], (b, series[b][0]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        for precision, style in (("float32", "k--"), ("tf32", "k-."), ("bfloat16", "k:")):
            limit = ceiling(reports, mode, precision)
            batches = sorted(limit)
            if batches:
                ax.plot(batches, [limit[b] for b in batches], style, linewidth=1, label=f"{precision} matmul rate")
        batches = sorted({r["settings"]["batch"] for r in reports})
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("batch size")
        ax.set_ylabel(f"images/s ({size})")
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    machine = first["machine"]
    where = machine.get("gpu") or f"{machine['processor']} ({machine['cpu_count']} CPUs)"
    fig.suptitle(f"Attention U-Net throughput, {where}, {first['date'][:10]}")
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
