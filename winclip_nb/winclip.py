"""``WinCLIP``: the user-facing detector.

:class:`~winclip_nb.core.detector.Detector` (what the notebooks teach) plus what a user
needs around it: weights resolved from names, tags or files (:mod:`winclip_nb.hub`),
images from paths, PIL images or arrays of any mode (:mod:`winclip_nb.data`), results at
each image's own resolution with hotspots, and memory-bank files.

The API of the implementation this project re-implements is kept::

    winclip = WinCLIP(device="cuda")
    normal_anchor, anomalous_anchor = winclip.build_text_anchors("screw")
    winclip.build_normal_memory(train_images, normal_anchor, anomalous_anchor)
    result = winclip.detect(image, normal_anchor, anomalous_anchor)

``build_normal_memory`` returns the class's :class:`FittedClass` and keeps it as
``winclip.fitted``, the class ``detect`` uses unless given another (``fitted=``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from .core.anchors import TextAnchors
from .core.config import WinCLIPConfig
from .core.detector import Detector, FittedClass
from .core.errors import ConfigError
from .core.maps import find_hotspots, foreground_mask, is_texture
from .core.results import DetectionResult
from .core.runtime import map_images, progress

ImageInput = str | os.PathLike | np.ndarray | Any  # Any: PIL.Image.Image


class WinCLIP(Detector):
    """Zero-/few-shot anomaly detector in the WinCLIP style.

    ``method="tokens"`` (default) scores multi-layer patch tokens against text anchors and
    a coreset memory (notebooks 01-04); ``method="windows"`` is WinCLIP / WinCLIP+ proper
    (notebook 07) with the paper's ViT-B-16-plus-240 at 240 px unless told otherwise.

    Args:
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        model_name: open_clip model name.
        pretrained: open_clip tag (``"openai"``), checkpoint path, ``"random"`` or ``"auto"``.
        layers: transformer blocks whose patch tokens are used.
        image_size: model input side in pixels.
        config: base settings; keyword ``overrides`` (any :class:`WinCLIPConfig` field,
            e.g. ``method="windows"``) change single fields.
        backbone: an already built backbone for this config (skips loading one).
    """

    def __init__(
        self,
        device: str | None = None,
        model_name: str | None = None,
        pretrained: str | os.PathLike | None = None,
        layers: Sequence[int] | None = None,
        image_size: int | None = None,
        *,
        config: WinCLIPConfig | None = None,
        backbone: Any = None,
        **overrides: Any,
    ) -> None:
        given = {
            "device": device,
            "model_name": model_name,
            "layers": layers,
            "pretrained": None if pretrained is None else str(pretrained),
            "image_size": image_size,
        }
        changes = {k: v for k, v in given.items() if v is not None} | overrides
        cfg = config.replace(**changes) if config is not None else WinCLIPConfig(**changes)
        if backbone is None:
            from .hub.weights import build_backbone

            backbone = build_backbone(cfg)
        super().__init__(cfg, backbone)
        #: The class ``detect`` uses by default: set by ``build_normal_memory`` / ``load_memory``.
        self.fitted: FittedClass | None = None

    # ---------------------------------------------------------------- basics
    @property
    def method(self) -> str:
        return self.config.method

    @property
    def memory(self) -> Any:
        """The memory of :attr:`fitted` (None: zero-shot)."""
        return None if self.fitted is None else self.fitted.memory

    @property
    def random_weights(self) -> bool:
        return self.backbone.random_weights

    @property
    def weights_label(self) -> str:
        return self.backbone.weights

    def prepare(self, image: ImageInput) -> tuple[np.ndarray, tuple[int, int]]:
        """Decode any image input and resize it: ((S, S, 3) uint8, original (H, W))."""
        from .data.images import load_image

        rgb = load_image(image)
        return self.backbone.resize(rgb), rgb.shape[:2]

    def _resized(self, images: Sequence[ImageInput]) -> np.ndarray:
        return np.stack([p[0] for p in map_images(self.prepare, list(images))])

    # ------------------------------------------------------------- classes
    def build_text_anchors(self, class_name: str) -> TextAnchors:
        """(normal_anchor, anomalous_anchor) of one class; both carry ``class_name``."""
        if not class_name or not str(class_name).strip():
            raise ConfigError(f"class_name must be a non-empty string, got {class_name!r}")
        return self.text_anchors(str(class_name))

    def build_normal_memory(
        self,
        train_images: Sequence[ImageInput],
        normal_anchor: torch.Tensor,
        anomalous_anchor: torch.Tensor,
        coreset_ratio: float | None = None,
        max_images: int | None = None,
        *,
        class_name: str | None = None,
        seed: int | None = None,
        progress: bool = True,
    ) -> FittedClass:
        """Fit the class on its normal images: the method's memory and the calibration
        statistics of those images, kept as :attr:`fitted` and returned.

        The first ``max_images`` images are used (all when None); ``class_name`` defaults
        to the one the anchors carry.
        """
        if max_images is not None and max_images < 1:
            raise ConfigError(f"max_images must be >= 1 or None, got {max_images}")
        images = list(train_images)[:max_images] if max_images else list(train_images)
        if not images:
            raise ConfigError("build_normal_memory needs at least one normal image, got none")
        anchors = TextAnchors(normal_anchor, anomalous_anchor, class_name)
        self.fitted = self.fit_images(
            anchors, images, coreset_ratio=coreset_ratio, seed=seed, progress=progress
        )
        return self.fitted

    def fit_images(
        self,
        anchors: TextAnchors,
        images: Sequence[ImageInput],
        *,
        coreset_ratio: float | None = None,
        seed: int | None = None,
        progress: bool = False,
    ) -> FittedClass:
        """:meth:`fit` on images given as paths, PIL images or arrays (none: zero-shot);
        unlike :meth:`build_normal_memory` it leaves :attr:`fitted` as it is."""
        if not images:
            return FittedClass(anchors)
        return self.fit(
            anchors,
            self._resized(images),
            coreset_ratio=coreset_ratio,
            seed=seed,
            progress=progress,
        )

    def fitted_for(
        self,
        normal_anchor: torch.Tensor | None = None,
        anomalous_anchor: torch.Tensor | None = None,
        class_name: str | None = None,
    ) -> FittedClass:
        """The class to detect with: :attr:`fitted`, with other anchors if given (its memory
        and calibration stay); zero-shot from the anchors when nothing is fitted."""
        if normal_anchor is None or anomalous_anchor is None:
            if self.fitted is None:
                raise ConfigError(
                    "no class to detect: pass the anchors, or fit one with build_normal_memory"
                )
            return self.fitted
        fitted = self.fitted
        if (
            fitted is not None
            and fitted.anchors[0] is normal_anchor
            and fitted.anchors[1] is anomalous_anchor
        ):
            return fitted
        anchors = TextAnchors(normal_anchor, anomalous_anchor, class_name)
        if fitted is None:
            return FittedClass(anchors)
        return FittedClass(anchors, fitted.memory, fitted.calibration)

    # --------------------------------------------------------------- detect
    def detect_resized(
        self,
        resized: np.ndarray | torch.Tensor,
        normal_anchor: torch.Tensor | None = None,
        anomalous_anchor: torch.Tensor | None = None,
        text_weight: float | None = None,
        nn_weight: float | None = None,
        *,
        fitted: FittedClass | None = None,
        **settings: Any,
    ) -> dict[str, Any]:
        """:meth:`detect_batch` on (B, S, S, 3) uint8 or (B, 3, S, S) normalised pixels,
        for ``fitted`` or the class :meth:`fitted_for` the anchors gives."""
        fitted = fitted or self.fitted_for(normal_anchor, anomalous_anchor)
        return self.detect_batch(
            resized, fitted, text_weight=text_weight, nn_weight=nn_weight, **settings
        )

    def detect(
        self,
        image: ImageInput | Sequence[ImageInput],
        normal_anchor: torch.Tensor | None = None,
        anomalous_anchor: torch.Tensor | None = None,
        text_weight: float | None = None,
        nn_weight: float | None = None,
        *,
        fitted: FittedClass | None = None,
        threshold: float | None = None,
        top_k: int | None = None,
        batch_size: int | None = None,
        progress: bool = False,
        **settings: Any,
    ) -> DetectionResult | list[DetectionResult]:
        """Detect anomalies in one image (-> result) or a list of images (-> list).

        Images may be paths, PIL images or numpy arrays of any mode; each map comes back
        at its image's own resolution. ``settings``: ``normalization``, ``sigma``,
        ``fg_threshold``.
        """
        single = not isinstance(image, (list, tuple))
        images = [image] if single else list(image)
        fitted = fitted or self.fitted_for(normal_anchor, anomalous_anchor)
        # a method that scores sets (musc) sees every image at once
        bs = len(images) if self.scorer.scores_sets else batch_size or self.config.batch_size
        results: list[DetectionResult] = []
        starts = range(0, len(images), bs)
        for start in _progress(starts, progress):
            prepared = map_images(self.prepare, images[start : start + bs])
            batch = np.stack([resized for resized, _ in prepared])
            out = self.detect_batch(
                batch, fitted, text_weight=text_weight, nn_weight=nn_weight, **settings
            )
            # one copy of the whole batch to the host, not one per image and map
            out = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in out.items()}
            for i, (_, size) in enumerate(prepared):
                results.append(self._to_result(out, i, size, threshold, top_k))
        return results[0] if single else results

    def score_set(
        self, images: Sequence[ImageInput], class_name: str | None = None, **kwargs: Any
    ) -> list[DetectionResult]:
        """Score unlabelled images together. A method that scores sets (``musc``) compares
        each image with the others (at least ``scorer.min_set_images`` of them) and needs
        no fitted class; any other method detects each image with :attr:`fitted`.
        ``kwargs`` as :meth:`detect`."""
        if not self.scorer.scores_sets:
            return self.detect(list(images), **kwargs)
        fitted = FittedClass(self.scorer.anchors(class_name))
        return self.detect(list(images), fitted=fitted, **kwargs)

    def _to_result(
        self,
        out: dict[str, Any],
        i: int,
        size: tuple[int, int],
        threshold: float | None,
        top_k: int | None,
    ) -> DetectionResult:
        cfg, (h, w) = self.config, size
        anomaly_map = cv2.resize(
            out["anomaly_map"][i].float().numpy(), (w, h), interpolation=cv2.INTER_LINEAR
        )
        fg = out["fg_mask"][i].numpy().astype(np.uint8)
        fg_mask = cv2.resize(fg, (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
        hotspots = find_hotspots(
            anomaly_map,
            cfg.hotspot_threshold if threshold is None else threshold,
            cfg.top_k if top_k is None else top_k,
            cfg.min_hotspot_area,
            fg_mask,
        )
        branches = {k: out[k][i].float().numpy() for k in self.scorer.branches if k in out}
        extras = {"raw_score": float(out["raw_score"][i])} if "raw_score" in out else {}
        return DetectionResult(
            anomaly_map=anomaly_map,
            score=float(out["score"][i]),
            fused_map=out["fused_map"][i].float().numpy(),
            fg_mask=fg_mask,
            hotspots=hotspots,
            normalization=str(out["normalization"]),
            random_weights=self.random_weights,
            branch_maps=branches,
            text_score=None if out["text_score"] is None else float(out["text_score"][i]),
            method=self.method,
            extras=extras,
        )

    def compute_foreground_mask(
        self, img: ImageInput, threshold: float | None = None, class_name: str | None = None
    ) -> np.ndarray:
        """(H, W) bool foreground of an image; all True for texture classes (``class_name``,
        else the fitted class's)."""
        from .data.images import load_image

        name = class_name or (self.fitted.class_name if self.fitted else None)
        rgb = load_image(img)
        if is_texture(name):
            return np.ones(rgb.shape[:2], dtype=bool)
        return foreground_mask(rgb, self.config.fg_threshold if threshold is None else threshold)

    # ---------------------------------------------------------------- files
    def _model_settings(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "method": cfg.method,
            "model_name": cfg.model_name,
            "weights": self.weights_label,
            "layers": list(cfg.layers),
            "image_size": cfg.image_size,
            "window_scales": list(cfg.window_scales),
        }

    def save_memory(self, path: str | Path) -> Path:
        """Save :attr:`fitted` (memory, calibration maps, anchors) as a .safetensors file."""
        from .core.errors import MemoryBankError
        from .data.banks import save_fitted

        if self.fitted is None or self.fitted.memory is None:
            raise MemoryBankError("no memory bank to save: call build_normal_memory first")
        return save_fitted(self.fitted, path, self._model_settings())

    def load_memory(self, path: str | Path) -> FittedClass:
        """Load a saved class as :attr:`fitted`; refuse one made with another model,
        weights, layers, size, method or window scales."""
        from .data.banks import load_fitted

        self.fitted = load_fitted(
            path, self._model_settings(), self.scorer.memory_type, self.device
        )
        return self.fitted


def _progress(starts: range, enabled: bool) -> Any:
    return progress(starts, len(starts), "detect", enabled)
