"""Rendering synthetic images: three classes (``disc`` object, ``washer`` grayscale object,
``weave`` texture) and four defects (``stain`` deliberately subtle, ``scratch``,
``crack``, ``hole`` obvious), each image from its own seed.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from ..core.errors import ConfigError
from .datasets import GOOD, SYNTHETIC_CLASSES, SYNTHETIC_DEFECTS, SYNTHETIC_GRAYSCALE

DEFAULT_SYNTHETIC_IMAGE_SIZE = 256
MIN_SYNTHETIC_IMAGE_SIZE = 32

#: Sensor noise (grey levels, standard deviation) added to every synthetic image.
SYNTHETIC_NOISE_SIGMA = 2.0


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
