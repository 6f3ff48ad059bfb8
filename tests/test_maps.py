"""Stage 04: fusion, MAD normalisation, calibration, smoothing, score, foreground, hotspots."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from scipy import ndimage

from winclip_nb.core.calibration import Calibration, patch_foreground, resolve_normalization
from winclip_nb.core.config import DEFAULTS
from winclip_nb.core.maps import (
    MAD_TO_SIGMA,
    MIN_SCALE,
    TEXTURE_CLASSES,
    fill_holes,
    find_hotspots,
    foreground_mask,
    fuse_maps,
    gaussian_smooth,
    image_scores,
    is_texture,
    robust_normalize,
    robust_stats,
    upsample_maps,
    zscore,
)

#: The pipeline's defaults (``foreground_mask`` and ``image_scores`` take them explicitly).
FG_THRESHOLD = DEFAULTS.fg_threshold
TOP_FRACTION = DEFAULTS.score_top_fraction


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
        assert torch.isfinite(image_scores(out, fg, TOP_FRACTION)).all()
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


def test_zscore_with_and_without_stats():
    x = torch.tensor([[[1.0, 3.0]]])
    assert zscore(x, None) is x
    assert torch.allclose(zscore(x, (torch.tensor(1.0), torch.tensor(2.0))),
                          torch.tensor([[[0.0, 1.0]]]))  # fmt: skip


# ======================================================================================
# Calibration: statistics of the normal images' own maps
# ======================================================================================
def _calibration_inputs():
    """Two normal images, 2 x 2 patch grid, 4 x 4 pixel masks. Image 1's bottom-right
    quadrant is background, so its patch (1, 1) must not count."""
    maps = {
        "text_map": torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, -1000.0]]]),
        "nn_map": torch.tensor([[[0.1, 0.2], [0.3, 0.4]], [[0.5, 0.6], [0.7, 9.0]]]),
    }
    fg = torch.ones(2, 4, 4, dtype=torch.bool)
    fg[1, 2:, 2:] = False
    return maps, fg


def test_patch_foreground_needs_half_of_a_patch():
    _, fg = _calibration_inputs()
    assert patch_foreground(fg, (2, 2)).tolist() == [[[True, True], [True, True]],
                                                     [[True, True], [True, False]]]  # fmt: skip
    quarter = torch.zeros(1, 4, 4, dtype=torch.bool)
    quarter[0, 0, 0] = True  # a quarter of patch (0, 0): not foreground
    half = quarter.clone()
    half[0, 1, 0] = True  # half of it: foreground
    assert not patch_foreground(quarter, (2, 2)).any()
    assert patch_foreground(half, (2, 2))[0].tolist() == [[True, False], [False, False]]


def test_calibration_branch_stats_by_hand():
    maps, fg = _calibration_inputs()
    cal = Calibration.from_normal_maps(maps, fg)
    assert set(cal.branch_stats) == {"text_map", "nn_map"}
    # text: foreground patches 1..7 -> median 4, MAD 2 (the -1000 is background)
    median, sigma = cal.branch_stats["text_map"]
    assert float(median) == 4.0 and float(sigma) == pytest.approx(2 * MAD_TO_SIGMA)
    # nn: 0.1..0.7 -> median 0.4, MAD 0.2 (the 9.0 is background)
    median, sigma = cal.branch_stats["nn_map"]
    assert float(median) == pytest.approx(0.4) and float(sigma) == pytest.approx(0.2 * MAD_TO_SIGMA)
    assert cal.fg_masks.dtype == torch.bool and torch.equal(cal.fg_masks, fg)
    assert cal.normal_maps.keys() == maps.keys()
    # the fusion of the branches uses exactly these statistics
    stats = cal.branch_stats
    fused = fuse_maps(
        maps["text_map"], maps["nn_map"], 0.3, 0.7, stats["text_map"], stats["nn_map"]
    )
    z_text = (maps["text_map"] - 4.0) / (2 * MAD_TO_SIGMA)
    z_nn = (maps["nn_map"] - 0.4) / (0.2 * MAD_TO_SIGMA)
    assert torch.allclose(fused, 0.3 * z_text + 0.7 * z_nn, atol=1e-5)


def test_calibration_map_stats_over_foreground_pixels_and_remembered():
    maps, fg = _calibration_inputs()
    cal = Calibration.from_normal_maps(maps, fg)
    calls = []

    def per_image_constant(branches):
        calls.append(1)
        # image 0 is 1.0 everywhere, image 1 is 3.0: exact after bilinear upsampling
        return torch.ones_like(branches["text_map"]) * torch.tensor([1.0, 3.0])[:, None, None]

    median, sigma = cal.map_stats((0.3, 0.7), per_image_constant)
    # 16 foreground pixels of 1.0 and 12 of 3.0: median 1, MAD 0 -> the std fallback
    values = np.array([1.0] * 16 + [3.0] * 12)
    assert float(median) == 1.0 and float(sigma) == pytest.approx(values.std(), rel=1e-5)
    # remembered per key: the same key does not fuse again, another key does
    assert cal.map_stats((0.3, 0.7), lambda b: 1 / 0) == (median, sigma)
    assert len(calls) == 1
    assert float(cal.map_stats("other", lambda b: b["text_map"])[0]) != 1.0
    # constant normal maps: the scale is floored, never zero
    flat = Calibration.from_normal_maps({"nn_map": torch.zeros(2, 2, 2)}, fg)
    assert float(flat.branch_stats["nn_map"][1]) == pytest.approx(MIN_SCALE)


def test_resolve_normalization_falls_back_without_calibration():
    maps, fg = _calibration_inputs()
    cal = Calibration.from_normal_maps(maps, fg)
    with pytest.warns(UserWarning, match="using per_image"):
        assert resolve_normalization("calibrated", None) == "per_image"
    assert resolve_normalization("calibrated", cal) == "calibrated"
    assert resolve_normalization("per_image", None) == "per_image"


def test_gaussian_smooth_matches_scipy():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(2, 20, 24)).astype(np.float32)
    ours = gaussian_smooth(torch.from_numpy(maps), 2.0).numpy()
    for i in range(2):
        ref = ndimage.gaussian_filter(maps[i], 2.0, mode="mirror", truncate=3.0)
        assert np.allclose(ours[i], ref, atol=1e-5)
    assert torch.equal(gaussian_smooth(torch.from_numpy(maps), 0.0), torch.from_numpy(maps))


def test_gaussian_smooth_large_non_square_maps_match_scipy():
    """One (matrix) path for every size, including maps larger than the old conv limit."""
    maps = np.random.default_rng(1).normal(size=(1, 300, 260)).astype(np.float32)
    ours = gaussian_smooth(torch.from_numpy(maps), 4.0).numpy()[0]
    ref = ndimage.gaussian_filter(maps[0], 4.0, mode="mirror", truncate=3.0)
    assert np.allclose(ours, ref, atol=1e-5)


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


def test_texture_classes_and_plain_image_are_all_foreground():
    """Textures get no mask: ``is_texture`` decides (the detector then skips the mask,
    see test_detector); a plain image, where the mask fails, is all foreground."""
    assert is_texture("weave") and is_texture("Carpet") and is_texture(" wood ")
    assert not is_texture("disc") and not is_texture("screw") and not is_texture(None)
    assert {"carpet", "grid", "leather", "tile", "wood", "weave"} == TEXTURE_CLASSES
    assert foreground_mask(np.full((50, 50, 3), 128, np.uint8), FG_THRESHOLD).all()


def test_fill_holes_matches_scipy():
    rng = np.random.default_rng(0)
    for _ in range(5):
        mask = rng.random((30, 40)) > 0.55
        expected = ndimage.binary_fill_holes(mask)
        assert np.array_equal(fill_holes(mask).astype(bool), expected)


def test_foreground_mask_large_image_keeps_resolution():
    image, truth = _drawn_disc(h=600, w=800, center=(400, 300), radius=180)
    fg = foreground_mask(image, FG_THRESHOLD)
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
    assert find_hotspots(m, 10.0, DEFAULTS.top_k, DEFAULTS.min_hotspot_area) == []


def test_find_hotspots_respects_foreground():
    m = np.zeros((10, 10), np.float32)
    m[0:3, 0:3] = 6.0
    fg = np.ones((10, 10), bool)
    fg[:5, :5] = False
    assert find_hotspots(m, 3.0, 3, 0.0, fg_mask=fg) == []
