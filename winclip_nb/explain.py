"""Explanations of detected anomalies: LLaVA-OneVision or rule-based, report files, CLI.

For every hotspot of a :class:`~winclip_nb.results.DetectionResult` an *explainer* returns
where it is (a 3 x 3 grid of the object), what it looks like (one sentence), how severe it
is (low / medium / high) and a confidence in [0, 1]:

* :class:`RuleBasedExplainer` reads the anomaly map and the pixels: size, contrast against
  a ring around the region, elongation, calibrated z-scores. Instant, no model.
* :class:`LlavaExplainer` shows LLaVA-OneVision a crop of the region with context and the
  whole image with the region outlined, and asks for a JSON answer. Location and
  confidence still come from the map (the language model does not see z-scores).

:func:`detect_and_explain` runs detection and explanation for one image and writes
``{name}_heatmap.png``, ``{name}_boxes.png``, ``{name}_report.txt`` and
``{name}_report.json``; :func:`explain_images` does the same for a batch, loading the
explainer once.

Severity and confidence are read from *calibrated* z-scores (robust sigmas above the
normal images' statistics); see the threshold constants below.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageDraw

from .config import DEFAULT_HOTSPOT_THRESHOLD, DEFAULT_TOP_K
from .data import list_images, load_image, safe_name
from .errors import DataError, ExplainerError
from .results import RANDOM_WEIGHTS_BANNER, DetectionResult, Hotspot

DEFAULT_LLAVA_MODEL = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
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

# --- LLaVA -------------------------------------------------------------------------------
LLAVA_MAX_NEW_TOKENS = 60
#: Context around a region in the crop shown to LLaVA: this fraction of the box side on
#: each side, at least ``CROP_MIN_MARGIN_PX``.
CROP_MARGIN_FRACTION = 0.25
CROP_MIN_MARGIN_PX = 32
LLAVA_PROMPT = (
    "You are inspecting a photo of a {class_name} for manufacturing defects. "
    "The first image is a close-up of a region that an anomaly detector flagged; "
    "the second image shows the whole {class_name} with that region outlined by a red box. "
    "Describe the defect inside the red box in one sentence and rate its severity as "
    'low, medium or high. Answer only with JSON: {{"description": "...", "severity": "..."}}'
)
#: Free-text answers count as a description only with this many distinct words of letters.
MIN_FREE_TEXT_WORDS = 3
MAX_DESCRIPTION_CHARS = 300

# --- report --------------------------------------------------------------------------------
RECOMMENDATIONS = {
    "high": "REJECT: a high-severity defect was found.",
    "medium": "INSPECT: manual inspection recommended.",
    "low": "PASS with note: only low-severity irregularities; spot-check if in doubt.",
    None: "PASS: no anomaly above threshold.",
}
REPORT_TITLE = "ANOMALY DETECTION REPORT"

_LLAVA_CACHE: dict[tuple[str, str, str], tuple[Any, Any]] = {}


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


def _clean_description(text: str | None) -> str | None:
    """Collapse whitespace, strip quotes, cap the length; None unless it holds words."""
    if text is None:
        return None
    text = re.sub(r"\s+", " ", str(text)).strip().strip("\"'`").strip()
    if len(re.findall(r"[A-Za-z]{2,}", text)) < 1:
        return None
    if len(text) > MAX_DESCRIPTION_CHARS:
        text = text[: MAX_DESCRIPTION_CHARS - 3].rstrip() + "..."
    return text


def _looks_like_language(text: str) -> bool:
    """At least MIN_FREE_TEXT_WORDS distinct letter words and >= 80 % plain characters."""
    words = {w.lower() for w in re.findall(r"[A-Za-z]{2,}", text)}
    visible = re.sub(r"\s", "", text)
    if len(words) < MIN_FREE_TEXT_WORDS or not visible:
        return False
    plain = len(re.findall(r"[A-Za-z0-9.,;:'\"()%-]", visible))
    return plain / len(visible) >= 0.8


_SEVERITY_WORDS = r"low|medium|moderate|high|minor|slight|severe|critical|major"


def parse_llava_answer(text: str) -> tuple[str | None, str | None]:
    """``(description, severity)`` from a language model's answer; ``(None, None)`` if unusable.

    Accepted, in this order: a JSON object (inside code fences or prose, keys
    ``description``/``defect`` and ``severity``), labelled lines ``Description: ...
    Severity: ...``, or plain sentences (with a severity only when phrased as
    "high severity" / "severity: high"). Severity is one of low/medium/high or None.

    Example:
        >>> parse_llava_answer('{"description": "A dent.", "severity": "High"}')
        ('A dent.', 'high')
        >>> parse_llava_answer("Description: a scratch near the rim. Severity: moderate")
        ('a scratch near the rim.', 'medium')
        >>> parse_llava_answer("t\\ufffd\\u0444^\\ufffdj")
        (None, None)
    """
    if not text or not text.strip():
        return None, None
    text = text.strip()
    # 1. JSON object somewhere in the text.
    for match in re.finditer(r"\{.*?\}", text, flags=re.DOTALL):
        try:
            obj = json.loads(match.group(0))
        except ValueError:
            continue
        if isinstance(obj, dict):
            lowered = {str(k).strip().lower(): v for k, v in obj.items()}
            raw = next(
                (lowered[k] for k in ("description", "defect", "desc", "answer") if k in lowered),
                None,
            )
            desc = _clean_description(raw if isinstance(raw, str) else None)
            sev_raw = lowered.get("severity")
            sev = _normalise_severity(sev_raw if isinstance(sev_raw, str) else None)
            if desc or sev:
                return desc, sev
    # 2. Labelled fields (also JSON-like text that json.loads rejected, e.g. single quotes).
    label_desc = re.search(
        r"[\"']?description[\"']?\s*[:=\-]\s*(.+?)(?=[\"']?\s*,?\s*[\"']?severity[\"']?\s*[:=\-]|$)",
        text,
        flags=re.IGNORECASE | re.DOTALL,
    )
    label_sev = re.search(
        rf"[\"']?severity[\"']?\s*[:=\-]\s*\**\s*[\"']?({_SEVERITY_WORDS})\b",
        text,
        flags=re.IGNORECASE,
    )
    if label_desc or label_sev:
        desc = _clean_description(label_desc.group(1).rstrip(",}") if label_desc else None)
        sev = _normalise_severity(label_sev.group(1) if label_sev else None)
        if desc or sev:
            return desc, sev
    # 3. Plain sentences.
    if _looks_like_language(text):
        sev_match = re.search(
            rf"\b({_SEVERITY_WORDS})\s+severity\b|\bseverity\s+(?:is\s+|of\s+)?({_SEVERITY_WORDS})\b",
            text,
            flags=re.IGNORECASE,
        )
        sev = _normalise_severity((sev_match.group(1) or sev_match.group(2)) if sev_match else None)
        first_sentence = re.split(r"(?<=[.!?])\s+", text, maxsplit=1)[0]
        return _clean_description(first_sentence), sev
    return None, None


def _sanitise(name: str) -> str:
    """Only letters, digits, ``.``, ``_``, ``-``; no leading dots; never empty."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).lstrip("._-")
    return cleaned or "image"


def safe_stem(name: Any) -> str:
    """File-name-safe stem of an image path (``"image"`` for arrays and PIL images).

    Example:
        >>> safe_stem("../../etc/passwd"), safe_stem("test/crack/003.png"), safe_stem("..")
        ('passwd', '003', 'image')
    """
    if not isinstance(name, (str, Path)):
        return "image"
    return _sanitise(safe_name(Path(str(name)).stem))


def _as_rgb(image: Any) -> np.ndarray:
    """(H, W, 3) uint8 RGB from a path, a PIL image or an array of any mode."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3:
        if image.shape[2] == 3:
            return image
    return load_image(image)


def _region_mask(
    anomaly_map: np.ndarray, fg_mask: np.ndarray | None, box: Sequence[int], threshold: float
) -> np.ndarray:
    """(y1-y0, x1-x0) bool: the 8-connected component above ``threshold`` holding the box's peak.

    Mirrors how hotspots are found (``map > threshold`` inside the foreground); falls back
    to the whole box if nothing there exceeds the threshold.
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
    return labels == peak_label


def region_appearance(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    box: Sequence[int],
    fg_mask: np.ndarray | None = None,
    threshold: float = DEFAULT_HOTSPOT_THRESHOLD,
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

    def __init__(self, threshold: float = DEFAULT_HOTSPOT_THRESHOLD) -> None:
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


def _crop_with_margin(image: np.ndarray, box: Sequence[int]) -> np.ndarray:
    """Box plus ``max(CROP_MIN_MARGIN_PX, CROP_MARGIN_FRACTION * side)`` on each side, clipped."""
    height, width = image.shape[:2]
    x0, y0, x1, y1 = (int(v) for v in box)
    mx = max(CROP_MIN_MARGIN_PX, round(CROP_MARGIN_FRACTION * (x1 - x0)))
    my = max(CROP_MIN_MARGIN_PX, round(CROP_MARGIN_FRACTION * (y1 - y0)))
    return image[max(0, y0 - my) : min(height, y1 + my), max(0, x0 - mx) : min(width, x1 + mx)]


def _image_with_box(image: np.ndarray, box: Sequence[int]) -> Image.Image:
    """The whole image as PIL with ``box`` outlined in red."""
    pil = Image.fromarray(image)
    x0, y0, x1, y1 = (int(v) for v in box)
    line = max(2, round(min(image.shape[:2]) / 150))
    ImageDraw.Draw(pil).rectangle(
        [x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=(255, 0, 0), width=line
    )
    return pil


def _looks_like_local_path(source: str) -> bool:
    """True for anything that cannot be a hub id ``name`` or ``org/name``."""
    return (
        source.startswith((".", "/", "~", "\\"))
        or source.count("/") > 1
        or "\\" in source
        or (len(source) > 1 and source[1] == ":")
    )


def _hub_offline() -> bool:
    return any(
        os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def resolve_llava_source(model_id_or_path: str | Path) -> str:
    """A local folder for ``model_id_or_path``, or the hub id if it must be downloaded.

    A path that does not exist raises :class:`ExplainerError` at once. A hub id is looked
    up in the local Hugging Face cache first (no network); if it is not cached, it fails
    fast too when ``HF_HUB_OFFLINE`` is set or the hub does not answer a quick probe.
    """
    source = str(model_id_or_path)
    local = Path(source).expanduser()
    if local.is_dir():
        return str(local.resolve())
    if local.exists() or _looks_like_local_path(source):
        raise ExplainerError(f"LLaVA model folder {source} does not exist (or is not a folder)")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(source, local_files_only=True)
    except Exception as exc:  # not cached (or huggingface_hub missing)
        if _hub_offline():
            raise ExplainerError(
                f"LLaVA model {source} is not in the local Hugging Face cache and "
                f"HF_HUB_OFFLINE is set ({type(exc).__name__}); download it once with "
                "network access or pass a local folder"
            ) from exc
        # Without this probe an offline machine spends minutes in download retries.
        from .backbone import hub_reachable

        if not hub_reachable():
            raise ExplainerError(
                f"LLaVA model {source} is not in the local Hugging Face cache and the hub "
                "cannot be reached (offline?); download it once with network access or pass "
                "a local folder"
            ) from exc
    return source


def _resolve_device(device: str, model: str | Path) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ExplainerError(
            f"cannot load LLaVA model {model} on device {device!r}: CUDA is not available"
        )
    return str(device)


class LlavaExplainer:
    """Describe hotspots with LLaVA-OneVision (any checkpoint in the hub's llava-hf format).

    Build with :meth:`from_pretrained`; models are cached per (folder, device, dtype), so
    a second explainer for the same model does not load it again.
    """

    def __init__(
        self, model: Any, processor: Any, name: str, device: str, dtype: Any, threshold: float
    ) -> None:
        self.model = model
        self.processor = processor
        self.name = name
        self.device = device
        self.dtype = dtype
        self.rule_based = RuleBasedExplainer(threshold)
        self.max_new_tokens = LLAVA_MAX_NEW_TOKENS

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str | Path,
        device: str = "auto",
        dtype: Any = None,
        threshold: float = DEFAULT_HOTSPOT_THRESHOLD,
    ) -> LlavaExplainer:
        """Load (or reuse) model and processor; float16 on CUDA, float32 on CPU by default.

        Raises :class:`ExplainerError` naming the model and the cause on any failure
        (missing folder, offline hub, missing package, out of memory, ...).
        """
        source = resolve_llava_source(model_id_or_path)  # fails fast before heavy imports
        try:
            import torch
            from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration
        except ImportError as exc:
            raise ExplainerError(
                f"cannot load LLaVA model {model_id_or_path}: {type(exc).__name__}: {exc}"
            ) from exc
        resolved_device = _resolve_device(device, model_id_or_path)
        if dtype is None:
            dtype = torch.float16 if resolved_device.startswith("cuda") else torch.float32
        key = (source, resolved_device, str(dtype))
        if key not in _LLAVA_CACHE:
            if resolved_device == "cpu":
                print(
                    f"Note: LLaVA ({model_id_or_path}) runs on CPU in {str(dtype)[6:]}: "
                    "expect many seconds per region.",
                    file=sys.stderr,
                )
            try:
                processor = AutoProcessor.from_pretrained(source)
                model = LlavaOnevisionForConditionalGeneration.from_pretrained(source, dtype=dtype)
                model = model.to(resolved_device).eval()
            except Exception as exc:
                raise ExplainerError(
                    f"cannot load LLaVA model {model_id_or_path}: {type(exc).__name__}: {exc}"
                ) from exc
            _LLAVA_CACHE[key] = (model, processor)
        model, processor = _LLAVA_CACHE[key]
        return cls(model, processor, f"llava:{model_id_or_path}", resolved_device, dtype, threshold)

    def ask(self, images: Sequence[Image.Image], prompt: str) -> str:
        """Greedy answer (at most ``max_new_tokens``) to ``prompt`` about ``images``."""
        import torch

        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
        conversation = [{"role": "user", "content": content}]
        text = self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        # Nested list: all images belong to one sample (multi-image mode, no anyres tiling).
        inputs = self.processor(images=[list(images)], text=[text], return_tensors="pt")
        inputs = {
            k: (
                v.to(self.device, dtype=self.dtype)
                if torch.is_floating_point(v)
                else v.to(self.device)
            )
            for k, v in inputs.items()
        }
        with torch.inference_mode():
            output = self.model.generate(
                **inputs, do_sample=False, max_new_tokens=self.max_new_tokens
            )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return self.processor.batch_decode(new_tokens, skip_special_tokens=True)[0].strip()

    def explain_region(
        self,
        image: Any,
        result: DetectionResult,
        hotspot: Hotspot,
        class_name: str,
        threshold: float | None = None,
    ) -> dict[str, Any]:
        """Same keys as :meth:`RuleBasedExplainer.explain_region`; description and severity
        from LLaVA when its answer parses, else the rule-based ones (marked in
        ``description_source`` / ``severity_source``)."""
        rgb = _as_rgb(image)
        explanation = self.rule_based.explain_region(rgb, result, hotspot, class_name, threshold)
        crop = Image.fromarray(np.ascontiguousarray(_crop_with_margin(rgb, hotspot.box)))
        overview = _image_with_box(rgb, hotspot.box)
        prompt = LLAVA_PROMPT.format(class_name=_class_words(class_name))
        try:
            answer = self.ask([crop, overview], prompt)
        except Exception as exc:  # generation failed: keep the report, say why
            explanation["description_source"] = (
                f"rule-based (LLaVA failed: {type(exc).__name__}: {exc})"
            )
            return explanation
        description, severity = parse_llava_answer(answer)
        explanation["llava_answer"] = answer
        if description:
            explanation["description"] = description
            explanation["description_source"] = "llava"
        else:
            explanation["description_source"] = "rule-based (unparsable LLaVA answer)"
        if severity:
            explanation["severity"] = severity
            explanation["severity_source"] = "llava"
        return explanation


def load_explainer(
    use_llava: bool | str = "auto",
    llava_model: str | Path = DEFAULT_LLAVA_MODEL,
    device: str = "auto",
    threshold: float = DEFAULT_HOTSPOT_THRESHOLD,
) -> RuleBasedExplainer | LlavaExplainer:
    """The explainer to use.

    ``False``: rule-based. ``True``: LLaVA, or :class:`ExplainerError` naming the model and
    the cause. ``"auto"``: LLaVA if it loads, else a one-line notice on stderr (naming the
    model and the cause, e.g. out of memory) and rule-based.
    """
    if use_llava is False or (isinstance(use_llava, str) and use_llava.lower() in {"no", "off"}):
        return RuleBasedExplainer(threshold)
    if use_llava not in (True, "auto"):
        raise ExplainerError(f"use_llava must be True, False or 'auto', got {use_llava!r}")
    try:
        try:
            return LlavaExplainer.from_pretrained(llava_model, device=device, threshold=threshold)
        except (RuntimeError, MemoryError) as exc:  # torch's OutOfMemoryError is a RuntimeError
            raise ExplainerError(
                f"cannot load LLaVA model {llava_model}: {type(exc).__name__}: {exc}"
            ) from exc
    except ExplainerError as exc:
        if use_llava is True:
            raise
        reason = " ".join(str(exc).split())
        print(f"LLaVA unavailable, using rule-based explanations ({reason})", file=sys.stderr)
        return RuleBasedExplainer(threshold)


# =========================================================================================
# Reports
# =========================================================================================
def recommendation(severity: str | None) -> str:
    """Recommendation for the highest severity found (None: nothing found)."""
    return RECOMMENDATIONS.get(severity, RECOMMENDATIONS["high"])


def format_report(report: dict[str, Any]) -> str:
    """The text report for one image from the report dict built by :func:`detect_and_explain`.

    Sections: title, image / class / score / explainer (and a RANDOM WEIGHTS warning when
    the backbone was not pretrained), ``DETECTED ANOMALIES (N regions)``, ``SUMMARY``.
    """
    regions = report["regions"]
    threshold = float(report.get("threshold", DEFAULT_HOTSPOT_THRESHOLD))
    lines = [REPORT_TITLE, "=" * len(REPORT_TITLE)]
    lines.append(f"Image:          {report.get('image', '')}")
    lines.append(f"Class:          {report.get('class_name', '')}")
    lines.append(f"Anomaly score:  {float(report['score']):.3f}")
    lines.append(f"Explainer:      {report['explainer']}")
    if report.get("random_weights"):
        lines.append(f"WARNING - {RANDOM_WEIGHTS_BANNER}")
    lines.append("")
    heading = f"DETECTED ANOMALIES ({len(regions)} region{'s' if len(regions) != 1 else ''})"
    lines += [heading, "-" * len(heading)]
    if not regions:
        lines.append(f"No anomaly above threshold (z >= {threshold:.1f}).")
    for region in regions:
        x0, y0, x1, y1 = region["box"]
        lines.append(
            f"[{region['id']}] confidence {region['confidence']:.2f} | "
            f"location: {region['location']} | severity: {region['severity']}"
        )
        lines.append(f"    description: {region['description']}")
        if str(region.get("description_source", "")).startswith(f"{RULE_BASED_NAME} ("):
            lines.append(f"    (description source: {region.get('description_source')})")
        lines.append(
            f"    box: ({x0}, {y0}, {x1}, {y1}) | peak z {region['peak_z']:.2f} | "
            f"mean z {region['mean_z']:.2f} | area {100 * region['area_fraction']:.2f}% of image"
        )
    lines.append("")
    lines += ["SUMMARY", "-------"]
    lines.append(f"Max severity:   {report.get('max_severity') or 'none'}")
    lines.append(f"Recommendation: {report.get('recommendation')}")
    if report.get("random_weights"):
        lines.append("(Scores come from random weights and carry no meaning.)")
    return "\n".join(lines) + "\n"


def summary_line(report: dict[str, Any]) -> str:
    """One line per image.

    Example: ``003.png [disc]: score 7.12, 2 regions, max severity high -> REJECT``.
    """
    n = len(report["regions"])
    verdict = str(report.get("recommendation", "")).split(":")[0]
    flag = " [RANDOM WEIGHTS]" if report.get("random_weights") else ""
    return (
        f"{Path(str(report.get('image', 'image'))).name} [{report.get('class_name', '')}]: "
        f"score {float(report['score']):.2f}, {n} region{'s' if n != 1 else ''}, "
        f"max severity {report.get('max_severity') or 'none'} -> {verdict}{flag}"
    )


def _inside(folder: Path, path: Path) -> Path:
    """``path`` if it lies directly in ``folder``; else :class:`DataError`."""
    if path.resolve().parent != folder.resolve():
        raise DataError(f"refusing to write {path}: it is outside the output folder {folder}")
    return path


def write_report_files(
    report: dict[str, Any],
    image: np.ndarray,
    result: DetectionResult,
    out_dir: str | Path,
    name: str,
) -> dict[str, str]:
    """Write the heat map, the boxes figure, the text and the JSON report; return their paths."""
    from matplotlib.figure import Figure

    from .viz import draw_boxes, overlay_heatmap, random_weights_banner, save_figure

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    name = _sanitise(name)
    paths = {
        kind: _inside(folder, folder / f"{name}_{suffix}")
        for kind, suffix in (
            ("heatmap", "heatmap.png"),
            ("boxes", "boxes.png"),
            ("report_txt", "report.txt"),
            ("report_json", "report.json"),
        )
    }
    class_name = report.get("class_name", "")
    fig = Figure(figsize=(6.0, 5.0))
    overlay_heatmap(
        image,
        result.anomaly_map,
        ax=fig.add_subplot(),
        title=f"{class_name} - {name}: score {report['score']:.2f}",
    )
    if report.get("random_weights"):
        random_weights_banner(fig)
    save_figure(fig, paths["heatmap"])

    fig = Figure(figsize=(6.0, 5.0))
    n = len(report["regions"])
    draw_boxes(
        image,
        report["regions"],
        ax=fig.add_subplot(),
        labels=[str(r["id"]) for r in report["regions"]],
        title=f"{class_name} - {name}: {n} region{'s' if n != 1 else ''} "
        f"(z >= {report['threshold']:.1f})",
    )
    if report.get("random_weights"):
        random_weights_banner(fig)
    save_figure(fig, paths["boxes"])

    report["paths"] = {k: str(v) for k, v in paths.items()}
    paths["report_txt"].write_text(report["explanation"], encoding="utf-8")
    paths["report_json"].write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report["paths"]


def explain_result(
    result: DetectionResult,
    image: Any,
    class_name: str,
    explainer: RuleBasedExplainer | LlavaExplainer,
    *,
    image_name: str = "image",
    top_k: int = DEFAULT_TOP_K,
    threshold: float = DEFAULT_HOTSPOT_THRESHOLD,
    random_weights: bool | None = None,
    out_dir: str | Path | None = None,
    file_stem: str | None = None,
) -> dict[str, Any]:
    """Explain the first ``top_k`` hotspots of an existing detection; optionally write files.

    Returns the report dict described in :func:`detect_and_explain`. Files are named
    ``{file_stem}_...`` (default: the safe stem of ``image_name``).
    """
    rgb = _as_rgb(image)
    regions = []
    for index, hotspot in enumerate(result.hotspots[: max(0, int(top_k))]):
        explanation = explainer.explain_region(rgb, result, hotspot, class_name, threshold)
        regions.append(
            {
                "id": index + 1,
                "box": [int(v) for v in hotspot.box],
                "confidence": round(float(explanation["confidence"]), 4),
                "location": explanation["location"],
                "description": explanation["description"],
                "severity": explanation["severity"],
                "peak_z": round(float(hotspot.peak), 4),
                "mean_z": round(float(hotspot.mean), 4),
                "area_fraction": round(float(hotspot.area_fraction), 6),
                "description_source": explanation["description_source"],
                "severity_source": explanation["severity_source"],
                "llava_answer": explanation["llava_answer"],
            }
        )
    worst = max_severity([r["severity"] for r in regions])
    report: dict[str, Any] = {
        "image": image_name,
        "class_name": str(class_name),
        "score": float(result.score),
        "explainer": getattr(explainer, "name", RULE_BASED_NAME),
        "random_weights": bool(result.random_weights if random_weights is None else random_weights),
        "threshold": float(threshold),
        "regions": regions,
        "max_severity": worst,
        "recommendation": recommendation(worst),
        "paths": {},
    }
    report["explanation"] = format_report(report)
    report["summary"] = summary_line(report)
    if out_dir is not None:
        write_report_files(report, rgb, result, out_dir, file_stem or safe_stem(image_name))
    return report


def _winclip_threshold(winclip: Any) -> float:
    config = getattr(winclip, "config", None)
    return float(getattr(config, "hotspot_threshold", DEFAULT_HOTSPOT_THRESHOLD))


def _image_name(image_path: Any) -> str:
    return str(image_path) if isinstance(image_path, (str, Path)) else "image"


def detect_and_explain(
    winclip: Any,
    image_path: Any,
    normal_anchor: Any,
    anomalous_anchor: Any,
    class_name: str,
    use_llava: bool | str = "auto",
    top_k: int = DEFAULT_TOP_K,
    out_dir: str | Path | None = None,
    llava_model: str | Path = DEFAULT_LLAVA_MODEL,
    explainer: RuleBasedExplainer | LlavaExplainer | None = None,
) -> dict[str, Any]:
    """Detect anomalies in one image and explain the ``top_k`` strongest regions.

    Returns ``{"explanation": report text, "regions": [{"id", "box", "confidence",
    "location", "description", "severity", "peak_z", "mean_z", "area_fraction",
    "description_source", "severity_source", "llava_answer"}, ...], "score",
    "explainer": "rule-based" | "llava:<model>", "random_weights", "paths": {"heatmap",
    "boxes", "report_txt", "report_json"} (empty without ``out_dir``), "image",
    "class_name", "threshold", "max_severity", "recommendation", "summary"}``.
    An image without hotspots gets zero regions and a PASS.
    """
    threshold = _winclip_threshold(winclip)
    if explainer is None:
        explainer = load_explainer(use_llava, llava_model, threshold=threshold)
    result = winclip.detect(image_path, normal_anchor, anomalous_anchor, top_k=top_k)
    return explain_result(
        result,
        image_path,
        class_name,
        explainer,
        image_name=_image_name(image_path),
        top_k=top_k,
        threshold=threshold,
        random_weights=bool(result.random_weights or getattr(winclip, "random_weights", False)),
        out_dir=out_dir,
    )


def _unique_names(image_paths: Sequence[Any]) -> list[str]:
    """Safe stems; where two images share a stem, the parent folder is prefixed."""
    stems = [safe_stem(p) for p in image_paths]
    names = []
    for path, stem in zip(image_paths, stems, strict=True):
        if stems.count(stem) > 1 and isinstance(path, (str, Path)):
            stem = safe_stem(f"{Path(path).parent.name}_{stem}")
        names.append(stem)
    # Still clashing (same parent name too): number them.
    return [f"{n}_{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def explain_images(
    winclip: Any,
    image_paths: Sequence[Any],
    normal_anchor: Any,
    anomalous_anchor: Any,
    class_name: str,
    *,
    top_n: int | None = None,
    use_llava: bool | str = "auto",
    top_k: int = DEFAULT_TOP_K,
    out_dir: str | Path | None = None,
    llava_model: str | Path = DEFAULT_LLAVA_MODEL,
    explainer: RuleBasedExplainer | LlavaExplainer | None = None,
) -> list[dict[str, Any]]:
    """Detect all images, keep the ``top_n`` highest scores (all if None), explain each.

    The explainer is loaded once. Reports come most anomalous first, each with a
    ``rank`` (1 = highest score); file names are the images' safe stems (prefixed by
    the parent folder where stems clash, e.g. ``crack_000``).
    """
    image_paths = list(image_paths)
    if not image_paths:
        return []
    threshold = _winclip_threshold(winclip)
    results = winclip.detect(image_paths, normal_anchor, anomalous_anchor, top_k=top_k)
    names = _unique_names(image_paths)
    order = np.argsort([-float(r.score) for r in results], kind="stable")
    if top_n is not None:
        order = order[: max(0, int(top_n))]
    if len(order) and explainer is None:
        explainer = load_explainer(use_llava, llava_model, threshold=threshold)
    reports = []
    for rank, i in enumerate(order, start=1):
        result = results[i]
        report = explain_result(
            result,
            image_paths[i],
            class_name,
            explainer,
            image_name=_image_name(image_paths[i]),
            top_k=top_k,
            threshold=threshold,
            random_weights=bool(result.random_weights or getattr(winclip, "random_weights", False)),
            out_dir=out_dir,
            file_stem=names[i],
        )
        report["rank"] = rank
        reports.append(report)
    return reports


# =========================================================================================
# CLI
# =========================================================================================
def add_explain_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``winclip-nb explain IMAGE [IMAGE ...] --class-name NAME --train-dir DIR
    [--weights openai|PATH|random] [--device auto|cpu|cuda] [--no-llava] [--llava-model ID]
    [--top-k K] --out DIR``."""
    parser.add_argument("images", nargs="+", help="image files to check and explain")
    parser.add_argument("--class-name", required=True, help="object name used in prompts")
    parser.add_argument(
        "--train-dir", required=True, help="folder of normal images for the normal memory"
    )
    parser.add_argument(
        "--weights", default="openai", help="open_clip tag, local checkpoint path, or 'random'"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument(
        "--no-llava", action="store_true", help="skip LLaVA and use rule-based explanations"
    )
    parser.add_argument(
        "--llava-model", default=DEFAULT_LLAVA_MODEL, help="hub id or local folder of LLaVA"
    )
    parser.add_argument(
        "--top-k", type=int, default=DEFAULT_TOP_K, help="regions explained per image"
    )
    parser.add_argument("--out", required=True, help="output folder for figures and reports")


def run_explain_cli(args: argparse.Namespace) -> int:
    """Build WinCLIP and its memory from ``--train-dir``, explain every image, print where
    the files went and one summary line per image. Returns the exit code (0)."""
    from .detector import WinCLIP

    # Paths are checked before the model is built (which takes seconds to minutes).
    missing = [str(path) for path in args.images if not Path(path).is_file()]
    if missing:
        raise DataError(f"image file(s) not found or not a file: {', '.join(missing)}")
    train_images = list_images(args.train_dir)
    if not train_images:
        raise DataError(f"no images found in --train-dir {args.train_dir}")
    winclip = WinCLIP(device=args.device, pretrained=args.weights)
    if getattr(winclip, "random_weights", False):
        print(f"WARNING - {RANDOM_WEIGHTS_BANNER}", file=sys.stderr)
    normal_anchor, anomalous_anchor = winclip.build_text_anchors(args.class_name)
    winclip.build_normal_memory(train_images, normal_anchor, anomalous_anchor)
    reports = explain_images(
        winclip,
        args.images,
        normal_anchor,
        anomalous_anchor,
        args.class_name,
        use_llava=False if args.no_llava else "auto",
        top_k=args.top_k,
        out_dir=args.out,
        llava_model=args.llava_model,
    )
    print(f"Reports written to {args.out}")
    for report in reports:
        print(report["summary"])
        print(f"    {report['paths'].get('report_txt', '')}")
    return 0


__all__ = [
    "DEFAULT_LLAVA_MODEL",
    "ExplainerError",
    "LlavaExplainer",
    "RuleBasedExplainer",
    "add_explain_arguments",
    "confidence_from_z",
    "detect_and_explain",
    "explain_images",
    "explain_result",
    "format_report",
    "load_explainer",
    "location_words",
    "parse_llava_answer",
    "run_explain_cli",
    "severity_from_z",
    "summary_line",
]
