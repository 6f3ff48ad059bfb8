"""Small result containers shared by the detector, the explainers and the benchmark."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

RANDOM_WEIGHTS_BANNER = (
    "RANDOM WEIGHTS: this model was not pretrained, so its scores say nothing about real "
    "defects. Use pretrained weights for meaningful results."
)


@dataclass
class Hotspot:
    """One connected region of the anomaly map above the hotspot threshold.

    ``box`` is ``(x0, y0, x1, y1)`` in pixels of the input image, ``x1``/``y1``
    exclusive. ``peak`` and ``mean`` are the map's z-scores inside the region,
    ``area`` its pixel count and ``area_fraction`` that over the image area.
    """

    box: tuple[int, int, int, int]
    peak: float
    mean: float
    area: int
    area_fraction: float
    centroid: tuple[float, float]


@dataclass
class DetectionResult:
    """What :meth:`winclip_nb.WinCLIP.detect` returns for one image.

    ``anomaly_map`` and ``fg_mask`` are (H, W) at the input image's own resolution, the
    map in robust z-scores. ``branch_maps`` holds the method's maps on the patch grid
    (14 x 14 for ViT-B/16 at 224 px) by name: ``text_map`` and ``nn_map`` (no ``nn_map``
    in zero-shot mode) for the token method, ``zero_shot_map`` and ``few_shot_map`` for
    the windows method; ``fused_map`` is the grid map the post-processing started from.
    ``text_score`` is the image embedding's probability of "anomalous" against the text
    anchors; ``extras`` holds method-specific values (e.g. ``raw_score``).
    """

    anomaly_map: np.ndarray
    score: float
    fused_map: np.ndarray
    fg_mask: np.ndarray
    hotspots: list[Hotspot]
    normalization: str
    random_weights: bool
    branch_maps: dict[str, np.ndarray] = field(default_factory=dict)
    text_score: float | None = None
    method: str = "tokens"
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def text_map(self) -> np.ndarray | None:
        """(h, w) per-patch probability of "anomalous" from the text anchors (tokens)."""
        return self.branch_maps.get("text_map")

    @property
    def nn_map(self) -> np.ndarray | None:
        """(h, w) distance to the nearest normal patch (tokens; None in zero-shot mode)."""
        return self.branch_maps.get("nn_map")
