"""Stage 01: the CLIP backbone and multi-layer patch tokens (notebook 01).

One factory resolves the weights (an open_clip pretrained tag, a local checkpoint
file, or ``"random"`` for offline runs), builds the open_clip model once, and
:class:`ClipBackbone` turns a batch of images into patch tokens from several
transformer layers, each passed through ``ln_post`` and the visual projection so
they live in the same joint space as the text embeddings.

Shapes (ViT-B/16 at 224 px): images ``(B, 224, 224, 3)`` uint8 ->
patch tokens ``(B, L, 196, 512)`` and image embeddings ``(B, 512)``, all L2-normalised.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_LAYERS,
    DEFAULT_MODEL_NAME,
    DEFAULT_PRECISION,
    DEFAULT_PRETRAINED,
    DEFAULT_SEED,
    PRECISIONS,
)
from .errors import ConfigError, DeviceError, WeightsError

#: Names that build a random-init model (no download, for offline runs and tests).
RANDOM_WEIGHTS = ("random", "none", "")
#: ``"auto"``: the default tag when it is cached or the hub answers fast, else random.
AUTO_WEIGHTS = "auto"
#: Seconds to wait for the model hub before declaring the machine offline.
HUB_PROBE_TIMEOUT_S = 3.0
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
_HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedWeights:
    """Where a model's weights come from.

    ``source`` is what open_clip gets as ``pretrained`` (``None`` for random init,
    else a tag or a file path); ``label`` is what reports print.
    """

    label: str
    source: str | None
    random: bool
    quick_gelu: bool = False


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU. ``"cuda"`` without CUDA raises."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as err:
        raise DeviceError(f"unknown device {name!r}: use 'auto', 'cpu' or 'cuda'") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            f"device {name!r} was requested but CUDA is not available on this machine "
            "(use device='cpu' or 'auto')"
        )
    return dev


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The backbone's dtype: ``auto`` is fp16 on CUDA and fp32 elsewhere.

    >>> resolve_dtype("auto", torch.device("cpu")), resolve_dtype("fp16", torch.device("cpu"))
    (torch.float32, torch.float16)
    """
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if precision not in dtypes:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return dtypes[precision]


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """True when the model hub answers a TCP connect within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_weight_files(hf_hub: str) -> tuple[str, tuple[str, ...]]:
    """Repo id and checkpoint file names, in open_clip's order, of a tag's ``hf_hub`` entry.

    ``"org/name/"`` means open_clip's default file (its safetensors version first);
    ``"org/name/file.bin"`` names the file (``file.safetensors`` is tried first).

    Example:
        >>> hub_weight_files("org/name/pytorch_model.bin")
        ('org/name', ('pytorch_model.safetensors', 'pytorch_model.bin'))
    """
    repo_id, filename = os.path.split(hf_hub.strip())
    repo_id = repo_id.strip("/")
    if not repo_id:
        return "", ()
    if not filename or filename == _HF_WEIGHT_FILES[1]:
        return repo_id, _HF_WEIGHT_FILES
    if filename.endswith((".bin", ".pth")):
        return repo_id, (filename[:-4] + ".safetensors", filename)
    return repo_id, (filename,)


def cached_tag_file(model_name: str, tag: str) -> str | None:
    """Path of an already-downloaded checkpoint for ``(model_name, tag)``, if any."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    hub_id, filenames = hub_weight_files(cfg.get("hf_hub") or "")
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - huggingface_hub ships with open_clip
            return None
        for filename in filenames:
            found = try_to_load_from_cache(hub_id, filename)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    url = cfg.get("url") or ""
    if url:
        local = Path.home() / ".cache" / "clip" / os.path.basename(urlparse(url).path)
        if local.is_file():
            return str(local)
    return None


def resolve_weights(model_name: str, pretrained: str | os.PathLike | None) -> ResolvedWeights:
    """Turn ``pretrained`` (tag | local file | ``"random"`` | ``"auto"``) into a source.

    Offline, a tag that is not in the local cache fails at once with a message naming
    the remedies, instead of after a long series of hub retries.

    Example:
        >>> resolve_weights("ViT-B-16", "random").random
        True
    """
    import open_clip

    if model_name not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if model_name.lower()[:5] in m.lower()]
        raise ConfigError(
            f"unknown open_clip model {model_name!r}"
            + (f"; similar names: {', '.join(close[:8])}" if close else "")
        )
    if pretrained is None or str(pretrained).strip().lower() in RANDOM_WEIGHTS:
        return ResolvedWeights(label="random", source=None, random=True)

    text = str(pretrained)
    path = Path(text).expanduser()
    looks_like_path = (
        path.suffix.lower() in CHECKPOINT_SUFFIXES or os.sep in text or "/" in text or path.exists()
    )
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if looks_like_path and text not in tags:
        if not path.is_file():
            raise WeightsError(f"weights file not found: {text}")
        return ResolvedWeights(label=str(path), source=str(path), random=False)

    if text.lower() == AUTO_WEIGHTS:
        tag = DEFAULT_PRETRAINED if DEFAULT_PRETRAINED in tags else (tags[0] if tags else None)
        if tag is not None and (cached_tag_file(model_name, tag) or hub_reachable()):
            return resolve_weights(model_name, tag)
        log.warning("weights='auto': no cached checkpoint and no hub access, using random init")
        return ResolvedWeights(label="random (auto: offline)", source=None, random=True)

    if text not in tags:
        raise WeightsError(
            f"unknown pretrained tag {text!r} for {model_name}; known tags: {', '.join(tags)}; "
            "or pass a checkpoint file path, or 'random'"
        )
    quick_gelu = bool(open_clip.get_pretrained_cfg(model_name, text).get("quick_gelu", False))
    cached = cached_tag_file(model_name, text)
    if cached:
        return ResolvedWeights(label=text, source=cached, random=False, quick_gelu=quick_gelu)
    if not hub_reachable():
        raise WeightsError(
            f"cannot load pretrained weights {model_name}/{text}: the model hub is not reachable "
            "and the checkpoint is not in the local cache. Remedies: run `winclip-nb prefetch` "
            "on a machine with network access (fills the cache), pass a local checkpoint file "
            "as weights/pretrained, or use pretrained='random' for an offline (meaningless) model."
        )
    return ResolvedWeights(label=text, source=text, random=False, quick_gelu=quick_gelu)


def native_image_size(model_name: str) -> int | None:
    """The input side ``model_name`` is built for (open_clip's model config), if known.

    >>> native_image_size("ViT-B-16"), native_image_size("ViT-B-16-plus-240")
    (224, 240)
    """
    import open_clip

    size = ((open_clip.get_model_config(model_name) or {}).get("vision_cfg") or {}).get(
        "image_size"
    )
    return int(size) if isinstance(size, int) else None


def load_open_clip(
    model_name: str = DEFAULT_MODEL_NAME,
    pretrained: str | os.PathLike | None = DEFAULT_PRETRAINED,
    device: str | torch.device = "cpu",
    image_size: int = DEFAULT_IMAGE_SIZE,
    seed: int = DEFAULT_SEED,
) -> tuple[nn.Module, object, ResolvedWeights]:
    """Build an open_clip model, its tokenizer and the resolved weights (eval mode).

    A random-init model is drawn from ``seed`` without touching the global RNG, so
    the same seed always gives the same random weights.
    """
    import open_clip

    weights = resolve_weights(model_name, pretrained)
    kwargs: dict = {"force_quick_gelu": weights.quick_gelu}
    if image_size != native_image_size(model_name):
        kwargs["force_image_size"] = image_size
    root_logger = logging.getLogger()
    old_level = root_logger.level
    root_logger.setLevel(logging.ERROR)  # open_clip logs a warning on every random init
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.create_model(model_name, pretrained=weights.source, **kwargs)
    except WeightsError:
        raise
    except Exception as err:  # noqa: BLE001 - open_clip raises many types for bad files
        if weights.source is not None and os.path.isfile(weights.source):
            raise WeightsError(
                f"{weights.source} is not a usable open_clip checkpoint for {model_name}: "
                f"{type(err).__name__}: {err}"
            ) from err
        raise WeightsError(f"could not load {model_name}/{weights.label}: {err}") from err
    finally:
        root_logger.setLevel(old_level)
    model = model.to(resolve_device(device)).eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    return model, tokenizer, weights


class ClipBackbone(nn.Module):
    """open_clip vision tower -> multi-layer patch tokens in the joint space.

    Args:
        model_name: open_clip model name, e.g. ``"ViT-B-16"``.
        pretrained: tag (``"openai"``), checkpoint path, ``"random"`` or ``"auto"``.
        layers: transformer blocks whose outputs are used (0-based).
        image_size: square input side in pixels.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        seed: seed of a random-init model (ignored for pretrained weights).
        precision: ``"auto"`` (fp16 on CUDA, fp32 on CPU), ``"fp32"``, ``"fp16"``, ``"bf16"``.
    """

    def __init__(
        self,
        model_name: str = DEFAULT_MODEL_NAME,
        pretrained: str | os.PathLike | None = DEFAULT_PRETRAINED,
        layers: Sequence[int] = DEFAULT_LAYERS,
        image_size: int = DEFAULT_IMAGE_SIZE,
        device: str | torch.device = "auto",
        seed: int = DEFAULT_SEED,
        precision: str = DEFAULT_PRECISION,
    ) -> None:
        super().__init__()
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(precision, self.device)
        model, tokenizer, weights = load_open_clip(
            model_name, pretrained, self.device, image_size, seed
        )
        visual = model.visual
        n_blocks = len(getattr(getattr(visual, "transformer", None), "resblocks", []))
        if n_blocks == 0 or getattr(visual, "proj", None) is None:
            raise ConfigError(
                f"model {model_name!r} has no ViT vision tower with a projection; "
                "use an open_clip ViT model such as ViT-B-16 or ViT-L-14"
            )
        bad = [i for i in layers if not 0 <= int(i) < n_blocks]
        if bad:
            raise ConfigError(
                f"unknown layer indices {bad} for {model_name}: it has {n_blocks} transformer "
                f"blocks, valid indices are 0..{n_blocks - 1}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.weights = weights
        self.model_name = model_name
        self.layers = tuple(int(i) for i in layers)
        self.image_size = int(image_size)
        self.grid_size: tuple[int, int] = tuple(visual.grid_size)  # type: ignore[assignment]
        self.embed_dim = int(visual.proj.shape[1])
        self._text_cache: dict[tuple[str, ...], torch.Tensor] = {}
        self.model.to(self.dtype)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.mean = self.mean.to(self.device)
        self.std = self.std.to(self.device)
        # (u8 / 255 - mean) / std as one multiply-add: u8 * pixel_scale + pixel_shift.
        self.register_buffer("pixel_scale", 1.0 / (255.0 * self.std), persistent=False)
        self.register_buffer("pixel_shift", -self.mean / self.std, persistent=False)

    @property
    def random_weights(self) -> bool:
        return self.weights.random

    def resize(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (S, S, 3) uint8 at the model's input size (aspect not kept)."""
        h, w = image.shape[:2]
        s = self.image_size
        if (h, w) == (s, s):
            return np.ascontiguousarray(image)
        interp = cv2.INTER_AREA if min(h, w) > s else cv2.INTER_CUBIC
        return cv2.resize(image, (s, s), interpolation=interp)

    def to_pixels(self, images_u8: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(B, S, S, 3) uint8 -> (B, 3, S, S) CLIP-normalised, on the model's device/dtype."""
        x = torch.as_tensor(images_u8)
        if self.device.type == "cuda" and x.device.type == "cpu":
            # uint8 crosses the bus (4x less than float); pinned, so the copy is async.
            x = x if x.is_pinned() else x.pin_memory()
        x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        return torch.addcmul(self.pixel_shift, x, self.pixel_scale).to(self.dtype)

    @torch.inference_mode()
    def forward(self, images_u8: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch tokens and image embeddings for a batch of resized images.

        Args:
            images_u8: (B, S, S, 3) uint8, e.g. from :meth:`resize`.

        Returns:
            patch_tokens: (B, L, N, D) float32, L2-normalised, N = h * w patches.
            image_embedding: (B, D) float32, L2-normalised.
        """
        pixels = self.to_pixels(images_u8)
        out = self.model.forward_intermediates(
            image=pixels,
            image_indices=list(self.layers),
            intermediates_only=False,
            image_output_fmt="NLC",
            normalize=True,
        )
        visual = self.model.visual
        stacked = torch.stack(out["image_intermediates"], dim=1)  # (B, L, N, W)
        projected = visual.ln_post(stacked) @ visual.proj  # (B, L, N, D)
        patch_tokens = F.normalize(projected.float(), dim=-1)
        image_embedding = F.normalize(out["image_features"].float(), dim=-1)
        return patch_tokens, image_embedding

    @torch.inference_mode()
    def encode_text(
        self, prompts: Sequence[str], batch_size: int = 64, normalize: bool = True
    ) -> torch.Tensor:
        """(P,) prompts -> (P, D) float32 text embeddings, L2-normalised unless
        ``normalize=False`` (cached)."""
        key = (*prompts, f"normalize={normalize}")
        if key in self._text_cache:
            return self._text_cache[key]
        chunks = []
        for start in range(0, len(prompts), batch_size):
            tokens = self.tokenizer(list(prompts[start : start + batch_size])).to(self.device)
            features = _encode_text_trimmed(self.model, tokens)
            if features is None:  # not a plain CLIP text tower: open_clip's own forward
                features = self.model.encode_text(tokens)
            features = features.float()
            chunks.append(F.normalize(features, dim=-1) if normalize else features)
        self._text_cache[key] = torch.cat(chunks)
        return self._text_cache[key]


def _encode_text_trimmed(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor | None:
    """open_clip's ``CLIP.encode_text`` on tokens cut after the longest prompt's end token.

    Prompts are padded to 77 tokens, but the text tower is causal and pools the end
    token (``argmax``), so the padding after the last end token changes nothing: cutting
    it gives the same embeddings for about a quarter of the work. Returns None for
    towers where that does not hold (other pooling, no causal mask, a class token).

    Args:
        tokens: (P, 77) int64 from the tokenizer.

    Returns:
        (P, D) unnormalised text embeddings, or None.
    """
    attn_mask = getattr(model, "attn_mask", None)
    plain = (
        getattr(model, "text_pool_type", None) == "argmax"
        and isinstance(attn_mask, torch.Tensor)
        and hasattr(model, "token_embedding")
        and getattr(model, "cls_emb", None) is None
    )
    if not plain:
        return None
    length = int(tokens.argmax(dim=-1).max()) + 1  # the end token has the largest id
    cut = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(cut).to(cast_dtype) + model.positional_embedding[:length].to(
        cast_dtype
    )
    x = model.ln_final(model.transformer(x, attn_mask=attn_mask[:length, :length]))
    x = x[torch.arange(x.shape[0], device=x.device), cut.argmax(dim=-1)]
    projection = model.text_projection
    if projection is None:
        return x
    return projection(x) if isinstance(projection, nn.Linear) else x @ projection
