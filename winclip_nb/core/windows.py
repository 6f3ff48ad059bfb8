"""WinCLIP proper: sliding-window embeddings and harmonic aggregation (notebook 07).

The token pipeline (notebooks 01-04) compares single patch tokens with text. WinCLIP
(Jeong et al., CVPR 2023) instead runs *windows* of patches through the whole vision
transformer, so every window gets its own class-token embedding in the joint space:

1. The image is embedded once (patch embedding + class token + positions).
2. For each window scale ``s`` (2 and 3 patches by default) every ``s x s`` window of
   the patch grid becomes a short sequence ``[class token, its s*s patches]`` that
   goes through ``ln_pre``, the transformer, ``ln_post`` and the projection. All
   windows of a batch go through in one pass per scale.
3. Zero-shot: each window's anomalous probability against the two text anchors
   (temperature 0.07) is spread back to the patches it covers by a harmonic mean
   (:func:`harmonic_aggregation`); the image-level score is a third "scale"; the
   scales are combined by another harmonic mean.
4. WinCLIP+ (few-shot): every patch token and window embedding is compared with those
   of the k normal reference images (:func:`visual_association_score`); window
   scores are aggregated the same way and the scales are averaged. The final map is
   the mean of the zero-shot and few-shot maps; the image score the mean of the
   zero-shot image score and the few-shot map's maximum.

Shapes for ViT-B-16-plus-240 at 240 px: grid 15 x 15 = 225 patches, width 896,
joint space 640; 196 windows of scale 2 and 169 of scale 3.

Everything here is a pure function, a small ``nn.Module`` holding buffers, or the
:class:`WindowScorer` that the detector uses for ``method="windows"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .anchors import TextAnchors, anomaly_probability, prompt_anchors
from .calibration import Calibration
from .errors import ConfigError, MemoryBankError
from .memory import nearest_similarity
from .runtime import batched
from .scorers import Scorer, Scores

#: WinCLIP's full compositional ensemble: the state and template lists of the paper's
#: supplement as anomalib's ``prompting.py`` uses them, 7 x 21 normal and 4 x 21
#: anomalous prompts. The repeated jpeg template is part of that list.
WINCLIP_NORMAL_STATES: tuple[str, ...] = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
WINCLIP_ANOMALOUS_STATES: tuple[str, ...] = (
    "damaged {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)
WINCLIP_TEMPLATES: tuple[str, ...] = (
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)
#: Query rows per chunk in :func:`visual_association_score` (bounds memory).
ASSOCIATION_CHUNK = 4096
#: Scores below this are treated as this in the harmonic mean (1 / 0 would be inf).
_MIN_SCORE = torch.finfo(torch.float32).tiny


# ======================================================================================
# Windows on the patch grid
# ======================================================================================
def window_indices(grid_size: tuple[int, int], scale: int, stride: int = 1) -> torch.Tensor:
    """Patch indices of every ``scale x scale`` window, top-left first, row by row.

    Args:
        grid_size: (h, w) of the patch grid.
        scale: window side in patches, 1 <= scale <= min(h, w).

    Returns:
        (n_windows, scale * scale) int64, patch index = row * w + col.

    Example:
        A 3 x 3 grid has four 2 x 2 windows:
        >>> window_indices((3, 3), 2)
        tensor([[0, 1, 3, 4],
                [1, 2, 4, 5],
                [3, 4, 6, 7],
                [4, 5, 7, 8]])
    """
    h, w = int(grid_size[0]), int(grid_size[1])
    if not 1 <= scale <= min(h, w):
        raise ConfigError(f"window scale must be between 1 and {min(h, w)} for a {h}x{w} grid, "
                          f"got {scale}")
    if stride < 1:
        raise ConfigError(f"window stride must be >= 1, got {stride}")
    grid = torch.arange(h * w).view(h, w)
    windows = grid.unfold(0, scale, stride).unfold(1, scale, stride)  # (nh, nw, s, s)
    return windows.reshape(-1, scale * scale).contiguous()


def window_coverage(windows: torch.Tensor, n_patches: int) -> torch.Tensor:
    """Which window covers which patch.

    Args:
        windows: (n_windows, k) patch indices from :func:`window_indices`.

    Returns:
        (n_patches, n_windows) bool, True where the window contains the patch.

    Example:
        >>> window_coverage(torch.tensor([[0, 1], [1, 2]]), 3).int()
        tensor([[1, 0],
                [1, 1],
                [0, 1]], dtype=torch.int32)
    """
    cover = torch.zeros(n_patches, windows.shape[0], dtype=torch.bool, device=windows.device)
    cols = torch.arange(windows.shape[0], device=windows.device).expand_as(windows.T)
    cover[windows.T, cols] = True
    return cover


# ======================================================================================
# Scores and aggregation
# ======================================================================================
def harmonic_aggregation(window_scores: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
    """Score of each patch = harmonic mean of the scores of the windows covering it.

    ``patch = n_covering / sum_{windows covering it} 1 / score`` (one matrix product).
    A zero score makes every patch it covers zero.

    Args:
        window_scores: (B, n_windows) positive scores.
        coverage: (n_patches, n_windows) bool from :func:`window_coverage`.

    Returns:
        (B, n_patches).

    Example:
        Patch 1 is covered by both windows: 2 / (1/0.5 + 1/0.25) = 1/3.
        >>> cover = window_coverage(torch.tensor([[0, 1], [1, 2]]), 3)
        >>> harmonic_aggregation(torch.tensor([[0.5, 0.25]]), cover)
        tensor([[0.5000, 0.3333, 0.2500]])
    """
    cover = coverage.to(window_scores.dtype)
    inverse = window_scores.clamp_min(_MIN_SCORE).reciprocal() @ cover.T  # (B, n_patches)
    has_zero = ((window_scores <= 0).to(cover.dtype) @ cover.T) > 0
    return (cover.sum(dim=1) / inverse).masked_fill(has_zero, 0.0)


def harmonic_mean(maps: torch.Tensor) -> torch.Tensor:
    """Harmonic mean over the first dimension: ``n / sum(1 / maps)``.

    Example:
        >>> harmonic_mean(torch.tensor([[1.0, 0.5], [0.5, 0.5]]))
        tensor([0.6667, 0.5000])
    """
    return maps.shape[0] / maps.clamp_min(_MIN_SCORE).reciprocal().sum(dim=0)


def visual_association_score(
    embeddings: torch.Tensor,
    references: torch.Tensor,
    query_groups: torch.Tensor | None = None,
    reference_groups: torch.Tensor | None = None,
    chunk_size: int = ASSOCIATION_CHUNK,
) -> torch.Tensor:
    """Distance to the closest reference: ``min_r (1 - cos(e, r)) / 2``, in [0, 1].

    Args:
        embeddings: (B, Q, D) patch or window embeddings of the test images.
        references: (M, D) the same kind of embeddings of the normal references.
        query_groups, reference_groups: optional (B,) and (M,) ids; a reference never
            matches a query of the same id (leave-one-image-out on the references).

    Returns:
        (B, Q).

    Example:
        >>> e = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
        >>> visual_association_score(e, torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
        tensor([[0.0000, 0.1464]])
    """
    b, q, d = embeddings.shape
    queries = F.normalize(embeddings.float(), dim=-1).reshape(b * q, d)
    ids = None if query_groups is None else query_groups.repeat_interleave(q)
    best = nearest_similarity(queries, F.normalize(references.float(), dim=-1), chunk_size,
                              ids, reference_groups)
    return ((1.0 - best) / 2.0).view(b, q)


# ======================================================================================
# Embeddings
# ======================================================================================
@dataclass
class WindowEmbeddings:
    """What the vision tower gives for a batch of B images.

    ``image``: (B, D) projected class token of the whole image (not normalised).
    ``patches``: (B, N, W) last-layer patch tokens after ``ln_post``, not projected.
    ``windows``: one (B, n_windows, D) tensor per scale, projected window class tokens.
    """

    image: torch.Tensor
    patches: torch.Tensor
    windows: list[torch.Tensor]


def _check_vision_tower(visual: nn.Module) -> None:
    needed = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer",
              "ln_post", "proj")
    missing = [name for name in needed if getattr(visual, name, None) is None]
    if missing:
        raise ConfigError(
            f"method='windows' needs an open_clip ViT with a class token and a projection; "
            f"this vision tower lacks {missing}"
        )
    if (
        getattr(visual, "attn_pool", None) is not None
        or getattr(visual, "pool_type", "tok") != "tok"
    ):
        raise ConfigError(
            "method='windows' needs class-token pooling (pool_type 'tok', no attention pool); "
            f"this model uses pool_type={getattr(visual, 'pool_type', None)!r}"
        )
    if getattr(visual, "final_ln_after_pool", False):
        raise ConfigError("method='windows' does not support final_ln_after_pool models")


class WindowEncoder(nn.Module):
    """Image, patch and window embeddings from an open_clip ViT vision tower.

    Buffers ``windows_<i>`` hold (n_windows, s*s) patch indices for scale ``scales[i]``
    and ``coverage_<i>`` their (N, n_windows) coverage. No hooks: the embedding step
    is recomputed from the tower's own modules.

    Args:
        visual: ``open_clip`` ``VisionTransformer`` (``model.visual``).
        scales: window sides in patches.
    """

    def __init__(self, visual: nn.Module, scales: Sequence[int]) -> None:
        super().__init__()
        _check_vision_tower(visual)
        if not scales or len(set(scales)) != len(scales):
            raise ConfigError(f"window scales must be distinct and non-empty, got {list(scales)}")
        self.visual = visual
        self.scales = tuple(int(s) for s in scales)
        self.grid_size: tuple[int, int] = tuple(int(g) for g in visual.grid_size)  # type: ignore[assignment]
        n_patches = self.grid_size[0] * self.grid_size[1]
        device = visual.conv1.weight.device
        for i, scale in enumerate(self.scales):
            windows = window_indices(self.grid_size, scale).to(device)
            self.register_buffer(f"windows_{i}", windows, persistent=False)
            self.register_buffer(
                f"coverage_{i}", window_coverage(windows, n_patches), persistent=False
            )

    @property
    def windows(self) -> list[torch.Tensor]:
        """(n_windows, s*s) patch indices per scale."""
        return [getattr(self, f"windows_{i}") for i in range(len(self.scales))]

    @property
    def coverages(self) -> list[torch.Tensor]:
        """(N, n_windows) coverage per scale."""
        return [getattr(self, f"coverage_{i}") for i in range(len(self.scales))]

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 1 + N, W) patch embeddings with class token and positions,
        before ``ln_pre`` (the input that every window sequence is cut from)."""
        v = self.visual
        x = v.conv1(pixels).flatten(2).transpose(1, 2)  # (B, N, W)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)

    def _encode_sequences(self, x: torch.Tensor) -> torch.Tensor:
        """(n, L, W) embedded sequences -> (n, L, W) after the transformer and ``ln_post``."""
        v = self.visual
        return v.ln_post(v.transformer(v.ln_pre(v.patch_dropout(x))))

    def forward(self, pixels: torch.Tensor) -> WindowEmbeddings:
        """(B, 3, S, S) CLIP-normalised pixels -> :class:`WindowEmbeddings`."""
        tokens = self.embed(pixels)
        b, _, width = tokens.shape
        full = self._encode_sequences(tokens)
        proj = self.visual.proj
        image = full[:, 0] @ proj
        cls, patches = tokens[:, :1], tokens[:, 1:]
        window_embeddings = []
        for windows in self.windows:
            n_win, k = windows.shape
            cut = patches[:, windows]  # (B, n_win, k, W)
            seq = torch.cat([cls[:, None].expand(b, n_win, 1, width), cut], dim=2)
            out = self._encode_sequences(seq.reshape(b * n_win, 1 + k, width))
            window_embeddings.append((out[:, 0] @ proj).view(b, n_win, -1))
        return WindowEmbeddings(image=image, patches=full[:, 1:], windows=window_embeddings)


# ======================================================================================
# Zero-shot and few-shot maps
# ======================================================================================
def zero_shot_scores(
    embeddings: WindowEmbeddings,
    text_embeddings: torch.Tensor,
    coverages: Sequence[torch.Tensor],
    grid_size: tuple[int, int],
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """WinCLIP's zero-shot map and image score.

    Per scale, window probabilities are aggregated harmonically onto patches; the
    image probability counts as one more scale; scales are combined harmonically.

    Returns:
        map (B, h, w) and image score (B,), both probabilities of "anomalous".
    """
    image_score = anomaly_probability(embeddings.image, text_embeddings, temperature)  # (B,)
    b = image_score.shape[0]
    n = grid_size[0] * grid_size[1]
    per_scale = [image_score[:, None].expand(b, n)]
    for window_emb, cover in zip(embeddings.windows, coverages, strict=True):
        per_scale.append(
            harmonic_aggregation(
                anomaly_probability(window_emb, text_embeddings, temperature), cover
            )
        )
    return harmonic_mean(torch.stack(per_scale)).view(b, *grid_size), image_score


def few_shot_map(
    embeddings: WindowEmbeddings,
    memory: WindowMemory,
    coverages: Sequence[torch.Tensor],
    grid_size: tuple[int, int],
    query_groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """WinCLIP+'s few-shot map: mean over scales of the aggregated association scores.

    Args:
        query_groups: (B,) reference-image ids of the queries, to score the references
            themselves leave-one-image-out (calibration); None for test images.

    Returns:
        (B, h, w) distances in [0, 1].
    """
    b = embeddings.patches.shape[0]
    groups = memory.reference_ids if query_groups is not None else None
    per_scale = [
        visual_association_score(
            embeddings.patches,
            memory.patch_bank,
            query_groups,
            None if groups is None else groups["patches"],
        )
    ]
    for i, (window_emb, cover) in enumerate(zip(embeddings.windows, coverages, strict=True)):
        ref_ids = None if groups is None else groups[f"windows_{i}"]
        scores = visual_association_score(window_emb, memory.window_banks[i], query_groups, ref_ids)
        per_scale.append(harmonic_aggregation(scores, cover))
    return torch.stack(per_scale).mean(dim=0).view(b, *grid_size)


def combine_scores(
    zero_map: torch.Tensor,
    zero_score: torch.Tensor,
    few_map: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-shot alone, or WinCLIP+: mean of the maps; mean of the zero-shot image score
    and the few-shot map's maximum.

    Args:
        zero_map, few_map: (B, h, w). zero_score: (B,).

    Returns:
        grid map (B, h, w) and image score (B,).

    Example:
        >>> z = torch.full((1, 1, 2), 0.5); f = torch.tensor([[[0.1, 0.3]]])
        >>> combine_scores(z, torch.tensor([0.5]), f)
        (tensor([[[0.3000, 0.4000]]]), tensor([0.4000]))
    """
    if few_map is None:
        return zero_map, zero_score
    return (zero_map + few_map) / 2, (zero_score + few_map.amax(dim=(-2, -1))) / 2


@dataclass
class WindowMemory:
    """WinCLIP+'s reference embeddings of k normal images (every patch and window kept).

    ``patch_bank`` (k * N, W): last-layer patch tokens; ``window_banks``: per scale a
    (k * n_windows, D) tensor of window embeddings; ``n_references``: k.
    """

    patch_bank: torch.Tensor
    window_banks: list[torch.Tensor]
    n_references: int
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_references < 1 or self.patch_bank.shape[0] % self.n_references:
            raise MemoryBankError(f"a window memory of {self.patch_bank.shape[0]} patches "
                                  f"cannot hold {self.n_references} reference images")

    @classmethod
    def from_embeddings(cls, embeddings: WindowEmbeddings,
                        metadata: dict[str, Any]) -> WindowMemory:
        """A memory holding every patch and window of the k reference images."""
        patches = embeddings.patches
        banks = [w.reshape(-1, w.shape[-1]) for w in embeddings.windows]
        return cls(patches.reshape(-1, patches.shape[-1]), banks, patches.shape[0], metadata)

    @property
    def size(self) -> int:
        """Number of reference patches (k * N)."""
        return int(self.patch_bank.shape[0])

    @property
    def reference_ids(self) -> dict[str, torch.Tensor]:
        """Reference-image id of every bank row (for leave-one-image-out scoring)."""
        k, dev = self.n_references, self.patch_bank.device
        ids = {"patches": torch.arange(k, device=dev).repeat_interleave(self.size // k)}
        for i, bank in enumerate(self.window_banks):
            ids[f"windows_{i}"] = torch.arange(k, device=dev).repeat_interleave(bank.shape[0] // k)
        return ids


class WindowScorer(Scorer):
    """WinCLIP (zero-shot) and WinCLIP+ (k-shot) as a scorer.

    Branches: ``zero_shot_map`` (probability of "anomalous" from windows vs text) and
    ``few_shot_map`` (distance to the references, with a memory). Their fusion is
    WinCLIP's own, the mean of the two maps, so the fusion weights do not apply; the
    image score is the mean of the zero-shot image score and the few-shot map's maximum.
    Benchmark metrics use WinCLIP's map before post-processing (``raw_map``), as the
    paper and anomalib do. Calibrated normalisation needs k >= 2 references (scored
    leave one image out).
    """

    preset: ClassVar[dict[str, Any]] = {"model_name": "ViT-B-16-plus-240",
                                        "image_size": 240, "layers": (9, 10, 11),
                                        "text_temperature": 0.07, "coreset_ratio": 1.0}
    default_weights = "laion400m_e31"
    branches = ("zero_shot_map", "few_shot_map")
    memory_type = WindowMemory
    scored_map = "raw_map"
    min_calibration_images = 2
    reference_implementation = "anomalib WinClipModel"

    def __init__(self, config: Any, backbone: Any) -> None:
        super().__init__(config, backbone)
        self.encoder = WindowEncoder(backbone.model.visual, config.window_scales)
        self.grid_size = self.encoder.grid_size

    def anchors(self, class_name: str) -> TextAnchors:
        """WinCLIP's full ensemble; raw (unnormalised) prompt embeddings are averaged."""
        return prompt_anchors(self.backbone.encode_text, class_name, WINCLIP_NORMAL_STATES,
                              WINCLIP_ANOMALOUS_STATES, WINCLIP_TEMPLATES, normalize=False)

    def embed(self, pixels: torch.Tensor, progress: bool = False) -> WindowEmbeddings:
        """(n, 3, S, S) -> float32 :class:`WindowEmbeddings`, in batches."""
        with torch.inference_mode():
            parts = batched(self.encoder, pixels, self.config.batch_size, "windows", progress)
        windows = zip(*(p.windows for p in parts), strict=True)
        return WindowEmbeddings(torch.cat([p.image for p in parts]).float(),
                                torch.cat([p.patches for p in parts]).float(),
                                [torch.cat(ws).float() for ws in windows])

    def fit(self, pixels: torch.Tensor, anchors: TextAnchors, fg_masks: torch.Tensor,
            coreset_ratio: float, seed: int,
            progress: bool) -> tuple[WindowMemory, Calibration | None]:
        """Every patch and window of the k references; with k >= 2 their leave-one-image-out
        maps for calibration."""
        emb = self.embed(pixels, progress)
        meta = {"n_images": len(pixels), "seed": seed, "window_scales": list(self.encoder.scales)}
        memory = WindowMemory.from_embeddings(emb, meta)
        if memory.n_references < self.min_calibration_images:
            return memory, None
        ids = torch.arange(memory.n_references, device=emb.image.device)
        zero_map, _ = self._zero_shot(emb, anchors)
        few = few_shot_map(emb, memory, self.encoder.coverages, self.grid_size, query_groups=ids)
        maps = {"zero_shot_map": zero_map, "few_shot_map": few}
        return memory, Calibration.from_normal_maps(maps, fg_masks)

    def _zero_shot(self, emb: WindowEmbeddings,
                   anchors: TextAnchors) -> tuple[torch.Tensor, torch.Tensor]:
        text = anchors.stacked().to(emb.image.device, torch.float32)
        return zero_shot_scores(emb, text, self.encoder.coverages, self.grid_size,
                                self.config.text_temperature)

    def score(self, pixels: torch.Tensor, anchors: TextAnchors,
              memory: WindowMemory | None) -> Scores:
        scales = self.encoder.scales
        if memory is not None and tuple(memory.metadata.get("window_scales", scales)) != scales:
            raise MemoryBankError(f"window memory was built with scales "
                                  f"{tuple(memory.metadata['window_scales'])}, but this model "
                                  f"uses {scales}")
        emb = self.encoder(pixels)
        zero_map, zero_score = self._zero_shot(emb, anchors)
        branches = {"zero_shot_map": zero_map}
        if memory is not None:
            coverages = self.encoder.coverages
            branches["few_shot_map"] = few_shot_map(emb, memory, coverages, self.grid_size)
        _, image_score = combine_scores(zero_map, zero_score, branches.get("few_shot_map"))
        return Scores(branches, zero_score, image_score)

    def fuse(self, branches: dict[str, torch.Tensor], calibration: Calibration | None,
             text_weight: float, nn_weight: float) -> torch.Tensor:
        few = branches.get("few_shot_map")
        return branches["zero_shot_map"] if few is None else (branches["zero_shot_map"] + few) / 2
