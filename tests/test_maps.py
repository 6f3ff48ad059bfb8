"""Stage 04: fusion, MAD normalisation, smoothing, score, foreground, hotspots."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from scipy import ndimage

from winclip_nb.maps import (
    MAD_TO_SIGMA,
    find_hotspots,
    foreground_mask,
    fuse_maps,
    gaussian_smooth,
    image_scores,
    robust_normalize,
    robust_stats,
    upsample_maps,
)


def test_robust_stats_known_array():
    median, sigma = robust_stats(torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0]))
    assert float(median) == 3.0
    assert float(sigma) == pytest.approx(MAD_TO_SIGMA * 1.0)


def test_robust_stats_mad_zero_falls_back_to_std_and_constant_is_safe():
    values = torch.tensor([1.0, 1.0, 1.0, 1.0, 5.0])  # MAD = 0, not constant
    _, sigma = robust_stats(values)
    assert float(sigma) == pytest.approx(float(values.std(unbiased=False)))
    median, sigma = robust_stats(torch.full((10,), 2.0))
    assert float(median) == 2.0 and 0 < float(sigma) <= 1e-6 * 1.0001


def test_robust_normalize_per_image_hand_computed():
    maps = torch.tensor([[[1.0, 2.0, 3.0, 4.0, 100.0]]])
    fg = torch.ones_like(maps, dtype=torch.bool)
    z = robust_normalize(maps, fg)
    expected = (torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0]) - 3.0) / MAD_TO_SIGMA
    assert torch.allclose(z[0, 0], expected, atol=1e-5)


def test_robust_normalize_uses_only_foreground_and_fills_background():
    maps = torch.tensor([[[1.0, 2.0, 3.0, 50.0, 60.0]]])
    fg = torch.tensor([[[True, True, True, False, False]]])
    z = robust_normalize(maps, fg)
    # median 2, MAD 1 over the foreground; background gets the foreground minimum.
    fg_z = (torch.tensor([1.0, 2.0, 3.0]) - 2.0) / MAD_TO_SIGMA
    assert torch.allclose(z[0, 0, :3], fg_z, atol=1e-5)
    assert torch.allclose(z[0, 0, 3:], fg_z.min().expand(2), atol=1e-5)


def test_robust_normalize_calibrated_uses_given_stats():
    maps = torch.tensor([[[1.0, 3.0], [5.0, 7.0]]])
    fg = torch.ones_like(maps, dtype=torch.bool)
    z = robust_normalize(maps, fg, torch.tensor(3.0), torch.tensor(2.0))
    assert torch.allclose(z, torch.tensor([[[-1.0, 0.0], [1.0, 2.0]]]))


@pytest.mark.parametrize("value", [0.0, 0.5, 1e6])
def test_uniform_maps_give_no_nan_or_inf(value):
    maps = torch.full((2, 16, 16), value)
    fg = torch.ones_like(maps, dtype=torch.bool)
    fg[1] = False  # an image without any foreground too
    for z in (
        robust_normalize(maps, fg),
        robust_normalize(maps, fg, torch.tensor(0.0), torch.tensor(0.0)),
    ):
        out = gaussian_smooth(z, 2.0)
        assert torch.isfinite(out).all()
        assert torch.isfinite(image_scores(out, fg)).all()
    assert torch.equal(robust_normalize(maps, fg)[0], torch.zeros(16, 16))


def test_fuse_maps_common_scale_and_zero_shot():
    text = torch.tensor([[[0.5, 0.7]]])
    nn = torch.tensor([[[0.1, 0.3]]])
    t_stats = (torch.tensor(0.5), torch.tensor(0.1))
    n_stats = (torch.tensor(0.1), torch.tensor(0.2))
    fused = fuse_maps(text, nn, 0.3, 0.7, t_stats, n_stats)
    # z_text = [0, 2], z_nn = [0, 1] -> 0.3 * z_text + 0.7 * z_nn
    assert torch.allclose(fused, torch.tensor([[[0.0, 0.3 * 2 + 0.7 * 1]]]))
    assert torch.equal(fuse_maps(text, None, 0.3, 0.7), text)
    assert torch.allclose(
        fuse_maps(text, nn, 0.0, 1.0, t_stats, n_stats), torch.tensor([[[0.0, 1.0]]])
    )


def test_gaussian_smooth_matches_scipy():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(2, 20, 24)).astype(np.float32)
    ours = gaussian_smooth(torch.from_numpy(maps), 2.0).numpy()
    for i in range(2):
        ref = ndimage.gaussian_filter(maps[i], 2.0, mode="mirror", truncate=3.0)
        assert np.allclose(ours[i], ref, atol=1e-5)
    assert torch.equal(gaussian_smooth(torch.from_numpy(maps), 0.0), torch.from_numpy(maps))


def test_gaussian_smooth_small_maps_do_not_crash():
    out = gaussian_smooth(torch.ones(1, 3, 3), 4.0)
    assert torch.allclose(out, torch.ones(1, 3, 3))


def test_upsample_keeps_constant_and_shape():
    up = upsample_maps(torch.full((2, 14, 14), 3.0), (224, 224))
    assert up.shape == (2, 224, 224) and torch.allclose(up, torch.tensor(3.0))


def test_image_scores_top_fraction_mean():
    maps = torch.arange(100.0).view(1, 10, 10)
    fg = torch.ones_like(maps, dtype=torch.bool)
    assert float(image_scores(maps, fg, 0.02)[0]) == pytest.approx(98.5)
    fg[0, 9] = False  # drop the top row of values 90..99
    assert float(image_scores(maps, fg, 0.02)[0]) == pytest.approx(88.5)


def _drawn_disc(h=120, w=160, center=(70, 60), radius=35):
    image = np.full((h, w, 3), (40, 40, 45), np.uint8)
    cv2.circle(image, center, radius, (200, 150, 90), -1)
    truth = np.zeros((h, w), np.uint8)
    cv2.circle(truth, center, radius, 1, -1)
    return image, truth.astype(bool)


def test_foreground_mask_on_drawn_object():
    image, truth = _drawn_disc()
    fg = foreground_mask(image, threshold=0.1)
    assert fg.shape == truth.shape
    # The mask is the object plus a deliberate margin of a few pixels (blur and
    # dilation), so defects on the object's edge stay inside it.
    assert fg[truth].mean() > 0.99  # the object is kept whole
    assert truth.sum() < fg.sum() < 1.3 * truth.sum()
    assert not fg[:5, :5].any()  # corners are background


def test_foreground_mask_texture_and_plain_image_are_all_foreground():
    image, _ = _drawn_disc()
    assert foreground_mask(image, texture=True).all()
    assert foreground_mask(np.full((50, 50, 3), 128, np.uint8)).all()


def test_foreground_mask_large_image_keeps_resolution():
    image, truth = _drawn_disc(h=600, w=800, center=(400, 300), radius=180)
    fg = foreground_mask(image)
    assert fg.shape == (600, 800)
    assert fg[truth].mean() > 0.99 and fg.sum() < 1.3 * truth.sum()


def test_find_hotspots_sorted_boxes_and_filters():
    m = np.zeros((40, 50), np.float32)
    m[2:6, 5:9] = 5.0  # area 16, peak 5
    m[20:30, 30:45] = 4.0  # area 150, peak 9 at one pixel
    m[25, 40] = 9.0
    m[38, 0] = 7.0  # a single pixel
    hs = find_hotspots(m, threshold=3.0, top_k=3, min_area_fraction=0.0)
    assert [h.peak for h in hs] == [9.0, 7.0, 5.0]
    assert hs[0].box == (30, 20, 45, 30) and hs[0].area == 150
    assert hs[2].box == (5, 2, 9, 6)
    assert hs[0].mean == pytest.approx((149 * 4 + 9) / 150)
    assert hs[0].area_fraction == pytest.approx(150 / 2000)
    # a minimum area drops the single pixel; top_k cuts the list
    hs = find_hotspots(m, 3.0, top_k=1, min_area_fraction=2 / 2000)
    assert [h.peak for h in hs] == [9.0]
    assert find_hotspots(m, threshold=10.0) == []


def test_find_hotspots_respects_foreground():
    m = np.zeros((10, 10), np.float32)
    m[0:3, 0:3] = 6.0
    fg = np.ones((10, 10), bool)
    fg[:5, :5] = False
    assert find_hotspots(m, 3.0, 3, 0.0, fg_mask=fg) == []
