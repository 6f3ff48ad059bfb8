"""A synthetic dataset in the MVTec-AD (and VisA) layout, so that everything runs and is
tested without downloading anything.

Three classes (``disc`` object, ``washer`` grayscale object, ``weave`` texture) and four
defects (``stain`` deliberately subtle, ``scratch``, ``crack``, ``hole`` obvious). Every
image has its own seed derived from (seed, class, split, defect, index), so the files are
byte-identical for the same arguments.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..core.errors import ConfigError, DataError
from .datasets import (
    GOOD,
    SYNTHETIC_CLASSES,
    SYNTHETIC_DEFECTS,
    VISA_ANOMALY,
    VISA_COLUMNS,
    VISA_NORMAL,
    VISA_SPLIT_FILE,
)
from .files import atomic_write, ensure_folder, file_lock
from .render import (
    DEFAULT_SYNTHETIC_IMAGE_SIZE,
    MIN_SYNTHETIC_IMAGE_SIZE,
    render_synthetic_image,
    synthetic_image_seed,
)

# --- synthetic generator defaults --------------------------------------------------
SYNTHETIC_MARKER = "SYNTHETIC.json"

#: Bump when the generator's output changes, so cached sets are regenerated.
SYNTHETIC_GENERATOR_VERSION = 1

SYNTHETIC_GENERATOR_TAG = "winclip_nb.data.make_synthetic_mvtec"

SYNTHETIC_VISA_GENERATOR_TAG = "winclip_nb.data.make_synthetic_visa"

DEFAULT_SYNTHETIC_N_TRAIN = 10

DEFAULT_SYNTHETIC_N_TEST_GOOD = 4

DEFAULT_SYNTHETIC_N_TEST_PER_DEFECT = 2


CACHE_ENV_VAR = "WINCLIP_NB_CACHE"


PNG_COMPRESSION = 3

_LOCK_NAME = ".generating.lock"


def _encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes without timestamps; (H, W) -> grayscale, (H, W, 3) RGB -> colour."""
    if pixels.ndim == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    if not ok:  # pragma: no cover - OpenCV always encodes uint8 arrays
        raise DataError("OpenCV failed to encode a PNG")
    return encoded.tobytes()


def _generation_lock(base: Path) -> Any:
    """:func:`file_lock` on ``<base>/.generating.lock``. Older versions locked with a
    folder of that name (``mkdir``); one left by a killed run is removed first, so it
    never blocks generation."""
    lock = base / _LOCK_NAME
    if lock.is_dir():
        shutil.rmtree(lock, ignore_errors=True)
    return file_lock(lock)


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


def synthetic_settings(root: str | os.PathLike) -> dict[str, Any] | None:
    """The settings a synthetic set under ``root`` was generated with (None: not one)."""
    tags = (SYNTHETIC_GENERATOR_TAG, SYNTHETIC_VISA_GENERATOR_TAG)
    marker = _read_marker(Path(root), tags)
    return None if marker is None else {k: v for k, v in marker.items() if k != "complete"}


def is_synthetic_root(root: str | os.PathLike) -> bool:
    """True if ``root`` holds the ``SYNTHETIC.json`` marker of :func:`make_synthetic_mvtec`
    or :func:`make_synthetic_visa`."""
    tags = (SYNTHETIC_GENERATOR_TAG, SYNTHETIC_VISA_GENERATOR_TAG)
    return _read_marker(Path(root), tags) is not None


def cache_dir() -> Path:
    """``$WINCLIP_NB_CACHE``, else ``~/.cache/winclip_nb``: the package's cache folder."""
    cache = os.environ.get(CACHE_ENV_VAR)
    return Path(cache).expanduser() if cache else Path.home() / ".cache" / "winclip_nb"


def default_synthetic_root() -> Path:
    """``$WINCLIP_NB_CACHE/synthetic_mvtec``, else ``~/.cache/winclip_nb/synthetic_mvtec``."""
    return cache_dir() / "synthetic_mvtec"


def default_synthetic_visa_root() -> Path:
    """``$WINCLIP_NB_CACHE/synthetic_visa``, else ``~/.cache/winclip_nb/synthetic_visa``."""
    return cache_dir() / "synthetic_visa"


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


def _check_count(value: int, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _checked_settings(
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
    settings = _checked_settings(
        SYNTHETIC_GENERATOR_TAG, classes, n_train, n_test_good, n_test_per_defect, image_size, seed
    )
    names, size = settings["classes"], settings["image_size"]
    base = Path(root)
    if base.exists() and not base.is_dir():
        raise DataError(f"synthetic dataset root is not a folder: {base}")
    plan = _synthetic_plan(settings)
    if _synthetic_set_complete(base, settings, plan):
        return base
    ensure_folder(base)
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
            atomic_write(image_path, _encode_png(sample.image))
            if mask_path is not None:
                atomic_write(mask_path, _encode_png(sample.defect_mask.astype(np.uint8) * 255))
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
    atomic_write(base / SYNTHETIC_MARKER, (text + "\n").encode("utf-8"))


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
    settings = _checked_settings(
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
    ensure_folder(base)
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
            atomic_write(base / image, _encode_jpeg(sample.image))
            if mask:
                label = 1 + SYNTHETIC_DEFECTS.index(defect)
                atomic_write(base / mask, _encode_png(sample.defect_mask.astype(np.uint8) * label))
        atomic_write(split_file, _visa_split_text(plan).encode("utf-8"))
        _write_marker(base, settings, True)
    return base
