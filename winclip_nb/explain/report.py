"""Reports: the text and JSON report of one image, its figures, ``detect_and_explain`` and
the ``winclip-nb explain`` command (notebook 05).

:func:`detect_and_explain` runs detection and explanation for one image and writes
``{name}_heatmap.png``, ``{name}_boxes.png``, ``{name}_report.txt`` and
``{name}_report.json``; :func:`explain_images` does the same for a batch, loading the
explainer once.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..core.config import DEFAULTS
from ..core.errors import ConfigError, DataError
from ..core.results import RANDOM_WEIGHTS_BANNER, DetectionResult
from ..data.files import atomic_write, ensure_folder, safe_name
from ..data.images import list_images
from .llava import DEFAULT_LLAVA_MODEL, LlavaExplainer, load_explainer
from .rules import RULE_BASED_NAME, RuleBasedExplainer, _as_rgb, max_severity

# --- report --------------------------------------------------------------------------------
RECOMMENDATIONS = {
    "high": "REJECT: a high-severity defect was found.",
    "medium": "INSPECT: manual inspection recommended.",
    "low": "PASS with note: only low-severity irregularities; spot-check if in doubt.",
    None: "PASS: no anomaly above threshold.",
}

REPORT_TITLE = "ANOMALY DETECTION REPORT"


def _sanitise(name: str) -> str:
    """Only letters, digits, ``.``, ``_``, ``-``; no leading dots; never empty."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).lstrip("._-")
    return cleaned or "image"


def safe_stem(name: Any) -> str:
    """File-name-safe stem of an image path (``"image"`` for arrays and PIL images).

    Example:
        >>> safe_stem("../../etc/passwd"), safe_stem("test/crack/003.png"), safe_stem("..")
        ('passwd', '003', 'image')
    """
    if not isinstance(name, (str, Path)):
        return "image"
    return _sanitise(safe_name(Path(str(name)).stem))


# =========================================================================================
# Reports
# =========================================================================================
def recommendation(severity: str | None) -> str:
    """Recommendation for the highest severity found (None: nothing found)."""
    return RECOMMENDATIONS.get(severity, RECOMMENDATIONS["high"])


def format_report(report: dict[str, Any]) -> str:
    """The text report for one image from the report dict built by :func:`detect_and_explain`.

    Sections: title, image / class / score / explainer (and a RANDOM WEIGHTS warning when
    the backbone was not pretrained), ``DETECTED ANOMALIES (N regions)``, ``SUMMARY``.
    """
    regions = report["regions"]
    threshold = float(report.get("threshold", DEFAULTS.hotspot_threshold))
    lines = [REPORT_TITLE, "=" * len(REPORT_TITLE)]
    lines.append(f"Image:          {report.get('image', '')}")
    lines.append(f"Class:          {report.get('class_name', '')}")
    lines.append(f"Anomaly score:  {float(report['score']):.3f}")
    lines.append(f"Explainer:      {report['explainer']}")
    if report.get("random_weights"):
        lines.append(f"WARNING - {RANDOM_WEIGHTS_BANNER}")
    lines.append("")
    heading = f"DETECTED ANOMALIES ({len(regions)} region{'s' if len(regions) != 1 else ''})"
    lines += [heading, "-" * len(heading)]
    if not regions:
        lines.append(f"No anomaly above threshold (z >= {threshold:.1f}).")
    for region in regions:
        x0, y0, x1, y1 = region["box"]
        lines.append(
            f"[{region['id']}] confidence {region['confidence']:.2f} | "
            f"location: {region['location']} | severity: {region['severity']}"
        )
        lines.append(f"    description: {region['description']}")
        if str(region.get("description_source", "")).startswith(f"{RULE_BASED_NAME} ("):
            lines.append(f"    (description source: {region.get('description_source')})")
        lines.append(
            f"    box: ({x0}, {y0}, {x1}, {y1}) | peak z {region['peak_z']:.2f} | "
            f"mean z {region['mean_z']:.2f} | area {100 * region['area_fraction']:.2f}% of image"
        )
    lines.append("")
    lines += ["SUMMARY", "-------"]
    lines.append(f"Max severity:   {report.get('max_severity') or 'none'}")
    lines.append(f"Recommendation: {report.get('recommendation')}")
    if report.get("random_weights"):
        lines.append("(Scores come from random weights and carry no meaning.)")
    return "\n".join(lines) + "\n"


def summary_line(report: dict[str, Any]) -> str:
    """One line per image.

    Example: ``003.png [disc]: score 7.12, 2 regions, max severity high -> REJECT``.
    """
    n = len(report["regions"])
    verdict = str(report.get("recommendation", "")).split(":")[0]
    flag = " [RANDOM WEIGHTS]" if report.get("random_weights") else ""
    return (
        f"{Path(str(report.get('image', 'image'))).name} [{report.get('class_name', '')}]: "
        f"score {float(report['score']):.2f}, {n} region{'s' if n != 1 else ''}, "
        f"max severity {report.get('max_severity') or 'none'} -> {verdict}{flag}"
    )


#: Where report files go when no folder is named (relative to the working directory).
DEFAULT_REPORT_DIR = "reports"


def free_stem(folder: Path, stem: str, image_name: str) -> str:
    """``stem``, or ``stem_2``, ``stem_3``, ...: the first whose report in ``folder`` is
    absent or belongs to ``image_name`` itself, so another image's files are never
    overwritten (and a rerun of the same image reuses its names)."""
    candidate, n = stem, 1
    while True:
        existing = folder / f"{candidate}_report.json"
        if not existing.is_file():
            return candidate
        try:
            owner = json.loads(existing.read_text(encoding="utf-8")).get("image")
        except (OSError, ValueError):
            owner = None
        if owner == image_name:
            return candidate
        n += 1
        candidate = f"{stem}_{n}"


def _report_folder(out_dir: str | Path | None, save: bool) -> Path | None:
    """The folder report files go to: ``out_dir``, else ``reports/``; None with ``save=False``."""
    if not save:
        if out_dir is not None:
            raise ConfigError(f"out_dir={str(out_dir)!r} was given with save=False")
        return None
    return Path(out_dir if out_dir is not None else DEFAULT_REPORT_DIR)


def _inside(folder: Path, path: Path) -> Path:
    """``path`` if it lies directly in ``folder``; else :class:`DataError`."""
    if path.resolve().parent != folder.resolve():
        raise DataError(f"refusing to write {path}: it is outside the output folder {folder}")
    return path


def write_report_files(
    report: dict[str, Any],
    image: np.ndarray,
    result: DetectionResult,
    out_dir: str | Path,
    name: str,
) -> dict[str, str]:
    """Write the heat map, the boxes figure, the text and the JSON report; return their paths."""
    from matplotlib.figure import Figure

    from ..nb.figures import draw_boxes, overlay_heatmap, random_weights_banner, save_figure

    folder = Path(out_dir)
    ensure_folder(folder)
    name = free_stem(folder, _sanitise(name), str(report.get("image", "")))
    paths = {
        kind: _inside(folder, folder / f"{name}_{suffix}")
        for kind, suffix in (
            ("heatmap", "heatmap.png"),
            ("boxes", "boxes.png"),
            ("report_txt", "report.txt"),
            ("report_json", "report.json"),
        )
    }
    class_name = report.get("class_name", "")
    fig = Figure(figsize=(6.0, 5.0))
    overlay_heatmap(
        image,
        result.anomaly_map,
        ax=fig.add_subplot(),
        title=f"{class_name} - {name}: score {report['score']:.2f}",
    )
    if report.get("random_weights"):
        random_weights_banner(fig)
    save_figure(fig, paths["heatmap"])

    fig = Figure(figsize=(6.0, 5.0))
    n = len(report["regions"])
    draw_boxes(
        image,
        report["regions"],
        ax=fig.add_subplot(),
        labels=[str(r["id"]) for r in report["regions"]],
        title=f"{class_name} - {name}: {n} region{'s' if n != 1 else ''} "
        f"(z >= {report['threshold']:.1f})",
    )
    if report.get("random_weights"):
        random_weights_banner(fig)
    save_figure(fig, paths["boxes"])

    report["paths"] = {k: str(v) for k, v in paths.items()}
    atomic_write(paths["report_txt"], report["explanation"])
    atomic_write(paths["report_json"], json.dumps(report, indent=2))
    return report["paths"]


def explain_result(
    result: DetectionResult,
    image: Any,
    class_name: str,
    explainer: RuleBasedExplainer | LlavaExplainer,
    *,
    image_name: str = "image",
    top_k: int = DEFAULTS.top_k,
    threshold: float = DEFAULTS.hotspot_threshold,
    random_weights: bool | None = None,
    out_dir: str | Path | None = None,
    file_stem: str | None = None,
) -> dict[str, Any]:
    """Explain the first ``top_k`` hotspots of an existing detection; optionally write files.

    Returns the report dict described in :func:`detect_and_explain`. Files are named
    ``{file_stem}_...`` (default: the safe stem of ``image_name``).
    """
    rgb = _as_rgb(image)
    regions = []
    for index, hotspot in enumerate(result.hotspots[: max(0, int(top_k))]):
        explanation = explainer.explain_region(rgb, result, hotspot, class_name, threshold)
        regions.append(
            {
                "id": index + 1,
                "box": [int(v) for v in hotspot.box],
                "confidence": round(float(explanation["confidence"]), 4),
                "location": explanation["location"],
                "description": explanation["description"],
                "severity": explanation["severity"],
                "peak_z": round(float(hotspot.peak), 4),
                "mean_z": round(float(hotspot.mean), 4),
                "area_fraction": round(float(hotspot.area_fraction), 6),
                "description_source": explanation["description_source"],
                "severity_source": explanation["severity_source"],
                "llava_answer": explanation["llava_answer"],
            }
        )
    worst = max_severity([r["severity"] for r in regions])
    report: dict[str, Any] = {
        "image": image_name,
        "class_name": str(class_name),
        "score": float(result.score),
        "explainer": getattr(explainer, "name", RULE_BASED_NAME),
        "random_weights": bool(result.random_weights if random_weights is None else random_weights),
        "threshold": float(threshold),
        "regions": regions,
        "max_severity": worst,
        "recommendation": recommendation(worst),
        "paths": {},
    }
    report["explanation"] = format_report(report)
    report["summary"] = summary_line(report)
    if out_dir is not None:
        write_report_files(report, rgb, result, out_dir, file_stem or safe_stem(image_name))
    return report


def _winclip_threshold(winclip: Any) -> float:
    config = getattr(winclip, "config", None)
    return float(getattr(config, "hotspot_threshold", DEFAULTS.hotspot_threshold))


def _image_name(image_path: Any) -> str:
    return str(image_path) if isinstance(image_path, (str, Path)) else "image"


def detect_and_explain(
    winclip: Any,
    image_path: Any,
    normal_anchor: Any,
    anomalous_anchor: Any,
    class_name: str,
    use_llava: bool | str = True,
    top_k: int = DEFAULTS.top_k,
    out_dir: str | Path | None = None,
    llava_model: str | Path = DEFAULT_LLAVA_MODEL,
    explainer: RuleBasedExplainer | LlavaExplainer | None = None,
    fitted: Any = None,
    *,
    save: bool = True,
) -> dict[str, Any]:
    """Detect anomalies in one image, explain the ``top_k`` strongest regions and save
    ``{image stem}_heatmap.png``, ``_boxes.png``, ``_report.txt`` and ``_report.json`` in
    ``out_dir`` (default ``reports/``; another image's files there are never overwritten:
    a clashing stem gets ``_2``, ``_3``, ...). ``save=False`` writes nothing.

    ``use_llava``: True (LLaVA, falling back to the rule-based explainer with one warning
    when it cannot be loaded), ``"require"`` (LLaVA or :class:`ExplainerError`), False.

    Returns ``{"explanation": report text, "regions": [{"id", "box", "confidence",
    "location", "description", "severity", "peak_z", "mean_z", "area_fraction",
    "description_source", "severity_source", "llava_answer"}, ...], "score",
    "explainer": "rule-based" | "llava:<model>" (the one actually used), "random_weights",
    "paths": {"heatmap", "boxes", "report_txt", "report_json"} (empty with
    ``save=False``), "image", "class_name", "threshold", "max_severity",
    "recommendation", "summary"}``. An image without hotspots gets zero regions and a PASS.
    """
    folder = _report_folder(out_dir, save)
    threshold = _winclip_threshold(winclip)
    if explainer is None:
        explainer = load_explainer(use_llava, llava_model, threshold=threshold)
    result = winclip.detect(image_path, normal_anchor, anomalous_anchor, top_k=top_k, fitted=fitted)
    return explain_result(
        result,
        image_path,
        class_name,
        explainer,
        image_name=_image_name(image_path),
        top_k=top_k,
        threshold=threshold,
        random_weights=bool(result.random_weights or getattr(winclip, "random_weights", False)),
        out_dir=folder,
    )


def _unique_names(image_paths: Sequence[Any]) -> list[str]:
    """Safe stems; where two images share a stem, the parent folder is prefixed."""
    stems = [safe_stem(p) for p in image_paths]
    names = []
    for path, stem in zip(image_paths, stems, strict=True):
        if stems.count(stem) > 1 and isinstance(path, (str, Path)):
            stem = safe_stem(f"{Path(path).parent.name}_{stem}")
        names.append(stem)
    # Still clashing (same parent name too): number them.
    return [f"{n}_{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def explain_images(
    winclip: Any,
    image_paths: Sequence[Any],
    normal_anchor: Any,
    anomalous_anchor: Any,
    class_name: str,
    *,
    top_n: int | None = None,
    use_llava: bool | str = True,
    top_k: int = DEFAULTS.top_k,
    out_dir: str | Path | None = None,
    llava_model: str | Path = DEFAULT_LLAVA_MODEL,
    explainer: RuleBasedExplainer | LlavaExplainer | None = None,
    fitted: Any = None,
    save: bool = True,
) -> list[dict[str, Any]]:
    """Detect all images, keep the ``top_n`` highest scores (all if None), explain each,
    and save each one's files as :func:`detect_and_explain` does (``out_dir``, default
    ``reports/``; ``save=False`` writes nothing).

    The explainer is loaded once. Reports come most anomalous first, each with a
    ``rank`` (1 = highest score); file names are the images' safe stems (prefixed by
    the parent folder where stems clash, e.g. ``crack_000``).
    """
    folder = _report_folder(out_dir, save)
    image_paths = list(image_paths)
    if not image_paths:
        return []
    threshold = _winclip_threshold(winclip)
    results = winclip.detect(
        image_paths, normal_anchor, anomalous_anchor, top_k=top_k, fitted=fitted
    )
    names = _unique_names(image_paths)
    order = np.argsort([-float(r.score) for r in results], kind="stable")
    if top_n is not None:
        order = order[: max(0, int(top_n))]
    if len(order) and explainer is None:
        explainer = load_explainer(use_llava, llava_model, threshold=threshold)
    reports = []
    for rank, i in enumerate(order, start=1):
        result = results[i]
        report = explain_result(
            result,
            image_paths[i],
            class_name,
            explainer,
            image_name=_image_name(image_paths[i]),
            top_k=top_k,
            threshold=threshold,
            random_weights=bool(result.random_weights or getattr(winclip, "random_weights", False)),
            out_dir=folder,
            file_stem=names[i],
        )
        report["rank"] = rank
        reports.append(report)
    return reports


# =========================================================================================
# CLI
# =========================================================================================
def add_explain_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``winclip-nb explain IMAGE [IMAGE ...] --class-name NAME --train-dir DIR
    [--weights openai|PATH|random] [--device auto|cpu|cuda] [--no-llava] [--llava-model ID]
    [--top-k K] --out DIR``."""
    parser.add_argument("images", nargs="+", help="image files to check and explain")
    parser.add_argument("--class-name", required=True, help="object name used in prompts")
    parser.add_argument(
        "--train-dir", required=True, help="folder of normal images for the normal memory"
    )
    parser.add_argument(
        "--weights", default="openai", help="open_clip tag, local checkpoint path, or 'random'"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument(
        "--no-llava", action="store_true", help="skip LLaVA and use rule-based explanations"
    )
    parser.add_argument(
        "--llava-model", default=DEFAULT_LLAVA_MODEL, help="hub id or local folder of LLaVA"
    )
    parser.add_argument(
        "--top-k", type=int, default=DEFAULTS.top_k, help="regions explained per image"
    )
    parser.add_argument(
        "--out", default=DEFAULT_REPORT_DIR, help="output folder for figures and reports "
        f"(default {DEFAULT_REPORT_DIR})"
    )


def run_explain_cli(args: argparse.Namespace) -> int:
    """Build WinCLIP and its memory from ``--train-dir``, explain every image, print where
    the files went and one summary line per image. Returns the exit code (0)."""
    from ..winclip import WinCLIP

    # Paths are checked before the model is built (which takes seconds to minutes).
    missing = [str(path) for path in args.images if not Path(path).is_file()]
    if missing:
        raise DataError(f"image file(s) not found or not a file: {', '.join(missing)}")
    train_images = list_images(args.train_dir)
    if not train_images:
        raise DataError(f"no images found in --train-dir {args.train_dir}")
    winclip = WinCLIP(device=args.device, pretrained=args.weights)
    if getattr(winclip, "random_weights", False):
        print(f"WARNING - {RANDOM_WEIGHTS_BANNER}", file=sys.stderr)
    normal_anchor, anomalous_anchor = winclip.build_text_anchors(args.class_name)
    winclip.build_normal_memory(train_images, normal_anchor, anomalous_anchor)
    reports = explain_images(
        winclip,
        args.images,
        normal_anchor,
        anomalous_anchor,
        args.class_name,
        use_llava=not args.no_llava,
        top_k=args.top_k,
        out_dir=args.out,
        llava_model=args.llava_model,
    )
    print(f"Reports written to {args.out}")
    for report in reports:
        print(report["summary"])
        print(f"    {report['paths'].get('report_txt', '')}")
    return 0
