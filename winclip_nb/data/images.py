"""Image and mask decoding: any file or array -> (H, W, 3) uint8 RGB, masks -> (H, W) bool.

Everything the pipeline reads goes through :func:`load_image` (paths, PIL images or numpy
arrays of any mode: RGB, grayscale, RGBA, 16-bit, palette, EXIF-rotated) and
:func:`load_mask`; bad files raise :class:`~winclip_nb.core.errors.ImageReadError`
naming the file.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageOps

from ..core.errors import ConfigError, DataError, ImageReadError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})

#: File names that are never images even if a tool gave them an image extension.
IGNORED_FILE_NAMES: frozenset[str] = frozenset({"thumbs.db", "desktop.ini"})

#: Integer images are scaled to 8 bit by the smallest of these bit depths that holds their maximum.
_INTEGER_BIT_DEPTHS = (8, 10, 12, 14, 16, 24, 32)


class DataWarning(UserWarning):
    """Data was usable only after a repair (e.g. a mask resized to its image)."""


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
