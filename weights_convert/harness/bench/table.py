"""A report as text: its matmul ceilings, then a Markdown table of its rows."""

from __future__ import annotations


def _ceiling_line(report: dict, ceiling: str) -> str:
    if ceiling == "float32":
        found, gflops = report["sgemm"], report["sgemm_gflops"]
    else:
        found, gflops = report["matmul"][ceiling], report["matmul_gflops"][ceiling]
    if found is None:
        return f"{ceiling} matmul: not measured{' (no GPU)' if ceiling == 'tf32' else ''}"
    label = "sgemm (float32, " if ceiling == "float32" else f"{ceiling} matmul ("
    return f"{label}{found['n']}^2, {found['library']}): {gflops:.1f} GFLOP/s"


def format_table(report: dict) -> str:
    """A Markdown table of the results, one row per framework / backend / variant / mode / precision;
    each rate is also given as a fraction of its own precision's matmul ceiling."""
    ceilings = ["float32"] + [c for c in ("tf32", "bfloat16", "float64") if c in report.get("matmul_gflops", {})]
    lines = [_ceiling_line(report, ceiling) for ceiling in ceilings]
    config = report.get("settings", {}).get("config", {})
    items = "volumes/s" if config.get("spatial_dims") == 3 else "images/s"  # the field stays images_per_s
    lines += [
        "",
        f"| framework | backend | variant | mode | precision | median ms | GFLOP/s | of ceiling | {items} |",
        "|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    for row in report["results"]:
        precision = row.get("precision", row["dtype"])
        start = (
            f"| {row['framework']} | {row['backend']} | {row['variant'] or '-'} | {row['mode'] or '-'} | {precision}"
        )
        if row.get("error"):
            lines.append(f"{start} | {row['error']} | | | |")
            continue
        ratio = row.get("ratio_to_ceiling", row.get("ratio_to_sgemm"))
        share = "-" if ratio is None else f"{100 * ratio:.0f}%"
        lines.append(f"{start} | {row['median_ms']:.1f} | {row['gflops']:.1f} | {share} | {row['images_per_s']:.2f} |")
    return "\n".join(lines)
