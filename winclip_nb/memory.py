"""Stage 03: the normal memory, its coreset, and nearest-neighbour distances (notebook 03).

Patch tokens of normal (train/good) images are kept per layer. A greedy k-center
coreset keeps a fraction of them that still covers the whole set; the NN map of a
test image is the distance of each of its patches to the nearest memory patch.

Tokens are L2-normalised, so the L2 distance is ``sqrt(2 - 2 cos)`` and one
matrix product per chunk finds the nearest neighbour.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import DEFAULT_CORESET_PROJECTION_DIM, DEFAULT_NN_CHUNK_SIZE, check_coreset_ratio
from .errors import MemoryBankError

#: Metadata keys that must match between a saved bank and the model that loads it.
MATCHING_METADATA = ("model_name", "weights", "layers", "image_size")
MEMORY_FORMAT_VERSION = 1
#: Coreset inputs up to this many projected values (N * d) are selected on one CPU thread.
CORESET_SINGLE_THREAD_MAX_ELEMENTS = 1 << 22


def coreset_size(n_points: int, ratio: float) -> int:
    """Number of points kept: ``ceil(ratio * n)``, at least 1.

    Example:
        >>> coreset_size(196, 0.1)
        20
    """
    check_coreset_ratio(ratio)
    return max(1, min(n_points, math.ceil(ratio * n_points)))


@contextmanager
def _cpu_threads(n_threads: int | None) -> Iterator[None]:
    """Temporarily run torch's CPU ops on ``n_threads`` threads (None: leave as is)."""
    before = torch.get_num_threads()
    if n_threads is None or n_threads == before:
        yield
        return
    torch.set_num_threads(n_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def greedy_coreset(
    features: torch.Tensor,
    ratio: float,
    projection_dim: int | None = DEFAULT_CORESET_PROJECTION_DIM,
    seed: int = 0,
) -> torch.Tensor:
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


def nearest_neighbor_distance(
    queries: torch.Tensor,
    memory: torch.Tensor,
    chunk_size: int = DEFAULT_NN_CHUNK_SIZE,
    query_groups: torch.Tensor | None = None,
    memory_groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """L2 distance from each query to its nearest memory row, in chunks of queries.

    Both inputs must be L2-normalised, so ``d = sqrt(max(0, 2 - 2 q.m))``.

    Args:
        queries: (L, Q, D) or (Q, D).
        memory: (L, M, D) or (M, D), same leading layout as ``queries``.
        chunk_size: queries per chunk; peak extra memory is L * chunk_size * M floats.
        query_groups, memory_groups: optional (Q,) and (M,) integer ids; a memory row
            is never the neighbour of a query with the same id (leave-one-image-out).

    Returns:
        (L, Q) or (Q,) distances.

    Example:
        >>> q = torch.tensor([[1.0, 0.0]]); mem = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
        >>> nearest_neighbor_distance(q, mem)
        tensor([0.])
    """
    squeeze = queries.dim() == 2
    if squeeze:
        queries, memory = queries.unsqueeze(0), memory.unsqueeze(0)
    out = torch.empty(queries.shape[:2], dtype=torch.float32, device=queries.device)
    mem_t = memory.transpose(1, 2).to(queries.dtype)
    for start in range(0, queries.shape[1], chunk_size):
        stop = start + chunk_size
        sim = torch.bmm(queries[:, start:stop], mem_t)  # (L, q, M)
        if query_groups is not None and memory_groups is not None:
            same = query_groups[start:stop, None].to(sim.device) == memory_groups[None].to(
                sim.device
            )
            sim = sim.masked_fill(same[None], float("-inf"))
        best = sim.amax(dim=-1).float()
        out[:, start:stop] = torch.sqrt(torch.clamp(2.0 - 2.0 * best, min=0.0))
    return out[0] if squeeze else out


def save_bank(module: nn.Module, path: str | Path, metadata: dict[str, Any]) -> Path:
    """Write a module's non-empty buffers to ``path`` (.safetensors), metadata as JSON
    in the header, atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: buf.detach().cpu().contiguous()
        for name, buf in module.named_buffers()
        if buf.numel() > 0
    }
    meta = dict(metadata, format_version=MEMORY_FORMAT_VERSION)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"winclip_nb": json.dumps(meta, sort_keys=True)})
    tmp.replace(path)
    return path


def read_bank(
    path: str | Path, expected: dict[str, Any] | None, required: tuple[str, ...]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata of a bank file written by :func:`save_bank` (never unpickled).

    Raises :class:`MemoryBankError` naming the file when it is not a ``.safetensors``
    bank, lacks one of the ``required`` tensors, or was built with other ``expected``
    settings.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise MemoryBankError(
            f"memory banks load only from .safetensors files (no pickle), got {path}"
        )
    if not path.is_file():
        raise MemoryBankError(f"memory bank file not found: {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
        tensors = load_file(str(path))
        meta = json.loads(header["winclip_nb"])
    except Exception as err:  # noqa: BLE001 - safetensors raises several types
        raise MemoryBankError(f"{path} is not a winclip_nb memory bank: {err}") from err
    for key, value in (expected or {}).items():
        saved = meta.get(key)
        if json.dumps(saved) != json.dumps(value):
            raise MemoryBankError(
                f"memory bank {path} was built with {key}={saved!r}, "
                f"but this model uses {key}={value!r}; rebuild it for this model"
            )
    missing = [k for k in required if k not in tensors]
    if missing:
        raise MemoryBankError(
            f"{path} is not a winclip_nb memory bank: tensors {missing} are missing"
        )
    return tensors, meta


class NormalMemory(nn.Module):
    """Coreset of normal patch tokens per layer, plus what calibration needs.

    Buffers:
        bank: (L, M, D) memory patches (the same M coreset positions for every layer).
        source_image: (M,) index of the training image each memory patch came from.
        source_patch: (M,) global patch index (image * N + patch) of each memory patch.
        train_text_maps, train_nn_maps: (n, h, w) leave-one-image-out maps of the
            training images, used to bring text and NN maps to a common scale and to
            calibrate the normalisation.
        train_fg_masks: (n, S, S) uint8 foreground masks of the training images.
    """

    def __init__(
        self,
        bank: torch.Tensor,
        source_image: torch.Tensor,
        source_patch: torch.Tensor,
        metadata: dict[str, Any],
    ) -> None:
        super().__init__()
        self.register_buffer("bank", bank)
        self.register_buffer("source_image", source_image.long())
        self.register_buffer("source_patch", source_patch.long())
        self.register_buffer("train_text_maps", torch.empty(0))
        self.register_buffer("train_nn_maps", torch.empty(0))
        self.register_buffer("train_fg_masks", torch.empty(0, dtype=torch.uint8))
        self.metadata = dict(metadata)
        #: Calibration statistics per fusion weights, filled by WinCLIP.calibration().
        #: It lives here, so a different memory never reuses another's statistics.
        self.calibration_cache: dict[tuple[float, float], dict[str, Any]] = {}

    @property
    def n_layers(self) -> int:
        return int(self.bank.shape[0])

    @property
    def size(self) -> int:
        """Number of memory patches M per layer."""
        return int(self.bank.shape[1])

    def nn_map(
        self,
        patch_tokens: torch.Tensor,
        chunk_size: int = DEFAULT_NN_CHUNK_SIZE,
        query_groups: torch.Tensor | None = None,
        memory_groups: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, L, N, D) patch tokens -> (B, N) NN distance averaged over layers.

        ``query_groups`` (B * N,) and ``memory_groups`` (M,) exclude same-id pairs.
        """
        b, n_layers, n, d = patch_tokens.shape
        if n_layers != self.n_layers:
            raise MemoryBankError(
                f"patch tokens have {n_layers} layers but the memory bank has {self.n_layers}"
            )
        queries = patch_tokens.permute(1, 0, 2, 3).reshape(n_layers, b * n, d)
        if self.bank.device != queries.device:
            self.bank = self.bank.to(queries.device)  # moved once, not on every call
        dist = nearest_neighbor_distance(
            queries, self.bank, chunk_size, query_groups, memory_groups
        )
        return dist.mean(dim=0).view(b, n)  # (L, B * N) -> (B, N)

    def save(self, path: str | Path) -> Path:
        """Write tensors to a ``.safetensors`` file with JSON metadata in its header."""
        return save_bank(self, path, self.metadata)

    @classmethod
    def load(cls, path: str | Path, expected: dict[str, Any] | None = None) -> NormalMemory:
        """Read a bank saved by :meth:`save`; refuse one made with other settings.

        Args:
            expected: metadata values the bank must match (see ``MATCHING_METADATA``).
        """
        tensors, meta = read_bank(path, expected, ("bank", "source_image", "source_patch"))
        memory = cls(tensors["bank"], tensors["source_image"], tensors["source_patch"], meta)
        for name in ("train_text_maps", "train_nn_maps", "train_fg_masks"):
            if name in tensors:
                setattr(memory, name, tensors[name])
        return memory
