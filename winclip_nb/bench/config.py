"""The benchmark's settings: :class:`BenchmarkConfig` composes the detector's
:class:`~winclip_nb.core.config.WinCLIPConfig` with the protocol's own settings."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.config import (
    NORMALIZATION_MODES,
    WinCLIPConfig,
    check_fields,
    distinct_ints,
    number,
    setting,
)
from ..core.errors import ConfigError
from ..core.scorers import scorer_class
from .loader import DATASETS

# --- defaults ------------------------------------------------------------------------
#: Side below which pixel metrics are not computed (0 = full resolution).
MIN_EVAL_SIZE = 8

#: k-shot runs keep every patch of their k images unless told otherwise.
FEW_SHOT_CORESET_RATIO = 1.0


def parse_k_shot(value: int | str | None) -> int | str:
    """``"full"``/None -> ``"full"``; a count (int or digit string) >= 0 -> int.

    >>> parse_k_shot("4"), parse_k_shot("FULL"), parse_k_shot(0)
    (4, 'full', 0)
    """
    if value is None or (isinstance(value, str) and value.strip().lower() == "full"):
        return "full"
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0:
        return int(value)
    raise ConfigError(f"k_shot must be 'full' or an integer >= 0, got {value!r}")


@dataclass
class BenchmarkConfig:
    """Every setting of a benchmark run: the detector's (``model``, a
    :class:`~winclip_nb.core.config.WinCLIPConfig`) and the protocol's.

    ``model.pretrained`` None: ``auto`` on synthetic data, the method's tag on real data;
    ``model.seed`` is replaced by each of ``seeds``. ``coreset_ratio`` and
    ``normalization`` None: the protocol's choice (k-shot keeps every patch, full uses the
    model's coreset ratio; ``per_image`` where no calibration is possible: zero-shot, or
    fewer normal images than the method calibrates with).
    """

    model: WinCLIPConfig = field(default_factory=WinCLIPConfig)
    dataset_format: str = setting(
        "mvtec",
        "layout of --data-root: mvtec (<class>/train/good, "
        "<class>/test/<defect>, <class>/ground_truth/<defect>); visa "
        "(split_csv/1cls.csv); folder (one class of your own: DIR/train/good, "
        "DIR/test/good, DIR/test/<defect>, DIR/ground_truth/<defect>; "
        "--classes NAME names its object)",
        choices=DATASETS,
    )
    data_root: str | None = setting(
        None,
        "dataset folder (default $MVTEC_ROOT or $VISA_ROOT; if "
        "unset, a synthetic set is generated and every output says "
        "SYNTHETIC)",
    )
    classes: list[str] | None = setting(None, "classes to run (default: every class found)")
    k_shot: int | str = "full"
    max_images: int | None = setting(
        50, "cap on memory images of a full run (0 = all)", number(0, integer=True, optional=True)
    )
    seeds: tuple[int, ...] = setting(
        (0,),
        "seeds of the k-shot draw, the coreset and a random "
        "init; mean and std over seeds are reported",
        distinct_ints(0),
    )
    coreset_ratio: float | None = setting(
        None,
        "coreset ratio (default: the model's for full, 1.0 for k-shot)",
        number(0, 1, open_low=True, optional=True),
    )
    normalization: str | None = setting(
        None,
        "robust z-scores per image or calibrated (default: "
        "calibrated where normal images allow it)",
        choices=NORMALIZATION_MODES,
    )
    eval_size: int = setting(
        256, "side of the pixel-metric resolution (0 = full resolution)", number(0, integer=True)
    )
    workers: int | None = setting(
        None,
        "DataLoader workers (default: min(4, CPUs-1) on CUDA, 0 on CPU)",
        number(0, integer=True, optional=True),
    )
    out: str = setting("results/benchmark", "output folder")
    force: bool = setting(False, "recompute finished classes; replace results of other settings")
    skip_bad: bool = setting(
        False, "skip unreadable test images (listed in results.json) instead of stopping"
    )
    save_examples: int = setting(
        0, "per class, a PNG of the N most anomalous test images", number(0, integer=True)
    )
    explain: int = setting(
        0, "explain the N most anomalous test images of each class", number(0, integer=True)
    )
    llava: bool = setting(
        False,
        "explain with LLaVA-OneVision instead of the rule-based "
        "explainer (rule-based, with a notice, if it cannot be loaded)",
    )
    llava_model: str | None = setting(None, "hub id or local folder of LLaVA")

    def validate(self) -> BenchmarkConfig:
        """A checked copy with ``k_shot``, ``seeds`` and ``classes`` normalised."""
        k_shot = parse_k_shot(self.k_shot)
        seeds = (self.seeds,) if isinstance(self.seeds, int) else tuple(self.seeds)
        checked = dataclasses.replace(
            self,
            k_shot=k_shot,
            seeds=seeds,
            max_images=self.max_images or None,
            classes=None if self.classes is None else list(dict.fromkeys(self.classes)),
        )
        check_fields(checked)
        if checked.eval_size and checked.eval_size < MIN_EVAL_SIZE:
            raise ConfigError(
                f"eval_size must be 0 (full resolution) or >= {MIN_EVAL_SIZE}, "
                f"got {checked.eval_size}"
            )
        if checked.dataset_format == "folder" and checked.classes and len(checked.classes) > 1:
            raise ConfigError(
                f"--dataset folder holds one class; --classes names it, got {checked.classes}"
            )
        if checked.classes is not None and not checked.classes:
            raise ConfigError("classes must name at least one class (or be None for all)")
        method = checked.model.method
        needs = scorer_class(method).needs_references
        if needs is not None and checked.zero_shot == needs:
            raise ConfigError(
                f"method {method!r} needs k_shot >= 1 (normal reference images), got 0"
                if needs else
                f"method {method!r} takes no normal images, so k_shot must be 0 (it scores "
                f"each class's test images against each other), got {k_shot}"
            )
        if checked.normalization == "calibrated" and not checked.can_calibrate:
            need = scorer_class(checked.model.method).min_calibration_images
            raise ConfigError(
                f"normalization 'calibrated' needs at least {need} normal image(s) "
                f"with method {checked.model.method!r}, but k_shot is {k_shot}; "
                "use normalization 'per_image'"
            )
        return checked

    @property
    def zero_shot(self) -> bool:
        return self.k_shot == 0

    @property
    def can_calibrate(self) -> bool:
        """Whether the normal images of a run allow calibrated normalisation."""
        need = scorer_class(self.model.method).min_calibration_images
        return self.k_shot == "full" or int(self.k_shot) >= need

    @property
    def effective_coreset_ratio(self) -> float | None:
        """The coreset ratio used (None: no memory, or a method that keeps every patch)."""
        if self.zero_shot or not scorer_class(self.model.method).uses_coreset:
            return None
        if self.coreset_ratio is not None:
            return float(self.coreset_ratio)
        return self.model.coreset_ratio if self.k_shot == "full" else FEW_SHOT_CORESET_RATIO

    @property
    def effective_normalization(self) -> str:
        if self.normalization is not None:
            return self.normalization
        return self.model.normalization if self.can_calibrate else "per_image"

    @property
    def effective_max_images(self) -> int | None:
        """Cap on memory images: only ``full`` runs use it."""
        return self.max_images if self.k_shot == "full" else None

    def to_dict(self) -> dict[str, Any]:
        """Flat, JSON-ready settings: the model's (without weights and seed) and the protocol's."""
        model = {k: v for k, v in self.model.to_dict().items() if k not in ("pretrained", "seed")}
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}
        own["seeds"] = list(self.seeds)
        return {**model, **own}


def k_shot_label(k_shot: int | str) -> str:
    """``0`` -> ``zero-shot``, ``4`` -> ``4-shot``, ``full`` -> ``full``.

    >>> k_shot_label(0), k_shot_label(4), k_shot_label("full")
    ('zero-shot', '4-shot', 'full')
    """
    k = parse_k_shot(k_shot)
    return "zero-shot" if k == 0 else ("full" if k == "full" else f"{k}-shot")
