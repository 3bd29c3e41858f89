"""``<stem>_overlay.png``: one row of panels, left to right: the input image, the predicted mask
over it, then every attention gate's map (``d1.ag``, the deepest, first), each resized to the image
(``prediction``) and drawn on a fixed 0..1 scale, since a gate's map is a sigmoid. A volume shows
its middle slice along depth in every panel. Drawn with matplotlib (the ``report`` extra), Agg
backend, imported only here."""

from __future__ import annotations

import numpy as np

PANEL_INCHES = 2.6  # the side of one panel
DPI = 100
MASK_ALPHA = 0.45  # the mask's opacity over the image
FOREGROUND = (1.0, 0.15, 0.1)  # one output channel: the foreground in red


def shown_image(image: np.ndarray) -> np.ndarray:
    """(C, H, W) normalized channels -> what is drawn: RGB for 3 channels, else the first channel,
    each stretched to 0..1 (a constant channel: mid grey)."""
    channels = image[:3] if image.shape[0] == 3 else image[:1]
    low = channels.min(axis=(1, 2), keepdims=True)
    span = channels.max(axis=(1, 2), keepdims=True) - low
    stretched = np.where(span > 0, (channels - low) / np.where(span > 0, span, 1), 0.5)
    rgb = stretched if stretched.shape[0] == 3 else np.repeat(stretched, 3, axis=0)
    return np.moveaxis(rgb, 0, -1)


def mask_colours(classes: np.ndarray, out_channels: int, plt) -> np.ndarray:
    """(H, W) class indices -> RGBA: class 0 transparent, the foreground red (one output channel)
    or each class its ``tab10`` colour."""
    rgba = np.zeros((*classes.shape, 4))
    if out_channels == 1:
        rgba[classes > 0] = (*FOREGROUND, MASK_ALPHA)
        return rgba
    palette = plt.get_cmap("tab10")
    for value in np.unique(classes):
        if value > 0:
            rgba[classes == value] = (*palette(int(value) % 10)[:3], MASK_ALPHA)
    return rgba


def middle(array: np.ndarray, spatial_dims: int, leading: int) -> np.ndarray:
    """A volume's middle slice along depth (the first spatial axis, after ``leading`` axes)."""
    if spatial_dims == 2:
        return array
    return np.take(array, array.shape[leading] // 2, axis=leading)


def write_overlay(path, title: str, image: np.ndarray, prediction, config) -> None:
    """The overlay of ``image`` (C, *sides) and its ``prediction`` as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = config.spatial_dims
    picture = shown_image(middle(image, dims, 1))
    classes = middle(prediction.classes, dims, 0)
    gates = {name: middle(value, dims, 0) for name, value in prediction.gates.items()}
    panels = 2 + len(gates)
    fig, axes = plt.subplots(1, panels, figsize=(PANEL_INCHES * panels, PANEL_INCHES + 0.4), squeeze=False)
    axes = axes[0]
    where = f" (slice {image.shape[1] // 2} of {image.shape[1]})" if dims == 3 else ""
    axes[0].imshow(picture, interpolation="nearest")
    axes[0].set_title(f"{title}{where}", fontsize=8)
    axes[1].imshow(picture, interpolation="nearest")
    axes[1].imshow(mask_colours(classes, config.out_channels, plt), interpolation="nearest")
    axes[1].set_title(f"mask ({int(np.sum(classes > 0))} px)", fontsize=8)
    for axis, (name, value) in zip(axes[2:], gates.items(), strict=True):
        axis.imshow(value, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        axis.set_title(f"{name} attention", fontsize=8)
    for axis in axes:
        axis.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, format="png")
    plt.close(fig)
