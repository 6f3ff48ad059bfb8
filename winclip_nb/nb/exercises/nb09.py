"""Exercises of notebook 09 (registered with :func:`winclip_nb.nb.exercises.exercise`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ...core.anomalydino import mean_top_fraction
from ...core.musc import MUSC_INTERVAL, interval_average
from . import as_array, exercise


@exercise(
    "09.interval_size",
    question="of the N - 1 distances of a patch to the other images of a set of N, how many "
    "does MuSc's interval average keep?",
    hint="the smallest 30 % of the N - 1 other images, rounded down (int), and at least one.",
    example=lambda: {"n_images": 20},
    explain=lambda k: f"{k}: a pattern that more than {k} other images share scores as normal.",
)
def _interval_size(n_images: int) -> int:
    return max(int(MUSC_INTERVAL * (n_images - 1)), 1)


@exercise(
    "09.mutual_patch_score",
    question="MuSc's score of one patch, given its distances to the nearest patch of each "
    "other image (`distances`)?",
    hint="sort the distances, keep the smallest int(0.3 * len(distances)) (at least one) and "
    "average them (interval_average).",
    example=lambda: {"distances": [0.9, 0.1, 1.0, 0.95, 0.2, 1.1, 0.97]},
    explain=lambda s: f"{s:.3f}: the few other images that share the pattern make it look normal.",
)
def _mutual_patch_score(distances: Sequence[float]) -> float:
    return float(interval_average(torch.tensor(distances, dtype=torch.float64)[None])[0])


@exercise(
    "09.top_fraction_score",
    question="AnomalyDINO's image score of the patch-distance map `distances`: the mean of its "
    "top `fraction` of patch distances?",
    hint="flatten the map, take the largest max(1, int(N * fraction)) values, average them.",
    example=lambda: {"distances": [[0.1, 0.9, 0.2], [0.3, 0.8, 0.05]], "fraction": 0.34},
    explain=lambda s: f"{s:.4f}: a few outlying patches decide the image score.",
)
def _top_fraction_score(distances: Any, fraction: float) -> float:
    flat = torch.as_tensor(as_array(distances)).flatten()[None]
    return float(mean_top_fraction(flat, fraction)[0])
