"""VisA: its split-file loader, the synthetic VisA-format set, ``--dataset visa|folder``.

Benchmark runs use a random-init ViT-B-16 at 64 px (one backbone for the module) on a tiny
synthetic VisA-format set; everything else stops before any model is built.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from winclip_nb import ConfigError, DataError, cli
from winclip_nb.bench import loader
from winclip_nb.bench import protocol as B
from winclip_nb.bench.config import BenchmarkConfig
from winclip_nb.bench.loader import TestImageDataset, load_benchmark_classes, resolve_dataset_root
from winclip_nb.bench.metrics import METRIC_KEYS
from winclip_nb.bench.store import config_fingerprint
from winclip_nb.data import (
    SYNTHETIC_DEFECTS,
    VISA_CLASSES,
    VISA_GROUPS,
    class_kind,
    default_synthetic_visa_root,
    is_synthetic_root,
    list_visa_classes,
    load_mask,
    load_visa_class,
    make_synthetic_mvtec,
    make_synthetic_visa,
    render_synthetic_image,
    synthetic_image_seed,
)
from winclip_nb.data.synthetic import SYNTHETIC_MARKER

TINY = {"n_train": 2, "n_test_good": 2, "n_test_per_defect": 1, "image_size": 64}
N_TEST = 2 + len(SYNTHETIC_DEFECTS)


def bench(out: Path, *extra: str) -> list[str]:
    return [
        "benchmark", "--weights", "random", "--device", "cpu", "--image-size", "64",
        "--eval-size", "32", "--batch-size", "4", "--out", str(out), "--no-progress", *extra,
    ]  # fmt: skip


def run(args: list[str]) -> tuple[int, str]:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = cli.main(args)
    return code, buffer.getvalue()


def single_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("winclip-nb: error: ") and "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def visa_root(tmp_path_factory) -> Path:
    return make_synthetic_visa(tmp_path_factory.mktemp("visa"), ["disc", "weave"], **TINY)


@pytest.fixture()
def visa_copy(visa_root, tmp_path) -> Path:
    """A writable copy (tests break it in different ways)."""
    return Path(shutil.copytree(visa_root, tmp_path / "visa"))


@pytest.fixture(scope="module", autouse=True)
def one_model(reused_models):
    """Every run here reuses one model (and its cache of text anchors)."""


@pytest.fixture()
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the error was found")

    monkeypatch.setattr(B, "_load_model", refuse)


def rows_of(root: Path) -> list[dict]:
    with open(root / "split_csv" / "1cls.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def write_rows(root: Path, rows: list[dict], columns: list[str] | None = None) -> None:
    columns = columns or ["object", "split", "label", "image", "mask"]
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------------- class tables
def test_visa_classes_groups_and_kinds():
    assert list(VISA_GROUPS) == [
        "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
        "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
    ]  # fmt: skip
    groups = {g: sorted(n for n, v in VISA_GROUPS.items() if v == g) for g in VISA_GROUPS.values()}
    assert groups == {
        "complex_structure": ["pcb1", "pcb2", "pcb3", "pcb4"],
        "multiple_instances": ["candle", "capsules", "macaroni1", "macaroni2"],
        "single_instance": ["cashew", "chewinggum", "fryum", "pipe_fryum"],
    }
    assert set(VISA_CLASSES) == set(VISA_GROUPS)
    assert {class_kind(n) for n in VISA_GROUPS} == {"object"}  # foreground masking stays on
    assert class_kind("PCB1") == "object" and class_kind("carpet") == "texture"


# ------------------------------------------------------------------ synthetic VisA set
def test_synthetic_visa_layout_marker_and_determinism(visa_root, tmp_path):
    rows = rows_of(visa_root)
    assert list(rows[0]) == ["object", "split", "label", "image", "mask"]
    disc = [r for r in rows if r["object"] == "disc"]
    assert [(r["split"], r["label"]) for r in disc] == (
        [("train", "normal")] * 2 + [("test", "normal")] * 2 + [("test", "anomaly")] * 4
    )
    assert disc[0]["image"] == "disc/Data/Images/Normal/0000.JPG" and disc[0]["mask"] == ""
    assert disc[4]["image"] == "disc/Data/Images/Anomaly/000.JPG"
    assert disc[4]["mask"] == "disc/Data/Masks/Anomaly/000.png"
    with Image.open(visa_root / disc[0]["image"]) as img:
        assert img.format == "JPEG" and img.size == (64, 64)
    marker = json.loads((visa_root / SYNTHETIC_MARKER).read_text())
    assert marker["generator"] == "winclip_nb.data.make_synthetic_visa" and marker["complete"]
    assert is_synthetic_root(visa_root)
    again = make_synthetic_visa(tmp_path / "again", ["disc", "weave"], **TINY)
    for row in rows:
        for key in ("image", "mask"):
            if row[key]:
                assert (again / row[key]).read_bytes() == (visa_root / row[key]).read_bytes()
    stamp = (again / disc[0]["image"]).stat().st_mtime_ns
    make_synthetic_visa(again, ["disc", "weave"], **TINY)  # a complete set is reused
    assert (again / disc[0]["image"]).stat().st_mtime_ns == stamp


def test_synthetic_visa_generation_lock_and_a_leftover_lock_folder(tmp_path):
    """The VisA-format set is generated under ``file_lock(<root>/.generating.lock)`` too; a
    lock folder the previous version left (it locked with ``mkdir``) does not block it."""
    root = tmp_path / "visa"
    (root / ".generating.lock").mkdir(parents=True)
    make_synthetic_visa(root, ["disc"], **TINY)
    assert is_synthetic_root(root) and list_visa_classes(root) == ["disc"]
    assert (root / ".generating.lock").is_file()  # now a lock file, kept


def test_synthetic_visa_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(DataError, match="not empty"):
        make_synthetic_visa(tmp_path, ["disc"], **TINY)
    with pytest.raises(ConfigError, match="bottle"):
        make_synthetic_visa(tmp_path / "new", ["bottle"], **TINY)


def test_masks_are_small_labels_read_as_nonzero(visa_root):
    """VisA marks defects with small non-zero labels: the default 0/255 reading would find
    nothing in a mask with label 3, the VisA reading finds exactly the rendered defect."""
    data = load_visa_class(visa_root, "disc")
    crack = next(s for s in data.test if s.mask_path and s.mask_path.name == "002.png")
    assert sorted(np.unique(np.asarray(Image.open(crack.mask_path)))) == [0, 3]
    assert not load_mask(crack.mask_path).any()
    rendered = render_synthetic_image(
        "disc", "crack", image_size=64, seed=synthetic_image_seed(0, "disc", "test", "crack", 0)
    )
    assert np.array_equal(load_mask(crack.mask_path, nonzero=True), rendered.defect_mask)
    item = TestImageDataset([crack], 64, eval_size=0)[0]  # the benchmark reads it so
    assert np.array_equal(item["mask"], rendered.defect_mask)


# --------------------------------------------------------------------------- loader
def test_load_visa_class_gives_the_mvtec_structures(visa_root, tmp_path):
    assert list_visa_classes(visa_root) == ["disc", "weave"]
    data = load_visa_class(visa_root, "disc")
    assert data.name == "disc" and data.kind == "object" and data.synthetic
    assert data.root == visa_root / "disc"
    assert [p.name for p in data.train] == ["0000.JPG", "0001.JPG"]
    assert [(s.path.name, s.defect, s.label) for s in data.test] == [
        ("0002.JPG", "good", 0), ("0003.JPG", "good", 0),
        ("000.JPG", "anomaly", 1), ("001.JPG", "anomaly", 1),
        ("002.JPG", "anomaly", 1), ("003.JPG", "anomaly", 1),
    ]  # fmt: skip
    assert all((s.mask_path is None) == (s.label == 0) for s in data.test)
    assert all(s.mask_nonzero for s in data.test if s.label == 1)
    assert (data.n_train, data.n_test, data.n_good, data.n_defective) == (2, N_TEST, 2, 4)
    # The same renders as the MVTec-format set: only the JPEG encoding differs.
    mvtec = make_synthetic_mvtec(tmp_path / "mvtec", ["disc"], **TINY)
    reference = np.asarray(Image.open(mvtec / "disc" / "test" / "hole" / "000.png"), np.float32)
    visa = np.asarray(Image.open(data.test[-1].path), np.float32)
    assert np.abs(visa - reference).mean() < 3.0


def test_rows_are_read_whatever_their_order_and_column_order(visa_copy):
    rows = rows_of(visa_copy)
    write_rows(visa_copy, rows[::-1], ["mask", "image", "label", "split", "object"])
    reversed_data = load_visa_class(visa_copy, "weave")
    write_rows(visa_copy, rows)
    assert load_visa_class(visa_copy, "weave") == reversed_data


def _break_missing_csv(root: Path) -> str:
    (root / "split_csv" / "1cls.csv").unlink()
    return str(root / "split_csv" / "1cls.csv")


def _break_columns(root: Path) -> str:
    write_rows(root, rows_of(root), ["object", "split", "label", "image"])
    return "mask"


def _break_image(root: Path) -> str:
    path = root / "disc" / "Data" / "Images" / "Anomaly" / "001.JPG"
    path.unlink()
    return str(path)


def _break_mask(root: Path) -> str:
    path = root / "disc" / "Data" / "Masks" / "Anomaly" / "003.png"
    path.unlink()
    return str(path)


def _break_mask_cell(root: Path) -> str:
    rows = rows_of(root)
    rows[-9]["mask"] = ""  # disc's last anomalous row
    write_rows(root, rows)
    return "has no mask"


def _break_label(root: Path) -> str:
    rows = rows_of(root)
    rows[1]["label"] = "broken"
    write_rows(root, rows)
    return "line 3: label must be normal or anomaly, got 'broken'"


BREAKS = {
    "missing split file": _break_missing_csv,
    "missing column": _break_columns,
    "missing image": _break_image,
    "missing mask": _break_mask,
    "anomaly without mask": _break_mask_cell,
    "bad label": _break_label,
}


@pytest.mark.parametrize("break_data", BREAKS.values(), ids=BREAKS.keys())
def test_bad_visa_data_is_one_line_naming_it(visa_copy, tmp_path, capsys, no_model, break_data):
    named = break_data(visa_copy)
    with pytest.raises(DataError, match=None) as raised:
        load_visa_class(visa_copy, "disc")
    assert named in str(raised.value)
    args = bench(tmp_path / "out", "--dataset", "visa", "--data-root", str(visa_copy))
    assert cli.main(args) == 2
    line = single_error_line(capsys.readouterr().err)
    assert named in line


def test_unknown_visa_class_lists_the_classes(visa_root, tmp_path, capsys, no_model):
    with pytest.raises(DataError, match="'pcb1' is not in .*1cls.csv; classes in it: disc, weave"):
        load_visa_class(visa_root, "pcb1")
    args = bench(tmp_path / "out", "--dataset", "visa", "--data-root", str(visa_root))
    assert cli.main([*args, "--classes", "pcb1"]) == 2
    assert "disc, weave" in single_error_line(capsys.readouterr().err)


def test_csv_path_outside_the_root_is_refused(visa_copy):
    rows = rows_of(visa_copy)
    rows[0]["image"] = "../elsewhere/0000.JPG"
    write_rows(visa_copy, rows)
    with pytest.raises(DataError, match=r"line 2: image path '\.\./elsewhere/0000\.JPG' must be"):
        load_visa_class(visa_copy, "disc")


def test_a_visa_root_given_as_mvtec_gets_a_hint(visa_root, tmp_path, capsys, no_model):
    assert cli.main(bench(tmp_path / "out", "--data-root", str(visa_root))) == 2
    assert "use --dataset visa" in single_error_line(capsys.readouterr().err)


# ------------------------------------------------------------------------ benchmark
def test_benchmark_on_synthetic_visa_records_the_dataset(visa_root, tmp_path):
    out = tmp_path / "out"
    args = bench(out, "--dataset", "visa", "--data-root", str(visa_root), "--k-shot", "1")
    args += ["--classes", "weave", "disc"]
    code, stdout = run(args)
    assert code == 0, stdout
    results = json.loads((out / "results.json").read_text())
    config = results["config"]
    assert config["dataset_format"] == "visa" and config["synthetic"] is True
    assert config["dataset"]["generator"] == "winclip_nb.data.make_synthetic_visa"
    assert list(results["classes"]) == ["disc", "weave"]  # the table's order
    for row in results["classes"].values():
        assert row["n_test"] == N_TEST and row["n_defective"] == 4 and row["n_memory_images"] == 1
        assert all(isinstance(row[k], float) for k in METRIC_KEYS)
    assert "SYNTHETIC VisA-format set" in stdout
    assert "these numbers say nothing about VisA" in stdout and "RANDOM WEIGHTS" in stdout
    # The same settings on the MVTec layout are other settings for resume and merge.
    mvtec_config = dict(config, dataset_format="mvtec")
    assert config_fingerprint(mvtec_config) != config_fingerprint(config)
    code, again = run(args)
    assert code == 0 and "disc: skipped (done)" in again


def test_visa_root_defaults(monkeypatch, tmp_path):
    made: list[Path] = []

    def fake_generator(root):
        made.append(Path(root))
        return Path(root)

    monkeypatch.setenv("WINCLIP_NB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("VISA_ROOT", raising=False)
    monkeypatch.setattr(loader, "make_synthetic_visa", fake_generator)
    cfg = BenchmarkConfig(dataset_format="visa").validate()
    assert resolve_dataset_root(cfg) == (tmp_path / "cache" / "synthetic_visa", True)
    assert made == [default_synthetic_visa_root()]
    real = tmp_path / "VisA"
    real.mkdir()
    monkeypatch.setenv("VISA_ROOT", str(real))
    monkeypatch.setenv("MVTEC_ROOT", str(tmp_path / "not-used"))
    assert resolve_dataset_root(cfg) == (real, False)
    with pytest.raises(ConfigError, match="dataset_format must be one of"):
        BenchmarkConfig(dataset_format="coco").validate()


# --------------------------------------------------------------------- own folders
@pytest.fixture(scope="module")
def part_folder(tmp_path_factory) -> Path:
    """One class of one's own in MVTec's single-class layout (a folder named ``weave``:
    its text anchors are already cached by the VisA run)."""
    root = make_synthetic_mvtec(tmp_path_factory.mktemp("own"), ["weave"], **TINY)
    return Path(shutil.copytree(root / "weave", tmp_path_factory.mktemp("own_copy") / "weave"))


def test_benchmark_on_an_own_folder(part_folder, tmp_path):
    out = tmp_path / "out"
    code, stdout = run(bench(out, "--dataset", "folder", "--data-root", str(part_folder)))
    assert code == 0, stdout
    results = json.loads((out / "results.json").read_text())
    assert list(results["classes"]) == ["weave"]  # the folder's name
    assert results["config"]["dataset_format"] == "folder"
    assert results["config"]["synthetic"] is False  # a folder of one's own is never marked
    row = results["classes"]["weave"]
    assert row["n_test"] == N_TEST and row["n_defective"] == 4
    assert all(isinstance(row[k], float) for k in METRIC_KEYS)
    assert f"data: {part_folder} (folder)" in stdout
    named = load_benchmark_classes(
        BenchmarkConfig(dataset_format="folder", classes=["part"]).validate(), part_folder
    )
    assert list(named) == ["part"] and named["part"].n_test == N_TEST  # --classes names it


def test_own_folder_errors(part_folder, tmp_path, capsys, no_model):
    assert cli.main(bench(tmp_path / "o", "--dataset", "folder")) == 2
    assert "--dataset folder needs --data-root" in single_error_line(capsys.readouterr().err)
    two = ["--dataset", "folder", "--data-root", str(part_folder), "--classes", "a", "b"]
    assert cli.main(bench(tmp_path / "o", *two)) == 2
    assert "holds one class" in single_error_line(capsys.readouterr().err)

    broken = Path(shutil.copytree(part_folder, tmp_path / "broken"))
    shutil.copy(broken / "test" / "good" / "000.png", broken / "test" / "loose.png")
    args = bench(tmp_path / "o", "--dataset", "folder", "--data-root", str(broken))
    assert cli.main(args) == 2
    assert "without a label" in single_error_line(capsys.readouterr().err)
    (broken / "test" / "loose.png").unlink()
    mask = broken / "ground_truth" / "hole" / "000_mask.png"
    mask.unlink()
    assert cli.main(args) == 2
    assert str(mask) in single_error_line(capsys.readouterr().err)
