"""Bad input gets a clear error, nothing computed is lost, results are reproducible.

Case -> the tests that cover it (``file::name``); cases covered by another module's tests
are referenced there, not repeated here.

Paths and folders
  data root / class folder missing, empty train/good, class without train/good
      test_data::test_mvtec_error_cases_name_the_path
      test_cli::test_bad_data_is_one_line_naming_the_path (CLI, one line naming the path)
  image path missing
      test_data::test_missing_file_raises_data_error
      test_errors::test_missing_image_paths_name_the_path
      test_errors::test_explain_cli_checks_image_paths_before_the_model
Corrupt or truncated images
  training data: library / benchmark (stops, names the file, even with --skip-bad)
      test_errors::test_corrupt_training_image_stops_the_memory_build
      test_benchmark::test_corrupt_training_image_always_stops
  test data: library / benchmark (stops; --skip-bad: skipped, listed and counted)
      test_data::test_truncated_png_raises_naming_the_file
      test_errors::test_corrupt_test_image_stops_detect
      test_benchmark::test_corrupt_test_image_stops_or_is_skipped_with_figures
Masks and stray files
  defect image without a mask
      test_data::test_mvtec_error_cases_name_the_path
      test_cli::test_bad_data_is_one_line_naming_the_path
  mask of another size (nearest resize + DataWarning); Thumbs.db, .DS_Store, ._* ignored
      test_data::test_mask_of_other_size_is_resized_with_warning
      test_data::test_list_images_ignores_junk_and_sorts_naturally
      test_errors::test_stray_files_and_odd_mask_size_in_a_benchmark_run
Image modes and sizes through WinCLIP.detect
  gray, RGBA, palette, 16-bit PNG files; 20 x 30 and 3000 x 2000 images
      test_errors::test_image_modes_and_sizes_through_detect
      test_detector::test_inputs_of_every_kind_and_size (arrays and PIL images)
Hostile names
  explain files of class / image ``../evil``
      test_explain::test_file_names_with_dot_dot_stay_inside_out_dir
      test_errors::test_explain_cli_with_hostile_names_writes_only_in_out
  benchmark ``--classes ../x`` (DataError naming it)
      test_errors::test_benchmark_cli_settings_errors[classes]
      test_errors::test_class_name_with_dot_dot_is_a_data_error
  merge of a results.json holding a class ``../../evil``
      test_errors::test_merge_sanitises_class_file_names
Settings
  k_shot larger than the training set (exit 2, names k and the count)
      test_cli::test_settings_errors_stop_before_any_model
      test_benchmark::test_memory_images_follow_k_seed_and_cap
  coreset_ratio outside (0, 1]; weights summing to zero; unknown layers (--layers 9 12)
      test_memory::test_coreset_ratio_out_of_range
      test_detector::test_bad_memory_settings
      test_detector::test_weights_summing_to_zero_are_refused
      test_backbone::test_unknown_layer_indices_are_refused
      test_errors::test_benchmark_cli_settings_errors
      test_errors::test_debug_flag_shows_the_traceback_of_a_settings_error
Weights, device, LLaVA
  weights file missing (--weights /nonexistent.pt) / not a checkpoint
      test_backbone::test_missing_weights_file_names_the_path
      test_backbone::test_file_that_is_not_a_checkpoint_is_refused
      test_errors::test_benchmark_cli_settings_errors[missing weights]
  device="cuda" without CUDA
      test_backbone::test_cuda_without_cuda_is_a_clear_error
      test_cli::test_console_script_cuda_without_cuda_exits_2
      test_errors::test_winclip_on_cuda_without_cuda
  LLaVA fails to load or runs out of memory (rule-based, with a notice)
      test_explain::test_load_explainer_falls_back_once_and_require_raises
      test_explain::test_uncached_hub_id_fails_fast_when_offline
      test_errors::test_llava_out_of_memory_at_load_falls_back
      test_errors::test_benchmark_explains_rule_based_when_llava_cannot_load
      test_errors::test_llava_out_of_memory_while_generating
Numerics: uniform and all-zero maps (MAD = 0), all-black and all-white images
      test_maps::test_robust_stats_mad_zero_falls_back_to_std_and_constant_is_safe
      test_maps::test_uniform_maps_give_no_nan_or_inf
      test_detector::test_uniform_image_gives_finite_maps
      test_errors::test_black_and_white_images_with_a_constant_memory
Memory banks: safetensors only, a whole fitted class (format 2), matching metadata
      test_memory::test_memory_only_from_safetensors
      test_memory::test_memory_from_other_layers_is_refused
      test_detector::test_memory_from_other_layers_is_refused
      test_errors::test_memory_bank_round_trip_restores_the_whole_class
      test_errors::test_pickled_memory_banks_are_never_unpickled
      test_errors::test_memory_bank_of_another_model_is_refused (model, weights, size,
          layers, method, window scales)
      test_errors::test_memory_bank_of_the_first_format_is_refused_with_how_to_rebuild
      test_errors::test_memory_bank_without_its_tensors_is_refused
      test_errors::test_assigning_a_memory_uses_its_own_calibration
Nothing lost: a crash in the 2nd class keeps the 1st; the rerun skips it
      test_errors::test_crash_in_the_second_class_keeps_the_first
      test_benchmark::test_rerun_skips_finished_classes_without_computing
Reproducibility: coreset start, k-shot draws, synthetic data, random-init weights, runs
      test_memory::test_coreset_start_point_is_included_and_seeded
      test_data::test_sample_k_shot_deterministic_sorted_nested
      test_data::test_synthetic_generation_is_deterministic
      test_backbone::test_random_init_is_seeded
      test_benchmark::test_force_recomputes_with_identical_numbers (one cached model)
      test_benchmark::test_separate_runs_give_identical_numbers (one cached model)
      test_errors::test_fresh_model_and_disturbed_global_rng_give_identical_results

Speed: one random-init model (112 px) serves the module, and text anchors are replaced by
seeded random unit vectors (encoding 144 prompts takes ~10-20 s per class on a CPU and
plays no part in these cases; ``test_benchmark`` runs the real anchors).
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import random
import re
import shutil
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from winclip_nb import cli
from winclip_nb.bench import protocol as B
from winclip_nb.bench.config import BenchmarkConfig
from winclip_nb.bench.metrics import METRIC_KEYS
from winclip_nb.core.anchors import TextAnchors
from winclip_nb.core.config import WinCLIPConfig
from winclip_nb.core.detector import FittedClass
from winclip_nb.core.errors import (
    ConfigError,
    DataError,
    DeviceError,
    ExplainerError,
    ImageReadError,
    MemoryBankError,
)
from winclip_nb.core.maps import find_hotspots
from winclip_nb.core.results import DetectionResult
from winclip_nb.data import DataWarning, load_image, make_synthetic_mvtec, render_synthetic_image
from winclip_nb.explain.llava import ExplainerFallbackWarning, LlavaExplainer, load_explainer
from winclip_nb.explain.report import detect_and_explain, explain_result
from winclip_nb.explain.rules import RuleBasedExplainer
from winclip_nb.winclip import WinCLIP

IMAGE_SIZE = 112
EVAL_SIZE = 64  # pixel metrics at the synthetic images' own size
TINY_SET = {"n_train": 2, "n_test_good": 1, "n_test_per_defect": 1, "image_size": 64}
N_TEST = 5  # 1 good + 1 per defect type (4 types)
CPU = torch.device("cpu")


def bench(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "benchmark", "--data-root", str(root), "--weights", "random", "--device", "cpu",
        "--image-size", str(IMAGE_SIZE), "--batch-size", "8", "--eval-size", str(EVAL_SIZE),
        "--out", str(out), "--no-progress", *extra,
    ]  # fmt: skip


def single_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("winclip-nb: error: ") and "Traceback" not in err
    return lines[0]


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def truncated_png(path: Path) -> Path:
    """A PNG cut in half (header intact, pixel data missing)."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buffer, "PNG")
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return path


def all_finite(result: DetectionResult) -> bool:
    arrays = [result.anomaly_map, result.text_map, result.fused_map]
    if result.nn_map is not None:
        arrays.append(result.nn_map)
    numbers = [result.score, result.text_score, *(h.peak for h in result.hotspots)]
    return all(np.isfinite(a).all() for a in arrays) and bool(np.isfinite(numbers).all())


# ------------------------------------------------------------------------------ fixtures
def _seeded_anchors(self: WinCLIP, class_name: str) -> TextAnchors:
    """Stand-in for ``build_text_anchors``: two unit vectors seeded by the class name."""
    if not class_name or not str(class_name).strip():
        raise ConfigError(f"class_name must be a non-empty string, got {class_name!r}")
    gen = torch.Generator().manual_seed(zlib.crc32(str(class_name).encode("utf-8")))
    anchors = F.normalize(torch.randn(2, self.backbone.embed_dim, generator=gen), dim=-1)
    return TextAnchors(anchors[0].to(self.device), anchors[1].to(self.device), str(class_name))


@pytest.fixture(scope="module", autouse=True)
def seeded_anchors():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(WinCLIP, "build_text_anchors", _seeded_anchors)
        yield


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_synthetic_mvtec(tmp_path_factory.mktemp("err_mvtec"), ["disc", "weave"], **TINY_SET)


@pytest.fixture(scope="module")
def winclip() -> WinCLIP:
    """The model a benchmark run with these settings builds (random init, seed 0, 112 px)."""
    model = WinCLIPConfig(pretrained="random", image_size=IMAGE_SIZE, device="cpu")
    cfg = BenchmarkConfig(model=model).validate()
    return B._load_model(cfg, "random", 0, CPU)


@pytest.fixture()
def reuse_model(monkeypatch, winclip):
    """Benchmark runs use the module's model instead of building one."""
    monkeypatch.setattr(B, "_load_model", lambda *args, **kwargs: winclip)


@pytest.fixture()
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the error was found")

    monkeypatch.setattr(B, "_load_model", refuse)


@pytest.fixture(scope="module")
def disc_bank(winclip, root) -> tuple[FittedClass, TextAnchors]:
    """The disc class fitted on its two training images (once) and the disc anchors."""
    anchors = winclip.build_text_anchors("disc")
    train = sorted((root / "disc" / "train" / "good").glob("*.png"))
    return winclip.build_normal_memory(train, *anchors, progress=False), anchors


@pytest.fixture()
def disc_memory(winclip, disc_bank):
    """The module's model with the fitted disc class in place; returns the disc anchors."""
    fitted, anchors = disc_bank
    winclip.fitted = fitted
    assert fitted.class_name == "disc"
    return anchors


@pytest.fixture()
def disc_copy(root, tmp_path) -> Path:
    """A writable dataset root holding only a copy of the disc class."""
    copy = tmp_path / "data"
    shutil.copytree(root / "disc", copy / "disc")
    return copy


# ----------------------------------------------------------------------- paths, corrupt images
def test_missing_image_paths_name_the_path(winclip, disc_memory, root, tmp_path):
    missing = tmp_path / "nowhere" / "000.png"
    with pytest.raises(DataError, match=r"not found: .*nowhere.000\.png") as info:
        winclip.detect(missing, *disc_memory)
    assert not isinstance(info.value, ImageReadError)
    good = root / "disc" / "train" / "good" / "000.png"
    with pytest.raises(DataError, match=r"nowhere.000\.png"):
        winclip.build_normal_memory([good, missing], *disc_memory, progress=False)


def test_corrupt_training_image_stops_the_memory_build(winclip, disc_memory, root, tmp_path):
    before = winclip.fitted
    bad = truncated_png(tmp_path / "train" / "001.png")
    good = root / "disc" / "train" / "good" / "000.png"
    with pytest.raises(ImageReadError, match=r"train.001\.png.*corrupt, truncated"):
        winclip.build_normal_memory([good, bad], *disc_memory, progress=False)
    assert winclip.fitted is before  # the previous class is kept, not half replaced


def test_corrupt_test_image_stops_detect(winclip, disc_memory, root, tmp_path):
    bad = tmp_path / "test" / "Thumbnail.png"
    bad.parent.mkdir()
    bad.write_text("not an image at all")
    good = root / "disc" / "test" / "good" / "000.png"
    with pytest.raises(ImageReadError, match=r"Thumbnail\.png"):
        winclip.detect([good, bad], *disc_memory)


# ------------------------------------------------------------------ image modes and sizes
def test_image_modes_and_sizes_through_detect(winclip, disc_memory, tmp_path):
    base = render_synthetic_image("disc", "hole", image_size=64, seed=3).image  # (64, 64, 3)
    gray = np.ascontiguousarray(base[..., 1])
    files = {
        "gray": Image.fromarray(gray, "L"),
        "rgba": Image.fromarray(np.dstack([base, np.full((64, 64), 255, np.uint8)]), "RGBA"),
        "palette": Image.fromarray(base).quantize(colors=64),
        "palette_alpha": Image.fromarray(base).quantize(colors=64),
        "16bit": Image.fromarray(gray.astype(np.uint16) * 257),
        "tiny": Image.fromarray(cv2.resize(base, (30, 20), interpolation=cv2.INTER_AREA)),
        "large": Image.fromarray(cv2.resize(base, (3000, 2000), interpolation=cv2.INTER_CUBIC)),
    }
    files["palette_alpha"].info["transparency"] = 0
    paths = {}
    for name, img in files.items():
        paths[name] = tmp_path / f"{name}.png"
        img.save(paths[name])
    assert Image.open(paths["16bit"]).mode.startswith("I;16")
    assert Image.open(paths["palette"]).mode == "P"

    references = {  # what each file must decode to: the same image as an 8-bit RGB array
        "gray": np.repeat(gray[..., None], 3, axis=2),
        "16bit": np.repeat(gray[..., None], 3, axis=2),
        "rgba": base,
        "palette": np.asarray(files["palette"].convert("RGB")),
    }
    names = list(paths)
    inputs = [paths[n] for n in names] + list(references.values())
    results = winclip.detect(inputs, *disc_memory, batch_size=len(inputs))  # one batch
    by_name = dict(zip(names, results[: len(names)], strict=True))
    expected_shapes = {"tiny": (20, 30), "large": (2000, 3000)}
    for name, result in by_name.items():
        shape = expected_shapes.get(name, (64, 64))
        assert result.anomaly_map.shape == result.fg_mask.shape == shape, name
        assert all_finite(result), name
        for hotspot in result.hotspots:
            x0, y0, x1, y1 = hotspot.box
            assert 0 <= x0 < x1 <= shape[1] and 0 <= y0 < y1 <= shape[0], name
    # A 16-bit PNG is scaled (/257), not clipped; gray, RGBA and palette decode exactly.
    for name, reference in zip(references, results[len(names) :], strict=True):
        np.testing.assert_array_equal(load_image(paths[name]), references[name], err_msg=name)
        np.testing.assert_allclose(
            by_name[name].anomaly_map, reference.anomaly_map, atol=1e-3, err_msg=name
        )


# ------------------------------------------------------------------------------ numerics
def test_black_and_white_images_with_a_constant_memory(winclip, disc_memory):
    """All-black training images make every calibration spread zero (MAD = 0, std = 0)."""
    black = np.zeros((80, 80, 3), np.uint8)
    images = [black, np.full((80, 80, 3), 255, np.uint8), np.full((80, 80), 128, np.uint8)]
    winclip.build_normal_memory([black, black.copy()], *disc_memory, progress=False)
    for normalization in ("calibrated", "per_image"):
        for result in winclip.detect(images, *disc_memory, normalization=normalization):
            assert all_finite(result), normalization
            assert result.anomaly_map.shape == (80, 80)
    winclip.fitted = None  # zero-shot: text map only
    with pytest.warns(UserWarning, match="calibrated normalisation needs .*using per_image"):
        zero_shot = winclip.detect(images, *disc_memory)
    assert all(all_finite(r) and r.nn_map is None for r in zero_shot)
    assert all(r.normalization == "per_image" and r.text_map is not None for r in zero_shot)


def test_assigning_a_memory_uses_its_own_calibration(winclip, disc_memory, root):
    """A fitted class carries its own calibration: switching classes (``winclip.fitted``
    or ``detect(fitted=...)``) never mixes one memory with another's statistics."""
    image = root / "disc" / "test" / "hole" / "000.png"
    expected = winclip.detect(image, *disc_memory).anomaly_map
    disc = winclip.fitted
    black = np.zeros((64, 64, 3), np.uint8)
    black_fit = winclip.build_normal_memory([black, black.copy()], *disc_memory, progress=False)
    assert winclip.fitted is black_fit and black_fit.calibration is not disc.calibration
    on_black = winclip.detect(image, *disc_memory).anomaly_map  # the black memory
    assert not np.allclose(on_black, expected, atol=1e-4)
    np.testing.assert_allclose(  # another class given explicitly, the fitted one untouched
        winclip.detect(image, fitted=disc).anomaly_map, expected, atol=1e-4
    )
    assert winclip.fitted is black_fit
    winclip.fitted = disc  # e.g. switching between the memories of several classes
    np.testing.assert_allclose(winclip.detect(image, *disc_memory).anomaly_map, expected, atol=1e-4)


# -------------------------------------------------------------------------- memory banks
#: What the module's model records in a bank file, and a value of another model for each.
OUR_SETTINGS = {
    "model_name": "ViT-B-16",
    "weights": "random",
    "image_size": IMAGE_SIZE,
    "layers": [9, 10, 11],
    "method": "tokens",
    "window_scales": [2, 3],
}


def test_memory_bank_round_trip_restores_the_whole_class(winclip, disc_memory, root, tmp_path):
    """A bank file holds the fitted class: memory, calibration and anchors (format 2)."""
    image = root / "disc" / "test" / "hole" / "000.png"
    disc = winclip.fitted
    expected = winclip.detect(image, *disc_memory).anomaly_map
    path = winclip.save_memory(tmp_path / "disc.safetensors")
    winclip.fitted = None
    loaded = winclip.load_memory(path)
    assert winclip.fitted is loaded and loaded.class_name == "disc"
    assert torch.equal(loaded.memory.bank, disc.memory.bank)
    assert loaded.calibration.branch_stats == disc.calibration.branch_stats
    assert all(torch.equal(a, b) for a, b in zip(loaded.anchors, disc.anchors, strict=True))
    # No anchors needed: the loaded class detects as the one that was saved.
    np.testing.assert_allclose(winclip.detect(image).anomaly_map, expected, atol=1e-5)


@pytest.mark.parametrize(
    "key, value",
    [
        ("model_name", "ViT-L-14"),
        ("weights", "openai"),
        ("image_size", 224),
        ("layers", [6, 9]),
        ("method", "windows"),
        ("window_scales", [2]),
    ],
)
def test_memory_bank_of_another_model_is_refused(winclip, disc_memory, tmp_path, key, value):
    from winclip_nb.data.banks import save_fitted

    fitted = winclip.fitted
    settings = winclip._model_settings()
    assert settings == OUR_SETTINGS
    path = save_fitted(fitted, tmp_path / "other.safetensors", dict(settings, **{key: value}))
    with pytest.raises(MemoryBankError, match=re.escape(f"{key}={value!r}") + ".*rebuild") as info:
        winclip.load_memory(path)
    ours = OUR_SETTINGS[key]
    assert str(path) in str(info.value) and f"this model uses {key}={ours!r}" in str(info.value)
    assert winclip.fitted is fitted  # the refused bank replaced nothing


def test_memory_bank_of_the_first_format_is_refused_with_how_to_rebuild(
    winclip, disc_memory, tmp_path
):
    """Format 1 stored only a memory (bank and sources, settings flat in the header)."""
    from safetensors.torch import save_file

    fitted = winclip.fitted
    memory = fitted.memory
    old_meta = dict(OUR_SETTINGS, format_version=1, coreset_ratio=0.1, n_images=2)
    path = tmp_path / "format1.safetensors"
    tensors = {
        "bank": memory.bank.contiguous(),
        "source_image": memory.source_image.contiguous(),
        "source_patch": memory.source_patch.contiguous(),
    }
    save_file(tensors, str(path), metadata={"winclip_nb": json.dumps(old_meta, sort_keys=True)})
    with pytest.raises(MemoryBankError, match=r"older format \(1\); rebuild it") as info:
        winclip.load_memory(path)
    message = str(info.value)
    assert str(path) in message
    assert "build_normal_memory" in message and "save_memory" in message  # how to rebuild
    assert winclip.fitted is fitted


class _WritesFileWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_memory_banks_are_never_unpickled(winclip, tmp_path):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps({"bank": _WritesFileWhenUnpickled(marker)})
    before = winclip.fitted
    for name in ("bank.pt", "bank.safetensors", "bank.pkl"):
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(MemoryBankError, match=name.replace(".", r"\.")):
            winclip.load_memory(tmp_path / name)
    assert not marker.exists()
    # A valid safetensors file that was not written by save_memory.
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"bank": torch.zeros(1, 2, 3)}, str(plain))
    with pytest.raises(MemoryBankError, match=r"plain\.safetensors is not a winclip_nb memory"):
        winclip.load_memory(plain)
    assert winclip.fitted is before


@pytest.mark.parametrize(
    "prefix, named",
    [
        ("memory.", r"does not hold a NormalMemory: .*'bank'"),
        ("anchors.", r"is not a complete memory bank: 'anchors\.normal' is missing"),
        ("calibration.fg", r"is not a complete memory bank: 'calibration\.fg_masks' is missing"),
    ],
    ids=["memory", "anchors", "calibration masks"],
)
def test_memory_bank_without_its_tensors_is_refused(winclip, disc_memory, tmp_path, prefix, named):
    """The header of a bank of this very model, but tensors of the class missing."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    fitted = winclip.fitted
    full = winclip.save_memory(tmp_path / "full.safetensors")
    with safe_open(str(full), framework="pt") as handle:
        header = handle.metadata()
    tensors = {k: v for k, v in load_file(str(full)).items() if not k.startswith(prefix)}
    tensors["something_else"] = torch.zeros(2)
    path = tmp_path / "empty.safetensors"
    save_file(tensors, str(path), metadata=header)
    with pytest.raises(MemoryBankError, match=r"empty\.safetensors " + named):
        winclip.load_memory(path)
    assert winclip.fitted is fitted


# ------------------------------------------------------------------------------ device
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_winclip_on_cuda_without_cuda():
    with pytest.raises(DeviceError, match=r"'cuda'.*CUDA is not available"):
        WinCLIP(device="cuda", pretrained="random")


# --------------------------------------------------------------------- benchmark settings
@pytest.mark.parametrize(
    "extra, named",
    [
        (["--layers", "9", "12"], "unknown layer indices [12]"),
        (["--weights", "/nonexistent.pt"], "weights file not found: /nonexistent.pt"),
        (["--classes", "../x"], "invalid class name '../x'"),
        (["--coreset-ratio", "1.5"], "coreset_ratio must be a number in (0, 1], got 1.5"),
        (["--text-weight", "0", "--nn-weight", "0"], "text_weight + nn_weight must be > 0"),
        (["--image-size", "16"], "image_size must be an integer >= 32, got 16"),
    ],
    ids=["layers 9 12", "missing weights", "classes", "coreset ratio", "zero weights", "size"],
)
def test_benchmark_cli_settings_errors(disc_copy, tmp_path, capsys, no_model, extra, named):
    before = files_under(tmp_path)
    assert cli.main(bench(disc_copy, tmp_path / "out", *extra)) == 2
    captured = capsys.readouterr()
    assert named in single_error_line(captured.err)
    assert files_under(tmp_path) == before  # nothing written, inside the out folder or not
    assert not (tmp_path / "out").exists()


def test_class_name_with_dot_dot_is_a_data_error(disc_copy, tmp_path, no_model):
    cfg = BenchmarkConfig(
        data_root=str(disc_copy),
        classes=["../x"],
        model=WinCLIPConfig(pretrained="random"),
        out=str(tmp_path / "o"),
    )
    with pytest.raises(DataError, match=r"invalid class name '\.\./x'"):
        B.run_benchmark(cfg, progress=False, verbose=False)


def test_debug_flag_shows_the_traceback_of_a_settings_error(disc_copy, tmp_path, capsys, no_model):
    assert cli.main(["--debug", *bench(disc_copy, tmp_path / "o", "--layers", "9", "12")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "ConfigError" in err and "[12]" in err


def test_merge_sanitises_class_file_names(tmp_path, capsys):
    shard = tmp_path / "deep" / "shard"
    row = dict.fromkeys(METRIC_KEYS, 50.0) | {"n_test": 2, "images_per_s": 1.0, "seconds": 1.0}
    shard.mkdir(parents=True)
    (shard / "results.json").write_text(
        json.dumps({"config": {"k_shot": "full"}, "classes": {"../../evil": row}})
    )
    out = tmp_path / "deep" / "merged"
    before = files_under(tmp_path)
    assert cli.main(["merge", str(shard), "--out", str(out)]) == 0
    capsys.readouterr()
    written = files_under(tmp_path) - before
    assert written and all(out in p.parents for p in written)
    assert out / "classes" / "____evil.json" in written
    merged = json.loads((out / "results.json").read_text())
    assert list(merged["classes"]) == ["../../evil"]  # the name itself is kept, only files change


# ----------------------------------------------------------------- stray files in a run
def test_stray_files_and_odd_mask_size_in_a_benchmark_run(disc_copy, tmp_path, reuse_model):
    cls = disc_copy / "disc"
    junk_dirs = [
        disc_copy,
        cls,
        cls / "train" / "good",
        cls / "test",
        cls / "test" / "good",
        cls / "test" / "hole",
        cls / "ground_truth" / "hole",
    ]
    for folder in junk_dirs:
        (folder / "Thumbs.db").write_bytes(b"\x00junk")
        (folder / ".DS_Store").write_bytes(b"Bud1junk")
        (folder / "desktop.ini").write_text("[.ShellClassInfo]")
        (folder / "._000.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    for hidden in (cls / "test" / ".ipynb_checkpoints", disc_copy / "__MACOSX" / "disc"):
        hidden.mkdir(parents=True)
        (hidden / "._001.png").write_bytes(b"\x00\x05\x16\x07")
    (cls / "test" / ".ipynb_checkpoints" / "000.png").write_bytes(b"not an image")
    # A mask saved at half the size of its image.
    mask_path = cls / "ground_truth" / "hole" / "000_mask.png"
    mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(mask_path), cv2.resize(mask, (32, 32), interpolation=cv2.INTER_NEAREST))

    out = tmp_path / "out"
    stdout = io.StringIO()
    with pytest.warns(DataWarning, match=r"000_mask\.png is 32x32 .* 64x64"):
        with contextlib.redirect_stdout(stdout):
            code = cli.main(bench(disc_copy, out))
    assert code == 0, stdout.getvalue()
    results = json.loads((out / "results.json").read_text())
    assert list(results["classes"]) == ["disc"]  # __MACOSX is not a class
    row = results["classes"]["disc"]
    assert (row["n_test"], row["n_defective"], row["n_memory_images"]) == (N_TEST, 4, 2)
    assert row["skipped_files"] == [] and row["n_skipped"] == 0
    assert all(isinstance(row[k], float) for k in METRIC_KEYS)


# ------------------------------------------------------------------------- nothing lost
def test_crash_in_the_second_class_keeps_the_first(root, tmp_path, reuse_model, monkeypatch):
    cfg = BenchmarkConfig(
        data_root=str(root),
        classes=["disc", "weave"],
        model=WinCLIPConfig(pretrained="random", image_size=IMAGE_SIZE, device="cpu"),
        eval_size=EVAL_SIZE,
        out=str(tmp_path / "out"),
    )
    real_evaluate = B.evaluate_class
    evaluated: list[str] = []

    def crash_on_weave(winclip, class_data, *args, **kwargs):
        evaluated.append(class_data.name)
        if class_data.name == "weave":
            raise RuntimeError("simulated crash while evaluating weave")
        return real_evaluate(winclip, class_data, *args, **kwargs)

    monkeypatch.setattr(B, "evaluate_class", crash_on_weave)
    with pytest.raises(RuntimeError, match="simulated crash"):
        B.run_benchmark(cfg, progress=False, verbose=False)
    out = tmp_path / "out"
    disc_file = out / "classes" / "disc.json"
    disc_bytes = disc_file.read_bytes()
    first = json.loads((out / "results.json").read_text())
    assert list(first["classes"]) == ["disc"]
    assert sorted(p.name for p in (out / "classes").iterdir()) == ["disc.json"]  # no temp files

    # The rerun computes only the missing class and leaves the finished one untouched.
    evaluated.clear()

    def record(winclip, class_data, *args, **kwargs):
        evaluated.append(class_data.name)
        return real_evaluate(winclip, class_data, *args, **kwargs)

    monkeypatch.setattr(B, "evaluate_class", record)
    results = B.run_benchmark(cfg, progress=False, verbose=False)
    assert evaluated == ["weave"]
    assert disc_file.read_bytes() == disc_bytes
    assert list(results["classes"]) == ["disc", "weave"]
    assert results["classes"]["disc"] == first["classes"]["disc"]


# ------------------------------------------------------------------------ reproducibility
def test_fresh_model_and_disturbed_global_rng_give_identical_results(root, tmp_path, winclip):
    """The same settings and seed give the same numbers with a newly built model even after
    the global torch / numpy / random generators were reseeded (nothing depends on them)."""
    outs = [tmp_path / "a", tmp_path / "b"]

    def run(out: Path, extra: tuple[str, ...] = ()) -> dict:
        argv = bench(root, out, "--classes", "disc", "--coreset-ratio", "0.5", *extra)
        with contextlib.redirect_stdout(io.StringIO()):
            assert cli.main(argv) == 0
        return json.loads((out / "classes" / "disc.json").read_text())

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(B, "_load_model", lambda *a, **k: winclip)  # the module's (used) model
        first = run(outs[0])
    built = []
    real_load = B._load_model

    def fresh(*args, **kwargs):
        built.append(args[2])
        return real_load(*args, **kwargs)

    torch.manual_seed(1234)
    np.random.seed(1234)
    random.seed(1234)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(B, "_load_model", fresh)
        second = run(outs[1])
    assert built == [0]  # really a new model, drawn from seed 0
    assert first["fingerprint"] == second["fingerprint"]
    keys = (*METRIC_KEYS, "n_test", "n_memory_images", "memory_patches")
    assert {k: first["result"][k] for k in keys} == {k: second["result"][k] for k in keys}
    assert first["result"]["memory_patches"] == 49  # ceil(0.5 * 2 images * 7 * 7 patches)


# ------------------------------------------------------------------------------ explain
def _fail_llava_load(monkeypatch, error: BaseException, where: str) -> None:
    """Make loading LLaVA raise ``error`` inside the transformers loader or around it."""
    if where == "from_pretrained":

        def raise_error(*args, **kwargs):
            raise error

        monkeypatch.setattr(LlavaExplainer, "from_pretrained", raise_error)
        return
    import transformers

    # transformers swaps its module object in sys.modules on first use: patch the live one.
    _ = transformers.AutoProcessor, transformers.LlavaOnevisionForConditionalGeneration
    transformers = sys.modules["transformers"]

    class Processor:
        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            return cls()

    class Model:
        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            raise error

    monkeypatch.setattr(transformers, "AutoProcessor", Processor)
    monkeypatch.setattr(transformers, "LlavaOnevisionForConditionalGeneration", Model)


@pytest.mark.parametrize("where", ["transformers", "from_pretrained"])
@pytest.mark.parametrize(
    "error",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA out of memory"),
    ],
    ids=["OutOfMemoryError", "RuntimeError"],
)
def test_llava_out_of_memory_at_load_falls_back(
    winclip, disc_memory, root, tmp_path, monkeypatch, capsys, error, where
):
    llava_dir = tmp_path / "llava-model"
    llava_dir.mkdir()
    _fail_llava_load(monkeypatch, error, where)
    image = root / "disc" / "test" / "hole" / "000.png"
    with pytest.warns(ExplainerFallbackWarning) as caught:
        report = detect_and_explain(
            winclip, image, *disc_memory, "disc", use_llava=True, llava_model=llava_dir,
            out_dir=tmp_path / "out",
        )  # fmt: skip
    notice = str(caught[0].message)
    assert notice.startswith("LLaVA-OneVision could not be loaded")
    assert str(llava_dir) in notice and "out of memory" in notice
    assert report["explainer"] == "rule-based"
    assert "Explainer:      rule-based" in report["explanation"]
    saved = json.loads(Path(report["paths"]["report_json"]).read_text())
    assert saved["explainer"] == "rule-based"
    # LLaVA required: the same cause is an ExplainerError naming the model.
    with pytest.raises(ExplainerError, match=f"{re.escape(str(llava_dir))}.*out of memory"):
        load_explainer("require", llava_dir, device="cpu")


def test_benchmark_explains_rule_based_when_llava_cannot_load(
    disc_copy, tmp_path, capsys, reuse_model
):
    """``--llava`` with a LLaVA that cannot be loaded: a notice, rule-based explanations, and
    the class's metrics are saved (the explainer is loaded before any class is computed)."""
    missing_llava = tmp_path / "no-llava-here"
    argv = bench(disc_copy, tmp_path / "out", "--explain", "1", "--llava", "--llava-model",
                 str(missing_llava))  # fmt: skip
    with pytest.warns(ExplainerFallbackWarning, match="LLaVA-OneVision could not be loaded") as w:
        assert cli.main(argv) == 0
    assert str(missing_llava) in str(w[0].message)
    # outside pytest the CLI prints it as one line
    assert cli._one_line_warning(w[0].message, w[0].category, "f.py", 1) == (
        f"winclip-nb: warning: {w[0].message}\n"
    )
    row = json.loads((tmp_path / "out" / "classes" / "disc.json").read_text())["result"]
    assert row["explainer"] == "rule-based" and len(row["explanations"]) == 1
    (report,) = (tmp_path / "out" / "explain" / "disc").glob("*_report.json")
    assert json.loads(report.read_text())["explainer"] == "rule-based"


def test_llava_out_of_memory_while_generating(monkeypatch):
    image = np.zeros((96, 96, 3), np.uint8)
    image[20:80, 20:80] = 150
    image[40:46, 40:46] = 20
    yy, xx = np.mgrid[0:96, 0:96]
    anomaly_map = (9.0 * np.exp(-((xx - 43) ** 2 + (yy - 43) ** 2) / 32.0)).astype(np.float32)
    fg = np.zeros((96, 96), bool)
    fg[20:80, 20:80] = True
    result = DetectionResult(
        anomaly_map=anomaly_map, score=9.0, branch_maps={"text_map": np.zeros((7, 7), np.float32)},
        fused_map=np.zeros((7, 7), np.float32), fg_mask=fg,
        hotspots=find_hotspots(anomaly_map, 3.0, 3, 0.0, fg), text_score=0.5,
        normalization="calibrated", random_weights=False,
    )  # fmt: skip
    explainer = LlavaExplainer(None, None, "llava:fake", "cpu", torch.float32, 3.0)

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    monkeypatch.setattr(explainer, "ask", out_of_memory)
    report = explain_result(result, image, "disc", explainer)
    (region,) = report["regions"]
    assert region["description_source"].startswith("rule-based (LLaVA failed: OutOfMemoryError")
    rule_based = RuleBasedExplainer(3.0).explain_region(image, result, result.hotspots[0], "disc")
    assert region["description"] == rule_based["description"]
    assert "(description source: rule-based (LLaVA failed" in report["explanation"]


def test_explain_cli_checks_image_paths_before_the_model(tmp_path, capsys, monkeypatch, root):
    import winclip_nb.winclip as winclip_module

    def refuse(**kwargs):
        raise AssertionError("the model was built before the image paths were checked")

    monkeypatch.setattr(winclip_module, "WinCLIP", refuse)
    missing = tmp_path / "missing.png"
    argv = [
        "explain", str(root / "disc" / "test" / "good" / "000.png"), str(missing),
        "--class-name", "disc", "--train-dir", str(root / "disc" / "train" / "good"),
        "--weights", "random", "--no-llava", "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    assert cli.main(argv) == 2
    line = single_error_line(capsys.readouterr().err)
    assert str(missing) in line and "000.png" not in line.replace(str(missing), "")
    assert not (tmp_path / "out").exists()


def test_explain_cli_with_hostile_names_writes_only_in_out(
    winclip, root, tmp_path, capsys, monkeypatch
):
    import winclip_nb.winclip as winclip_module

    monkeypatch.setattr(winclip_module, "WinCLIP", lambda **kwargs: winclip)
    source = root / "disc" / "test" / "hole" / "000.png"
    images = []
    for name in ("..evil.png", "...png"):
        images.append(tmp_path / "in" / name)
        images[-1].parent.mkdir(exist_ok=True)
        shutil.copy(source, images[-1])
    out = tmp_path / "work" / "out"
    before = files_under(tmp_path)
    argv = [
        "explain", *map(str, images), str(tmp_path / "in" / ".." / "in" / "..evil.png"),
        "--class-name", "../evil", "--train-dir", str(root / "disc" / "train" / "good"),
        "--weights", "random", "--no-llava", "--out", str(out),
    ]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    written = files_under(tmp_path) - before
    assert len(written) == 3 * 4  # heat map, boxes, text and JSON report per image
    assert all(p.parent == out and not p.name.startswith(".") for p in written)
    assert "[../evil]" in capsys.readouterr().out  # the class name is printed as given
