"""Exercises of notebook 06 (registered with :func:`winclip_nb.nb.exercises.exercise`)."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from ...bench.metrics import image_auroc
from . import exercise


@exercise(
    "06.auroc_by_pairs",
    question="what fraction of the (defective, good) image pairs rank the defective image "
    "higher (ties count 1/2)? That is the image AUROC.",
    hint="split the scores by label, compare every defective score with every good score "
    "(broadcast: d[:, None] > g[None, :]), add half of the ties and take the mean.",
    example=lambda: {"scores": [0.1, 0.4, 0.35, 0.8, 0.4], "labels": [0, 0, 1, 1, 1]},
    explain=lambda expected: f"the AUROC is {expected:.4f}: a randomly drawn defective image "
    f"outscores a randomly drawn good one with probability {expected:.2f}.",
)
def _auroc_by_pairs(scores: Any, labels: Any) -> float:
    return image_auroc(labels, scores)  # the package's metric: the same number as by pairs


@exercise(
    "06.f1_at_threshold",
    question="flag every image whose score is >= threshold as defective: what is the F1 of "
    "these flags against the labels?",
    hint="tp = flagged and defective, fp = flagged and good, fn = missed defective; "
    "F1 = 2 tp / (2 tp + fp + fn).",
    example=lambda: {"scores": [0.1, 0.4, 0.35, 0.8, 0.6], "labels": [0, 0, 1, 1, 0],
                     "threshold": 0.35},
    explain=lambda expected: f"F1 is {expected:.4f} at this one threshold; F1-max in the "
    "table is the best such value over every threshold, so it is at least this.",
)
def _f1_at_threshold(scores: Any, labels: Any, threshold: float) -> float:
    flagged = np.asarray(scores, dtype=float) >= threshold
    defective = np.asarray(labels) == 1
    tp = np.count_nonzero(flagged & defective)
    fp = np.count_nonzero(flagged & ~defective)
    fn = np.count_nonzero(~flagged & defective)
    return float(2 * tp / (2 * tp + fp + fn)) if tp else 0.0


def _toy_regions() -> dict[str, Any]:
    mask = np.zeros((8, 12), dtype=bool)
    mask[1:6, 1:6] = True  # a large region of 25 pixels
    mask[6, 10] = True  # a small one of 1 pixel
    predicted = np.zeros_like(mask)
    predicted[1:6, 1:4] = True  # 15 of the large region's 25 pixels, none of the small one
    return {"mask": mask, "predicted": predicted}


@exercise(
    "06.region_overlap",
    question="what is the per-region overlap (PRO) of the predicted mask: the mean over the "
    "8-connected defect regions of the fraction of each region's pixels that are predicted?",
    hint="label the regions with scipy.ndimage.label(mask, structure=np.ones((3, 3))), "
    "then average (predicted[regions == r].mean()) over r = 1 .. number of regions.",
    example=_toy_regions,
    explain=lambda expected: f"the PRO is {expected:.4f}: every region counts the same, "
    "however many pixels it has.",
)
def _region_overlap(mask: Any, predicted: Any) -> float:
    mask, predicted = np.asarray(mask, dtype=bool), np.asarray(predicted, dtype=bool)
    regions, n_regions = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n_regions == 0:
        return float("nan")
    return float(np.mean(ndimage.mean(predicted, regions, index=np.arange(1, n_regions + 1))))
