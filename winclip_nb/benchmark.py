"""The MVTec-AD benchmark (notebook 06): per-class metrics, result files, resume, merge.

For every class: text anchors, a normal memory (zero-shot: none; k-shot: k drawn
``train/good`` images, all their patches; ``full``: every training image up to
``max_images``, with the coreset), then every test image through the batched path
:meth:`~winclip_nb.detector.WinCLIP.detect_resized` fed by a ``DataLoader`` that
decodes and resizes in worker processes. Anomaly maps are resized on the device to
the evaluation size (default 256 x 256, masks with nearest-neighbour) and kept as
float16, so peak memory grows only by those stored maps. Metrics
(:data:`~winclip_nb.metrics.METRIC_KEYS`) are reported in percent.

Files under ``out`` (default ``results/benchmark``)::

    classes/<class>.json   one finished class, written atomically, with the config fingerprint
    results.json           {"config": ..., "classes": {name: {...}}, "mean": {...}}
    results.csv            one row per class plus MEAN
    examples/<class>.png   with save_examples > 0
    explain/<class>/...    with explain > 0

A rerun with the same settings and ``out`` skips finished classes; other settings in
the same ``out`` are refused unless ``force``. Runs of disjoint classes (shards) can be
combined with :func:`merge_results`.

Example (offline, random weights, synthetic data):
    >>> cfg = BenchmarkConfig(weights="random", image_size=112, out="results/demo")
    >>> results = run_benchmark(cfg)  # doctest: +SKIP
    >>> print(format_table(results))  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from . import __version__
from .backbone import ClipBackbone, resolve_device, resolve_weights
from .config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CORESET_RATIO,
    DEFAULT_DEVICE,
    DEFAULT_HOTSPOT_THRESHOLD,
    DEFAULT_LAYERS,
    DEFAULT_METHOD,
    DEFAULT_NN_WEIGHT,
    DEFAULT_NORMALIZATION,
    DEFAULT_PRETRAINED,
    DEFAULT_SEED,
    DEFAULT_SIGMA,
    DEFAULT_TEXT_WEIGHT,
    METHODS,
    NORMALIZATION_MODES,
    WinCLIPConfig,
    check_coreset_ratio,
    check_fusion_weights,
    method_defaults,
)
from .data import (
    LABEL_DEFECTIVE,
    LABEL_UNKNOWN,
    MVTEC_CLASSES,
    SYNTHETIC_MARKER,
    ClassData,
    TestSample,
    default_synthetic_root,
    default_synthetic_visa_root,
    is_synthetic_root,
    list_mvtec_classes,
    list_visa_classes,
    load_folder_dataset,
    load_image,
    load_mask,
    load_mvtec_class,
    load_visa_class,
    make_synthetic_mvtec,
    make_synthetic_visa,
    safe_name,
    sample_k_shot,
)
from .errors import ConfigError, DataError, ImageReadError
from .metrics import METRIC_KEYS, compute_metrics
from .results import RANDOM_WEIGHTS_BANNER

# --- defaults ------------------------------------------------------------------------
DEFAULT_K_SHOT = "full"
#: Memory images of a ``full`` run (the reference setting); 0 / None = all.
DEFAULT_MAX_MEMORY_IMAGES = 50
#: Side of the square resolution at which pixel metrics are computed; 0 = full resolution.
DEFAULT_EVAL_SIZE = 256
DEFAULT_OUT_DIR = "results/benchmark"
#: k-shot runs keep every patch of their k images.
FEW_SHOT_CORESET_RATIO = 1.0
MVTEC_ROOT_ENV = "MVTEC_ROOT"
VISA_ROOT_ENV = "VISA_ROOT"
#: ``--dataset``: the layout of ``--data-root`` (see :func:`load_benchmark_classes`).
DATASETS = ("mvtec", "visa", "folder")
DEFAULT_DATASET = "mvtec"
#: Names in printed lines.
DATASET_TITLES = {"mvtec": "MVTec", "visa": "VisA", "folder": "folder"}
#: DataLoader workers on CUDA: min(this, CPU count - 1); 0 on CPU.
MAX_DEFAULT_WORKERS = 4
MIN_EVAL_SIZE = 8

CLASS_DIR = "classes"
RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
EXAMPLES_DIR = "examples"
EXPLAIN_DIR = "explain"
#: Advisory lock file under ``out``: held while class files and results.json are written.
LOCK_FILE = ".lock"
MEAN_ROW = "MEAN"
THROUGHPUT_NOTE = (
    "images_per_s: test images per second at the given batch size, image decoding and "
    "I/O included, first (warm-up) batch excluded"
)
#: Column titles of the printed table.
METRIC_TITLES = {
    "image_auroc": "I-AUROC",
    "pixel_auroc": "P-AUROC",
    "pixel_ap": "P-AP",
    "aupro": "AUPRO",
    "pixel_f1_max": "P-F1max",
    "image_f1_max": "I-F1max",
}
#: Config keys that do not change any metric: ignored when runs are compared (resume, merge).
RUNTIME_KEYS = frozenset(
    {
        "classes",
        "out",
        "data_root",
        "device",
        "device_name",
        "workers",
        "batch_size",
        "force",
        "skip_bad",
        "save_examples",
        "explain",
        "llava",
        "llava_model",
        "weights_requested",
        "versions",
        "throughput_note",
        "merged_from",
    }
)
_FLOAT16_MAX = float(torch.finfo(torch.float16).max)
#: What the metrics of each method are computed on (recorded in results.json).
SCORED_MAPS = {
    "tokens": "anomaly_map and score after post-processing (fusion, normalisation, smoothing)",
    "windows": "raw_map and raw_score: WinCLIP's own map and image score (as anomalib returns)",
}


# ======================================================================================
# Settings
# ======================================================================================
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
    """Every setting of a benchmark run (the CLI options of ``winclip-nb benchmark``).

    ``None`` means "choose": ``data_root`` -> ``$MVTEC_ROOT`` or the synthetic set;
    ``classes`` -> every class under the root; ``weights`` -> ``"auto"`` on synthetic
    data, ``"openai"`` on real data; ``coreset_ratio`` -> 1.0 for k-shot, 0.1 for full;
    ``normalization`` -> ``per_image`` zero-shot, ``calibrated`` otherwise;
    ``workers`` -> min(4, CPUs - 1) on CUDA, 0 on CPU; ``model_name`` and
    ``image_size`` -> the method's (ViT-B-16 at 224 for tokens, ViT-B-16-plus-240 at 240
    for windows). ``dataset_format``: the layout of ``data_root``, ``mvtec`` | ``visa`` |
    ``folder`` (:func:`load_benchmark_classes`); with ``visa``, ``data_root`` None ->
    ``$VISA_ROOT`` or a synthetic VisA-format set.

    With ``method="windows"`` the metrics are computed on WinCLIP's own map and image
    score (``raw_map``, ``raw_score``), the numbers anomalib and the paper report; the
    memory keeps every patch and window of its images (no coreset).
    """

    data_root: str | None = None
    classes: list[str] | None = None
    k_shot: int | str = DEFAULT_K_SHOT
    max_images: int | None = DEFAULT_MAX_MEMORY_IMAGES
    seeds: list[int] = field(default_factory=lambda: [DEFAULT_SEED])
    method: str = DEFAULT_METHOD
    weights: str | None = None
    model_name: str | None = None
    device: str = DEFAULT_DEVICE
    batch_size: int = DEFAULT_BATCH_SIZE
    image_size: int | None = None
    layers: tuple[int, ...] = DEFAULT_LAYERS
    text_weight: float = DEFAULT_TEXT_WEIGHT
    nn_weight: float = DEFAULT_NN_WEIGHT
    coreset_ratio: float | None = None
    normalization: str | None = None
    sigma: float = DEFAULT_SIGMA
    eval_size: int = DEFAULT_EVAL_SIZE
    workers: int | None = None
    out: str = DEFAULT_OUT_DIR
    force: bool = False
    save_examples: int = 0
    explain: int = 0
    llava: bool = False
    llava_model: str | None = None
    skip_bad: bool = False
    dataset_format: str = DEFAULT_DATASET

    def validate(self) -> BenchmarkConfig:
        """A checked copy with ``k_shot``, ``seeds``, ``layers``, ``max_images`` normalised."""
        if self.dataset_format not in DATASETS:
            raise ConfigError(f"dataset must be one of {DATASETS}, got {self.dataset_format!r}")
        if self.dataset_format == "folder" and self.classes is not None and len(self.classes) > 1:
            raise ConfigError(
                f"--dataset folder holds one class; --classes names it, got {self.classes}"
            )
        k_shot = parse_k_shot(self.k_shot)
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        defaults = method_defaults(self.method)
        model_name = self.model_name or defaults["model_name"]
        image_size = defaults["image_size"] if self.image_size is None else self.image_size
        seeds = [self.seeds] if isinstance(self.seeds, int) else list(self.seeds)
        if not seeds or any(isinstance(s, bool) or int(s) != s or s < 0 for s in seeds):
            raise ConfigError(f"seeds must be one or more integers >= 0, got {self.seeds!r}")
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"seeds must be distinct, got {seeds}")
        max_images = self.max_images or None
        if max_images is not None and max_images < 1:
            raise ConfigError(f"max_images must be >= 1 (0 = all), got {self.max_images}")
        for name, value in (("batch_size", self.batch_size), ("image_size", image_size)):
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if self.eval_size != 0 and self.eval_size < MIN_EVAL_SIZE:
            raise ConfigError(
                f"eval_size must be 0 (full resolution) or >= {MIN_EVAL_SIZE}, got {self.eval_size}"
            )
        for name in ("save_examples", "explain"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")
        if self.coreset_ratio is not None:
            check_coreset_ratio(self.coreset_ratio)
        check_fusion_weights(self.text_weight, self.nn_weight)
        if self.normalization is not None and self.normalization not in NORMALIZATION_MODES:
            raise ConfigError(
                f"normalization must be one of {NORMALIZATION_MODES}, got {self.normalization!r}"
            )
        if k_shot == 0 and self.normalization == "calibrated":
            raise ConfigError(
                "normalization 'calibrated' needs a normal memory, but k_shot is 0 (zero-shot); "
                "use normalization 'per_image'"
            )
        if self.method == "windows" and k_shot == 1 and self.normalization == "calibrated":
            raise ConfigError(
                "normalization 'calibrated' with method 'windows' needs k_shot >= 2 (the "
                "references are calibrated leave-one-image-out); use normalization 'per_image'"
            )
        if self.classes is not None and not list(self.classes):
            raise ConfigError("classes must name at least one class (or be None for all)")
        # The detector's own checks (layers distinct, image_size >= 32, sigma >= 0, ...),
        # here so that a bad setting stops the run before any model is built.
        WinCLIPConfig(
            method=self.method,
            model_name=model_name,
            layers=tuple(int(i) for i in self.layers),
            image_size=image_size,
            batch_size=self.batch_size,
            text_weight=self.text_weight,
            nn_weight=self.nn_weight,
            sigma=self.sigma,
        ).validate()
        return dataclasses.replace(
            self,
            model_name=model_name,
            image_size=int(image_size),
            k_shot=k_shot,
            seeds=[int(s) for s in seeds],
            max_images=max_images,
            layers=tuple(int(i) for i in self.layers),
            classes=None if self.classes is None else list(dict.fromkeys(self.classes)),
        )

    @property
    def zero_shot(self) -> bool:
        return self.k_shot == 0

    @property
    def effective_coreset_ratio(self) -> float | None:
        """The coreset ratio used (None: zero-shot, no memory)."""
        if self.zero_shot or self.method == "windows":
            return None
        if self.coreset_ratio is not None:
            return float(self.coreset_ratio)
        return FEW_SHOT_CORESET_RATIO if self.k_shot != "full" else DEFAULT_CORESET_RATIO

    @property
    def effective_normalization(self) -> str:
        if self.normalization is not None:
            return self.normalization
        if self.zero_shot or (self.method == "windows" and self.k_shot == 1):
            return "per_image"
        return DEFAULT_NORMALIZATION

    @property
    def effective_max_images(self) -> int | None:
        """Cap on memory images: only ``full`` runs use it."""
        return self.max_images if self.k_shot == "full" else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        return d


def k_shot_label(k_shot: int | str) -> str:
    """``0`` -> ``zero-shot``, ``4`` -> ``4-shot``, ``full`` -> ``full``.

    >>> k_shot_label(0), k_shot_label(4), k_shot_label("full")
    ('zero-shot', '4-shot', 'full')
    """
    k = parse_k_shot(k_shot)
    return "zero-shot" if k == 0 else ("full" if k == "full" else f"{k}-shot")


def default_workers(device: torch.device) -> int:
    """min(4, CPUs - 1) DataLoader workers on CUDA, 0 (main process) on CPU."""
    if device.type != "cuda":
        return 0
    return max(0, min(MAX_DEFAULT_WORKERS, (os.cpu_count() or 1) - 1))


def default_weights(cfg: BenchmarkConfig) -> str:
    """Weights of a run on real data when none are named: the method's tag for its own
    model (``openai`` for tokens, ``laion400m_e31`` for windows), else open_clip's first
    tag for the model.

    >>> default_weights(BenchmarkConfig(method="windows").validate())
    'laion400m_e31'
    """
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(cfg.model_name)
    preferred = (method_defaults(cfg.method)["pretrained"], DEFAULT_PRETRAINED)
    return next((t for t in preferred if t in tags), tags[0] if tags else "random")


def resolve_data_root(data_root: str | os.PathLike | None) -> tuple[Path, bool]:
    """(dataset root, synthetic?). None: ``$MVTEC_ROOT``, else the generated synthetic set."""
    if data_root is None:
        data_root = os.environ.get(MVTEC_ROOT_ENV) or None
    if data_root is None:
        root = make_synthetic_mvtec(default_synthetic_root())
        return root, True
    root = Path(data_root).expanduser()
    if not root.exists():
        raise DataError(f"dataset root not found: {root}")
    if not root.is_dir():
        raise DataError(f"dataset root is not a folder: {root}")
    return root, is_synthetic_root(root)


def resolve_dataset_root(cfg: BenchmarkConfig) -> tuple[Path, bool]:
    """(dataset root, synthetic?) for ``cfg.dataset_format``.

    ``mvtec``: :func:`resolve_data_root`. ``visa``: ``data_root``, else ``$VISA_ROOT``,
    else a generated synthetic VisA-format set. ``folder``: ``data_root`` is required.
    """
    if cfg.dataset_format == "visa":
        data_root = cfg.data_root or os.environ.get(VISA_ROOT_ENV) or None
        if data_root is None:
            return make_synthetic_visa(default_synthetic_visa_root()), True
        return resolve_data_root(data_root)
    if cfg.dataset_format == "folder" and cfg.data_root is None:
        raise ConfigError(
            "--dataset folder needs --data-root DIR: a folder with train/good, test/good, "
            "test/<defect> and ground_truth/<defect>"
        )
    return resolve_data_root(cfg.data_root)


def load_folder_class(root: Path, name: str | None = None) -> ClassData:
    """``--dataset folder``: one class of your own in MVTec's single-class layout.

    ``root/train/good`` normal images; ``root/test/good`` normal and
    ``root/test/<defect>`` defective test images; ``root/ground_truth/<defect>``
    their masks (``<stem>_mask.png`` or ``<stem>.png``). ``name`` (default: the
    folder's name) is the object named in the text prompts. Read by
    :func:`~winclip_nb.data.load_folder_dataset`; a test image without a label
    (loose in ``test/``) or a defect image without a mask raises :class:`DataError`.
    """
    masks = root / "ground_truth"
    data = load_folder_dataset(
        root / "train" / "good",
        root / "test",
        masks if masks.is_dir() else None,
        name=name or root.resolve().name,
    )
    unlabelled = [s.path for s in data.test if s.label == LABEL_UNKNOWN]
    if unlabelled:
        raise DataError(
            f"{len(unlabelled)} test image(s) without a label, e.g. {unlabelled[0]}: put "
            f"them in {root / 'test' / 'good'} or {root / 'test'}/<defect>"
        )
    maskless = [s.path for s in data.test if s.label == LABEL_DEFECTIVE and s.mask_path is None]
    if maskless:
        raise DataError(
            f"no mask for defect image {maskless[0]}: expected "
            f"{masks / maskless[0].parent.name / (maskless[0].stem + '_mask.png')}"
        )
    return data


def load_benchmark_classes(cfg: BenchmarkConfig, root: Path) -> dict[str, ClassData]:
    """Every class of the run, by name, from ``root`` in the layout of ``cfg.dataset_format``."""
    if cfg.dataset_format == "folder":
        data = load_folder_class(root, cfg.classes[0] if cfg.classes else None)
        return {data.name: data}
    if cfg.dataset_format == "visa":
        names = cfg.classes or list_visa_classes(root)
        return {name: load_visa_class(root, name) for name in names}
    names = cfg.classes or list_mvtec_classes(root)
    if not names:
        hint = (
            f"; {root} looks like VisA (split_csv/1cls.csv): use --dataset visa"
            if (root / "split_csv" / "1cls.csv").is_file()
            else ""
        )
        raise DataError(f"no classes under {root}: expected <class>/train/good folders{hint}")
    return {name: load_mvtec_class(root, name) for name in names}


def check_layers(model_name: str, layers: Sequence[int]) -> tuple[int, ...]:
    """Layer indices valid for the vision transformer of ``model_name``, checked from
    open_clip's model config without building the model (unknown depth: not checked).

    >>> check_layers("ViT-B-16", [9, 10, 11])
    (9, 10, 11)
    """
    import open_clip

    vision = (open_clip.get_model_config(model_name) or {}).get("vision_cfg") or {}
    n_blocks = vision.get("layers")
    indices = tuple(int(i) for i in layers)
    if isinstance(n_blocks, int):
        bad = [i for i in indices if not 0 <= i < n_blocks]
        if bad:
            raise ConfigError(
                f"unknown layer indices {bad} for {model_name}: it has {n_blocks} transformer "
                f"blocks, valid indices are 0..{n_blocks - 1}"
            )
    return indices


def _package_versions() -> dict[str, str]:
    import open_clip
    import sklearn

    return {
        "winclip_nb": __version__,
        "torch": torch.__version__,
        "open_clip": getattr(open_clip, "__version__", "unknown"),
        "numpy": np.__version__,
        "sklearn": sklearn.__version__,
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def _synthetic_settings(root: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((root / SYNTHETIC_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return {k: v for k, v in marker.items() if k != "complete"}


def comparable_config(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a run's config that decides its numbers (no paths, device, timing keys)."""
    return {k: v for k, v in config.items() if k not in RUNTIME_KEYS}


def config_fingerprint(config: dict[str, Any]) -> str:
    """16 hex digits of SHA-256 over :func:`comparable_config` (sorted JSON)."""
    text = json.dumps(comparable_config(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every comparable key that differs.

    >>> config_differences({"k_shot": "full", "out": "a"}, {"k_shot": 4, "out": "b"})
    ["k_shot: 'full' -> 4"]
    """
    a, b = comparable_config(old), comparable_config(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a | b) if a.get(k) != b.get(k)]


# ======================================================================================
# Test-image loading (runs in DataLoader workers)
# ======================================================================================
class _BackboneResize:
    """Picklable stand-in for :meth:`ClipBackbone.resize` (which only reads ``image_size``),
    so DataLoader workers resize exactly like the model without receiving the model."""

    def __init__(self, image_size: int) -> None:
        self.image_size = int(image_size)

    __call__ = ClipBackbone.resize


class TestImageDataset(Dataset):
    """Test images of one class, decoded and resized for the model, with their masks.

    Item ``i``: ``index``; ``image`` (S, S, 3) uint8; ``mask`` (E, E) bool at the eval
    size (the image's own size when ``eval_size`` is 0; zeros for good images);
    ``size`` the original (H, W); ``error`` "" or the one-line reason the image or its
    mask could not be read (the caller decides whether to stop or skip).
    """

    __test__ = False  # not a pytest test class

    def __init__(self, samples: Sequence[TestSample], image_size: int, eval_size: int) -> None:
        self.samples = list(samples)
        self.resize = _BackboneResize(image_size)
        self.eval_size = int(eval_size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        s = self.resize.image_size
        try:
            image = load_image(sample.path)
            height, width = image.shape[:2]
            if sample.mask_path is not None:
                mask = load_mask(
                    sample.mask_path, size=(height, width), nonzero=sample.mask_nonzero
                )
            else:
                mask = np.zeros((height, width), bool)
            resized = self.resize(image)
        except DataError as exc:
            side = self.eval_size or 1
            return {
                "index": index,
                "image": np.zeros((s, s, 3), np.uint8),
                "mask": np.zeros((side, side), bool),
                "size": (side, side),
                "error": str(exc).replace("\n", " "),
            }
        if self.eval_size:
            e = self.eval_size
            mask = cv2.resize(mask.astype(np.uint8), (e, e), interpolation=cv2.INTER_NEAREST) > 0
        return {
            "index": index,
            "image": resized,
            "mask": mask,
            "size": (height, width),
            "error": "",
        }


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Images -> one (B, S, S, 3) uint8 tensor; masks stay numpy (never pinned or moved)."""
    return {
        "index": [it["index"] for it in items],
        "image": torch.from_numpy(np.stack([it["image"] for it in items])),
        "mask": [it["mask"] for it in items],
        "size": [it["size"] for it in items],
        "error": [it["error"] for it in items],
    }


# ======================================================================================
# One class
# ======================================================================================
def memory_images(class_data: ClassData, cfg: BenchmarkConfig, seed: int) -> list[Path]:
    """The normal images of the memory: k drawn with ``seed``, or the first ``max_images``."""
    cfg = cfg.validate()
    if cfg.zero_shot:
        return []
    if cfg.k_shot == "full":
        train = sample_k_shot(class_data.train, "full", seed)
        return train[: cfg.max_images] if cfg.max_images else train
    if cfg.k_shot > class_data.n_train:
        raise ConfigError(
            f"k_shot={cfg.k_shot} but class {class_data.name!r} has only {class_data.n_train} "
            f"training images in {class_data.root / 'train' / 'good'}"
        )
    return sample_k_shot(class_data.train, cfg.k_shot, seed)


def _percent(value: float) -> float | None:
    """A fraction -> percent rounded to 4 decimals; nan -> None (JSON null)."""
    return None if value is None or not math.isfinite(value) else round(100.0 * value, 4)


def _progress_bar(
    total: int, desc: str, enabled: bool, leave: bool = False, unit: str = "img"
) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=leave)


def evaluate_class(
    winclip: Any,
    class_data: ClassData,
    cfg: BenchmarkConfig,
    *,
    seed: int | None = None,
    progress: bool = True,
    return_maps: bool = False,
) -> dict[str, Any]:
    """Build the memory for one class, run every test image, compute the metrics.

    Args:
        winclip: a :class:`~winclip_nb.detector.WinCLIP`; its memory is replaced.
        class_data: from :func:`~winclip_nb.data.load_mvtec_class`.
        cfg: fusion weights, normalisation, sigma, k-shot, eval size, batch size, workers.
        seed: k-shot draw and coreset seed (default: the first of ``cfg.seeds``).
        return_maps: also return ``maps`` (N, E, E) float16, ``masks`` (N, E, E) bool,
            ``scores`` (N,), ``labels`` (N,) and ``paths`` of the evaluated images.

    Returns:
        ``{metric: percent or None, "n_test", "n_defective", "n_memory_images",
        "seconds", "memory_seconds", "test_seconds", "images_per_s", "peak_gpu_mb",
        "skipped_files"}``.
    """
    cfg = cfg.validate()
    seed = cfg.seeds[0] if seed is None else int(seed)
    device = winclip.device
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    normal_anchor, anomalous_anchor = winclip.build_text_anchors(class_data.name)
    train = memory_images(class_data, cfg, seed)
    if cfg.zero_shot:
        winclip.memory = None
    else:
        winclip.build_normal_memory(
            train,
            normal_anchor,
            anomalous_anchor,
            coreset_ratio=cfg.effective_coreset_ratio,
            seed=seed,
            progress=progress,
        )
    memory_seconds = time.perf_counter() - start

    arrays = _run_test_images(
        winclip, class_data, cfg, normal_anchor, anomalous_anchor, progress, seed
    )
    ok = arrays["ok"]
    labels = class_data.labels[ok]
    maps, masks, scores = arrays["maps"], arrays["masks"], arrays["scores"]
    if labels.size == 0:
        raise DataError(f"no readable test images left for class {class_data.name!r}")
    metrics = compute_metrics(labels, scores, masks, maps)
    total = time.perf_counter() - start
    result: dict[str, Any] = {key: _percent(metrics[key]) for key in METRIC_KEYS}
    result.update(
        n_test=int(labels.size),
        n_defective=int(np.count_nonzero(labels == LABEL_DEFECTIVE)),
        n_memory_images=len(train),
        memory_patches=None if winclip.memory is None else winclip.memory.size,
        seconds=round(total, 3),
        memory_seconds=round(memory_seconds, 3),
        test_seconds=round(arrays["test_seconds"], 3),
        images_per_s=round(arrays["images_per_s"], 3),
        peak_gpu_mb=(
            round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            if device.type == "cuda"
            else None
        ),
        skipped_files=arrays["skipped"],
    )
    if return_maps:
        result.update(
            maps=maps,
            masks=masks,
            scores=scores,
            labels=labels,
            paths=[s.path for s, keep in zip(class_data.test, ok, strict=True) if keep],
        )
    return result


def _run_test_images(
    winclip: Any,
    class_data: ClassData,
    cfg: BenchmarkConfig,
    normal_anchor: torch.Tensor,
    anomalous_anchor: torch.Tensor,
    progress: bool,
    seed: int,
) -> dict[str, Any]:
    """Maps, masks and scores of every readable test image (see :func:`evaluate_class`)."""
    device = winclip.device
    n = class_data.n_test
    eval_size = cfg.eval_size
    workers = default_workers(device) if cfg.workers is None else cfg.workers
    dataset = TestImageDataset(class_data.test, winclip.config.image_size, eval_size)
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        collate_fn=_collate,
    )
    if eval_size:
        maps: Any = np.zeros((n, eval_size, eval_size), np.float16)
        masks: Any = np.zeros((n, eval_size, eval_size), bool)
    else:
        maps, masks = [None] * n, [None] * n
    scores = np.zeros(n, np.float64)
    ok = np.zeros(n, bool)
    skipped: list[str] = []
    bar = _progress_bar(n, f"{class_data.name} (seed {seed})", progress)
    start = time.perf_counter()
    warm_end, warm_images, done = None, 0, 0
    try:
        with torch.inference_mode():
            for batch in loader:
                errors = batch["error"]
                bad = [i for i, err in enumerate(errors) if err]
                if bad and not cfg.skip_bad:
                    raise ImageReadError(errors[bad[0]])
                skipped += [str(class_data.test[batch["index"][i]].path) for i in bad]
                keep = [i for i, err in enumerate(errors) if not err]
                if keep:
                    rows = [batch["index"][i] for i in keep]
                    images = batch["image"][keep] if bad else batch["image"]
                    out = winclip.detect_resized(
                        images,
                        normal_anchor,
                        anomalous_anchor,
                        cfg.text_weight,
                        cfg.nn_weight,
                        normalization=cfg.effective_normalization,
                        sigma=cfg.sigma,
                    )
                    # windows: WinCLIP's own map and score (the published protocol)
                    scored_map = out["raw_map"] if cfg.method == "windows" else out["anomaly_map"]
                    _store_maps(scored_map, batch, keep, rows, eval_size, maps, masks)
                    scores[rows] = out["score"].float().cpu().numpy()
                    ok[rows] = True
                done += len(errors)
                if warm_end is None:
                    warm_end, warm_images = time.perf_counter(), len(keep)
                if bar is not None:
                    bar.update(len(errors))
    finally:
        if bar is not None:
            bar.close()
    end = time.perf_counter()
    measured = int(ok.sum()) - warm_images
    if measured > 0 and end > warm_end:
        images_per_s = measured / (end - warm_end)
    else:  # a single batch: no warm-up to exclude
        images_per_s = int(ok.sum()) / max(end - start, 1e-9)
    if eval_size:
        maps, masks = maps[ok], masks[ok]
    else:
        maps, masks = _stack_full_resolution(maps, masks, ok, class_data)
    return {
        "maps": maps,
        "masks": masks,
        "scores": scores[ok],
        "ok": ok,
        "skipped": skipped,
        "test_seconds": end - start,
        "images_per_s": images_per_s,
    }


def _store_maps(
    anomaly_map: torch.Tensor,
    batch: dict[str, Any],
    keep: list[int],
    rows: list[int],
    eval_size: int,
    maps: Any,
    masks: Any,
) -> None:
    """Resize (b, S, S) maps on the device to the eval size (or each image's size), store f16."""
    amap = anomaly_map.float().clamp(-_FLOAT16_MAX, _FLOAT16_MAX)
    if eval_size:
        resized = F.interpolate(
            amap[:, None], size=(eval_size, eval_size), mode="bilinear", align_corners=False
        )[:, 0]
        maps[rows] = resized.to("cpu", torch.float16).numpy()
        masks[rows] = np.stack([batch["mask"][i] for i in keep])
        return
    for j, (i, row) in enumerate(zip(keep, rows, strict=True)):
        height, width = batch["size"][i]
        one = F.interpolate(
            amap[j : j + 1, None], size=(height, width), mode="bilinear", align_corners=False
        )[0, 0]
        maps[row] = one.to("cpu", torch.float16).numpy()
        masks[row] = batch["mask"][i]


def _stack_full_resolution(
    maps: list, masks: list, ok: np.ndarray, class_data: ClassData
) -> tuple[np.ndarray, np.ndarray]:
    kept = [i for i in range(len(maps)) if ok[i]]
    shapes = sorted({maps[i].shape for i in kept})
    if len(shapes) > 1:
        raise ConfigError(
            f"test images of class {class_data.name!r} have different sizes {shapes}: "
            "full-resolution evaluation (eval_size 0) needs one size; use eval_size > 0"
        )
    return np.stack([maps[i] for i in kept]), np.stack([masks[i] for i in kept])


# ======================================================================================
# Figures and explanations
# ======================================================================================
def save_examples_figure(
    class_name: str,
    evaluated: dict[str, Any],
    n: int,
    path: str | os.PathLike,
    random_weights: bool = False,
) -> Path | None:
    """PNG with the ``n`` most anomalous test images: image, ground truth, heat map.

    ``evaluated`` is the output of :func:`evaluate_class` with ``return_maps=True``.
    """
    from matplotlib.figure import Figure

    from .viz import overlay_heatmap, random_weights_banner, save_figure

    scores = np.asarray(evaluated["scores"])
    order = np.argsort(-scores, kind="stable")[: max(0, int(n))]
    if order.size == 0:
        return None
    fig = Figure(figsize=(9.0, 3.0 * order.size))
    axes = fig.subplots(order.size, 3, squeeze=False)
    for row, i in zip(axes, order, strict=True):
        amap = evaluated["maps"][i].astype(np.float32)
        height, width = amap.shape
        image = cv2.resize(load_image(evaluated["paths"][i]), (width, height), cv2.INTER_AREA)
        path_i = Path(evaluated["paths"][i])
        row[0].imshow(image)
        row[0].set_title(f"{path_i.parent.name}/{path_i.name}", fontsize=9)
        row[1].imshow(evaluated["masks"][i], cmap="gray", vmin=0, vmax=1)
        row[1].set_title("ground truth", fontsize=9)
        overlay_heatmap(image, amap, ax=row[2], colorbar=False)
        row[2].set_title(f"anomaly map, score {scores[i]:.2f}", fontsize=9)
        for ax in row[:2]:
            ax.set_axis_off()
    title = f"{class_name}: {order.size} most anomalous test images"
    if random_weights:
        title = f"RANDOM WEIGHTS - {title}"
        random_weights_banner(fig)
    fig.suptitle(title)
    return save_figure(fig, path)


def _explain_top(
    winclip: Any,
    class_data: ClassData,
    evaluated: dict[str, Any],
    n: int,
    out_dir: Path,
    explainer: Any,
) -> list[str]:
    """Explain the ``n`` most anomalous test images; returns their summary lines."""
    from .explain import explain_images

    order = np.argsort(-np.asarray(evaluated["scores"]), kind="stable")[:n]
    paths = [evaluated["paths"][i] for i in order]
    normal_anchor, anomalous_anchor = winclip.build_text_anchors(class_data.name)
    reports = explain_images(
        winclip,
        paths,
        normal_anchor,
        anomalous_anchor,
        class_data.name,
        out_dir=out_dir,
        explainer=explainer,
    )
    return [str(r.get("summary", "")) for r in reports]


# ======================================================================================
# Result files
# ======================================================================================
#: ``.<name>.<host>.<pid>.<token>.tmp``: the temporary files of :func:`_write_atomic`.
_TEMP_NAME = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.[0-9a-f]+\.tmp$")


def _host_tag() -> str:
    """This machine's name as a file-name part (no dots)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path``, then ``os.replace`` it.

    The temporary name carries the host, the process id and a random token, so
    concurrent writers (shards in other processes or on other machines sharing the
    folder, threads of one process) never write into the same temporary file. A failed
    write removes its temporary file; one left by a killed process is removed by the
    next run (:func:`_remove_stale_temps`).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:12]
    tmp = path.with_name(f".{path.name}.{_host_tag()}.{os.getpid()}.{token}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _pid_alive(pid: int) -> bool:
    """False only if no process ``pid`` exists on this machine (POSIX)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by someone else
        return True
    return True


def _remove_stale_temps(out: Path) -> list[Path]:
    """Remove temporary files that a killed run on this machine left under ``out``.

    Only files named by :func:`_write_atomic` with this host and the id of a process
    that no longer exists; those of running processes and other machines stay. POSIX
    only (elsewhere, leftovers are ignored: they never match ``*.json``).
    """
    if os.name != "posix":
        return []
    host, removed = _host_tag(), []
    for folder in (out, out / CLASS_DIR):
        if not folder.is_dir():
            continue
        for path in folder.glob(".*.tmp"):
            match = _TEMP_NAME.match(path.name)
            if match and match["host"] == host and not _pid_alive(int(match["pid"])):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


@contextlib.contextmanager
def _out_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``out`` (``fcntl.flock`` on ``out/.lock``).

    Runs writing into the same ``out`` (shards) take it around "write a class file and
    rebuild results.json from the class files on disk" and around the check of the
    folder, so no run rebuilds the table from a listing that another run has made stale
    in between. Blocks until the lock is free; not re-entrant (never nest it). Creates
    ``out``. Where ``fcntl`` does not exist (Windows) it does not lock.
    """
    out.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(out / LOCK_FILE, "a", encoding="utf-8") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, allow_nan=False, default=str) + "\n"


def _class_order(names: Iterable[str]) -> list[str]:
    """MVTec's class order first, then alphabetical."""
    canonical = {name: i for i, name in enumerate(MVTEC_CLASSES)}
    return sorted(set(names), key=lambda n: (canonical.get(n, len(canonical)), n))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _class_files(out: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(path, content) of every readable class file under ``out/classes``."""
    folder = out / CLASS_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob("*.json")):
        content = _read_json(path)
        if content is not None and "fingerprint" in content and "result" in content:
            found.append((path, content))
    return found


def _mean_over_classes(classes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per-metric mean over classes (classes with an undefined metric left out)."""
    mean: dict[str, Any] = {}
    for key in METRIC_KEYS:
        values = [c[key] for c in classes.values() if c.get(key) is not None]
        mean[key] = round(float(np.mean(values)), 4) if values else None
    per_seed = [c.get("per_seed") for c in classes.values()]
    if classes and all(p and len(p) > 1 for p in per_seed):
        seeds = sorted(set.intersection(*(set(p) for p in per_seed)))
        if len(seeds) > 1:  # std over seeds of the per-seed class mean
            mean["std"] = {}
            for key in METRIC_KEYS:
                seed_means = []
                for s in seeds:
                    values = [p[s][key] for p in per_seed if p[s].get(key) is not None]
                    if values:
                        seed_means.append(float(np.mean(values)))
                mean["std"][key] = (
                    round(float(np.std(seed_means, ddof=1)), 4) if len(seed_means) > 1 else None
                )
    mean["n_test"] = int(sum(c.get("n_test", 0) for c in classes.values()))
    mean["n_defective"] = int(sum(c.get("n_defective", 0) for c in classes.values()))
    speeds = [c["images_per_s"] for c in classes.values() if c.get("images_per_s")]
    mean["images_per_s"] = round(float(np.mean(speeds)), 3) if speeds else None
    mean["seconds"] = round(float(sum(c.get("seconds", 0.0) for c in classes.values())), 3)
    return mean


def build_results(config: dict[str, Any], classes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The results.json content: config, classes in MVTec order, mean over classes."""
    ordered = {name: classes[name] for name in _class_order(classes)}
    return {"config": config, "classes": ordered, "mean": _mean_over_classes(ordered)}


def results_csv(results: dict[str, Any]) -> str:
    """CSV text: one row per class plus MEAN; metrics in percent, std columns with >1 seed."""
    classes = results["classes"]
    with_std = any("std" in c for c in classes.values())
    header = ["class", *METRIC_KEYS]
    if with_std:
        header += [f"{k}_std" for k in METRIC_KEYS]
    header += ["n_test", "n_defective", "seconds", "images_per_s"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    rows = [*classes.items(), (MEAN_ROW, results["mean"])]
    for name, row in rows:
        values = [name, *(row.get(k) for k in METRIC_KEYS)]
        if with_std:
            values += [row.get("std", {}).get(k) for k in METRIC_KEYS]
        values += [row.get(k) for k in ("n_test", "n_defective", "seconds", "images_per_s")]
        writer.writerow(["" if v is None else v for v in values])
    return buffer.getvalue()


def write_results(out: str | os.PathLike, results: dict[str, Any]) -> None:
    """Write ``results.json`` and ``results.csv`` under ``out`` (each atomically)."""
    out = Path(out)
    _write_atomic(out / RESULTS_JSON, _to_json(results))
    _write_atomic(out / RESULTS_CSV, results_csv(results))


def _write_class_file(out: Path, name: str, config: dict[str, Any], result: dict[str, Any]) -> Path:
    path = out / CLASS_DIR / f"{safe_name(name)}.json"
    content = {
        "class": name,
        "fingerprint": config_fingerprint(config),
        "config": config,
        "result": result,
    }
    _write_atomic(path, _to_json(content))
    return path


def _finished_classes(out: Path, fingerprint: str) -> dict[str, dict[str, Any]]:
    return {
        c["class"]: c["result"] for _, c in _class_files(out) if c["fingerprint"] == fingerprint
    }


def _rebuild_results(out: Path, config: dict[str, Any]) -> dict[str, Any]:
    """results.json / results.csv from every class file of these settings on disk.

    The caller holds :func:`_out_lock`. ``config["classes"]`` becomes this run's classes
    plus every finished one (shards writing into one ``out`` each add theirs).
    """
    finished = _finished_classes(out, config_fingerprint(config))
    names = list(dict.fromkeys([*config.get("classes", []), *_class_order(finished)]))
    results = build_results(dict(config, classes=names), finished)
    write_results(out, results)
    return results


def _record_class(
    out: Path, name: str, config: dict[str, Any], result: dict[str, Any]
) -> dict[str, Any]:
    """Save one finished class and rebuild the result files, under the ``out`` lock."""
    with _out_lock(out):
        _write_class_file(out, name, config, result)
        return _rebuild_results(out, config)


def _check_out_dir(out: Path, config: dict[str, Any], force: bool, log: Callable) -> None:
    """Refuse an ``out`` holding results of other settings (``force``: remove those)."""
    fingerprint = config_fingerprint(config)
    foreign = [(p, c) for p, c in _class_files(out) if c["fingerprint"] != fingerprint]
    summary = _read_json(out / RESULTS_JSON)
    summary_foreign = (
        summary is not None
        and isinstance(summary.get("config"), dict)
        and config_fingerprint(summary["config"]) != fingerprint
    )
    if not foreign and not summary_foreign:
        return
    old_config = foreign[0][1].get("config", {}) if foreign else summary["config"]  # type: ignore[index]
    if not force:
        diff = "; ".join(config_differences(old_config, config)) or "settings differ"
        raise ConfigError(
            f"{out} holds results of other settings ({diff}); use another --out, "
            "or --force to replace them"
        )
    for path, _ in foreign:
        path.unlink(missing_ok=True)
    if summary_foreign:
        for name in (RESULTS_JSON, RESULTS_CSV):
            (out / name).unlink(missing_ok=True)
    log(f"--force: removed {len(foreign)} class result(s) of other settings from {out}")


# ======================================================================================
# Whole benchmark
# ======================================================================================
def _load_model(cfg: BenchmarkConfig, weights: str, seed: int, device: torch.device) -> Any:
    """A WinCLIP with the run's settings; ``seed`` draws random-init weights."""
    from .detector import WinCLIP

    return WinCLIP(
        device=str(device),
        method=cfg.method,
        model_name=cfg.model_name,
        pretrained=weights,
        layers=cfg.layers,
        image_size=cfg.image_size,
        batch_size=cfg.batch_size,
        text_weight=cfg.text_weight,
        nn_weight=cfg.nn_weight,
        sigma=cfg.sigma,
        normalization=cfg.effective_normalization,
        coreset_ratio=cfg.effective_coreset_ratio or DEFAULT_CORESET_RATIO,
        seed=seed,
    )


def _combine_seeds(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds of each metric, sample std (ddof=1) with >1 seed; sums of timings."""
    runs = list(per_seed.values())
    combined: dict[str, Any] = {}
    for key in METRIC_KEYS:
        values = [r[key] for r in runs if r[key] is not None]
        combined[key] = round(float(np.mean(values)), 4) if values else None
    if len(runs) > 1:
        combined["std"] = {}
        for key in METRIC_KEYS:
            values = [r[key] for r in runs if r[key] is not None]
            combined["std"][key] = (
                round(float(np.std(values, ddof=1)), 4) if len(values) > 1 else None
            )
        combined["per_seed"] = {str(s): {k: r[k] for k in METRIC_KEYS} for s, r in per_seed.items()}
    last = runs[-1]
    combined.update(
        n_test=last["n_test"],
        n_defective=last["n_defective"],
        n_memory_images=last["n_memory_images"],
        memory_patches=last["memory_patches"],
        seconds=round(sum(r["seconds"] for r in runs), 3),
        images_per_s=round(float(np.mean([r["images_per_s"] for r in runs])), 3),
        peak_gpu_mb=max((r["peak_gpu_mb"] or 0.0 for r in runs), default=0.0) or None,
        skipped_files=sorted({f for r in runs for f in r["skipped_files"]}),
    )
    combined["n_skipped"] = len(combined["skipped_files"])
    return combined


def describe_run(
    cfg: BenchmarkConfig,
    *,
    data_root: Path,
    synthetic: bool,
    weights_requested: str,
    weights_label: str,
    random_weights: bool,
    device: torch.device,
) -> dict[str, Any]:
    """The ``config`` block of results.json: every setting plus what was actually used."""
    config = cfg.to_dict()
    config.update(
        data_root=str(data_root),
        synthetic=synthetic,
        dataset=_synthetic_settings(data_root) if synthetic else None,
        weights_requested=weights_requested,
        weights=weights_label,
        random_weights=random_weights,
        device=str(device),
        device_name=_device_name(device),
        workers=default_workers(device) if cfg.workers is None else cfg.workers,
        coreset_ratio=cfg.effective_coreset_ratio,
        normalization=cfg.effective_normalization,
        max_images=cfg.effective_max_images,
        k_shot_label=k_shot_label(cfg.k_shot),
        scored_maps=SCORED_MAPS[cfg.method],
        metrics_unit="percent",
        eval_resolution="full" if cfg.eval_size == 0 else f"{cfg.eval_size}x{cfg.eval_size}",
        throughput_note=THROUGHPUT_NOTE,
        versions=_package_versions(),
    )
    return config


def run_benchmark(
    cfg: BenchmarkConfig, progress: bool = True, *, verbose: bool = True
) -> dict[str, Any]:
    """Run (or resume) the benchmark; returns the results.json content.

    Fails before any model work on bad settings, a missing or malformed dataset
    (:class:`~winclip_nb.errors.DataError` naming the path), unavailable weights or
    device, or an ``out`` folder holding results of other settings.
    """
    cfg = cfg.validate()
    log: Callable[..., None] = print if verbose else (lambda *a, **k: None)
    device = resolve_device(cfg.device)
    root, synthetic = resolve_dataset_root(cfg)
    class_data = load_benchmark_classes(cfg, root)
    names = list(class_data)
    for data in class_data.values():
        memory_images(data, cfg, cfg.seeds[0])  # k larger than the training set fails here

    weights_requested = cfg.weights or ("auto" if synthetic else default_weights(cfg))
    resolved = resolve_weights(cfg.model_name, weights_requested)
    check_layers(cfg.model_name, cfg.layers)
    # A tag is passed on as a tag (it carries open_clip's quick_gelu setting), never a file.
    weights_arg = (
        "random"
        if resolved.random
        else (resolved.label if weights_requested.lower() == "auto" else weights_requested)
    )
    config = describe_run(
        dataclasses.replace(cfg, classes=list(names)),
        data_root=root,
        synthetic=synthetic,
        weights_requested=weights_requested,
        weights_label=resolved.label,
        random_weights=resolved.random,
        device=device,
    )
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out must be a folder, but {out} is a file")
    if out.exists():
        with _out_lock(out):
            _check_out_dir(out, config, cfg.force, log)
            _remove_stale_temps(out)
    fingerprint = config_fingerprint(config)
    for line in _header_lines(config):
        log(line)

    models: dict[int | None, Any] = {}
    explainer = None
    todo = [n for n in names if cfg.force or n not in _finished_classes(out, fingerprint)]
    if cfg.explain and todo:
        # Loaded before any class is computed: a LLaVA that cannot be loaded (missing,
        # offline, out of memory) falls back to rule-based with a notice instead of
        # failing after the metrics of a class were computed but not yet saved.
        from .explain import DEFAULT_LLAVA_MODEL, load_explainer

        explainer = load_explainer(
            "auto" if cfg.llava else False,
            cfg.llava_model or DEFAULT_LLAVA_MODEL,
            device=str(device),
            threshold=DEFAULT_HOTSPOT_THRESHOLD,
        )
    overall = _progress_bar(
        len(todo) * len(cfg.seeds), "benchmark", progress and bool(todo), unit="class"
    )
    try:
        for name in names:
            if name not in todo:
                log(f"{name}: skipped (done)")
                continue
            per_seed: dict[int, dict[str, Any]] = {}
            for seed in cfg.seeds:
                key = seed if resolved.random else None
                if key not in models:
                    models[key] = _load_model(cfg, weights_arg, seed, device)
                winclip = models[key]
                keep_maps = seed == cfg.seeds[-1] and (cfg.save_examples or cfg.explain)
                evaluated = evaluate_class(
                    winclip,
                    class_data[name],
                    cfg,
                    seed=seed,
                    progress=progress,
                    return_maps=bool(keep_maps),
                )
                per_seed[seed] = evaluated
                if overall is not None:
                    overall.update(1)
            result = _combine_seeds(per_seed)
            if cfg.save_examples:
                figure = save_examples_figure(
                    name,
                    evaluated,
                    cfg.save_examples,
                    out / EXAMPLES_DIR / f"{safe_name(name)}.png",
                    resolved.random,
                )
                result["examples_figure"] = None if figure is None else str(figure)
            if cfg.explain:
                result["explainer"] = getattr(explainer, "name", "rule-based")
                result["explanations"] = _explain_top(
                    winclip,
                    class_data[name],
                    evaluated,
                    cfg.explain,
                    out / EXPLAIN_DIR / safe_name(name),
                    explainer,
                )
            _record_class(out, name, config, result)
            log(_class_line(name, result))
    finally:
        if overall is not None:
            overall.close()
    with _out_lock(out):
        results = _rebuild_results(out, config)
    return results


def _class_line(name: str, result: dict[str, Any]) -> str:
    def fmt(key: str) -> str:
        value = result.get(key)
        return "n/a" if value is None else f"{value:.1f}"

    skipped = f", {result['n_skipped']} skipped" if result.get("n_skipped") else ""
    return (
        f"{name}: image AUROC {fmt('image_auroc')}, pixel AUROC {fmt('pixel_auroc')}, "
        f"AUPRO {fmt('aupro')} ({result['n_test']} test images{skipped}, "
        f"{result['images_per_s']:.1f} images/s, {result['seconds']:.1f} s)"
    )


# ======================================================================================
# Merge
# ======================================================================================
def merge_results(
    dirs: Sequence[str | os.PathLike], out: str | os.PathLike, *, verbose: bool = True
) -> dict[str, Any]:
    """Combine the per-class results of runs over disjoint classes into ``out``.

    Every input folder needs a results.json; runs whose settings differ (ignoring the
    class list, output folder, device, workers and timing keys) are refused with
    :class:`ConfigError`, and so is a class present in two runs with different values.
    Writes ``out/classes/*.json``, results.json and results.csv; returns the results.
    """
    log: Callable[..., None] = print if verbose else (lambda *a, **k: None)
    if not dirs:
        raise ConfigError("merge needs at least one results folder")
    runs: list[tuple[Path, dict[str, Any]]] = []
    for folder in map(Path, dirs):
        if not folder.is_dir():
            raise DataError(f"results folder not found: {folder}")
        content = _read_json(folder / RESULTS_JSON)
        if content is None or not isinstance(content.get("classes"), dict):
            raise DataError(f"no readable {RESULTS_JSON} in {folder}")
        runs.append((folder, content))
    first_dir, first = runs[0]
    fingerprint = config_fingerprint(first["config"])
    classes: dict[str, dict[str, Any]] = {}
    source: dict[str, Path] = {}
    for folder, content in runs:
        if config_fingerprint(content["config"]) != fingerprint:
            diff = "; ".join(config_differences(first["config"], content["config"]))
            raise ConfigError(f"cannot merge {folder} with {first_dir}: settings differ ({diff})")
        if content["config"].get("versions") != first["config"].get("versions"):
            log(f"note: package versions of {folder} differ from {first_dir}")
        for name, result in content["classes"].items():
            if name in classes and _metrics_of(classes[name]) != _metrics_of(result):
                raise ConfigError(
                    f"class {name!r} is in both {source[name]} and {folder} with different values"
                )
            classes.setdefault(name, result)
            source.setdefault(name, folder)
    devices = list(dict.fromkeys(str(c["config"].get("device")) for _, c in runs))
    config = dict(first["config"])
    config.update(
        classes=_class_order(classes),
        out=str(out),
        device=devices[0] if len(devices) == 1 else ", ".join(devices),
        merged_from=[str(d) for d, _ in runs],
    )
    out = Path(out)
    with _out_lock(out):
        _check_out_dir(out, config, force=False, log=log)
        for name, result in classes.items():
            _write_class_file(out, name, config, result)
        results = build_results(config, _finished_classes(out, fingerprint))
        write_results(out, results)
    return results


def _metrics_of(result: dict[str, Any]) -> dict[str, Any]:
    return {k: result.get(k) for k in METRIC_KEYS}


# ======================================================================================
# Table
# ======================================================================================
def _header_lines(config: dict[str, Any]) -> list[str]:
    lines = [f"method: {config.get('method', DEFAULT_METHOD)}"]
    if config.get("random_weights"):
        lines.append(
            f"weights: {config.get('model_name')} / {config.get('weights')}  "
            f"** {RANDOM_WEIGHTS_BANNER} **"
        )
    else:
        lines.append(f"weights: {config.get('model_name')} / {config.get('weights')}")
    dataset = config.get("dataset_format") or DEFAULT_DATASET
    if config.get("synthetic") and dataset == "visa":
        lines.append(
            f"data: SYNTHETIC VisA-format set at {config.get('data_root')} "
            "(not VisA: numbers are a smoke test only)"
        )
    elif config.get("synthetic"):
        lines.append(
            f"data: SYNTHETIC MVTec-format set at {config.get('data_root')} "
            "(not MVTec-AD: numbers are a smoke test only)"
        )
    elif dataset != DEFAULT_DATASET:
        lines.append(f"data: {config.get('data_root')} ({DATASET_TITLES.get(dataset, dataset)})")
    else:
        lines.append(f"data: {config.get('data_root')}")
    memory = (
        "no memory (text map only)"
        if config.get("k_shot") == 0
        else "every patch and window of the references"
        if config.get("coreset_ratio") is None
        else f"coreset ratio {config.get('coreset_ratio')}"
        + (
            f", at most {config.get('max_images')} memory images"
            if config.get("max_images")
            else ""
        )
    )
    lines.append(
        f"k-shot: {config.get('k_shot_label')} ({memory}); seeds: "
        f"{', '.join(str(s) for s in config.get('seeds', []))}"
    )
    lines.append(
        f"device: {config.get('device')} ({config.get('device_name')}), batch size "
        f"{config.get('batch_size')}, image size {config.get('image_size')}, pixel metrics at "
        f"{config.get('eval_resolution')}"
    )
    return lines


def format_table(results: dict[str, Any]) -> str:
    """The printed table: header lines, one row per class, MEAN, a footnote.

    Metrics in percent with one decimal (``mean±std`` over seeds when there are
    several), ``n/a`` where undefined; ``n_test`` and images/s per class.
    """
    config = results.get("config", {})
    classes = results.get("classes", {})
    with_std = any("std" in c for c in classes.values())
    width = 13 if with_std else 8

    def cell(row: dict[str, Any], key: str) -> str:
        value = row.get(key)
        if value is None:
            return "n/a".rjust(width)
        std = row.get("std", {}).get(key) if with_std else None
        text = f"{value:.1f}" + (f"±{std:.1f}" if std is not None else "")
        return text.rjust(width)

    name_width = max([len(MEAN_ROW), 5, *(len(n) for n in classes)]) + 1
    head = "class".ljust(name_width) + "".join(METRIC_TITLES[k].rjust(width) for k in METRIC_KEYS)
    head += "n_test".rjust(8) + "img/s".rjust(8)
    lines = _header_lines(config) + ["", head, "-" * len(head)]
    rows = [*classes.items(), (MEAN_ROW, results.get("mean", {}))]
    for i, (name, row) in enumerate(rows):
        if i == len(rows) - 1:
            lines.append("-" * len(head))
        speed = row.get("images_per_s")
        line = name.ljust(name_width) + "".join(cell(row, k) for k in METRIC_KEYS)
        line += str(row.get("n_test", "")).rjust(8)
        line += ("n/a" if speed is None else f"{speed:.1f}").rjust(8)
        lines.append(line)
    lines.append("")
    lines.append(
        "Metrics in percent (pixel metrics at "
        f"{config.get('eval_resolution', '?')}). img/s: test images per second with batch size "
        f"{config.get('batch_size')}, decoding and I/O included, warm-up batch excluded."
    )
    skipped = sum(len(c.get("skipped_files", [])) for c in classes.values())
    if skipped:
        lines.append(f"{skipped} unreadable test image(s) skipped (listed in results.json).")
    if config.get("random_weights"):
        lines.append(RANDOM_WEIGHTS_BANNER)
    if config.get("synthetic") and config.get("dataset_format") == "visa":
        lines.append("SYNTHETIC data: these numbers say nothing about VisA.")
    elif config.get("synthetic"):
        lines.append("SYNTHETIC data: these numbers say nothing about MVTec-AD.")
    return "\n".join(lines)


# ======================================================================================
# Command line
# ======================================================================================
def _k_shot_arg(text: str) -> int | str:
    try:
        return parse_k_shot(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``winclip-nb benchmark`` (see :class:`BenchmarkConfig`)."""
    d = BenchmarkConfig()
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        dest="dataset_format",
        choices=DATASETS,
        default=DEFAULT_DATASET,
        help="layout of --data-root (default mvtec). mvtec: <class>/train/good, "
        "<class>/test/<defect>, <class>/ground_truth/<defect>; visa: split_csv/1cls.csv "
        f"and its image and mask paths (default root ${VISA_ROOT_ENV}; if unset, a "
        "synthetic VisA-format set, marked SYNTHETIC); folder: one class of your own, "
        "DIR/train/good, DIR/test/good, DIR/test/<defect>, DIR/ground_truth/<defect> "
        "(masks <stem>_mask.png); --classes NAME names its object (default: the "
        "folder's name)",
    )
    data.add_argument(
        "--data-root",
        default=None,
        metavar="DIR",
        help=f"MVTec-AD folder (default ${MVTEC_ROOT_ENV}; if unset, a synthetic "
        "MVTec-format set is generated and every output says SYNTHETIC); the VisA "
        "or own folder with --dataset",
    )
    data.add_argument(
        "--classes", nargs="+", default=None, metavar="NAME", help="default: every class found"
    )
    data.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip unreadable test images (listed in results.json) instead of "
        "stopping; unreadable training images always stop",
    )
    shots = parser.add_argument_group("memory")
    shots.add_argument(
        "--k-shot",
        type=_k_shot_arg,
        nargs="+",
        default=[d.k_shot],
        metavar="{0,1,2,4,8,...,full}",
        help="0: zero-shot (text only); k: k drawn train/good images, every patch kept; "
        "full: all train/good images with the coreset (default: full). Several values "
        "run one after the other, each into <out>/<k-shot label>, then a summary table",
    )
    shots.add_argument(
        "--max-images",
        type=int,
        metavar="N",
        default=d.max_images,
        help=f"cap on memory images of a full run (default {d.max_images}; 0 = all)",
    )
    shots.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        metavar="S",
        default=list(d.seeds),
        help="seeds of the k-shot draw, the coreset and a random init; "
        "mean and std over seeds are reported (default 0)",
    )
    shots.add_argument(
        "--coreset-ratio",
        type=float,
        default=None,
        help=f"default {DEFAULT_CORESET_RATIO} for full, {FEW_SHOT_CORESET_RATIO} for k-shot",
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--method",
        choices=METHODS,
        default=d.method,
        help="tokens: multi-layer patch tokens, text anchors and a coreset memory (fast, "
        "default); windows: WinCLIP / WinCLIP+ window embeddings with harmonic aggregation "
        "(the paper's method; default model ViT-B-16-plus-240 at 240 px)",
    )
    model.add_argument(
        "--weights",
        default=None,
        metavar="openai|PATH|random|auto",
        help="openai | checkpoint PATH | random | auto (default: auto on synthetic data, "
        "openai on real data)",
    )
    model.add_argument(
        "--model",
        dest="model_name",
        default=None,
        help="open_clip model name (default: ViT-B-16 for tokens, ViT-B-16-plus-240 for windows)",
    )
    model.add_argument("--device", default=d.device, choices=("auto", "cpu", "cuda"))
    model.add_argument("--batch-size", type=int, default=d.batch_size)
    model.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="model input side (default 224 for tokens, 240 for windows; 112 is ~4x faster)",
    )
    model.add_argument("--layers", type=int, nargs="+", default=list(d.layers), metavar="I")
    maps = parser.add_argument_group("maps")
    maps.add_argument("--text-weight", type=float, default=d.text_weight)
    maps.add_argument("--nn-weight", type=float, default=d.nn_weight)
    maps.add_argument(
        "--normalization",
        choices=NORMALIZATION_MODES,
        default=None,
        help="default: calibrated with a memory, per_image zero-shot",
    )
    maps.add_argument("--sigma", type=float, default=d.sigma)
    maps.add_argument(
        "--eval-size",
        type=int,
        default=d.eval_size,
        help=f"side of the pixel-metric resolution (default {d.eval_size}; 0 = full resolution)",
    )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--workers",
        type=int,
        default=None,
        help="DataLoader workers (default: min(4, CPUs-1) on CUDA, 0 on CPU)",
    )
    run.add_argument("--out", default=d.out, metavar="DIR", help=f"output folder (default {d.out})")
    run.add_argument(
        "--force",
        action="store_true",
        help="recompute finished classes; replace results of other settings",
    )
    run.add_argument(
        "--save-examples",
        type=int,
        default=0,
        metavar="N",
        help="per class, a PNG of the N most anomalous test images",
    )
    run.add_argument(
        "--explain",
        type=int,
        default=0,
        metavar="N",
        help="explain the N most anomalous test images of each class",
    )
    run.add_argument(
        "--llava",
        action="store_true",
        help="explain with LLaVA-OneVision instead of the rule-based explainer "
        "(if LLaVA cannot be loaded: rule-based, with a notice)",
    )
    run.add_argument("--llava-model", default=None, help="hub id or local folder of LLaVA")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")


def configs_from_args(args: argparse.Namespace) -> list[BenchmarkConfig]:
    """One validated :class:`BenchmarkConfig` per ``--k-shot`` value.

    With several values each run writes into ``<out>/<k-shot label>`` (e.g.
    ``results/benchmark/zero-shot``), so they can be resumed one by one.
    """
    names = {f.name for f in dataclasses.fields(BenchmarkConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    shots = values.pop("k_shot", DEFAULT_K_SHOT)
    shots = list(dict.fromkeys(shots if isinstance(shots, list) else [shots]))
    out = values.pop("out", DEFAULT_OUT_DIR)
    configs = []
    for k in shots:
        k_out = out if len(shots) == 1 else str(Path(out) / k_shot_label(k))
        configs.append(BenchmarkConfig(k_shot=k, out=k_out, **values).validate())
    return configs


def config_from_args(args: argparse.Namespace) -> BenchmarkConfig:
    """The :class:`BenchmarkConfig` of parsed options with a single ``--k-shot`` value."""
    configs = configs_from_args(args)
    if len(configs) != 1:
        raise ConfigError(f"expected one --k-shot value, got {len(configs)}")
    return configs[0]


def format_summary(runs: Sequence[dict[str, Any]]) -> str:
    """One MEAN row per run (e.g. per k-shot): the comparison a multi-k run ends with.

    >>> row = {"config": {"k_shot_label": "zero-shot"}, "mean": {"image_auroc": 50.0}}
    >>> print(format_summary([row]).splitlines()[2])
    zero-shot        50.0     n/a     n/a     n/a     n/a     n/a
    """
    head = "k-shot".ljust(12) + "".join(METRIC_TITLES[k].rjust(8) for k in METRIC_KEYS)
    lines = ["MEAN over classes, per run:", head]
    for results in runs:
        mean = results.get("mean", {})
        label = str(results.get("config", {}).get("k_shot_label", "?"))
        cells = ["n/a" if mean.get(k) is None else f"{mean[k]:.1f}" for k in METRIC_KEYS]
        lines.append(label.ljust(12) + "".join(c.rjust(8) for c in cells))
    return "\n".join(lines)


def run_benchmark_cli(args: argparse.Namespace) -> int:
    """``winclip-nb benchmark``: run each k-shot, print the tables and where the files are."""
    configs = configs_from_args(args)
    runs = []
    for cfg in configs:
        results = run_benchmark(cfg, progress=not getattr(args, "no_progress", False))
        runs.append(results)
        print()
        print(format_table(results))
        out = Path(cfg.out)
        print(f"\nwritten: {out / RESULTS_JSON}, {out / RESULTS_CSV}", file=sys.stdout)
    if len(runs) > 1:
        print()
        print(format_summary(runs))
        if runs[0]["config"].get("random_weights"):
            print(RANDOM_WEIGHTS_BANNER)
    return 0


__all__ = [
    "BenchmarkConfig",
    "add_benchmark_arguments",
    "build_results",
    "config_fingerprint",
    "configs_from_args",
    "evaluate_class",
    "format_summary",
    "format_table",
    "merge_results",
    "run_benchmark",
    "run_benchmark_cli",
]
