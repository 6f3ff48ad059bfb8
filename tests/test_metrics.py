"""Tests of winclip_nb.bench.metrics: hand-computed values and a brute-force AUPRO reference."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from winclip_nb.bench.metrics import (
    DEFAULT_PRO_FPR_LIMIT,
    METRIC_KEYS,
    UndefinedMetricWarning,
    aupro,
    compute_metrics,
    f1_max,
    image_auroc,
    pixel_ap,
    pixel_auroc,
)

# --- brute-force AUPRO reference -------------------------------------------------------------


def brute_force_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> float:
    """AUPRO by binarising at every distinct score and looping over regions explicitly."""
    regions = []  # (image index, region mask)
    for index, mask in enumerate(masks):
        labelled, n_regions = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(index, labelled == region) for region in range(1, n_regions + 1)]
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for threshold in sorted(np.unique(maps), reverse=True):
        predicted = maps >= threshold
        fprs.append((predicted & normal).sum() / normal.sum())
        overlaps = [(predicted[i] & region).sum() / region.sum() for i, region in regions]
        pros.append(float(np.mean(overlaps)))
    # cut at the limit, interpolating between the last point inside and the first outside
    curve = [(x, y) for x, y in zip(fprs, pros, strict=True) if x <= fpr_limit]
    outside = [(x, y) for x, y in zip(fprs, pros, strict=True) if x > fpr_limit]
    if curve[-1][0] < fpr_limit and outside:
        (x0, y0), (x1, y1) = curve[-1], outside[0]
        curve.append((fpr_limit, y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)))
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(curve):
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def random_blob_masks(rng: np.random.Generator, n_images: int, size: int) -> np.ndarray:
    """(n_images, size, size) bool masks, each with 2-4 random rectangles (some may touch)."""
    masks = np.zeros((n_images, size, size), dtype=bool)
    for mask in masks:
        for _ in range(rng.integers(2, 5)):
            top, left = rng.integers(0, size - 2, size=2)
            height, width = rng.integers(1, 6, size=2)
            mask[top : top + height, left : left + width] = True
    return masks


def random_maps(rng: np.random.Generator, masks: np.ndarray, decimals: int | None) -> np.ndarray:
    """Noisy maps that lean towards the masks; rounding to ``decimals`` creates ties."""
    maps = rng.random(masks.shape) + 0.6 * masks * rng.random(masks.shape)
    return maps if decimals is None else np.round(maps, decimals)


# --- image level -----------------------------------------------------------------------------


def test_image_auroc_hand_computed() -> None:
    # positive 0.8 beats both negatives, positive 0.35 beats 0.1 but not 0.4: 3 of 4 pairs
    assert image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    # a tie between a positive and a negative counts one half
    assert image_auroc([0, 1, 0, 1], [0.2, 0.5, 0.5, 0.9]) == pytest.approx(3.5 / 4)
    assert image_auroc(np.array([False, True]), np.array([0.9, 0.1])) == pytest.approx(0.0)


def test_f1_max_hand_computed() -> None:
    # thresholds 0.8: P 1, R 1/2 -> 2/3; 0.4: P 1/2, R 1/2 -> 1/2;
    # 0.35: P 2/3, R 1 -> 4/5; 0.1: P 1/2, R 1 -> 2/3. Best: 4/5.
    assert f1_max([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.8)
    # one positive above four negatives, one below all: t = 0.9 gives P 1, R 1/2 -> 2/3;
    # t = 0.0 gives P 2/6, R 1 -> 1/2. Best: 2/3.
    labels = [1, 0, 0, 0, 0, 1]
    scores = [0.9, 0.5, 0.4, 0.3, 0.2, 0.0]
    assert f1_max(labels, scores) == pytest.approx(2 / 3)


# --- pixel level ------------------------------------------------------------------------------


def test_perfect_and_inverted_maps() -> None:
    rng = np.random.default_rng(0)
    masks = random_blob_masks(rng, 3, 16)
    perfect = np.where(masks, 1.0 + rng.random(masks.shape), rng.random(masks.shape))
    assert pixel_auroc(masks, perfect) == pytest.approx(1.0)
    assert pixel_ap(masks, perfect) == pytest.approx(1.0)
    assert aupro(masks, perfect) == pytest.approx(1.0)
    inverted = -perfect
    assert pixel_auroc(masks, inverted) == pytest.approx(0.0)
    assert aupro(masks, inverted) == pytest.approx(0.0, abs=1e-12)


def brute_force_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """Best F1 over every threshold ``score >= t``, one threshold at a time."""
    best = 0.0
    for threshold in np.unique(scores):
        predicted = scores >= threshold
        true_positives = np.sum(predicted & labels)
        precision, recall = true_positives / predicted.sum(), true_positives / labels.sum()
        if precision + recall > 0:
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


@pytest.mark.parametrize("decimals", [1, 2, None])
def test_pixel_metrics_match_sklearn_on_raw_pixels(decimals: int | None) -> None:
    # the metrics group tied scores into weighted samples; the result must not change
    rng = np.random.default_rng(decimals or 0)
    masks = random_blob_masks(rng, 3, 16)
    maps = random_maps(rng, masks, decimals)
    labels, scores = masks.ravel(), maps.ravel()
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert pixel_ap(masks, maps) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12
    )
    assert f1_max(masks, maps) == pytest.approx(brute_force_f1_max(labels, scores), abs=1e-12)


def test_float16_maps_match_float32() -> None:
    rng = np.random.default_rng(1)
    masks = random_blob_masks(rng, 2, 16)
    maps16 = random_maps(rng, masks, None).astype(np.float16)
    maps32 = maps16.astype(np.float32)
    assert aupro(masks, maps16) == aupro(masks, maps32)
    assert pixel_auroc(masks, maps16) == pixel_auroc(masks, maps32)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fpr_limit", [DEFAULT_PRO_FPR_LIMIT, 0.05, 1.0])
def test_aupro_matches_brute_force_with_ties(seed: int, fpr_limit: float) -> None:
    rng = np.random.default_rng(seed)
    masks = random_blob_masks(rng, 3, 16)
    maps = random_maps(rng, masks, decimals=1)  # ~16 distinct values: many ties
    expected = brute_force_aupro(masks, maps, fpr_limit)
    assert aupro(masks, maps, fpr_limit) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("seed", range(2))
def test_aupro_matches_brute_force_distinct_scores(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    masks = random_blob_masks(rng, 3, 16)
    maps = random_maps(rng, masks, decimals=None)
    expected = brute_force_aupro(masks, maps, DEFAULT_PRO_FPR_LIMIT)
    assert aupro(masks, maps) == pytest.approx(expected, abs=1e-6)


def test_aupro_weights_regions_not_pixels() -> None:
    # region A (4 pixels) scores 0.9, region B (1 pixel, separated by normals) scores 0.1,
    # the 5 normal pixels score 0.5. At t = 0.9: pixel recall 4/5 but PRO = (1 + 0) / 2.
    mask = np.array([[1, 1, 1, 1, 0, 0, 0, 0, 0, 1]], dtype=bool)
    amap = np.array([[0.9, 0.9, 0.9, 0.9, 0.5, 0.5, 0.5, 0.5, 0.5, 0.1]])
    # PRO stays 0.5 from FPR 0 to FPR 1 (t = 0.5), reaching 1 only at t = 0.1
    assert aupro(mask, amap) == pytest.approx(0.5)
    assert aupro(mask, amap, fpr_limit=1.0) == pytest.approx(0.5)
    # pixel AUROC counts pixels: 4 of 5 positives beat every negative
    assert pixel_auroc(mask, amap) == pytest.approx(0.8)


def test_aupro_interpolates_at_the_limit() -> None:
    # one region of 2 pixels (0.9 and 0.3); normals 0.8 0.6 0.4 0.2 (FPR steps of 1/4).
    mask = np.array([[[1, 1, 0, 0, 0, 0]]], dtype=bool)
    amap = np.array([[[0.9, 0.3, 0.8, 0.6, 0.4, 0.2]]])
    # curve: (0, 1/2) (1/4, 1/2) (1/2, 1/2) (3/4, 1/2) (3/4, 1) (1, 1)
    # limit 0.3 -> 0.5; limit 1 -> 0.75 * 0.5 + 0.25 * 1 = 0.625
    assert aupro(mask, amap, fpr_limit=0.3) == pytest.approx(0.5)
    assert aupro(mask, amap, fpr_limit=1.0) == pytest.approx(0.625)
    # a diagonal segment from a tie of a normal and an anomalous pixel: 0.3 -> 0.4
    amap_tie = np.array([[[0.9, 0.4, 0.8, 0.6, 0.4, 0.2]]])
    # curve: (0, .5) (1/4, .5) (1/2, .5) (3/4, 1) (1, 1): area 0.5 * 0.5 + 0.25 * 0.75 + 0.25
    assert aupro(mask, amap_tie, fpr_limit=1.0) == pytest.approx(0.6875)
    # cut at 0.6 lies on the diagonal: PRO(0.6) = 0.5 + 0.5 * 0.1 / 0.25 = 0.7
    expected = (0.5 * 0.5 + 0.1 * (0.5 + 0.7) / 2) / 0.6
    assert aupro(mask, amap_tie, fpr_limit=0.6) == pytest.approx(expected)


def test_eight_connectivity_joins_diagonal_pixels() -> None:
    # (0, 0) and (1, 1) touch diagonally: one region of 2 pixels under 8-connectivity.
    # (3, 3) is a separate region. Detect (0, 0) and (3, 3) first (score 2), normals score 0.
    mask = np.zeros((1, 4, 4), dtype=bool)
    mask[0, 0, 0] = mask[0, 1, 1] = mask[0, 3, 3] = True
    amap = np.zeros((1, 4, 4))
    amap[0, 0, 0], amap[0, 1, 1], amap[0, 3, 3] = 2.0, -1.0, 2.0
    # 8-connected: PRO = (1/2 + 1) / 2 = 0.75 up to FPR 1 (4-connected would give (1 + 0 + 1) / 3)
    assert aupro(mask, amap) == pytest.approx(0.75)


def test_regions_do_not_connect_across_images() -> None:
    # the same pixel in two images is two regions; only the first is detected -> PRO 1/2.
    mask = np.zeros((2, 3, 3), dtype=bool)
    mask[:, 1, 1] = True
    amap = np.zeros((2, 3, 3))
    amap[0, 1, 1], amap[1, 1, 1] = 1.0, -1.0
    assert aupro(mask, amap) == pytest.approx(0.5)


def test_compute_metrics_keys_and_values() -> None:
    rng = np.random.default_rng(7)
    masks = random_blob_masks(rng, 4, 16)
    masks[0] = False  # a normal image
    maps = random_maps(rng, masks, decimals=2).astype(np.float16)
    labels = masks.any(axis=(1, 2))
    scores = maps.reshape(len(maps), -1).max(axis=1)
    result = compute_metrics(labels, scores, masks, maps)
    assert tuple(result) == METRIC_KEYS
    assert result["image_auroc"] == pytest.approx(image_auroc(labels, scores))
    assert result["image_f1_max"] == pytest.approx(f1_max(labels, scores))
    assert result["pixel_auroc"] == pytest.approx(pixel_auroc(masks, maps))
    assert result["pixel_ap"] == pytest.approx(pixel_ap(masks, maps))
    assert result["pixel_f1_max"] == pytest.approx(f1_max(masks, maps))
    assert result["aupro"] == pytest.approx(brute_force_aupro(masks, maps, 0.3), abs=1e-6)
    assert all(0.0 <= value <= 1.0 for value in result.values())


# --- degenerate inputs ------------------------------------------------------------------------


def test_all_normal_masks_give_nan_and_warn() -> None:
    masks = np.zeros((2, 8, 8), dtype=bool)
    maps = np.random.default_rng(0).random(masks.shape)
    for metric in (pixel_auroc, pixel_ap, aupro):
        with pytest.warns(UndefinedMetricWarning, match="only one class"):
            assert math.isnan(metric(masks, maps))
    with pytest.warns(UndefinedMetricWarning):
        result = compute_metrics([0, 1], [0.1, 0.9], masks, maps)
    assert result["image_auroc"] == pytest.approx(1.0)
    assert all(math.isnan(result[key]) for key in ("pixel_auroc", "pixel_ap", "aupro"))


def test_single_class_image_labels_give_nan_and_warn() -> None:
    for metric in (image_auroc, f1_max):
        with pytest.warns(UndefinedMetricWarning, match=metric.__name__):
            assert math.isnan(metric([1, 1, 1], [0.2, 0.5, 0.9]))


def test_all_anomalous_masks_give_nan_aupro() -> None:
    masks = np.ones((1, 4, 4), dtype=bool)
    with pytest.warns(UndefinedMetricWarning):
        assert math.isnan(aupro(masks, np.zeros((1, 4, 4))))


def test_mismatched_shapes_raise_with_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(2, 8, 8\).*\(2, 8, 9\)"):
        pixel_auroc(np.zeros((2, 8, 8), dtype=bool), np.zeros((2, 8, 9)))
    with pytest.raises(ValueError, match=r"\(3,\).*\(4,\)"):
        image_auroc([0, 1, 1], [0.1, 0.2, 0.3, 0.4])
    masks = np.zeros((2, 4, 4), dtype=bool)
    with pytest.raises(ValueError, match=r"image_labels shape \(3,\)"):
        compute_metrics([0, 1, 1], [0.1, 0.2, 0.3], masks, np.zeros((2, 4, 4)))


def test_non_finite_maps_and_bad_inputs_raise() -> None:
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 0, 0] = True
    for bad in (np.nan, np.inf):
        maps = np.zeros((1, 4, 4), dtype=np.float16)
        maps[0, 2, 2] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            aupro(masks, maps)
    with pytest.raises(ValueError, match="0/1"):
        pixel_auroc(masks.astype(np.uint8) * 255, np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(masks, np.zeros((1, 4, 4)), fpr_limit=0.0)


def test_no_warning_on_well_defined_input() -> None:
    rng = np.random.default_rng(3)
    masks = random_blob_masks(rng, 2, 16)
    maps = random_maps(rng, masks, decimals=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compute_metrics([0, 1], [0.2, 0.7], masks, maps)
