"""The detector: holds the backbone, the normal memory and the calibration, and runs
stages 01-04 in order.

Example (offline, random weights):
    >>> winclip = WinCLIP(device="cpu", pretrained="random")                # doctest: +SKIP
    >>> normal_anchor, anomalous_anchor = winclip.build_text_anchors("screw")  # doctest: +SKIP
    >>> winclip.build_normal_memory(train_images, normal_anchor, anomalous_anchor)  # doctest: +SKIP
    >>> result = winclip.detect(image, normal_anchor, anomalous_anchor)     # doctest: +SKIP
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import __version__
from .anchors import (
    WINCLIP_ANOMALOUS_STATES,
    WINCLIP_NORMAL_STATES,
    WINCLIP_TEMPLATES,
    average_anchor,
    build_prompts,
    global_text_score,
    text_map,
)
from .backbone import ClipBackbone
from .config import (
    NORMALIZATION_MODES,
    WinCLIPConfig,
    check_coreset_ratio,
    check_fusion_weights,
    method_defaults,
)
from .data import class_kind, load_image
from .errors import ConfigError, MemoryBankError
from .maps import (
    find_hotspots,
    foreground_mask,
    fuse_maps,
    gaussian_smooth,
    image_scores,
    robust_normalize,
    robust_stats,
    upsample_maps,
)
from .memory import NormalMemory, greedy_coreset
from .results import DetectionResult
from .windows import (
    WindowEmbeddings,
    WindowEncoder,
    WindowMemory,
    combine_scores,
    few_shot_map,
    zero_shot_scores,
)

ImageInput = str | os.PathLike | np.ndarray | Any  # Any: PIL.Image.Image

#: Most threads used to decode images and compute foreground masks (OpenCV and PIL
#: release the GIL, so these run in parallel).
MAX_HOST_WORKERS = 8
_HOST_POOL: ThreadPoolExecutor | None = None
_HOST_POOL_LOCK = threading.Lock()


def _host_pool() -> ThreadPoolExecutor:
    """A shared thread pool for per-image host work (decoding, foreground masks)."""
    global _HOST_POOL
    with _HOST_POOL_LOCK:
        if _HOST_POOL is None:
            workers = max(1, min(MAX_HOST_WORKERS, os.cpu_count() or 1))
            _HOST_POOL = ThreadPoolExecutor(workers, thread_name_prefix="winclip_nb")
        return _HOST_POOL


def _map_images(fn: Any, items: Sequence[Any]) -> list[Any]:
    """``[fn(x) for x in items]``, spread over the host pool when there are several."""
    if len(items) < 2 or (os.cpu_count() or 1) < 2:
        return [fn(x) for x in items]
    return list(_host_pool().map(fn, items))


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """numpy -> tensor on ``device``; to CUDA through pinned memory, without a host sync."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _progress(iterable: Iterable, total: int, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False)


class WinCLIP(nn.Module):
    """Zero-/few-shot anomaly detector in the WinCLIP style.

    ``method="tokens"`` (default) scores multi-layer patch tokens against text anchors
    and a coreset memory (notebooks 01-04). ``method="windows"`` is WinCLIP / WinCLIP+
    proper (notebook 07, :mod:`winclip_nb.windows`): window embeddings, harmonic
    aggregation, and the paper's ViT-B-16-plus-240 at 240 px unless told otherwise.

    Args:
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        model_name: open_clip model name.
        pretrained: open_clip tag (``"openai"``), checkpoint path, ``"random"`` or ``"auto"``.
        layers: transformer blocks whose patch tokens are used.
        image_size: model input side in pixels.
        config: base settings; keyword ``overrides`` change single fields.
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
        **overrides: Any,
    ) -> None:
        super().__init__()
        cfg = config or WinCLIPConfig()
        given = {
            "device": device,
            "model_name": model_name,
            "pretrained": None if pretrained is None else str(pretrained),
            "layers": None if layers is None else tuple(layers),
            "image_size": image_size,
        }
        changes = {k: v for k, v in given.items() if v is not None} | overrides
        if config is None and changes.get("method") not in (None, cfg.method):
            # Another method without a config: its own model, weights and size by default.
            changes = method_defaults(changes["method"]) | changes
        self.config = cfg.replace(**changes) if changes else cfg.validate()
        self.backbone = ClipBackbone(
            self.config.model_name,
            self.config.pretrained,
            self.config.layers,
            self.config.image_size,
            self.config.device,
            self.config.seed,
            self.config.precision,
        )
        self.memory: NormalMemory | WindowMemory | None = None
        self.class_name: str | None = None
        #: The window encoder of ``method="windows"`` (None for tokens).
        self.windows: WindowEncoder | None = None
        if self.method == "windows":
            self.windows = WindowEncoder(self.backbone.model.visual, self.config.window_scales)

    # ------------------------------------------------------------------ basics
    @property
    def method(self) -> str:
        """``"tokens"`` or ``"windows"``."""
        return self.config.method

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @property
    def random_weights(self) -> bool:
        """True when the backbone is random-init: results carry no real meaning."""
        return self.backbone.random_weights

    @property
    def weights_label(self) -> str:
        return self.backbone.weights.label

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.backbone.grid_size

    def _is_texture(self, class_name: str | None = None) -> bool:
        name = class_name or self.class_name
        return name is not None and class_kind(name) == "texture"

    def prepare(self, image: ImageInput) -> tuple[np.ndarray, tuple[int, int]]:
        """Decode any image input and resize it: ((S, S, 3) uint8, original (H, W))."""
        rgb = load_image(image)
        return self.backbone.resize(rgb), rgb.shape[:2]

    # ----------------------------------------------------------- 02 anchors
    def build_text_anchors(self, class_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(normal_anchor, anomalous_anchor), each (D,) L2-normalised, for one class."""
        if not class_name or not str(class_name).strip():
            raise ConfigError(f"class_name must be a non-empty string, got {class_name!r}")
        if self.method == "windows":
            # WinCLIP's full ensemble; raw (unnormalised) prompt embeddings are averaged.
            normal_prompts, anomalous_prompts = build_prompts(
                class_name, WINCLIP_NORMAL_STATES, WINCLIP_ANOMALOUS_STATES, WINCLIP_TEMPLATES
            )
        else:
            normal_prompts, anomalous_prompts = build_prompts(class_name)
        embeddings = self.backbone.encode_text(
            normal_prompts + anomalous_prompts, normalize=self.method != "windows"
        )
        n = len(normal_prompts)
        self.class_name = class_name
        return average_anchor(embeddings[:n]), average_anchor(embeddings[n:])

    # ------------------------------------------------------------ 01 tokens
    def extract(
        self,
        images: Sequence[np.ndarray],
        batch_size: int | None = None,
        progress: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Resized (S, S, 3) uint8 images -> tokens (n, L, N, D) and embeddings (n, D)."""
        bs = batch_size or self.config.batch_size
        tokens, embeds = [], []
        starts = range(0, len(images), bs)
        for start in _progress(starts, len(starts), "features", progress):
            batch = np.stack(images[start : start + bs])
            t, e = self.backbone(batch)
            tokens.append(t)
            embeds.append(e)
        return torch.cat(tokens), torch.cat(embeds)

    @torch.inference_mode()
    def extract_windows(
        self,
        images: Sequence[np.ndarray],
        batch_size: int | None = None,
        progress: bool = False,
    ) -> WindowEmbeddings:
        """Resized (S, S, 3) uint8 images -> image, patch and window embeddings (windows)."""
        encoder = self._window_encoder()
        bs = batch_size or self.config.batch_size
        parts: list[WindowEmbeddings] = []
        starts = range(0, len(images), bs)
        for start in _progress(starts, len(starts), "windows", progress):
            pixels = self.backbone.to_pixels(np.stack(images[start : start + bs]))
            emb = encoder(pixels)
            parts.append(
                WindowEmbeddings(
                    emb.image.float(), emb.patches.float(), [w.float() for w in emb.windows]
                )
            )
        return WindowEmbeddings(
            image=torch.cat([p.image for p in parts]),
            patches=torch.cat([p.patches for p in parts]),
            windows=[torch.cat(ws) for ws in zip(*(p.windows for p in parts), strict=True)],
        )

    def _window_encoder(self) -> WindowEncoder:
        if self.windows is None:
            raise ConfigError(
                f"this WinCLIP uses method={self.method!r}; window embeddings need "
                "WinCLIP(method='windows')"
            )
        return self.windows

    # ------------------------------------------------------------ 03 memory
    def build_normal_memory(
        self,
        train_images: Sequence[ImageInput],
        normal_anchor: torch.Tensor,
        anomalous_anchor: torch.Tensor,
        coreset_ratio: float | None = None,
        max_images: int | None = None,
        *,
        seed: int | None = None,
        progress: bool = True,
    ) -> NormalMemory:
        """Coreset memory of normal patches, plus leave-one-out calibration maps.

        The first ``max_images`` images are used (all when None). The coreset is
        chosen once on the layer-concatenated tokens, so every layer keeps the same
        patch positions.
        """
        ratio = check_coreset_ratio(
            self.config.coreset_ratio if coreset_ratio is None else coreset_ratio
        )
        if max_images is not None and max_images < 1:
            raise ConfigError(f"max_images must be >= 1 or None, got {max_images}")
        images = list(train_images)[:max_images] if max_images else list(train_images)
        if not images:
            raise ConfigError("build_normal_memory needs at least one normal image, got none")
        seed = self.config.seed if seed is None else int(seed)
        resized = [prepared[0] for prepared in _map_images(self.prepare, images)]
        fg_work = self._foreground_masks(resized, self.config.fg_threshold)
        if self.method == "windows":
            return self._build_window_memory(
                resized, fg_work, normal_anchor, anomalous_anchor, seed, progress
            )
        tokens, _ = self.extract(resized, progress=progress)  # (n, L, N, D)
        n_img, n_layers, n_patch, dim = tokens.shape

        flat = tokens.permute(0, 2, 1, 3).reshape(n_img * n_patch, n_layers * dim)
        selected = greedy_coreset(flat, ratio, self.config.coreset_projection_dim, seed)
        bank = tokens.permute(1, 0, 2, 3).reshape(n_layers, n_img * n_patch, dim)[:, selected]
        memory = NormalMemory(
            bank.contiguous(),
            source_image=selected // n_patch,
            source_patch=selected,
            metadata=self._memory_metadata(ratio, n_img, seed),
        )
        # Leave-one-image-out maps of the training images (one image: leave one patch out).
        groups = torch.arange(n_img * n_patch, device=tokens.device)
        query_groups = groups // n_patch if n_img > 1 else groups
        memory_groups = memory.source_image if n_img > 1 else memory.source_patch
        h, w = self.grid_size
        nn_train = memory.nn_map(
            tokens, self.config.nn_chunk_size, query_groups, memory_groups.to(tokens.device)
        )
        memory.train_nn_maps = nn_train.view(n_img, h, w).cpu()
        txt = text_map(
            tokens,
            normal_anchor.to(tokens),
            anomalous_anchor.to(tokens),
            self.config.text_temperature,
        )
        memory.train_text_maps = txt.view(n_img, h, w).cpu()
        memory.train_fg_masks = torch.from_numpy(fg_work.astype(np.uint8))
        self.memory = memory
        return memory

    def _build_window_memory(
        self,
        resized: list[np.ndarray],
        fg_work: np.ndarray,
        normal_anchor: torch.Tensor,
        anomalous_anchor: torch.Tensor,
        seed: int,
        progress: bool,
    ) -> WindowMemory:
        """WinCLIP+ reference memory: every patch and window of the k images is kept.

        With k >= 2 the references are also scored leave-one-image-out (zero-shot map
        plus few-shot map against the other references), for ``calibrated`` maps.
        """
        encoder = self._window_encoder()
        emb = self.extract_windows(resized, progress=progress)
        metadata = self._memory_metadata(1.0, len(resized), seed)
        metadata["window_scales"] = list(self.config.window_scales)
        memory = WindowMemory.from_embeddings(emb, metadata)
        k = len(resized)
        if k >= 2:
            text = torch.stack([normal_anchor, anomalous_anchor]).to(emb.image)
            zero_map, zero_score = zero_shot_scores(
                emb, text, encoder.coverages, self.grid_size, self.config.window_temperature
            )
            ids = torch.arange(k, device=emb.image.device)
            few = few_shot_map(emb, memory, encoder.coverages, self.grid_size, query_groups=ids)
            memory.train_maps = combine_scores(zero_map, zero_score, few)[0].cpu()
        memory.train_fg_masks = torch.from_numpy(fg_work.astype(np.uint8))
        self.memory = memory
        return memory

    def _memory_metadata(self, ratio: float, n_images: int, seed: int) -> dict[str, Any]:
        return {
            "method": self.method,
            "model_name": self.config.model_name,
            "weights": self.weights_label,
            "random_weights": self.random_weights,
            "layers": list(self.config.layers),
            "image_size": self.config.image_size,
            "class_name": self.class_name,
            "coreset_ratio": ratio,
            "n_images": n_images,
            "seed": seed,
            "fg_threshold": self.config.fg_threshold,
            "package_version": __version__,
        }

    def save_memory(self, path: str | Path) -> Path:
        """Save the memory bank (safetensors + JSON metadata)."""
        if self.memory is None:
            raise MemoryBankError("no memory bank to save: call build_normal_memory first")
        return self.memory.save(path)

    def load_memory(self, path: str | Path) -> NormalMemory:
        """Load a memory bank; refuse one made with another model, weights or layers."""
        expected = {
            "model_name": self.config.model_name,
            "weights": self.weights_label,
            "layers": list(self.config.layers),
            "image_size": self.config.image_size,
        }
        if self.method == "windows":
            expected["window_scales"] = list(self.config.window_scales)
            memory = WindowMemory.load(path, expected)
        else:
            memory = NormalMemory.load(path, expected)
        self.memory = memory.to(self.device)
        self.class_name = self.class_name or memory.metadata.get("class_name")
        return self.memory

    # ------------------------------------------------------ 04 calibration
    def _foreground_masks(self, images: Sequence[np.ndarray], threshold: float) -> np.ndarray:
        """(B, S, S) bool foreground masks of resized images, in parallel on the host."""
        texture = self._is_texture()
        if texture:
            return np.ones((len(images), *np.shape(images[0])[:2]), dtype=bool)
        return np.stack(_map_images(lambda img: foreground_mask(img, threshold, False), images))

    def _patch_fg(self, fg_work: torch.Tensor) -> torch.Tensor:
        """(n, S, S) masks -> (n, h, w) bool: patches at least half foreground."""
        pooled = F.adaptive_avg_pool2d(fg_work[:, None].float(), self.grid_size)[:, 0]
        return pooled >= 0.5

    def calibration(self, text_weight: float, nn_weight: float) -> dict[str, Any]:
        """Branch statistics and fused-map statistics of the normal training images.

        Returns a dict with ``text_stats``, ``nn_stats`` (median, sigma) over
        foreground patches and ``map_stats`` over foreground pixels of the
        fused, upsampled training maps.
        """
        key = (float(text_weight), float(nn_weight))
        mem = self.memory
        if not isinstance(mem, NormalMemory) or mem.train_nn_maps.numel() == 0:
            raise MemoryBankError("no calibration data: build_normal_memory first")
        if key in mem.calibration_cache:
            return mem.calibration_cache[key]
        fg_work = mem.train_fg_masks.bool()
        fg_patch = self._patch_fg(fg_work)
        text_stats = robust_stats(mem.train_text_maps[fg_patch])
        nn_stats = robust_stats(mem.train_nn_maps[fg_patch])
        fused = fuse_maps(
            mem.train_text_maps, mem.train_nn_maps, text_weight, nn_weight, text_stats, nn_stats
        )
        size = (self.config.image_size, self.config.image_size)
        map_stats = robust_stats(upsample_maps(fused, size)[fg_work])
        # Kept on the model's device, so detection never copies them again.
        computed = {"text_stats": text_stats, "nn_stats": nn_stats, "map_stats": map_stats}
        stats = {name: tuple(v.to(self.device) for v in pair) for name, pair in computed.items()}
        mem.calibration_cache[key] = stats
        return stats

    def _window_calibration(self, mem: WindowMemory) -> tuple[torch.Tensor, torch.Tensor]:
        """(median, sigma) over foreground pixels of the references' leave-one-out maps."""
        if "map_stats" not in mem.calibration_cache:
            fg_work = mem.train_fg_masks.bool()
            size = (self.config.image_size, self.config.image_size)
            center, scale = robust_stats(upsample_maps(mem.train_maps, size)[fg_work])
            mem.calibration_cache["map_stats"] = (center.to(self.device), scale.to(self.device))
        return mem.calibration_cache["map_stats"]

    # ---------------------------------------------------------- 01-04 detect
    @torch.inference_mode()
    def detect_resized(
        self,
        resized: np.ndarray | torch.Tensor,
        normal_anchor: torch.Tensor,
        anomalous_anchor: torch.Tensor,
        text_weight: float | None = None,
        nn_weight: float | None = None,
        *,
        normalization: str | None = None,
        sigma: float | None = None,
        fg_threshold: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run stages 01-04 on a batch of resized images, all on the model's device.

        Args:
            resized: (B, S, S, 3) uint8.

        Returns:
            dict of tensors: ``text_map``, ``nn_map`` (or None), ``fused_map`` (B, h, w);
            ``anomaly_map`` (B, S, S) normalised and smoothed; ``fg_mask`` (B, S, S);
            ``score`` and ``text_score`` (B,). With ``method="windows"`` also ``raw_map``
            (B, S, S) and ``raw_score`` (B,): WinCLIP's own map and image score (what
            anomalib's WinClipModel returns as ``anomaly_map`` and ``pred_score``);
            ``text_map`` / ``nn_map`` are then the zero-shot / few-shot grid maps,
            ``fused_map`` their WinCLIP combination, and ``score`` is ``raw_score``.
        """
        cfg = self.config
        tw, nw = check_fusion_weights(
            cfg.text_weight if text_weight is None else text_weight,
            cfg.nn_weight if nn_weight is None else nn_weight,
        )
        mode = normalization or cfg.normalization
        if mode not in NORMALIZATION_MODES:
            raise ConfigError(f"normalization must be one of {NORMALIZATION_MODES}, got {mode!r}")
        sigma = cfg.sigma if sigma is None else float(sigma)
        fg_thr = cfg.fg_threshold if fg_threshold is None else float(fg_threshold)

        # Foreground masks are OpenCV work on the host: on CPU they run first (in
        # parallel over images); on CUDA they overlap the queued GPU work below.
        n_images, side = int(resized.shape[0]), int(resized.shape[1])
        fg_pending: list[Future] = []
        if self._is_texture():
            fg = torch.ones((n_images, side, side), dtype=torch.bool, device=self.device)
        else:
            images_np = resized.cpu().numpy() if isinstance(resized, torch.Tensor) else resized
            if self.device.type == "cuda":
                pool = _host_pool()
                fg_pending = [pool.submit(foreground_mask, img, fg_thr) for img in images_np]
            else:
                fg = _to_device(self._foreground_masks(images_np, fg_thr), self.device)

        if self.method == "windows":
            if fg_pending:
                fg = _to_device(np.stack([job.result() for job in fg_pending]), self.device)
            return self._detect_windows(
                resized,
                normal_anchor,
                anomalous_anchor,
                fg,
                mode,
                sigma,  # type: ignore[arg-type]
            )
        tokens, image_embedding = self.backbone(resized)
        b = tokens.shape[0]
        h, w = self.grid_size
        na, aa = normal_anchor.to(tokens), anomalous_anchor.to(tokens)
        txt = text_map(tokens, na, aa, cfg.text_temperature).view(b, h, w)
        text_score = global_text_score(image_embedding, na, aa, cfg.text_temperature)

        nn_map = None
        if self.memory is not None:
            nn_map = self.memory.nn_map(tokens, cfg.nn_chunk_size).view(b, h, w)
        if fg_pending:
            fg = _to_device(np.stack([job.result() for job in fg_pending]), self.device)
        out = self.postprocess(txt, nn_map, fg, text_score, tw, nw, mode, sigma)
        return {"text_map": txt, "nn_map": nn_map, "text_score": text_score, **out}

    def _detect_windows(
        self,
        resized: np.ndarray | torch.Tensor,
        normal_anchor: torch.Tensor,
        anomalous_anchor: torch.Tensor,
        fg: torch.Tensor,
        normalization: str,
        sigma: float,
    ) -> dict[str, Any]:
        """WinCLIP / WinCLIP+ maps of a batch, then the usual stage-04 post-processing."""
        encoder = self._window_encoder()
        if isinstance(self.memory, WindowMemory):
            self.memory.check_layout(encoder)
        elif self.memory is not None:
            raise MemoryBankError(
                "this memory was built by method='tokens'; rebuild it with method='windows'"
            )
        emb = encoder(self.backbone.to_pixels(resized))
        text = torch.stack([normal_anchor, anomalous_anchor]).to(self.device, torch.float32)
        zero_map, zero_score = zero_shot_scores(
            emb, text, encoder.coverages, self.grid_size, self.config.window_temperature
        )
        few = None
        if isinstance(self.memory, WindowMemory):
            few = few_shot_map(emb, self.memory, encoder.coverages, self.grid_size)
        grid_map, raw_score = combine_scores(zero_map, zero_score, few)
        side = self.config.image_size
        raw_map = upsample_maps(grid_map, (side, side))
        mode = normalization
        has_train_maps = isinstance(self.memory, WindowMemory) and self.memory.train_maps.numel()
        if mode == "calibrated" and not has_train_maps:
            warnings.warn(
                "calibrated normalisation needs >= 2 reference images with method='windows'; "
                "using per_image",
                stacklevel=3,
            )
            mode = "per_image"
        if mode == "calibrated":
            center, scale = self._window_calibration(self.memory)  # type: ignore[arg-type]
            normed = robust_normalize(raw_map, fg, center, scale)
        else:
            normed = robust_normalize(raw_map, fg)
        return {
            "text_map": zero_map,
            "nn_map": few,
            "text_score": zero_score,
            "fused_map": grid_map,
            "raw_map": raw_map,
            "raw_score": raw_score,
            "anomaly_map": gaussian_smooth(normed, sigma),
            "fg_mask": fg,
            "score": raw_score,
            "normalization": mode,
        }

    def postprocess(
        self,
        text_map: torch.Tensor,
        nn_map: torch.Tensor | None,
        fg_mask: torch.Tensor,
        text_score: torch.Tensor,
        text_weight: float,
        nn_weight: float,
        normalization: str,
        sigma: float,
    ) -> dict[str, Any]:
        """Stage 04 on branch maps: fuse, upsample, normalise, smooth, score.

        Args:
            text_map, nn_map: (B, h, w); ``nn_map`` None in zero-shot mode.
            fg_mask: (B, S, S) bool. text_score: (B,).

        Returns:
            ``fused_map`` (B, h, w), ``anomaly_map`` (B, S, S), ``fg_mask``, ``score`` (B,)
            and ``normalization`` (the mode used: ``per_image`` in zero-shot).
        """
        cfg = self.config
        mode = normalization
        if nn_map is None:
            fused = text_map
            if mode == "calibrated":
                warnings.warn(
                    "calibrated normalisation needs a normal memory; using per_image (zero-shot)",
                    stacklevel=3,
                )
                mode = "per_image"
        else:
            stats = self.calibration(text_weight, nn_weight)
            fused = fuse_maps(
                text_map, nn_map, text_weight, nn_weight, stats["text_stats"], stats["nn_stats"]
            )
        up = upsample_maps(fused, (cfg.image_size, cfg.image_size))
        if mode == "calibrated":
            center, scale = stats["map_stats"]
            normed = robust_normalize(up, fg_mask, center, scale)
        else:
            normed = robust_normalize(up, fg_mask)
        smoothed = gaussian_smooth(normed, sigma)
        if nn_map is None:
            score = text_score
        else:
            score = image_scores(smoothed, fg_mask, cfg.score_top_fraction)
        return {
            "fused_map": fused,
            "anomaly_map": smoothed,
            "fg_mask": fg_mask,
            "score": score,
            "normalization": mode,
        }

    def detect(
        self,
        image: ImageInput | Sequence[ImageInput],
        normal_anchor: torch.Tensor,
        anomalous_anchor: torch.Tensor,
        text_weight: float | None = None,
        nn_weight: float | None = None,
        *,
        normalization: str | None = None,
        sigma: float | None = None,
        fg_threshold: float | None = None,
        threshold: float | None = None,
        top_k: int | None = None,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> DetectionResult | list[DetectionResult]:
        """Detect anomalies in one image (-> result) or a list of images (-> list).

        Images may be paths, PIL images or numpy arrays of any mode. The anomaly
        map comes back at each image's own resolution.
        """
        single = not isinstance(image, (list, tuple))
        images = [image] if single else list(image)
        bs = batch_size or self.config.batch_size
        results: list[DetectionResult] = []
        starts = range(0, len(images), bs)
        for start in _progress(starts, len(starts), "detect", progress):
            prepared = _map_images(self.prepare, images[start : start + bs])
            batch = np.stack([p[0] for p in prepared])
            out = self.detect_resized(
                batch,
                normal_anchor,
                anomalous_anchor,
                text_weight,
                nn_weight,
                normalization=normalization,
                sigma=sigma,
                fg_threshold=fg_threshold,
            )
            # One copy of the whole batch to the host, not one per image and map.
            out = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in out.items()}
            for i, (_, orig_size) in enumerate(prepared):
                results.append(self._to_result(out, i, orig_size, threshold, top_k))
        return results[0] if single else results

    def _to_result(
        self,
        out: dict[str, torch.Tensor],
        i: int,
        orig_size: tuple[int, int],
        threshold: float | None,
        top_k: int | None,
    ) -> DetectionResult:
        cfg = self.config
        h, w = orig_size
        anomaly_map = cv2.resize(
            out["anomaly_map"][i].float().cpu().numpy(), (w, h), interpolation=cv2.INTER_LINEAR
        )
        fg_mask = cv2.resize(
            out["fg_mask"][i].cpu().numpy().astype(np.uint8),
            (w, h),
            interpolation=cv2.INTER_NEAREST,
        ).astype(bool)
        hotspots = find_hotspots(
            anomaly_map,
            cfg.hotspot_threshold if threshold is None else threshold,
            cfg.top_k if top_k is None else top_k,
            cfg.min_hotspot_area,
            fg_mask,
        )
        nn_map = out["nn_map"]
        extras: dict[str, Any] = {"method": self.method}
        if "raw_score" in out:
            extras["raw_score"] = float(out["raw_score"][i])
        return DetectionResult(
            anomaly_map=anomaly_map,
            score=float(out["score"][i]),
            text_map=out["text_map"][i].float().cpu().numpy(),
            nn_map=None if nn_map is None else nn_map[i].float().cpu().numpy(),
            fused_map=out["fused_map"][i].float().cpu().numpy(),
            fg_mask=fg_mask,
            hotspots=hotspots,
            text_score=float(out["text_score"][i]),
            normalization=str(out["normalization"]),
            random_weights=self.random_weights,
            extras=extras,
        )

    def compute_foreground_mask(
        self,
        img: ImageInput,
        threshold: float | None = None,
        class_name: str | None = None,
    ) -> np.ndarray:
        """(H, W) bool foreground of an image; all True for texture classes."""
        rgb = load_image(img)
        thr = self.config.fg_threshold if threshold is None else threshold
        return foreground_mask(rgb, thr, self._is_texture(class_name))
