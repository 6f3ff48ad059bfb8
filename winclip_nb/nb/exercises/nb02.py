"""Exercises of notebook 02 (registered with :func:`winclip_nb.nb.exercises.exercise`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import as_array, exercise


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@exercise(
    "02.two_anchor_probability",
    question="what is the probability of 'anomalous' for a patch with these two cosines, "
    "softmax([cos_normal, cos_anomalous] / temperature)[1]?",
    hint="divide both cosines by the temperature, exponentiate, and take the anomalous share; "
    "or sigmoid((cos_anomalous - cos_normal) / temperature).",
    example=lambda: {"cos_normal": 0.21, "cos_anomalous": 0.24, "temperature": 0.01},
    explain=lambda expected: f"p = sigmoid(difference / T) = {expected:.3f}: divided by a small "
    "T, a cosine gap of a few hundredths already tips the softmax.",
)
def _two_anchor_probability(cos_normal: float, cos_anomalous: float, temperature: float) -> float:
    return _sigmoid((float(cos_anomalous) - float(cos_normal)) / float(temperature))


@exercise(
    "02.flattest_temperature",
    question="for the same two cosines, which of these temperatures gives the probability "
    "closest to 0.5 (answer the temperature)?",
    hint="logits = cos / T: a larger T shrinks the logit difference, so the sigmoid stays "
    "near its middle; compute p for each T and compare |p - 0.5|.",
    example=lambda: {"cos_normal": 0.21, "cos_anomalous": 0.24,
                     "temperatures": [0.005, 0.01, 0.07]},
    explain=lambda expected: f"T = {expected}: the largest temperature divides the cosine gap "
    "the least, so its probability stays closest to 0.5.",
)
def _flattest_temperature(cos_normal: float, cos_anomalous: float,
                          temperatures: Sequence[float]) -> float:
    gap = float(cos_anomalous) - float(cos_normal)
    return float(min(temperatures, key=lambda t: abs(_sigmoid(gap / float(t)) - 0.5)))



@exercise(
    "02.fraction_above_half",
    question="what fraction of all patches of the text maps has a probability of 'anomalous' "
    "above 0.5?",
    hint="compare the maps with 0.5 and take the mean of the resulting booleans, "
    "e.g. (maps > 0.5).float().mean().",
    example=lambda: {"maps": np.array([[[0.2, 0.6], [0.51, 0.4]], [[0.7, 0.49], [0.5, 0.9]]])},
    explain=lambda expected: f"{expected:.1%} of the patches lean to 'anomalous' (p > 0.5); "
    "only a comparison with the masks (next section) says whether they are the defective ones.",
)
def _fraction_above_half(maps: Any) -> float:
    return float((as_array(maps) > 0.5).mean())
