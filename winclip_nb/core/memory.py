"""Stage 03: the normal memory, its coreset, and nearest neighbours (notebook 03).

Patch tokens of normal (train/good) images are kept per layer. A greedy k-center
coreset keeps a fraction of them that still covers the whole set; the NN map of a test
image is the distance of each of its patches to the nearest memory patch.

Tokens are L2-normalised, so the nearest neighbour is the most similar row (one matrix
product per chunk, :func:`nearest_similarity`) and the L2 distance follows from the
cosine: ``|x - m| = sqrt(2 - 2 cos)``. WinCLIP+ uses the same search with its own
distance, ``(1 - cos) / 2`` (notebook 07).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ConfigError, MemoryBankError

#: Coreset inputs up to this many projected values (N * d) are selected on one CPU thread.
CORESET_SINGLE_THREAD_MAX_ELEMENTS = 1 << 22


def coreset_size(n_points: int, ratio: float) -> int:
    """Number of points kept: ``ceil(ratio * n)``, at least 1.

    Example:
        >>> coreset_size(196, 0.1)
        20
    """
    if not 0.0 < ratio <= 1.0:
        raise ConfigError(f"coreset_ratio must be in (0, 1], got {ratio!r}")
    return max(1, min(n_points, math.ceil(ratio * n_points)))


@contextmanager
def _cpu_threads(n_threads: int | None) -> Iterator[None]:
    """Temporarily run torch's CPU ops on ``n_threads`` threads (None: leave as is)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n_threads or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def greedy_coreset(features: torch.Tensor, ratio: float, projection_dim: int | None = None,
                   seed: int = 0) -> torch.Tensor:
    """Greedy k-center coreset: repeatedly add the point farthest from those chosen.

    A seeded Gaussian random projection to ``projection_dim`` dimensions speeds up the
    distance computations (Johnson-Lindenstrauss); ``None`` or a width >= D skips it.
    The seeded random start point is part of the result.

    Each pick costs one matrix-vector product: with ``p_i = [x_i, |x_i|^2, 1]`` and
    ``c_j = [-2 x_j, 1, |x_j|^2]``, ``p_i . c_j = |x_i - x_j|^2`` (float64, so near-ties
    resolve as with direct differences). The loop never waits for the device, and on
    CPU small problems run on one thread (thread hand-offs would cost more than the
    ~2 * M tiny operations they split).

    Args:
        features: (N, D) float tensor.
        ratio: fraction of points to keep, in (0, 1].

    Returns:
        (M,) int64 indices into ``features``, in selection order, M = ceil(ratio * N).

    Example:
        Points 0, 1, 10 on a line; starting at 0 the farthest is 10, then 1:
        >>> x = torch.tensor([[0.0], [1.0], [10.0]])
        >>> picks = greedy_coreset(x, 2 / 3, projection_dim=None, seed=0)
        >>> sorted(picks.tolist()) in ([0, 2], [1, 2])
        True
    """
    n = features.shape[0]
    m = coreset_size(n, ratio)
    if m >= n:
        return torch.arange(n, device=features.device)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    x = features.float()
    if projection_dim is not None and projection_dim < x.shape[1]:
        proj = torch.randn(x.shape[1], projection_dim, generator=gen) / math.sqrt(projection_dim)
        x = x @ proj.to(x.device)
    start = int(torch.randint(n, (1,), generator=gen))
    small = x.device.type == "cpu" and x.numel() <= CORESET_SINGLE_THREAD_MAX_ELEMENTS
    with _cpu_threads(1 if small else None):
        x = x.double()
        sq_norm = (x * x).sum(dim=1, keepdim=True)
        ones = torch.ones_like(sq_norm)
        points = torch.cat([x, sq_norm, ones], dim=1)  # (N, d + 2)
        centers = torch.cat([-2.0 * x, ones, sq_norm], dim=1)  # (N, d + 2)
        selected = torch.empty(m, dtype=torch.long, device=x.device)
        selected[0] = start
        min_dist = torch.mv(points, centers[start]).clamp_min_(0.0)  # squared distances
        for i in range(1, m):
            nxt = torch.argmax(min_dist)  # stays on the device: no sync
            selected[i] = nxt
            dist = torch.mv(points, centers.index_select(0, nxt.view(1))[0])
            torch.minimum(min_dist, dist.clamp_min_(0.0), out=min_dist)
    return selected


def nearest_similarity(queries: torch.Tensor, memory: torch.Tensor, chunk_size: int = 2048,
                       query_groups: torch.Tensor | None = None,
                       memory_groups: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine similarity of each query to its most similar memory row, in chunks.

    Both inputs must be L2-normalised (rows).

    Args:
        queries: (L, Q, D) or (Q, D).
        memory: (L, M, D) or (M, D), the same leading layout as ``queries``.
        chunk_size: queries per chunk; peak extra memory is L * chunk_size * M floats.
        query_groups, memory_groups: optional (Q,) and (M,) integer ids; a memory row is
            never the neighbour of a query with the same id (leave-one-image-out).

    Returns:
        (L, Q) or (Q,) float32 similarities.

    Example:
        >>> q = torch.tensor([[1.0, 0.0], [0.6, 0.8]]); mem = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
        >>> nearest_similarity(q, mem)
        tensor([1.0000, 0.8000])
        >>> same = torch.tensor([0, 0]), torch.tensor([1, 0])  # ids of the queries, the rows
        >>> nearest_similarity(q, mem, query_groups=same[0], memory_groups=same[1])
        tensor([0.0000, 0.8000])
    """
    squeeze = queries.dim() == 2
    if squeeze:
        queries, memory = queries.unsqueeze(0), memory.unsqueeze(0)
    out = torch.empty(queries.shape[:2], dtype=torch.float32, device=queries.device)
    mem_t = memory.transpose(1, 2).to(queries.device, queries.dtype)
    for start in range(0, queries.shape[1], chunk_size):
        sim = torch.bmm(queries[:, start : start + chunk_size], mem_t)  # (L, q, M)
        if query_groups is not None and memory_groups is not None:
            q_ids = query_groups[start : start + chunk_size, None].to(sim.device)
            sim = sim.masked_fill((q_ids == memory_groups[None].to(sim.device))[None], -math.inf)
        out[:, start : start + chunk_size] = sim.amax(dim=-1).float()
    return out[0] if squeeze else out


def l2_from_cosine(similarity: torch.Tensor) -> torch.Tensor:
    """Distance of unit vectors from their cosine: ``sqrt(max(0, 2 - 2 cos))``.

    >>> l2_from_cosine(torch.tensor([1.0, 0.0, -1.0]))
    tensor([0.0000, 1.4142, 2.0000])
    """
    return torch.sqrt(torch.clamp(2.0 - 2.0 * similarity, min=0.0))


@dataclass
class NormalMemory:
    """Coreset of normal patch tokens per layer.

    ``bank`` (L, M, D): the memory patches (the same M coreset positions in every layer);
    ``source_image`` (M,): the normal image each one came from; ``source_patch`` (M,): its
    global patch index (image * N + patch); ``metadata``: how it was built.
    """

    bank: torch.Tensor
    source_image: torch.Tensor
    source_patch: torch.Tensor
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Number of memory patches M per layer."""
        return int(self.bank.shape[1])

    def nn_map(self, patch_tokens: torch.Tensor, chunk_size: int = 2048,
               query_groups: torch.Tensor | None = None,
               memory_groups: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, N, D) patch tokens -> (B, N) distance to the nearest memory patch,
        averaged over layers; ``query_groups`` (B * N,) and ``memory_groups`` (M,)
        exclude same-id pairs."""
        b, n_layers, n, d = patch_tokens.shape
        if n_layers != self.bank.shape[0]:
            raise MemoryBankError(f"patch tokens have {n_layers} layers but the memory "
                                  f"bank has {self.bank.shape[0]}")
        queries = patch_tokens.permute(1, 0, 2, 3).reshape(n_layers, b * n, d)
        sim = nearest_similarity(queries, self.bank, chunk_size, query_groups, memory_groups)
        return l2_from_cosine(sim).mean(dim=0).view(b, n)  # (L, B * N) -> (B, N)
