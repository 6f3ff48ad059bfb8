"""The MVTec-AD benchmark: result files, resume, determinism, merge, metrics, bad images,
and its command-line options (derived from the config dataclasses).

Runs use a random-init ViT-B-16 at 112 px (7 x 7 patches) on a tiny synthetic set of
two classes. One backbone is loaded per module and reused by every run (``_load_model``
is wrapped with a cache), so each class's text anchors are encoded only once.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from winclip_nb import ConfigError, WinCLIP, WinCLIPConfig, cli
from winclip_nb.bench import protocol as B
from winclip_nb.bench.command import config_from_args, configs_from_args
from winclip_nb.bench.config import BenchmarkConfig
from winclip_nb.bench.loader import TestImageDataset
from winclip_nb.bench.metrics import METRIC_KEYS
from winclip_nb.bench.report import format_table
from winclip_nb.bench.store import (
    _combine_seeds,
    _mean_over_classes,
    build_results,
    config_differences,
    config_fingerprint,
)
from winclip_nb.data import TestSample, load_mask, load_mvtec_class, make_synthetic_mvtec

CLASSES = ("disc", "weave")
TINY_SET = {"n_train": 3, "n_test_good": 2, "n_test_per_defect": 1, "image_size": 96}
N_TEST, N_DEFECTIVE = 6, 4  # 2 good + 1 per defect type (4 types)
IMAGE_SIZE = 112


def run_args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "benchmark",
        "--data-root", str(root),
        "--weights", "random",
        "--image-size", str(IMAGE_SIZE),
        "--device", "cpu",
        "--batch-size", "4",
        "--out", str(out),
        "--no-progress",
        *extra,
    ]  # fmt: skip


def model(**changes) -> WinCLIPConfig:
    """The runs' detector settings: random weights, 112 px, CPU."""
    return WinCLIPConfig(pretrained="random", image_size=IMAGE_SIZE, device="cpu", **changes)


def metrics_of(results: dict, name: str) -> dict:
    return {k: results["classes"][name][k] for k in METRIC_KEYS}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_synthetic_mvtec(tmp_path_factory.mktemp("tiny_mvtec"), list(CLASSES), **TINY_SET)


@pytest.fixture(scope="module", autouse=True)
def cached_models(reused_models):
    """Reuse one backbone per (weights, seed, model, image size, layers, device,
    precision): its text cache then makes every class's anchors a one-time cost."""
    return reused_models


@pytest.fixture(scope="module")
def joint_run(root, tmp_path_factory) -> tuple[Path, dict, str]:
    """Both classes in one CLI run: (out folder, results.json, stdout)."""
    out = tmp_path_factory.mktemp("joint") / "out"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = cli.main(run_args(root, out))
    assert code == 0, buffer.getvalue()
    return out, read_json(out / "results.json"), buffer.getvalue()


@pytest.fixture(scope="module")
def shard_runs(root, tmp_path_factory, joint_run) -> tuple[Path, Path]:
    """The same settings, one class per run, into two other folders."""
    base = tmp_path_factory.mktemp("shards")
    outs = []
    for name in CLASSES:
        out = base / name
        results = B.run_benchmark(
            BenchmarkConfig(
                model=model(batch_size=4), data_root=str(root), classes=[name], out=str(out)
            ),
            progress=False,
            verbose=False,
        )
        assert list(results["classes"]) == [name]
        outs.append(out)
    return outs[0], outs[1]


# ----------------------------------------------------------------------- result files
def test_cli_writes_every_metric_for_every_class(joint_run):
    out, results, stdout = joint_run
    assert list(results["classes"]) == list(CLASSES)
    for name in CLASSES:
        row = results["classes"][name]
        for key in METRIC_KEYS:
            assert isinstance(row[key], float) and 0.0 <= row[key] <= 100.0, (name, key)
        assert row["n_test"] == N_TEST and row["n_defective"] == N_DEFECTIVE
        assert row["images_per_s"] > 0 and row["seconds"] > 0
        assert row["skipped_files"] == []
        assert (out / "classes" / f"{name}.json").is_file()
    for key in METRIC_KEYS:  # MEAN is the mean of the classes
        expected = np.mean([results["classes"][n][key] for n in CLASSES])
        assert results["mean"][key] == pytest.approx(expected, abs=1e-3)
    config = results["config"]
    assert config["random_weights"] is True and config["synthetic"] is True
    assert config["weights"] == "random" and config["device"] == "cpu"
    assert config["seeds"] == [0] and config["k_shot"] == "full"
    # The model's settings are recorded flat, the new ones included.
    assert config["method"] == "tokens" and config["image_size"] == IMAGE_SIZE
    assert config["precision"] == "auto" and config["text_temperature"] == 0.01
    assert config["window_scales"] == [2, 3] and config["fg_threshold"] == 0.1
    assert config["scored_map"] == "anomaly_map" and "scored_maps" not in config
    assert set(config["versions"]) >= {"torch", "open_clip", "numpy", "sklearn", "winclip_nb"}
    assert "RANDOM WEIGHTS" in stdout and "SYNTHETIC" in stdout and "MEAN" in stdout

    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["class"] for r in rows] == [*CLASSES, "MEAN"]
    for row in rows:
        name = row["class"]
        source = results["mean"] if name == "MEAN" else results["classes"][name]
        for key in METRIC_KEYS:
            assert float(row[key]) == pytest.approx(source[key])


def test_rerun_skips_finished_classes_without_computing(joint_run, root, capsys, monkeypatch):
    out, results, _ = joint_run
    files = {n: out / "classes" / f"{n}.json" for n in CLASSES}
    stamps = {n: f.stat().st_mtime_ns for n, f in files.items()}

    def no_model(*args, **kwargs):
        raise AssertionError("a finished class was recomputed")

    monkeypatch.setattr(B, "_load_model", no_model)
    assert cli.main(run_args(root, out)) == 0
    stdout = capsys.readouterr().out
    for name in CLASSES:
        assert f"{name}: skipped (done)" in stdout
        assert files[name].stat().st_mtime_ns == stamps[name]
    assert read_json(out / "results.json")["classes"] == results["classes"]


def test_force_recomputes_with_identical_numbers(joint_run, root, capsys):
    out, results, _ = joint_run
    disc_file, weave_file = out / "classes" / "disc.json", out / "classes" / "weave.json"
    disc_before, weave_before = disc_file.stat().st_mtime_ns, weave_file.stat().st_mtime_ns
    assert cli.main(run_args(root, out, "--classes", "disc", "--force")) == 0
    assert "skipped" not in capsys.readouterr().out
    assert disc_file.stat().st_mtime_ns != disc_before
    assert weave_file.stat().st_mtime_ns == weave_before
    rerun = read_json(out / "results.json")
    assert list(rerun["classes"]) == list(CLASSES)  # weave still in the table
    assert metrics_of(rerun, "disc") == metrics_of(results, "disc")


def test_other_settings_in_the_same_out_are_refused(joint_run, root, capsys):
    out, results, _ = joint_run
    before = (out / "results.json").read_text()
    assert cli.main(run_args(root, out, "--k-shot", "2")) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("winclip-nb: error:")
    assert "k_shot" in err and "--force" in err and str(out) in err
    assert "Traceback" not in err
    assert (out / "results.json").read_text() == before


# --------------------------------------------------------------- determinism and merge
def test_separate_runs_give_identical_numbers(joint_run, shard_runs):
    _, joint, _ = joint_run
    for name, out in zip(CLASSES, shard_runs, strict=True):
        assert metrics_of(read_json(out / "results.json"), name) == metrics_of(joint, name)


def test_merged_shards_equal_the_joint_run(joint_run, shard_runs, tmp_path, capsys):
    _, joint, _ = joint_run
    merged_dir = tmp_path / "merged"
    assert cli.main(["merge", *map(str, shard_runs), "--out", str(merged_dir)]) == 0
    stdout = capsys.readouterr().out
    merged = read_json(merged_dir / "results.json")
    assert list(merged["classes"]) == list(CLASSES)
    for name in CLASSES:
        assert metrics_of(merged, name) == metrics_of(joint, name)
        assert merged["classes"][name]["n_test"] == joint["classes"][name]["n_test"]
    assert {k: merged["mean"][k] for k in METRIC_KEYS} == {k: joint["mean"][k] for k in METRIC_KEYS}
    assert "MEAN" in stdout and (merged_dir / "results.csv").is_file()

    # The metric columns of the printed tables agree (img/s, the last column, may differ).
    def rows(results):
        table = format_table(results).splitlines()
        return [line.rsplit(None, 1)[0] for line in table if line.startswith(CLASSES + ("MEAN",))]

    assert rows(merged) == rows(joint)


def test_merge_refuses_runs_with_other_settings(shard_runs, tmp_path, capsys):
    disc_out, weave_out = shard_runs
    changed = tmp_path / "changed"
    shutil.copytree(weave_out, changed)
    results = read_json(changed / "results.json")
    results["config"]["sigma"] = 2.0
    (changed / "results.json").write_text(json.dumps(results))
    assert cli.main(["merge", str(disc_out), str(changed), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "sigma" in err and str(changed) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m" / "results.json").exists()


# ------------------------------------------------------------------ metrics not vacuous
def _ground_truth_lookup(class_data, size: int) -> dict[bytes, np.ndarray]:
    """SHA-1 of each test image as the model sees it -> its (size, size) mask."""
    dataset = TestImageDataset(class_data.test, size, eval_size=0)
    table = {}
    for i in range(len(class_data.test)):
        item = dataset[i]
        mask = item["mask"].astype(np.uint8)
        table[hashlib.sha1(item["image"].tobytes()).hexdigest()] = cv2.resize(
            mask, (size, size), interpolation=cv2.INTER_NEAREST
        ).astype(np.float32)
    assert len(table) == len(class_data.test)
    return table


@pytest.mark.parametrize("flip", [False, True])
def test_pixel_metrics_follow_the_maps(root, monkeypatch, flip):
    """With each image's own ground truth as its anomaly map the pixel metrics are ~100;
    the same maps turned upside down (rotated 180 degrees) drop them clearly. Image scores
    are left untouched."""
    class_data = load_mvtec_class(root, "disc")
    cfg = BenchmarkConfig(model=model(), k_shot=0)
    winclip = B._load_model(cfg.validate(), "random", 0, torch.device("cpu"))
    truth = _ground_truth_lookup(class_data, IMAGE_SIZE)

    def oracle(self, resized, fitted, *args, **kwargs):
        keys = [hashlib.sha1(img.numpy().tobytes()).hexdigest() for img in resized]
        maps = torch.from_numpy(np.stack([truth[k] for k in keys]))
        if flip:
            maps = torch.flip(maps, dims=[1, 2])
        scores = torch.tensor([float(truth[k].any()) for k in keys])
        return {self.scorer.scored_map: maps, "score": scores}  # the map the metrics use

    monkeypatch.setattr(WinCLIP, "detect_batch", oracle)
    result = B.evaluate_class(winclip, class_data, cfg, progress=False)
    assert result["image_auroc"] == 100.0  # scores were not flipped
    if flip:
        assert result["pixel_auroc"] < 80.0 and result["aupro"] < 40.0
        assert result["pixel_ap"] < 30.0 and result["pixel_f1_max"] < 50.0
    else:
        assert result["pixel_auroc"] > 99.0 and result["aupro"] > 95.0
        assert result["pixel_ap"] > 90.0 and result["pixel_f1_max"] > 90.0


# --------------------------------------------------------------------------- k-shot
def test_k_shot_and_zero_shot_memories(root):
    """The class is fitted on k images (every patch kept) or none; ``evaluate_class`` hands
    the fitted class back and leaves the detector as it was (no memory kept on it)."""
    class_data = load_mvtec_class(root, "weave")
    cfg = BenchmarkConfig(model=model())
    winclip = B._load_model(cfg.validate(), "random", 0, torch.device("cpu"))
    two_shot = B.evaluate_class(
        winclip, class_data, BenchmarkConfig(model=model(), k_shot=2), progress=False,
        return_maps=True,
    )  # fmt: skip
    assert two_shot["n_memory_images"] == 2
    assert two_shot["memory_patches"] == 2 * 7 * 7  # k-shot keeps every patch
    fitted = two_shot["fitted"]
    assert fitted.memory.size == 2 * 7 * 7 and fitted.class_name == "weave"
    assert winclip.fitted is None and winclip.memory is None  # the detector is unchanged
    # A detector built for calibrated maps, used zero-shot: nothing to calibrate on.
    with pytest.warns(UserWarning, match="using per_image"):
        zero = B.evaluate_class(
            winclip, class_data, BenchmarkConfig(model=model(), k_shot=0), progress=False,
            return_maps=True,
        )  # fmt: skip
    assert zero["n_memory_images"] == 0 and zero["memory_patches"] is None
    assert zero["fitted"].memory is None and zero["fitted"].class_name == "weave"
    assert winclip.fitted is None and winclip.memory is None


def test_memory_images_follow_k_seed_and_cap(root):
    class_data = load_mvtec_class(root, "disc")
    full = BenchmarkConfig(max_images=2)
    assert B.memory_images(class_data, full, 0) == class_data.train[:2]
    one = B.memory_images(class_data, BenchmarkConfig(k_shot=1), 5)
    two = B.memory_images(class_data, BenchmarkConfig(k_shot=2), 5)
    assert len(one) == 1 and set(one) <= set(two)  # draws are nested for one seed
    draws = {tuple(B.memory_images(class_data, BenchmarkConfig(k_shot=1), s)) for s in range(8)}
    assert len(draws) > 1  # the seed chooses the images
    with pytest.raises(ConfigError, match="only 3 training images"):
        B.memory_images(class_data, BenchmarkConfig(k_shot=4), 0)


# ---------------------------------------------------------------------- bad images
@pytest.fixture()
def disc_copy(root, tmp_path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(root / "disc", copy / "disc")
    return copy


def test_corrupt_test_image_stops_or_is_skipped_with_figures(disc_copy, tmp_path, capsys):
    bad = disc_copy / "disc" / "test" / "hole" / "000.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"
    assert cli.main(run_args(disc_copy, out)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(bad) in err and "Traceback" not in err

    extra = ("--skip-bad", "--save-examples", "2", "--explain", "1")
    assert cli.main(run_args(disc_copy, out, *extra)) == 0
    stdout = capsys.readouterr().out
    row = read_json(out / "results.json")["classes"]["disc"]
    assert row["skipped_files"] == [str(bad)] and row["n_skipped"] == 1
    assert row["n_test"] == N_TEST - 1 and row["n_defective"] == N_DEFECTIVE - 1
    assert "1 unreadable test image(s) skipped" in stdout
    # The figure and the explanation of the most anomalous image(s) are written too.
    assert row["examples_figure"] == str(out / "examples" / "disc.png")
    assert (out / "examples" / "disc.png").stat().st_size > 0
    assert len(row["explanations"]) == 1 and "[RANDOM WEIGHTS]" in row["explanations"][0]
    assert len(list((out / "explain" / "disc").glob("*_report.json"))) == 1


def test_corrupt_training_image_always_stops(disc_copy, tmp_path, capsys):
    bad = disc_copy / "disc" / "train" / "good" / "001.png"
    bad.write_bytes(b"not an image")
    assert cli.main(run_args(disc_copy, tmp_path / "out", "--skip-bad")) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(bad) in err and "Traceback" not in err


# --------------------------------------------------------------------- pure helpers
def test_dataset_masks_are_nearest_resized_and_errors_reported(root, tmp_path):
    class_data = load_mvtec_class(root, "disc")
    sample = next(s for s in class_data.test if s.mask_path is not None)
    item = TestImageDataset([sample], IMAGE_SIZE, eval_size=48)[0]
    expected = cv2.resize(load_mask(sample.mask_path).astype(np.uint8), (48, 48),
                          interpolation=cv2.INTER_NEAREST) > 0  # fmt: skip
    assert item["image"].shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and item["image"].dtype == np.uint8
    assert item["mask"].dtype == bool and np.array_equal(item["mask"], expected)
    assert item["error"] == "" and item["mask"].any()
    good = next(s for s in class_data.test if s.mask_path is None)
    assert not TestImageDataset([good], IMAGE_SIZE, 48)[0]["mask"].any()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"garbage")
    bad = TestImageDataset([TestSample(broken, "hole", 1, None)], IMAGE_SIZE, 48)[0]
    assert str(broken) in bad["error"]


def test_seed_statistics_and_means():
    per_seed = {
        seed: dict.fromkeys(METRIC_KEYS, value) | {
            "n_test": 6, "n_defective": 4, "n_memory_images": 2, "memory_patches": 98,
            "seconds": 1.0, "images_per_s": 2.0, "peak_gpu_mb": None, "skipped_files": [],
        }
        for seed, value in ((0, 80.0), (1, 90.0), (2, 100.0))
    }  # fmt: skip
    combined = _combine_seeds(per_seed)
    assert combined["image_auroc"] == 90.0
    assert combined["std"]["image_auroc"] == 10.0  # sample std of 80, 90, 100
    assert combined["seconds"] == 3.0 and set(combined["per_seed"]) == {"0", "1", "2"}
    other = dict(combined, image_auroc=70.0, pixel_auroc=None)
    mean = _mean_over_classes({"a": combined, "b": other})
    assert mean["image_auroc"] == 80.0
    assert mean["pixel_auroc"] == 90.0  # an undefined metric is left out of the mean
    assert mean["n_test"] == 12


def test_format_table_rows_and_banners():
    results = build_results(
        {"random_weights": True, "weights": "random", "synthetic": True, "batch_size": 8,
         "eval_resolution": "256x256", "k_shot": "full", "k_shot_label": "full", "seeds": [0]},
        {"weave": dict.fromkeys(METRIC_KEYS, 50.0) | {"n_test": 6, "images_per_s": 2.5},
         "disc": dict.fromkeys(METRIC_KEYS, 91.25) | {"n_test": 6, "images_per_s": 3.0,
                                                     "pixel_ap": None}},
    )  # fmt: skip
    table = format_table(results)
    lines = table.splitlines()
    disc = next(line for line in lines if line.startswith("disc"))
    assert disc.split() == ["disc", "91.2", "91.2", "n/a", "91.2", "91.2", "91.2", "6", "3.0"]
    mean = next(line for line in lines if line.startswith("MEAN"))
    assert mean.split()[1:4] == ["70.6", "70.6", "50.0"]
    assert [line.split()[0] for line in lines if line.startswith(("disc", "weave"))] == [
        "disc",
        "weave",
    ]  # MVTec/alphabetical order
    assert "RANDOM WEIGHTS" in table and "SYNTHETIC" in table and "I/O included" in table


def test_fingerprint_ignores_runtime_keys_only():
    base = {"k_shot": "full", "sigma": 4.0, "out": "a", "device": "cpu", "classes": ["disc"]}
    same = dict(base, out="b", device="cuda", classes=["weave"], workers=3)
    assert config_fingerprint(base) == config_fingerprint(same)
    assert config_fingerprint(base) != config_fingerprint(dict(base, sigma=2.0))
    assert config_differences(base, dict(base, sigma=2.0)) == ["sigma: 4.0 -> 2.0"]


#: Keys a results.json config of the previous version lacks (it had ``scored_maps``, text,
#: instead of ``scored_map``).
NEW_MODEL_KEYS = (
    "precision", "text_temperature", "fg_threshold", "window_scales", "coreset_projection_dim",
    "score_top_fraction", "nn_chunk_size", "hotspot_threshold", "top_k", "min_hotspot_area",
)  # fmt: skip


@pytest.mark.parametrize(("method", "temperature"), [("tokens", 0.01), ("windows", 0.07)])
def test_fingerprint_of_an_old_config_counts_missing_keys_as_defaults(method, temperature):
    """A config written before the model's settings were recorded (no ``precision``,
    ``text_temperature``, ... and ``scored_maps`` instead of ``scored_map``) matches the
    same run now: a missing key counts as its default for that file's method. A key that
    really differs from that default still makes it another run, and is named."""
    new = BenchmarkConfig(model=WinCLIPConfig(method=method)).to_dict()
    assert new["text_temperature"] == temperature and set(NEW_MODEL_KEYS) <= set(new)
    new["scored_map"] = "raw_map" if method == "windows" else "anomaly_map"
    old = {k: v for k, v in new.items() if k not in (*NEW_MODEL_KEYS, "scored_map")}
    old["scored_maps"] = "anomaly_map and score after post-processing"
    assert config_fingerprint(old) == config_fingerprint(new)
    assert config_differences(old, new) == []
    for key, value in (("text_temperature", 0.5), ("fg_threshold", 0.3), ("precision", "fp16")):
        changed = dict(new, **{key: value})
        assert config_fingerprint(old) != config_fingerprint(changed)
        assert config_differences(old, changed) == [f"{key}: {new[key]!r} -> {value!r}"]
    # The other method's defaults are not this file's: tokens' temperature is not windows'.
    other = "tokens" if method == "windows" else "windows"
    assert config_fingerprint(dict(old, method=other)) != config_fingerprint(
        dict(new, method=other)
    )


# ------------------------------------------------------------------ command-line options
def _flags(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))


def test_benchmark_help_lists_the_options_of_both_configs(capsys):
    assert cli.main(["benchmark", "--help"]) == 0
    text = capsys.readouterr().out
    flags = _flags(text)
    protocol = {"--data-root", "--dataset", "--classes", "--k-shot", "--max-images", "--seeds",
                "--coreset-ratio", "--normalization", "--eval-size", "--workers", "--out",
                "--force", "--no-force", "--skip-bad", "--save-examples", "--explain", "--llava",
                "--llava-model", "--no-progress"}  # fmt: skip
    model_flags = {"--method", "--model", "--weights", "--image-size", "--layers", "--device",
                   "--precision", "--batch-size", "--text-temperature", "--text-weight",
                   "--nn-weight", "--fg-threshold", "--sigma", "--window-scales"}  # fmt: skip
    assert protocol | model_flags <= flags, sorted((protocol | model_flags) - flags)
    assert "--seed" not in flags  # set per run from --seeds by the protocol
    assert "--model-name" not in flags and "--pretrained" not in flags  # the old names stay
    # Help texts and defaults come from the fields.
    sigma = r"--sigma SIGMA\s+Gaussian smoothing sigma in input pixels\s+\(default:\s+4\.0\)"
    assert re.search(sigma, text)
    assert "{tokens,windows,anomalydino,musc}" in text and "{mvtec,visa,folder}" in text


def _parse(*argv: str):
    return cli.build_parser().parse_args(["benchmark", *argv])


def test_benchmark_options_parse_into_the_configs(tmp_path):
    argv = ("--text-weight", "0.5", "--layers", "6", "11", "--seeds", "0", "1")
    cfg = config_from_args(_parse(*argv))
    assert cfg == BenchmarkConfig(
        model=WinCLIPConfig(text_weight=0.5, layers=(6, 11)), seeds=(0, 1)
    ).validate()
    assert cfg.model.layers == (6, 11) and cfg.seeds == (0, 1) and cfg.model.text_weight == 0.5
    assert cfg.model.nn_weight == WinCLIPConfig().nn_weight  # not given: the field's default
    assert cfg.model.pretrained is None and cfg.k_shot == "full"

    cfg = config_from_args(_parse(
        "--method", "windows", "--weights", "random", "--dataset", "visa", "--k-shot", "2",
        "--force", "--no-skip-bad", "--coreset-ratio", "0.5", "--precision", "fp32",
        "--window-scales", "2", "--fg-threshold", "0.2", "--classes", "disc", "weave",
    ))  # fmt: skip
    assert cfg.model == WinCLIPConfig(
        method="windows", pretrained="random", precision="fp32", window_scales=(2,),
        fg_threshold=0.2,
    )  # fmt: skip
    assert cfg.model.model_name == "ViT-B-16-plus-240"  # the method's preset
    assert (cfg.dataset_format, cfg.k_shot, cfg.force, cfg.skip_bad) == ("visa", 2, True, False)
    windows_preset = WinCLIPConfig(method="windows").coreset_ratio
    assert cfg.coreset_ratio == 0.5 and cfg.model.coreset_ratio == windows_preset
    assert cfg.classes == ["disc", "weave"]
    assert config_from_args(_parse("--model", "ViT-B-32")).model.model_name == "ViT-B-32"

    out = tmp_path / "runs"
    runs = configs_from_args(_parse("--k-shot", "0", "full", "--out", str(out)))
    assert [(c.k_shot, c.out) for c in runs] == [
        (0, str(out / "zero-shot")), ("full", str(out / "full"))
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--sigma", "-1"], "sigma"),
        (["--seeds", "1", "1"], "seeds"),
        (["--layers", "9", "9"], "layers"),
        (["--text-weight", "0", "--nn-weight", "0"], "text_weight"),
        (["--text-temperature", "0"], "text_temperature"),
        (["--max-images", "-2"], "max_images"),
        (["--eval-size", "4"], "eval_size"),
        (["--coreset-ratio", "1.5"], "coreset_ratio"),
        (["--k-shot", "0", "--normalization", "calibrated"], "normalization"),
    ],
)
def test_bad_option_values_are_config_errors_naming_them(
    argv, named, tmp_path, capsys, monkeypatch
):
    with pytest.raises(ConfigError, match=named):
        config_from_args(_parse(*argv))

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built for a bad setting")

    monkeypatch.setattr(B, "_load_model", no_model)
    assert cli.main(["benchmark", "--out", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("winclip-nb: error:") and named in lines[0]
    assert not (tmp_path / "out").exists()


def test_option_values_of_the_wrong_type_are_usage_errors(capsys):
    assert cli.main(["benchmark", "--batch-size", "two"]) == 2
    assert "--batch-size" in capsys.readouterr().err
    assert cli.main(["benchmark", "--method", "patches"]) == 2
    assert "--method" in capsys.readouterr().err
    assert cli.main(["benchmark", "--k-shot", "few"]) == 2
    assert "--k-shot" in capsys.readouterr().err
