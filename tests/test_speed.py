"""Speed benchmark (fields only, never speed) and the exactness of the fast code paths."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from winclip_nb import ConfigError, WinCLIPConfig
from winclip_nb.bench.speed import (
    REQUIRED_KEYS,
    SpeedConfig,
    add_speed_arguments,
    config_from_args,
    main,
)
from winclip_nb.core.maps import fill_holes, gaussian_kernel1d, gaussian_smooth, image_scores
from winclip_nb.core.memory import greedy_coreset


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def test_speed_benchmark_writes_sane_json(tmp_path, capsys):
    out = tmp_path / "speed.json"
    threads = torch.get_num_threads()
    code = main(
        [
            "--device", "cpu", "--weights", "random", "--n-images", "4",
            "--memory-images", "3", "--batch-size", "2", "--image-size", "112",
            "--repeats", "2", "--anchors", "random", "--json", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    assert torch.get_num_threads() == threads  # the run restores the thread count
    printed = capsys.readouterr().out
    assert "ratio detect / backbone" in printed and "targets:" in printed
    result = json.loads(out.read_text())

    assert set(REQUIRED_KEYS) <= set(result)
    for key in (
        "backbone_img_per_s", "detect_img_per_s", "detect_with_decode_img_per_s", "ratio",
        "coreset_s", "feature_extract_s", "coreset_fraction", "memory_build_s", "peak_rss_mb",
    ):  # fmt: skip
        assert _positive(result[key]), (key, result[key])
    ratio = result["detect_img_per_s"] / result["backbone_img_per_s"]
    assert result["ratio"] == pytest.approx(ratio, rel=2e-3, abs=1e-3)
    fraction = result["coreset_s"] / result["feature_extract_s"]
    assert result["coreset_fraction"] == pytest.approx(fraction, rel=2e-3, abs=1e-3)
    # Medians of the raw samples give the reported rates.
    samples = result["samples_s"]
    assert result["samples_batch_sizes"] == [2, 2, 2, 2]  # 2 repeats x 2 batches
    assert all(len(samples[k]) == 4 for k in ("backbone", "detect", "detect_with_decode"))
    expected = float(np.median([2 / t for t in samples["detect"]]))
    assert result["detect_img_per_s"] == pytest.approx(expected, rel=2e-2)

    assert result["peak_gpu_mb"] is None and result["device"] == "cpu"
    assert result["batch_size"] == 2 and result["threads"] == threads
    assert result["weights"] == "random" and result["random_weights"] is True
    assert result["anchors"] == "random"
    assert result["image_size"] == 112 and result["backbone_dtype"] == "float32"
    # The run's settings: the detector's (model) and the harness's, flat.
    assert result["config"]["pretrained"] == "random" and result["config"]["image_size"] == 112
    assert result["config"]["n_images"] == 4 and result["config"]["memory_images"] == 3
    assert result["torch_version"] == torch.__version__
    assert result["n_images"] == 4 and result["memory_images"] == 3
    # A full-size memory: 3 images x 7 x 7 patches at 112 px, 10 % coreset kept.
    assert result["memory_patches"] == 3 * 49
    assert result["coreset_picks"] == result["memory_size"] == math.ceil(0.1 * 147)
    assert {"platform", "cpu_model", "logical_cores"} <= set(result["machine"])

    targets = result["targets"]
    assert targets["ratio"]["applies"] and targets["ratio"]["limit"] == 0.85
    assert targets["ratio"]["pass"] == (result["ratio"] >= 0.85)
    assert targets["coreset_fraction"]["pass"] == (result["coreset_fraction"] <= 0.10)
    assert not targets["peak_gpu_mb"]["applies"] and targets["peak_gpu_mb"]["pass"] is None
    assert result["targets_met"] == (
        targets["ratio"]["pass"] and targets["coreset_fraction"]["pass"]
    )


def test_speed_rejects_bad_settings(capsys):
    assert main(["--device", "cpu", "--n-images", "0"]) == 2
    assert "n_images" in capsys.readouterr().err


# ------------------------------------------------------ fast paths stay exact
def test_fill_holes_matches_scipy():
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = rng.integers(1, 30, size=2)
        mask = rng.random((h, w)) < rng.random()
        expected = ndimage.binary_fill_holes(mask)
        assert np.array_equal(fill_holes(mask).astype(bool), expected)


def _convolution_smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable convolution with explicit padding: reflect (without repeating the edge)
    for up to ``side - 1`` pixels, replicate beyond (the package's former second path)."""
    kernel = gaussian_kernel1d(sigma)
    radius = kernel.numel() // 2
    height, width = maps.shape[-2:]
    x = maps[:, None]
    pad_h, pad_w = min(radius, height - 1), min(radius, width - 1)
    x = F.pad(x, (pad_w, pad_w, 0, 0), mode="reflect" if pad_w > 0 else "replicate")
    x = F.pad(x, (radius - pad_w, radius - pad_w, 0, 0), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, pad_h, pad_h), mode="reflect" if pad_h > 0 else "replicate")
    x = F.pad(x, (0, 0, radius - pad_h, radius - pad_h), mode="replicate")
    return F.conv2d(x, kernel.view(1, 1, -1, 1))[:, 0]


def test_smoothing_matrix_path_matches_a_convolution_reference():
    """The matrix blur (the only path now) equals a separable convolution with explicit
    padding, on maps of every shape including the degenerate ones."""
    rng = np.random.default_rng(1)
    for shape in [(2, 224, 224), (1, 3, 3), (2, 20, 24), (1, 1, 9), (3, 7, 1), (1, 1, 1)]:
        x = torch.from_numpy(rng.normal(size=shape).astype(np.float32))
        for sigma in (0.7, 2.0, 4.0):
            fast = gaussian_smooth(x, sigma)
            slow = _convolution_smooth(x, sigma)
            assert fast.shape == x.shape
            assert torch.allclose(fast, slow, atol=1e-5), (shape, sigma)
    assert gaussian_smooth(x, 0.0) is x  # sigma 0 is the identity


def test_image_scores_match_sorted_reference():
    rng = np.random.default_rng(2)
    for _ in range(50):
        h, w = (int(v) for v in rng.integers(1, 30, size=2))
        values = rng.normal(size=(3, h, w)).astype(np.float32)
        fg = rng.random((3, h, w)) < rng.random()
        fraction = float(rng.choice([0.01, 0.05, 0.25, 1.0]))
        ours = image_scores(torch.from_numpy(values), torch.from_numpy(fg), fraction)
        for i in range(3):
            fg_values = np.sort(values[i][fg[i]])[::-1]
            k = max(1, int(np.ceil(np.float32(max(1, fg_values.size)) * np.float32(fraction))))
            expected = fg_values[:k].sum() / k  # missing values count as 0
            assert float(ours[i]) == pytest.approx(float(expected), abs=1e-5)


def _reference_coreset(x: torch.Tensor, m: int, start: int) -> list[int]:
    """Textbook greedy k-center with direct float64 distances."""
    x = x.double()
    chosen = [start]
    dist = torch.linalg.vector_norm(x - x[start], dim=1)
    while len(chosen) < m:
        nxt = int(torch.argmax(dist))
        chosen.append(nxt)
        dist = torch.minimum(dist, torch.linalg.vector_norm(x - x[nxt], dim=1))
    return chosen


def test_coreset_matches_textbook_greedy_and_keeps_threads():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(60, 8, generator=gen)
    x = torch.cat([base, base[:20]])  # duplicates: exact ties must resolve the same way
    threads = torch.get_num_threads()
    picks = greedy_coreset(x, 0.25, projection_dim=None, seed=5)
    assert torch.get_num_threads() == threads
    start = int(torch.randint(80, (1,), generator=torch.Generator().manual_seed(5)))
    assert picks.tolist() == _reference_coreset(x, 20, start)


def test_speed_options_come_from_the_config_fields():
    parser = argparse.ArgumentParser()
    add_speed_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--n-images", "4", "--image-size", "112",
                                              "--anchors", "random", "--precision", "fp32"]))
    assert cfg == SpeedConfig(
        model=WinCLIPConfig(pretrained="random", image_size=112, precision="fp32"),
        n_images=4,
        anchors="random",
    )  # weights default to random; everything not given keeps its field default
    assert config_from_args(parser.parse_args([])) == SpeedConfig()
    with pytest.raises(ConfigError, match="batch_size"):
        config_from_args(parser.parse_args(["--batch-size", "0"]))


def test_methods_comparison_times_set_and_text_free_methods(tmp_path, capsys):
    """``make speed-methods``: the script's entry point, a method without text
    (anomalydino, 1-image memory) and a set method (musc, zero-shot, one set)."""
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "methods.py"
    out = tmp_path / "methods.json"
    argv = ["methods.py", "--device", "cpu", "--methods", "anomalydino", "musc",
            "--n-images", "5", "--repeats", "1", "--no-anomalib", "--json", str(out)]
    old_argv, sys.argv = sys.argv, argv
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = old_argv
    assert done.value.code == 0
    result = json.loads(out.read_text())
    assert set(result["images_per_s"]) == {"anomalydino", "musc"}
    assert all(_positive(v) for v in result["images_per_s"].values())
    assert result["models"]["musc"].endswith("no memory (zero-shot)")
    assert len(result["samples"]["musc"]) == 1  # the 5 images as one set, one repeat
    assert any(n.startswith("musc: the 5 images scored as one set") for n in result["notes"])
    assert "random weights" in capsys.readouterr().out

    from winclip_nb.bench.methods import main as methods_main

    assert methods_main(["--methods", "musc", "--n-images", "4", "--device", "cpu"]) == 2
    assert "at least 5 images; got --n-images 4" in capsys.readouterr().err


@pytest.mark.parametrize(
    "script", ["throughput.py", "methods.py", "musc_memory.py", "gpu_check.py", "loc.py"]
)
def test_benchmark_scripts_answer_help(script):
    """The ``make speed``, ``speed-methods``, ``gpu-check`` and ``loc`` scripts import and
    build their parsers (a help text with a bare % once broke argparse)."""
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / script
    done = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:")
