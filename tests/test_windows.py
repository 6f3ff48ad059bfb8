"""The windows method (WinCLIP / WinCLIP+): pure functions against hand-computed tensors,
the encoder against a sequence run by hand, and parity with anomalib 2.7's WinClipModel
on the same random-init weights.

Parity needs the ``[parity]`` extra (``anomalib==2.7.0``). Without it the parity tests
skip, unless ``WINCLIP_NB_REQUIRE_PARITY=1`` (set by ``make test``) turns that into a
failure.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from winclip_nb import ConfigError, FittedClass, MemoryBankError, TextAnchors, WinCLIPConfig
from winclip_nb.bench.parity import load_anomalib_winclip
from winclip_nb.core import windows as win
from winclip_nb.core.anchors import anomaly_probability, average_anchor, build_prompts
from winclip_nb.core.scorers import scorer_class
from winclip_nb.core.windows import (
    WINCLIP_ANOMALOUS_STATES,
    WINCLIP_NORMAL_STATES,
    WINCLIP_TEMPLATES,
    harmonic_aggregation,
    visual_association_score,
)
from winclip_nb.data import list_images

#: fp32 tolerance of the parity checks (the issue's bar).
PARITY_ATOL = 1e-4
#: A change of method must move the maps by clearly more than the tolerance.
MUTATION_MIN_DIFF = 1e-3
#: What ``detect_resized`` gives for the windows method (few-shot; zero-shot lacks
#: ``few_shot_map``). Never the token method's ``text_map`` / ``nn_map``.
WINDOW_KEYS = {"zero_shot_map", "few_shot_map", "text_score", "fused_map", "raw_map",
               "raw_score", "anomaly_map", "fg_mask", "score", "normalization"}  # fmt: skip


# ======================================================================================
# Pure functions
# ======================================================================================
def test_window_indices_3x3_scale_2() -> None:
    expected = torch.tensor([[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]])
    assert torch.equal(win.window_indices((3, 3), 2), expected)


def test_window_indices_counts_and_bounds() -> None:
    assert win.window_indices((15, 15), 2).shape == (196, 4)
    assert win.window_indices((15, 15), 3).shape == (169, 9)
    assert win.window_indices((2, 4), 2, stride=2).tolist() == [[0, 1, 4, 5], [2, 3, 6, 7]]
    with pytest.raises(ConfigError, match="between 1 and 3"):
        win.window_indices((3, 5), 4)


def test_window_coverage_counts() -> None:
    cover = win.window_coverage(win.window_indices((3, 3), 2), 9)
    # corners are in one window, edge middles in two, the centre in all four
    assert cover.sum(dim=1).tolist() == [1, 2, 1, 2, 4, 2, 1, 2, 1]


def test_harmonic_aggregation_by_hand() -> None:
    cover = win.window_coverage(win.window_indices((3, 3), 2), 9)
    scores = torch.tensor([[1.0, 0.5, 0.25, 0.2]])
    out = win.harmonic_aggregation(scores, cover)
    # patch 1 (top middle) lies in windows 0 and 1: 2 / (1 + 2) ; centre: 4 / (1+2+4+5)
    expected = torch.tensor([[1.0, 2 / 3, 0.5, 2 / 5, 4 / 12, 2 / 7, 0.25, 2 / 9, 0.2]])
    assert torch.allclose(out, expected)
    # a zero window score zeroes exactly the patches it covers, never NaN
    zeroed = win.harmonic_aggregation(torch.tensor([[0.0, 0.5, 0.25, 0.2]]), cover)
    assert torch.isfinite(zeroed).all()
    assert zeroed[0, 0] == 0 and zeroed[0, 4] == 0 and zeroed[0, 2] == pytest.approx(0.5)


def test_harmonic_mean_and_class_scores_by_hand() -> None:
    assert torch.allclose(win.harmonic_mean(torch.tensor([[1.0], [0.25]])), torch.tensor([0.4]))
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # cos to (normal, anomalous) = (0, 1): softmax([0, 1/0.5])[1] = 1 / (1 + e^-2)
    p = anomaly_probability(torch.tensor([[0.0, 3.0]]), text, temperature=0.5)
    assert p.item() == pytest.approx(1 / (1 + np.exp(-2.0)), abs=1e-6)


def test_visual_association_with_and_without_groups() -> None:
    e = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [-1.0, 0.0]]])  # B=2, Q=2
    refs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = win.visual_association_score(e, refs, chunk_size=3)  # chunks cross the batch
    half = float((1 - np.sqrt(0.5)) / 2)
    assert torch.allclose(out, torch.tensor([[0.0, 0.0], [half, 0.5]]), atol=1e-6)
    # reference 0 belongs to image 0 and reference 1 to image 1: each must use the other
    # (image 1's query (-1, 0) is then opposite to its only reference: (1 - (-1)) / 2 = 1)
    grouped = win.visual_association_score(e, refs, torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert torch.allclose(grouped, torch.tensor([[0.5, 0.0], [half, 1.0]]), atol=1e-6)


def test_combine_scores() -> None:
    zero = torch.full((1, 2, 2), 0.4)
    few = torch.tensor([[[0.0, 0.2], [0.1, 0.6]]])
    grid, score = win.combine_scores(zero, torch.tensor([0.3]), few)
    assert torch.allclose(grid, (zero + few) / 2)
    assert score.item() == pytest.approx(0.45)
    same, s = win.combine_scores(zero, torch.tensor([0.3]), None)
    assert same is zero and s.item() == pytest.approx(0.3)


def test_window_memory_reference_ids_and_layout() -> None:
    emb = win.WindowEmbeddings(torch.randn(2, 5), torch.randn(2, 9, 6),
                               [torch.randn(2, 4, 5), torch.randn(2, 1, 5)])  # fmt: skip
    memory = win.WindowMemory.from_embeddings(emb, {"window_scales": [2, 3]})
    assert memory.n_references == 2 and memory.size == 18
    assert torch.equal(memory.patch_bank, emb.patches.reshape(18, 6))
    ids = memory.reference_ids
    assert ids["patches"].tolist() == [0] * 9 + [1] * 9
    assert ids["windows_0"].tolist() == [0] * 4 + [1] * 4 and ids["windows_1"].tolist() == [0, 1]
    with pytest.raises(MemoryBankError, match="cannot hold 4 reference images"):
        win.WindowMemory(torch.randn(18, 6), [], n_references=4)


def test_winclip_prompt_ensemble_sizes() -> None:
    normal, anomalous = build_prompts(
        "screw", WINCLIP_NORMAL_STATES, WINCLIP_ANOMALOUS_STATES, WINCLIP_TEMPLATES
    )
    assert len(WINCLIP_TEMPLATES) == 21 and len(normal) == 7 * 21 and len(anomalous) == 4 * 21
    assert "a cropped photo of the damaged screw." in anomalous


def test_config_for_windows_and_errors() -> None:
    cfg = WinCLIPConfig(method="windows")
    assert (cfg.model_name, cfg.image_size, cfg.text_temperature) == (
        "ViT-B-16-plus-240",
        240,
        0.07,
    )
    # the weights tag is the method's, resolved when loading
    assert cfg.pretrained is None and scorer_class("windows").default_weights == "laion400m_e31"
    assert scorer_class("windows").preset == {
        "model_name": "ViT-B-16-plus-240",
        "image_size": 240,
        "layers": (9, 10, 11),
        "text_temperature": 0.07,
        "coreset_ratio": 1.0,  # WinCLIP+ keeps every patch and window
    }
    # explicit settings win over the preset
    assert WinCLIPConfig(method="windows", image_size=112).image_size == 112
    with pytest.raises(ConfigError, match="method must be one of"):
        WinCLIPConfig(method="patches")
    with pytest.raises(ConfigError, match="window_scales"):
        WinCLIPConfig(window_scales=(2, 2))
    with pytest.raises(ConfigError, match="window_scales"):
        cfg.replace(window_scales=())


# ======================================================================================
# Encoder and detector (small input: 112 px -> 7 x 7 grid)
# ======================================================================================
@pytest.fixture(scope="module")
def small_windows():
    from winclip_nb import WinCLIP

    return WinCLIP(device="cpu", pretrained="random", method="windows", image_size=112)


def test_windows_model_at_another_size_builds_that_grid() -> None:
    """224 px is ViT-B-16's own size but not ViT-B-16-plus-240's: the model must be
    rebuilt for it (a 14 x 14 grid), not left at 240 px with images resized to 224."""
    from winclip_nb.hub.weights import load_open_clip, native_image_size

    assert native_image_size("ViT-B-16-plus-240") == 240
    model, _, _ = load_open_clip("ViT-B-16-plus-240", "random", image_size=224)
    assert tuple(model.visual.grid_size) == (14, 14)
    model, _, _ = load_open_clip("ViT-B-16", "random", image_size=224)
    assert tuple(model.visual.grid_size) == (14, 14)


def test_encoder_matches_one_window_run_by_hand(small_windows) -> None:
    encoder = small_windows.scorer.encoder
    visual = encoder.visual
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 112, 112, 3), dtype=np.uint8)
    pixels = small_windows.backbone.to_pixels(images)
    with torch.inference_mode():
        emb = encoder(pixels)
        # image 1, scale 3, window 5 (top-left patch (0, 5)), as one sequence of its own
        tokens = encoder.embed(pixels[1:2])
        idx = win.window_indices(encoder.grid_size, 3)[5]
        seq = torch.cat([tokens[:, :1], tokens[:, 1:][:, idx]], dim=1)
        out = visual.ln_post(visual.transformer(visual.ln_pre(seq)))
        by_hand = out[0, 0] @ visual.proj
        whole = visual(pixels)  # open_clip's own forward: the image embedding
    assert [w.shape for w in emb.windows] == [(2, 36, 640), (2, 25, 640)]
    assert emb.patches.shape == (2, 49, 896)
    assert torch.allclose(emb.windows[1][1, 5], by_hand, atol=1e-5)
    assert torch.allclose(emb.image, whole, atol=1e-5)
    # windows differ from each other (a batch-layout slip makes them all equal)
    assert emb.windows[0][0].std(dim=0).mean() > 1e-3
    # the scorer's batched embedding gives the same (float32) embeddings
    batched = small_windows.scorer.embed(pixels)
    assert torch.allclose(batched.windows[1], emb.windows[1], atol=1e-6)
    assert torch.allclose(batched.image, emb.image, atol=1e-6)


def _test_images(wc, synthetic_root, train):
    """A reference image itself and a defective ('hole') image, at the model's size."""
    hole = list_images(synthetic_root / "disc" / "test" / "hole")[0]
    return np.stack([wc.prepare(train[0])[0], wc.prepare(hole)[0]])


def test_windows_detect_memory_and_bank_file(small_windows, synthetic_root, tmp_path) -> None:
    wc = small_windows
    normal, anomalous = wc.build_text_anchors("disc")
    train = list_images(synthetic_root / "disc" / "train" / "good")[:3]
    images = _test_images(wc, synthetic_root, train)
    wc.fitted = None
    with pytest.warns(UserWarning, match="per_image"):
        zero = wc.detect_resized(images, normal, anomalous)
    assert set(zero) == WINDOW_KEYS - {"few_shot_map"}
    assert "few_shot_map" not in zero and zero["normalization"] == "per_image"
    assert torch.equal(zero["score"], zero["raw_score"])
    assert torch.equal(zero["score"], zero["text_score"])  # zero-shot: the image score
    # the fused map is the zero-shot map itself
    assert torch.equal(zero["fused_map"], zero["zero_shot_map"])
    fitted = wc.build_normal_memory(train, normal, anomalous, progress=False)
    assert wc.fitted is fitted and fitted.class_name == "disc"
    assert fitted.memory.size == 3 * 49 and fitted.memory.n_references == 3
    # k = 3 references: the calibration holds their leave-one-image-out maps
    cal = fitted.calibration
    assert set(cal.branch_stats) == {"zero_shot_map", "few_shot_map"}
    assert cal.normal_maps["zero_shot_map"].shape == cal.normal_maps["few_shot_map"].shape
    assert cal.normal_maps["few_shot_map"].shape == (3, 7, 7)
    assert float(cal.normal_maps["few_shot_map"].min()) > 1e-4  # never matched with itself
    few = wc.detect_resized(images, normal, anomalous)
    assert set(few) == WINDOW_KEYS
    assert few["normalization"] == "calibrated"
    # the first test image is a reference itself: its few-shot patch distances are ~0
    assert few["few_shot_map"][0].max() < 1e-4 < few["few_shot_map"][1].max()
    # WinCLIP+'s fusion: the mean of the two maps; its image score: mean of the
    # zero-shot score and the few-shot map's maximum
    assert torch.allclose(few["fused_map"], (few["zero_shot_map"] + few["few_shot_map"]) / 2)
    expected = (few["text_score"] + few["few_shot_map"].amax(dim=(-2, -1))) / 2
    assert torch.allclose(few["raw_score"], expected) and torch.equal(few["score"], expected)
    assert torch.equal(few["zero_shot_map"], zero["zero_shot_map"])
    assert few["raw_map"].shape == (2, 112, 112) and torch.isfinite(few["anomaly_map"]).all()
    path = wc.save_memory(tmp_path / "windows.safetensors")
    wc.fitted = None
    loaded = wc.load_memory(path)
    assert loaded.memory.n_references == 3 and loaded.calibration is not None
    again = wc.detect_resized(images, normal, anomalous)
    assert torch.equal(again["raw_map"], few["raw_map"])
    assert torch.equal(again["anomaly_map"], few["anomaly_map"])
    result = wc.detect(train[0], normal, anomalous)
    assert result.method == "windows" and "raw_score" in result.extras
    assert set(result.branch_maps) == {"zero_shot_map", "few_shot_map"}
    assert result.text_map is None and result.nn_map is None
    # fewer than two references: no calibration, so per_image with a warning
    one = wc.fit_images(wc.build_text_anchors("disc"), train[:1])
    assert one.calibration is None and one.memory.n_references == 1
    with pytest.warns(UserWarning, match="per_image"):
        assert wc.detect_resized(images, fitted=one)["normalization"] == "per_image"
    wc.fitted = None


def test_windows_warns_that_fusion_weights_do_not_apply(small_windows, synthetic_root) -> None:
    wc = small_windows
    anchors = wc.build_text_anchors("disc")
    train = list_images(synthetic_root / "disc" / "train" / "good")[:2]
    images = _test_images(wc, synthetic_root, train)
    fitted = wc.fit_images(anchors, train)
    plain = wc.detect_resized(images, fitted=fitted)
    with pytest.warns(UserWarning, match="fusion weights do not apply to method 'windows'"):
        weighted = wc.detect_resized(images, fitted=fitted, text_weight=0.9, nn_weight=0.1)
    # ... and indeed change nothing
    assert torch.equal(weighted["anomaly_map"], plain["anomaly_map"])
    assert torch.equal(weighted["fused_map"], plain["fused_map"])


def test_windows_texture_rule_follows_the_anchors(small_windows, synthetic_root) -> None:
    wc = small_windows
    train = list_images(synthetic_root / "disc" / "train" / "good")[:1]
    images = _test_images(wc, synthetic_root, train)
    normal, anomalous = wc.build_text_anchors("weave")
    with pytest.warns(UserWarning, match="per_image"):
        weave = wc.detect_resized(images, normal, anomalous)
    assert weave["fg_mask"].all()
    with pytest.warns(UserWarning, match="per_image"):
        disc = wc.detect_resized(images, *wc.build_text_anchors("disc"))
    assert not disc["fg_mask"].all()


def test_windows_refuses_token_memory_and_other_scales(small_windows, random_winclip, tmp_path,
                                                      synthetic_root) -> None:  # fmt: skip
    wc = small_windows
    train = list_images(synthetic_root / "disc" / "train" / "good")[:2]
    token_anchors = random_winclip.build_text_anchors("disc")
    before = random_winclip.fitted
    try:
        token_fitted = random_winclip.build_normal_memory(train, *token_anchors, progress=False)
        path = random_winclip.save_memory(tmp_path / "tokens.safetensors")
    finally:
        random_winclip.fitted = before
    with pytest.raises(
        MemoryBankError, match="built with method='tokens', but this model uses method='windows'"
    ):
        wc.load_memory(path)
    anchors = wc.build_text_anchors("disc")
    images = np.stack([wc.prepare(train[0])[0]])
    with pytest.raises(MemoryBankError, match="method='tokens'"):
        wc.detect_resized(images, fitted=FittedClass(anchors, token_fitted.memory))
    # a window memory built with other scales is refused, in memory and from a file
    fitted = wc.fit_images(anchors, train)
    other = dataclasses.replace(fitted.memory, metadata={**fitted.memory.metadata,
                                                         "window_scales": [2]})  # fmt: skip
    with pytest.raises(MemoryBankError, match=r"scales \(2,\), but this model uses \(2, 3\)"):
        wc.detect_resized(images, fitted=FittedClass(anchors, other))
    from winclip_nb.data.banks import save_fitted

    settings = {"method": "windows", "model_name": wc.config.model_name,
                "weights": wc.weights_label, "layers": list(wc.config.layers),
                "image_size": 112, "window_scales": [2]}  # fmt: skip
    path = save_fitted(FittedClass(anchors, other), tmp_path / "scales.safetensors", settings)
    with pytest.raises(MemoryBankError, match=r"window_scales=\[2\].*window_scales=\[2, 3\]"):
        wc.load_memory(path)
    # and the token method refuses a window memory the same way
    with pytest.raises(MemoryBankError, match="method='windows'"):
        random_winclip.detect_resized(
            np.stack([random_winclip.prepare(train[0])[0]]),
            fitted=FittedClass(token_anchors, fitted.memory),
        )
    assert wc.fitted is None


# ======================================================================================
# Parity with anomalib 2.7 (ViT-B-16-plus-240, 240 px, random weights)
# ======================================================================================
def _import_anomalib():
    try:
        from anomalib.models.image.winclip import torch_model
    except ImportError as exc:
        if os.environ.get("WINCLIP_NB_REQUIRE_PARITY") == "1":
            pytest.fail(f"anomalib (the [parity] extra) is required here but missing: {exc}")
        pytest.skip("parity needs the [parity] extra: pip install -e '.[parity]'")
    return torch_model


@pytest.fixture(scope="module")
def parity(synthetic_root):
    """Both models on identical weights, one batch of 2 test images and 1 reference."""
    torch_model = _import_anomalib()
    from winclip_nb import WinCLIP

    ours = WinCLIP(device="cpu", pretrained="random", method="windows", seed=0)
    assert ours.config.image_size == 240 and ours.config.model_name == torch_model.BACKBONE
    theirs = load_anomalib_winclip(ours)  # random init, our state dict, layout adapter
    state = theirs.clip.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in ours.backbone.model.state_dict().items())

    class_name = "disc"
    paths = [
        list_images(synthetic_root / class_name / "test" / "good")[0],
        list_images(synthetic_root / class_name / "test" / "hole")[0],
    ]
    reference = list_images(synthetic_root / class_name / "train" / "good")[0]
    images = np.stack([ours.prepare(p)[0] for p in paths])  # (2, 240, 240, 3) uint8
    ref_image = ours.prepare(reference)[0]
    pixels = ours.backbone.to_pixels(images)
    ref_pixels = ours.backbone.to_pixels(ref_image[None])

    normal, anomalous = ours.build_text_anchors(class_name)
    theirs.setup(class_name)
    assert ours.fitted is None
    with pytest.warns(UserWarning, match="per_image"):
        zero_ours = ours.detect_resized(images, normal, anomalous)
    zero_theirs = theirs(pixels)
    ours.build_normal_memory([ref_image], normal, anomalous, progress=False)
    one_ours = ours.detect_resized(images, normal, anomalous, normalization="per_image")
    theirs.setup(reference_images=ref_pixels)
    one_theirs = theirs(pixels)
    embeddings = ours.scorer.embed(pixels)
    return {
        "ours": ours,
        "theirs": theirs,
        "ref_pixels": ref_pixels,
        "anchors": (normal, anomalous),
        "class_name": class_name,
        "embeddings": embeddings,
        "pixels": pixels,
        "zero": (zero_ours, zero_theirs),
        "one": (one_ours, one_theirs),
    }


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


@pytest.mark.parametrize("shots", ["zero", "one"])
def test_parity_with_anomalib(parity, shots, record_property) -> None:
    ours, theirs = parity[shots]
    map_diff = _max_diff(ours["raw_map"], theirs.anomaly_map)
    score_diff = _max_diff(ours["raw_score"], theirs.pred_score)
    record_property(f"{shots}_shot_max_map_diff", map_diff)
    record_property(f"{shots}_shot_max_score_diff", score_diff)
    print(
        f"\n{shots}-shot parity: max |map diff| {map_diff:.2e}, max |score diff| {score_diff:.2e}"
    )
    assert ours["raw_map"].shape == theirs.anomaly_map.shape == (2, 240, 240)
    assert map_diff <= PARITY_ATOL and score_diff <= PARITY_ATOL
    # a meaningful comparison: the maps are not flat
    assert float(theirs.anomaly_map.std()) > 10 * PARITY_ATOL


def _informative_text(parity) -> torch.Tensor:
    """Two window embeddings of the defective test image as (normal, anomalous) anchors.

    With random weights the real prompt anchors give window probabilities that are all
    close to 0.5, where a harmonic and an arithmetic mean differ by less than the
    tolerance. Anchors taken from the image's own windows spread the probabilities
    over (0, 1), so a change of aggregation shows."""
    windows = parity["embeddings"].windows[0][1]  # (n_windows, D) of the 'hole' image
    return torch.stack([windows[0], windows[len(windows) // 2 + 3]])


def _zero_shot_ours(parity, text: torch.Tensor, scales=None) -> torch.Tensor:
    """Our zero-shot grid map from the cached embeddings, optionally with fewer scales."""
    ours = parity["ours"]
    encoder = ours.scorer.encoder
    emb, coverages = parity["embeddings"], encoder.coverages
    if scales is not None:
        keep = [encoder.scales.index(s) for s in scales]
        emb = win.WindowEmbeddings(emb.image, emb.patches, [emb.windows[i] for i in keep])
        coverages = [coverages[i] for i in keep]
    temperature = ours.config.text_temperature
    return win.zero_shot_scores(emb, text, coverages, ours.grid_size, temperature)[0]


def _zero_shot_theirs(parity, text: torch.Tensor) -> torch.Tensor:
    """anomalib's own zero-shot aggregation of the same embeddings and anchors."""
    from anomalib.models.image.winclip.utils import class_scores

    theirs, emb = parity["theirs"], parity["embeddings"]
    image_scores = class_scores(emb.image, text, theirs.temperature, target_class=1)
    saved = theirs._text_embeddings  # the window scores read the model's own anchors
    theirs._text_embeddings = text
    try:
        with torch.inference_mode():
            return theirs._compute_zero_shot_scores(image_scores, emb.windows)
    finally:
        theirs._text_embeddings = saved


def test_parity_detects_a_changed_scale_or_mean(parity, monkeypatch) -> None:
    text = _informative_text(parity)
    reference = _zero_shot_theirs(parity, text)
    assert float(reference.std()) > 0.05  # spread, unlike with the random-weight prompts
    assert _max_diff(_zero_shot_ours(parity, text), reference) <= PARITY_ATOL

    assert _max_diff(_zero_shot_ours(parity, text, scales=(2,)), reference) > MUTATION_MIN_DIFF

    def arithmetic(window_scores, coverage):
        cover = coverage.to(window_scores.dtype)
        return (window_scores @ cover.T) / cover.sum(dim=1)

    monkeypatch.setattr(win, "harmonic_aggregation", arithmetic)
    assert _max_diff(_zero_shot_ours(parity, text), reference) > MUTATION_MIN_DIFF


def test_parity_of_the_prompt_ensemble_and_a_changed_list(parity) -> None:
    """The anchors equal anomalib's (normalised) text embeddings; one state less does not."""
    theirs = F.normalize(parity["theirs"].text_embeddings.float(), dim=-1)
    ours = torch.stack(parity["anchors"])
    assert _max_diff(ours, theirs) <= PARITY_ATOL
    normal, anomalous = build_prompts(
        parity["class_name"], WINCLIP_NORMAL_STATES, WINCLIP_ANOMALOUS_STATES[1:], WINCLIP_TEMPLATES
    )
    backbone = parity["ours"].backbone
    changed = torch.stack(
        [
            average_anchor(backbone.encode_text(normal, normalize=False)),
            average_anchor(backbone.encode_text(anomalous, normalize=False)),
        ]
    )
    assert _max_diff(changed, theirs) > MUTATION_MIN_DIFF


def test_anomalib_without_adapter_collapses_windows(parity) -> None:
    """Why the adapter exists: with open_clip 3.x, anomalib 2.7's own window pass gives
    every window the same embedding (attention runs across windows, not within one)."""
    theirs, ours = parity["theirs"], parity["ours"]
    with torch.inference_mode():
        tokens = ours.scorer.encoder.embed(parity["pixels"][:1])
        collapsed = type(theirs)._get_window_embeddings(theirs, tokens, theirs.masks[0])
        fixed = theirs._get_window_embeddings(tokens, theirs.masks[0])
    assert float(collapsed[0].std(dim=0).max()) < 1e-5
    assert float(fixed[0].std(dim=0).mean()) > 1e-3


def test_anomalib_on_our_anchors(parity) -> None:
    """``anchors=`` gives anomalib our two text anchors instead of its own prompts: its
    zero-shot scores then equal ours computed from the same anchors (as the speed scripts
    and notebook 08 use it)."""
    ours, normal, anomalous = parity["ours"], *parity["anchors"]
    text = torch.stack([normal, anomalous])
    theirs = load_anomalib_winclip(ours, anchors=text)
    assert torch.equal(theirs._text_embeddings, text.float())
    with torch.inference_mode():
        result = theirs(parity["pixels"])
    zero_theirs = parity["zero"][1]  # anomalib's own prompts (= our ensemble, tested above)
    assert _max_diff(result.pred_score, zero_theirs.pred_score) <= 1e-4
    assert _max_diff(result.anomaly_map, zero_theirs.anomaly_map) <= 1e-4
    with pytest.raises(ConfigError, match="either class_name"):
        load_anomalib_winclip(ours, "disc", anchors=text)


def _flat_scene(top: int, left: int) -> np.ndarray:
    """A dark, screw-like bar on a flat grey background (240 x 240 RGB)."""
    image = np.full((240, 240, 3), 128, np.uint8)
    image[top : top + 24, left : left + 120] = 40
    image[top + 6 : top + 18, left + 120 : left + 150] = 70  # the head
    return image


def test_parity_on_a_flat_background_keeps_the_stable_rule(parity) -> None:
    """On a flat background the test and reference windows are identical, their few-shot
    score is 0 up to float noise, and anomalib's harmonic mean divides by it (inverses of
    +-1e7 cancel into noise). This project sets every patch covered by a score <= 0 to 0
    (harmonic_aggregation). Elsewhere the two agree to <= 1e-4 on the grid map."""
    from anomalib.models.image.winclip.utils import class_scores

    ours, theirs = parity["ours"], parity["theirs"]
    reference, tests = _flat_scene(40, 30), np.stack([_flat_scene(150, 80), _flat_scene(100, 40)])
    anchors = TextAnchors(*parity["anchors"], parity["class_name"])
    fitted = ours.fit(anchors, reference[None])
    out = ours.detect_batch(tests, fitted, normalization="per_image")
    pixels, ref_pixels = ours.backbone.to_pixels(tests), ours.backbone.to_pixels(reference[None])
    try:
        with torch.inference_mode():
            theirs.setup(reference_images=ref_pixels.float())
            image, windows, patches = theirs.encode_image(pixels.float())
            zero = theirs._compute_zero_shot_scores(
                class_scores(image, theirs.text_embeddings, theirs.temperature, target_class=1),
                windows,
            )
            grid_theirs = (zero + theirs._compute_few_shot_scores(patches, windows)) / 2
    finally:
        theirs.setup(reference_images=parity["ref_pixels"].float())
    emb, encoder = ours.scorer.embed(pixels), ours.scorer.encoder
    covered = torch.zeros(2, 225, dtype=torch.bool)
    for window_emb, bank, cover in zip(
        emb.windows, fitted.memory.window_banks, encoder.coverages, strict=True
    ):
        zero_windows = visual_association_score(window_emb, bank) <= 0
        covered |= (zero_windows.float() @ cover.T.float()) > 0
        # the rule: a patch under a zero-score window gets 0 at that scale
        aggregated = harmonic_aggregation(visual_association_score(window_emb, bank), cover)
        assert torch.all(aggregated[(zero_windows.float() @ cover.T.float()) > 0] == 0)
    assert covered.any() and not covered.all()  # the case exists, and so do clean patches
    diff = (out["fused_map"].view(2, -1) - grid_theirs.view(2, -1)).abs()
    assert float(diff[~covered].max()) <= PARITY_ATOL
    print(
        f"\nflat background: {int(covered.sum())} of {covered.numel()} patches under a "
        f"zero-score window; max |diff| elsewhere {float(diff[~covered].max()):.1e}, "
        f"there {float(diff[covered].max()):.1e}"
    )


def test_parity_of_an_underscore_class_name(parity) -> None:
    """The prompts here read ``metal_nut`` as "metal nut"; anomalib's use the name as
    given. With the same words the anchors agree; with the raw name they do not."""
    ours, theirs = parity["ours"], parity["theirs"]
    anchors = F.normalize(ours.build_text_anchors("metal_nut").stacked(), dim=-1)
    try:
        theirs.setup("metal nut")
        same = _max_diff(anchors, F.normalize(theirs.text_embeddings.float(), dim=-1))
        theirs.setup("metal_nut")
        raw = _max_diff(anchors, F.normalize(theirs.text_embeddings.float(), dim=-1))
    finally:
        theirs.setup(parity["class_name"])
    assert same <= PARITY_ATOL < MUTATION_MIN_DIFF < raw


# ======================================================================================
# Benchmark and CLI
# ======================================================================================
def test_benchmark_windows_zero_and_one_shot_from_the_cli(synthetic_root, tmp_path, capsys) -> None:
    """``winclip-nb benchmark --method windows --k-shot 0 1``: one run per k, each into
    its own folder, WinCLIP's raw map and score scored, then a summary table."""
    import json

    from winclip_nb import cli

    out = tmp_path / "bench"
    argv = ["benchmark", "--method", "windows", "--k-shot", "0", "1", "--weights", "random",
            "--data-root", str(synthetic_root), "--classes", "disc", "--image-size", "64",
            "--out", str(out), "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "method: windows" in printed and "MEAN over classes, per run:" in printed
    zero = json.loads((out / "zero-shot" / "results.json").read_text())
    one = json.loads((out / "1-shot" / "results.json").read_text())
    for results, k in ((zero, 0), (one, 1)):
        cfg = results["config"]
        assert (cfg["method"], cfg["k_shot"], cfg["model_name"]) == (
            "windows",
            k,
            "ViT-B-16-plus-240",
        )
        assert cfg["scored_map"] == "raw_map" and cfg["coreset_ratio"] is None
        assert cfg["random_weights"] is True
        assert results["classes"]["disc"]["pixel_auroc"] is not None
    assert zero["classes"]["disc"]["memory_patches"] is None
    assert one["classes"]["disc"]["memory_patches"] == 16  # one reference, 4 x 4 patches
    # the two runs differ (the few-shot branch is used)
    assert zero["mean"] != one["mean"]


def test_benchmark_config_method_defaults_and_errors() -> None:
    from winclip_nb.bench.config import BenchmarkConfig

    tokens = BenchmarkConfig().validate()
    windows = BenchmarkConfig(model=WinCLIPConfig(method="windows"), k_shot=1).validate()
    assert (tokens.model.model_name, tokens.model.image_size) == ("ViT-B-16", 224)
    assert (windows.model.model_name, windows.model.image_size) == ("ViT-B-16-plus-240", 240)
    # pretrained None: the method's own tag
    assert tokens.model.pretrained is None and windows.model.pretrained is None
    assert scorer_class(tokens.model.method).default_weights == "openai"
    assert scorer_class(windows.model.method).default_weights == "laion400m_e31"
    assert windows.effective_normalization == "per_image"
    assert windows.effective_coreset_ratio is None  # the windows method keeps every patch
    four = BenchmarkConfig(model=WinCLIPConfig(method="windows"), k_shot=4).validate()
    assert four.effective_normalization == "calibrated"
    assert BenchmarkConfig(k_shot=1).validate().effective_normalization == "calibrated"
    with pytest.raises(ConfigError, match="needs at least 2 normal image"):
        BenchmarkConfig(
            model=WinCLIPConfig(method="windows"), k_shot=1, normalization="calibrated"
        ).validate()
    with pytest.raises(ConfigError, match="method must be one of"):
        BenchmarkConfig(model=WinCLIPConfig(method="window")).validate()
