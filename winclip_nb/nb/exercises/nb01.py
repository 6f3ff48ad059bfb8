"""Exercises of notebook 01 (registered with :func:`winclip_nb.nb.exercises.exercise`)."""

from __future__ import annotations

from typing import Any

import torch

from . import exercise


def _example_tokens() -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.nn.functional.normalize(torch.randn(2, 3, 16, 8, generator=generator), dim=-1)
    return dict(tokens=tokens, grid=(4, 4))


@exercise(
    "01.numbers_per_image",
    question="how many numbers describe one image in `tokens` (all layers, patches, dims)?",
    hint="multiply the sizes of tokens.shape[1:] (layers x patches x dimensions).",
    example=_example_tokens,
    explain=lambda n: f"{n:,} numbers per image: the memory of step 03 stores this many.",
)
def _numbers_per_image(tokens: torch.Tensor, grid: tuple[int, int]) -> int:
    layers, patches, dims = tokens.shape[1:]
    return int(layers * patches * dims)


@exercise(
    "01.corner_centre_cosine",
    question="the cosine similarity, in the last layer of the first image, between the "
    "top-left patch (0, 0) and the centre patch (grid_h // 2, grid_w // 2)?",
    hint="tokens are unit vectors, so the cosine is a dot product; the patch at (row, col) "
    "is index row * grid_w + col.",
    example=_example_tokens,
    explain=lambda c: f"cosine {c:.3f}: tokens are unit length, so a dot product is the cosine.",
)
def _corner_centre_cosine(tokens: torch.Tensor, grid: tuple[int, int]) -> float:
    grid_h, grid_w = grid
    centre = (grid_h // 2) * grid_w + grid_w // 2
    last = tokens[0, -1]
    return float(last[0] @ last[centre])
