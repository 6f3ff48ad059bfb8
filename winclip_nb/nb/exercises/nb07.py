"""Exercises of notebook 07 (registered with :func:`winclip_nb.nb.exercises.exercise`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...core.windows import harmonic_mean, window_indices
from . import exercise


@exercise(
    "07.harmonic_patch_score",
    question="the harmonic mean of the window scores [0.9, 0.9, 0.1, 0.1] of one patch?",
    hint="n / (1/x1 + ... + 1/xn); the two low windows dominate.",
    example=lambda: {"scores": [0.8, 0.2, 0.5]},
    explain=lambda h: f"{h:.3f}, far below the arithmetic mean: low windows dominate.",
)
def _harmonic_patch_score(scores: Sequence[float]) -> float:
    return float(harmonic_mean(torch.tensor(scores, dtype=torch.float64)[:, None])[0])


@exercise(
    "07.windows_per_patch",
    question="in how many s x s windows of an h x w grid does a given patch lie?",
    hint="a window's top-left corner can be in the s x s block up-left of the patch, but "
    "must stay inside the grid: count along rows and columns and multiply.",
    example=lambda: {"grid": (5, 6), "scale": 2, "patch": (0, 3)},
    explain=lambda n: f"{n} window(s): border patches are covered less than interior ones.",
)
def _windows_per_patch(grid: tuple[int, int], scale: int, patch: tuple[int, int]) -> int:
    index = patch[0] * grid[1] + patch[1]
    return int((window_indices(grid, scale) == index).any(dim=1).sum())
