"""Stage 01: multi-layer patch tokens in CLIP's joint space (notebook 01).

:class:`ClipBackbone` wraps an open_clip model (built by ``winclip_nb.hub``, which
resolves the weights) and turns a batch of images into the patch tokens of several
transformer layers, each passed through ``ln_post`` and the visual projection so they
live in the same space as the text embeddings, and encodes prompts.

Shapes (ViT-B/16 at 224 px): images ``(B, 224, 224, 3)`` uint8 -> patch tokens
``(B, L, 196, 512)`` and image embeddings ``(B, 512)``, all L2-normalised.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import CLIP_MEAN, CLIP_STD
from .errors import ConfigError
from .runtime import resolve_device, resolve_dtype


class ImageBackbone(nn.Module):
    """What every backbone shares: device, dtype, input size, and uint8 images <-> pixels
    normalised with the model's ``mean`` and ``std``. A subclass sets ``grid_size``."""

    grid_size: tuple[int, int]

    def __init__(self, image_size: int, device: str, precision: str, weights: str,
                 random_weights: bool, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(precision, self.device)
        self.image_size = int(image_size)
        self.weights, self.random_weights = weights, random_weights
        mean_t = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        std_t = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.register_buffer("mean", mean_t, persistent=False)
        self.register_buffer("std", std_t, persistent=False)
        # (u8 / 255 - mean) / std as one multiply-add: u8 * pixel_scale + pixel_shift.
        self.register_buffer("pixel_scale", 1.0 / (255.0 * std_t), persistent=False)
        self.register_buffer("pixel_shift", -mean_t / std_t, persistent=False)

    def resize(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (S, S, 3) uint8 at the model's input size (aspect not kept)."""
        s = self.image_size
        if image.shape[:2] == (s, s):
            return np.ascontiguousarray(image)
        interp = cv2.INTER_AREA if min(image.shape[:2]) > s else cv2.INTER_CUBIC
        return cv2.resize(image, (s, s), interpolation=interp)

    def to_pixels(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(B, S, S, 3) uint8 -> (B, 3, S, S) normalised, on the model's device and dtype.

        Float input of shape (B, 3, S, S) is taken as already normalised.
        """
        x = torch.as_tensor(images)
        if x.is_floating_point():
            return x.to(self.device, self.dtype)
        if self.device.type == "cuda" and x.device.type == "cpu" and not x.is_pinned():
            x = x.pin_memory()  # uint8 crosses the bus, 4x less than float
        x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        return torch.addcmul(self.pixel_shift, x, self.pixel_scale).to(self.dtype)

    def to_images(self, pixels: torch.Tensor) -> np.ndarray:
        """Inverse of :meth:`to_pixels` for float input: (B, 3, S, S) -> (B, S, S, 3) uint8."""
        rgb = (pixels.float() * self.std + self.mean).clamp(0, 1) * 255.0
        return rgb.round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class ClipBackbone(ImageBackbone):
    """An open_clip ViT -> multi-layer patch tokens and text embeddings.

    Args:
        model: an open_clip ``CLIP`` model with a ViT vision tower.
        tokenizer: its tokenizer.
        layers: transformer blocks whose outputs are used (0-based).
        image_size: square input side in pixels.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        precision: ``"auto"`` (fp16 on CUDA, fp32 on CPU), ``"fp32"``, ``"fp16"``, ``"bf16"``.
        weights: label of the weights (``"openai"``, a file, ``"random"``).
        random_weights: True for a random-init model (every output then says so).
    """

    def __init__(self, model: nn.Module, tokenizer: object, layers: Sequence[int],
                 image_size: int, device: str = "auto", precision: str = "auto",
                 weights: str = "random", random_weights: bool = True) -> None:
        super().__init__(image_size, device, precision, weights, random_weights,
                         CLIP_MEAN, CLIP_STD)
        visual = model.visual
        n_blocks = len(getattr(getattr(visual, "transformer", None), "resblocks", []))
        if n_blocks == 0 or getattr(visual, "proj", None) is None:
            raise ConfigError("the model has no ViT vision tower with a projection; "
                              "use an open_clip ViT such as ViT-B-16 or ViT-L-14")
        bad = [i for i in layers if not 0 <= int(i) < n_blocks]
        if bad:
            raise ConfigError(f"unknown layer indices {bad}: the model has {n_blocks} "
                              f"transformer blocks, valid indices are 0..{n_blocks - 1}")
        self.model = model.to(self.device, self.dtype).eval()
        self.tokenizer = tokenizer
        self.layers = tuple(int(i) for i in layers)
        self.grid_size: tuple[int, int] = tuple(visual.grid_size)  # type: ignore[assignment]
        self.embed_dim = int(visual.proj.shape[1])
        self._text_cache: dict[tuple[str, ...], torch.Tensor] = {}

    @torch.inference_mode()
    def forward(self, images: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch tokens and image embeddings of a batch.

        Args:
            images: (B, S, S, 3) uint8 or (B, 3, S, S) normalised float pixels.

        Returns:
            patch_tokens: (B, L, N, D) float32, L2-normalised, N = h * w patches.
            image_embedding: (B, D) float32, L2-normalised.
        """
        out = self.model.forward_intermediates(
            image=self.to_pixels(images), image_indices=list(self.layers),
            intermediates_only=False, image_output_fmt="NLC", normalize=True,
        )
        visual = self.model.visual
        stacked = torch.stack(out["image_intermediates"], dim=1)  # (B, L, N, W)
        tokens = visual.ln_post(stacked) @ visual.proj  # (B, L, N, D)
        image_embedding = F.normalize(out["image_features"].float(), dim=-1)
        return F.normalize(tokens.float(), dim=-1), image_embedding

    @torch.inference_mode()
    def encode_text(self, prompts: Sequence[str], normalize: bool = True) -> torch.Tensor:
        """(P,) prompts -> (P, D) float32 text embeddings, L2-normalised unless told not
        to (cached per prompt list)."""
        key = (*prompts, f"normalize={normalize}")
        if key not in self._text_cache:
            tokens = [self.tokenizer(list(prompts[i : i + 64])) for i in range(0, len(prompts), 64)]
            chunks = [_encode_text(self.model, t.to(self.device)) for t in tokens]
            features = torch.cat(chunks).float()
            self._text_cache[key] = F.normalize(features, dim=-1) if normalize else features
        return self._text_cache[key]


def _encode_text(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's ``encode_text`` on tokens cut after the longest prompt's end token.

    Prompts are padded to 77 tokens, but the text tower is causal and pools the end token
    (the largest id), so the padding after it changes nothing: cutting it gives the same
    embeddings for about a quarter of the work. Other towers use open_clip's own forward.

    Args:
        tokens: (P, 77) int64. Returns: (P, D) unnormalised embeddings.
    """
    attn_mask = getattr(model, "attn_mask", None)
    plain = (getattr(model, "text_pool_type", None) == "argmax"
             and hasattr(model, "token_embedding") and isinstance(attn_mask, torch.Tensor)
             and getattr(model, "cls_emb", None) is None)
    if not plain:
        return model.encode_text(tokens)
    cut = tokens[:, : int(tokens.argmax(dim=-1).max()) + 1]
    n = cut.shape[1]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(cut).to(cast) + model.positional_embedding[:n].to(cast)
    x = model.ln_final(model.transformer(x, attn_mask=attn_mask[:n, :n]))
    x = x[torch.arange(x.shape[0], device=x.device), cut.argmax(dim=-1)]
    proj = model.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj
