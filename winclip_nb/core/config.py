"""Every setting of the pipeline, each default written once: as a field of
:class:`WinCLIPConfig`.

A field's ``metadata`` holds its help text (the CLI's ``--help`` is built from it) and
its check; :meth:`WinCLIPConfig.validate` runs every check, so a config that exists is a
valid one. Settings left ``None`` (model, input size, layers, temperature, coreset ratio)
take the method's own values, which each scorer declares as its ``preset``;
``pretrained=None`` means the method's own weights (its ``default_weights`` tag), resolved
when the model is loaded.

Example:
    >>> cfg = WinCLIPConfig(layers=(6, 9, 11), text_weight=0.5, nn_weight=0.5)
    >>> cfg.layers, cfg.model_name, cfg.text_temperature
    ((6, 9, 11), 'ViT-B-16', 0.01)
    >>> WinCLIPConfig(method="windows").model_name
    'ViT-B-16-plus-240'
    >>> WinCLIPConfig(sigma=-1)
    Traceback (most recent call last):
    ...
    winclip_nb.core.errors.ConfigError: sigma must be a number >= 0, got -1
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

NORMALIZATION_MODES = ("per_image", "calibrated")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
#: CLIP's RGB normalisation (the same for OpenAI and LAION checkpoints).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Check = Callable[[Any], str | None]  # None when the value is fine, else what it must be


def number(low: float | None = None, high: float | None = None, *, open_low: bool = False,
           integer: bool = False, optional: bool = False) -> Check:
    """A check for a number in ``[low, high]`` (``(low, high]`` with ``open_low``).

    >>> number(0, 1, open_low=True)(0), number(1, integer=True)(2)
    ('a number in (0, 1]', None)
    """
    kind = "an integer" if integer else "a number"
    if low is not None and high is not None:
        want = f"{kind} in {'(' if open_low else '['}{low}, {high}]"
    else:
        want = f"{kind} {'>' if open_low else '>='} {low}" if low is not None else kind

    def check(value: Any) -> str | None:
        if value is None and optional:
            return None
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and math.isfinite(value) and (not integer or float(value).is_integer())
        ok = ok and (low is None or (value > low if open_low else value >= low))
        ok = ok and (high is None or value <= high)
        return None if ok else want

    return check


def one_of(choices: Sequence[str] | Callable[[], Sequence[str]]) -> Check:
    """A check for one of ``choices`` (a callable is asked when checking)."""

    def check(value: Any) -> str | None:
        options = tuple(choices() if callable(choices) else choices)
        return None if value in options else f"one of {options}"

    return check


def distinct_ints(minimum: int) -> Check:
    """A check for a non-empty sequence of distinct integers >= ``minimum``."""

    def check(value: Any) -> str | None:
        ok = len(value) > 0 and len(set(value)) == len(value) and min(value) >= minimum
        return None if ok else f"distinct integers >= {minimum}"

    return check


def boolean(value: Any) -> str | None:
    """The check for a flag: True or False (not 0, 1 or a string)."""
    return None if isinstance(value, bool) else "True or False"


def setting(default: Any, help: str, check: Check | None = None,  # noqa: A002
            choices: Sequence[str] | Callable[[], Sequence[str]] | None = None) -> Any:
    """A config field: its default, its help text, its check (``choices``: one of them,
    or None when that is the default)."""
    if choices is not None:
        pick = one_of(choices)
        check = pick if default is not None else (lambda v: None if v is None else pick(v))
    return field(default=default, metadata={"help": help, "check": check, "choices": choices})


def check_fields(obj: Any) -> Any:
    """Run the check of every field of a dataclass made with :func:`setting`; raise
    :class:`ConfigError` naming the first bad one; return ``obj``."""
    for f in dataclasses.fields(obj):
        check = f.metadata.get("check")
        problem = check(getattr(obj, f.name)) if check else None
        if problem:
            raise ConfigError(f"{f.name} must be {problem}, got {getattr(obj, f.name)!r}")
    return obj


def method_names() -> tuple[str, ...]:
    """The registered methods (:data:`~winclip_nb.core.scorers.SCORERS`)."""
    from .scorers import SCORERS

    return tuple(SCORERS)


@dataclass
class WinCLIPConfig:
    """All settings of a detection run; invalid values raise :class:`ConfigError`."""

    method: str = setting("tokens", "scoring method", choices=method_names)
    model_name: str | None = setting(None, "open_clip model (default: the method's)")
    pretrained: str | None = setting(
        None, "weights: open_clip tag, checkpoint file, random or auto; None: the method's tag"
    )
    image_size: int | None = setting(
        None, "model input side in pixels (default: the method's)", number(32, integer=True)
    )
    layers: tuple[int, ...] | None = setting(
        None, "transformer blocks whose patch tokens are used (default: the method's)",
        distinct_ints(0),
    )
    device: str = setting("auto", "auto, cpu or cuda")
    precision: str = setting(
        "auto", "backbone precision (auto: fp16 on CUDA, fp32 on CPU)", choices=PRECISIONS
    )
    batch_size: int = setting(8, "images per forward pass", number(1, integer=True))
    text_temperature: float | None = setting(
        None, "softmax temperature of the text anchors, logits = cos / T (default: the method's)",
        number(0, 1, open_low=True, optional=True),
    )
    coreset_ratio: float | None = setting(
        None, "fraction of normal patches kept by the coreset (default: the method's)",
        number(0, 1, open_low=True),
    )
    coreset_projection_dim: int = setting(
        128, "random projection width used to select the coreset", number(1, integer=True)
    )
    nn_chunk_size: int = setting(
        2048, "query patches per chunk of the nearest-neighbour search", number(1, integer=True)
    )
    text_weight: float = setting(0.3, "fusion weight of the text map", number(0))
    nn_weight: float = setting(0.7, "fusion weight of the nearest-neighbour map", number(0))
    fg_threshold: float = setting(
        0.1, "foreground: fraction of the largest colour distance from the background", number(0, 1)
    )
    sigma: float = setting(4.0, "Gaussian smoothing sigma in input pixels", number(0))
    normalization: str = setting(
        "calibrated", "robust z-scores per image or calibrated on normal images",
        choices=NORMALIZATION_MODES,
    )
    score_top_fraction: float = setting(
        0.01, "image score: mean of this top fraction of foreground pixels",
        number(0, 1, open_low=True),
    )
    hotspot_threshold: float = setting(3.0, "hotspots: z-score threshold", number())
    top_k: int = setting(3, "hotspots reported per image", number(0, integer=True))
    min_hotspot_area: float = setting(
        0.0005, "hotspots smaller than this fraction of the image are dropped", number(0, 1)
    )
    pca_mask: bool = setting(False, "anomalydino: leave out background patches found by PCA "
                             "of each image's tokens", boolean)
    rscin: bool = setting(False, "musc: re-score images with their nearest neighbours by class "
                          "token (RsCIN)", boolean)
    window_scales: tuple[int, ...] = setting(
        (2, 3), "window sides in patches (windows method)", distinct_ints(1)
    )
    seed: int = setting(0, "seed of random weights, coreset and k-shot draws",
                        number(0, integer=True))

    def __post_init__(self) -> None:
        from .scorers import scorer_class

        for name, value in scorer_class(self.method).preset.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.layers = tuple(int(i) for i in self.layers)
        self.window_scales = tuple(int(s) for s in self.window_scales)
        self.validate()

    def validate(self) -> WinCLIPConfig:
        """Raise :class:`ConfigError` naming the first bad setting; return self."""
        check_fields(self)
        if self.text_weight + self.nn_weight <= 0:
            raise ConfigError(
                f"text_weight + nn_weight must be > 0, got {self.text_weight} + {self.nn_weight}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(self).items()}

    def replace(self, **changes: Any) -> WinCLIPConfig:
        """A validated copy with some settings changed."""
        return dataclasses.replace(self, **changes)


#: Every default in one object, e.g. ``DEFAULTS.sigma``.
DEFAULTS = WinCLIPConfig()
