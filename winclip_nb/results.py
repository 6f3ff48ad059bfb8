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

    def to_dict(self) -> dict[str, Any]:
        return {
            "box": [int(v) for v in self.box],
            "peak": round(float(self.peak), 4),
            "mean": round(float(self.mean), 4),
            "area": int(self.area),
            "area_fraction": round(float(self.area_fraction), 6),
            "centroid": [round(float(v), 2) for v in self.centroid],
        }


@dataclass
class DetectionResult:
    """What :meth:`winclip_nb.WinCLIP.detect` returns for one image.

    Shapes: ``anomaly_map`` and ``fg_mask`` are (H, W) at the input image's own
    resolution; ``text_map``, ``nn_map`` and ``fused_map`` are (h, w) on the
    model's patch grid (14 x 14 for ViT-B/16 at 224 px). ``nn_map`` is ``None``
    in zero-shot mode (no normal memory).
    """

    anomaly_map: np.ndarray
    score: float
    text_map: np.ndarray
    nn_map: np.ndarray | None
    fused_map: np.ndarray
    fg_mask: np.ndarray
    hotspots: list[Hotspot]
    text_score: float
    normalization: str
    random_weights: bool
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the input image."""
        return tuple(self.anomaly_map.shape[:2])  # type: ignore[return-value]
