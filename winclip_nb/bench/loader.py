"""The benchmark's data side: dataset roots (MVTec-AD, VisA, a folder, or the synthetic
sets), its classes, and the test images decoded and resized in ``DataLoader`` workers."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..core.backbone import ClipBackbone
from ..core.errors import ConfigError, DataError
from ..data.datasets import (
    LABEL_DEFECTIVE,
    LABEL_UNKNOWN,
    ClassData,
    TestSample,
    list_mvtec_classes,
    list_visa_classes,
    load_folder_dataset,
    load_mvtec_class,
    load_visa_class,
)
from ..data.images import load_image, load_mask
from ..data.synthetic import (
    default_synthetic_root,
    default_synthetic_visa_root,
    is_synthetic_root,
    make_synthetic_mvtec,
    make_synthetic_visa,
)

if TYPE_CHECKING:
    from .protocol import BenchmarkConfig

MVTEC_ROOT_ENV = "MVTEC_ROOT"

VISA_ROOT_ENV = "VISA_ROOT"

#: ``--dataset``: the layout of ``--data-root`` (see :func:`load_benchmark_classes`).
DATASETS = ("mvtec", "visa", "folder")

DEFAULT_DATASET = "mvtec"

#: DataLoader workers on CUDA: min(this, CPU count - 1); 0 on CPU.
MAX_DEFAULT_WORKERS = 4

_FLOAT16_MAX = float(torch.finfo(torch.float16).max)


def default_workers(device: torch.device) -> int:
    """min(4, CPUs - 1) DataLoader workers on CUDA, 0 (main process) on CPU."""
    if device.type != "cuda":
        return 0
    return max(0, min(MAX_DEFAULT_WORKERS, (os.cpu_count() or 1) - 1))


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
