"""Calibration: what the normal images' own maps say is normal (notebook 04).

A training patch would always find itself in the memory, so the normal images are
scored *leave one image out* (their patches never match their own image). From those
normal maps come two things:

- ``branch_stats``: the median and robust sigma of each branch map over foreground
  patches, which put the text and NN maps on a common scale before fusion;
- :meth:`Calibration.map_stats`: the median and robust sigma of the fused, upsampled
  normal maps over foreground pixels, the scale of the ``calibrated`` normalisation
  (z = 3 means "3 robust sigmas above normal").

Example:
    >>> maps = {"nn_map": torch.tensor([[[0.1, 0.2], [0.3, 0.4]]])}
    >>> cal = Calibration.from_normal_maps(maps, torch.ones(1, 4, 4, dtype=torch.bool))
    >>> [round(float(v), 4) for v in cal.branch_stats["nn_map"]]
    [0.2, 0.1483]
    >>> resolve_normalization("calibrated", cal)  # without statistics: per_image, with a warning
    'calibrated'
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .maps import Stats, robust_stats, upsample_maps


def patch_foreground(fg_masks: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """(n, S, S) pixel masks -> (n, h, w) bool: patches at least half foreground.

    >>> patch_foreground(torch.tensor([[[1, 1, 0, 0]] * 4]).bool(), (2, 2)).tolist()
    [[[True, False], [True, False]]]
    """
    pooled = F.adaptive_avg_pool2d(fg_masks[:, None].float(), grid_size)[:, 0]
    return pooled >= 0.5


@dataclass
class Calibration:
    """Leave-one-image-out maps of the normal images and their statistics.

    ``normal_maps``: branch name -> (n, h, w) maps; ``fg_masks``: (n, S, S) bool;
    ``branch_stats``: branch name -> (median, robust sigma) over foreground patches.
    """

    normal_maps: dict[str, torch.Tensor]
    fg_masks: torch.Tensor
    branch_stats: dict[str, Stats]
    _map_stats: dict[Hashable, Stats] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_normal_maps(cls, normal_maps: dict[str, torch.Tensor],
                         fg_masks: torch.Tensor) -> Calibration:
        """Statistics of each branch over the foreground patches of the normal images."""
        fg, first = fg_masks.bool(), next(iter(normal_maps.values()))
        patch_fg = patch_foreground(fg, tuple(first.shape[-2:])).to(first.device)
        stats = {name: robust_stats(m[patch_fg]) for name, m in normal_maps.items()}
        return cls(dict(normal_maps), fg, stats)

    def map_stats(self, key: Hashable, fuse: Callable[..., torch.Tensor]) -> Stats:
        """(median, robust sigma) over foreground pixels of ``fuse(normal_maps)`` upsampled
        to the masks' size; remembered per ``key`` (e.g. the fusion weights)."""
        if key not in self._map_stats:
            fused = upsample_maps(fuse(self.normal_maps), tuple(self.fg_masks.shape[-2:]))
            self._map_stats[key] = robust_stats(fused[self.fg_masks.to(fused.device)])
        return self._map_stats[key]


def resolve_normalization(mode: str, calibration: Calibration | None,
                          can_calibrate: bool = True) -> str:
    """``calibrated`` needs the statistics of normal images; without them (zero-shot, or
    too few references) fall back to ``per_image``, with a warning unless the method
    never has them (``can_calibrate=False``: musc takes no normal images)."""
    if mode != "calibrated" or calibration is not None:
        return mode
    if can_calibrate:
        warnings.warn("calibrated normalisation needs statistics of normal images (a memory "
                      "of enough normal images); using per_image", stacklevel=4)
    return "per_image"
