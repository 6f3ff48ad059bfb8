"""The rule-based explainer: location, size, contrast and shape words from the map and the
pixels, severity and confidence from calibrated z-scores (notebook 05).

For every hotspot of a :class:`~winclip_nb.core.results.DetectionResult` an explainer
returns where it is (a 3 x 3 grid of the object), what it looks like (one sentence), how
severe it is (low / medium / high) and a confidence in [0, 1]. This one reads the anomaly
map and the pixels: size, contrast against a ring around the region, elongation. Instant,
no model. Severity and confidence are read from *calibrated* z-scores (robust sigmas
above the normal images' statistics); see the threshold constants below.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
from scipy.ndimage import binary_fill_holes

from ..core.config import DEFAULTS
from ..core.results import DetectionResult, Hotspot
from ..data.images import load_image

RULE_BASED_NAME = "rule-based"

# --- severity and confidence from calibrated z-scores ---------------------------------
#: ``high`` when the peak reaches this many robust sigmas ...
HIGH_PEAK_Z = 8.0

#: ... or the region covers at least this fraction of the image.
HIGH_AREA_FRACTION = 0.05

#: ``medium`` when the peak reaches this ...
MEDIUM_PEAK_Z = 5.0

#: ... or the mean over the region does (a broad, uniformly raised plateau).
MEDIUM_MEAN_Z = 4.0

SEVERITY_LEVELS = ("low", "medium", "high")

#: Confidence is the logistic ``1 / (1 + exp(-(peak - MID) / SCALE))``: 0.5 at z = 5,
#: 0.21 at the hotspot threshold z = 3, 0.88 at z = 8.
CONFIDENCE_MID_Z = 5.0

CONFIDENCE_SCALE_Z = 1.5

# --- words for the rule-based description ----------------------------------------------
#: Area fraction of the image below which a region is "small", at or above which "large".
SMALL_AREA_FRACTION = 0.005

LARGE_AREA_FRACTION = 0.03

#: Contrast compares the tails of the grey levels (0-255): how much darker the region's
#: ``TAIL_PERCENT``-th percentile is than the surrounding ring's, and how much brighter its
#: (100 - ``TAIL_PERCENT``)-th percentile is. Tails, not means: the thresholded region is
#: wider than the defect (the map is smoothed), so a small dark hole barely moves the mean.
#: The ring has the same texture and noise, so normal texture cancels out.
TAIL_PERCENT = 2.0

#: Below ``CONTRAST_MIN_GREY`` the region is neither darker nor brighter.
CONTRAST_MIN_GREY = 8.0

MODERATE_CONTRAST_GREY = 20.0

HIGH_CONTRAST_GREY = 40.0

#: Ring around the region used as "surroundings": this fraction of the box's longer side,
#: at least ``RING_MIN_PX`` pixels wide.
RING_WIDTH_FRACTION = 0.25

RING_MIN_PX = 4

#: Ratio of the principal axes of the region (sqrt of the coordinate covariance's
#: eigenvalues): from ``ELONGATED_RATIO`` up "elongated, scratch-like", from
#: ``OBLONG_RATIO`` up "oblong", below "compact, spot-like".
ELONGATED_RATIO = 3.0

OBLONG_RATIO = 1.8

GRID_ROWS = ("top", "centre", "bottom")

GRID_COLS = ("left", "centre", "right")


# =========================================================================================
# Pure helpers
# =========================================================================================
def location_words(
    box: Sequence[int], fg_mask: np.ndarray | None, image_shape: Sequence[int] | None = None
) -> str:
    """Cell of a 3 x 3 grid over the object's foreground bounding box holding the box centre.

    ``box`` is ``(x0, y0, x1, y1)`` (x1/y1 exclusive); ``fg_mask`` is (H, W) bool. An empty
    mask, or ``None`` with ``image_shape`` (H, W), means the whole image (textures). Rows
    top/centre/bottom, columns left/centre/right; the middle cell is just ``"centre"``.

    Example:
        >>> fg = np.zeros((90, 90), bool); fg[30:90, 30:90] = True
        >>> location_words((30, 30, 40, 40), fg), location_words((55, 55, 65, 65), fg)
        ('top left', 'centre')
        >>> location_words((30, 30, 40, 40), None, (90, 90))
        'centre'
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    if fg_mask is not None and np.any(fg_mask):
        rows = np.flatnonzero(np.any(fg_mask, axis=1))
        cols = np.flatnonzero(np.any(fg_mask, axis=0))
        fx0, fx1, fy0, fy1 = cols[0], cols[-1] + 1, rows[0], rows[-1] + 1
    else:
        shape = fg_mask.shape if fg_mask is not None else image_shape
        if shape is None:
            raise ValueError("location_words needs fg_mask or image_shape to know the extent")
        fx0, fy0, fy1, fx1 = 0, 0, int(shape[0]), int(shape[1])
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    col = int(np.clip(np.floor(3.0 * (cx - fx0) / max(fx1 - fx0, 1)), 0, 2))
    row = int(np.clip(np.floor(3.0 * (cy - fy0) / max(fy1 - fy0, 1)), 0, 2))
    if row == 1 and col == 1:
        return "centre"
    return f"{GRID_ROWS[row]} {GRID_COLS[col]}"


def severity_from_z(peak_z: float, mean_z: float, area_fraction: float) -> str:
    """``high`` / ``medium`` / ``low`` from calibrated z-scores and the region's area.

    high: ``peak >= HIGH_PEAK_Z`` (8) or ``area_fraction >= HIGH_AREA_FRACTION`` (5 %);
    medium: ``peak >= MEDIUM_PEAK_Z`` (5) or ``mean >= MEDIUM_MEAN_Z`` (4); else low.

    Example:
        >>> severity_from_z(9.0, 4.0, 0.001), severity_from_z(5.5, 3.5, 0.001)
        ('high', 'medium')
        >>> severity_from_z(3.5, 3.2, 0.06), severity_from_z(3.5, 3.2, 0.001)
        ('high', 'low')
    """
    if peak_z >= HIGH_PEAK_Z or area_fraction >= HIGH_AREA_FRACTION:
        return "high"
    if peak_z >= MEDIUM_PEAK_Z or mean_z >= MEDIUM_MEAN_Z:
        return "medium"
    return "low"


def confidence_from_z(peak_z: float) -> float:
    """Logistic confidence in [0, 1] from the region's peak z-score.

    Example:
        >>> confidence_from_z(5.0), round(confidence_from_z(8.0), 3)
        (0.5, 0.881)
    """
    return float(1.0 / (1.0 + math.exp(-(float(peak_z) - CONFIDENCE_MID_Z) / CONFIDENCE_SCALE_Z)))


def size_word(area_fraction: float) -> str:
    """``small`` (< 0.5 % of the image), ``medium`` (< 3 %) or ``large``.

    Example:
        >>> size_word(0.001), size_word(0.01), size_word(0.2)
        ('small', 'medium', 'large')
    """
    if area_fraction < SMALL_AREA_FRACTION:
        return "small"
    if area_fraction < LARGE_AREA_FRACTION:
        return "medium"
    return "large"


def max_severity(severities: Sequence[str]) -> str | None:
    """The highest of ``low < medium < high``; ``None`` for an empty list.

    Example:
        >>> max_severity(["low", "high", "medium"]), max_severity([])
        ('high', None)
    """
    known = [s for s in severities if s in SEVERITY_LEVELS]
    return max(known, key=SEVERITY_LEVELS.index) if known else None


def _normalise_severity(word: str | None) -> str | None:
    """Map a severity word (any case, synonyms) to low/medium/high, else None."""
    if not word:
        return None
    word = word.strip().strip("\"'*.").lower()
    synonyms = {
        "low": "low",
        "minor": "low",
        "slight": "low",
        "medium": "medium",
        "moderate": "medium",
        "mid": "medium",
        "high": "high",
        "severe": "high",
        "critical": "high",
        "major": "high",
    }
    return synonyms.get(word)


def _as_rgb(image: Any) -> np.ndarray:
    """(H, W, 3) uint8 RGB from a path, a PIL image or an array of any mode."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3:
        if image.shape[2] == 3:
            return image
    return load_image(image)


def _region_mask(
    anomaly_map: np.ndarray, fg_mask: np.ndarray | None, box: Sequence[int], threshold: float
) -> np.ndarray:
    """(y1-y0, x1-x0) bool: the 8-connected component above ``threshold`` holding the box's
    peak, with the holes it encloses filled.

    Mirrors how hotspots are found (``map > threshold`` inside the foreground); falls back
    to the whole box if nothing there exceeds the threshold. Enclosed holes belong to the
    region: a dark hole in a part often scores *below* the threshold at its centre (it
    matches background patches of the normal images), so the hotspot is a ring around it,
    and describing the ring alone would call a black hole "low-contrast".
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    values = np.asarray(anomaly_map[y0:y1, x0:x1], dtype=np.float32)
    above = values > threshold
    if fg_mask is not None:
        above &= np.asarray(fg_mask[y0:y1, x0:x1], dtype=bool)
    if not above.any():
        return np.ones_like(values, dtype=bool)
    _, labels = cv2.connectedComponents(above.astype(np.uint8), connectivity=8)
    peak_label = labels.flat[int(np.argmax(np.where(above, values, -np.inf)))]
    return binary_fill_holes(labels == peak_label)


def region_appearance(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    box: Sequence[int],
    fg_mask: np.ndarray | None = None,
    threshold: float = DEFAULTS.hotspot_threshold,
) -> dict[str, Any]:
    """Grey-level contrast and shape of one region.

    Args:
        image: (H, W, 3) uint8 RGB.
        anomaly_map: (H, W) z-scores.
        box: ``(x0, y0, x1, y1)`` of the hotspot.

    Returns:
        ``contrast`` (grey levels 0-255, negative = darker: see ``TAIL_PERCENT``), ``elongation``
        (principal-axis ratio >= 1) and the words ``tone`` ("darker" / "brighter" /
        "similar"), ``contrast_word`` and ``shape_word``.
    """
    height, width = anomaly_map.shape[:2]
    grey = cv2.cvtColor(_as_rgb(image), cv2.COLOR_RGB2GRAY).astype(np.float32)
    if grey.shape != (height, width):
        grey = cv2.resize(grey, (width, height), interpolation=cv2.INTER_AREA)
    x0, y0, x1, y1 = (int(v) for v in box)
    region = _region_mask(anomaly_map, fg_mask, box, threshold)

    ring_px = max(RING_MIN_PX, round(RING_WIDTH_FRACTION * max(x1 - x0, y1 - y0)))
    wx0, wy0 = max(0, x0 - ring_px), max(0, y0 - ring_px)
    wx1, wy1 = min(width, x1 + ring_px), min(height, y1 + ring_px)
    inside = np.zeros((wy1 - wy0, wx1 - wx0), dtype=np.uint8)
    inside[y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0] = region
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * ring_px + 1, 2 * ring_px + 1))
    ring = cv2.dilate(inside, kernel).astype(bool) & ~inside.astype(bool)
    window_grey = grey[wy0:wy1, wx0:wx1]
    # Surroundings: the ring, outside any anomalous pixel, inside the object if possible.
    clean_ring = ring & (anomaly_map[wy0:wy1, wx0:wx1] <= threshold)
    if fg_mask is not None:
        on_object = clean_ring & np.asarray(fg_mask[wy0:wy1, wx0:wx1], dtype=bool)
        clean_ring = on_object if on_object.any() else clean_ring
    ring = clean_ring if clean_ring.any() else ring
    tails = (TAIL_PERCENT, 100.0 - TAIL_PERCENT)
    inside_low, inside_high = np.percentile(window_grey[inside.astype(bool)], tails)
    ring_low, ring_high = (
        np.percentile(window_grey[ring], tails) if ring.any() else (inside_low, inside_high)
    )
    darker_by, brighter_by = float(ring_low - inside_low), float(inside_high - ring_high)
    contrast = brighter_by if brighter_by > darker_by else -darker_by

    ys, xs = np.nonzero(region)
    if ys.size >= 2:
        # A one-pixel line has variance 1/12 across it: the floor of the minor axis.
        eig = np.linalg.eigvalsh(np.cov(np.stack([xs, ys]).astype(np.float64)))
        eig = np.maximum(eig, 1.0 / 12.0)
        elongation = float(np.sqrt(eig[-1] / eig[0]))
    else:
        elongation = 1.0

    magnitude = abs(contrast)
    if magnitude < CONTRAST_MIN_GREY:
        tone = "similar"
    else:
        tone = "darker" if contrast < 0 else "brighter"
    if magnitude >= HIGH_CONTRAST_GREY:
        contrast_word = "high-contrast"
    elif magnitude >= MODERATE_CONTRAST_GREY:
        contrast_word = "moderate-contrast"
    else:
        contrast_word = "low-contrast"
    if elongation >= ELONGATED_RATIO:
        shape_word = "elongated scratch-like mark"
    elif elongation >= OBLONG_RATIO:
        shape_word = "oblong mark"
    else:
        shape_word = "compact spot-like irregularity"
    return {
        "contrast": contrast,
        "elongation": elongation,
        "tone": tone,
        "contrast_word": contrast_word,
        "shape_word": shape_word,
    }


def _class_words(class_name: str) -> str:
    """``"metal_nut"`` -> ``"metal nut"`` for use in sentences."""
    return re.sub(r"[_\s]+", " ", str(class_name)).strip() or "object"


# =========================================================================================
# Explainers
# =========================================================================================
class RuleBasedExplainer:
    """Describe a hotspot from the anomaly map and the pixels alone (no language model)."""

    name = RULE_BASED_NAME

    def __init__(self, threshold: float = DEFAULTS.hotspot_threshold) -> None:
        self.threshold = float(threshold)

    def explain_region(
        self,
        image: Any,
        result: DetectionResult,
        hotspot: Hotspot,
        class_name: str,
        threshold: float | None = None,
    ) -> dict[str, Any]:
        """``location``, ``description``, ``severity``, ``confidence`` of one hotspot.

        Also ``description_source``/``severity_source`` (``"rule-based"``) and
        ``llava_answer`` (None), so every explainer returns the same keys.
        """
        threshold = self.threshold if threshold is None else float(threshold)
        location = location_words(hotspot.box, result.fg_mask, result.anomaly_map.shape)
        look = region_appearance(
            _as_rgb(image), result.anomaly_map, hotspot.box, result.fg_mask, threshold
        )
        where = "in the centre" if location == "centre" else f"at the {location}"
        if look["tone"] == "similar":
            tone = "with little change in brightness (a texture or shape difference)"
        else:
            tone = f"{look['tone']} than its surroundings"
        description = (
            f"a {size_word(hotspot.area_fraction)} {look['contrast_word']} {look['shape_word']} "
            f"{where} of the {_class_words(class_name)}, {tone}"
        )
        return {
            "location": location,
            "description": description,
            "severity": severity_from_z(hotspot.peak, hotspot.mean, hotspot.area_fraction),
            "confidence": confidence_from_z(hotspot.peak),
            "description_source": RULE_BASED_NAME,
            "severity_source": RULE_BASED_NAME,
            "llava_answer": None,
        }
