"""Tests of winclip_nb.data: decoding, dataset layouts, k-shot draws, synthetic generator,
safe files (atomic writes, the file lock)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from winclip_nb.core.errors import ConfigError, DataError, ImageReadError
from winclip_nb.data import (
    MVTEC_CLASSES,
    SYNTHETIC_CLASSES,
    SYNTHETIC_DEFECTS,
    ClassData,
    DataWarning,
    TestSample,
    class_kind,
    default_synthetic_root,
    is_synthetic_root,
    list_images,
    list_mvtec_classes,
    load_folder_dataset,
    load_image,
    load_mask,
    load_mvtec_class,
    make_synthetic_mvtec,
    render_synthetic_image,
    safe_name,
    sample_k_shot,
    synthetic_image_seed,
)
from winclip_nb.data.files import atomic_write, file_lock
from winclip_nb.data.images import IMAGE_EXTENSIONS
from winclip_nb.data.synthetic import SYNTHETIC_MARKER

LOCK_NAME = ".generating.lock"  # the synthetic set's generation lock under its root
REPO = Path(__file__).resolve().parents[1]

SIZE = 64  # synthetic image size used in these tests (fast)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "mvtec"
    return make_synthetic_mvtec(root, image_size=SIZE, n_train=5, n_test_good=3)


def _save(img: Image.Image, path: Path) -> Path:
    img.save(path)
    return path


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# --- class lists -------------------------------------------------------------------
def test_class_lists_and_kinds() -> None:
    assert len(MVTEC_CLASSES) == 15 and len(set(MVTEC_CLASSES)) == 15
    assert list(MVTEC_CLASSES) == sorted(MVTEC_CLASSES)  # the dataset's order
    textures = {name for name in MVTEC_CLASSES if class_kind(name) == "texture"}
    assert textures == {"carpet", "grid", "leather", "tile", "wood"}
    assert class_kind("Carpet") == "texture"
    assert class_kind("weave") == "texture"
    assert class_kind("washer") == "object"
    assert class_kind("something_else") == "object"
    assert {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"} == set(IMAGE_EXTENSIONS)


# --- load_image ----------------------------------------------------------------------
def test_grayscale_png_becomes_three_equal_channels(tmp_path: Path) -> None:
    gray = np.array([[0, 17, 255], [128, 3, 99]], np.uint8)
    out = load_image(_save(Image.fromarray(gray, "L"), tmp_path / "g.png"))
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_rgba_is_composited_on_black(tmp_path: Path) -> None:
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 128], [9, 9, 9, 0]]], np.uint8)
    out = load_image(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"))
    # 200 * 128 / 255 = 100.39, 100 * 128 / 255 = 50.2, 50 * 128 / 255 = 25.1
    np.testing.assert_array_equal(out[0], [[200, 100, 50], [100, 50, 25], [0, 0, 0]])


def test_all_transparent_alpha_is_ignored() -> None:
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[..., :3] = [[10, 20, 30], [40, 50, 60]]
    np.testing.assert_array_equal(load_image(rgba)[0], [[10, 20, 30], [40, 50, 60]])


def test_gray_alpha_png(tmp_path: Path) -> None:
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (100, 255))
    la.putpixel((1, 0), (100, 51))  # 100 * 51 / 255 = 20
    out = load_image(_save(la, tmp_path / "la.png"))
    np.testing.assert_array_equal(out[0], [[100, 100, 100], [20, 20, 20]])


def test_palette_png_with_and_without_transparency(tmp_path: Path) -> None:
    pal = Image.new("P", (2, 1))
    pal.putpalette([10, 20, 30, 200, 100, 50])
    pal.putpixel((1, 0), 1)
    out = load_image(_save(pal, tmp_path / "p.png"))
    np.testing.assert_array_equal(out[0], [[10, 20, 30], [200, 100, 50]])
    pal.info["transparency"] = 0  # index 0 fully transparent -> black
    out = load_image(_save(pal, tmp_path / "pt.png"))
    np.testing.assert_array_equal(out[0], [[0, 0, 0], [200, 100, 50]])


def test_16bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 100, 65535]], np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "16.png")
    assert Image.open(path).mode.startswith("I")
    np.testing.assert_array_equal(load_image(path)[0, :, 0], [0, 100, 255])
    # 12-bit data in a 16-bit file: scaled by 4095, not by 65535 (which would leave 16 levels)
    twelve = np.array([[0, 2048, 4095]], np.uint16)
    path12 = _save(Image.fromarray(twelve), tmp_path / "12.png")
    np.testing.assert_array_equal(load_image(path12)[0, :, 1], [0, 128, 255])


def test_1bit_png(tmp_path: Path) -> None:
    one = Image.new("1", (3, 1))
    one.putpixel((1, 0), 1)
    out = load_image(_save(one, tmp_path / "b.png"))
    np.testing.assert_array_equal(out[0, :, 2], [0, 255, 0])


def test_cmyk_tiff_converts_to_rgb(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (8, 8), (0, 0, 0, 0))  # no ink -> white
    out = load_image(_save(cmyk, tmp_path / "c.tif"))
    assert out.shape == (8, 8, 3)
    np.testing.assert_array_equal(out, 255)


def test_arrays_of_every_shape_and_dtype() -> None:
    np.testing.assert_array_equal(load_image(np.array([[0.0, 0.5, 1.0]]))[0, :, 0], [0, 128, 255])
    np.testing.assert_array_equal(load_image(np.array([[0.0, 200.0]]))[0, :, 0], [0, 200])
    np.testing.assert_array_equal(load_image(np.full((2, 2, 1), 7, np.uint8)), 7)
    np.testing.assert_array_equal(load_image(np.array([[True, False]]))[0, :, 0], [255, 0])
    rgb = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    np.testing.assert_array_equal(load_image(rgb), rgb)  # arrays are RGB, not BGR
    rgba = np.concatenate([rgb, np.full((2, 2, 1), 255, np.uint8)], axis=2)
    np.testing.assert_array_equal(load_image(rgba), rgb)
    np.testing.assert_array_equal(load_image(np.array([[0, 65535]], np.uint16))[0, :, 0], [0, 255])


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((4, 4, 5)),
        np.zeros(4),
        np.array([[-1, 3]]),
        np.array([[np.nan]]),
        np.array([[300.0]]),
    ],
)
def test_bad_arrays_raise_data_error(bad: np.ndarray) -> None:
    with pytest.raises(DataError):
        load_image(bad)


def test_pil_image_input() -> None:
    img = Image.fromarray(np.array([[5, 6]], np.uint8), "L")
    np.testing.assert_array_equal(load_image(img)[0], [[5, 5, 5], [6, 6, 6]])


def test_truncated_png_raises_naming_the_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    full = _save(
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), tmp_path / "f.png"
    )
    data = full.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cut.png"):
        load_image(cut)
    with pytest.raises(ImageReadError, match="cut.png"):
        load_mask(cut)


def test_text_file_named_png_raises(tmp_path: Path) -> None:
    fake = tmp_path / "notes.png"
    fake.write_text("this is not an image")
    with pytest.raises(ImageReadError, match="notes.png"):
        load_image(fake)


def test_missing_file_raises_data_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    with pytest.raises(DataError, match="not found.*nope.png") as info:
        load_image(missing)
    assert not isinstance(info.value, ImageReadError)
    with pytest.raises(DataError, match="nope.png"):
        load_mask(missing)
    with pytest.raises(DataError, match="folder"):
        load_image(tmp_path)


# --- load_mask -----------------------------------------------------------------------
def test_load_mask_binarises(tmp_path: Path) -> None:
    mask = np.array([[0, 255, 100, 200]], np.uint8)
    out = load_mask(_save(Image.fromarray(mask), tmp_path / "m.png"))
    assert out.dtype == np.bool_
    np.testing.assert_array_equal(out[0], [False, True, False, True])
    zero_one = np.array([[0, 1, 1, 0]], np.uint8)  # label-style masks use > 0
    out = load_mask(_save(Image.fromarray(zero_one), tmp_path / "01.png"))
    np.testing.assert_array_equal(out[0], [False, True, True, False])
    colour = np.zeros((1, 2, 3), np.uint8)
    colour[0, 1] = [255, 0, 0]
    out = load_mask(_save(Image.fromarray(colour), tmp_path / "rgb.png"))
    np.testing.assert_array_equal(out[0], [False, True])


def test_mask_of_other_size_is_resized_with_warning(tmp_path: Path) -> None:
    mask = np.zeros((4, 4), np.uint8)
    mask[:2, 2:] = 255  # top-right quadrant
    path = _save(Image.fromarray(mask), tmp_path / "small_mask.png")
    with pytest.warns(DataWarning, match=r"small_mask\.png.*4x4.*8x6"):
        out = load_mask(path, size=(8, 6))
    assert out.shape == (8, 6)
    expected = np.zeros((8, 6), bool)
    expected[:4, 3:] = True
    np.testing.assert_array_equal(out, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same size: no warning
        assert load_mask(path, size=(4, 4)).sum() == 4


# --- list_images -----------------------------------------------------------------------
def test_list_images_ignores_junk_and_sorts_naturally(tmp_path: Path) -> None:
    img = Image.new("L", (2, 2))
    for name in ("10.png", "2.png", "b.JPG", "a.tiff"):
        img.save(tmp_path / name)
    for junk in ("Thumbs.db", ".DS_Store", "._000.png", "README.txt", ".hidden.png"):
        (tmp_path / junk).write_bytes(b"junk")
    (tmp_path / "sub.png").mkdir()  # a folder with an image-like name
    (tmp_path / "sub.png" / "inner.png").write_bytes(b"x")
    names = [p.name for p in list_images(tmp_path)]
    assert names == ["2.png", "10.png", "a.tiff", "b.JPG"]
    with pytest.raises(DataError, match="missing_folder"):
        list_images(tmp_path / "missing_folder")


# --- MVTec layout ------------------------------------------------------------------------
def test_load_mvtec_class_on_synthetic_set(synthetic_root: Path) -> None:
    assert list_mvtec_classes(synthetic_root) == sorted(SYNTHETIC_CLASSES)
    assert is_synthetic_root(synthetic_root)
    data = load_mvtec_class(synthetic_root, "disc")
    assert isinstance(data, ClassData)
    assert (data.name, data.kind, data.synthetic) == ("disc", "object", True)
    assert data.root == synthetic_root / "disc"
    assert [p.name for p in data.train] == [f"{i:03d}.png" for i in range(5)]
    n_defects = len(SYNTHETIC_DEFECTS)
    assert data.n_test == 3 + 2 * n_defects and data.n_defective == 2 * n_defects
    assert data.defect_types == sorted(SYNTHETIC_DEFECTS)
    good = [s for s in data.test if s.defect == "good"]
    assert [s.label for s in good] == [0, 0, 0] and all(s.mask_path is None for s in good)
    assert data.test[:3] == good  # good images come first
    for sample in data.test[3:]:
        assert isinstance(sample, TestSample) and sample.label == 1
        expected = synthetic_root / "disc" / "ground_truth" / sample.defect
        assert sample.mask_path == expected / f"{sample.path.stem}_mask.png"
        assert sample.path.parent.name == sample.defect
    assert load_mvtec_class(synthetic_root, "weave").kind == "texture"


def _copy_class(src: Path, dst: Path) -> Path:
    shutil.copytree(src / "disc", dst / "disc")
    return dst


def test_mvtec_error_cases_name_the_path(synthetic_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no_root"):
        load_mvtec_class(tmp_path / "no_root", "disc")
    with pytest.raises(DataError, match="no_root"):
        list_mvtec_classes(tmp_path / "no_root")
    with pytest.raises(DataError, match=r"bottle.*disc, washer, weave"):
        load_mvtec_class(synthetic_root, "bottle")
    for bad in ("..", "../disc", "a/b", "a\\b", "", "/etc"):
        with pytest.raises(DataError, match="invalid class name"):
            load_mvtec_class(synthetic_root, bad)

    root = _copy_class(synthetic_root, tmp_path / "copy")
    cls = root / "disc"
    mask = cls / "ground_truth" / "hole" / "001_mask.png"
    mask.unlink()
    with pytest.raises(DataError, match=r"hole/001\.png.*001_mask\.png"):
        load_mvtec_class(root, "disc")
    (cls / "ground_truth" / "hole" / "001.png").write_bytes(
        (cls / "ground_truth" / "hole" / "000_mask.png").read_bytes()
    )  # `<stem>.png` is accepted as a mask name too
    assert load_mvtec_class(root, "disc").n_defective == 2 * len(SYNTHETIC_DEFECTS)

    shutil.rmtree(cls / "test")
    with pytest.raises(DataError, match=r"test folder not found.*disc"):
        load_mvtec_class(root, "disc")
    for f in (cls / "train" / "good").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"no training images.*good"):
        load_mvtec_class(root, "disc")
    shutil.rmtree(cls / "train")
    with pytest.raises(DataError, match=r"training folder not found.*train"):
        load_mvtec_class(root, "disc")


def test_list_mvtec_classes_order(tmp_path: Path) -> None:
    for name in ("zzz", "wood", "bottle", "aaa", "no_train"):
        (tmp_path / name / ("train" if name != "no_train" else "test") / "good").mkdir(parents=True)
    assert list_mvtec_classes(tmp_path) == ["bottle", "wood", "aaa", "zzz"]


# --- own folders ---------------------------------------------------------------------------
def test_load_folder_dataset_flat_and_structured(tmp_path: Path) -> None:
    img = Image.new("RGB", (4, 4))
    mask = Image.new("L", (4, 4), 255)
    (tmp_path / "good").mkdir()
    for i in range(3):
        img.save(tmp_path / "good" / f"n{i}.png")
    flat = tmp_path / "flat"
    flat.mkdir()
    img.save(flat / "a.png")
    img.save(flat / "b.png")
    masks = tmp_path / "masks"
    masks.mkdir()
    mask.save(masks / "b_mask.png")
    data = load_folder_dataset(tmp_path / "good", flat, masks, name="parts")
    assert data.n_train == 3 and data.name == "parts" and not data.synthetic
    assert [(s.path.name, s.label, s.mask_path) for s in data.test] == [
        ("a.png", -1, None),
        ("b.png", 1, masks / "b_mask.png"),
    ]

    structured = tmp_path / "structured"
    for folder, names in (("good", ["g0"]), ("dent", ["d0", "d1"])):
        (structured / folder).mkdir(parents=True)
        for n in names:
            img.save(structured / folder / f"{n}.png")
    (masks / "dent").mkdir()
    mask.save(masks / "dent" / "d0.png")
    data = load_folder_dataset(tmp_path / "good", structured, masks)
    assert [(s.defect, s.label, s.mask_path) for s in data.test] == [
        ("good", 0, None),
        ("dent", 1, masks / "dent" / "d0.png"),
        ("dent", 1, None),
    ]
    assert data.root == tmp_path.resolve()
    with pytest.raises(DataError, match="no_masks"):
        load_folder_dataset(tmp_path / "good", flat, tmp_path / "no_masks")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        load_folder_dataset(tmp_path / "empty", flat)


# --- k-shot ----------------------------------------------------------------------------------
def test_sample_k_shot_deterministic_sorted_nested() -> None:
    paths = [Path(f"{i:03d}.png") for i in range(20)]
    first = sample_k_shot(paths, 4, seed=3)
    assert first == sample_k_shot(list(reversed(paths)), 4, seed=3)  # input order is irrelevant
    assert first == sorted(first) and len(set(first)) == 4 and set(first) <= set(paths)
    draws = {tuple(sample_k_shot(paths, 4, seed=s)) for s in range(10)}
    assert len(draws) > 5  # the seed matters
    assert set(sample_k_shot(paths, 2, seed=3)) <= set(first)  # nested draws per seed
    assert sample_k_shot(paths, "full", seed=0) == paths
    assert sample_k_shot(paths, None, seed=0) == paths
    assert sample_k_shot(paths, "3", seed=0) == sample_k_shot(paths, 3, seed=0)
    assert sample_k_shot(paths, np.int64(20), seed=1) == paths


@pytest.mark.parametrize("k", [0, -1, True, 2.5, "few"])
def test_sample_k_shot_rejects_bad_k(k: object) -> None:
    with pytest.raises(ConfigError):
        sample_k_shot([Path("a.png"), Path("b.png")], k, seed=0)  # type: ignore[arg-type]


def test_sample_k_shot_too_many() -> None:
    with pytest.raises(ConfigError, match=r"k=5.*only 2"):
        sample_k_shot([Path("a.png"), Path("b.png")], 5, seed=0)


# --- safe_name ---------------------------------------------------------------------------------
def test_safe_name() -> None:
    assert safe_name("../../etc") == "____etc"
    assert safe_name("a/b") == "a_b"
    assert safe_name("a\\b c\td") == "a_b_c_d"
    assert safe_name("") == "_"
    assert safe_name(".bashrc") == "_bashrc"
    assert safe_name("metal_nut-01") == "metal_nut-01"
    assert safe_name("CON") == "CON_"
    for name in ("..", "../x", "a/../../b", "\x00\x1f", " ", ".", "x" * 3):
        out = safe_name(name)
        assert out and not out.startswith(".") and "/" not in out and ".." not in out


# --- synthetic data --------------------------------------------------------------------------
def test_synthetic_generation_is_deterministic(tmp_path: Path) -> None:
    kwargs = {"image_size": SIZE, "n_train": 2, "n_test_good": 1, "n_test_per_defect": 1}
    a = _tree_bytes(make_synthetic_mvtec(tmp_path / "a", **kwargs))
    b = _tree_bytes(make_synthetic_mvtec(tmp_path / "b", **kwargs))
    assert a == b
    n_per_class = 2 + 1 + 2 * len(SYNTHETIC_DEFECTS)  # images + masks
    assert len(a) == 2 + n_per_class * len(SYNTHETIC_CLASSES)  # + marker and lock file
    assert a[LOCK_NAME] == b""  # the generation lock is an empty file, kept
    c = _tree_bytes(make_synthetic_mvtec(tmp_path / "c", **kwargs, seed=1))
    assert c.keys() == a.keys() and c["disc/train/good/000.png"] != a["disc/train/good/000.png"]
    marker = json.loads(a[SYNTHETIC_MARKER])
    assert marker["complete"] is True and marker["image_size"] == SIZE


def test_synthetic_reuse_and_regenerate(tmp_path: Path) -> None:
    root = tmp_path / "syn"
    make_synthetic_mvtec(root, ["disc"], image_size=SIZE, n_train=4)
    first = root / "disc" / "train" / "good" / "000.png"
    stamp = first.stat().st_mtime_ns
    first_bytes = first.read_bytes()
    make_synthetic_mvtec(root, ["disc"], image_size=SIZE, n_train=4)
    assert first.stat().st_mtime_ns == stamp  # reused, not rewritten
    make_synthetic_mvtec(root, ["disc"], image_size=SIZE, n_train=2)  # other settings
    assert [p.name for p in list_images(root / "disc" / "train" / "good")] == [
        "000.png",
        "001.png",
    ]  # stale files from the old set are gone
    assert first.read_bytes() == first_bytes  # image seeds do not depend on n_train
    first.unlink()  # an incomplete set is regenerated
    make_synthetic_mvtec(root, ["disc"], image_size=SIZE, n_train=2)
    assert first.read_bytes() == first_bytes


def test_concurrent_generation_into_one_root(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    kwargs = {"image_size": SIZE, "n_train": 3, "n_test_good": 1, "n_test_per_defect": 1}
    root = tmp_path / "shared"
    with ThreadPoolExecutor(3) as pool:
        roots = list(pool.map(lambda _: make_synthetic_mvtec(root, **kwargs), range(3)))
    assert roots == [root] * 3
    assert (root / LOCK_NAME).is_file()  # a file_lock: the file stays, the lock goes
    assert _tree_bytes(root) == _tree_bytes(make_synthetic_mvtec(tmp_path / "single", **kwargs))


def test_generation_waits_for_the_holder_of_the_root_lock(tmp_path: Path) -> None:
    """Generation takes ``file_lock(<root>/.generating.lock)``: while another holder has
    it, nothing is written; once released, the set is generated."""
    root = tmp_path / "syn"
    done: list[Path] = []
    worker = threading.Thread(
        target=lambda: done.append(make_synthetic_mvtec(root, ["disc"], image_size=SIZE, n_train=1))
    )
    with file_lock(root / LOCK_NAME):
        worker.start()
        worker.join(1.0)
        assert worker.is_alive() and not done  # waiting for the lock
        assert sorted(p.name for p in root.iterdir()) == [LOCK_NAME]  # nothing written yet
    worker.join(60)
    assert done == [root] and is_synthetic_root(root)
    assert list_mvtec_classes(root) == ["disc"]


@pytest.mark.parametrize("leftover", ["folder", "file"])
def test_leftover_lock_does_not_block_generation(tmp_path: Path, leftover: str) -> None:
    """A lock left by a killed run never blocks: the previous version locked with a
    folder (``mkdir``), removed now whatever its age; a lock file is only a file (a killed
    holder's flock went with its process)."""
    root = tmp_path / "syn"
    lock = root / LOCK_NAME
    if leftover == "folder":
        lock.mkdir(parents=True)  # fresh, not old: age no longer matters
        (lock / "owner").write_text("12345")
    else:
        root.mkdir()
        lock.write_text("left by a killed run")
    make_synthetic_mvtec(root, ["weave"], image_size=SIZE, n_train=1)
    assert is_synthetic_root(root) and lock.is_file()
    assert list_mvtec_classes(root) == ["weave"]


def test_synthetic_refuses_foreign_folder_and_bad_settings(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(DataError, match="not empty"):
        make_synthetic_mvtec(tmp_path, ["disc"], image_size=SIZE)
    with pytest.raises(ConfigError, match="bottle"):
        make_synthetic_mvtec(tmp_path / "x", ["bottle"])
    with pytest.raises(ConfigError, match="image_size"):
        make_synthetic_mvtec(tmp_path / "x", image_size=8)
    with pytest.raises(ConfigError, match="n_train"):
        make_synthetic_mvtec(tmp_path / "x", n_train=0)


def _background_distance(image: np.ndarray) -> np.ndarray:
    """(H, W) colour distance of each pixel from the median border colour."""
    rgb = load_image(image).astype(np.float64)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    return np.linalg.norm(rgb - np.median(border, axis=0), axis=2)


def test_synthetic_files_match_renders_and_masks_lie_on_the_object(synthetic_root: Path) -> None:
    """Saved masks are non-empty 0/255 PNGs equal to the rendered defect masks, which lie
    inside the rendered object mask; the object mask is the object visible in the image."""
    for name in SYNTHETIC_CLASSES:
        kind = class_kind(name)
        data = load_mvtec_class(synthetic_root, name)
        for sample in data.test:
            seed = synthetic_image_seed(0, name, "test", sample.defect, int(sample.path.stem))
            render = render_synthetic_image(name, sample.defect, image_size=SIZE, seed=seed)
            with Image.open(sample.path) as saved:
                np.testing.assert_array_equal(np.asarray(saved), render.image)
            if sample.label == 0:
                continue
            raw = np.asarray(Image.open(sample.mask_path))
            assert raw.ndim == 2 and set(np.unique(raw)) == {0, 255}
            np.testing.assert_array_equal(raw > 0, render.defect_mask)
            assert not (render.defect_mask & ~render.object_mask).any(), sample.path
        if kind == "object":  # the object mask is what a viewer sees as the object
            good = render_synthetic_image(name, None, image_size=SIZE, seed=[5])
            visible = _background_distance(good.image) > 25
            square = np.ones((3, 3), bool)
            edge = ndimage.binary_dilation(good.object_mask, square) & ~ndimage.binary_erosion(
                good.object_mask, square
            )
            assert not ((visible ^ good.object_mask) & ~edge).any()  # differ only at the edge
            assert 0.4 <= good.object_mask.mean() <= 0.7  # the object covers 40-70%
        else:
            assert data.kind == "texture" and render.object_mask.all()


def test_washer_is_grayscale_and_others_rgb(synthetic_root: Path) -> None:
    with Image.open(synthetic_root / "washer" / "train" / "good" / "000.png") as img:
        assert img.mode == "L" and img.size == (SIZE, SIZE)
    with Image.open(synthetic_root / "disc" / "test" / "hole" / "000.png") as img:
        assert img.mode == "RGB"


def test_rendered_defects_change_exactly_the_masked_pixels() -> None:
    size = 96
    contrast: dict[str, list[float]] = {}
    for name in SYNTHETIC_CLASSES:
        for seed in range(6):
            good = render_synthetic_image(name, None, image_size=size, seed=seed)
            assert not good.defect_mask.any()
            for defect in SYNTHETIC_DEFECTS:
                bad = render_synthetic_image(name, defect, image_size=size, seed=seed)
                np.testing.assert_array_equal(bad.object_mask, good.object_mask)
                diff = np.abs(bad.image.astype(int) - good.image.astype(int))
                diff = diff.reshape(size, size, -1).max(axis=2)
                mask = bad.defect_mask
                assert mask.any() and not (mask & ~bad.object_mask).any(), (name, defect, seed)
                assert not ((diff > 0) & ~mask).any()  # nothing outside the mask changed
                assert (diff[mask] > 0).mean() > 0.95  # (almost) every mask pixel changed
                contrast.setdefault(defect, []).append(float(diff[mask].mean()))
    means = {d: float(np.mean(v)) for d, v in contrast.items()}
    assert means["stain"] < 20 < means["scratch"] < means["hole"]  # stain is the subtle one


def test_default_synthetic_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WINCLIP_NB_CACHE", str(tmp_path))
    assert default_synthetic_root() == tmp_path / "synthetic_mvtec"
    monkeypatch.delenv("WINCLIP_NB_CACHE")
    assert default_synthetic_root() == Path.home() / ".cache" / "winclip_nb" / "synthetic_mvtec"


# --- safe files: atomic_write, file_lock ---------------------------------------------------
#: Run as ``python -c``: hold ``file_lock(argv[1])``, say so, wait ``argv[2]`` seconds,
#: append "holder" to the log ``argv[3]``, release.
LOCK_HOLDER = """
import sys, time
from winclip_nb.data import file_lock
with file_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
    with open(sys.argv[3], "a") as log:
        log.write("holder\\n")
"""


def _hold_lock(lock: Path, seconds: float, log: Path) -> subprocess.Popen:
    """A second process holding ``lock`` (returned once it holds it)."""
    path = os.environ.get("PYTHONPATH")
    proc = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(lock), str(seconds), str(log)],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), path]))),
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()  # type: ignore[union-attr]
    assert line == "locked\n", line
    return proc


def _acquire_in_thread(lock: Path, log: Path) -> threading.Thread:
    def take() -> None:
        with file_lock(lock):
            with open(log, "a") as handle:
                handle.write("waiter\n")

    thread = threading.Thread(target=take)
    thread.start()
    return thread


@pytest.mark.skipif(os.name != "posix", reason="flock is POSIX")
def test_file_lock_serialises_two_processes(tmp_path: Path) -> None:
    lock, log = tmp_path / "sub" / ".lock", tmp_path / "log.txt"
    proc = _hold_lock(lock, 1.5, log)
    try:
        start = time.monotonic()
        waiter = _acquire_in_thread(lock, log)
        waiter.join(30)
        waited = time.monotonic() - start
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.stdout.close()  # type: ignore[union-attr]
    assert not waiter.is_alive()
    assert log.read_text().splitlines() == ["holder", "waiter"]  # one after the other
    assert waited > 0.5  # it really waited for the other process
    assert lock.is_file()  # the lock file stays; the lock itself is gone
    with file_lock(lock):  # free again
        pass


@pytest.mark.skipif(os.name != "posix", reason="flock is POSIX")
def test_file_lock_of_a_killed_process_is_released(tmp_path: Path) -> None:
    lock, log = tmp_path / ".lock", tmp_path / "log.txt"
    proc = _hold_lock(lock, 120, log)
    try:
        waiter = _acquire_in_thread(lock, log)
        waiter.join(0.5)
        assert waiter.is_alive()  # held by the other process
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        waiter.join(30)
    finally:
        proc.kill()
        proc.stdout.close()  # type: ignore[union-attr]
    assert not waiter.is_alive()
    assert log.read_text().splitlines() == ["waiter"]  # the killed holder never wrote


def test_atomic_write_text_bytes_and_folders(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "out.json"
    assert atomic_write(target, '{"x": 1}\n') == target  # folders are created
    assert target.read_text(encoding="utf-8") == '{"x": 1}\n'
    atomic_write(target, b"\x00\xffbytes")
    assert target.read_bytes() == b"\x00\xffbytes"
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]  # no temporary left


def test_atomic_write_failing_midway_leaves_no_temporary_and_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails after part of the data reached the temporary file (disk full):
    the temporary file is removed and the target keeps its previous content."""
    target = tmp_path / "results.json"
    atomic_write(target, "old\n")
    from winclip_nb import StorageError
    from winclip_nb.data import files

    real_open = open

    class HalfThenFail:
        def __init__(self, path, mode, *args, **kwargs):
            assert Path(path).name.startswith(".results.json.")  # the temporary file
            self.path, self.handle = Path(path), real_open(path, mode, *args, **kwargs)

        def write(self, data: bytes) -> int:
            self.handle.write(data[: len(data) // 2])
            self.handle.flush()
            assert self.path.stat().st_size > 0  # part of it is on disk
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    monkeypatch.setattr(files, "open", HalfThenFail, raising=False)
    with pytest.raises(StorageError, match=r"cannot write .*results\.json: no space left"):
        atomic_write(target, "new content\n" * 100)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
    assert target.read_text(encoding="utf-8") == "old\n"
