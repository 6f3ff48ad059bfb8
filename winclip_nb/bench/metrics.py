"""Detection and localisation metrics, all returned as fractions in [0, 1].

Image level: AUROC and F1-max of one score per image against its 0/1 label.
Pixel level: AUROC, average precision, F1-max and AUPRO of anomaly maps
``(N, H, W)`` against ground-truth masks ``(N, H, W)`` (a single ``(H, W)``
pair is read as ``N = 1``).

A metric that is undefined for the input (only one class among the labels or
pixels) returns ``nan`` with a :class:`UndefinedMetricWarning` instead of raising.
Shapes that disagree, labels that are not 0/1 and non-finite scores raise
``ValueError``.

Example:
    >>> image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

METRIC_KEYS = ("image_auroc", "pixel_auroc", "pixel_ap", "aupro", "pixel_f1_max", "image_f1_max")
#: AUPRO integrates the per-region-overlap curve from FPR 0 up to this FPR.
DEFAULT_PRO_FPR_LIMIT = 0.3

#: 8-connectivity inside one image, no connection between images of a stack.
_EIGHT_CONNECTED_PER_IMAGE = np.zeros((3, 3, 3), dtype=bool)
_EIGHT_CONNECTED_PER_IMAGE[1] = True


class UndefinedMetricWarning(RuntimeWarning):
    """A metric is undefined for the given input and was returned as ``nan``."""


# --- input checks --------------------------------------------------------------------------


def _undefined(metric: str, reason: str) -> float:
    """Warn that ``metric`` is undefined and return ``nan``."""
    warnings.warn(f"{metric} is undefined: {reason}; returning nan", UndefinedMetricWarning, 4)
    return math.nan


def _binary(labels: np.ndarray, name: str) -> np.ndarray:
    """``labels`` as a bool array; raise ValueError unless every value is 0 or 1."""
    if labels.dtype == bool:
        return labels
    if np.any((labels != 0) & (labels != 1)):
        raise ValueError(
            f"{name} must contain only 0/1 (or bool) values, got dtype {labels.dtype} "
            f"with values such as {np.unique(labels)[:5].tolist()}; binarise it first "
            "(e.g. mask > 127)"
        )
    return labels != 0


def _finite_scores(scores: np.ndarray, name: str) -> np.ndarray:
    """Scores as float32/float64 (other dtypes, e.g. float16, are cast to float32)."""
    if scores.dtype not in (np.float32, np.float64):
        scores = scores.astype(np.float32)
    if not np.isfinite(scores).all():
        raise ValueError(f"{name} contains NaN or inf values ({np.size(scores)} values checked)")
    return scores


def _check_image_level(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Flattened ``(N,)`` bool labels and finite float scores of the same shape."""
    labels_arr, scores_arr = np.asarray(labels), np.asarray(scores)
    if labels_arr.shape != scores_arr.shape:
        raise ValueError(
            f"labels shape {labels_arr.shape} and scores shape {scores_arr.shape} differ"
        )
    return _binary(labels_arr, "labels").ravel(), _finite_scores(scores_arr, "scores").ravel()


def _check_pixel_level(masks: ArrayLike, maps: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """``(N, H, W)`` bool masks and finite float maps of the same shape (2-D -> N = 1)."""
    masks_arr, maps_arr = np.asarray(masks), np.asarray(maps)
    if masks_arr.shape != maps_arr.shape:
        raise ValueError(f"masks shape {masks_arr.shape} and maps shape {maps_arr.shape} differ")
    if masks_arr.ndim == 2:
        masks_arr, maps_arr = masks_arr[None], maps_arr[None]
    if masks_arr.ndim != 3:
        raise ValueError(f"masks and maps must be (N, H, W) or (H, W), got shape {masks_arr.shape}")
    return _binary(masks_arr, "masks"), _finite_scores(maps_arr, "maps")


class _TieGroups(NamedTuple):
    """Scores grouped by (value, class): the input of scikit-learn as weighted samples.

    Ranking metrics only see how many positives and negatives share each score, so
    ``k`` equal scores of one class become one sample of weight ``k``: the result
    is unchanged, and on float16 maps (at most 65536 distinct values) scikit-learn
    sorts at most 2 x 65536 samples instead of every pixel.
    """

    scores: np.ndarray  # (G,) one score per group
    labels: np.ndarray  # (G,) bool class of the group
    counts: np.ndarray  # (G,) float64 number of samples in the group

    def both_classes(self) -> bool:
        return bool(self.labels.any() and not self.labels.all())


def _distinct_counts(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort ``scores`` (a copy the caller owns) in place; return distinct values and counts.

    Example: ``[0.5, 0.1, 0.5]`` -> ``([0.1, 0.5], [1, 2])``.
    """
    scores.sort()
    is_first = np.ones(scores.size, dtype=bool)
    np.not_equal(scores[1:], scores[:-1], out=is_first[1:])
    first = np.flatnonzero(is_first)
    return scores[first], np.diff(np.append(first, scores.size))


def _tie_groups(labels: np.ndarray, scores: np.ndarray) -> _TieGroups:
    """Group flat bool ``labels`` ``(M,)`` and float ``scores`` ``(M,)`` by (score, class)."""
    positive_scores, positive_counts = _distinct_counts(scores[labels])
    negative_scores, negative_counts = _distinct_counts(scores[~labels])
    return _TieGroups(
        scores=np.concatenate([positive_scores, negative_scores]),
        labels=np.repeat([True, False], [positive_scores.size, negative_scores.size]),
        counts=np.concatenate([positive_counts, negative_counts]).astype(np.float64),
    )


# --- metrics on checked, grouped arrays -----------------------------------------------------


def _auroc(groups: _TieGroups, metric: str) -> float:
    if not groups.both_classes():
        return _undefined(metric, "the ground truth holds only one class")
    return float(roc_auc_score(groups.labels, groups.scores, sample_weight=groups.counts))


def _average_precision(groups: _TieGroups, metric: str) -> float:
    if not groups.both_classes():
        return _undefined(metric, "the ground truth holds only one class")
    return float(average_precision_score(groups.labels, groups.scores, sample_weight=groups.counts))


def _f1_max(groups: _TieGroups, metric: str) -> float:
    if not groups.both_classes():
        return _undefined(metric, "the ground truth holds only one class")
    precision, recall, _ = precision_recall_curve(
        groups.labels, groups.scores, sample_weight=groups.counts
    )
    denominator = precision + recall
    f1 = np.divide(
        2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0
    )
    return float(f1.max())


def _aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> float:
    """AUPRO of checked ``(N, H, W)`` bool masks and float maps (see :func:`aupro`).

    The curve has a point at every distinct score t (threshold ``score >= t``).
    Between two consecutive distinct *normal* scores only the PRO changes (a
    vertical step, no area), so the exact curve is fully described by two points
    per distinct normal score u, from the highest down:

    * just above u: ``(FPR(> u), PRO(> u))``; ``FPR(> u)`` is the FPR at the
      previous (higher) normal score, or 0 for the highest one;
    * at u: ``(FPR(>= u), PRO(>= u))``.

    FPR comes from the sorted normal scores, PRO from the anomalous scores sorted
    with their weights ``1 / (region size * number of regions)`` and cumulated,
    both read with ``np.searchsorted``. Only the normal scores whose FPR can lie
    below ``fpr_limit`` are turned into curve points.
    """
    is_anomalous = masks.ravel()
    scores = maps.ravel()
    n_anomalous = int(np.count_nonzero(is_anomalous))
    n_normal = is_anomalous.size - n_anomalous
    if n_anomalous == 0 or n_normal == 0:
        return _undefined("aupro", "the masks hold only one class of pixels")

    # Per-pixel PRO weight of every anomalous pixel (row-major order, like scores[mask]).
    region_ids, n_regions = ndimage.label(masks, structure=_EIGHT_CONNECTED_PER_IMAGE)
    region_of_pixel = region_ids[masks]
    del region_ids
    region_sizes = np.bincount(region_of_pixel)
    weights = 1.0 / (region_sizes[region_of_pixel] * float(n_regions))

    anomalous_scores = scores[is_anomalous]
    order = np.argsort(anomalous_scores, kind="stable")
    anomalous_sorted = anomalous_scores[order]
    weight_below = np.concatenate(([0.0], np.cumsum(weights[order])))  # weight of the first k
    total_weight = weight_below[-1]  # 1 up to rounding

    normal_sorted = scores[~is_anomalous]  # a copy, sorted in place (ascending)
    normal_sorted.sort()
    # Normal scores from the tie group at the limit upwards: FPR(>= first of them) >= limit.
    n_needed = min(n_normal, math.ceil(fpr_limit * n_normal) + 1)
    start = int(np.searchsorted(normal_sorted, normal_sorted[n_normal - n_needed], side="left"))
    tail = normal_sorted[start:]
    first_of_group = np.concatenate(([0], np.flatnonzero(tail[1:] != tail[:-1]) + 1))
    thresholds = tail[first_of_group][::-1]  # distinct normal scores, descending
    fpr_at = (n_normal - start - first_of_group[::-1]) / n_normal  # FPR(>= threshold)
    fpr_above = np.concatenate(([0.0], fpr_at[:-1]))  # FPR(> threshold)
    pro_at = total_weight - weight_below[np.searchsorted(anomalous_sorted, thresholds, "left")]
    pro_above = total_weight - weight_below[np.searchsorted(anomalous_sorted, thresholds, "right")]

    fpr = np.stack([fpr_above, fpr_at], axis=1).ravel()
    pro = np.stack([pro_above, pro_at], axis=1).ravel()
    n_inside = int(np.searchsorted(fpr, fpr_limit, side="right"))  # fpr is non-decreasing
    fpr_cut, pro_cut = fpr[:n_inside], pro[:n_inside]
    if fpr_cut[-1] < fpr_limit:  # the curve crosses the limit between two points: interpolate
        x0, x1, y0, y1 = (
            fpr[n_inside - 1],
            fpr[n_inside],
            pro[n_inside - 1],
            pro[n_inside],
        )
        pro_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        fpr_cut = np.append(fpr_cut, fpr_limit)
        pro_cut = np.append(pro_cut, pro_limit)
    area = np.sum(np.diff(fpr_cut) * (pro_cut[1:] + pro_cut[:-1]) / 2)  # trapezoid rule
    return float(area / fpr_limit)


# --- public metrics ------------------------------------------------------------------------


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve of image scores ``(N,)`` against 0/1 labels ``(N,)``.

    Example:
        >>> image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])  # 3 of 4 pairs ranked right
        0.75
    """
    return _auroc(_tie_groups(*_check_image_level(labels, scores)), "image_auroc")


def f1_max(labels: ArrayLike, scores: ArrayLike) -> float:
    """Best F1 over all thresholds ``score >= t`` (precision-recall curve); any shape.

    Example:
        >>> round(f1_max([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]), 6)  # t = 0.35: P 2/3, R 1
        0.8
    """
    return _f1_max(_tie_groups(*_check_image_level(labels, scores)), "f1_max")


def pixel_auroc(masks: ArrayLike, maps: ArrayLike) -> float:
    """ROC AUC of all pixels: ``masks`` ``(N, H, W)`` bool, ``maps`` ``(N, H, W)`` float."""
    masks_arr, maps_arr = _check_pixel_level(masks, maps)
    return _auroc(_tie_groups(masks_arr.ravel(), maps_arr.ravel()), "pixel_auroc")


def pixel_ap(masks: ArrayLike, maps: ArrayLike) -> float:
    """Average precision of all pixels: ``masks`` ``(N, H, W)`` bool, ``maps`` float."""
    masks_arr, maps_arr = _check_pixel_level(masks, maps)
    return _average_precision(_tie_groups(masks_arr.ravel(), maps_arr.ravel()), "pixel_ap")


def aupro(masks: ArrayLike, maps: ArrayLike, fpr_limit: float = DEFAULT_PRO_FPR_LIMIT) -> float:
    """Normalised area under the per-region-overlap (PRO) curve up to ``fpr_limit``.

    Regions are the 8-connected components of each mask ``(N, H, W)``. At a
    threshold t, FPR is the fraction of all normal pixels with ``map >= t`` and
    PRO the mean over all regions of the fraction of the region's pixels with
    ``map >= t``; every region counts the same, whatever its size. The curve
    (FPR, PRO) over every distinct score is cut at ``fpr_limit`` (interpolated),
    integrated with the trapezoid rule and divided by ``fpr_limit``, so a
    perfect map scores 1. Exact and sort-based (no loop over thresholds).

    Example:
        >>> mask = np.array([[1, 1, 1, 1, 0, 0, 0, 0, 0, 1]], dtype=bool)  # regions of 4 and 1
        >>> amap = np.array([[0.9, 0.9, 0.9, 0.9, 0.5, 0.5, 0.5, 0.5, 0.5, 0.1]])
        >>> aupro(mask, amap)  # PRO is 0.5 up to FPR 1, while pixel recall is 0.8
        0.5
    """
    if not (isinstance(fpr_limit, (int, float)) and 0.0 < fpr_limit <= 1.0):
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit!r}")
    masks_arr, maps_arr = _check_pixel_level(masks, maps)
    return _aupro(masks_arr, maps_arr, float(fpr_limit))


def compute_metrics(
    image_labels: ArrayLike,
    image_scores: ArrayLike,
    masks: ArrayLike,
    maps: ArrayLike,
    fpr_limit: float = DEFAULT_PRO_FPR_LIMIT,
) -> dict[str, float]:
    """Every metric of :data:`METRIC_KEYS` (fractions in [0, 1]; ``nan`` if undefined).

    ``image_labels``/``image_scores`` are ``(N,)``; ``masks``/``maps`` are ``(N, H, W)``
    for the same N images. The pixel arrays are checked and flattened once.
    """
    labels_flat, scores_flat = _check_image_level(image_labels, image_scores)
    masks_arr, maps_arr = _check_pixel_level(masks, maps)
    if labels_flat.size != masks_arr.shape[0]:
        raise ValueError(
            f"image_labels shape {np.shape(image_labels)} does not match masks shape "
            f"{masks_arr.shape} (one label per image)"
        )
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit!r}")
    image_groups = _tie_groups(labels_flat, scores_flat)
    pixel_groups = _tie_groups(masks_arr.ravel(), maps_arr.ravel())
    return {
        "image_auroc": _auroc(image_groups, "image_auroc"),
        "pixel_auroc": _auroc(pixel_groups, "pixel_auroc"),
        "pixel_ap": _average_precision(pixel_groups, "pixel_ap"),
        "aupro": _aupro(masks_arr, maps_arr, float(fpr_limit)),
        "pixel_f1_max": _f1_max(pixel_groups, "pixel_f1_max"),
        "image_f1_max": _f1_max(image_groups, "image_f1_max"),
    }
