"""Stage 04: fusion, foreground, upsampling, robust normalisation, smoothing, image score
and hotspots (notebook 04).

Common scale before fusion
    The text map is a probability and the NN map a distance, so their raw values are not
    comparable. Each is first turned into a robust z-score with the median and MAD of the
    same map on the normal images (:mod:`~winclip_nb.core.calibration`):
    ``z = (x - median) / (1.4826 MAD)``. The fused map is ``text_weight * z_text +
    nn_weight * z_nn`` divided by the sum of the weights, so "1" means one robust sigma
    of normal variation in either branch.

Normalisation modes (after upsampling, over foreground pixels)
    ``per_image``: median and MAD of the image's own foreground pixels, so scores rank
    pixels *within* an image. ``calibrated``: median and MAD of the fused maps of the
    normal images, so z = 3 means "3 robust sigmas above normal" in every image.

Image score
    Mean of the top fraction (1 %) of foreground pixels of the final map.
"""

from __future__ import annotations

import math
from functools import lru_cache

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .results import Hotspot

Stats = tuple[torch.Tensor, torch.Tensor]

#: 1.4826 * MAD estimates the standard deviation of normally distributed data.
MAD_TO_SIGMA = 1.4826
#: Spreads below this count as zero (constant maps): then z = 0, never inf or NaN.
MIN_SCALE = 1e-6
#: Classes photographed as a surface filling the image: all foreground, no mask (the
#: MVTec-AD textures and the synthetic ``weave``).
TEXTURE_CLASSES = frozenset({"carpet", "grid", "leather", "tile", "wood", "weave"})
#: Foreground masks are computed at this side length at most (speed), then resized.
FG_WORK_SIZE = 256
#: Border width, as a fraction of the side, sampled for the background colour.
FG_BORDER_FRACTION = 0.04
#: A foreground smaller than this fraction of the image counts as a failed mask.
FG_MIN_FRACTION = 0.02
#: Components smaller than this fraction of the largest one are dropped.
FG_KEEP_RELATIVE = 0.1


def is_texture(class_name: str | None) -> bool:
    """True for texture classes (no foreground mask), case-insensitive.

    >>> is_texture("Carpet"), is_texture("screw"), is_texture(None)
    (True, False, False)
    """
    return class_name is not None and str(class_name).strip().lower() in TEXTURE_CLASSES


def robust_stats(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Median and robust sigma (1.4826 MAD) of a 1-D tensor; sigma never below MIN_SCALE.

    Falls back to the standard deviation when more than half the values are equal
    (MAD = 0 but the data are not constant).

    Example:
        >>> robust_stats(torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0]))
        (tensor(3.), tensor(1.4826))
    """
    values = values.float().flatten()
    if values.numel() == 0:
        return torch.tensor(0.0), torch.tensor(1.0)
    median = values.median()
    scale = MAD_TO_SIGMA * (values - median).abs().median()
    if scale < MIN_SCALE:
        scale = values.std(unbiased=False) if values.numel() > 1 else torch.tensor(0.0)
    return median, torch.clamp(scale, min=MIN_SCALE)


def fuse_maps(text_map: torch.Tensor, nn_map: torch.Tensor | None, text_weight: float,
              nn_weight: float, text_stats: Stats | None = None,
              nn_stats: Stats | None = None) -> torch.Tensor:
    """Weighted mean of the text and NN maps after bringing both to z-scores.

    Args:
        text_map: (B, h, w) anomalous-probability map.
        nn_map: (B, h, w) NN distances, or None (zero-shot: text map only).
        text_stats, nn_stats: (median, sigma) of each map on normal images;
            None keeps that map's raw values.

    Returns:
        (B, h, w) fused map.

    Example:
        >>> t = torch.tensor([[[0.5, 0.7]]]); n = torch.tensor([[[0.1, 0.3]]])
        >>> stats = (torch.tensor(0.5), torch.tensor(0.1))
        >>> fuse_maps(t, n, 0.5, 0.5, stats, (torch.tensor(0.1), torch.tensor(0.1)))
        tensor([[[0., 2.]]])
    """
    z_text = zscore(text_map, text_stats)
    if nn_map is None:
        return z_text
    z_nn = zscore(nn_map, nn_stats)
    return (text_weight * z_text + nn_weight * z_nn) / (text_weight + nn_weight)


def zscore(x: torch.Tensor, stats: Stats | None) -> torch.Tensor:
    """``(x - median) / sigma`` with the given (median, sigma); None keeps ``x`` as it is."""
    return x if stats is None else (x - stats[0].to(x)) / stats[1].to(x)


def upsample_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling (B, h, w) -> (B, H, W)."""
    up = F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)
    return up[:, 0]


def robust_normalize(maps: torch.Tensor, fg_masks: torch.Tensor, center: torch.Tensor | None = None,
                     scale: torch.Tensor | None = None) -> torch.Tensor:
    """Robust z-scores over foreground pixels; background set to the image's minimum.

    ``per_image`` mode: leave ``center``/``scale`` None and each map uses the median
    and 1.4826 MAD of its own foreground pixels. ``calibrated`` mode: pass the
    statistics of normal images. Constant maps give all zeros (no NaN/inf).

    Args:
        maps: (B, H, W). fg_masks: (B, H, W) bool.

    Returns:
        (B, H, W) float32.

    Example:
        >>> m = torch.tensor([[[1.0, 2.0, 3.0, 4.0, 100.0]]])
        >>> robust_normalize(m, torch.ones_like(m, dtype=torch.bool))
        tensor([[[-1.3490, -0.6745,  0.0000,  0.6745, 65.4256]]])
    """
    maps = maps.float()
    fg = fg_masks.bool()
    if center is None or scale is None:
        # Per image: median and MAD over foreground pixels (NaN marks background).
        flat = torch.where(fg.flatten(1), maps.flatten(1), float("nan"))
        med = flat.nanmedian(dim=1).values
        mad = (flat - med[:, None]).abs().nanmedian(dim=1).values * MAD_TO_SIGMA
        std = torch.sqrt(torch.nanmean((flat - flat.nanmean(dim=1, keepdim=True)) ** 2, dim=1))
        # (an image without foreground gets NaN here; its map becomes 0 below)
        sigma = torch.where(mad < MIN_SCALE, std, mad).clamp_min(MIN_SCALE)
        z = (maps - med[:, None, None]) / sigma[:, None, None]
    else:
        z = (maps - center.to(maps)) / scale.to(maps).clamp_min(MIN_SCALE)
    fg_min = torch.where(fg, z, float("inf")).flatten(1).amin(dim=1)  # inf: no foreground
    out = torch.where(fg, z, fg_min[:, None, None])
    return torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian kernel with radius ceil(3 sigma).

    Example:
        >>> gaussian_kernel1d(1.0).shape, float(gaussian_kernel1d(1.0).sum())
        (torch.Size([7]), 1.0)
    """
    radius = max(1, math.ceil(3.0 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


@lru_cache(maxsize=32)
def _smoothing_matrix(size: int, sigma: float, device: torch.device,
                      dtype: torch.dtype) -> torch.Tensor:
    """(size, size) matrix M with ``M @ x`` = 1-D Gaussian blur of the columns of ``x``.

    The padding of :func:`gaussian_smooth` is folded in: reflect (without repeating the
    edge) for up to ``size - 1`` pixels, replicate beyond. Cached; do not modify.

    Example:
        >>> m = _smoothing_matrix(5, 1.0, torch.device("cpu"), torch.float32)
        >>> bool(torch.allclose(m.sum(dim=1), torch.ones(5)))
        True
    """
    with torch.inference_mode(False):  # a cached normal tensor, usable in and out of it
        kernel = gaussian_kernel1d(sigma)
        radius = kernel.numel() // 2
        pad = min(radius, size - 1)
        rows = torch.arange(size)[:, None].expand(size, kernel.numel())
        src = (rows + torch.arange(-radius, radius + 1)[None]).clamp(-pad, size - 1 + pad)
        src = torch.where(src < 0, -src, src)  # reflect
        src = torch.where(src > size - 1, 2 * (size - 1) - src, src)
        matrix = torch.zeros(size, size, dtype=torch.float64)
        weights = kernel.double()[None].expand_as(src).reshape(-1)
        matrix.index_put_((rows.reshape(-1), src.reshape(-1)), weights, accumulate=True)
        return matrix.to(device=device, dtype=dtype)


def gaussian_smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) maps with reflect padding; sigma 0 = identity.

    The radius is ceil(3 sigma); beyond ``side - 1`` pixels the padding replicates the
    edge. The blur is ``M_h @ x @ M_w^T`` with cached banded matrices: one batched matrix
    product per axis on any device (far faster than a one-channel convolution on a CPU).

    Example:
        >>> x = torch.zeros(1, 9, 9); x[0, 4, 4] = 1.0  # an impulse away from the edges
        >>> y = gaussian_smooth(x, 1.0)
        >>> round(float(y.sum()), 4), bool(y[0, 4, 4] == y.max())
        (1.0, True)
    """
    if sigma <= 0:
        return maps
    height, width = maps.shape[-2:]
    dtype = maps.dtype if maps.is_floating_point() else torch.float32
    rows = _smoothing_matrix(height, float(sigma), maps.device, dtype)
    cols = _smoothing_matrix(width, float(sigma), maps.device, dtype)
    return torch.matmul(torch.matmul(rows, maps.to(dtype)), cols.T)


def image_scores(maps: torch.Tensor, fg_masks: torch.Tensor, top_fraction: float) -> torch.Tensor:
    """Mean of the top ``top_fraction`` of foreground pixels per map.

    Args:
        maps: (B, H, W). fg_masks: (B, H, W) bool.

    Returns:
        (B,) scores.

    Example:
        >>> m = torch.arange(100.0).view(1, 10, 10)
        >>> image_scores(m, torch.ones_like(m, dtype=torch.bool), 0.02)
        tensor([98.5000])
    """
    fg = fg_masks.bool().flatten(1)
    flat = torch.where(fg, maps.float().flatten(1), float("-inf"))
    n_fg = fg.sum(dim=1).clamp_min(1)
    k_each = torch.clamp((n_fg.float() * top_fraction).ceil().long(), min=1)
    # Upper bound of k_each from the shape alone (+1 for float32 rounding): no device sync.
    n_pixels = flat.shape[1]
    k_max = max(1, min(n_pixels, math.ceil(n_pixels * top_fraction) + 1))
    top = flat.topk(k_max, dim=1).values  # (B, k_max), sorted descending
    keep = torch.arange(k_max, device=maps.device)[None] < k_each[:, None]
    top = torch.where(keep & torch.isfinite(top), top, torch.zeros_like(top))
    return top.sum(dim=1) / k_each.float()


def foreground_mask(image: np.ndarray, threshold: float) -> np.ndarray:
    """Foreground of an object photographed on a plain background (OpenCV).

    The background colour is the median of a thin border (in Lab); a pixel is foreground
    when its colour distance from it exceeds ``threshold`` times the largest distance in
    the image. Closing, hole filling and dropping small components clean the mask. A
    mask that fails (under 2 % of the image) is all foreground. Texture classes need no
    mask at all (:func:`is_texture`).

    Args:
        image: (H, W, 3) uint8 RGB.

    Returns:
        (H, W) bool.

    Example:
        >>> img = np.full((64, 64, 3), 200, np.uint8); img[16:48, 16:48] = 40
        >>> mask = foreground_mask(img, 0.1)
        >>> bool(mask[32, 32]), bool(mask[2, 2])
        (True, False)
    """
    h, w = image.shape[:2]
    scale = min(1.0, FG_WORK_SIZE / max(h, w))
    small = image if scale == 1.0 else cv2.resize(
        image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA
    )
    distance = _background_distance(small)
    peak = float(distance.max())
    if peak <= 0:
        return np.ones((h, w), dtype=bool)
    mask = _clean_mask((distance > threshold * peak).astype(np.uint8))
    if mask.mean() < FG_MIN_FRACTION:
        return np.ones((h, w), dtype=bool)
    if mask.shape != (h, w):
        mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
    return mask.astype(bool)


def _background_distance(image: np.ndarray) -> np.ndarray:
    """(H, W) Lab distance of each (blurred) pixel from the median colour of the border."""
    lab = cv2.cvtColor(cv2.GaussianBlur(image, (5, 5), 0), cv2.COLOR_RGB2LAB).astype(np.float32)
    b = max(1, round(FG_BORDER_FRACTION * min(lab.shape[:2])))
    border = np.concatenate([lab[:b].reshape(-1, 3), lab[-b:].reshape(-1, 3),
                             lab[:, :b].reshape(-1, 3), lab[:, -b:].reshape(-1, 3)])
    return np.linalg.norm(lab - np.median(border, axis=0), axis=2)


def _clean_mask(mask: np.ndarray) -> np.ndarray:
    """Close gaps, fill holes, keep components of at least 10 % of the largest, dilate."""
    k = max(3, round(0.03 * min(mask.shape)) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    mask = fill_holes(cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n > 1:
        areas = stats[:, cv2.CC_STAT_AREA]
        keep = areas >= FG_KEEP_RELATIVE * areas[1:].max()
        keep[0] = False  # label 0 is the background
        mask = keep.astype(np.uint8)[labels]
    return cv2.dilate(mask, kernel)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of a binary mask: same result as ``scipy.ndimage.binary_fill_holes``.

    Background pixels not 4-connected to the image border become foreground (one
    OpenCV flood fill from a one-pixel frame instead of scipy's iterated dilation).

    Args:
        mask: (H, W) bool or uint8 (non-zero = foreground).

    Returns:
        (H, W) uint8 in {0, 1}.

    Example:
        >>> ring = np.ones((5, 5), np.uint8); ring[2, 2] = 0
        >>> int(fill_holes(ring)[2, 2])
        1
    """
    h, w = mask.shape
    framed = np.zeros((h + 2, w + 2), np.uint8)
    framed[1:-1, 1:-1] = np.asarray(mask) != 0
    flood = np.zeros((h + 4, w + 4), np.uint8)
    cv2.floodFill(framed, flood, (0, 0), 2, flags=4)
    return (framed[1:-1, 1:-1] != 2).astype(np.uint8)


def find_hotspots(anomaly_map: np.ndarray, threshold: float, top_k: int, min_area_fraction: float,
                  fg_mask: np.ndarray | None = None) -> list[Hotspot]:
    """Top-K connected regions of ``anomaly_map > threshold``, by peak value.

    Args:
        anomaly_map: (H, W) z-score map.
        fg_mask: optional (H, W) bool; regions are restricted to it.

    Returns:
        Up to ``top_k`` :class:`Hotspot` objects, highest peak first.

    Example:
        >>> m = np.zeros((10, 10)); m[2:4, 5:8] = 5.0
        >>> find_hotspots(m, 3.0, 3, 0.0)[0].box
        (5, 2, 8, 4)
    """
    values = np.asarray(anomaly_map, dtype=np.float32)
    above = values > threshold
    if fg_mask is not None:
        above &= fg_mask.astype(bool)
    if top_k <= 0 or not above.any():
        return []
    h, w = values.shape
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(above.astype(np.uint8))
    index = np.arange(1, n)
    areas = stats[1:, cv2.CC_STAT_AREA]
    peaks = np.asarray(ndimage.maximum(values, labels, index), dtype=np.float64)
    means = np.asarray(ndimage.mean(values, labels, index), dtype=np.float64)
    keep = np.flatnonzero(areas >= min_area_fraction * h * w)
    order = keep[np.argsort(-peaks[keep], kind="stable")][:top_k]
    hotspots = []
    for i in order:
        x, y, bw, bh = (int(v) for v in stats[i + 1, :4])
        centroid = (float(centroids[i + 1][0]), float(centroids[i + 1][1]))
        hotspots.append(Hotspot((x, y, x + bw, y + bh), float(peaks[i]), float(means[i]),
                                int(areas[i]), float(areas[i]) / (h * w), centroid))
    return hotspots
