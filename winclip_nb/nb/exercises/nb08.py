"""Exercises of notebook 08 (registered with :func:`winclip_nb.nb.exercises.exercise`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...core.windows import combine_scores
from . import exercise


@exercise(
    "08.tokens_per_image",
    question="how many tokens go through the transformer per image: the image sequence "
    "(class token + patches) plus every window (class token + s * s patches) of every scale?",
    hint="1 + h*w for the image; (h - s + 1) * (w - s + 1) windows of 1 + s*s tokens per scale.",
    example=lambda: {"grid": (7, 7), "scales": (2, 3)},
    explain=lambda n: f"{n:,} tokens per image (the tokens method: one sequence of 1 + h*w).",
)
def _tokens_per_image(grid: tuple[int, int], scales: Sequence[int]) -> int:
    h, w = grid
    windows = sum((h - s + 1) * (w - s + 1) * (1 + s * s) for s in scales)
    return int(1 + h * w + windows)


@exercise(
    "08.combined_score",
    question="WinCLIP+'s combined map value of a patch from its zero-shot and few-shot values?",
    hint="combine_scores averages the two maps.",
    example=lambda: {"zero_shot": 0.55, "few_shot": 0.05},
    explain=lambda v: f"{v:.3f}: the mean of the two maps (combine_scores).",
)
def _combined_score(zero_shot: float, few_shot: float) -> float:
    combined, _ = combine_scores(
        torch.tensor([[[zero_shot]]]), torch.tensor([zero_shot]), torch.tensor([[[few_shot]]])
    )
    return float(combined)  # the package's combination
