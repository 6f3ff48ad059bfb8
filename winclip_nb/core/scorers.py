"""Methods as scorers: one small interface, one file per method, one registry line each.

A scorer turns images into *branch maps* on the patch grid and fuses them into one map;
the detector does everything else (foreground, upsampling, normalisation, smoothing,
image score, hotspots) the same way for every method. What differs between methods is
declared as class attributes, so nothing outside a scorer asks which method it is:

- ``preset``: the method's model, input size, layers, text temperature and coreset
  ratio (settings left None take these); ``default_weights`` its pretrained tag;
- ``branches``: the names of its maps (a name means the same thing for every method);
- ``scored_map``: the map benchmark metrics use (``anomaly_map`` or ``raw_map``);
- ``uses_fusion_weights``, ``uses_coreset``, ``min_calibration_images``;
- ``backbone_family``: who builds its model (``open_clip`` or ``timm``);
- ``needs_references``: True when it needs k >= 1 normal images, False when it takes
  none (k = 0), None when both work;
- ``scores_sets``: True when a batch is scored as a set, each image against the others
  (it then needs at least ``min_set_images`` images at once);
- ``memory_type``: the dataclass of its memory (what a saved bank is read back into);
- ``reference_implementation``: the outside implementation it is tested against, if any.

:class:`TokenScorer` is the token pipeline of notebooks 01-04; the windows method
(WinCLIP, notebook 07) is :class:`~winclip_nb.core.windows.WindowScorer`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .anchors import (
    ANOMALOUS_STATES,
    NORMAL_STATES,
    TEMPLATES,
    TextAnchors,
    anomaly_probability,
    prompt_anchors,
    text_map,
)
from .calibration import Calibration
from .errors import ConfigError
from .maps import fuse_maps
from .memory import NormalMemory, greedy_coreset
from .runtime import batched

#: Method name -> "module:class" of its scorer (imported when first used).
SCORERS: dict[str, str] = {
    "tokens": "winclip_nb.core.scorers:TokenScorer",
    "windows": "winclip_nb.core.windows:WindowScorer",
    "anomalydino": "winclip_nb.core.anomalydino:AnomalyDINOScorer",
    "musc": "winclip_nb.core.musc:MuScScorer",
}


def scorer_class(method: str) -> type[Scorer]:
    """The scorer class registered for ``method``.

    >>> scorer_class("tokens").branches
    ('text_map', 'nn_map')
    """
    if method not in SCORERS:
        raise ConfigError(f"method must be one of {tuple(SCORERS)}, got {method!r}")
    module, name = SCORERS[method].split(":")
    return getattr(importlib.import_module(module), name)


@dataclass
class Scores:
    """A scorer's output for B images: ``branches`` name -> (B, h, w) maps;
    ``text_score`` (B,) the image embedding's probability of "anomalous" (None: no text);
    ``image_score`` (B,) the method's own image score, or None (then the detector
    scores the final map)."""

    branches: dict[str, torch.Tensor]
    text_score: torch.Tensor | None = None
    image_score: torch.Tensor | None = None


class Scorer:
    """What a method implements; the class attributes (see the module docstring) say what
    it needs and gives, with the defaults of most methods."""

    preset: ClassVar[dict[str, Any]]
    default_weights: ClassVar[str]
    branches: ClassVar[tuple[str, ...]]
    memory_type: ClassVar[type]
    scored_map: ClassVar[str] = "anomaly_map"
    uses_fusion_weights: ClassVar[bool] = False
    uses_coreset: ClassVar[bool] = False
    min_calibration_images: ClassVar[int] = 1
    reference_implementation: ClassVar[str | None] = None
    backbone_family: ClassVar[str] = "open_clip"
    needs_references: ClassVar[bool | None] = None
    scores_sets: ClassVar[bool] = False
    min_set_images: ClassVar[int] = 1

    def __init__(self, config: Any, backbone: Any) -> None:
        self.config, self.backbone = config, backbone

    def anchors(self, class_name: str) -> TextAnchors:
        """The class's (normal, anomalous) text anchors; empty ones for a method without
        text (they still carry the class name)."""
        return TextAnchors(torch.empty(0), torch.empty(0), class_name)

    def fit(self, pixels: torch.Tensor, anchors: TextAnchors, fg_masks: torch.Tensor,
            coreset_ratio: float, seed: int, progress: bool) -> tuple[Any, Calibration | None]:
        """(n, 3, S, S) normal images -> (memory, calibration or None)."""
        raise NotImplementedError

    def score(self, pixels: torch.Tensor, anchors: TextAnchors, memory: Any) -> Scores:
        """(B, 3, S, S) images -> :class:`Scores` (memory None: zero-shot)."""
        raise NotImplementedError

    def fuse(self, branches: dict[str, torch.Tensor], calibration: Calibration | None,
             text_weight: float, nn_weight: float) -> torch.Tensor:
        """Branch maps -> one (B, h, w) map."""
        raise NotImplementedError


class TokenScorer(Scorer):
    """Multi-layer patch tokens vs text anchors and a coreset memory (notebooks 01-04).

    ``text_map``: per-patch probability of "anomalous" (layers averaged); ``nn_map``:
    L2 distance to the nearest memory patch (layers averaged). Fusion z-scores both
    with the normal images' statistics and takes their weighted mean.
    """

    preset: ClassVar[dict[str, Any]] = {"model_name": "ViT-B-16", "image_size": 224,
                                        "layers": (9, 10, 11), "text_temperature": 0.01,
                                        "coreset_ratio": 0.1}
    default_weights = "openai"
    branches = ("text_map", "nn_map")
    memory_type = NormalMemory
    uses_fusion_weights = True
    uses_coreset = True

    def anchors(self, class_name: str) -> TextAnchors:
        encode = self.backbone.encode_text
        return prompt_anchors(encode, class_name, NORMAL_STATES, ANOMALOUS_STATES, TEMPLATES)

    def fit(self, pixels: torch.Tensor, anchors: TextAnchors, fg_masks: torch.Tensor,
            coreset_ratio: float, seed: int, progress: bool) -> tuple[NormalMemory, Calibration]:
        """Coreset memory, chosen once on the layer-concatenated tokens (so every layer keeps
        the same positions), and the leave-one-image-out normal maps (one image: leave one
        patch out)."""
        cfg = self.config
        tokens = torch.cat(batched(lambda b: self.backbone(b)[0], pixels, cfg.batch_size,
                                   "features", progress))  # (n, L, N, D)
        n_img, n_layers, n_patch, dim = tokens.shape
        flat = tokens.permute(0, 2, 1, 3).reshape(n_img * n_patch, n_layers * dim)
        picks = greedy_coreset(flat, coreset_ratio, cfg.coreset_projection_dim, seed)
        bank = tokens.permute(1, 0, 2, 3).reshape(n_layers, n_img * n_patch, dim)[:, picks]
        meta = {"coreset_ratio": coreset_ratio, "n_images": n_img, "seed": seed}
        memory = NormalMemory(bank.contiguous(), picks // n_patch, picks, meta)
        patch_ids = torch.arange(n_img * n_patch, device=tokens.device)
        query_groups = patch_ids // n_patch if n_img > 1 else patch_ids
        memory_groups = memory.source_image if n_img > 1 else memory.source_patch
        grid = self.backbone.grid_size
        nn = memory.nn_map(tokens, cfg.nn_chunk_size, query_groups, memory_groups)
        txt = text_map(tokens, anchors.stacked().to(tokens), cfg.text_temperature)
        maps = {"text_map": txt.view(n_img, *grid), "nn_map": nn.view(n_img, *grid)}
        return memory, Calibration.from_normal_maps(maps, fg_masks)

    def score(self, pixels: torch.Tensor, anchors: TextAnchors,
              memory: NormalMemory | None) -> Scores:
        tokens, image_embedding = self.backbone(pixels)
        b, grid = tokens.shape[0], self.backbone.grid_size
        temperature = self.config.text_temperature
        pair = anchors.stacked().to(tokens)
        branches = {"text_map": text_map(tokens, pair, temperature).view(b, *grid)}
        if memory is not None:
            branches["nn_map"] = memory.nn_map(tokens, self.config.nn_chunk_size).view(b, *grid)
        text_score = anomaly_probability(image_embedding, pair, temperature)
        # zero-shot (no memory): the image-text score is the image score
        return Scores(branches, text_score, text_score if memory is None else None)

    def fuse(self, branches: dict[str, torch.Tensor], calibration: Calibration | None,
             text_weight: float, nn_weight: float) -> torch.Tensor:
        stats = calibration.branch_stats if calibration is not None else {}
        return fuse_maps(branches["text_map"], branches.get("nn_map"), text_weight, nn_weight,
                         stats.get("text_map"), stats.get("nn_map"))
