"""MuSc: mutual scoring on hand-built token sets (a defect in one image of five, a defect
repeated in most images), neighbourhood aggregation by hand, RsCIN, the set API, the
minimum set size, and the benchmark protocol (k = 0 only)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from winclip_nb import ConfigError, WinCLIP, WinCLIPConfig
from winclip_nb.core import musc
from winclip_nb.data import list_images


def _brute_force(features: torch.Tensor, fraction: float) -> torch.Tensor:
    """The definition, one image pair at a time."""
    n, p, _ = features.shape
    out = torch.empty(n, p)
    for i in range(n):
        per_image = []
        for j in range(n):
            if j != i:
                per_image.append(torch.cdist(features[i], features[j]).amin(dim=1))
        d = torch.stack(per_image, dim=1)  # (P, N - 1)
        k = max(int(fraction * (n - 1)), 1)
        out[i] = d.sort(dim=1).values[:, :k].mean(dim=1)
    return out


def _toy_set(n: int = 5, defective: tuple[int, ...] = (2,), seed: int = 0) -> torch.Tensor:
    """n images of 9 patches from 3 normal 'textures' plus noise; the defective images get
    the same odd vector at patch 4."""
    g = torch.Generator().manual_seed(seed)
    textures = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    feats = textures[torch.arange(9) % 3].repeat(n, 1, 1) + 0.05 * torch.randn(n, 9, 8, generator=g)
    odd = F.normalize(torch.randn(8, generator=g), dim=-1) * 3
    for i in defective:
        feats[i, 4] = odd
    return F.normalize(feats, dim=-1)


def test_mutual_scores_match_the_definition_and_do_not_depend_on_chunks() -> None:
    feats = F.normalize(torch.randn(7, 6, 5, generator=torch.Generator().manual_seed(1)), dim=-1)
    low, high = musc.mutual_scores(feats)
    assert torch.allclose(low, _brute_force(feats, musc.MUSC_INTERVAL), atol=1e-5)
    low_small, high_small = musc.mutual_scores(feats, chunk_bytes=1)  # one image per chunk
    assert torch.allclose(low, low_small) and torch.allclose(high, high_small)


def test_one_defect_in_five_images_stands_out() -> None:
    low, _ = musc.mutual_scores(_toy_set(defective=(2,)))
    top = divmod(int(low.argmax()), 9)
    assert top == (2, 4)
    others = torch.cat([low[2, :4], low[2, 5:], low[[0, 1, 3, 4]].flatten()])
    assert float(low[2, 4]) > 5 * float(others.max())


def test_a_defect_repeated_in_most_images_is_missed_but_flagged() -> None:
    feats = _toy_set(n=6, defective=(0, 1, 2, 3, 4))
    low, high = musc.mutual_scores(feats)
    assert float(low[0, 4]) < 0.5 * float(low.max())  # scored as normal: the blind spot
    assert float(low[:5, 4].max()) <= float(low.flatten().quantile(0.9))
    assert musc.repeated_pattern_images(low, high) == [0, 1, 2, 3, 4]
    # a single defect is not "repeated"
    assert musc.repeated_pattern_images(*musc.mutual_scores(_toy_set(defective=(2,)))) == []


def test_interval_average_by_hand() -> None:
    d = torch.tensor([[5.0, 1.0, 4.0, 2.0, 3.0, 9.0, 8.0, 7.0, 6.0, 0.5]])
    assert float(musc.interval_average(d, 0.3)) == pytest.approx((0.5 + 1 + 2) / 3)
    assert float(musc.interval_average(d[:, :2], 0.3)) == 1.0  # at least one


def test_aggregate_neighbourhood_by_hand() -> None:
    tokens = torch.arange(18.0).view(1, 9, 2)  # a 3 x 3 grid, two channels
    grid = tokens[0].T.reshape(2, 3, 3)
    normed = (grid - grid.mean()) / grid.std(unbiased=False)
    padded = F.pad(normed, (1, 1, 1, 1))
    centre = padded[:, 1:4, 1:4].mean(dim=(1, 2))  # the middle patch's 3 x 3 block
    corner = padded[:, 0:3, 0:3].sum(dim=(1, 2)) / 9  # zeros of the padding count
    out = musc.aggregate_neighbourhood(tokens, (3, 3), 3)
    assert torch.allclose(out[0, 4], F.normalize(centre, dim=0), atol=1e-6)
    assert torch.allclose(out[0, 0], F.normalize(corner, dim=0), atol=1e-6)


def test_rscin_by_hand() -> None:
    tokens = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]), dim=-1)
    scores = torch.tensor([2.0, 0.0, 1.0])  # scaled: 1, 0, 0.5
    # k = 2: image 0's neighbours are itself (1.0) and image 1 (0.8)
    expected0 = (1.0 * 1 + 0.8 * 0) / 1.8
    out = musc.rscin(scores, tokens, (2,))
    assert float(out[0]) == pytest.approx(expected0)
    assert torch.allclose(musc.rscin(scores, tokens, (1,)), torch.tensor([1.0, 0.0, 0.5]))


# ======================================================================================
# The scorer, on hand-built tokens and on a random model
# ======================================================================================
@pytest.fixture(scope="module")
def detector():
    return WinCLIP(device="cpu", pretrained="random", method="musc", image_size=112)


def test_defaults_are_the_papers() -> None:
    cfg = WinCLIPConfig(method="musc")
    assert (cfg.model_name, cfg.image_size, cfg.layers) == ("ViT-B-16", 256, (2, 5, 8, 11))
    assert musc.MUSC_DEGREES == (1, 3, 5) and musc.MUSC_INTERVAL == 0.3


def _grid_set(n: int, defective: tuple[int, ...], side: int = 6) -> torch.Tensor:
    """Like :func:`_toy_set` on a side x side grid, the odd vector on a 2 x 2 block, so
    that the 3 x 3 and 5 x 5 neighbourhoods do not blur it over the whole image."""
    g = torch.Generator().manual_seed(0)
    textures = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    p = side * side
    feats = textures[torch.arange(p) % 3].repeat(n, 1, 1) + 0.05 * torch.randn(n, p, 8, generator=g)
    odd = F.normalize(torch.randn(8, generator=g), dim=-1) * 3
    block = [side * 2 + 2, side * 2 + 3, side * 3 + 2, side * 3 + 3]
    for i in defective:
        feats[i, block] = odd
    return F.normalize(feats, dim=-1)


def test_scorer_warns_about_a_repeated_defect(detector, monkeypatch) -> None:
    def fake_tokens(feats):  # the same tokens in each of the 4 blocks
        return lambda pixels: (feats[:, None].repeat(1, 4, 1, 1), torch.eye(len(feats), 8))

    monkeypatch.setattr(detector.backbone, "grid_size", (6, 6))
    pixels = torch.zeros(6, 3, 112, 112)
    monkeypatch.setattr(detector.scorer, "layer_tokens", fake_tokens(_grid_set(6, (0, 1, 2, 3, 4))))
    repeated = r"5 of 6 images \(indices \[0, 1, 2, 3, 4\]"
    with pytest.warns(musc.RepeatedPatternWarning, match=repeated):
        scores = detector.scorer.score(pixels, None, None)
    assert int(scores.image_score.argmax()) == 5  # the blind spot: the normal image ranks first
    repeat_map = scores.branches["repeat_map"].flatten(1)
    assert float(repeat_map[:5].amax(dim=1).min()) > 2 * float(repeat_map[5].amax())
    monkeypatch.setattr(detector.scorer, "layer_tokens", fake_tokens(_grid_set(6, (2,))))
    with warnings.catch_warnings():
        warnings.simplefilter("error", musc.RepeatedPatternWarning)
        scores = detector.scorer.score(pixels, None, None)
    assert int(scores.image_score.argmax()) == 2


def test_too_few_images_and_normal_images_are_refused(detector, synthetic_root) -> None:
    test_dir = synthetic_root / "disc" / "test"
    paths = list_images(test_dir / "good")[:3] + list_images(test_dir / "hole")[:1]
    with pytest.raises(ConfigError, match="needs at least 5; got 4"):
        detector.score_set(paths, "disc")
    with pytest.raises(ConfigError, match="needs at least 5; got 1"):
        detector.detect(paths[0], fitted=detector.fit(detector.text_anchors("disc"), []))
    with pytest.raises(ConfigError, match="takes no normal images"):
        detector.build_normal_memory(paths[:2], *detector.build_text_anchors("disc"))


def test_score_set_on_a_random_model(detector, synthetic_root) -> None:
    test_dir = synthetic_root / "disc" / "test"
    paths = [p for kind in ("good", "hole", "crack") for p in list_images(test_dir / kind)][:6]
    results = detector.score_set(paths, "disc")
    assert len(results) == 6 and all(r.method == "musc" and r.random_weights for r in results)
    assert set(results[0].branch_maps) == {"mutual_map", "repeat_map"}
    assert results[0].text_score is None
    assert results[0].anomaly_map.shape == np.asarray(results[0].fg_mask).shape
    again = detector.score_set(paths, "disc")
    assert [r.score for r in again] == [r.score for r in results]  # deterministic
    rescored = WinCLIP(config=detector.config.replace(rscin=True), backbone=detector.backbone)
    new = [r.score for r in rescored.score_set(paths, "disc")]
    assert min(new) >= 0 and max(new) <= 1 and new != [r.score for r in results]


def test_benchmark_scores_the_test_split_as_a_set(synthetic_root, tmp_path) -> None:
    from winclip_nb.bench.config import BenchmarkConfig
    from winclip_nb.bench.protocol import run_benchmark

    model = WinCLIPConfig(method="musc", pretrained="random", image_size=112, device="cpu")
    with pytest.raises(ConfigError, match="k_shot must be 0"):
        BenchmarkConfig(model=model, k_shot=1).validate()
    cfg = BenchmarkConfig(model=model, k_shot=0, data_root=str(synthetic_root),
                          classes=["disc"], out=str(tmp_path / "out"), workers=0)
    results = run_benchmark(cfg, progress=False, verbose=False)
    row = results["classes"]["disc"]
    assert row["n_memory_images"] == 0 and row["n_test"] == 11
    assert 0 <= row["image_auroc"] <= 100 and results["config"]["method"] == "musc"
