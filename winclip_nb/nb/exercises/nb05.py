"""Exercises of notebook 05 (registered with :func:`winclip_nb.nb.exercises.exercise`)."""

from __future__ import annotations

from ...explain.rules import CONFIDENCE_MID_Z, confidence_from_z, severity_from_z
from . import exercise


@exercise(
    "05.severity",
    question="which severity do the rules give a region with peak z 6.0, mean z 4.5 and "
    "area fraction 0.01 (answer 'low', 'medium' or 'high')?",
    hint="compare with HIGH_PEAK_Z / HIGH_AREA_FRACTION first, then MEDIUM_PEAK_Z and "
    "MEDIUM_MEAN_Z, as in the rules cell.",
    example=lambda: {"peak_z": 6.0, "mean_z": 4.5, "area_fraction": 0.01},
    explain=lambda s: f"'{s}': the rules compare peak and mean z with fixed thresholds.",
)
def _severity(peak_z: float, mean_z: float, area_fraction: float) -> str:
    return severity_from_z(peak_z, mean_z, area_fraction)


@exercise(
    "05.confidence",
    question="the confidence the rules give a region whose peak is at z = 6.5?",
    hint="a logistic curve: 1 / (1 + exp(-(z - CONFIDENCE_MID_Z) / CONFIDENCE_SCALE_Z)).",
    example=lambda: {"peak_z": 6.5},
    explain=lambda c: f"{c:.3f}: a peak above z = {CONFIDENCE_MID_Z:g} gives more than 1/2.",
)
def _confidence(peak_z: float) -> float:
    return float(confidence_from_z(peak_z))
