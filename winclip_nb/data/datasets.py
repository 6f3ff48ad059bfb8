"""Datasets: the MVTec-AD and VisA layouts and users' own folders, as :class:`ClassData`.

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

Example:
    >>> root = make_synthetic_mvtec(tmp_path, ["disc"], image_size=64)  # doctest: +SKIP
    >>> data = load_mvtec_class(root, "disc")                            # doctest: +SKIP
    >>> data.n_train, data.n_test, data.n_defective                     # doctest: +SKIP
    (10, 12, 8)
"""

from __future__ import annotations

import csv
import io
import operator
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import ConfigError, DataError
from ..core.maps import is_texture
from .images import (
    IMAGE_EXTENSIONS,
    DataWarning,
    _is_image_file,
    _natural_key,
    _require_dir,
    _subfolders,
    list_images,
)

# --- class lists -------------------------------------------------------------------
#: The 15 MVTec-AD classes in the dataset's (alphabetical) order.
MVTEC_CLASSES: tuple[str, ...] = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)

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

#: VisA's classes (every one an object: VisA has no texture class).
VISA_CLASSES: tuple[str, ...] = tuple(VISA_GROUPS)

#: Classes written by :func:`make_synthetic_mvtec`. ``washer`` is saved as 8-bit grayscale.
SYNTHETIC_CLASSES: tuple[str, ...] = ("disc", "weave", "washer")

#: Defect folders of every synthetic class, from subtle to obvious contrast.
SYNTHETIC_DEFECTS: tuple[str, ...] = ("stain", "scratch", "crack", "hole")

#: Synthetic classes stored as single-channel (mode L) PNGs.
SYNTHETIC_GRAYSCALE: frozenset[str] = frozenset({"washer"})

GOOD = "good"

LABEL_GOOD = 0

LABEL_DEFECTIVE = 1

LABEL_UNKNOWN = -1

#: ``defect`` of a test image in a flat folder without a mask / with a mask.
UNKNOWN_DEFECT = "unknown"

FLAT_DEFECT = "defect"


# --- small helpers -----------------------------------------------------------------
def class_kind(name: str) -> str:
    """``"texture"`` or ``"object"`` for a class name (case-insensitive; unknown -> object).

    Textures (:data:`~winclip_nb.core.maps.TEXTURE_CLASSES`) get no foreground mask.

    >>> class_kind("Carpet"), class_kind("bottle"), class_kind("pcb1"), class_kind("my_part")
    ('texture', 'object', 'object', 'object')
    """
    return "texture" if is_texture(name) else "object"


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
    #: Where the normal training images come from, as a user would name it (a folder, or
    #: the split file of a VisA class); error messages point there.
    train_source: str = ""

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
        synthetic=_is_synthetic_root(base),
        train_source=str(train_dir),
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
        train_source=str(good),
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
        synthetic=_is_synthetic_root(base),
        train_source=f"{split_file} (split 'train', object {class_name})",
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


def _is_synthetic_root(root: Path) -> bool:
    from .synthetic import is_synthetic_root  # synthetic.py imports this module

    return is_synthetic_root(root)
