"""AnomalyDINO: pure functions on hand-computed tensors, the timm weights resolver, the
scorer through the detector and the benchmark, and parity with anomalib 2.7's
``AnomalyDINOModel`` on the same random-init DINOv2 weights.

Parity needs the ``[parity]`` extra (``anomalib==2.7.0``); without it the parity tests
skip, unless ``WINCLIP_NB_REQUIRE_PARITY=1`` (set by ``make test``) makes that a failure.
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from winclip_nb import ConfigError, WinCLIP, WinCLIPConfig
from winclip_nb.core import anomalydino as dino
from winclip_nb.core.errors import WeightsError
from winclip_nb.data import list_images

#: fp32 tolerance of the parity checks (the issue's bar).
PARITY_ATOL = 1e-4
#: A change of method must move the maps or scores by clearly more than the tolerance.
MUTATION_MIN_DIFF = 1e-3
#: 224 px = a 16 x 16 grid: the top 1 % of 256 patches is 2 (floor), not 3 (ceil).
SIZE = 224


# ======================================================================================
# Pure functions
# ======================================================================================
def test_mean_top_fraction_floors_the_count() -> None:
    d = torch.arange(256.0).view(1, 256)
    assert float(dino.mean_top_fraction(d, 0.01)) == pytest.approx((255 + 254) / 2)
    assert float(dino.mean_top_fraction(d[:, :50], 0.01)) == 49.0  # at least one


def test_cosine_nn_distance_by_hand() -> None:
    q = F.normalize(torch.tensor([[[1.0, 1.0], [0.0, -1.0]]]), dim=-1)
    bank = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    expected = torch.tensor([[1 - 2**-0.5, 1.0]])
    assert torch.allclose(dino.cosine_nn_distance(q, bank), expected, atol=1e-6)


def _tokens_for(mask: np.ndarray, value: float = 40.0) -> torch.Tensor:
    """(1, N, 3) tokens whose first principal component is the mask."""
    t = torch.zeros(1, mask.size, 3)
    t[0, torch.from_numpy(mask.flatten()), 0] = value
    t[0, :, 1] = torch.linspace(-0.1, 0.1, mask.size)  # a weak second direction
    return t


def _mask_by_cv2(first: np.ndarray) -> np.ndarray:
    kernel = np.ones((3, 3), np.uint8)
    m = cv2.dilate(first.astype(np.uint8), kernel)
    return cv2.morphologyEx(m, cv2.MORPH_CLOSE, kernel).astype(bool)


@pytest.mark.parametrize("seed", range(4))
def test_pca_mask_morphology_matches_opencv(seed) -> None:
    rng = np.random.default_rng(seed)
    mask = np.zeros((12, 12), bool)
    mask[3:9, 2:10] = True
    mask &= rng.random((12, 12)) > 0.25  # holes the closing must fill
    mask[0, rng.integers(0, 12)] = True  # a stray patch at the border
    ours = dino.pca_background_mask(_tokens_for(mask), (12, 12)).view(12, 12).numpy()
    assert np.array_equal(ours, _mask_by_cv2(mask))


def test_pca_mask_takes_the_side_that_covers_the_centre() -> None:
    mask = np.zeros((12, 12), bool)
    mask[3:9, 3:9] = True  # the object fills most of the centre
    for sign in (1.0, -1.0):  # its side of the component, whichever sign PCA gives
        ours = dino.pca_background_mask(sign * _tokens_for(mask), (12, 12)).view(12, 12)
        assert bool(ours[6, 6]) and not bool(ours[0, 0])


# ======================================================================================
# The scorer through the detector
# ======================================================================================
@pytest.fixture(scope="module")
def detector():
    return WinCLIP(device="cpu", pretrained="random", method="anomalydino", image_size=SIZE)


@pytest.fixture(scope="module")
def images(synthetic_root, detector):
    paths = [list_images(synthetic_root / "disc" / "train" / "good")[i] for i in range(2)]
    paths += [list_images(synthetic_root / "disc" / "test" / "good")[0],
              list_images(synthetic_root / "disc" / "test" / "hole")[0]]
    return np.stack([detector.prepare(p)[0] for p in paths])  # (4, 224, 224, 3)


def test_defaults_are_the_papers() -> None:
    cfg = WinCLIPConfig(method="anomalydino")
    assert (cfg.model_name, cfg.image_size, cfg.layers, cfg.coreset_ratio) == (
        "vit_small_patch14_dinov2", 448, (11,), 1.0)
    assert cfg.score_top_fraction == 0.01


def test_backbone_shapes_and_bad_sizes(detector) -> None:
    tokens, cls = detector.backbone(np.zeros((2, SIZE, SIZE, 3), np.uint8))
    assert tokens.shape == (2, 1, 256, 384) and cls.shape == (2, 384)
    assert detector.backbone.grid_size == (16, 16)
    with pytest.raises(ConfigError, match="multiple of the patch size 14, got 230"):
        WinCLIP(device="cpu", pretrained="random", method="anomalydino", image_size=230)
    with pytest.raises(ConfigError, match="valid indices are 0..11"):
        WinCLIP(device="cpu", pretrained="random", method="anomalydino", layers=(12,))


def test_memory_keeps_every_patch_and_scores_by_hand(detector, images) -> None:
    fitted = detector.fit(detector.text_anchors("disc"), images[:1])
    assert fitted.memory.size == 256 and fitted.calibration is None  # k = 1: no calibration
    out = detector.detect_batch(images[2:], fitted, normalization="per_image")
    tokens, _ = detector.backbone(images)
    unit = F.normalize(tokens[:, 0], dim=-1)
    by_hand = (1 - (unit[2:] @ unit[0].T).amax(dim=-1)).clamp(0, 2)  # (2, 256)
    assert torch.allclose(out["nn_map"].flatten(1), by_hand, atol=1e-5)
    assert torch.allclose(out["score"], by_hand.topk(2, dim=1).values.mean(1), atol=1e-5)
    assert out["text_score"] is None
    # the reference itself is at distance 0 from its memory
    again = detector.detect_batch(images[:1], fitted, normalization="per_image")
    assert float(again["nn_map"].abs().max()) < 1e-5


def test_two_references_calibrate_leave_one_out(detector, images) -> None:
    fitted = detector.fit(detector.text_anchors("disc"), images[:2])
    assert fitted.memory.size == 512 and fitted.calibration is not None
    normal = fitted.calibration.normal_maps["nn_map"]
    assert float(normal.min()) > 0  # never its own patches


def test_zero_shot_and_fusion_weights_are_refused_clearly(detector, images) -> None:
    with pytest.raises(ConfigError, match="no zero-shot mode"):
        detector.detect_batch(images[2:], detector.fit(detector.text_anchors("disc"), images[:0]))
    fitted = detector.fit(detector.text_anchors("disc"), images[:1])
    with pytest.warns(UserWarning, match="fusion weights do not apply"):
        detector.detect_batch(images[2:], fitted, text_weight=0.5, normalization="per_image")


def test_coreset_is_optional(detector, images) -> None:
    fitted = detector.fit(detector.text_anchors("disc"), images[:2], coreset_ratio=0.25)
    assert fitted.memory.size == 128


def test_timm_weights_resolve_like_clip_ones(tmp_path, monkeypatch) -> None:
    from winclip_nb.hub import weights

    name = "vit_small_patch14_dinov2"
    assert weights.resolve_weights(name, "random", family="timm").random
    with pytest.raises(WeightsError, match="unknown pretrained tag 'nope'.*lvd142m"):
        weights.resolve_weights(name, "nope", family="timm")
    with pytest.raises(ConfigError, match="unknown timm model"):
        weights.resolve_weights("vit_nothing_like_it", "random", family="timm")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(weights, "cached_timm_file", lambda *a: None)
    with pytest.raises(WeightsError, match="winclip-nb prefetch"):
        weights.resolve_weights(name, "lvd142m", family="timm")
    auto = weights.resolve_weights(name, "auto", "lvd142m", family="timm")
    assert auto.random and "offline" in auto.label


def test_a_random_checkpoint_in_the_hub_cache_loads_offline(tmp_path, monkeypatch,
                                                             capsys) -> None:
    """The real loading path: timm's tag resolved from a (temporary) hub cache."""
    import timm
    from safetensors.torch import save_file

    from winclip_nb.hub import weights

    name, tag = "vit_small_patch14_dinov2", "lvd142m"
    torch.manual_seed(3)
    state = timm.create_model(name, pretrained=False, dynamic_img_size=True).state_dict()
    snapshot = tmp_path / "hub" / f"models--timm--{name}.{tag}" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, snapshot / "model.safetensors")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    assert weights.cached_timm_file(name, tag) == str(snapshot / "model.safetensors")
    model, resolved = weights.load_timm(name, tag)
    assert resolved.label == tag and not resolved.random
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"],
                       state["blocks.0.attn.qkv.weight"])
    # prefetch knows the method's model family: it finds the file, downloads nothing
    from winclip_nb import cli

    assert cli.main(["prefetch", "--method", "anomalydino", "--no-llava"]) == 0
    out = capsys.readouterr().out
    assert f"timm {name}/{tag}: already cached at {snapshot / 'model.safetensors'}" in out


def test_benchmark_runs_and_refuses_zero_shot(synthetic_root, tmp_path) -> None:
    from winclip_nb.bench.config import BenchmarkConfig
    from winclip_nb.bench.protocol import run_benchmark

    model = WinCLIPConfig(method="anomalydino", pretrained="random", image_size=112,
                          device="cpu")
    with pytest.raises(ConfigError, match="needs k_shot >= 1"):
        BenchmarkConfig(model=model, k_shot=0).validate()
    cfg = BenchmarkConfig(model=model, k_shot=1, data_root=str(synthetic_root),
                          classes=["disc"], out=str(tmp_path / "out"), workers=0)
    results = run_benchmark(cfg, progress=False)
    row = results["classes"]["disc"]
    assert 0 <= row["image_auroc"] <= 100 and row["n_memory_images"] == 1
    assert results["config"]["method"] == "anomalydino"


# ======================================================================================
# Parity with anomalib 2.7's AnomalyDINOModel (random DINOv2 ViT-S/14 at 224 px)
# ======================================================================================
def _require_anomalib():
    try:
        from anomalib.models.image.anomaly_dino import torch_model
    except ImportError as exc:
        if os.environ.get("WINCLIP_NB_REQUIRE_PARITY") == "1":
            pytest.fail(f"anomalib (the [parity] extra) is required here but missing: {exc}")
        pytest.skip("parity needs the [parity] extra: pip install -e '.[parity]'")
    return torch_model


def _parity_run(detector, images, masking: bool) -> dict:
    from winclip_nb.bench.parity import load_anomalib_anomalydino

    ours = WinCLIP(config=detector.config.replace(pca_mask=masking), backbone=detector.backbone)
    theirs = load_anomalib_anomalydino(ours, images[:1])
    fitted = ours.fit(ours.text_anchors("disc"), images[:1])
    out = ours.detect_batch(images[1:], fitted, normalization="per_image")
    with torch.no_grad():
        ref = theirs(ours.backbone.to_pixels(images[1:]))
        through_theirs = theirs.anomaly_map_generator(out["nn_map"][:, None], (SIZE, SIZE))
    return {"ours": ours, "theirs": theirs, "out": out, "ref": ref, "through": through_theirs,
            "fitted": fitted, "test": images[1:]}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


@pytest.fixture(scope="module")
def parity(detector, images):
    _require_anomalib()
    return _parity_run(detector, images, masking=False)


def test_parity_with_anomalib(parity, record_property) -> None:
    state = parity["theirs"].feature_encoder.feature_extractor.state_dict()
    ours_state = parity["ours"].backbone.model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in ours_state.items())
    map_diff = _max_diff(parity["through"], parity["ref"].anomaly_map)
    score_diff = _max_diff(parity["out"]["score"], parity["ref"].pred_score.flatten())
    record_property("anomalydino_parity", {"map": map_diff, "score": score_diff})
    print(f"\nAnomalyDINO 1-shot parity: max |map diff| {map_diff:.2e}, "
          f"max |score diff| {score_diff:.2e}")
    assert map_diff <= PARITY_ATOL and score_diff <= PARITY_ATOL
    assert float(parity["ref"].pred_score.std()) > MUTATION_MIN_DIFF  # not a constant


def test_parity_fails_when_the_rule_or_the_distance_changes(parity, monkeypatch) -> None:
    from winclip_nb.core.memory import l2_from_cosine, nearest_similarity

    ours, ref, memory = parity["ours"], parity["ref"], parity["fitted"].memory
    pixels = ours.backbone.to_pixels(parity["test"])

    def ceil_top(distances, fraction):  # the top 3 of 256 instead of 2
        k = int(np.ceil(distances.shape[-1] * fraction))
        return distances.topk(k, dim=-1).values.mean(dim=-1)

    monkeypatch.setattr(dino, "mean_top_fraction", ceil_top)
    changed = ours.scorer.score(pixels, None, memory)
    assert _max_diff(changed.image_score, ref.pred_score.flatten()) > MUTATION_MIN_DIFF
    monkeypatch.undo()

    def l2_distance(queries, bank, chunk_size=2048):  # sqrt(2 - 2 cos) instead of 1 - cos
        return l2_from_cosine(nearest_similarity(queries, bank, chunk_size))

    monkeypatch.setattr(dino, "cosine_nn_distance", l2_distance)
    changed = ours.scorer.score(pixels, None, memory)
    with torch.no_grad():
        through = parity["theirs"].anomaly_map_generator(changed.branches["nn_map"][:, None],
                                                         (SIZE, SIZE))
    assert _max_diff(through, ref.anomaly_map) > MUTATION_MIN_DIFF


@pytest.mark.parametrize("seed", range(3))
def test_masking_rule_matches_anomalibs_on_built_tokens(seed) -> None:
    torch_model = _require_anomalib()
    rng = np.random.default_rng(seed)
    mask = np.zeros((12, 12), bool)
    mask[2:10, 3:9] = rng.random((8, 6)) > 0.2
    tokens = _tokens_for(mask, value=float(rng.choice([-40.0, 40.0])))
    theirs = torch_model.AnomalyDINOModel.compute_background_masks(tokens.numpy(), (12, 12))
    assert np.array_equal(dino.pca_background_mask(tokens, (12, 12)).numpy(), theirs)


def test_masking_parity_on_model_tokens(detector, images, record_property) -> None:
    """Masks first (anomalib's PCA is randomized, without a seed), then the masked maps."""
    torch_model = _require_anomalib()
    tokens, _ = detector.backbone(images)
    theirs = torch_model.AnomalyDINOModel.compute_background_masks(tokens[:, -1].numpy(),
                                                                   (16, 16))
    ours = dino.pca_background_mask(tokens[:, -1], (16, 16)).numpy()
    agree = float((ours == theirs).mean())
    record_property("pca_mask_agreement", agree)
    print(f"\nPCA masks: {agree:.1%} of patches agree; foreground {ours.mean():.1%}")
    assert agree == 1.0 and 0 < ours.mean() < 1  # a real mask, the same one
    run = _parity_run(detector, images, masking=True)
    map_diff = _max_diff(run["through"], run["ref"].anomaly_map)
    score_diff = _max_diff(run["out"]["score"], run["ref"].pred_score.flatten())
    print(f"masked 1-shot parity: max |map diff| {map_diff:.2e}, score {score_diff:.2e}")
    assert map_diff <= PARITY_ATOL and score_diff <= PARITY_ATOL
