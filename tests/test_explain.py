"""Explanation stage: pure helpers, reports, rule-based and LLaVA explainers, CLI wiring.

The end-to-end tests use a random-init backbone on synthetic discs; the LLaVA tests use
a tiny random-init LLaVA-OneVision built into a temporary folder. No network.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from winclip_nb.core.errors import ConfigError, ExplainerError
from winclip_nb.core.maps import find_hotspots
from winclip_nb.core.results import DetectionResult
from winclip_nb.explain.llava import (
    DEFAULT_LLAVA_MODEL,
    MAX_DESCRIPTION_CHARS,
    ExplainerFallbackWarning,
    LlavaExplainer,
    load_explainer,
    parse_llava_answer,
)
from winclip_nb.explain.report import (
    add_explain_arguments,
    detect_and_explain,
    explain_images,
    explain_result,
    run_explain_cli,
    safe_stem,
    write_report_files,
)
from winclip_nb.explain.rules import (
    CONTRAST_MIN_GREY,
    ELONGATED_RATIO,
    HIGH_CONTRAST_GREY,
    RuleBasedExplainer,
    confidence_from_z,
    location_words,
    max_severity,
    region_appearance,
    severity_from_z,
    size_word,
)

REGION_KEYS = {
    "id",
    "box",
    "confidence",
    "location",
    "description",
    "severity",
    "peak_z",
    "mean_z",
    "area_fraction",
    "description_source",
    "severity_source",
    "llava_answer",
}


# ----------------------------------------------------------------------------- helpers
def make_scene(
    spot_centre: tuple[int, int] | None = (30, 30),
    spot_value: int = 30,
    line: bool = False,
    size: int = 120,
) -> tuple[np.ndarray, DetectionResult]:
    """A grey square object (150) on black with an optional defect, and a matching result.

    The anomaly map is a Gaussian bump (peak 9) on the defect, so hotspots come from the
    real ``find_hotspots``. ``line=True`` draws a bright horizontal 2-px scratch instead.
    """
    image = np.zeros((size, size, 3), np.uint8)
    image[20:100, 20:100] = 150
    fg_mask = np.zeros((size, size), bool)
    fg_mask[20:100, 20:100] = True
    anomaly_map = np.zeros((size, size), np.float32)
    if spot_centre is not None:
        x, y = spot_centre
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        if line:
            image[y : y + 2, x - 15 : x + 15] = 250
            dist2 = ((xx - x) / 15.0) ** 2 * (np.abs(xx - x) > 15) * 15.0**2 + (yy - y) ** 2
            anomaly_map = (9.0 * np.exp(-dist2 / (2 * 2.0**2))).astype(np.float32)
        else:
            cv2.circle(image, (x, y), 4, (spot_value,) * 3, -1)
            anomaly_map = (9.0 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 4.0**2))).astype(
                np.float32
            )
    hotspots = find_hotspots(anomaly_map, 3.0, 3, 0.0, fg_mask)
    result = DetectionResult(
        anomaly_map=anomaly_map,
        score=float(anomaly_map.max()),
        branch_maps={"text_map": np.zeros((14, 14), np.float32)},
        fused_map=np.zeros((14, 14), np.float32),
        fg_mask=fg_mask,
        hotspots=hotspots,
        text_score=0.0,
        normalization="calibrated",
        random_weights=False,
    )
    return image, result


class FakeConfig:
    hotspot_threshold = 3.0


class FakeWinCLIP:
    """Stands in for WinCLIP: ``detect`` returns prepared results keyed by file name."""

    def __init__(self, results: dict[str, DetectionResult], random_weights: bool = False):
        self.results = results
        self.random_weights = random_weights
        self.config = FakeConfig()
        self.calls: list[str] = []

    def detect(self, image, normal_anchor, anomalous_anchor, top_k=None, fitted=None):
        if isinstance(image, (list, tuple)):
            return [self.detect(i, normal_anchor, anomalous_anchor, top_k, fitted) for i in image]
        self.calls.append(Path(image).name)
        return self.results[Path(image).name]

    # CLI needs these two
    def build_text_anchors(self, class_name):
        self.calls.append(f"anchors:{class_name}")
        return torch.zeros(4), torch.ones(4)

    def build_normal_memory(self, train_images, normal_anchor, anomalous_anchor, **kw):
        self.calls.append(f"memory:{len(list(train_images))}")


def save_png(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


# ------------------------------------------------------------------------- pure helpers
def test_location_words_covers_the_3x3_grid_of_the_foreground_box():
    fg = np.zeros((120, 120), bool)
    fg[30:120, 30:120] = True  # 90 px box: cells of 30 px starting at 30
    expected = {
        (0, 0): "top left",
        (1, 0): "top centre",
        (2, 0): "top right",
        (0, 1): "centre left",
        (1, 1): "centre",
        (2, 1): "centre right",
        (0, 2): "bottom left",
        (1, 2): "bottom centre",
        (2, 2): "bottom right",
    }
    for (col, row), words in expected.items():
        x, y = 30 + 30 * col + 10, 30 + 30 * row + 10
        assert location_words((x, y, x + 10, y + 10), fg) == words
    # The grid follows the object, not the image: image-centre box is the object's top left.
    assert location_words((50, 50, 56, 56), fg) == "top left"


def test_location_words_uses_whole_image_for_textures_and_empty_masks():
    box = (50, 50, 60, 60)  # image centre of a 120 px image
    assert location_words(box, np.ones((120, 120), bool)) == "centre"
    assert location_words(box, np.zeros((120, 120), bool)) == "centre"
    assert location_words(box, None, (120, 120)) == "centre"
    assert location_words((100, 5, 110, 15), None, (120, 120)) == "top right"
    with pytest.raises(ValueError):
        location_words(box, None)


@pytest.mark.parametrize(
    ("peak", "mean", "area", "expected"),
    [
        (8.0, 3.5, 0.001, "high"),  # peak at the high threshold
        (7.99, 3.5, 0.001, "medium"),
        (3.5, 3.2, 0.05, "high"),  # large area alone is high
        (3.5, 3.2, 0.0499, "low"),
        (5.0, 3.5, 0.01, "medium"),
        (4.99, 3.99, 0.01, "low"),
        (4.99, 4.0, 0.01, "medium"),  # broad plateau by its mean
    ],
)
def test_severity_from_z_thresholds(peak, mean, area, expected):
    assert severity_from_z(peak, mean, area) == expected


def test_confidence_is_logistic_in_peak_z():
    assert confidence_from_z(5.0) == pytest.approx(0.5)
    assert confidence_from_z(3.0) == pytest.approx(1 / (1 + math.exp(2 / 1.5)))
    values = [confidence_from_z(z) for z in (3, 4, 6, 10, 20)]
    assert values == sorted(values) and 0 < values[0] and values[-1] <= 1.0


def test_size_word_and_max_severity():
    assert [size_word(a) for a in (0.0049, 0.005, 0.0299, 0.03)] == [
        "small",
        "medium",
        "medium",
        "large",
    ]
    assert max_severity(["low", "medium"]) == "medium"
    assert max_severity([]) is None


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (
            '{"description": "A dark hole near the rim.", "severity": "High"}',
            ("A dark hole near the rim.", "high"),
        ),
        (
            'Sure! ```json\n{"severity": "moderate", "description": "a scratch"}\n``` done',
            ("a scratch", "medium"),
        ),
        ("{'description': 'a dent on the top', 'severity': 'low'}", ("a dent on the top", "low")),
        (
            "Description: a bright scratch across the surface.\nSeverity: **medium**",
            ("a bright scratch across the surface.", "medium"),
        ),
        (
            "The screw head shows a deep crack. This is a high severity defect.",
            ("The screw head shows a deep crack.", "high"),
        ),
        (
            "There is a small stain on the left side",
            ("There is a small stain on the left side", None),
        ),
        ('{"severity": "critical"}', (None, "high")),
        ('{"description": "a chip", "severity": "purple"}', ("a chip", None)),
        ("t\ufffd\u0444^\ufffdj\ufffd\u0444^\ufffdj\ufffd\u0444", (None, None)),
        ("ĠĠĠĠĠĠ", (None, None)),
        ("", (None, None)),
        ("{", (None, None)),
        (  # cut off by the token limit
            '{"description": "A dark pit in the coating near the rim, which',
            ("A dark pit in the coating near the rim, which", None),
        ),
        ("aaaa aaaa aaaa", (None, None)),  # one distinct word is not a sentence
    ],
)
def test_parse_llava_answer(answer, expected):
    assert parse_llava_answer(answer) == expected


def test_parse_llava_answer_caps_long_descriptions():
    description, _ = parse_llava_answer(json.dumps({"description": "word " * 200}))
    assert len(description) == MAX_DESCRIPTION_CHARS and description.endswith("...")


def test_safe_stem_never_leaves_the_folder():
    for name in ["../../etc/passwd", "..", "a/../../b.png", "/abs/x.png", "..\\..\\win.png"]:
        stem = safe_stem(name)
        assert stem and "/" not in stem and "\\" not in stem and not stem.startswith(".")
    assert safe_stem("test/crack/003.png") == "003"
    assert safe_stem(np.zeros((2, 2))) == "image"


# ---------------------------------------------------------------------- rule-based
def test_rule_based_dark_spot_top_left():
    image, result = make_scene((30, 30), spot_value=30)
    hotspot = result.hotspots[0]
    out = RuleBasedExplainer().explain_region(image, result, hotspot, "metal_nut")
    assert out["location"] == "top left"
    assert out["severity"] == "high"  # peak 9 >= 8
    assert out["confidence"] == pytest.approx(confidence_from_z(hotspot.peak))
    description = out["description"]
    assert "darker than its surroundings" in description
    assert "high-contrast" in description and "spot-like" in description
    assert "at the top left of the metal nut" in description
    assert out["description_source"] == "rule-based" and out["llava_answer"] is None


def test_rule_based_bright_scratch_and_flat_region():
    image, result = make_scene((60, 60), line=True)
    out = RuleBasedExplainer().explain_region(image, result, result.hotspots[0], "disc")
    assert out["location"] == "centre"
    assert "brighter than its surroundings" in out["description"]
    assert "scratch-like" in out["description"]
    look = region_appearance(image, result.anomaly_map, result.hotspots[0].box, result.fg_mask)
    assert look["elongation"] > ELONGATED_RATIO and look["contrast"] > HIGH_CONTRAST_GREY
    # Same map on an unchanged object: no brightness change to report.
    plain, _ = make_scene(None)
    look = region_appearance(plain, result.anomaly_map, result.hotspots[0].box, result.fg_mask)
    assert look["tone"] == "similar" and abs(look["contrast"]) < CONTRAST_MIN_GREY


# ---------------------------------------------------------------------------- reports
def test_report_files_text_json_and_random_weights(tmp_path):
    image, result = make_scene((30, 30))
    image_path = save_png(tmp_path / "in" / "part 7.png", image)
    winclip = FakeWinCLIP({"part 7.png": result}, random_weights=True)
    out_dir = tmp_path / "out"
    report = detect_and_explain(
        winclip, image_path, None, None, "disc", use_llava=False, out_dir=out_dir
    )
    assert report["explainer"] == "rule-based" and report["random_weights"] is True
    assert set(report["paths"]) == {"heatmap", "boxes", "report_txt", "report_json"}
    for path in report["paths"].values():
        assert Path(path).is_file() and Path(path).parent == out_dir
        assert Path(path).name.startswith("part_7_")
    for kind in ("heatmap", "boxes"):
        with Image.open(report["paths"][kind]) as png:
            assert png.size[0] > 100
    text = Path(report["paths"]["report_txt"]).read_text()
    for heading in ("ANOMALY DETECTION REPORT", "DETECTED ANOMALIES (1 region)", "SUMMARY"):
        assert heading in text
    assert "RANDOM WEIGHTS" in text and "REJECT" in text and "top left" in text
    assert text == report["explanation"]
    loaded = json.loads(Path(report["paths"]["report_json"]).read_text())
    assert len(loaded["regions"]) == len(report["regions"]) == 1
    assert loaded["regions"][0] == report["regions"][0]
    assert set(loaded["regions"][0]) == REGION_KEYS
    assert loaded["score"] == pytest.approx(report["score"])
    assert loaded["recommendation"].startswith("REJECT")

    winclip.random_weights = False
    result.random_weights = False
    report = detect_and_explain(
        winclip, image_path, None, None, "disc", use_llava=False, save=False
    )
    assert report["paths"] == {} and "RANDOM WEIGHTS" not in report["explanation"]
    with pytest.raises(ConfigError, match="save=False"):
        detect_and_explain(
            winclip, image_path, None, None, "disc", use_llava=False, out_dir=out_dir, save=False
        )


def test_reports_default_folder_never_overwrites_another_image(tmp_path, monkeypatch):
    """Without out_dir the files go to reports/; a second image with the same stem gets
    its own names, a rerun of the same image reuses its own."""
    monkeypatch.chdir(tmp_path)
    image, result = make_scene()
    first = save_png(tmp_path / "a" / "000.png", image)
    second = save_png(tmp_path / "b" / "000.png", image)
    winclip = FakeWinCLIP({"000.png": result})
    one = detect_and_explain(winclip, first, None, None, "disc", use_llava=False)
    two = detect_and_explain(winclip, second, None, None, "disc", use_llava=False)
    again = detect_and_explain(winclip, first, None, None, "disc", use_llava=False)
    assert one["paths"]["report_txt"] == str(Path("reports") / "000_report.txt")
    assert two["paths"]["report_txt"] == str(Path("reports") / "000_2_report.txt")
    assert again["paths"] == one["paths"]
    owners = {
        json.loads(Path(p).read_text())["image"]
        for p in (one["paths"]["report_json"], two["paths"]["report_json"])
    }
    assert owners == {str(first), str(second)}
    assert len(list(Path("reports").iterdir())) == 8


def test_normal_image_gets_no_regions(tmp_path):
    image, result = make_scene(None)
    assert result.hotspots == []
    image_path = save_png(tmp_path / "good.png", image)
    report = detect_and_explain(
        FakeWinCLIP({"good.png": result}),
        image_path,
        None,
        None,
        "disc",
        use_llava=False,
        out_dir=tmp_path / "out",
    )
    assert report["regions"] == [] and report["max_severity"] is None
    assert "DETECTED ANOMALIES (0 regions)" in report["explanation"]
    assert "No anomaly above threshold (z >= 3.0)" in report["explanation"]
    assert report["recommendation"].startswith("PASS")
    assert json.loads(Path(report["paths"]["report_json"]).read_text())["regions"] == []


def test_file_names_with_dot_dot_stay_inside_out_dir(tmp_path):
    image, result = make_scene((30, 30))
    image_path = save_png(tmp_path / "in" / "..evil name!.png", image)
    out_dir = tmp_path / "a" / "out"
    report = detect_and_explain(
        FakeWinCLIP({image_path.name: result}),
        image_path,
        None,
        None,
        "../../escape",
        use_llava=False,
        out_dir=out_dir,
    )
    written = {p.name for p in out_dir.iterdir()}
    assert {Path(p).name for p in report["paths"].values()} == written
    assert all(not name.startswith(".") for name in written)
    # Nothing appeared anywhere else.
    everything = {p for p in tmp_path.rglob("*") if p.is_file()}
    assert everything == {image_path} | {out_dir / n for n in written}
    # Writing with a hostile name directly also stays inside.
    paths = write_report_files(dict(report), image, result, out_dir, "../../../x")
    assert all(Path(p).parent == out_dir for p in paths.values())


def test_explain_images_ranks_by_score_and_names_clashing_stems(tmp_path):
    files, results = {}, {}
    for folder, peak_pos in (("crack", (30, 30)), ("good", None), ("hole", (70, 60))):
        image, result = make_scene(peak_pos)
        files[folder] = save_png(tmp_path / "test" / folder / "000.png", image)
        result.score = {"crack": 5.0, "good": 1.0, "hole": 8.0}[folder]
        results[folder] = result

    class ByFolder(FakeWinCLIP):
        def detect(self, image, normal_anchor, anomalous_anchor, top_k=None, fitted=None):
            if isinstance(image, (list, tuple)):
                return [self.detect(i, normal_anchor, anomalous_anchor, top_k) for i in image]
            return self.results[Path(image).parent.name]

    reports = explain_images(
        ByFolder(results),
        list(files.values()),
        None,
        None,
        "disc",
        top_n=2,
        use_llava=False,
        out_dir=tmp_path / "out",
    )
    assert [Path(r["image"]).parent.name for r in reports] == ["hole", "crack"]
    assert [r["rank"] for r in reports] == [1, 2]
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == sorted(
        f"{f}_000_{k}"
        for f in ("crack", "hole")
        for k in ("boxes.png", "heatmap.png", "report.json", "report.txt")
    )


# ------------------------------------------------------------------------------ viz
def test_viz_functions_return_matplotlib_objects(tmp_path):
    from matplotlib.figure import Figure

    from winclip_nb.nb import figures as viz

    image, result = make_scene((30, 30))
    fig = Figure()
    ax = viz.overlay_heatmap(image, result.anomaly_map[::2, ::2], ax=fig.add_subplot(), title="t")
    assert len(ax.images) == 2 and ax.images[1].get_array().shape == image.shape[:2]
    assert len(fig.axes) == 2  # image axes + colour bar
    ax = viz.overlay_heatmap(image, result.anomaly_map, ax=Figure().add_subplot(), colorbar=False)
    assert ax.images[1].get_clim() == (0.0, pytest.approx(9.0))  # (0, max(map max, 6))
    assert len(ax.figure.axes) == 1
    fig = Figure()
    ax = viz.draw_boxes(image, result.hotspots + [(1, 2, 3, 4)], ax=fig.add_subplot())
    assert len(ax.patches) == 2 and [t.get_text() for t in ax.texts] == ["1", "2"]
    banner = viz.random_weights_banner(fig)
    assert "RANDOM WEIGHTS" in banner.get_text()
    assert viz.save_figure(fig, tmp_path / "f" / "x.png").is_file()
    maps = viz.show_maps({"image": image, "map": result.anomaly_map}, colorbar=False)
    assert [a.get_title() for a in maps.axes] == ["image", "map"]


# ------------------------------------------------------------------- explainer loading
def test_load_explainer_falls_back_once_and_require_raises(recwarn):
    for use_llava in (True, "auto", True):
        assert isinstance(load_explainer(use_llava, "/nonexistent/model"), RuleBasedExplainer)
    notices = [w for w in recwarn if issubclass(w.category, ExplainerFallbackWarning)]
    assert len(notices) == 1  # once per model
    message = str(notices[0].message)
    assert "/nonexistent/model" in message and "rule-based explainer" in message
    assert "use_llava='require'" in message
    with pytest.raises(ExplainerError, match="/nonexistent"):
        load_explainer("require", "/nonexistent")
    assert isinstance(load_explainer(False, "/nonexistent"), RuleBasedExplainer)
    with pytest.raises(ExplainerError, match="use_llava must be True, False, 'auto' or 'require'"):
        load_explainer("maybe", "/nonexistent")


def test_uncached_hub_id_fails_fast_when_offline(monkeypatch):
    import winclip_nb.hub.weights as weights

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ExplainerError, match="no-such-org/no-such-llava.*HF_HUB_OFFLINE"):
        load_explainer("require", "no-such-org/no-such-llava")
    # Not flagged offline, but the hub does not answer: no minutes of download retries.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(weights, "hub_reachable", lambda *a, **k: False)
    with pytest.raises(ExplainerError, match="no-such-org/no-such-llava.*cannot be reached"):
        load_explainer("require", "no-such-org/no-such-llava")


# ------------------------------------------------------------------------------ LLaVA
@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    from winclip_nb.explain.tiny_llava import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava"), seed=0)


def test_tiny_llava_is_deterministic(tiny_llava, tmp_path):
    from safetensors.torch import load_file

    from winclip_nb.explain.tiny_llava import build_tiny_llava

    before = torch.random.get_rng_state()
    again = load_file(build_tiny_llava(tmp_path / "a", seed=0) / "model.safetensors")
    other = load_file(build_tiny_llava(tmp_path / "b", seed=1) / "model.safetensors")
    assert torch.equal(torch.random.get_rng_state(), before)  # caller's RNG untouched
    first = load_file(tiny_llava / "model.safetensors")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)
    assert sum(v.numel() for v in first.values()) < 1_000_000


def test_llava_explainer_with_tiny_model(tiny_llava, monkeypatch):
    explainer = LlavaExplainer.from_pretrained(tiny_llava, device="cpu")
    assert explainer.name == f"llava:{tiny_llava}"
    assert LlavaExplainer.from_pretrained(str(tiny_llava), device="cpu").model is explainer.model

    image, result = make_scene((30, 30))
    report = explain_result(result, image, "disc", explainer, image_name="x.png")
    region = report["regions"][0]
    assert report["explainer"] == f"llava:{tiny_llava}"
    assert set(region) == REGION_KEYS
    # A random model babbles: the rule-based description is used and marked.
    assert isinstance(region["llava_answer"], str)
    assert region["description_source"] == "rule-based (unparsable LLaVA answer)"
    rule = RuleBasedExplainer().explain_region(image, result, result.hotspots[0], "disc")
    assert region["description"] == rule["description"]
    assert region["location"] == "top left"
    assert "unparsable LLaVA answer" in report["explanation"]

    # A well-formed answer is used, and the prompt carries both images and the class.
    seen = {}

    def fake_ask(images, prompt):
        seen["sizes"], seen["prompt"] = [im.size for im in images], prompt
        return '{"description": "A dark pit in the coating.", "severity": "medium"}'

    monkeypatch.setattr(explainer, "ask", fake_ask)
    region = explain_result(result, image, "metal_nut", explainer)["regions"][0]
    assert region["description"] == "A dark pit in the coating."
    assert region["severity"] == "medium" and region["severity_source"] == "llava"
    assert region["description_source"] == "llava"
    assert seen["sizes"][1] == (120, 120) and "metal nut" in seen["prompt"]
    crop_w, crop_h = seen["sizes"][0]
    x0, y0, x1, y1 = result.hotspots[0].box
    assert crop_w == min(120, x1 + 32) - max(0, x0 - 32)  # 32 px minimum margin, clipped
    assert crop_h == min(120, y1 + 32) - max(0, y0 - 32)


def test_llava_half_precision_inputs_are_cast(tiny_llava):
    # The CUDA default is float16; the same casting runs on CPU with an explicit dtype.
    explainer = LlavaExplainer.from_pretrained(tiny_llava, device="cpu", dtype=torch.float16)
    assert explainer.model.dtype == torch.float16
    explainer.max_new_tokens = 8  # half precision is slow on CPU
    image, result = make_scene((30, 30))
    region = explain_result(result, image, "disc", explainer)["regions"][0]
    assert region["description_source"] == "rule-based (unparsable LLaVA answer)"


# ------------------------------------------------------------------ end to end (WinCLIP)
@pytest.fixture(scope="module")
def disc_setup(tmp_path_factory):
    from winclip_nb import WinCLIP
    from winclip_nb.data import load_mvtec_class, make_synthetic_mvtec

    root = make_synthetic_mvtec(
        tmp_path_factory.mktemp("synthetic"),
        classes=["disc"],
        n_train=6,
        n_test_good=1,
        n_test_per_defect=1,
        image_size=128,
    )
    data = load_mvtec_class(root, "disc")
    with torch.random.fork_rng(devices=[]):  # the random-init backbone, reproducibly
        torch.manual_seed(0)
        winclip = WinCLIP(
            device="cpu",
            model_name="ViT-B-16",
            pretrained="random",
            layers=[9, 10, 11],
            image_size=224,
        )
    normal_anchor, anomalous_anchor = winclip.build_text_anchors("disc")
    winclip.build_normal_memory(data.train, normal_anchor, anomalous_anchor, progress=False)
    return winclip, normal_anchor, anomalous_anchor, data


def test_end_to_end_rule_based_on_synthetic_defects(disc_setup, tmp_path):
    from winclip_nb.data import load_image, load_mask

    winclip, normal_anchor, anomalous_anchor, data = disc_setup
    hole = next(s for s in data.test if s.defect == "hole")
    report = detect_and_explain(
        winclip,
        hole.path,
        normal_anchor,
        anomalous_anchor,
        "disc",
        use_llava=False,
        out_dir=tmp_path,
    )
    assert report["regions"] and report["random_weights"] is True
    x0, y0, x1, y1 = report["regions"][0]["box"]
    assert load_mask(hole.mask_path)[y0:y1, x0:x1].any()
    assert "RANDOM WEIGHTS" in Path(report["paths"]["report_txt"]).read_text()

    good = next(s for s in data.test if s.label == 0)
    report = detect_and_explain(
        winclip, good.path, normal_anchor, anomalous_anchor, "disc", use_llava=False, save=False
    )
    assert report["regions"] == []
    assert "No anomaly above threshold" in report["explanation"]

    # A dark spot painted into the top-left cell of the disc's foreground box.
    image = load_image(good.path).copy()
    fg = winclip.compute_foreground_mask(image, class_name="disc")
    rows, cols = np.flatnonzero(fg.any(axis=1)), np.flatnonzero(fg.any(axis=0))
    cx = int(cols[0] + 0.22 * (cols[-1] + 1 - cols[0]))
    cy = int(rows[0] + 0.22 * (rows[-1] + 1 - rows[0]))
    cv2.circle(image, (cx, cy), 6, (20, 18, 16), -1)
    spot_path = save_png(tmp_path / "spot.png", image)
    report = detect_and_explain(
        winclip, spot_path, normal_anchor, anomalous_anchor, "disc", use_llava=False, save=False
    )
    first = report["regions"][0]
    assert first["location"] == "top left"
    assert "darker than its surroundings" in first["description"]
    bx0, by0, bx1, by1 = first["box"]
    assert bx0 <= cx < bx1 and by0 <= cy < by1


def test_end_to_end_with_tiny_llava(disc_setup, tiny_llava, tmp_path):
    winclip, normal_anchor, anomalous_anchor, data = disc_setup
    hole = next(s for s in data.test if s.defect == "hole")
    explainer = LlavaExplainer.from_pretrained(tiny_llava, device="cpu")
    report = detect_and_explain(
        winclip,
        hole.path,
        normal_anchor,
        anomalous_anchor,
        "disc",
        explainer=explainer,
        top_k=1,
        out_dir=tmp_path,
    )
    assert report["explainer"] == f"llava:{tiny_llava}"
    assert len(report["regions"]) == 1 and set(report["regions"][0]) == REGION_KEYS
    assert json.loads(Path(report["paths"]["report_json"]).read_text())["explainer"] == (
        f"llava:{tiny_llava}"
    )


# ------------------------------------------------------------------------------- CLI
def test_cli_arguments_and_run(tmp_path, monkeypatch, capsys):
    import winclip_nb.winclip as winclip_module

    image, result = make_scene((30, 30))
    train_dir = tmp_path / "train"
    for i in range(3):
        save_png(train_dir / f"{i:03d}.png", make_scene(None)[0])
    target = save_png(tmp_path / "check" / "unit.png", image)
    fake = FakeWinCLIP({"unit.png": result}, random_weights=True)
    made = {}

    def factory(**kwargs):
        made.update(kwargs)
        return fake

    monkeypatch.setattr(winclip_module, "WinCLIP", factory)
    parser = argparse.ArgumentParser()
    add_explain_arguments(parser)
    args = parser.parse_args(
        [
            str(target),
            "--class-name",
            "disc",
            "--train-dir",
            str(train_dir),
            "--weights",
            "random",
            "--no-llava",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert args.top_k == 3 and args.device == "auto" and args.llava_model == DEFAULT_LLAVA_MODEL
    assert run_explain_cli(args) == 0
    assert made == {"device": "auto", "pretrained": "random"}
    assert fake.calls[:2] == ["anchors:disc", "memory:3"]
    out = capsys.readouterr()
    assert "unit.png [disc]: score 9.00, 1 region, max severity high -> REJECT" in out.out
    assert str(tmp_path / "out") in out.out and "RANDOM WEIGHTS" in out.err
    assert (tmp_path / "out" / "unit_report.json").is_file()


def test_a_ring_shaped_hotspot_around_a_dark_hole_is_described_by_the_hole():
    """The donut of notebook 04: a hole's dark centre scores below the threshold and the
    hotspot is a ring around it. The ring's enclosed hole belongs to the region, so a black
    hole is "darker" and "high-contrast", not a low-contrast mark (the ring alone is the
    same grey as its surroundings)."""
    size = 96
    yy, xx = np.mgrid[:size, :size]
    radius = np.hypot(yy - 48, xx - 48)
    image = np.full((size, size, 3), 170, np.uint8)
    image[radius < 8] = 10  # the black hole
    anomaly_map = np.where((radius >= 6) & (radius < 14), 6.0, 0.5).astype(np.float32)
    box = (34, 34, 62, 62)
    look = region_appearance(image, anomaly_map, box, None, threshold=3.0)
    assert look["tone"] == "darker" and look["contrast_word"] == "high-contrast", look
    ring_only = anomaly_map.copy()
    image_without_hole = np.full_like(image, 170)
    look = region_appearance(image_without_hole, ring_only, box, None, threshold=3.0)
    assert look["tone"] == "similar"  # same ring, nothing dark inside: no brightness change
