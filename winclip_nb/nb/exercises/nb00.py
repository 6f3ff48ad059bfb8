"""Exercises of notebook 00 (registered with :func:`winclip_nb.nb.exercises.exercise`)."""

from __future__ import annotations

from typing import Any

from . import exercise


def _example_report() -> dict[str, Any]:
    regions = [
        {"id": 1, "peak_z": 7.2, "area_fraction": 0.035},
        {"id": 2, "peak_z": 4.1, "area_fraction": 0.004},
        {"id": 3, "peak_z": 3.3, "area_fraction": 0.001},
    ]
    return {"report": {"regions": regions}}


@exercise(
    "00.strong_regions",
    question="how many regions of `report` have a peak z of at least 5?",
    hint="loop over report['regions'] and count those with r['peak_z'] >= 5.",
    example=_example_report,
    explain=lambda n: f"{n} region(s) reach z >= 5; the others are weaker hotspots (z 3-5).",
)
def _strong_regions(report: dict[str, Any], z: float = 5.0) -> int:
    return sum(1 for region in report["regions"] if region["peak_z"] >= z)


@exercise(
    "00.defect_area",
    question="what fraction of the image do all regions of `report` cover together?",
    hint="add up r['area_fraction'] over report['regions'].",
    example=_example_report,
    explain=lambda total: f"together {100 * total:.1f} % of the image is flagged.",
)
def _defect_area(report: dict[str, Any]) -> float:
    return float(sum(region["area_fraction"] for region in report["regions"]))
