"""The detector: a backbone, a scorer, and the post-processing every method shares.

Data flows one way: images -> branch maps (the scorer) -> fused map -> upsampled,
normalised, smoothed map -> image score (and, in :class:`winclip_nb.WinCLIP`, hotspots
and reports). What a class needs is created explicitly and passed along:
:meth:`Detector.fit` returns a :class:`FittedClass` (anchors with their class name,
memory, calibration) and :meth:`Detector.detect_batch` reads only what it is given.

Example (offline, random weights; ``winclip_nb.WinCLIP`` builds the backbone):
    >>> detector = WinCLIP(device="cpu", pretrained="random")             # doctest: +SKIP
    >>> anchors = detector.text_anchors("screw")                           # doctest: +SKIP
    >>> fitted = detector.fit(anchors, train_batch)        # (n, S, S, 3) uint8  # doctest: +SKIP
    >>> out = detector.detect_batch(test_batch, fitted)                    # doctest: +SKIP
    >>> out["anomaly_map"].shape, out["score"].shape                       # doctest: +SKIP
    (torch.Size([B, 224, 224]), torch.Size([B]))
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .anchors import TextAnchors
from .calibration import Calibration, resolve_normalization
from .config import WinCLIPConfig
from .errors import MemoryBankError
from .maps import (
    foreground_mask,
    gaussian_smooth,
    image_scores,
    is_texture,
    robust_normalize,
    upsample_maps,
)
from .runtime import host_pool, map_images, to_device
from .scorers import SCORERS, Scorer, Scores, scorer_class


@dataclass
class FittedClass:
    """Everything detection needs about one class: its text anchors (which carry the
    class name), the scorer's memory of normal images (None: zero-shot) and the
    calibration statistics of those images (None without a memory or with too few)."""

    anchors: TextAnchors
    memory: Any = None
    calibration: Calibration | None = None

    @property
    def class_name(self) -> str | None:
        return self.anchors.class_name


class Detector:
    """Runs one method (a scorer) and the shared post-processing on batches of images.

    Args:
        config: a validated :class:`WinCLIPConfig` (its ``method`` picks the scorer).
        backbone: a :class:`~winclip_nb.core.backbone.ClipBackbone`.
    """

    def __init__(self, config: WinCLIPConfig, backbone: Any) -> None:
        self.config = config
        self.backbone = backbone
        self.scorer: Scorer = scorer_class(config.method)(config, backbone)

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.backbone.grid_size

    def text_anchors(self, class_name: str) -> TextAnchors:
        """The method's (normal, anomalous) anchors for ``class_name``."""
        return self.scorer.anchors(class_name)

    def foreground(self, images: np.ndarray, class_name: str | None,
                   threshold: float) -> np.ndarray:
        """(B, S, S, 3) uint8 -> (B, S, S) bool foreground (all True for texture classes)."""
        if is_texture(class_name):
            return np.ones(images.shape[:3], dtype=bool)
        return np.stack(map_images(lambda img: foreground_mask(img, threshold), list(images)))

    def _foreground_later(self, images: np.ndarray, class_name: str | None,
                          threshold: float) -> Callable[[], np.ndarray]:
        """The foreground masks, computed now on a CPU device and on the host pool while
        the GPU works on a CUDA one; call the result to get them."""
        if self.device.type != "cuda" or is_texture(class_name):
            masks = self.foreground(images, class_name, threshold)
            return lambda: masks
        jobs = [host_pool().submit(foreground_mask, img, threshold) for img in images]
        return lambda: np.stack([job.result() for job in jobs])

    def fit(self, anchors: TextAnchors, images: np.ndarray | torch.Tensor, *,
            coreset_ratio: float | None = None, seed: int | None = None,
            progress: bool = False) -> FittedClass:
        """A :class:`FittedClass` from (n, S, S, 3) uint8 normal images (n = 0: zero-shot)."""
        if len(images) == 0:
            return FittedClass(anchors)
        cfg = self.config
        ratio = cfg.replace(coreset_ratio=cfg.coreset_ratio if coreset_ratio is None
                            else coreset_ratio).coreset_ratio  # validated
        fg = self.foreground(self._as_images(images), anchors.class_name, cfg.fg_threshold)
        seed = cfg.seed if seed is None else int(seed)
        with torch.inference_mode():
            pixels = self.backbone.to_pixels(images)
            memory, calibration = self.scorer.fit(pixels, anchors, to_device(fg, self.device),
                                                  ratio, seed, progress)
        return FittedClass(anchors, memory, calibration)

    def _as_images(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 (B, S, S, 3) images, from themselves or from normalised float pixels."""
        tensor = torch.as_tensor(images)
        if tensor.is_floating_point():
            return self.backbone.to_images(tensor)
        return tensor.cpu().numpy()

    @torch.inference_mode()
    def detect_batch(self, images: np.ndarray | torch.Tensor, fitted: FittedClass, *,
                     text_weight: float | None = None, nn_weight: float | None = None,
                     normalization: str | None = None, sigma: float | None = None,
                     fg_threshold: float | None = None) -> dict[str, Any]:
        """Score a batch and post-process it, all on the model's device.

        Args:
            images: (B, S, S, 3) uint8, or (B, 3, S, S) float pixels normalised with the
                backbone's mean and std.
            fitted: the class's anchors, memory and calibration.

        Returns:
            the scorer's branch maps (B, h, w) by name, ``text_score`` (B,), and from
            :meth:`postprocess`: ``fused_map`` (B, h, w), ``raw_map`` and ``anomaly_map``
            (B, S, S), ``fg_mask`` (B, S, S) bool, ``score`` (B,), ``normalization``;
            ``raw_score`` (B,) where the method has its own image score.
        """
        cfg = self.config
        if not self.scorer.uses_fusion_weights and (text_weight, nn_weight) != (None, None):
            warnings.warn(f"fusion weights do not apply to method {cfg.method!r}: it fuses "
                          "its maps its own way", stacklevel=3)
        settings = cfg.replace(**{k: v for k, v in {
            "text_weight": text_weight, "nn_weight": nn_weight, "normalization": normalization,
            "sigma": sigma, "fg_threshold": fg_threshold}.items() if v is not None})
        self._check_memory(fitted.memory)
        images_u8 = self._as_images(images)
        masks = self._foreground_later(images_u8, fitted.class_name, settings.fg_threshold)
        scores = self.scorer.score(self.backbone.to_pixels(images), fitted.anchors, fitted.memory)
        fg = to_device(masks(), self.device)
        out = self.postprocess(scores, fg, fitted, settings)
        return {**scores.branches, "text_score": scores.text_score, **out}

    def _check_memory(self, memory: Any) -> None:
        """Refuse a memory built by another method (clearly, not with an AttributeError)."""
        if memory is None or isinstance(memory, self.scorer.memory_type):
            return
        built_by = [m for m in SCORERS if isinstance(memory, scorer_class(m).memory_type)]
        raise MemoryBankError(
            f"this memory ({type(memory).__name__}) was built by method="
            f"{built_by[0] if built_by else 'unknown'!r}; rebuild it with "
            f"method={self.config.method!r}"
        )

    def postprocess(self, scores: Scores, fg_mask: torch.Tensor, fitted: FittedClass,
                    settings: WinCLIPConfig | None = None) -> dict[str, Any]:
        """Fuse, upsample, normalise, smooth and score (B, h, w) branch maps.

        ``settings`` (default: the detector's config) gives the fusion weights,
        normalisation, sigma and score fraction; ``fg_mask`` is (B, S, S) bool.
        """
        s = settings or self.config
        weights = (s.text_weight, s.nn_weight)

        def fuse(maps: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.scorer.fuse(maps, fitted.calibration, *weights)

        fused = fuse(scores.branches)
        raw = upsample_maps(fused, tuple(fg_mask.shape[-2:]))
        mode = resolve_normalization(s.normalization, fitted.calibration,
                                     can_calibrate=not self.scorer.scores_sets)
        calibrated = mode == "calibrated"
        center, scale = fitted.calibration.map_stats(weights, fuse) if calibrated else (None, None)
        smoothed = gaussian_smooth(robust_normalize(raw, fg_mask, center, scale), s.sigma)
        own = scores.image_score
        score = own if own is not None else image_scores(smoothed, fg_mask, s.score_top_fraction)
        out = {"fused_map": fused, "raw_map": raw, "anomaly_map": smoothed, "fg_mask": fg_mask,
               "score": score, "normalization": mode}
        return out if own is None else {**out, "raw_score": own}
