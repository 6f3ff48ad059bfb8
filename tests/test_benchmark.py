"""The MVTec-AD benchmark: result files, resume, determinism, merge, metrics, bad images.

Runs use a random-init ViT-B-16 at 112 px (7 x 7 patches) on a tiny synthetic set of
two classes. One model is built per module and reused by every run (``_load_model`` is
wrapped with a cache), so each class's text anchors are encoded only once.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from winclip_nb import benchmark as B
from winclip_nb import cli
from winclip_nb.data import load_mask, load_mvtec_class, make_synthetic_mvtec
from winclip_nb.detector import WinCLIP
from winclip_nb.metrics import METRIC_KEYS

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
    """Reuse one model per (weights, seed, image size, layers): its text cache then
    makes every class's anchors a one-time cost. Records how many models were built."""
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
            B.BenchmarkConfig(
                data_root=str(root),
                classes=[name],
                weights="random",
                image_size=IMAGE_SIZE,
                device="cpu",
                batch_size=4,
                out=str(out),
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
        table = B.format_table(results).splitlines()
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
    dataset = B.TestImageDataset(class_data.test, size, eval_size=0)
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
    cfg = B.BenchmarkConfig(weights="random", image_size=IMAGE_SIZE, device="cpu", k_shot=0)
    winclip = B._load_model(cfg.validate(), "random", 0, torch.device("cpu"))
    truth = _ground_truth_lookup(class_data, IMAGE_SIZE)

    def oracle(self, resized, *args, **kwargs):
        keys = [hashlib.sha1(img.numpy().tobytes()).hexdigest() for img in resized]
        maps = torch.from_numpy(np.stack([truth[k] for k in keys]))
        if flip:
            maps = torch.flip(maps, dims=[1, 2])
        return {"anomaly_map": maps, "score": torch.tensor([float(truth[k].any()) for k in keys])}

    monkeypatch.setattr(WinCLIP, "detect_resized", oracle)
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
    class_data = load_mvtec_class(root, "weave")
    cfg = B.BenchmarkConfig(weights="random", image_size=IMAGE_SIZE, device="cpu")
    winclip = B._load_model(cfg.validate(), "random", 0, torch.device("cpu"))
    two_shot = B.evaluate_class(
        winclip,
        class_data,
        B.BenchmarkConfig(weights="random", image_size=IMAGE_SIZE, device="cpu", k_shot=2),
        progress=False,
    )
    assert two_shot["n_memory_images"] == 2
    assert two_shot["memory_patches"] == 2 * 7 * 7  # k-shot keeps every patch
    zero = B.evaluate_class(
        winclip,
        class_data,
        B.BenchmarkConfig(weights="random", image_size=IMAGE_SIZE, device="cpu", k_shot=0),
        progress=False,
    )
    assert zero["n_memory_images"] == 0 and zero["memory_patches"] is None
    assert winclip.memory is None


def test_memory_images_follow_k_seed_and_cap(root):
    class_data = load_mvtec_class(root, "disc")
    full = B.BenchmarkConfig(max_images=2)
    assert B.memory_images(class_data, full, 0) == class_data.train[:2]
    one = B.memory_images(class_data, B.BenchmarkConfig(k_shot=1), 5)
    two = B.memory_images(class_data, B.BenchmarkConfig(k_shot=2), 5)
    assert len(one) == 1 and set(one) <= set(two)  # draws are nested for one seed
    draws = {tuple(B.memory_images(class_data, B.BenchmarkConfig(k_shot=1), s)) for s in range(8)}
    assert len(draws) > 1  # the seed chooses the images
    with pytest.raises(B.ConfigError, match="only 3 training images"):
        B.memory_images(class_data, B.BenchmarkConfig(k_shot=4), 0)


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
    item = B.TestImageDataset([sample], IMAGE_SIZE, eval_size=48)[0]
    expected = cv2.resize(load_mask(sample.mask_path).astype(np.uint8), (48, 48),
                          interpolation=cv2.INTER_NEAREST) > 0  # fmt: skip
    assert item["image"].shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and item["image"].dtype == np.uint8
    assert item["mask"].dtype == bool and np.array_equal(item["mask"], expected)
    assert item["error"] == "" and item["mask"].any()
    good = next(s for s in class_data.test if s.mask_path is None)
    assert not B.TestImageDataset([good], IMAGE_SIZE, 48)[0]["mask"].any()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"garbage")
    bad = B.TestImageDataset([B.TestSample(broken, "hole", 1, None)], IMAGE_SIZE, 48)[0]
    assert str(broken) in bad["error"]


def test_seed_statistics_and_means():
    per_seed = {
        seed: dict.fromkeys(METRIC_KEYS, value) | {
            "n_test": 6, "n_defective": 4, "n_memory_images": 2, "memory_patches": 98,
            "seconds": 1.0, "images_per_s": 2.0, "peak_gpu_mb": None, "skipped_files": [],
        }
        for seed, value in ((0, 80.0), (1, 90.0), (2, 100.0))
    }  # fmt: skip
    combined = B._combine_seeds(per_seed)
    assert combined["image_auroc"] == 90.0
    assert combined["std"]["image_auroc"] == 10.0  # sample std of 80, 90, 100
    assert combined["seconds"] == 3.0 and set(combined["per_seed"]) == {"0", "1", "2"}
    other = dict(combined, image_auroc=70.0, pixel_auroc=None)
    mean = B._mean_over_classes({"a": combined, "b": other})
    assert mean["image_auroc"] == 80.0
    assert mean["pixel_auroc"] == 90.0  # an undefined metric is left out of the mean
    assert mean["n_test"] == 12


def test_format_table_rows_and_banners():
    results = B.build_results(
        {"random_weights": True, "weights": "random", "synthetic": True, "batch_size": 8,
         "eval_resolution": "256x256", "k_shot": "full", "k_shot_label": "full", "seeds": [0]},
        {"weave": dict.fromkeys(METRIC_KEYS, 50.0) | {"n_test": 6, "images_per_s": 2.5},
         "disc": dict.fromkeys(METRIC_KEYS, 91.25) | {"n_test": 6, "images_per_s": 3.0,
                                                     "pixel_ap": None}},
    )  # fmt: skip
    table = B.format_table(results)
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
    assert B.config_fingerprint(base) == B.config_fingerprint(same)
    assert B.config_fingerprint(base) != B.config_fingerprint(dict(base, sigma=2.0))
    assert B.config_differences(base, dict(base, sigma=2.0)) == ["sigma: 4.0 -> 2.0"]
