"""AnomalyDINO: few-shot nearest neighbours on DINOv2 patch tokens (notebook 09).

AnomalyDINO (Damm et al., WACV 2025) is the memory branch of notebook 03 with another
backbone and no text at all:

1. Every patch token of the k normal reference images (DINOv2 ViT-S/14 at 448 px: a
   32 x 32 grid, 384 dimensions, after the backbone's final norm) goes into the memory;
   optionally only the foreground patches (:func:`pca_background_mask`).
2. A test patch's score is its cosine distance ``1 - cos`` to the nearest memory patch
   (:func:`cosine_nn_distance`), in ``[0, 2]``.
3. The image score is the mean of the top 1 % of patch distances (:func:`mean_top_fraction`).

The backbone is a timm vision transformer (:class:`ViTBackbone`); the method's settings
are :data:`AnomalyDINOScorer.preset`. anomalib 2.7's ``AnomalyDINOModel`` is the reference
the parity test holds it to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .anchors import TextAnchors
from .backbone import ImageBackbone
from .calibration import Calibration
from .errors import ConfigError
from .memory import greedy_coreset, nearest_similarity
from .runtime import batched
from .scorers import Scorer, Scores

#: ImageNet's RGB normalisation, DINOv2's.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: :func:`pca_background_mask`: projection threshold, morphology kernel, border fraction
#: left out of the "is the centre foreground?" check, and the foreground share it needs.
PCA_THRESHOLD = 10.0
PCA_KERNEL = 3
PCA_BORDER = 0.2
PCA_CENTRE_SHARE = 0.35


class ViTBackbone(ImageBackbone):
    """A timm vision transformer (DINOv2) -> patch tokens of some blocks and the class token.

    Args:
        model: a timm ``VisionTransformer`` built with ``dynamic_img_size=True``.
        layers: blocks whose outputs are used (0-based), each passed through the final norm.
        image_size: square input side, a multiple of the patch size.
        Others as :class:`~winclip_nb.core.backbone.ClipBackbone`.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int], image_size: int,
                 device: str = "auto", precision: str = "auto", weights: str = "random",
                 random_weights: bool = True) -> None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        super().__init__(image_size, device, precision, weights, random_weights,
                         cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD))
        patch = int(model.patch_embed.patch_size[0])
        if self.image_size % patch:
            raise ConfigError(f"image_size must be a multiple of the patch size {patch}, got "
                              f"{self.image_size} (e.g. {self.image_size // patch * patch})")
        n_blocks = len(model.blocks)
        bad = [i for i in layers if not 0 <= int(i) < n_blocks]
        if bad:
            raise ConfigError(f"unknown layer indices {bad}: the model has {n_blocks} "
                              f"blocks, valid indices are 0..{n_blocks - 1}")
        self.model = model.to(self.device, self.dtype).eval()
        self.layers = tuple(int(i) for i in layers)
        self.grid_size = (self.image_size // patch, self.image_size // patch)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor | Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, S, 3) uint8 or normalised pixels -> patch tokens (B, L, N, D) and class
        tokens (B, D), float32, after the final norm and not L2-normalised."""
        out = self.model.forward_intermediates(
            self.to_pixels(images), indices=list(self.layers), norm=True,
            return_prefix_tokens=True, output_fmt="NLC", intermediates_only=True,
        )
        tokens = torch.stack([patches for patches, _ in out], dim=1).float()
        return tokens, out[-1][1][:, 0].float()


def pca_background_mask(tokens: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """Foreground patches of each image from the first principal component of its tokens.

    Patches projecting above :data:`PCA_THRESHOLD` are foreground; if that leaves the
    central part (without a :data:`PCA_BORDER` frame) less than :data:`PCA_CENTRE_SHARE`
    foreground, the other side of the component is taken. The mask is dilated, then
    closed, with a 3 x 3 square. The component's sign is fixed as scikit-learn fixes it
    (its largest loading positive), so the result is deterministic.

    Args:
        tokens: (B, N, D) patch tokens. Returns: (B, N) bool.

    Example:
        >>> t = torch.zeros(1, 16, 2); t[0, [5, 6, 9, 10], 0] = 40.0  # a bright 2 x 2 centre
        >>> pca_background_mask(t, (4, 4)).view(4, 4).int().tolist()  # dilated to 4 x 4
        [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]
        >>> bool((pca_background_mask(-t, (4, 4)) == pca_background_mask(t, (4, 4))).all())
        True
    """
    centred = tokens.float() - tokens.float().mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    first = vh[:, 0]  # (B, D)
    sign = torch.sign(first.gather(1, first.abs().argmax(dim=1, keepdim=True)))
    projection = (centred @ (first * sign)[..., None])[..., 0]  # (B, N)
    h, w = grid_size
    y0, y1, x0, x1 = int(h * PCA_BORDER), int(h * (1 - PCA_BORDER)), int(w * PCA_BORDER), \
        int(w * (1 - PCA_BORDER))
    masks = (projection > PCA_THRESHOLD).view(-1, h, w)
    centre = masks[:, y0:y1, x0:x1].flatten(1).float()
    flip = centre.sum(dim=1) <= centre.shape[1] * PCA_CENTRE_SHARE
    masks = torch.where(flip[:, None, None], (-projection > PCA_THRESHOLD).view(-1, h, w), masks)
    pad = PCA_KERNEL // 2

    def dilate(m: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(m[:, None].float(), PCA_KERNEL, 1, pad)[:, 0] > 0

    closed = ~dilate(~dilate(dilate(masks)))  # dilate, then close (dilate, erode)
    return closed.flatten(1)


def cosine_nn_distance(queries: torch.Tensor, bank: torch.Tensor,
                       chunk_size: int = 2048) -> torch.Tensor:
    """Cosine distance ``1 - cos`` of each L2-normalised query to its nearest bank row.

    Args:
        queries: (L, Q, D). bank: (L, M, D). Returns: (L, Q) in [0, 2].

    Example:
        >>> q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]); bank = torch.tensor([[[1.0, 0.0]]])
        >>> cosine_nn_distance(q, bank)
        tensor([[0., 1.]])
    """
    return (1.0 - nearest_similarity(queries, bank, chunk_size)).clamp(0.0, 2.0)


def mean_top_fraction(distances: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean of the largest ``max(1, floor(N * fraction))`` values of each row.

    Args:
        distances: (B, N). Returns: (B,).

    Example:
        >>> mean_top_fraction(torch.arange(200.0).view(1, 200), 0.01)  # the top 2 of 200
        tensor([198.5000])
    """
    k = max(int(distances.shape[-1] * fraction), 1)
    return distances.topk(k, dim=-1).values.mean(dim=-1)


@dataclass
class PatchMemory:
    """Every (foreground) patch token of the k references: ``bank`` (L, M, D)
    L2-normalised, ``source_image`` (M,) the reference each came from."""

    bank: torch.Tensor
    source_image: torch.Tensor
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Number of memory patches M."""
        return int(self.bank.shape[1])


class AnomalyDINOScorer(Scorer):
    """AnomalyDINO as a scorer: one branch, ``nn_map`` (cosine distance to the nearest
    reference patch, averaged over the layers), no text and so no fusion weights; the
    image score is the mean of the top ``score_top_fraction`` (1 %) of patch distances over
    the whole grid. With ``pca_mask`` background patches neither enter the memory nor
    score (distance 0). With k >= 2 references their leave-one-image-out maps calibrate.
    """

    preset: ClassVar[dict[str, Any]] = {"model_name": "vit_small_patch14_dinov2",
                                        "image_size": 448, "layers": (11,),
                                        "coreset_ratio": 1.0}
    default_weights = "lvd142m"
    backbone_family = "timm"
    branches = ("nn_map",)
    memory_type = PatchMemory
    scored_map = "raw_map"
    uses_coreset = True
    min_calibration_images = 2
    needs_references = True
    reference_implementation = "anomalib AnomalyDINOModel"

    def tokens(self, pixels: torch.Tensor, progress: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, 3, S, S) -> L2-normalised tokens (n, L, N, D) and foreground (n, N) bool."""
        raw = torch.cat(batched(lambda b: self.backbone(b)[0], pixels,
                                self.config.batch_size, "features", progress))
        if self.config.pca_mask:
            fg = pca_background_mask(raw[:, -1], self.backbone.grid_size)
        else:
            fg = torch.ones(raw.shape[:1] + raw.shape[2:3], dtype=torch.bool, device=raw.device)
        return F.normalize(raw, dim=-1), fg

    def fit(self, pixels: torch.Tensor, anchors: TextAnchors, fg_masks: torch.Tensor,
            coreset_ratio: float, seed: int, progress: bool
            ) -> tuple[PatchMemory, Calibration | None]:
        tokens, fg = self.tokens(pixels, progress)
        n_img, n_layers, n_patch, dim = tokens.shape
        ids = torch.arange(n_img, device=tokens.device).repeat_interleave(n_patch)
        image_ids = ids[fg.flatten()]
        bank = tokens.permute(1, 0, 2, 3)[:, fg]  # (L, M, D)
        if coreset_ratio < 1.0:
            picks = greedy_coreset(bank.permute(1, 0, 2).reshape(-1, n_layers * dim),
                                   coreset_ratio, self.config.coreset_projection_dim, seed)
            bank, image_ids = bank[:, picks], image_ids[picks]
        meta = {"n_images": n_img, "seed": seed, "coreset_ratio": coreset_ratio,
                "pca_mask": self.config.pca_mask}
        memory = PatchMemory(bank.contiguous(), image_ids, meta)
        if n_img < self.min_calibration_images:
            return memory, None
        queries = tokens.permute(1, 0, 2, 3).reshape(n_layers, n_img * n_patch, dim)
        sim = nearest_similarity(queries, memory.bank, self.config.nn_chunk_size,
                                 ids, memory.source_image)
        dist = (1.0 - sim).clamp(0.0, 2.0).mean(dim=0).view(n_img, n_patch) * fg
        return memory, Calibration.from_normal_maps(
            {"nn_map": dist.view(n_img, *self.backbone.grid_size)}, fg_masks)

    def score(self, pixels: torch.Tensor, anchors: TextAnchors,
              memory: PatchMemory | None) -> Scores:
        if memory is None:
            raise ConfigError("anomalydino compares with normal reference images: fit it on "
                              "k >= 1 normal images first (it has no zero-shot mode)")
        tokens, fg = self.tokens(pixels)
        b, n_layers, n_patch, dim = tokens.shape
        queries = tokens.permute(1, 0, 2, 3).reshape(n_layers, b * n_patch, dim)
        dist = cosine_nn_distance(queries, memory.bank, self.config.nn_chunk_size)
        dist = dist.mean(dim=0).view(b, n_patch) * fg
        score = mean_top_fraction(dist, self.config.score_top_fraction)
        return Scores({"nn_map": dist.view(b, *self.backbone.grid_size)}, None, score)

    def fuse(self, branches: dict[str, torch.Tensor], calibration: Calibration | None,
             text_weight: float, nn_weight: float) -> torch.Tensor:
        return branches["nn_map"]
