"""Exercises of notebook 04 (registered with :func:`winclip_nb.nb.exercises.exercise`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ...core.maps import robust_stats
from . import as_array, exercise


def _values_example() -> dict[str, Any]:
    rng = np.random.default_rng(5)
    values = np.concatenate([rng.normal(0.2, 0.05, size=45), [1.2, 1.3]])  # odd count
    return {"values": values, "x": 1.25}


@exercise(
    "04.robust_z",
    question="what is the robust z of `x` relative to `values` (median and 1.4826 MAD)?",
    hint="median = np.median(values); MAD = np.median(np.abs(values - median)); "
    "z = (x - median) / (1.4826 * MAD).",
    example=_values_example,
    explain=lambda expected: f"x lies {float(expected):.2f} robust sigmas above the median; "
    "the few extreme values barely moved median and MAD.",
)
def _robust_z(values: Any, x: float) -> float:
    median, sigma = robust_stats(torch.from_numpy(as_array(values)))  # the package's statistics
    return float((float(x) - median) / sigma)


@exercise(
    "04.fused_z",
    question="what fused z does the patch get from its text z `z_text` and NN z `z_nn` "
    "with the weights `text_weight` and `nn_weight`?",
    hint="the weighted mean: (text_weight * z_text + nn_weight * z_nn) / "
    "(text_weight + nn_weight).",
    example=lambda: {"z_text": 1.5, "z_nn": 4.0, "text_weight": 0.3, "nn_weight": 0.7},
    explain=lambda expected: f"the fused z is {float(expected):.2f}: the weights pull it "
    "toward the branch with more weight.",
)
def _fused_z(z_text: float, z_nn: float, text_weight: float, nn_weight: float) -> float:
    return float((text_weight * float(z_text) + nn_weight * float(z_nn))
                 / (text_weight + nn_weight))


def _map_example() -> dict[str, Any]:
    rng = np.random.default_rng(6)
    anomaly_map = rng.normal(0.0, 1.5, size=(16, 16))
    fg_mask = np.zeros((16, 16), dtype=bool)
    fg_mask[2:14, 3:15] = True
    return {"anomaly_map": anomaly_map, "fg_mask": fg_mask, "threshold": 2.0}


@exercise(
    "04.hotspot_pixels",
    question="how many foreground pixels of `anomaly_map` are above `threshold` "
    "(`fg_mask` marks the foreground)?",
    hint="a boolean mask: ((anomaly_map > threshold) & fg_mask).sum().",
    example=_map_example,
    explain=lambda expected: f"{int(expected)} foreground pixels exceed the threshold; "
    "find_hotspots groups them into connected regions and drops tiny ones.",
)
def _hotspot_pixels(anomaly_map: Any, fg_mask: Any, threshold: float) -> int:
    above = as_array(anomaly_map) > float(threshold)
    return int((above & as_array(fg_mask).astype(bool)).sum())
