"""Every default of the pipeline in one place.

The module-level constants are the defaults; :class:`WinCLIPConfig` bundles them
so a run can be described, validated, saved to JSON and compared with another.

Example:
    >>> cfg = WinCLIPConfig(layers=(6, 9, 11), text_weight=0.5, nn_weight=0.5)
    >>> cfg.validate().layers
    (6, 9, 11)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

# --- method -------------------------------------------------------------------------
#: ``tokens``: multi-layer patch tokens vs text anchors and a coreset memory (notebooks
#: 01-04, fast). ``windows``: WinCLIP / WinCLIP+ window embeddings (notebook 07).
METHODS = ("tokens", "windows")
DEFAULT_METHOD = "tokens"

# --- backbone (notebook 01) ---------------------------------------------------
DEFAULT_MODEL_NAME = "ViT-B-16"
DEFAULT_PRETRAINED = "openai"
DEFAULT_LAYERS: tuple[int, ...] = (9, 10, 11)
DEFAULT_IMAGE_SIZE = 224
DEFAULT_BATCH_SIZE = 8
DEFAULT_DEVICE = "auto"
#: Backbone precision: ``auto`` is fp16 on CUDA and fp32 on the CPU (half precision is
#: slow on most CPUs); ``fp32``, ``fp16`` or ``bf16`` force one.
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
DEFAULT_PRECISION = "auto"
#: CLIP's RGB normalisation (the same for OpenAI and LAION checkpoints).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# --- windows method (notebook 07): the paper's backbone and scales --------------------
WINDOWS_MODEL_NAME = "ViT-B-16-plus-240"
WINDOWS_PRETRAINED = "laion400m_e31"
WINDOWS_IMAGE_SIZE = 240
#: Window sides in patches (15 x 15 grid at 240 px).
DEFAULT_WINDOW_SCALES: tuple[int, ...] = (2, 3)
#: CLIP's softmax temperature for window/text similarities (``logit = cos / 0.07``).
DEFAULT_WINDOW_TEMPERATURE = 0.07

# --- text anchors (notebook 02) ------------------------------------------------
#: Softmax temperature of CLIP's logit scale, used for the text map.
DEFAULT_TEXT_TEMPERATURE = 100.0

# --- normal memory (notebook 03) -----------------------------------------------
DEFAULT_CORESET_RATIO = 0.1
#: Random projection width used only to *select* the coreset (speed).
DEFAULT_CORESET_PROJECTION_DIM = 128
#: Query patches per chunk in the nearest-neighbour search (bounds memory).
DEFAULT_NN_CHUNK_SIZE = 2048

# --- fusion and post-processing (notebook 04) ----------------------------------
DEFAULT_TEXT_WEIGHT = 0.3
DEFAULT_NN_WEIGHT = 0.7
#: Foreground threshold: fraction of the largest colour distance from the background.
DEFAULT_FG_THRESHOLD = 0.1
#: Gaussian sigma in pixels of the model's input resolution (scaled to the image).
DEFAULT_SIGMA = 4.0
#: ``per_image`` or ``calibrated``; see :mod:`winclip_nb.maps`.
DEFAULT_NORMALIZATION = "calibrated"
NORMALIZATION_MODES = ("per_image", "calibrated")
#: Image score = mean of the top fraction of foreground pixels of the final map.
DEFAULT_SCORE_TOP_FRACTION = 0.01
#: Hotspots: connected regions whose z-score exceeds this (robust sigmas).
DEFAULT_HOTSPOT_THRESHOLD = 3.0
DEFAULT_TOP_K = 3
#: Regions smaller than this fraction of the image are ignored.
DEFAULT_MIN_HOTSPOT_AREA = 0.0005

DEFAULT_SEED = 0


@dataclass
class WinCLIPConfig:
    """All settings of a detection run. ``validate()`` checks every range."""

    method: str = DEFAULT_METHOD
    model_name: str = DEFAULT_MODEL_NAME
    pretrained: str | None = DEFAULT_PRETRAINED
    layers: tuple[int, ...] = DEFAULT_LAYERS
    image_size: int = DEFAULT_IMAGE_SIZE
    device: str = DEFAULT_DEVICE
    precision: str = DEFAULT_PRECISION
    batch_size: int = DEFAULT_BATCH_SIZE
    text_temperature: float = DEFAULT_TEXT_TEMPERATURE
    coreset_ratio: float = DEFAULT_CORESET_RATIO
    coreset_projection_dim: int = DEFAULT_CORESET_PROJECTION_DIM
    nn_chunk_size: int = DEFAULT_NN_CHUNK_SIZE
    text_weight: float = DEFAULT_TEXT_WEIGHT
    nn_weight: float = DEFAULT_NN_WEIGHT
    fg_threshold: float = DEFAULT_FG_THRESHOLD
    sigma: float = DEFAULT_SIGMA
    normalization: str = DEFAULT_NORMALIZATION
    score_top_fraction: float = DEFAULT_SCORE_TOP_FRACTION
    hotspot_threshold: float = DEFAULT_HOTSPOT_THRESHOLD
    top_k: int = DEFAULT_TOP_K
    min_hotspot_area: float = DEFAULT_MIN_HOTSPOT_AREA
    window_scales: tuple[int, ...] = DEFAULT_WINDOW_SCALES
    window_temperature: float = DEFAULT_WINDOW_TEMPERATURE
    seed: int = DEFAULT_SEED
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layers = tuple(int(i) for i in self.layers)
        self.window_scales = tuple(int(s) for s in self.window_scales)

    @classmethod
    def for_method(cls, method: str = DEFAULT_METHOD, **changes: Any) -> WinCLIPConfig:
        """Defaults of ``method`` (the windows method uses the paper's backbone and size),
        with ``changes`` applied, validated.

        >>> WinCLIPConfig.for_method("windows").model_name
        'ViT-B-16-plus-240'
        """
        base = {"method": method, **method_defaults(method)}
        return cls(**(base | changes)).validate()

    def validate(self) -> WinCLIPConfig:
        """Raise :class:`ConfigError` naming the first bad setting; return self."""
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if (
            not self.window_scales
            or len(set(self.window_scales)) != len(self.window_scales)
            or min(self.window_scales) < 1
        ):
            raise ConfigError(
                f"window_scales must be distinct integers >= 1, got {list(self.window_scales)}"
            )
        if not (math.isfinite(self.window_temperature) and self.window_temperature > 0):
            raise ConfigError(f"window_temperature must be > 0, got {self.window_temperature}")
        if not self.layers:
            raise ConfigError("layers must name at least one transformer layer, got ()")
        if len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"layers must be distinct, got {list(self.layers)}")
        if self.image_size < 32:
            raise ConfigError(f"image_size must be >= 32, got {self.image_size}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        check_coreset_ratio(self.coreset_ratio)
        check_fusion_weights(self.text_weight, self.nn_weight)
        if self.normalization not in NORMALIZATION_MODES:
            raise ConfigError(
                f"normalization must be one of {NORMALIZATION_MODES}, got {self.normalization!r}"
            )
        if not 0.0 <= self.fg_threshold <= 1.0:
            raise ConfigError(f"fg_threshold must be in [0, 1], got {self.fg_threshold}")
        if self.sigma < 0:
            raise ConfigError(f"sigma must be >= 0, got {self.sigma}")
        if not 0.0 < self.score_top_fraction <= 1.0:
            raise ConfigError(
                f"score_top_fraction must be in (0, 1], got {self.score_top_fraction}"
            )
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        d["window_scales"] = list(self.window_scales)
        return d

    def replace(self, **changes: Any) -> WinCLIPConfig:
        """A copy with some settings changed, validated."""
        return dataclasses.replace(self, **changes).validate()


def method_defaults(method: str) -> dict[str, Any]:
    """Model name, weights and input size that ``method`` uses unless told otherwise.

    >>> method_defaults("tokens")["model_name"], method_defaults("windows")["image_size"]
    ('ViT-B-16', 240)
    """
    if method == "tokens":
        return {
            "model_name": DEFAULT_MODEL_NAME,
            "pretrained": DEFAULT_PRETRAINED,
            "image_size": DEFAULT_IMAGE_SIZE,
        }
    if method == "windows":
        return {
            "model_name": WINDOWS_MODEL_NAME,
            "pretrained": WINDOWS_PRETRAINED,
            "image_size": WINDOWS_IMAGE_SIZE,
        }
    raise ConfigError(f"method must be one of {METHODS}, got {method!r}")


def check_coreset_ratio(ratio: float) -> float:
    """Coreset ratio must lie in (0, 1]."""
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and 0.0 < ratio <= 1.0):
        raise ConfigError(f"coreset_ratio must be in (0, 1], got {ratio!r}")
    return float(ratio)


def check_fusion_weights(text_weight: float, nn_weight: float) -> tuple[float, float]:
    """Fusion weights must be finite, non-negative and not both zero."""
    for name, w in (("text_weight", text_weight), ("nn_weight", nn_weight)):
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise ConfigError(f"{name} must be a finite number >= 0, got {w!r}")
    if text_weight + nn_weight <= 0:
        raise ConfigError(f"text_weight + nn_weight must be > 0, got {text_weight} + {nn_weight}")
    return float(text_weight), float(nn_weight)
