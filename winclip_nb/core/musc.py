"""MuSc: zero-shot mutual scoring of unlabelled images (notebook 09).

MuSc (Li et al., ICLR 2024) needs neither normal images nor text. It scores a *set* of
unlabelled test images, each against all the others: defects are rare and different
from image to image, so a normal patch finds a close match in almost every other image
while a defective patch does not.

1. Patch tokens of several transformer blocks (the residual stream of CLIP ViT-B/16 at
   256 px, blocks 2, 5, 8 and 11; a 16 x 16 grid of 768 dimensions).
2. Local neighbourhood aggregation (:func:`aggregate_neighbourhood`): each block's tokens
   are layer-normalised over the whole image and averaged over the r x r neighbourhood
   of every patch, for the degrees r = 1, 3 and 5 (small and larger defects).
3. Mutual scoring (:func:`mutual_scores`): for a patch of image i and every other image
   j, the distance to the nearest patch of j; of those N - 1 distances the smallest 30 %
   are averaged (the *interval average*: a defect shared by a few other images is still
   found, one shared by more than 30 % of them is not).
4. The maps of every block and degree are averaged; the image score is the map's maximum,
   optionally re-scored with the images most similar by class token (:func:`rscin`).

The pairwise work is streamed in chunks of query images (:data:`MUSC_CHUNK_BYTES`), so
memory grows with the number of images, not with its square. A defect repeated in many
images is the method's blind spot: :func:`repeated_pattern_images` finds patches that some
images share but most lack, and the scorer warns about them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from .anchors import TextAnchors
from .calibration import Calibration
from .errors import ConfigError
from .maps import robust_stats
from .memory import l2_from_cosine
from .runtime import batched, progress
from .scorers import Scorer, Scores

#: Aggregation degrees r (neighbourhood sides in patches).
MUSC_DEGREES = (1, 3, 5)
#: Interval average: the mean of the smallest this fraction of the other images' distances.
MUSC_INTERVAL = 0.3
#: Fewest images scored as a set: below 5 the interval (int(0.3 * (N - 1))) holds no image.
MUSC_MIN_IMAGES = 5
#: Bytes of one chunk of pairwise similarities (query patches x all patches).
MUSC_CHUNK_BYTES = 256 * 2**20
#: RsCIN: neighbour counts whose re-scored image scores are averaged (the paper's MVTec-AD).
RSCIN_NEIGHBOURS = (1, 2, 3)
#: Repeated patterns: the upper quantile of a patch's distances to the other images, the
#: robust z it must reach while its interval average stays below half of it, and the
#: share of the set (at least 2 images) that must show one before the scorer warns.
REPEAT_QUANTILE = 0.9
REPEAT_Z = 6.0
REPEAT_SHARE = 0.1


class RepeatedPatternWarning(UserWarning):
    """Many images of a set share a pattern the other images lack (see :mod:`musc`)."""


def aggregate_neighbourhood(tokens: torch.Tensor, grid_size: tuple[int, int],
                            degree: int) -> torch.Tensor:
    """Layer-normalise each image's tokens over all patches and channels, average them over
    each patch's ``degree x degree`` neighbourhood (zero padding counts), L2-normalise.

    Args:
        tokens: (B, N, C) with N = h * w. Returns: (B, N, C).

    Example:
        >>> t = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])
        >>> aggregate_neighbourhood(t, (2, 2), 1)  # degree 1: normalisation only
        tensor([[[ 0.7071, -0.7071],
                 [-0.7071,  0.7071],
                 [ 0.7071, -0.7071],
                 [-0.7071,  0.7071]]])
    """
    b, n, c = tokens.shape
    grid = tokens.float().transpose(1, 2).reshape(b, c, *grid_size)
    grid = F.layer_norm(grid, grid.shape[1:])
    if degree > 1:
        grid = F.avg_pool2d(grid, degree, stride=1, padding=degree // 2, count_include_pad=True)
    return F.normalize(grid.flatten(2).transpose(1, 2), dim=-1)


def interval_average(distances: torch.Tensor, fraction: float = MUSC_INTERVAL) -> torch.Tensor:
    """Mean of the smallest ``int(fraction * M)`` of the last axis (at least one).

    Example:
        >>> interval_average(torch.tensor([[4.0, 1.0, 3.0, 2.0, 9.0, 8.0, 7.0]]))  # 2 of 7
        tensor([1.5000])
    """
    k = max(int(fraction * distances.shape[-1]), 1)
    return distances.topk(k, dim=-1, largest=False).values.mean(dim=-1)


def mutual_scores(features: torch.Tensor, fraction: float = MUSC_INTERVAL,
                  chunk_bytes: int = MUSC_CHUNK_BYTES,
                  show: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Score every patch of every image against all the *other* images.

    For patch p of image i and each image j != i: d_ij(p) = L2 distance from p to the
    nearest patch of j. Returns their interval average and their ``REPEAT_QUANTILE``.

    Args:
        features: (N, P, C) L2-normalised. Returns: two (N, P) tensors.

    Example:
        Five images of two patches; image 0's second patch matches no other image:
        >>> f = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(5, 1, 1)
        >>> f[0, 1] = torch.tensor([-1.0, 0.0])
        >>> mutual_scores(f)[0][:, 1]
        tensor([1.4142, 0.0000, 0.0000, 0.0000, 0.0000])
    """
    n, p, c = features.shape
    if n < 2:
        raise ConfigError(f"mutual scoring needs at least 2 images, got {n}")
    flat_t = features.reshape(n * p, c).T
    per_chunk = max(1, chunk_bytes // (4 * p * n * p))
    low, high = torch.empty(n, p, device=features.device), torch.empty(n, p, device=features.device)
    starts = range(0, n, per_chunk)
    for start in progress(starts, len(starts), "mutual scoring", show):
        q = features[start : start + per_chunk]  # (q, P, C)
        sim = (q.reshape(-1, c) @ flat_t).view(len(q), p, n, p).amax(dim=-1)  # (q, P, N)
        dist = l2_from_cosine(sim)
        others = torch.arange(n, device=dist.device)[None] != \
            torch.arange(start, start + len(q), device=dist.device)[:, None]  # (q, N)
        dist = dist[others[:, None].expand(-1, p, -1)].view(len(q), p, n - 1)
        low[start : start + len(q)] = interval_average(dist, fraction)
        high[start : start + len(q)] = dist.quantile(REPEAT_QUANTILE, dim=-1)
    return low, high


def repeated_pattern_images(low: torch.Tensor, high: torch.Tensor) -> list[int]:
    """Images with a patch that a few other images share but most lack.

    Such a patch's interval average (``low``) looks normal while its distance to most
    other images (``high``) is an outlier: robust z of ``high`` among all ``high`` values
    above :data:`REPEAT_Z`, while the robust z of ``low`` among all ``low`` values stays
    below half of that.

    Args:
        low, high: (N, P) from :func:`mutual_scores`. Returns: image indices.

    Example:
        >>> low = torch.full((4, 3), 1.0) + torch.arange(12.0).view(4, 3) * 0.01
        >>> high = low.clone(); high[[1, 2], 0] = 5.0  # images 1 and 2 share a pattern
        >>> repeated_pattern_images(low, high)
        [1, 2]
    """
    (low_c, low_s), (high_c, high_s) = robust_stats(low.flatten()), robust_stats(high.flatten())
    z_low, z_high = (low - low_c) / low_s, (high - high_c) / high_s
    flagged = (z_high > REPEAT_Z) & (z_low < REPEAT_Z / 2)
    return torch.nonzero(flagged.any(dim=1)).flatten().tolist()


def rscin(scores: torch.Tensor, class_tokens: torch.Tensor,
          neighbours: tuple[int, ...] = RSCIN_NEIGHBOURS) -> torch.Tensor:
    """Re-score images with their most similar images (by class token): min-max scaled
    scores averaged over each image's k most similar images (itself included) weighted by
    similarity, then averaged over the ``neighbours`` counts k.

    Args:
        scores: (N,). class_tokens: (N, D) L2-normalised. Returns: (N,) in [0, 1].

    Example:
        >>> tokens = torch.eye(3)[[0, 0, 1, 2]]  # images 0 and 1 look alike
        >>> rscin(torch.tensor([0.0, 1.0, 0.5, 0.2]), tokens, (2,))
        tensor([0.5000, 0.5000, 0.5000, 0.2000])
    """
    scaled = (scores - scores.min()) / (scores.max() - scores.min()).clamp_min(1e-12)
    similarity = class_tokens.float() @ class_tokens.float().T
    rescored = []
    for k in neighbours:
        values, index = similarity.topk(min(k, len(scores)), dim=1)
        rescored.append((values * scaled[index]).sum(dim=1) / values.sum(dim=1))
    return torch.stack(rescored).mean(dim=0)


@dataclass
class NoMemory:
    """MuSc keeps no memory: it is given the set to score instead."""

    size: int = 0


class MuScScorer(Scorer):
    """MuSc as a scorer: a batch is scored as a set, each image against the others.

    Branches: ``mutual_map`` (the interval average, averaged over blocks and degrees) and
    ``repeat_map`` (the distances to most other images minus it: large where a pattern
    is shared by a few images only; not fused). No text, no normal images, no fusion
    weights; the image score is the map's maximum (with ``rscin``: re-scored).
    """

    preset: ClassVar[dict[str, Any]] = {"model_name": "ViT-B-16", "image_size": 256,
                                        "layers": (2, 5, 8, 11), "coreset_ratio": 1.0}
    default_weights = "openai"
    branches = ("mutual_map", "repeat_map")
    memory_type = NoMemory
    scored_map = "raw_map"
    needs_references = False
    scores_sets = True
    min_set_images = MUSC_MIN_IMAGES

    def layer_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) -> residual-stream patch tokens (B, L, N, W) of the configured
        blocks and L2-normalised image embeddings (B, D), float32."""
        out = self.backbone.model.forward_intermediates(
            image=self.backbone.to_pixels(pixels), image_indices=list(self.backbone.layers),
            intermediates_only=False, image_output_fmt="NLC", normalize=True)
        tokens = torch.stack(out["image_intermediates"], dim=1).float()
        return tokens, F.normalize(out["image_features"].float(), dim=-1)

    def fit(self, pixels: torch.Tensor, anchors: TextAnchors, fg_masks: torch.Tensor,
            coreset_ratio: float, seed: int, progress: bool) -> tuple[Any, Calibration | None]:
        raise ConfigError("musc takes no normal images (k = 0): it scores the unlabelled test "
                          "images against each other; call score_set(images)")

    def score(self, pixels: torch.Tensor, anchors: TextAnchors, memory: Any) -> Scores:
        n = len(pixels)
        if n < self.min_set_images:
            raise ConfigError(
                f"musc scores a set of images, each against the others, and needs at least "
                f"{self.min_set_images}; got {n}. With fewer, its interval average of the "
                f"smallest {MUSC_INTERVAL:.0%} of the other images' distances is empty."
            )
        show = n >= 20
        with torch.inference_mode():
            parts = batched(self.layer_tokens, pixels, self.config.batch_size, "features", show)
        tokens = torch.cat([t for t, _ in parts])  # (n, L, N, W)
        embedding = torch.cat([e for _, e in parts])
        grid, low_sum, high_sum = self.backbone.grid_size, 0.0, 0.0
        for degree in MUSC_DEGREES:
            for layer in range(tokens.shape[1]):
                features = aggregate_neighbourhood(tokens[:, layer], grid, degree)
                low, high = mutual_scores(features, show=show)
                low_sum, high_sum = low_sum + low, high_sum + high
        n_maps = len(MUSC_DEGREES) * tokens.shape[1]
        low, high = low_sum / n_maps, high_sum / n_maps
        repeated = repeated_pattern_images(low, high)
        if len(repeated) >= max(2, REPEAT_SHARE * n):
            warnings.warn(RepeatedPatternWarning(
                f"{len(repeated)} of {n} images (indices {repeated[:10]}"
                f"{' ...' if len(repeated) > 10 else ''}) share a pattern that most of the other "
                "images lack; mutual scoring scores a defect repeated in many images as normal, "
                "so check these images (repeat_map shows where)"), stacklevel=2)
        image_score = low.amax(dim=1)
        if self.config.rscin:
            image_score = rscin(image_score, embedding)
        maps = {"mutual_map": low.view(n, *grid), "repeat_map": (high - low).view(n, *grid)}
        return Scores(maps, None, image_score)

    def fuse(self, branches: dict[str, torch.Tensor], calibration: Calibration | None,
             text_weight: float, nn_weight: float) -> torch.Tensor:
        return branches["mutual_map"]
