"""What the benchmark prints and draws: the header lines, the table, the k-shot summary and
the examples figure."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..core.results import RANDOM_WEIGHTS_BANNER
from ..core.scorers import scorer_class
from ..data.images import load_image
from .metrics import METRIC_KEYS
from .store import MEAN_ROW

#: Names in printed lines.
DATASET_TITLES = {"mvtec": "MVTec", "visa": "VisA", "folder": "folder"}

#: Column titles of the printed table.
METRIC_TITLES = {
    "image_auroc": "I-AUROC",
    "pixel_auroc": "P-AUROC",
    "pixel_ap": "P-AP",
    "aupro": "AUPRO",
    "pixel_f1_max": "P-F1max",
    "image_f1_max": "I-F1max",
}


# ======================================================================================
# Figures and explanations
# ======================================================================================
def save_examples_figure(
    class_name: str,
    evaluated: dict[str, Any],
    n: int,
    path: str | os.PathLike,
    random_weights: bool = False,
) -> Path | None:
    """PNG with the ``n`` most anomalous test images: image, ground truth, heat map.

    ``evaluated`` is the output of :func:`evaluate_class` with ``return_maps=True``.
    """
    from matplotlib.figure import Figure

    from ..nb.figures import overlay_heatmap, random_weights_banner, save_figure

    scores = np.asarray(evaluated["scores"])
    order = np.argsort(-scores, kind="stable")[: max(0, int(n))]
    if order.size == 0:
        return None
    fig = Figure(figsize=(9.0, 3.0 * order.size))
    axes = fig.subplots(order.size, 3, squeeze=False)
    for row, i in zip(axes, order, strict=True):
        amap = evaluated["maps"][i].astype(np.float32)
        height, width = amap.shape
        image = cv2.resize(load_image(evaluated["paths"][i]), (width, height), cv2.INTER_AREA)
        path_i = Path(evaluated["paths"][i])
        row[0].imshow(image)
        row[0].set_title(f"{path_i.parent.name}/{path_i.name}", fontsize=9)
        row[1].imshow(evaluated["masks"][i], cmap="gray", vmin=0, vmax=1)
        row[1].set_title("ground truth", fontsize=9)
        overlay_heatmap(image, amap, ax=row[2], colorbar=False)
        row[2].set_title(f"anomaly map, score {scores[i]:.2f}", fontsize=9)
        for ax in row[:2]:
            ax.set_axis_off()
    title = f"{class_name}: {order.size} most anomalous test images"
    if random_weights:
        title = f"RANDOM WEIGHTS - {title}"
        random_weights_banner(fig)
    fig.suptitle(title)
    return save_figure(fig, path)


def _class_line(name: str, result: dict[str, Any]) -> str:
    def fmt(key: str) -> str:
        value = result.get(key)
        return "n/a" if value is None else f"{value:.1f}"

    skipped = f", {result['n_skipped']} skipped" if result.get("n_skipped") else ""
    return (
        f"{name}: image AUROC {fmt('image_auroc')}, pixel AUROC {fmt('pixel_auroc')}, "
        f"AUPRO {fmt('aupro')} ({result['n_test']} test images{skipped}, "
        f"{result['images_per_s']:.1f} images/s, {result['seconds']:.1f} s)"
    )


# ======================================================================================
# Table
# ======================================================================================
def _header_lines(config: dict[str, Any]) -> list[str]:
    lines = [f"method: {config.get('method', 'tokens')}"]
    if config.get("random_weights"):
        lines.append(
            f"weights: {config.get('model_name')} / {config.get('weights')}  "
            f"** {RANDOM_WEIGHTS_BANNER} **"
        )
    else:
        lines.append(f"weights: {config.get('model_name')} / {config.get('weights')}")
    dataset = config.get("dataset_format") or "mvtec"
    if config.get("synthetic") and dataset == "visa":
        lines.append(
            f"data: SYNTHETIC VisA-format set at {config.get('data_root')} "
            "(not VisA: numbers are a smoke test only)"
        )
    elif config.get("synthetic"):
        lines.append(
            f"data: SYNTHETIC MVTec-format set at {config.get('data_root')} "
            "(not MVTec-AD: numbers are a smoke test only)"
        )
    elif dataset != "mvtec":
        lines.append(f"data: {config.get('data_root')} ({DATASET_TITLES.get(dataset, dataset)})")
    else:
        lines.append(f"data: {config.get('data_root')}")
    scores_sets = scorer_class(config.get("method", "tokens")).scores_sets
    memory = (
        "no memory (each test image scored against the others)"
        if scores_sets
        else "no memory (text only)"
        if config.get("k_shot") == 0
        else "the references' whole memory, no coreset"
        if config.get("coreset_ratio") in (None, 1.0)
        else f"coreset ratio {config.get('coreset_ratio')}"
        + (
            f", at most {config.get('max_images')} memory images"
            if config.get("max_images")
            else ""
        )
    )
    lines.append(
        f"k-shot: {config.get('k_shot_label')} ({memory}); seeds: "
        f"{', '.join(str(s) for s in config.get('seeds', []))}"
    )
    lines.append(
        f"device: {config.get('device')} ({config.get('device_name')}), {_batching(config)}, "
        f"image size {config.get('image_size')}, pixel metrics at {config.get('eval_resolution')}"
    )
    return lines


def _batching(config: dict[str, Any]) -> str:
    """How test images were batched: a set method scores a class's test split at once."""
    if scorer_class(config.get("method", "tokens")).scores_sets:
        return "each class's test split scored as one set"
    return f"batch size {config.get('batch_size')}"


def format_table(results: dict[str, Any]) -> str:
    """The printed table: header lines, one row per class, MEAN, a footnote.

    Metrics in percent with one decimal (``mean±std`` over seeds when there are
    several), ``n/a`` where undefined; ``n_test`` and images/s per class.
    """
    config = results.get("config", {})
    classes = results.get("classes", {})
    with_std = any("std" in c for c in classes.values())
    width = 13 if with_std else 8

    def cell(row: dict[str, Any], key: str) -> str:
        value = row.get(key)
        if value is None:
            return "n/a".rjust(width)
        std = row.get("std", {}).get(key) if with_std else None
        text = f"{value:.1f}" + (f"±{std:.1f}" if std is not None else "")
        return text.rjust(width)

    name_width = max([len(MEAN_ROW), 5, *(len(n) for n in classes)]) + 1
    head = "class".ljust(name_width) + "".join(METRIC_TITLES[k].rjust(width) for k in METRIC_KEYS)
    head += "n_test".rjust(8) + "img/s".rjust(8)
    lines = _header_lines(config) + ["", head, "-" * len(head)]
    rows = [*classes.items(), (MEAN_ROW, results.get("mean", {}))]
    for i, (name, row) in enumerate(rows):
        if i == len(rows) - 1:
            lines.append("-" * len(head))
        speed = row.get("images_per_s")
        line = name.ljust(name_width) + "".join(cell(row, k) for k in METRIC_KEYS)
        line += str(row.get("n_test", "")).rjust(8)
        line += ("n/a" if speed is None else f"{speed:.1f}").rjust(8)
        lines.append(line)
    lines.append("")
    lines.append(
        "Metrics in percent (pixel metrics at "
        f"{config.get('eval_resolution', '?')}). img/s: test images per second, "
        f"{_batching(config)}, decoding and I/O included, warm-up batch (if several) excluded."
    )
    skipped = sum(len(c.get("skipped_files", [])) for c in classes.values())
    if skipped:
        lines.append(f"{skipped} unreadable test image(s) skipped (listed in results.json).")
    if config.get("random_weights"):
        lines.append(RANDOM_WEIGHTS_BANNER)
    if config.get("synthetic") and config.get("dataset_format") == "visa":
        lines.append("SYNTHETIC data: these numbers say nothing about VisA.")
    elif config.get("synthetic"):
        lines.append("SYNTHETIC data: these numbers say nothing about MVTec-AD.")
    return "\n".join(lines)


def format_summary(runs: Sequence[dict[str, Any]]) -> str:
    """One MEAN row per run (e.g. per k-shot): the comparison a multi-k run ends with.

    >>> row = {"config": {"k_shot_label": "zero-shot"}, "mean": {"image_auroc": 50.0}}
    >>> print(format_summary([row]).splitlines()[2])
    zero-shot        50.0     n/a     n/a     n/a     n/a     n/a
    """
    head = "k-shot".ljust(12) + "".join(METRIC_TITLES[k].rjust(8) for k in METRIC_KEYS)
    lines = ["MEAN over classes, per run:", head]
    for results in runs:
        mean = results.get("mean", {})
        label = str(results.get("config", {}).get("k_shot_label", "?"))
        cells = ["n/a" if mean.get(k) is None else f"{mean[k]:.1f}" for k in METRIC_KEYS]
        lines.append(label.ljust(12) + "".join(c.rjust(8) for c in cells))
    return "\n".join(lines)
