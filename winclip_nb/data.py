"""Datasets and image decoding: MVTec-AD layout, users' own folders, a synthetic generator.

Everything the pipeline reads goes through :func:`load_image` (any file or array ->
(H, W, 3) uint8 RGB) and :func:`load_mask` (-> (H, W) bool). Datasets are described
by :class:`ClassData`: the normal training images of one class and its labelled
test images with their ground-truth masks.

MVTec-AD layout (one folder per class)::

    <root>/<class>/train/good/000.png ...
    <root>/<class>/test/good/000.png ...            (label 0, no mask)
    <root>/<class>/test/<defect>/000.png ...        (label 1)
    <root>/<class>/ground_truth/<defect>/000_mask.png

VisA layout (:func:`load_visa_class`): one split file lists every image::

    <root>/split_csv/1cls.csv                        object,split,label,image,mask
    <root>/<class>/Data/Images/Normal/0000.JPG       label normal
    <root>/<class>/Data/Images/Anomaly/000.JPG       label anomaly
    <root>/<class>/Data/Masks/Anomaly/000.png        any non-zero value is defect

:func:`make_synthetic_mvtec` writes the MVTec layout (and :func:`make_synthetic_visa`
the VisA layout) for a few synthetic classes so that the whole project runs and is
tested without downloading anything.

Example:
    >>> root = make_synthetic_mvtec(tmp_path, ["disc"], image_size=64)  # doctest: +SKIP
    >>> data = load_mvtec_class(root, "disc")                            # doctest: +SKIP
    >>> data.n_train, data.n_test, data.n_defective                     # doctest: +SKIP
    (10, 12, 8)
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import operator
import os
import re
import shutil
import time
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageOps

from .errors import ConfigError, DataError, ImageReadError

# --- class lists -------------------------------------------------------------------
#: The 15 MVTec-AD classes in the dataset's (alphabetical) order -> "object" | "texture".
MVTEC_CLASSES: dict[str, str] = {
    "bottle": "object",
    "cable": "object",
    "capsule": "object",
    "carpet": "texture",
    "grid": "texture",
    "hazelnut": "object",
    "leather": "texture",
    "metal_nut": "object",
    "pill": "object",
    "screw": "object",
    "tile": "texture",
    "toothbrush": "object",
    "transistor": "object",
    "wood": "texture",
    "zipper": "object",
}
#: VisA's 12 classes -> their group in the VisA paper (Zou et al., ECCV 2022).
VISA_GROUPS: dict[str, str] = {
    "candle": "multiple_instances",
    "capsules": "multiple_instances",
    "cashew": "single_instance",
    "chewinggum": "single_instance",
    "fryum": "single_instance",
    "macaroni1": "multiple_instances",
    "macaroni2": "multiple_instances",
    "pcb1": "complex_structure",
    "pcb2": "complex_structure",
    "pcb3": "complex_structure",
    "pcb4": "complex_structure",
    "pipe_fryum": "single_instance",
}
#: VisA's classes -> :func:`class_kind`: every one is an object (VisA has no texture class).
VISA_CLASSES: dict[str, str] = dict.fromkeys(VISA_GROUPS, "object")
#: Classes written by :func:`make_synthetic_mvtec`. ``washer`` is saved as 8-bit grayscale.
SYNTHETIC_CLASSES: dict[str, str] = {"disc": "object", "weave": "texture", "washer": "object"}
#: Defect folders of every synthetic class, from subtle to obvious contrast.
SYNTHETIC_DEFECTS: tuple[str, ...] = ("stain", "scratch", "crack", "hole")
#: Synthetic classes stored as single-channel (mode L) PNGs.
SYNTHETIC_GRAYSCALE: frozenset[str] = frozenset({"washer"})

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
#: File names that are never images even if a tool gave them an image extension.
IGNORED_FILE_NAMES: frozenset[str] = frozenset({"thumbs.db", "desktop.ini"})

GOOD = "good"
LABEL_GOOD = 0
LABEL_DEFECTIVE = 1
LABEL_UNKNOWN = -1
#: ``defect`` of a test image in a flat folder without a mask / with a mask.
UNKNOWN_DEFECT = "unknown"
FLAT_DEFECT = "defect"

# --- synthetic generator defaults --------------------------------------------------
SYNTHETIC_MARKER = "SYNTHETIC.json"
#: Bump when the generator's output changes, so cached sets are regenerated.
SYNTHETIC_GENERATOR_VERSION = 1
SYNTHETIC_GENERATOR_TAG = "winclip_nb.data.make_synthetic_mvtec"
SYNTHETIC_VISA_GENERATOR_TAG = "winclip_nb.data.make_synthetic_visa"
DEFAULT_SYNTHETIC_N_TRAIN = 10
DEFAULT_SYNTHETIC_N_TEST_GOOD = 4
DEFAULT_SYNTHETIC_N_TEST_PER_DEFECT = 2
DEFAULT_SYNTHETIC_IMAGE_SIZE = 256
MIN_SYNTHETIC_IMAGE_SIZE = 32
CACHE_ENV_VAR = "WINCLIP_NB_CACHE"
#: Sensor noise (grey levels, standard deviation) added to every synthetic image.
SYNTHETIC_NOISE_SIGMA = 2.0
PNG_COMPRESSION = 3
#: Another process generating into the same root is waited for this long (seconds).
SYNTHETIC_LOCK_TIMEOUT_S = 120.0
#: A generation lock older than this (seconds) is left over from a killed run.
SYNTHETIC_LOCK_STALE_S = 600.0
_LOCK_NAME = ".generating.lock"

#: Integer images are scaled to 8 bit by the smallest of these bit depths that holds their maximum.
_INTEGER_BIT_DEPTHS = (8, 10, 12, 14, 16, 24, 32)
_WINDOWS_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL"] + [f"{port}{i}" for port in ("COM", "LPT") for i in range(1, 10)]
)


class DataWarning(UserWarning):
    """Data was usable only after a repair (e.g. a mask resized to its image)."""


# --- small helpers -----------------------------------------------------------------
def class_kind(name: str) -> str:
    """``"texture"`` or ``"object"`` for a class name (case-insensitive; unknown -> object).

    Known: the MVTec-AD, VisA and synthetic classes. Textures get no foreground mask.

    >>> class_kind("Carpet"), class_kind("bottle"), class_kind("pcb1"), class_kind("my_part")
    ('texture', 'object', 'object', 'object')
    """
    key = str(name).strip().lower()
    return MVTEC_CLASSES.get(key) or VISA_CLASSES.get(key) or SYNTHETIC_CLASSES.get(key) or "object"


def safe_name(name: str) -> str:
    """A file-name stem that is safe on every OS (never empty, never hidden).

    Path separators, ``..``, control characters, whitespace and ``<>:"|?*`` become
    ``_``; a leading ``.`` becomes ``_``; Windows device names get a trailing ``_``.
    Different names can map to the same stem (``a/b`` and ``a_b``).

    >>> safe_name("../../etc"), safe_name("a/b"), safe_name(""), safe_name(".hidden")
    ('____etc', 'a_b', '_', '_hidden')
    """
    stem = re.sub(r'\.\.|[/\\\x00-\x1f\x7f<>:"|?*\s]', "_", str(name))
    if stem.startswith("."):
        stem = "_" + stem[1:]
    if not stem:
        stem = "_"
    if stem.split(".")[0].upper() in _WINDOWS_RESERVED:
        stem += "_"
    return stem


def _natural_key(path: Path) -> tuple[Any, ...]:
    """Sort key: digit runs compare as numbers (``img2`` < ``img10``), ties by the raw name."""
    parts = re.split(r"(\d+)", path.name.lower())
    return (tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts), path.name)


def _is_image_file(path: Path) -> bool:
    name = path.name
    return (
        not name.startswith(".")  # hidden files, .DS_Store, AppleDouble ._* files
        and name.lower() not in IGNORED_FILE_NAMES
        and path.suffix.lower() in IMAGE_EXTENSIONS
        and path.is_file()
    )


def _require_dir(folder: str | os.PathLike, what: str) -> Path:
    path = Path(folder)
    if not path.exists():
        raise DataError(f"{what} not found: {path}")
    if not path.is_dir():
        raise DataError(f"{what} is not a folder: {path}")
    return path


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly in ``folder``, in natural order (``2.png`` before ``10.png``).

    Only :data:`IMAGE_EXTENSIONS` (any case) count; hidden files (``.DS_Store``),
    AppleDouble ``._*`` files, ``Thumbs.db`` and subfolders are skipped. A missing
    folder raises :class:`DataError`.
    """
    path = _require_dir(folder, "image folder")
    return sorted((p for p in path.iterdir() if _is_image_file(p)), key=_natural_key)


def _subfolders(folder: Path) -> list[Path]:
    """Visible subfolders, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


# --- decoding ----------------------------------------------------------------------
def _container_max(max_value: int) -> int:
    """Largest value of the smallest bit depth in ``_INTEGER_BIT_DEPTHS`` that holds ``max_value``.

    >>> _container_max(200), _container_max(4095), _container_max(4096), _container_max(65535)
    (255, 4095, 16383, 65535)
    """
    for bits in _INTEGER_BIT_DEPTHS:
        if max_value <= 2**bits - 1:
            return 2**bits - 1
    return 2**64 - 1


def _to_uint8(arr: np.ndarray, source: str) -> np.ndarray:
    """Any numeric array -> uint8 of the same shape, without clipping bright values.

    bool -> 0/255. Integers: scaled by the bit depth their maximum needs (8, 10, 12,
    14, 16, ... bits), so a 16-bit PNG is divided by 257 and 12-bit data in a 16-bit
    file (max <= 4095) by 4095/255; negative values raise. Floats: [0, 1] -> x255;
    otherwise values must lie in [0, 255].
    """
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.size == 0:
        raise DataError(f"{source}: empty image, shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0:
            raise DataError(f"{source}: integer image has negative values (min {lo})")
        scale = 255.0 / _container_max(hi)
        return np.rint(arr.astype(np.float64) * scale).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        values = arr.astype(np.float64)
        if not np.isfinite(values).all():
            raise DataError(f"{source}: float image contains NaN or inf")
        lo, hi = float(values.min()), float(values.max())
        if lo < 0 or hi > 255:
            raise DataError(
                f"{source}: float image must lie in [0, 1] or [0, 255], got [{lo:g}, {hi:g}]"
            )
        if hi <= 1.0:
            values = values * 255.0
        return np.rint(values).astype(np.uint8)
    raise DataError(f"{source}: unsupported image dtype {arr.dtype}")


def _composite_on_black(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Premultiply uint8 colour (H, W, C) by uint8 alpha (H, W); all-zero alpha is ignored."""
    if not alpha.any():  # a broken alpha channel (fully transparent) would give a black image
        return color
    weighted = color.astype(np.uint32) * alpha[..., None].astype(np.uint32)
    return ((weighted + 127) // 255).astype(np.uint8)


def _array_to_rgb(arr: np.ndarray, source: str) -> np.ndarray:
    """(H, W), (H, W, 1|2|3|4) array of any numeric dtype -> (H, W, 3) uint8 RGB."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4) or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise DataError(
            f"{source}: expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image, "
            f"got shape {arr.shape}"
        )
    arr = _to_uint8(arr, source)
    channels = arr.shape[2]
    if channels in (2, 4):  # gray + alpha, RGB + alpha
        arr = _composite_on_black(arr[..., :-1], arr[..., -1])
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr)


def _pil_to_array(img: Image.Image) -> np.ndarray:
    """A PIL image -> numpy array with its native depth and channels (palette expanded)."""
    mode = img.mode
    if mode in ("1", "L", "LA", "RGB", "RGBA", "I", "F") or mode.startswith("I;16"):
        return np.asarray(img)
    if mode == "P":
        has_alpha = "transparency" in img.info
        return np.asarray(img.convert("RGBA" if has_alpha else "RGB"))
    if mode in ("PA", "RGBa"):
        return np.asarray(img.convert("RGBA"))
    if mode == "La":
        return np.asarray(img.convert("LA"))
    return np.asarray(img.convert("RGB"))  # CMYK, YCbCr, LAB, HSV, RGBX, ...


def _exif_upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag (as OpenCV's ``imread`` does); no copy without one."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - broken EXIF must not make a valid image unreadable
        return img
    return ImageOps.exif_transpose(img) if orientation not in (1, None) else img


def _open_image(path: str | os.PathLike, what: str = "image") -> Image.Image:
    """Open and fully decode an image file; truncated or corrupt files raise.

    ``Image.load()`` decodes all pixels, so a truncated PNG/JPEG raises here (as long
    as ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is left at its default, ``False``).
    """
    file = Path(path)
    if not file.exists():
        raise DataError(f"{what} file not found: {file}")
    if file.is_dir():
        raise DataError(f"{what} path is a folder, not a file: {file}")
    try:
        with Image.open(file) as img:
            img.load()
            return _exif_upright(img).copy()
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, ...
        raise ImageReadError(
            f"cannot read {what} {file}: {type(exc).__name__}: {exc} "
            "(corrupt, truncated or not an image)"
        ) from exc


def load_image(src: str | os.PathLike | Image.Image | np.ndarray) -> np.ndarray:
    """Decode an image of any mode to (H, W, 3) uint8 RGB.

    Accepts a path, a PIL image or a numpy array (arrays are taken as RGB, not BGR).

    - Gray (L, 1-bit, 16/32-bit integer, float) is repeated into three channels.
    - Alpha (LA, RGBA, palette with transparency, 2/4-channel arrays) is composited
      on black: fully transparent pixels become black, opaque ones keep their colour.
      An all-transparent alpha channel is treated as missing (it is almost always a
      writer's bug) and the colour is kept.
    - 16-bit and other integer images are scaled by the bit depth their maximum needs
      (16-bit PNG: /257; 12-bit data: x255/4095), never clipped. Floats must lie in
      [0, 1] (scaled x255) or [0, 255].
    - Palette, CMYK, YCbCr, LAB images are converted with Pillow; EXIF orientation
      is applied; multi-frame files give their first frame.

    A missing file raises :class:`DataError`; a corrupt, truncated or non-image file
    raises :class:`ImageReadError`; both name the path.

    >>> load_image(np.array([[0.0, 1.0]])).tolist()
    [[[0, 0, 0], [255, 255, 255]]]
    """
    if isinstance(src, np.ndarray):
        return _array_to_rgb(src, f"array of shape {src.shape}")
    if isinstance(src, Image.Image):
        return _array_to_rgb(_pil_to_array(_exif_upright(src)), f"PIL image ({src.mode})")
    if not isinstance(src, (str, os.PathLike)):
        raise DataError(f"cannot load an image from {type(src).__name__}: {src!r}")
    img = _open_image(src)
    return _array_to_rgb(_pil_to_array(img), str(src))


def load_mask(
    path: str | os.PathLike, size: tuple[int, int] | None = None, *, nonzero: bool = False
) -> np.ndarray:
    """Read a ground-truth mask as (H, W) bool.

    Colour masks count a pixel as defective if any colour channel is set; palette
    masks use the palette index (index > 0). Values are scaled to 8 bit like
    :func:`load_image`; a mask whose values are only 0/1 uses ``> 0``, any other
    ``> 127`` (robust to JPEG noise). ``nonzero``: every non-zero value is defect
    (VisA's masks, whose values are small region labels).

    If ``size`` = (H, W) is given and differs from the mask's size, the mask is
    resized with nearest-neighbour and a :class:`DataWarning` names the file and
    both sizes. A warning rather than an error, because masks exported by labelling
    tools at another resolution are common and still mark the right region.
    """
    img = _open_image(path, "mask")
    if img.mode == "P":
        binary = np.asarray(img) > 0
    else:
        arr = _pil_to_array(img)
        if arr.ndim == 3:
            colour = arr[..., :3] if arr.shape[2] >= 3 else arr[..., :1]
            arr = colour.max(axis=2)
        if nonzero:
            binary = np.asarray(arr) > 0
        else:
            values = _to_uint8(arr, str(path))
            binary = values > (0 if values.max() <= 1 else 127)
    if size is not None:
        height, width = (int(v) for v in size)
        if height < 1 or width < 1:
            raise ConfigError(f"mask size must be a positive (H, W), got {size!r}")
        if binary.shape != (height, width):
            warnings.warn(
                f"mask {path} is {binary.shape[0]}x{binary.shape[1]} (HxW) but its image is "
                f"{height}x{width}; resized with nearest-neighbour",
                DataWarning,
                stacklevel=2,
            )
            resized = cv2.resize(
                binary.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST
            )
            binary = resized > 0
    return binary


# --- dataset containers ------------------------------------------------------------
@dataclass
class TestSample:
    """One test image: ``label`` 0 good, 1 defective, -1 unknown; ``mask_path`` or None.

    ``mask_nonzero``: read the mask with ``load_mask(..., nonzero=True)`` (VisA).
    """

    __test__ = False  # not a pytest test class

    path: Path
    defect: str
    label: int
    mask_path: Path | None = None
    mask_nonzero: bool = False


@dataclass
class ClassData:
    """The images of one class.

    ``root`` is the class folder for MVTec-style data and the common parent of the
    given folders for :func:`load_folder_dataset`. ``train`` holds the normal
    (training) images; ``test`` the labelled test images, good ones first.
    """

    name: str
    kind: str
    root: Path
    train: list[Path]
    test: list[TestSample]
    synthetic: bool = False

    @property
    def n_train(self) -> int:
        return len(self.train)

    @property
    def n_test(self) -> int:
        return len(self.test)

    @property
    def n_defective(self) -> int:
        return sum(1 for s in self.test if s.label == LABEL_DEFECTIVE)

    @property
    def n_good(self) -> int:
        return sum(1 for s in self.test if s.label == LABEL_GOOD)

    @property
    def defect_types(self) -> list[str]:
        """Defect names of the defective test images, sorted."""
        return sorted({s.defect for s in self.test if s.label == LABEL_DEFECTIVE})

    @property
    def labels(self) -> np.ndarray:
        """(N,) int labels of the test images."""
        return np.array([s.label for s in self.test], dtype=np.int64)


# --- MVTec-AD layout ---------------------------------------------------------------
def _find_mask(folder: Path, stem: str) -> Path | None:
    """``<stem>_mask.<ext>`` or ``<stem>.<ext>`` in ``folder`` (PNG first), or None."""
    if not folder.is_dir():
        return None
    extensions = [".png"] + sorted(IMAGE_EXTENSIONS - {".png"})
    for candidate_stem in (f"{stem}_mask", stem):
        for ext in extensions:
            for suffix in (ext, ext.upper()):
                candidate = folder / f"{candidate_stem}{suffix}"
                if candidate.is_file():
                    return candidate
    return None


def _check_class_name(name: str) -> str:
    """Reject class names that could leave the dataset root."""
    text = str(name)
    bad = (
        not text.strip()
        or text in (".", "..")
        or "/" in text
        or "\\" in text
        or "\x00" in text
        or ".." in text
        or (os.sep in text)
        or (os.altsep is not None and os.altsep in text)
        or Path(text).is_absolute()
    )
    if bad:
        raise DataError(f"invalid class name {name!r}: it must be a plain folder name")
    return text


def list_mvtec_classes(root: str | os.PathLike) -> list[str]:
    """Class folders under ``root`` that have ``train/good``: MVTec order first, then A-Z."""
    base = _require_dir(root, "dataset root")
    names = [d.name for d in _subfolders(base) if (d / "train" / GOOD).is_dir()]
    canonical = {name: i for i, name in enumerate(MVTEC_CLASSES)}
    return sorted(names, key=lambda n: (canonical.get(n, len(canonical)), n))


def load_mvtec_class(root: str | os.PathLike, name: str) -> ClassData:
    """Read one class of an MVTec-AD style dataset (layout in the module docstring).

    Test images are ordered ``good`` first, then the defect folders alphabetically.
    Raises :class:`DataError` naming the path if the root or class folder is missing
    (listing the classes found), ``train/good`` is missing or empty, ``test`` is
    missing or holds no images, or a defect image has no mask in
    ``ground_truth/<defect>/`` (``<stem>_mask.png``, or ``<stem>.png``).
    """
    base = _require_dir(root, "dataset root")
    class_name = _check_class_name(name)
    class_dir = base / class_name
    if not class_dir.is_dir():
        found = list_mvtec_classes(base)
        raise DataError(
            f"class folder not found: {class_dir}; classes under {base}: "
            f"{', '.join(found) if found else 'none (no <class>/train/good folders)'}"
        )
    train_dir = class_dir / "train" / GOOD
    if not train_dir.is_dir():
        raise DataError(f"training folder not found: {train_dir}")
    train = list_images(train_dir)
    if not train:
        raise DataError(f"no training images in {train_dir}")
    test_dir = class_dir / "test"
    if not test_dir.is_dir():
        raise DataError(f"test folder not found: {test_dir}")
    loose = [p for p in test_dir.iterdir() if _is_image_file(p)]
    if loose:
        warnings.warn(
            f"{len(loose)} image(s) directly in {test_dir} are ignored: test images must "
            "lie in test/good or test/<defect>",
            DataWarning,
            stacklevel=2,
        )
    folders = sorted(_subfolders(test_dir), key=lambda d: (d.name != GOOD, d.name))
    test: list[TestSample] = []
    for folder in folders:
        defect = folder.name
        for image in list_images(folder):
            if defect == GOOD:
                test.append(TestSample(image, GOOD, LABEL_GOOD, None))
                continue
            mask_folder = class_dir / "ground_truth" / defect
            mask = _find_mask(mask_folder, image.stem)
            if mask is None:
                raise DataError(
                    f"no mask for defect image {image}: expected "
                    f"{mask_folder / (image.stem + '_mask.png')}"
                )
            test.append(TestSample(image, defect, LABEL_DEFECTIVE, mask))
    if not test:
        raise DataError(f"no test images in the subfolders of {test_dir}")
    return ClassData(
        name=class_name,
        kind=class_kind(class_name),
        root=class_dir,
        train=train,
        test=test,
        synthetic=is_synthetic_root(base),
    )


def load_folder_dataset(
    good_dir: str | os.PathLike,
    test_dir: str | os.PathLike,
    mask_dir: str | os.PathLike | None = None,
    name: str = "custom",
) -> ClassData:
    """A dataset from your own folders.

    ``good_dir`` holds normal images (the memory's source). ``test_dir`` is flat
    (each image labelled -1 "unknown", or 1 "defect" if a mask exists) and/or has
    subfolders: ``good`` -> label 0, any other -> that defect name, label 1 (its
    mask may be missing: it then only counts for image-level metrics). Masks are
    looked up in ``mask_dir`` (and ``mask_dir/<defect>/`` for subfolders) as
    ``<stem>_mask.png`` or ``<stem>.png``.
    """
    good = _require_dir(good_dir, "folder of good images")
    test_root = _require_dir(test_dir, "test image folder")
    masks = _require_dir(mask_dir, "mask folder") if mask_dir is not None else None
    train = list_images(good)
    if not train:
        raise DataError(f"no images in the folder of good images {good}")

    def mask_for(image: Path, defect: str | None) -> Path | None:
        if masks is None:
            return None
        found = _find_mask(masks / defect, image.stem) if defect else None
        return found or _find_mask(masks, image.stem)

    test: list[TestSample] = []
    for image in list_images(test_root):
        mask = mask_for(image, None)
        if mask is None:
            test.append(TestSample(image, UNKNOWN_DEFECT, LABEL_UNKNOWN, None))
        else:
            test.append(TestSample(image, FLAT_DEFECT, LABEL_DEFECTIVE, mask))
    for folder in sorted(_subfolders(test_root), key=lambda d: (d.name != GOOD, d.name)):
        for image in list_images(folder):
            if folder.name == GOOD:
                test.append(TestSample(image, GOOD, LABEL_GOOD, None))
            else:
                mask = mask_for(image, folder.name)
                test.append(TestSample(image, folder.name, LABEL_DEFECTIVE, mask))
    if not test:
        raise DataError(f"no test images in {test_root} or its subfolders")
    folders = [str(good.resolve()), str(test_root.resolve())]
    if masks is not None:
        folders.append(str(masks.resolve()))
    return ClassData(
        name=name,
        kind=class_kind(name),
        root=Path(os.path.commonpath(folders)),
        train=train,
        test=test,
        synthetic=False,
    )


# --- VisA layout -------------------------------------------------------------------
#: VisA's split file (the one-class protocol), relative to the dataset root.
VISA_SPLIT_FILE = "split_csv/1cls.csv"
VISA_COLUMNS: tuple[str, ...] = ("object", "split", "label", "image", "mask")
VISA_NORMAL = "normal"
VISA_ANOMALY = "anomaly"
#: ``defect`` of VisA's anomalous test images (its split file names no defect type).
VISA_DEFECT = "anomaly"


@dataclass
class _VisaRow:
    line: int
    object: str
    split: str
    label: str
    image: str
    mask: str


def _visa_split_file(root: Path) -> Path:
    path = root / VISA_SPLIT_FILE
    if not path.is_file():
        raise DataError(
            f"VisA split file not found: {path} (a VisA root holds {VISA_SPLIT_FILE} "
            "and one folder per class)"
        )
    return path


def _read_visa_rows(root: Path) -> tuple[Path, list[_VisaRow]]:
    """(split file, its rows); a missing file or column raises :class:`DataError`."""
    path = _visa_split_file(root)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read VisA split file {path}: {exc}") from exc
    reader = csv.reader(io.StringIO(text))
    header = [h.strip().lower() for h in next(reader, [])]
    missing = [c for c in VISA_COLUMNS if c not in header]
    if missing:
        raise DataError(
            f"VisA split file {path} lacks column(s) {', '.join(missing)}: it needs "
            f"{', '.join(VISA_COLUMNS)}; found {', '.join(header) if header else 'no header'}"
        )
    where = [header.index(c) for c in VISA_COLUMNS]
    rows = []
    for line, cells in enumerate(reader, start=2):
        if not any(c.strip() for c in cells):
            continue
        values = [cells[i].strip() if i < len(cells) else "" for i in where]
        rows.append(_VisaRow(line, *values))
    return path, rows


def _visa_file(root: Path, split_file: Path, row: _VisaRow, relative: str, what: str) -> Path:
    """``root / relative``, which must stay inside ``root`` and exist."""
    rel = Path(relative)
    if not relative or rel.is_absolute() or ".." in rel.parts:
        raise DataError(
            f"{split_file} line {row.line}: {what} path {relative!r} must be a path "
            f"relative to {root}"
        )
    path = root / rel
    if not path.is_file():
        raise DataError(f"{split_file} line {row.line}: {what} file not found: {path}")
    return path


def _visa_order(names: Sequence[str]) -> list[str]:
    canonical = {name: i for i, name in enumerate(VISA_GROUPS)}
    return sorted(set(names), key=lambda n: (canonical.get(n, len(canonical)), n))


def list_visa_classes(root: str | os.PathLike) -> list[str]:
    """The classes named in ``<root>/split_csv/1cls.csv``: VisA's order, then A-Z."""
    base = _require_dir(root, "VisA root")
    _, rows = _read_visa_rows(base)
    return _visa_order([r.object for r in rows if r.object])


def load_visa_class(root: str | os.PathLike, name: str) -> ClassData:
    """Read one class of a VisA-style dataset from its split file ``split_csv/1cls.csv``.

    Columns ``object, split, label, image, mask`` (image and mask paths relative to
    ``root``; ``split`` train/test; ``label`` normal/anomaly). ``train``: the normal
    train rows; ``test``: the test rows, normal ones first (label 0), then the
    anomalous ones (label 1, defect ``anomaly``, with their mask, read as
    "non-zero is defect"), each sorted by path. Raises :class:`DataError` naming the
    file (and line) for a missing split file or column, an unknown class (listing the
    classes in the file), a bad split or label, an anomalous test row without a mask,
    or a row naming a missing image or mask file.
    """
    base = _require_dir(root, "VisA root")
    class_name = _check_class_name(name)
    split_file, rows = _read_visa_rows(base)
    mine = [r for r in rows if r.object == class_name]
    if not mine:
        found = _visa_order([r.object for r in rows if r.object])
        raise DataError(
            f"class {class_name!r} is not in {split_file}; classes in it: "
            f"{', '.join(found) if found else 'none'}"
        )
    train: list[Path] = []
    good: list[TestSample] = []
    anomalous: list[TestSample] = []
    for row in mine:
        split, label = row.split.lower(), row.label.lower()
        if split not in ("train", "test"):
            raise DataError(
                f"{split_file} line {row.line}: split must be train or test, got {row.split!r}"
            )
        if label not in (VISA_NORMAL, VISA_ANOMALY):
            raise DataError(
                f"{split_file} line {row.line}: label must be {VISA_NORMAL} or "
                f"{VISA_ANOMALY}, got {row.label!r}"
            )
        image = _visa_file(base, split_file, row, row.image, "image")
        if split == "train":
            if label == VISA_NORMAL:
                train.append(image)
            continue  # an anomalous training image never enters the memory
        if label == VISA_NORMAL:
            good.append(TestSample(image, GOOD, LABEL_GOOD, None))
            continue
        if not row.mask:
            raise DataError(f"{split_file} line {row.line}: anomalous image {image} has no mask")
        mask = _visa_file(base, split_file, row, row.mask, "mask")
        anomalous.append(TestSample(image, VISA_DEFECT, LABEL_DEFECTIVE, mask, mask_nonzero=True))
    if not train:
        raise DataError(f"no normal training images of class {class_name!r} in {split_file}")
    test = sorted(good, key=lambda s: _natural_key(s.path) + (str(s.path),))
    test += sorted(anomalous, key=lambda s: _natural_key(s.path) + (str(s.path),))
    if not test:
        raise DataError(f"no test images of class {class_name!r} in {split_file}")
    return ClassData(
        name=class_name,
        kind=class_kind(class_name),
        root=base / class_name,
        train=sorted(train),
        test=test,
        synthetic=is_synthetic_root(base),
    )


# --- k-shot ------------------------------------------------------------------------
def sample_k_shot(train: Sequence[Path], k: int | str | None, seed: int) -> list[Path]:
    """Draw the k normal images of a few-shot run, returned sorted.

    ``k`` = ``"full"`` or ``None`` -> all images. An int k -> k distinct images: a
    random permutation (``numpy.random.default_rng(seed)``) of the sorted list, first
    k, so for one seed the draws are nested (the 1-shot image is in the 2-shot set).

    >>> paths = [Path(f"{i}.png") for i in range(5)]
    >>> sample_k_shot(paths, 2, seed=0) == sample_k_shot(paths[::-1], 2, seed=0)
    True
    """
    ordered = sorted(Path(p) for p in train)
    if k is None or (isinstance(k, str) and k.strip().lower() == "full"):
        return ordered
    if isinstance(k, str):
        if not k.strip().isdigit():
            raise ConfigError(f"k must be a positive integer or 'full', got {k!r}")
        k = int(k)
    if isinstance(k, bool):
        raise ConfigError(f"k must be a positive integer or 'full', got {k!r}")
    try:
        k = operator.index(k)
    except TypeError:
        raise ConfigError(f"k must be a positive integer or 'full', got {k!r}") from None
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    if k > len(ordered):
        raise ConfigError(f"k={k} but only {len(ordered)} training images are available")
    try:
        rng = np.random.default_rng(seed)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}") from exc
    chosen = rng.permutation(len(ordered))[:k]
    return sorted(ordered[i] for i in chosen)


# --- synthetic data ----------------------------------------------------------------
@dataclass
class SyntheticImage:
    """One rendered synthetic image.

    ``image`` is (H, W, 3) uint8 RGB, or (H, W) uint8 for grayscale classes;
    ``defect_mask`` (H, W) bool marks exactly the pixels the defect changed (empty
    for good images); ``object_mask`` (H, W) bool is the object (all True for textures).
    """

    image: np.ndarray
    defect_mask: np.ndarray
    object_mask: np.ndarray


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), each (size, size) float32."""
    coords = np.arange(size, dtype=np.float32) + 0.5
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    return yy, xx


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """(size, size) float32 smooth noise in about [-1, 1] (cubic upsampling of a coarse grid)."""
    coarse = rng.uniform(-1.0, 1.0, (cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


def _render_disc(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A copper disc with machining rings, a groove, a printed mark, on dark grey."""
    yy, xx = _grid(size)
    cx, cy = size * (0.5 + rng.uniform(-0.04, 0.04, 2))
    radius = size * 0.40 * rng.uniform(0.95, 1.05)
    theta = rng.uniform(-np.pi / 12, np.pi / 12)
    gain = rng.uniform(0.97, 1.03)
    dx, dy = xx - cx, yy - cy
    r = np.hypot(dx, dy)
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    shade = 0.85 - 0.12 * (0.6 * dx + 0.8 * dy) / radius
    shade *= 1.0 - 0.3 * np.clip((r / radius - 0.9) / 0.1, 0.0, 1.0)  # bevelled rim
    texture = 1.0 + 0.03 * np.sin(2 * np.pi * r / (size / 48))
    texture *= 1.0 - 0.25 * np.exp(-(((r - 0.62 * radius) / (0.015 * size)) ** 2))
    texture *= np.where(r < 0.12 * radius, 1.1, 1.0)
    mark = (np.abs(u) < 0.18 * radius) & (v > 0.30 * radius) & (v < 0.38 * radius)
    texture *= np.where(mark, 0.7, 1.0)
    colour = np.array([176.0, 118.0, 66.0], np.float32) * gain
    background = np.array([58.0, 62.0, 68.0], np.float32) + 4.0 * (yy / size - 0.5)[..., None]
    coverage = np.clip(radius - r + 0.5, 0.0, 1.0)[..., None]  # anti-aliased edge
    image = coverage * colour * (shade * texture)[..., None] + (1 - coverage) * background
    return image, coverage[..., 0] >= 0.5


def _render_washer(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A grey ring with a notch (shows its rotation) on a bright background, 1 channel."""
    yy, xx = _grid(size)
    cx, cy = size * (0.5 + rng.uniform(-0.025, 0.025, 2))
    outer = size * 0.43 * rng.uniform(0.97, 1.03)
    inner = size * 0.18 * rng.uniform(0.95, 1.05)
    theta = rng.uniform(-np.pi / 9, np.pi / 9)
    dx, dy = xx - cx, yy - cy
    r = np.hypot(dx, dy)
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    notch = (np.abs(v) < 0.035 * size) & (u > outer - 0.06 * size)
    ring_cover = np.clip(outer - r + 0.5, 0, 1) * np.clip(r - inner + 0.5, 0, 1)
    ring_cover = np.where(notch, 0.0, ring_cover)
    mid, half_width = (outer + inner) / 2, (outer - inner) / 2
    chamfer = 1.0 - 0.25 * np.clip((np.abs(r - mid) / half_width - 0.75) / 0.25, 0, 1)
    shade = (0.9 - 0.1 * (0.7 * dx - 0.7 * dy) / outer) * chamfer
    texture = 1.0 + 0.04 * np.sin(2 * np.pi * r / (size / 60)) + 0.03 * _smooth_noise(rng, size, 6)
    ring = 120.0 * rng.uniform(0.97, 1.03) * shade * texture
    background = 205.0 - 6.0 * (xx / size - 0.5)
    image = ring_cover * ring + (1 - ring_cover) * background
    return image[..., None], ring_cover >= 0.5


def _render_weave(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A two-tone basket weave filling the image, with a random phase shift."""
    yy, xx = _grid(size)
    period = size / 12
    ox, oy = rng.uniform(0, 2 * period, 2)
    xs, ys = (xx + ox) / period, (yy + oy) / period
    fx, fy = xs - np.floor(xs), ys - np.floor(ys)
    horizontal = (np.floor(xs) + np.floor(ys)) % 2 == 0
    across = np.where(horizontal, fy, fx)  # position across the yarn on top
    along = np.where(horizontal, fx, fy)
    profile = np.sqrt(np.sin(np.pi * across)) * (0.85 + 0.15 * np.sin(np.pi * along))
    fibres = 1.0 + 0.04 * np.sin(2 * np.pi * across * 4 + 2 * np.pi * along * 0.5)
    variation = 1.0 + 0.04 * _smooth_noise(rng, size, 8)
    warp = np.array([196.0, 168.0, 122.0], np.float32)
    weft = np.array([178.0, 148.0, 108.0], np.float32)
    colour = np.where(horizontal[..., None], warp, weft) * rng.uniform(0.97, 1.03)
    image = colour * (0.35 + 0.65 * profile * fibres * variation)[..., None]
    return image, np.ones((size, size), bool)


_RENDERERS = {"disc": _render_disc, "washer": _render_washer, "weave": _render_weave}


def _defect_centre(
    rng: np.random.Generator, object_mask: np.ndarray, margin: float
) -> tuple[float, float]:
    """A random pixel (x, y) of the object at least ``margin`` px inside it (if possible)."""
    radius = max(int(round(margin)), 0)
    inside = object_mask
    if radius > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        eroded = cv2.erode(object_mask.astype(np.uint8), kernel, borderValue=0) > 0
        if eroded.any():
            inside = eroded
    flat = np.flatnonzero(inside)
    index = flat[rng.integers(len(flat))]
    y, x = divmod(int(index), object_mask.shape[1])
    return x + 0.5, y + 0.5


def _blob(
    rng: np.random.Generator, size: int, centre: tuple[float, float], radius: float
) -> np.ndarray:
    """(size, size) float32 normalised distance of an irregular ellipse (<= 1 inside)."""
    yy, xx = _grid(size)
    dx, dy = xx - centre[0], yy - centre[1]
    phi = rng.uniform(0, np.pi)
    aspect = rng.uniform(0.6, 1.0)
    u = dx * np.cos(phi) + dy * np.sin(phi)
    v = (-dx * np.sin(phi) + dy * np.cos(phi)) / aspect
    angle = np.arctan2(v, u)
    p1, p2 = rng.uniform(0, 2 * np.pi, 2)
    wobble = 1.0 + 0.15 * np.sin(3 * angle + p1) + 0.08 * np.sin(5 * angle + p2)
    return np.hypot(u, v) / (radius * wobble)


def _apply_defect(
    rng: np.random.Generator, image: np.ndarray, object_mask: np.ndarray, defect: str
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one defect on the object; returns (image, mask of exactly the changed pixels)."""
    size, channels = image.shape[0], image.shape[2]
    line = np.zeros((size, size), np.uint8)
    if defect == "scratch":  # thin bright curve, medium contrast
        centre = _defect_centre(rng, object_mask, 0.03 * size)
        length = rng.uniform(0.15, 0.3) * size
        angle = rng.uniform(0, np.pi)
        bend = rng.uniform(-0.12, 0.12) * length
        s = np.linspace(-length / 2, length / 2, 33)
        direction = np.array([np.cos(angle), np.sin(angle)])
        normal = np.array([-direction[1], direction[0]])
        pts = (
            np.array(centre)
            + s[:, None] * direction
            + (bend * (2 * s / length) ** 2)[:, None] * normal
        )
        thickness = max(1, round(size / 160))
        cv2.polylines(line, [np.round(pts).astype(np.int32)], False, 1, thickness, cv2.LINE_8)
        mask = (line > 0) & object_mask
        image = image + np.where(mask, rng.uniform(40, 60), 0.0)[..., None]
    elif defect == "crack":  # dark jagged random walk
        centre = _defect_centre(rng, object_mask, 0.03 * size)
        steps = 14
        turns = np.cumsum(rng.normal(0.0, 0.6, steps)) + rng.uniform(0, 2 * np.pi)
        step = 0.018 * size
        moves = step * np.stack([np.cos(turns), np.sin(turns)], axis=1)
        pts = np.array(centre) + np.vstack([np.zeros((1, 2)), np.cumsum(moves, axis=0)])
        thickness = max(1, round(size / 200))
        cv2.polylines(line, [np.round(pts).astype(np.int32)], False, 1, thickness, cv2.LINE_8)
        mask = (line > 0) & object_mask
        image = image * np.where(mask, rng.uniform(0.3, 0.4), 1.0)[..., None]
    elif defect == "stain":  # soft, low-contrast discoloration
        radius = rng.uniform(0.05, 0.09) * size
        centre = _defect_centre(rng, object_mask, 0.8 * radius)
        dist = _blob(rng, size, centre, radius)
        mask = (dist <= 1.0) & object_mask
        strength = rng.uniform(14, 22) * (1.0 - 0.6 * np.minimum(dist, 1.0) ** 2)
        tint = np.array([0.6, 0.9, 1.0], np.float32)[:channels] if channels == 3 else np.ones(1)
        image = image - np.where(mask, strength, 0.0)[..., None] * tint
    elif defect == "hole":  # large, high-contrast dark hole
        radius = rng.uniform(0.04, 0.07) * size
        centre = _defect_centre(rng, object_mask, 0.9 * radius)
        dist = _blob(rng, size, centre, radius)
        mask = (dist <= 1.0) & object_mask
        depth = 14.0 + 10.0 * np.minimum(dist, 1.0)
        dark = (
            depth[..., None] * np.array([1.0, 0.8, 0.7], np.float32)
            if channels == 3
            else depth[..., None]
        )
        image = np.where(mask[..., None], dark, image)
    else:
        raise ConfigError(f"unknown synthetic defect {defect!r}; known: {SYNTHETIC_DEFECTS}")
    return image, mask


def render_synthetic_image(
    class_name: str,
    defect: str | None = None,
    *,
    image_size: int = DEFAULT_SYNTHETIC_IMAGE_SIZE,
    seed: int | Sequence[int] = 0,
) -> SyntheticImage:
    """Render one synthetic image of ``class_name`` with an optional defect.

    The same seed gives the same defect-free base image for every ``defect``, so
    ``render(c, "hole", seed=s).image - render(c, None, seed=s).image`` is non-zero
    only inside the returned defect mask.
    """
    if class_name not in SYNTHETIC_CLASSES:
        raise ConfigError(
            f"unknown synthetic class {class_name!r}; known: {', '.join(SYNTHETIC_CLASSES)}"
        )
    if defect is not None and defect != GOOD and defect not in SYNTHETIC_DEFECTS:
        raise ConfigError(f"unknown synthetic defect {defect!r}; known: {SYNTHETIC_DEFECTS}")
    size = int(image_size)
    if size < MIN_SYNTHETIC_IMAGE_SIZE:
        raise ConfigError(f"image_size must be >= {MIN_SYNTHETIC_IMAGE_SIZE}, got {image_size}")
    base_seq, defect_seq = np.random.SeedSequence(seed).spawn(2)
    base_rng = np.random.default_rng(base_seq)
    image, object_mask = _RENDERERS[class_name](base_rng, size)
    image = image + base_rng.normal(0.0, SYNTHETIC_NOISE_SIGMA, image.shape).astype(np.float32)
    image = np.clip(image, 0.0, 255.0)
    if defect is None or defect == GOOD:
        defect_mask = np.zeros((size, size), bool)
    else:
        image, defect_mask = _apply_defect(
            np.random.default_rng(defect_seq), image, object_mask, defect
        )
    pixels = np.rint(np.clip(image, 0.0, 255.0)).astype(np.uint8)
    if class_name in SYNTHETIC_GRAYSCALE:
        pixels = pixels[..., 0]
    return SyntheticImage(np.ascontiguousarray(pixels), defect_mask, object_mask)


def synthetic_image_seed(
    seed: int, class_name: str, split: str, defect: str, index: int
) -> list[int]:
    """Seed of one file of :func:`make_synthetic_mvtec`, for :func:`render_synthetic_image`.

    It depends only on its arguments (not on ``n_train`` etc.), so ``train/good/003.png``
    is the same image whatever the set's size.

    >>> synthetic_image_seed(0, "disc", "test", "hole", 1)[2:]
    [1, 4, 1]
    """
    codes = {name: i for i, name in enumerate((GOOD, *SYNTHETIC_DEFECTS))}
    if split not in ("train", "test") or defect not in codes:
        raise ConfigError(f"unknown split/defect {split!r}/{defect!r}")
    return [
        int(seed),
        zlib.crc32(class_name.encode("utf-8")),
        int(split == "test"),
        codes[defect],
        int(index),
    ]


def _encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes without timestamps; (H, W) -> grayscale, (H, W, 3) RGB -> colour."""
    if pixels.ndim == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    if not ok:  # pragma: no cover - OpenCV always encodes uint8 arrays
        raise DataError("OpenCV failed to encode a PNG")
    return encoded.tobytes()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write via a hidden temporary file and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _synthetic_plan(settings: dict[str, Any]) -> list[tuple[str, str, str, int]]:
    """(class, split, defect, index) of every image the settings describe."""
    plan = []
    for name in settings["classes"]:
        plan += [(name, "train", GOOD, i) for i in range(settings["n_train"])]
        plan += [(name, "test", GOOD, i) for i in range(settings["n_test_good"])]
        for defect in settings["defects"]:
            plan += [(name, "test", defect, i) for i in range(settings["n_test_per_defect"])]
    return plan


def _plan_paths(root: Path, item: tuple[str, str, str, int]) -> tuple[Path, Path | None]:
    name, split, defect, index = item
    image = root / name / split / defect / f"{index:03d}.png"
    if defect == GOOD:
        return image, None
    mask = root / name / "ground_truth" / defect / f"{index:03d}_mask.png"
    return image, mask


def _read_marker(
    root: Path, tags: Sequence[str] = (SYNTHETIC_GENERATOR_TAG,)
) -> dict[str, Any] | None:
    try:
        marker = json.loads((root / SYNTHETIC_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("generator") not in tags:
        return None
    return marker


def is_synthetic_root(root: str | os.PathLike) -> bool:
    """True if ``root`` holds the ``SYNTHETIC.json`` marker of :func:`make_synthetic_mvtec`
    or :func:`make_synthetic_visa`."""
    tags = (SYNTHETIC_GENERATOR_TAG, SYNTHETIC_VISA_GENERATOR_TAG)
    return _read_marker(Path(root), tags) is not None


def _cache_base() -> Path:
    cache = os.environ.get(CACHE_ENV_VAR)
    return Path(cache).expanduser() if cache else Path.home() / ".cache" / "winclip_nb"


def default_synthetic_root() -> Path:
    """``$WINCLIP_NB_CACHE/synthetic_mvtec``, else ``~/.cache/winclip_nb/synthetic_mvtec``."""
    return _cache_base() / "synthetic_mvtec"


def default_synthetic_visa_root() -> Path:
    """``$WINCLIP_NB_CACHE/synthetic_visa``, else ``~/.cache/winclip_nb/synthetic_visa``."""
    return _cache_base() / "synthetic_visa"


def _synthetic_set_complete(
    root: Path, settings: dict[str, Any], plan: list[tuple[str, str, str, int]]
) -> bool:
    """True if ``root`` holds a finished set with exactly these settings and all its files."""
    old = _read_marker(root) if root.is_dir() else None
    if old is None or old.get("complete") is not True:
        return False
    if {k: v for k, v in old.items() if k != "complete"} != settings:
        return False
    return all(p is None or p.is_file() for item in plan for p in _plan_paths(root, item))


@contextlib.contextmanager
def _generation_lock(root: Path) -> Iterator[None]:
    """Hold ``<root>/.generating.lock`` (a folder: ``mkdir`` is atomic on every OS).

    Another process generating into the same root is waited for; a lock older than
    :data:`SYNTHETIC_LOCK_STALE_S` is taken to be left over from a killed run.
    """
    lock = root / _LOCK_NAME
    deadline = time.monotonic() + SYNTHETIC_LOCK_TIMEOUT_S
    while True:
        try:
            lock.mkdir()
            break
        except FileExistsError:
            try:
                age = time.time() - lock.stat().st_mtime
            except FileNotFoundError:
                continue  # released meanwhile
            if age > SYNTHETIC_LOCK_STALE_S:
                shutil.rmtree(lock, ignore_errors=True)
                continue
            if time.monotonic() > deadline:
                raise DataError(
                    f"{lock} is held by another process; delete it if no generation is running"
                ) from None
            time.sleep(0.1)
    try:
        yield
    finally:
        shutil.rmtree(lock, ignore_errors=True)


def _check_count(value: int, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _synthetic_settings(
    generator: str,
    classes: Sequence[str] | None,
    n_train: int,
    n_test_good: int,
    n_test_per_defect: int,
    image_size: int,
    seed: int,
) -> dict[str, Any]:
    """The checked settings of a synthetic set, as its ``SYNTHETIC.json`` records them."""
    names = list(SYNTHETIC_CLASSES) if classes is None else list(dict.fromkeys(classes))
    if not names:
        raise ConfigError("classes must name at least one synthetic class, got []")
    unknown = [c for c in names if c not in SYNTHETIC_CLASSES]
    if unknown:
        raise ConfigError(
            f"unknown synthetic classes {unknown}; known: {', '.join(SYNTHETIC_CLASSES)}"
        )
    return {
        "generator": generator,
        "version": SYNTHETIC_GENERATOR_VERSION,
        "classes": names,
        "defects": list(SYNTHETIC_DEFECTS),
        "n_train": _check_count(n_train, "n_train", 1),
        "n_test_good": _check_count(n_test_good, "n_test_good", 1),
        "n_test_per_defect": _check_count(n_test_per_defect, "n_test_per_defect", 1),
        "image_size": _check_count(image_size, "image_size", MIN_SYNTHETIC_IMAGE_SIZE),
        "seed": _check_count(seed, "seed", 0),
    }


def make_synthetic_mvtec(
    root: str | os.PathLike,
    classes: Sequence[str] | None = None,
    *,
    n_train: int = DEFAULT_SYNTHETIC_N_TRAIN,
    n_test_good: int = DEFAULT_SYNTHETIC_N_TEST_GOOD,
    n_test_per_defect: int = DEFAULT_SYNTHETIC_N_TEST_PER_DEFECT,
    image_size: int = DEFAULT_SYNTHETIC_IMAGE_SIZE,
    seed: int = 0,
) -> Path:
    """Write a synthetic dataset in the MVTec-AD layout under ``root``; return ``root``.

    Classes: :data:`SYNTHETIC_CLASSES` (default all); defects: :data:`SYNTHETIC_DEFECTS`
    (``stain`` is deliberately subtle, ``hole`` obvious). Every image has its own seed
    derived from (seed, class, split, defect, index), so the files are byte-identical
    for the same arguments. ``<root>/SYNTHETIC.json`` records the settings; a root
    that already holds a complete set with the same settings is reused as is. A root
    with another synthetic set is cleared of it and rewritten; a non-empty folder
    without the marker raises :class:`DataError` (it is not ours to overwrite).
    """
    settings = _synthetic_settings(
        SYNTHETIC_GENERATOR_TAG, classes, n_train, n_test_good, n_test_per_defect, image_size, seed
    )
    names, size = settings["classes"], settings["image_size"]
    base = Path(root)
    if base.exists() and not base.is_dir():
        raise DataError(f"synthetic dataset root is not a folder: {base}")
    plan = _synthetic_plan(settings)
    if _synthetic_set_complete(base, settings, plan):
        return base
    base.mkdir(parents=True, exist_ok=True)
    with _generation_lock(base):
        if _synthetic_set_complete(base, settings, plan):  # another process just made it
            return base
        _clear_synthetic_root(base, names, (SYNTHETIC_GENERATOR_TAG,))
        _write_marker(base, settings, False)  # an interrupted run is recognised next time
        for item in plan:
            name, split, defect, index = item
            image_seed = synthetic_image_seed(seed, name, split, defect, index)
            sample = render_synthetic_image(name, defect, image_size=size, seed=image_seed)
            image_path, mask_path = _plan_paths(base, item)
            _write_atomic(image_path, _encode_png(sample.image))
            if mask_path is not None:
                _write_atomic(mask_path, _encode_png(sample.defect_mask.astype(np.uint8) * 255))
        _write_marker(base, settings, True)
    return base


def _clear_synthetic_root(base: Path, names: Sequence[str], tags: Sequence[str]) -> bool:
    """Before generating into ``base`` (lock held): remove the class folders of an older
    synthetic set (its marker's generator in ``tags``) and of ``names``; refuse a
    non-empty folder without a marker. True if an older set was there."""
    old = _read_marker(base, tags)
    if old is None:
        if any(p.name != _LOCK_NAME for p in base.iterdir()):
            raise DataError(
                f"refusing to write synthetic data into {base}: the folder is not empty and "
                f"has no {SYNTHETIC_MARKER} marker; choose an empty or new folder"
            )
        return False
    stale = {c for c in old.get("classes", []) if isinstance(c, str)} | set(names)
    for name in sorted(stale & set(SYNTHETIC_CLASSES)):
        if (base / name).is_dir():
            shutil.rmtree(base / name)
    return True


def _write_marker(base: Path, settings: dict[str, Any], complete: bool) -> None:
    text = json.dumps({**settings, "complete": complete}, indent=2, sort_keys=True)
    _write_atomic(base / SYNTHETIC_MARKER, (text + "\n").encode("utf-8"))


# --- synthetic data in VisA's layout -------------------------------------------------
JPEG_QUALITY = 95


def _encode_jpeg(pixels: np.ndarray) -> bytes:
    """JPEG bytes (quality :data:`JPEG_QUALITY`); (H, W) -> grayscale, (H, W, 3) RGB -> colour."""
    if pixels.ndim == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:  # pragma: no cover - OpenCV always encodes uint8 arrays
        raise DataError("OpenCV failed to encode a JPEG")
    return encoded.tobytes()


def _visa_plan(settings: dict[str, Any]) -> list[tuple[str, str, str, int, str, str]]:
    """(class, split, defect, index, image path, mask path or "") of every image, in the
    order of the split file; index counts within (class, split, defect) as in MVTec's set."""
    plan = []
    for name in settings["classes"]:
        images = f"{name}/Data/Images"
        n_train, n_good = settings["n_train"], settings["n_test_good"]
        for i in range(n_train + n_good):
            split, index = ("train", i) if i < n_train else ("test", i - n_train)
            plan.append((name, split, GOOD, index, f"{images}/Normal/{i:04d}.JPG", ""))
        number = 0
        for defect in settings["defects"]:
            for index in range(settings["n_test_per_defect"]):
                image = f"{images}/Anomaly/{number:03d}.JPG"
                mask = f"{name}/Data/Masks/Anomaly/{number:03d}.png"
                plan.append((name, "test", defect, index, image, mask))
                number += 1
    return plan


def _visa_split_text(plan: list[tuple[str, str, str, int, str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(VISA_COLUMNS)
    for name, split, defect, _, image, mask in plan:
        label = VISA_NORMAL if defect == GOOD else VISA_ANOMALY
        writer.writerow([name, split, label, image, mask])
    return buffer.getvalue()


def make_synthetic_visa(
    root: str | os.PathLike,
    classes: Sequence[str] | None = None,
    *,
    n_train: int = DEFAULT_SYNTHETIC_N_TRAIN,
    n_test_good: int = DEFAULT_SYNTHETIC_N_TEST_GOOD,
    n_test_per_defect: int = DEFAULT_SYNTHETIC_N_TEST_PER_DEFECT,
    image_size: int = DEFAULT_SYNTHETIC_IMAGE_SIZE,
    seed: int = 0,
) -> Path:
    """Write a synthetic dataset in VisA's layout under ``root``; return ``root``.

    The images of :func:`make_synthetic_mvtec` with the same arguments (same classes,
    renders and seeds), stored as VisA stores them: JPEG images under
    ``<class>/Data/Images/{Normal,Anomaly}/``, PNG masks under
    ``<class>/Data/Masks/Anomaly/`` whose defect pixels hold a small non-zero label
    (1 + the defect's index in :data:`SYNTHETIC_DEFECTS`, not 255), and
    ``split_csv/1cls.csv``. ``SYNTHETIC.json`` marks the set (results then say
    SYNTHETIC); reuse, regeneration and refusal of a foreign folder work as in
    :func:`make_synthetic_mvtec`.
    """
    settings = _synthetic_settings(
        SYNTHETIC_VISA_GENERATOR_TAG,
        classes,
        n_train,
        n_test_good,
        n_test_per_defect,
        image_size,
        seed,
    )
    base = Path(root)
    if base.exists() and not base.is_dir():
        raise DataError(f"synthetic dataset root is not a folder: {base}")
    plan = _visa_plan(settings)
    split_file = base / VISA_SPLIT_FILE
    tags = (SYNTHETIC_GENERATOR_TAG, SYNTHETIC_VISA_GENERATOR_TAG)

    def complete() -> bool:
        old = _read_marker(base, (SYNTHETIC_VISA_GENERATOR_TAG,)) if base.is_dir() else None
        if old is None or old.get("complete") is not True:
            return False
        if {k: v for k, v in old.items() if k != "complete"} != settings:
            return False
        files = [split_file] + [base / p for item in plan for p in item[4:] if p]
        return all(f.is_file() for f in files)

    if complete():
        return base
    base.mkdir(parents=True, exist_ok=True)
    with _generation_lock(base):
        if complete():  # another process just made it
            return base
        if _clear_synthetic_root(base, settings["classes"], tags):
            split_file.unlink(missing_ok=True)
        _write_marker(base, settings, False)
        for name, split, defect, index, image, mask in plan:
            image_seed = synthetic_image_seed(settings["seed"], name, split, defect, index)
            sample = render_synthetic_image(
                name, defect, image_size=settings["image_size"], seed=image_seed
            )
            _write_atomic(base / image, _encode_jpeg(sample.image))
            if mask:
                label = 1 + SYNTHETIC_DEFECTS.index(defect)
                _write_atomic(base / mask, _encode_png(sample.defect_mask.astype(np.uint8) * label))
        _write_atomic(split_file, _visa_split_text(plan).encode("utf-8"))
        _write_marker(base, settings, True)
    return base
