"""The files of ``attention-unet parity --report DIR``: a PNG (eval and train: the input, each
implementation's mask and heat maps of |difference|; fit: the loss curves and the parameter drift;
a resumed fit: every pair's loss curve and worst row), and the per-row table as Markdown and JSON.
Needs matplotlib (``pip install 'attention-unet[report]'``), imported only here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from weights_convert.harness.parity.report import Report, format_table


def write_report(report: Report, directory) -> list[str]:
    """A PNG (input, each framework's mask, heat maps of |difference|) and the per-block table
    (Markdown and JSON) in ``directory``; returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    table = directory / "parity.md"
    table.write_text("```\n" + format_table(report, verbose=True) + "\n```\n")
    data = directory / "parity.json"
    data.write_text(json.dumps(report.to_json(), indent=1))
    png = directory / "parity.png"
    plot = _plot_resume if report.references else _plot_fit if report.mode == "fit" else _plot_outputs
    fig = plot(report, plt)
    fig.suptitle("PASS" if report.passed else "FAIL")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return [str(png), str(table), str(data)]


def _plot_fit(report: Report, plt):
    """The loss curves of every implementation over the reference's, and the largest parameter
    difference from the reference after each step (log axis)."""
    fig, (losses, drift) = plt.subplots(1, 2, figsize=(11, 4))
    steps = np.arange(1, len(report.reference_output) + 1)
    losses.plot(steps, report.reference_output, "k--", linewidth=3, alpha=0.4, label="reference (numpy float64)")
    for label, curve in report.outputs.items():
        losses.plot(steps, curve, marker="o", markersize=3, label=label)
    for label, curve in report.drift.items():
        drift.semilogy(steps, np.maximum(curve, np.finfo(np.float64).tiny), marker="o", markersize=3, label=label)
    losses.set(xlabel="step", ylabel="loss (before the step's update)", title="training loss")
    drift.set(xlabel="step", ylabel="max |parameter - reference|", title="largest parameter difference")
    losses.legend(fontsize=7)
    if report.drift:
        drift.legend(fontsize=7)
    return fig


def _plot_resume(report: Report, plt):
    """A resumed fit: every pair's loss curve over its optimizer's reference, and each pair's worst
    row as a fraction of its bound (log axis; 1 is the bound)."""
    fig, (losses, worst) = plt.subplots(1, 2, figsize=(12, 4.5))
    steps = np.arange(1, len(report.reference_output) + 1)
    for name, curve in report.references.items():
        losses.plot(steps, curve, "--", linewidth=3, alpha=0.4, label=f"reference (numpy float64), {name}")
    for curve in report.outputs.values():  # unlabelled: 75 pairs would bury the legend
        losses.plot(steps, curve, marker="o", markersize=2, linewidth=0.8)
    losses.set(xlabel="step", ylabel="loss (before the step's update)", title="training loss, every pair")
    losses.legend(fontsize=7)
    fractions: dict[str, float] = {}
    for r in report.results:
        pair = "/".join(r.quantity.split("/")[1:3])
        fraction = r.rel_diff / r.tolerance if r.tolerance else float("inf")
        fractions[pair] = max(fractions.get(pair, 0.0), fraction)
    labels = list(fractions)
    values = [max(fractions[label], 1e-6) for label in labels]
    worst.barh(range(len(labels)), values, color=["tab:red" if v > 1 else "tab:blue" for v in values])
    worst.axvline(1.0, color="k", linewidth=1)
    worst.set_xscale("log")
    worst.set_yticks(range(len(labels)), labels, fontsize=max(4, 9 - len(labels) // 12))
    worst.invert_yaxis()
    worst.set(xlabel="worst row / its bound", title="each pair and optimizer")
    return fig


def _plane(image: np.ndarray) -> np.ndarray:
    """The (C, H, W) plane of the first item's image, or of a volume (C, D, H, W) its middle slice."""
    return image if image.ndim == 3 else image[:, image.shape[1] // 2]


def _plot_outputs(report: Report, plt):
    """Input, reference and per-implementation masks, and heat maps of |difference| (of a volume,
    the middle slice along its depth)."""
    labels = list(report.outputs)
    columns = 2 + len(labels)
    fig, axes = plt.subplots(2, columns, figsize=(3 * columns, 6), squeeze=False)
    image = _plane(report.input[0]).transpose(1, 2, 0)
    image = image[..., :3] if image.shape[-1] >= 3 else image[..., 0]
    axes[0, 0].imshow(image, cmap=None if image.ndim == 3 else "gray")
    axes[0, 0].set_title("input")
    reference_logits = _plane(report.reference_output[0])[0]
    axes[0, 1].imshow(reference_logits > 0, cmap="gray", vmin=0, vmax=1)  # white: foreground, black: background
    axes[0, 1].set_title("reference mask")
    axes[1, 0].axis("off")
    axes[1, 1].imshow(reference_logits, cmap="viridis")
    axes[1, 1].set_title("reference logits")
    for i, label in enumerate(labels):
        logits = _plane(report.outputs[label][0])[0]
        axes[0, 2 + i].imshow(logits > 0, cmap="gray", vmin=0, vmax=1)
        axes[0, 2 + i].set_title(f"{label}\nmask", fontsize=8)
        heat = axes[1, 2 + i].imshow(np.abs(logits - reference_logits), cmap="magma")
        axes[1, 2 + i].set_title("|difference|", fontsize=8)
        fig.colorbar(heat, ax=axes[1, 2 + i], fraction=0.046)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig
