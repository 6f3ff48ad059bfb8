"""GPU check: throughput, memory and half-precision agreement of winclip_nb on one GPU.

One prepared run, sized to finish in a few minutes on a data-centre GPU including imports,
so that it fits the short time such a machine is available and can be rerun at once.
It uses the package's public API only and writes ``gpu-check.json`` (updated after every
section, so a run that is stopped keeps what it measured) and prints a table last.

Sections:

1. **tokens**: images/s of the backbone alone and of full detection
   (:meth:`WinCLIP.detect_resized`: tokens, text map, NN map against a 50-image memory
   with a 10 % coreset, fusion, foreground masks, normalisation, upsampling, smoothing,
   image score) on decoded uint8 batches in pinned host memory, for each batch size, in
   fp32 and in half precision, with the peak GPU memory of each;
2. **files**: the benchmark's own loader (``TestImageDataset`` in a ``DataLoader``) with
   N decode workers, alone (decoding + resizing only) and feeding detection;
3. **agreement**: half vs fp32 on the synthetic set: max |difference| of the anomaly maps
   (robust z-scores) and of the image scores, and the image / pixel AUROC of each;
4. **windows**: ``method="windows"`` (WinCLIP+, 1-shot) images/s per batch size, and
   anomalib 2.7's ``WinClipModel`` on the same weights when anomalib is importable;
5. **explain**: one :func:`detect_and_explain` with a tiny random LLaVA-OneVision on the GPU;
6. **benchmark**: ``winclip-nb benchmark --device cuda`` on the synthetic set, end to end.

Random weights throughout (speed does not depend on them; the agreement check compares
two precisions of the same random model). Every number here is a timing or a
difference, never a detection result.

Usage::

    python3 benchmarks/gpu_check.py                    # on the GPU machine (PYTHONPATH=.)
    python3 benchmarks/gpu_check.py --dry-run          # CPU, tiny sizes: checks the script
    make gpu-check ARGS=--dry-run                      # the same through make
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The script runs from a checkout without installing the package (GPU machine).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

#: Full run (GPU) and dry run (CPU) sizes.
FULL = {
    "device": "cuda",
    "batch_sizes": (32, 128, 512),
    "precisions": ("fp32", "fp16"),
    "memory_images": 50,
    "min_seconds": 1.0,
    "file_images": 512,
    "file_size": 900,
    "file_batch": 128,
    "workers": (4, 8, 15),
    "windows_batch_sizes": (32, 128),
    "windows_min_seconds": 2.0,
    "agreement_classes": None,  # all synthetic classes, default sizes
    "image_size": 224,
}
DRY = {
    "device": "cpu",
    "batch_sizes": (2,),
    "precisions": ("fp32", "fp16"),
    "memory_images": 2,
    "min_seconds": 0.0,
    "file_images": 4,
    "file_size": 96,
    "file_batch": 2,
    "workers": (0, 2),
    "windows_batch_sizes": (1,),
    "windows_min_seconds": 0.0,
    "agreement_classes": ["disc"],
    "image_size": 64,
}
SECTIONS = ("tokens", "agreement", "files", "windows", "explain", "benchmark")
SPEED_CLASS = "disc"


# ------------------------------------------------------------------------------ helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(fn: Callable[[], Any], n_images: int, device: torch.device, min_s: float) -> float:
    """Median images/s of ``fn`` (one batch of ``n_images``): one warm-up call, then
    timed calls until ``min_s`` seconds have passed, at least three (one when ``min_s``
    is 0, the dry run)."""
    fn()
    _sync(device)
    rates: list[float] = []
    spent = 0.0
    min_calls = 3 if min_s > 0 else 1
    while len(rates) < min_calls or spent < min_s:
        start = time.perf_counter()
        fn()
        _sync(device)
        took = time.perf_counter() - start
        spent += took
        rates.append(n_images / took)
    return statistics.median(rates)


def _peak_mb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        _sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _random_anchors(winclip: Any, class_name: str = SPEED_CLASS) -> Any:
    """Seeded random unit anchors of ``class_name`` (speed does not depend on the text)."""
    from winclip_nb.bench.speed import random_anchors

    return random_anchors(winclip, class_name, 0)


def _versions() -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("open_clip", "timm", "transformers", "cv2", "numpy", "anomalib"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "?")
        except Exception:  # noqa: BLE001 - report whatever is missing
            out[name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out["gpu"] = props.name
        out["gpu_memory_gb"] = round(props.total_memory / 1e9, 1)
        out["cuda"] = torch.version.cuda
    out["cpu_count"] = os.cpu_count()
    return out


def _synthetic(root: Path, n_train: int, n_test: int, size: int) -> Path:
    from winclip_nb.data import make_synthetic_mvtec

    return make_synthetic_mvtec(
        root,
        [SPEED_CLASS],
        n_train=n_train,
        n_test_good=max(1, n_test // 2),
        n_test_per_defect=max(1, n_test // 4),
        image_size=size,
        seed=0,
    )


# ----------------------------------------------------------------------------- sections
def section_tokens(sizes: dict[str, Any], device: torch.device, tmp: Path) -> dict[str, Any]:
    """Backbone and detection images/s per precision and batch size, with peak memory."""
    from winclip_nb import WinCLIP
    from winclip_nb.data import list_images

    root = _synthetic(tmp / "tokens", sizes["memory_images"], 8, 256)
    train = list_images(root / SPEED_CLASS / "train" / "good")
    tests = list_images(root / SPEED_CLASS / "test" / "good")
    rows = []
    for precision in sizes["precisions"]:
        winclip = WinCLIP(
            device=str(device),
            pretrained="random",
            precision=precision,
            image_size=sizes["image_size"],
        )
        rows += _token_rows(winclip, precision, train, tests, sizes, device)
        del winclip
        _reset_peak(device)
    return {
        "rows": rows,
        "image_size": sizes["image_size"],
        "class": SPEED_CLASS,
        "memory_images": len(train),
    }


def _token_rows(
    winclip: Any,
    precision: str,
    train: list[Path],
    tests: list[Path],
    sizes: dict[str, Any],
    device: torch.device,
) -> list[dict[str, Any]]:
    """One row per batch size: backbone, detection, detection without host masks."""
    anchors = _random_anchors(winclip)
    start = time.perf_counter()
    winclip.build_normal_memory(train, *anchors, progress=False)
    _sync(device)
    memory_s = time.perf_counter() - start
    resized = [winclip.prepare(p)[0] for p in tests]
    min_s = sizes["min_seconds"]
    rows = []
    for bs in sizes["batch_sizes"]:
        batch = torch.from_numpy(np.stack([resized[i % len(resized)] for i in range(bs)]))
        if device.type == "cuda":
            batch = batch.pin_memory()

        def backbone(b: torch.Tensor = batch) -> Any:
            return winclip.backbone(b)

        def detect(b: torch.Tensor = batch, fitted: Any = winclip.fitted) -> Any:
            return winclip.detect_batch(b, fitted)

        def detect_texture(b: torch.Tensor = batch, fitted: Any = winclip.fitted) -> Any:
            # the same class under a texture name: no host-side foreground masks
            texture = type(fitted)(
                _random_anchors(winclip, "weave"), fitted.memory, fitted.calibration
            )
            return winclip.detect_batch(b, texture)

        row: dict[str, Any] = {"precision": precision, "batch_size": bs}
        _reset_peak(device)
        row["backbone_img_s"] = round(_rate(backbone, bs, device, min_s), 1)
        row["backbone_peak_mb"] = _peak_mb(device)
        _reset_peak(device)
        row["detect_img_s"] = round(_rate(detect, bs, device, min_s), 1)
        row["detect_peak_mb"] = _peak_mb(device)
        # The same detection for a texture class: no host-side foreground masks, so the
        # gap to the row above is what the OpenCV masks cost.
        row["detect_no_fg_img_s"] = round(_rate(detect_texture, bs, device, min_s), 1)
        row["memory_build_s"] = round(memory_s, 3)
        row["memory_patches"] = winclip.memory.size
        rows.append(row)
        print(
            f"  tokens {precision} batch {bs}: backbone {row['backbone_img_s']} img/s, "
            f"detect {row['detect_img_s']} img/s (without host masks "
            f"{row['detect_no_fg_img_s']}), peak {row['detect_peak_mb']} MiB",
            flush=True,
        )
    return rows


def section_files(sizes: dict[str, Any], device: torch.device, tmp: Path) -> dict[str, Any]:
    """The benchmark's loader with N decode workers: decoding alone and feeding detection."""
    import shutil

    from torch.utils.data import DataLoader

    from winclip_nb import WinCLIP
    from winclip_nb.bench.loader import TestImageDataset, _collate
    from winclip_nb.data import load_mvtec_class

    n_files, side = sizes["file_images"], sizes["file_size"]
    root = _synthetic(tmp / "files", 2, 8, side)
    data = load_mvtec_class(root, SPEED_CLASS)
    # Copies of the few rendered images: decoding cost is what is measured here.
    folder = root / SPEED_CLASS / "test" / "copies"
    folder.mkdir(exist_ok=True)
    samples = []
    for i in range(n_files):
        src = data.test[i % len(data.test)]
        dst = folder / f"{i:04d}.png"
        shutil.copyfile(src.path, dst)
        samples.append(type(src)(path=dst, label=src.label, defect="good", mask_path=None))
    winclip = WinCLIP(device=str(device), pretrained="random", image_size=sizes["image_size"])
    fitted = winclip.fit_images(_random_anchors(winclip), data.train)
    dataset = TestImageDataset(samples, winclip.config.image_size, 256)
    rows = []
    for workers in sizes["workers"]:

        def loader(w: int = workers) -> DataLoader:
            return DataLoader(
                dataset,
                batch_size=sizes["file_batch"],
                num_workers=w,
                pin_memory=device.type == "cuda",
                collate_fn=_collate,
                persistent_workers=False,
            )

        def decode_only(make: Callable[[], DataLoader] = loader) -> None:
            for _ in make():
                pass

        def decode_and_detect(make: Callable[[], DataLoader] = loader) -> None:
            for batch in make():
                winclip.detect_batch(batch["image"], fitted)

        decode_only()  # warm the page cache
        start = time.perf_counter()
        decode_only()
        decode_rate = n_files / (time.perf_counter() - start)
        _sync(device)
        start = time.perf_counter()
        decode_and_detect()
        _sync(device)
        detect_rate = n_files / (time.perf_counter() - start)
        row = {
            "workers": workers,
            "decode_img_s": round(decode_rate, 1),
            "decode_detect_img_s": round(detect_rate, 1),
        }
        rows.append(row)
        print(
            f"  files, {workers} workers: decode {row['decode_img_s']} img/s, "
            f"decode + detect {row['decode_detect_img_s']} img/s",
            flush=True,
        )
    return {
        "rows": rows,
        "n_files": n_files,
        "file_side": side,
        "format": "png",
        "batch_size": sizes["file_batch"],
        "cpu_count": os.cpu_count(),
    }


def section_agreement(sizes: dict[str, Any], device: torch.device, tmp: Path) -> dict[str, Any]:
    """Half vs fp32 on the synthetic set, for the same random model.

    ``end_to_end``: each precision builds its own memory, as a user would. The greedy
    coreset is a chain of argmax picks, so tiny differences in the tokens can change
    which patches it keeps (``coreset_overlap``) and with them the NN map where the picks
    differ. ``same_memory``: the fp32 memory bank loaded into the half model, which
    isolates the half-precision forward pass.
    """
    from winclip_nb import WinCLIP
    from winclip_nb.data import SYNTHETIC_CLASSES, load_mvtec_class, make_synthetic_mvtec

    classes = sizes["agreement_classes"] or list(SYNTHETIC_CLASSES)
    if sizes["agreement_classes"]:
        root = make_synthetic_mvtec(
            tmp / "agree", classes, n_train=3, n_test_good=2, n_test_per_defect=1, image_size=96
        )
    else:
        root = make_synthetic_mvtec(tmp / "agree", classes)
    half = "fp16"
    per_class = {}
    for name in classes:
        data = load_mvtec_class(root, name)
        paths = [s.path for s in data.test]
        masks = np.stack([np.asarray(_mask(s), bool) for s in data.test])
        runs: dict[str, Any] = {}
        models = {}
        for precision in ("fp32", half):
            winclip = WinCLIP(
                device=str(device),
                pretrained="random",
                precision=precision,
                image_size=sizes["image_size"],
            )
            anchors = winclip.build_text_anchors(name)
            winclip.build_normal_memory(data.train, *anchors, progress=False)
            runs[precision] = _maps_and_metrics(winclip, paths, anchors, data.labels, masks)
            models[precision] = (winclip, anchors)
        fp32_model, _ = models["fp32"]
        half_model, half_anchors = models[half]
        picks = [set(m.memory.source_patch.tolist()) for m, _ in models.values()]
        bank = fp32_model.save_memory(tmp / f"agree-{name}.safetensors")
        half_model.load_memory(bank)
        same = _maps_and_metrics(half_model, paths, half_anchors, data.labels, masks)
        ref, end = runs["fp32"], runs[half]
        per_class[name] = {
            "end_to_end": _differences(ref, end),
            "same_memory": _differences(ref, same),
            "coreset_overlap": round(len(picks[0] & picks[1]) / len(picks[0]), 4),
            "map_range_fp32": [
                round(float(ref["maps"].min()), 3),
                round(float(ref["maps"].max()), 3),
            ],
            "image_auroc": {
                "fp32": ref["image_auroc"],
                half: end["image_auroc"],
                f"{half}_same_memory": same["image_auroc"],
            },
            "pixel_auroc": {
                "fp32": ref["pixel_auroc"],
                half: end["pixel_auroc"],
                f"{half}_same_memory": same["pixel_auroc"],
            },
        }
        row = per_class[name]
        print(
            f"  agreement {name}: same memory max |map diff| "
            f"{row['same_memory']['max_abs_map_diff']:.4f}, end to end "
            f"{row['end_to_end']['max_abs_map_diff']:.4f} (coreset overlap "
            f"{row['coreset_overlap']:.2f})",
            flush=True,
        )
    return {"classes": per_class, "half": half, "units": "robust z-scores (anomaly_map)"}


def _maps_and_metrics(
    winclip: Any, paths: list[Path], anchors: Any, labels: np.ndarray, masks: np.ndarray
) -> dict[str, Any]:
    from winclip_nb.bench.metrics import compute_metrics

    results = winclip.detect(paths, *anchors)
    maps = np.stack([r.anomaly_map for r in results])
    scores = np.array([r.score for r in results])
    metrics = compute_metrics(labels, scores, masks, maps)
    return {
        "maps": maps,
        "scores": scores,
        "image_auroc": _pct(metrics["image_auroc"]),
        "pixel_auroc": _pct(metrics["pixel_auroc"]),
    }


def _differences(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    diff = np.abs(a["maps"] - b["maps"])
    return {
        "max_abs_map_diff": round(float(diff.max()), 5),
        "p99_abs_map_diff": round(float(np.percentile(diff, 99)), 5),
        "mean_abs_map_diff": round(float(diff.mean()), 5),
        "max_abs_score_diff": round(float(np.abs(a["scores"] - b["scores"]).max()), 5),
    }


def _mask(sample: Any) -> np.ndarray:
    from winclip_nb.data import load_image, load_mask

    if sample.mask_path is None:
        return np.zeros(load_image(sample.path).shape[:2], bool)
    return load_mask(sample.mask_path)


def _pct(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else round(100 * value, 2)


def section_windows(sizes: dict[str, Any], device: torch.device, tmp: Path) -> dict[str, Any]:
    """WinCLIP+ 1-shot images/s per batch size; anomalib's WinClipModel when importable."""
    from winclip_nb import WinCLIP
    from winclip_nb.data import list_images

    root = _synthetic(tmp / "windows", 1, 8, 256)
    reference = list_images(root / SPEED_CLASS / "train" / "good")[:1]
    tests = list_images(root / SPEED_CLASS / "test" / "good")
    windows = WinCLIP(device=str(device), pretrained="random", method="windows")
    anchors = _random_anchors(windows)
    windows.build_normal_memory(reference, *anchors, progress=False)
    resized = [windows.prepare(p)[0] for p in tests]
    rows = []
    anomalib_note = None
    anomalib_model = None
    try:
        from winclip_nb.bench.parity import load_anomalib_winclip

        anomalib_model = load_anomalib_winclip(windows, anchors=torch.stack(anchors))
        with torch.inference_mode():
            ref_pixels = windows.backbone.to_pixels(np.stack([windows.prepare(reference[0])[0]]))
            anomalib_model.setup(reference_images=ref_pixels.float())
    except Exception as exc:  # noqa: BLE001 - anomalib is optional on the GPU machine
        anomalib_note = f"not measured: {type(exc).__name__}: {exc}"
        anomalib_model = None
    for bs in sizes["windows_batch_sizes"]:
        batch = torch.from_numpy(np.stack([resized[i % len(resized)] for i in range(bs)]))
        _reset_peak(device)
        rate = _rate(
            lambda b=batch: windows.detect_resized(b, *anchors, normalization="per_image"),
            bs,
            device,
            sizes["windows_min_seconds"],
        )
        row: dict[str, Any] = {
            "batch_size": bs,
            "windows_img_s": round(rate, 2),
            "windows_peak_mb": _peak_mb(device),
            "precision": str(windows.backbone.dtype),
        }
        if anomalib_model is not None:
            pixels = windows.backbone.to_pixels(batch).float()
            _reset_peak(device)

            def run_anomalib(p: torch.Tensor = pixels) -> Any:
                with torch.inference_mode():
                    return anomalib_model(p)

            row["anomalib_img_s"] = round(
                _rate(run_anomalib, bs, device, sizes["windows_min_seconds"]), 2
            )
            row["anomalib_peak_mb"] = _peak_mb(device)
        rows.append(row)
        print(
            f"  windows batch {bs}: {row['windows_img_s']} img/s"
            + (f", anomalib {row['anomalib_img_s']} img/s" if "anomalib_img_s" in row else ""),
            flush=True,
        )
    return {
        "rows": rows,
        "anomalib": anomalib_note or "measured (fp32, window layout fixed)",
        "model": windows.config.model_name,
        "image_size": windows.config.image_size,
    }


def section_explain(sizes: dict[str, Any], device: torch.device, tmp: Path) -> dict[str, Any]:
    """One detect_and_explain with a tiny random LLaVA-OneVision on the device."""
    from winclip_nb import WinCLIP, detect_and_explain
    from winclip_nb.data import list_images
    from winclip_nb.explain.llava import LlavaExplainer
    from winclip_nb.explain.tiny_llava import build_tiny_llava

    root = _synthetic(tmp / "explain", 2, 8, 256)
    train = list_images(root / SPEED_CLASS / "train" / "good")
    image = sorted((root / SPEED_CLASS / "test").glob("hole/*.png"))[0]
    winclip = WinCLIP(device=str(device), pretrained="random", image_size=sizes["image_size"])
    anchors = winclip.build_text_anchors(SPEED_CLASS)
    winclip.build_normal_memory(train, *anchors, progress=False)
    folder = build_tiny_llava(tmp / "tiny-llava")
    start = time.perf_counter()
    explainer = LlavaExplainer.from_pretrained(folder, device=str(device))
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    report = detect_and_explain(
        winclip, image, *anchors, SPEED_CLASS, explainer=explainer, out_dir=tmp / "reports"
    )
    explain_s = time.perf_counter() - start
    llava_device = str(next(explainer.model.parameters()).device)
    print(
        f"  explain: {report['explainer']} on {llava_device}, {len(report['regions'])} regions, "
        f"{explain_s:.2f} s",
        flush=True,
    )
    return {
        "explainer": report["explainer"],
        "llava_device": llava_device,
        "regions": len(report["regions"]),
        "load_s": round(load_s, 3),
        "detect_and_explain_s": round(explain_s, 3),
        "files": sorted(Path(p).name for p in report["paths"].values()),
    }


def section_benchmark(sizes: dict[str, Any], device: torch.device, tmp: Path) -> dict[str, Any]:
    """``winclip-nb benchmark`` on the synthetic set, end to end, on the device."""
    from winclip_nb.cli import main as cli_main

    out = tmp / "bench"
    args = ["benchmark", "--device", str(device), "--weights", "random", "--out", str(out)]
    if sizes["agreement_classes"]:  # dry run: one small class
        args += ["--classes", *sizes["agreement_classes"], "--image-size", str(sizes["image_size"])]
    os.environ.setdefault("WINCLIP_NB_CACHE", str(tmp / "cache"))
    start = time.perf_counter()
    code = cli_main(args)
    seconds = time.perf_counter() - start
    results = json.loads((out / "results.json").read_text()) if code == 0 else {}
    mean = results.get("mean", {})
    print(f"  benchmark: exit {code}, {seconds:.1f} s", flush=True)
    return {
        "exit_code": code,
        "seconds": round(seconds, 2),
        "command": "winclip-nb " + " ".join(a if a != str(out) else "OUT" for a in args),
        "mean": mean,
        "images_per_s": {n: c.get("images_per_s") for n, c in results.get("classes", {}).items()},
    }


# --------------------------------------------------------------------------------- main
def format_table(report: dict[str, Any]) -> str:
    """The printed summary of a report."""
    lines = [
        f"gpu-check on {report['versions'].get('gpu') or report['device']} "
        f"(torch {report['versions']['torch']}), {report['seconds']:.0f} s"
    ]
    tokens = report["sections"].get("tokens", {})
    if "rows" in tokens:
        lines += [
            "",
            f"tokens @ {tokens['image_size']} px: images/s (peak MiB)",
            f"{'precision':<10}{'batch':>6}{'backbone':>18}{'detect':>18}{'no fg masks':>13}",
        ]
        for r in tokens["rows"]:
            lines.append(
                f"{r['precision']:<10}{r['batch_size']:>6}"
                f"{r['backbone_img_s']:>10.1f} ({r['backbone_peak_mb'] or 0:>5.0f})"
                f"{r['detect_img_s']:>10.1f} ({r['detect_peak_mb'] or 0:>5.0f})"
                f"{r['detect_no_fg_img_s']:>13.1f}"
            )
    files = report["sections"].get("files", {})
    if "rows" in files:
        lines += [
            "",
            f"from {files['file_side']} px PNG files, batch {files['batch_size']}, "
            f"{files['cpu_count']} CPUs: images/s",
        ]
        for r in files["rows"]:
            lines.append(
                f"  {r['workers']:>2} workers: decode {r['decode_img_s']:>8.1f}   "
                f"decode + detect {r['decode_detect_img_s']:>8.1f}"
            )
    agree = report["sections"].get("agreement", {})
    if "classes" in agree:
        half = agree["half"]
        lines += [
            "",
            f"{half} vs fp32 (synthetic set, same random model; maps in z-scores)",
            f"{'class':<8}{'same memory':>24}{'end to end':>24}{'coreset':>9}"
            f"{'pixel AUROC fp32 / half':>26}",
            f"{'':<8}{'max / mean map diff':>24}{'max / mean map diff':>24}{'overlap':>9}",
        ]
        for name, r in agree["classes"].items():
            same, end = r["same_memory"], r["end_to_end"]
            lines.append(
                f"{name:<8}{same['max_abs_map_diff']:>14.4f} / {same['mean_abs_map_diff']:.4f}"
                f"{end['max_abs_map_diff']:>14.4f} / {end['mean_abs_map_diff']:.4f}"
                f"{r['coreset_overlap']:>9.2f}"
                f"{r['pixel_auroc']['fp32']:>14} / {r['pixel_auroc'][half]}"
            )
    win = report["sections"].get("windows", {})
    if "rows" in win:
        lines += ["", f"windows ({win['model']} @ {win['image_size']} px, 1-shot): images/s"]
        for r in win["rows"]:
            lines.append(
                f"  batch {r['batch_size']:>4}: {r['windows_img_s']:>8.2f}"
                + (f"   anomalib {r['anomalib_img_s']:>8.2f}" if "anomalib_img_s" in r else "")
            )
        lines.append(f"  anomalib: {win['anomalib']}")
    exp = report["sections"].get("explain", {})
    if "explainer" in exp:
        lines += [
            "",
            f"explain: {exp['explainer']} on {exp['llava_device']}, "
            f"{exp['detect_and_explain_s']} s, files {exp['files']}",
        ]
    bench = report["sections"].get("benchmark", {})
    if "exit_code" in bench:
        lines += [
            "",
            f"benchmark: exit {bench['exit_code']} in {bench['seconds']} s ({bench['command']})",
        ]
    for name, sec in report["sections"].items():
        if "error" in sec:
            lines.append(f"\nsection {name} FAILED: {sec['error']}")
        elif "skipped" in sec:
            lines.append(f"\nsection {name} skipped: {sec['skipped']}")
    lines.append("\nrandom weights: timings and precision differences only")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny sizes on the CPU: checks that the script runs"
    )
    parser.add_argument("--out", default="gpu-check.json", help="JSON report path")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument(
        "--budget-s",
        type=float,
        default=225.0,
        help="skip the sections left once this many seconds have passed",
    )
    args = parser.parse_args(argv)
    sizes = DRY if args.dry_run else FULL
    device = torch.device(sizes["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device; use --dry-run on a CPU", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    out = Path(args.out)
    report: dict[str, Any] = {
        "device": str(device),
        "dry_run": args.dry_run,
        "versions": _versions(),
        "sizes": {k: v for k, v in sizes.items()},
        "random_weights": True,
        "sections": {},
        "seconds": 0.0,
    }
    functions = {
        "tokens": section_tokens,
        "files": section_files,
        "agreement": section_agreement,
        "windows": section_windows,
        "explain": section_explain,
        "benchmark": section_benchmark,
    }
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for name in args.sections:
            elapsed = time.perf_counter() - started
            if elapsed > args.budget_s:
                report["sections"][name] = {"skipped": f"time budget spent ({elapsed:.0f} s)"}
                continue
            print(f"[{elapsed:6.1f} s] {name}", flush=True)
            section_start = time.perf_counter()
            try:
                report["sections"][name] = functions[name](sizes, device, Path(tmp))
            except Exception as exc:  # noqa: BLE001 - record it, go on with the next section
                traceback.print_exc()
                report["sections"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            report["sections"][name]["section_s"] = round(time.perf_counter() - section_start, 1)
            report["seconds"] = round(time.perf_counter() - started, 1)
            with contextlib.suppress(OSError):
                out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    report["seconds"] = round(time.perf_counter() - started, 1)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(format_table(report))
    print(f"\nwrote {out}")
    failed = [n for n, s in report["sections"].items() if "error" in s]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
