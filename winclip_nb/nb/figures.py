"""Figures: heat-map overlays, numbered region boxes, maps side by side.

Every function draws on a given ``ax`` (or a new figure) and returns the matplotlib
object it made; none calls ``plt.show()``. Code that only saves files (reports, the CLI)
should pass axes of a :class:`matplotlib.figure.Figure` built directly, which never
touches pyplot's global state or backend::

    fig = Figure(figsize=(6, 5))
    ax = fig.add_subplot()
    overlay_heatmap(image, anomaly_map, ax=ax, title="disc 003: 7.1")
    save_figure(fig, "003_heatmap.png")
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.text import Text
from PIL import Image

from ..core.config import DEFAULTS
from ..core.results import RANDOM_WEIGHTS_BANNER, Hotspot

#: Colour maps of the notebook series, one convention (stated in notebook 00):
#: the final anomaly map drawn over its image (overlay_heatmap, report files, the explorer);
OVERLAY_CMAP = "jet"
#: raw maps on their own scale, i.e. probabilities, distances, similarities, counts
#: (drawn with a fixed range, or the range printed);
MAP_CMAP = "viridis"
#: signed z-scores, on a range symmetric around 0 (white = the normal median);
Z_CMAP = "coolwarm"
#: grayscale is for images and masks only.
MASK_CMAP = "gray"
DEFAULT_CMAP = OVERLAY_CMAP  # the older name of OVERLAY_CMAP
DEFAULT_ALPHA = 0.5
#: Upper end of the colour scale for z-score maps is at least this many robust sigmas,
#: so a normal image (max z ~ 2) stays blue instead of being stretched to full red.
MIN_Z_DISPLAY_MAX = 2.0 * DEFAULTS.hotspot_threshold
BOX_COLOUR = "red"
BOX_LINEWIDTH = 2.0
DEFAULT_DPI = 120


def _as_image_array(image: Any) -> np.ndarray:
    """(H, W, 3) or (H, W) array from an array, a PIL image or a file path."""
    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            return np.asarray(im.convert("RGB"))
    return np.asarray(image)


def _new_axes(ax: Axes | None, figsize: tuple[float, float] = (6.0, 5.0)) -> Axes:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt  # only here: a notebook asking for a new figure

    _, ax = plt.subplots(figsize=figsize)
    return ax


def _map_to_image_size(anomaly_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an (h, w) map to (H, W) if the sizes differ."""
    anomaly_map = np.asarray(anomaly_map, dtype=np.float32)
    if anomaly_map.shape[:2] == tuple(shape):
        return anomaly_map
    return cv2.resize(anomaly_map, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)


def default_z_range(anomaly_map: np.ndarray) -> tuple[float, float]:
    """Colour range for a z-score map: ``(0, max(map max, MIN_Z_DISPLAY_MAX))``.

    Example:
        >>> default_z_range(np.array([[0.5, 2.0]]))
        (0.0, 6.0)
    """
    finite = np.asarray(anomaly_map)[np.isfinite(anomaly_map)]
    top = float(finite.max()) if finite.size else 1.0
    return 0.0, max(top, MIN_Z_DISPLAY_MAX)


def overlay_heatmap(
    image: Any,
    anomaly_map: np.ndarray,
    ax: Axes | None = None,
    alpha: float = DEFAULT_ALPHA,
    vmin: float | None = None,
    vmax: float | None = None,
    colorbar: bool = True,
    title: str | None = None,
    cmap: str = DEFAULT_CMAP,
) -> Axes:
    """Draw ``image`` (H, W[, 3]) with ``anomaly_map`` (h, w) blended on top; return the axes.

    The map is resized to the image if needed. The colour range defaults to
    :func:`default_z_range`; the colour bar is labelled in robust sigmas (z).
    """
    ax = _new_axes(ax)
    image = _as_image_array(image)
    z_map = _map_to_image_size(anomaly_map, image.shape[:2])
    low, high = default_z_range(z_map)
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
    heat = ax.imshow(
        z_map,
        cmap=cmap,
        alpha=alpha,
        vmin=low if vmin is None else vmin,
        vmax=high if vmax is None else vmax,
    )
    if colorbar:
        ax.figure.colorbar(heat, ax=ax, fraction=0.046, pad=0.04, label="anomaly z-score")
    if title:
        ax.set_title(title)
    ax.set_axis_off()
    return ax


def _box_of(item: Any) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` from a Hotspot, a dict with ``"box"`` or a 4-sequence."""
    if isinstance(item, Hotspot):
        return tuple(int(v) for v in item.box)  # type: ignore[return-value]
    if isinstance(item, Mapping):
        item = item["box"]
    x0, y0, x1, y1 = (int(v) for v in item)
    return x0, y0, x1, y1


def draw_boxes(
    image: Any,
    hotspots_or_boxes: Sequence[Any],
    ax: Axes | None = None,
    labels: bool | Sequence[str] = True,
    colour: str = BOX_COLOUR,
    linewidth: float = BOX_LINEWIDTH,
    title: str | None = None,
) -> Axes:
    """Draw ``image`` with one rectangle per Hotspot / region dict / ``(x0, y0, x1, y1)``.

    ``labels=True`` numbers the boxes 1, 2, ... in order; a list of strings labels them
    with those; ``False`` draws no labels. Box corners are pixel edges (x1/y1 exclusive).
    """
    ax = _new_axes(ax)
    image = _as_image_array(image)
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
    if labels is True:
        texts: Sequence[str] | None = [str(i + 1) for i in range(len(hotspots_or_boxes))]
    elif labels is False:
        texts = None
    else:
        texts = list(labels)
    for i, item in enumerate(hotspots_or_boxes):
        x0, y0, x1, y1 = _box_of(item)
        ax.add_patch(
            Rectangle(
                (x0 - 0.5, y0 - 0.5),
                x1 - x0,
                y1 - y0,
                fill=False,
                edgecolor=colour,
                linewidth=linewidth,
            )
        )
        if texts is not None and i < len(texts):
            ax.text(
                x0,
                y0 - 1,
                texts[i],
                color="white",
                fontsize=9,
                fontweight="bold",
                va="bottom",
                bbox={"facecolor": colour, "edgecolor": "none", "pad": 1.5},
            )
    if title:
        ax.set_title(title)
    ax.set_axis_off()
    return ax


def show_maps(
    images_dict: Mapping[str, Any],
    cmap: str = DEFAULT_CMAP,
    vmin: float | None = None,
    vmax: float | None = None,
    colorbar: bool = True,
    panel_size: float = 3.0,
    suptitle: str | None = None,
) -> Figure:
    """One row of panels titled by the dict keys; return the figure.

    Values with three channels are shown as images; 2-D values as maps with ``cmap``
    (each with its own colour range unless ``vmin``/``vmax`` are given).
    """
    import matplotlib.pyplot as plt

    n = max(len(images_dict), 1)
    fig, axes = plt.subplots(1, n, figsize=(panel_size * n, panel_size), squeeze=False)
    for ax, (name, value) in zip(axes[0], images_dict.items(), strict=False):
        array = _as_image_array(value)
        if array.ndim == 3:
            ax.imshow(array)
        else:
            shown = ax.imshow(array.astype(np.float32), cmap=cmap, vmin=vmin, vmax=vmax)
            if colorbar:
                fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
        ax.set_title(name)
        ax.set_axis_off()
    if suptitle:
        fig.suptitle(suptitle)
    return fig


def random_weights_banner(fig: Figure, text: str = RANDOM_WEIGHTS_BANNER) -> Text:
    """Write the RANDOM WEIGHTS warning across the bottom of ``fig``; return the text artist."""
    return fig.text(
        0.5,
        0.01,
        text,
        ha="center",
        va="bottom",
        wrap=True,
        fontsize=8,
        color="white",
        bbox={"facecolor": "darkred", "edgecolor": "none", "pad": 3},
    )


def save_figure(fig: Figure, path: str | Path, dpi: int = DEFAULT_DPI, close: bool = False) -> Path:
    """Save ``fig`` as PNG (or any suffix matplotlib knows) to ``path``; return the path.

    Parent folders are created; the file is written whole or not at all
    (:func:`~winclip_nb.data.files.atomic_write`, a full disk raises ``StorageError``).
    ``close=True`` also releases a pyplot-managed figure.
    """
    from ..data.files import atomic_write

    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight")
    atomic_write(path, buffer.getvalue())
    if close:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return path
