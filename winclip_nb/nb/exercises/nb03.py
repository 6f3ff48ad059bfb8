"""Exercises of notebook 03 (registered with :func:`winclip_nb.nb.exercises.exercise`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import as_array, exercise


def _kcenter(points: Any, start: int, k: int) -> np.ndarray:
    """First ``k`` greedy k-center picks from ``start`` (Euclidean distances)."""
    x = as_array(points)
    picks = [int(start)]
    min_dist = np.linalg.norm(x - x[int(start)], axis=1)
    while len(picks) < k:
        nxt = int(np.argmax(min_dist))
        picks.append(nxt)
        min_dist = np.minimum(min_dist, np.linalg.norm(x - x[nxt], axis=1))
    return np.asarray(picks, dtype=np.int64)


def _points_example() -> dict[str, Any]:
    rng = np.random.default_rng(3)
    return {"points": rng.normal(size=(40, 2)), "start": 5}


@exercise(
    "03.third_pick",
    question="which point (its index) does greedy k-center pick third, starting from `start`?",
    hint="pick 1 is `start`; pick 2 is the point farthest from it; pick 3 is the point whose "
    "distance to the NEAREST of picks 1 and 2 is largest (np.linalg.norm, np.minimum, "
    "np.argmax).",
    example=_points_example,
    explain=lambda expected: f"pick 3 is point {int(expected)}: the farthest from both "
    "earlier picks.",
)
def _third_pick(points: Any, start: int) -> np.ndarray:
    return np.asarray(_kcenter(points, start, 3)[2], dtype=np.int64)


@exercise(
    "03.coverage_radius",
    question="what is the coverage radius of the points kept (`kept`, indices into `points`)?",
    hint="for every point take its distance to the nearest kept point, then the largest of "
    "those distances (np.linalg.norm with broadcasting, .min(axis=1), .max()).",
    example=lambda: {"points": _points_example()["points"], "kept": np.array([5, 0, 17, 30])},
    explain=lambda expected: f"every point lies within {float(expected):.3f} of a kept point, "
    "and one lies exactly that far.",
)
def _coverage_radius(points: Any, kept: Any) -> float:
    x = as_array(points)
    centres = x[np.asarray(kept, dtype=np.int64)]
    distances = np.linalg.norm(x[:, None, :] - centres[None, :, :], axis=-1)
    return float(distances.min(axis=1).max())


def _unit_example() -> dict[str, Any]:
    rng = np.random.default_rng(4)
    memory = rng.normal(size=(6, 8))
    query = rng.normal(size=8)
    return {
        "query": query / np.linalg.norm(query),
        "memory": memory / np.linalg.norm(memory, axis=1, keepdims=True),
    }


@exercise(
    "03.nn_distance",
    question="what is the NN distance of the unit vector `query` to the memory rows "
    "(the package's distance, sqrt(2 - 2 cos) to the most similar row)?",
    hint="cosines of unit vectors are dot products: cos = memory @ query; take the largest "
    "cosine, then sqrt(2 - 2 * cos_max).",
    example=_unit_example,
    explain=lambda expected: f"the nearest memory row is {float(expected):.3f} away; "
    "(1 - cos) / 2 would pick the same row, only the number differs.",
)
def _nn_distance(query: Any, memory: Any) -> float:
    cos = as_array(memory) @ as_array(query)
    return float(np.sqrt(max(0.0, 2.0 - 2.0 * float(cos.max()))))
