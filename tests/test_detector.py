"""The detector end to end: API, input kinds, calibration, files, determinism, accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from winclip_nb import (
    ConfigError,
    DetectionResult,
    FittedClass,
    MemoryBankError,
    TextAnchors,
    WinCLIP,
)
from winclip_nb.bench.metrics import compute_metrics, pixel_auroc
from winclip_nb.core.calibration import patch_foreground
from winclip_nb.core.maps import gaussian_smooth, robust_normalize, robust_stats, upsample_maps
from winclip_nb.data import load_mask, load_mvtec_class

#: Measured on this test set (128 px synthetic, 6 train images, random-init ViT-B-16,
#: calibrated, 0.3 text + 0.7 NN): pixel AUROC disc 0.912, weave 0.908, washer 0.873,
#: mean 0.897; on `hole` defects alone above 0.97. A broken stage (e.g. a flipped map,
#: a wrong NN search, or a misaligned upsampling) lands near 0.5, far below these bars.
MIN_CLASS_PIXEL_AUROC = 0.80
MIN_MEAN_PIXEL_AUROC = 0.85
MIN_HOLE_PIXEL_AUROC = 0.93


#: Branch maps and outputs of ``detect_resized`` for the token method.
TOKEN_KEYS = {"text_map", "nn_map", "text_score", "fused_map", "raw_map", "anomaly_map",
              "fg_mask", "score", "normalization"}  # fmt: skip


@pytest.fixture(scope="module")
def disc_fitted(random_winclip, synthetic_root):
    """The disc class fitted on its 6 training images (the shared detector's ``fitted``
    is put back to what it was at the end of the module)."""
    data = load_mvtec_class(synthetic_root, "disc")
    anchors = random_winclip.build_text_anchors("disc")
    before = random_winclip.fitted
    fitted = random_winclip.build_normal_memory(data.train, *anchors, progress=False)
    yield data, anchors, fitted
    random_winclip.fitted = before


@pytest.fixture
def disc(random_winclip, disc_fitted):
    """(data, anchors) with the disc class as the detector's current class, as after
    ``build_normal_memory`` (tests that fit another class do not leak into the next)."""
    data, anchors, fitted = disc_fitted
    random_winclip.fitted = fitted
    return data, anchors


def _evaluate(winclip, data, anchors, **kwargs):
    results = winclip.detect([s.path for s in data.test], *anchors, **kwargs)
    masks = np.stack(
        [
            load_mask(s.mask_path, r.anomaly_map.shape)
            if s.mask_path is not None
            else np.zeros(r.anomaly_map.shape, bool)
            for s, r in zip(data.test, results, strict=True)
        ]
    )
    maps = np.stack([r.anomaly_map for r in results])
    return results, masks, maps


def _resized(winclip, paths):
    """(B, S, S, 3) uint8 at the model's input size."""
    return np.stack([winclip.prepare(p)[0] for p in paths])


def test_api_snippet_runs_offline(random_winclip, disc):
    data, (normal_anchor, anomalous_anchor) = disc
    result = random_winclip.detect(
        data.test[-1].path, normal_anchor, anomalous_anchor, text_weight=0.3, nn_weight=0.7
    )
    assert isinstance(result, DetectionResult)
    assert result.anomaly_map.shape == result.fg_mask.shape == (128, 128)
    assert result.text_map.shape == result.nn_map.shape == result.fused_map.shape == (14, 14)
    assert set(result.branch_maps) == {"text_map", "nn_map"} and result.method == "tokens"
    assert result.random_weights and result.normalization == "calibrated"
    assert np.isfinite(result.anomaly_map).all() and np.isfinite(result.score)
    assert 0.0 < result.text_score < 1.0 and result.extras == {}
    fg = random_winclip.compute_foreground_mask(data.test[-1].path, threshold=0.1)
    assert fg.shape == (128, 128) and 0.2 < fg.mean() < 0.9


def test_detect_resized_outputs_of_the_token_method(random_winclip, disc):
    data, anchors = disc
    images = _resized(random_winclip, [s.path for s in data.test[:2]])
    out = random_winclip.detect_resized(images, *anchors)
    assert set(out) == TOKEN_KEYS
    assert out["text_map"].shape == out["nn_map"].shape == out["fused_map"].shape == (2, 14, 14)
    assert out["raw_map"].shape == out["anomaly_map"].shape == out["fg_mask"].shape
    assert out["raw_map"].shape == (2, 224, 224) and out["fg_mask"].dtype == torch.bool
    assert out["score"].shape == out["text_score"].shape == (2,)
    # raw_map: the fused map upsampled, before normalisation
    assert torch.allclose(out["raw_map"], upsample_maps(out["fused_map"], (224, 224)))
    assert out["normalization"] == "calibrated"
    # zero-shot: no nn_map key at all (not None), and the text score is the image score
    with pytest.warns(UserWarning, match="per_image"):
        zero = random_winclip.detect_resized(images, fitted=FittedClass(anchors))
    assert set(zero) == TOKEN_KEYS - {"nn_map"} | {"raw_score"}
    assert torch.equal(zero["score"], zero["text_score"])
    assert torch.equal(zero["raw_score"], zero["text_score"])
    assert torch.equal(zero["text_map"], out["text_map"])
    assert zero["normalization"] == "per_image"


def test_inputs_of_every_kind_and_size(random_winclip, disc):
    _, anchors = disc
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (90, 150, 3), dtype=np.uint8)
    inputs = [
        rgb,
        rgb[..., 0],
        Image.fromarray(rgb).convert("RGBA"),
        Image.fromarray(rgb),
        rng.integers(0, 255, (300, 260, 3), dtype=np.uint8),
    ]
    results = random_winclip.detect(inputs, *anchors, batch_size=2)
    assert isinstance(results, list) and len(results) == 5
    assert [r.anomaly_map.shape for r in results] == [(90, 150)] * 4 + [(300, 260)]


def test_detect_batch_uint8_and_normalised_pixels_agree(random_winclip, disc):
    """The same images as (B, S, S, 3) uint8 or as (B, 3, S, S) float pixels normalised
    with the backbone's mean and std give the same maps, masks and scores."""
    data, anchors = disc
    fitted = random_winclip.fitted
    images = _resized(random_winclip, [s.path for s in data.test[-2:]])
    pixels = random_winclip.backbone.to_pixels(images)
    assert pixels.dtype == torch.float32 and pixels.shape == (2, 3, 224, 224)
    from_u8 = random_winclip.detect_batch(images, fitted)
    from_float = random_winclip.detect_batch(pixels, fitted)
    assert set(from_u8) == set(from_float) == TOKEN_KEYS
    assert not from_u8["fg_mask"].all()  # the disc's background is found in both
    for key in sorted(TOKEN_KEYS - {"normalization"}):
        assert torch.equal(from_u8[key], from_float[key]), key
    # and detect_resized takes both kinds the same way
    assert torch.equal(random_winclip.detect_resized(pixels, *anchors)["anomaly_map"],
                       from_u8["anomaly_map"])  # fmt: skip


def test_uniform_image_gives_finite_maps(random_winclip, disc):
    _, anchors = disc
    for value in (0, 255):
        r = random_winclip.detect(np.full((64, 64, 3), value, np.uint8), *anchors)
        assert np.isfinite(r.anomaly_map).all() and np.isfinite(r.score)


def test_calibration_gives_fewer_false_hotspots_on_good_images(random_winclip, disc):
    data, anchors = disc
    res_cal, _, _ = _evaluate(random_winclip, data, anchors, normalization="calibrated")
    res_pi, _, _ = _evaluate(random_winclip, data, anchors, normalization="per_image")
    good = [i for i, s in enumerate(data.test) if s.label == 0]
    bad = [i for i, s in enumerate(data.test) if s.label == 1]
    assert sum(len(res_cal[i].hotspots) for i in good) == 0
    assert sum(len(res_cal[i].hotspots) > 0 for i in bad) >= len(bad) // 2
    assert all(len(res_pi[i].hotspots) >= 0 for i in good)
    # per-image normalisation centres every image: good images' maps have median ~0
    medians = [np.median(res_pi[i].anomaly_map[res_pi[i].fg_mask]) for i in good]
    assert np.allclose(medians, 0.0, atol=0.3)


def test_calibration_statistics_live_in_the_fitted_class(random_winclip, disc):
    """``fitted.calibration``: the normal images' leave-one-image-out branch maps, their
    foreground, ``branch_stats`` (median, sigma) per branch used to fuse, and the fused
    maps' statistics used by the calibrated normalisation."""
    data, anchors = disc
    fitted = random_winclip.fitted
    cal = fitted.calibration
    n_train = len(data.train)
    assert set(cal.normal_maps) == set(cal.branch_stats) == {"text_map", "nn_map"}
    assert cal.normal_maps["nn_map"].shape == cal.normal_maps["text_map"].shape
    assert cal.normal_maps["nn_map"].shape == (n_train, 14, 14)
    assert cal.fg_masks.shape == (n_train, 224, 224) and cal.fg_masks.dtype == torch.bool
    assert 0.2 < float(cal.fg_masks.float().mean()) < 0.9  # disc: a real foreground
    patch_fg = patch_foreground(cal.fg_masks, (14, 14))
    for key in ("text_map", "nn_map"):
        median, sigma = robust_stats(cal.normal_maps[key][patch_fg])
        assert torch.equal(cal.branch_stats[key][0], median), key
        assert torch.equal(cal.branch_stats[key][1], sigma), key
        assert float(sigma) > 0
    # leave one image out: the normal images' NN distances are not ~0
    assert float(cal.normal_maps["nn_map"].median()) > 0.05
    # detection fuses with exactly these statistics ...
    images = _resized(random_winclip, [data.test[-1].path])
    out = random_winclip.detect_resized(images, *anchors, text_weight=0.4, nn_weight=0.6)
    (t_med, t_sig), (n_med, n_sig) = cal.branch_stats["text_map"], cal.branch_stats["nn_map"]
    z_text = (out["text_map"] - t_med) / t_sig
    z_nn = (out["nn_map"] - n_med) / n_sig
    assert torch.allclose(out["fused_map"], 0.4 * z_text + 0.6 * z_nn, atol=1e-5)

    # ... and normalises with the statistics of the normal maps fused the same way
    def fuse(maps):
        return random_winclip.scorer.fuse(maps, cal, 0.4, 0.6)

    center, scale = cal.map_stats((0.4, 0.6), fuse)
    expected = gaussian_smooth(robust_normalize(out["raw_map"], out["fg_mask"], center, scale),
                               random_winclip.config.sigma)  # fmt: skip
    assert torch.allclose(out["anomaly_map"], expected, atol=1e-5)
    # which differ from the default weights' statistics
    default = cal.map_stats((0.3, 0.7), lambda m: random_winclip.scorer.fuse(m, cal, 0.3, 0.7))
    assert (float(default[0]), float(default[1])) != (float(center), float(scale))


def test_fit_images_leaves_the_detector_as_it_is(random_winclip, disc):
    data, anchors = disc
    current = random_winclip.fitted
    two = random_winclip.fit_images(anchors, data.train[:2], coreset_ratio=0.5)
    assert random_winclip.fitted is current and random_winclip.memory is current.memory
    assert two.class_name == "disc" and two.anchors is anchors
    assert two.memory.size == 196  # 2 images x 196 patches x 0.5
    assert two.memory.metadata["n_images"] == 2 and two.calibration is not None
    zero = random_winclip.fit_images(anchors, [])
    assert zero.memory is None and zero.calibration is None and zero.anchors is anchors
    with pytest.raises(AttributeError):
        random_winclip.memory = None  # read-only: the memory belongs to the fitted class


def test_memory_save_load_gives_identical_results(random_winclip, disc, tmp_path):
    data, anchors = disc
    fitted = random_winclip.fitted
    before = random_winclip.detect(data.test[-1].path, *anchors)
    path = random_winclip.save_memory(tmp_path / "disc.safetensors")
    random_winclip.fitted = None
    loaded = random_winclip.load_memory(path)
    assert random_winclip.fitted is loaded and loaded.class_name == "disc"
    assert torch.equal(loaded.memory.bank, fitted.memory.bank)
    for key, (median, sigma) in fitted.calibration.branch_stats.items():
        assert torch.equal(loaded.calibration.branch_stats[key][0], median)
        assert torch.equal(loaded.calibration.branch_stats[key][1], sigma)
    after = random_winclip.detect(data.test[-1].path, *anchors)
    np.testing.assert_array_equal(before.anomaly_map, after.anomaly_map)
    # the file holds the anchors too: the loaded class alone is enough
    alone = random_winclip.detect(data.test[-1].path)
    np.testing.assert_array_equal(before.anomaly_map, alone.anomaly_map)
    assert torch.equal(loaded.anchors[0], anchors[0]) and torch.equal(loaded.anchors[1], anchors[1])


def test_save_without_memory_is_refused(random_winclip, disc, tmp_path):
    random_winclip.fitted = None
    with pytest.raises(MemoryBankError, match="no memory bank to save"):
        random_winclip.save_memory(tmp_path / "none.safetensors")
    with pytest.raises(ConfigError, match="no class to detect"):
        random_winclip.detect(disc[0].test[0].path)


def test_memory_from_other_layers_is_refused(disc, tmp_path, random_winclip):
    other = WinCLIP(device="cpu", pretrained="random", layers=[6, 9, 11])
    data, _ = disc
    anchors = other.build_text_anchors("disc")
    other.build_normal_memory(data.train[:2], *anchors, progress=False)
    path = other.save_memory(tmp_path / "other.safetensors")
    with pytest.raises(MemoryBankError, match="layers"):
        random_winclip.load_memory(path)


def test_zero_shot_uses_text_only(random_winclip, disc):
    data, anchors = disc
    random_winclip.fitted = None  # nothing fitted: the anchors alone (zero-shot)
    with pytest.warns(UserWarning, match="calibrated normalisation needs .*using per_image"):
        r = random_winclip.detect(data.test[0].path, *anchors, normalization="calibrated")
    assert r.nn_map is None and r.normalization == "per_image"
    assert set(r.branch_maps) == {"text_map"}
    assert r.score == pytest.approx(r.text_score)


def test_texture_rule_follows_the_anchors_class_name(random_winclip, disc):
    """Textures (weave) are all foreground: the class comes from the anchors, even
    unpacked into two tensors and passed on while another class (disc) is fitted."""
    data, disc_anchors = disc
    images = _resized(random_winclip, [data.test[-1].path])  # a disc: it has a background
    weave = random_winclip.build_text_anchors("weave")
    normal, anomalous = weave
    assert normal.class_name == anomalous.class_name == "weave"
    out = random_winclip.detect_resized(images, normal, anomalous)
    assert out["fg_mask"].all()
    assert not random_winclip.detect_resized(images, *disc_anchors)["fg_mask"].all()
    # the same through detect, the foreground helpers and fitting
    result = random_winclip.detect(data.test[-1].path, normal, anomalous)
    assert result.fg_mask.all()
    assert random_winclip.foreground(images, "weave", 0.1).all()
    assert not random_winclip.foreground(images, "disc", 0.1).all()
    assert random_winclip.compute_foreground_mask(data.test[-1].path, class_name="weave").all()
    fitted = random_winclip.fit_images(TextAnchors(normal, anomalous), data.train[:2])
    assert fitted.class_name == "weave" and fitted.calibration.fg_masks.all()
    # a class name given explicitly wins over the anchors'
    named = random_winclip.fitted_for(normal, anomalous, class_name="disc")
    assert named.class_name == "disc"


def test_same_seed_same_results(disc, random_winclip):
    data, anchors = disc
    a = random_winclip.detect(data.test[-1].path, *anchors)
    b = random_winclip.detect(data.test[-1].path, *anchors)
    np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
    # a memory rebuilt with the same seed is identical
    bank = random_winclip.memory.bank.clone()
    random_winclip.build_normal_memory(data.train, *anchors, progress=False)
    assert torch.equal(bank, random_winclip.memory.bank)
    # another seed picks another coreset
    other = random_winclip.fit_images(anchors, data.train, seed=1)
    assert other.memory.size == random_winclip.memory.size
    assert not torch.equal(bank, other.memory.bank)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"coreset_ratio": 0.0}, "coreset_ratio"),
        ({"coreset_ratio": 1.5}, "coreset_ratio"),
        ({"max_images": 0}, "max_images"),
    ],
)
def test_bad_memory_settings(random_winclip, disc, kwargs, match):
    data, anchors = disc
    with pytest.raises(ConfigError, match=match):
        random_winclip.build_normal_memory(data.train, *anchors, progress=False, **kwargs)


def test_weights_summing_to_zero_are_refused(random_winclip, disc):
    data, anchors = disc
    with pytest.raises(ConfigError, match="text_weight \\+ nn_weight"):
        random_winclip.detect(data.test[0].path, *anchors, text_weight=0.0, nn_weight=0.0)
    with pytest.raises(ConfigError, match="nn_weight"):
        random_winclip.detect(data.test[0].path, *anchors, nn_weight=-1.0)


def test_pixel_auroc_bar_on_synthetic_set(random_winclip, synthetic_root):
    """Fused calibrated maps localise synthetic defects well even with random weights."""
    per_class = {}
    for name in ("disc", "weave", "washer"):
        data = load_mvtec_class(synthetic_root, name)
        anchors = random_winclip.build_text_anchors(name)
        random_winclip.build_normal_memory(data.train, *anchors, progress=False)
        results, masks, maps = _evaluate(random_winclip, data, anchors)
        labels = [s.label for s in data.test]
        metrics = compute_metrics(labels, [r.score for r in results], masks, maps)
        per_class[name] = metrics["pixel_auroc"]
        hole = [i for i, s in enumerate(data.test) if s.defect in ("hole", "good")]
        assert pixel_auroc(masks[hole], maps[hole]) >= MIN_HOLE_PIXEL_AUROC, name
        # flipping the maps must destroy localisation (the metric is not vacuous)
        assert pixel_auroc(masks, maps[:, ::-1, ::-1]) < metrics["pixel_auroc"] - 0.1
    print(per_class)
    assert min(per_class.values()) >= MIN_CLASS_PIXEL_AUROC, per_class
    assert np.mean(list(per_class.values())) >= MIN_MEAN_PIXEL_AUROC, per_class
