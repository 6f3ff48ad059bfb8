"""The MVTec-AD benchmark protocol (notebook 06).

For every class: text anchors, a fitted class (zero-shot: none; k-shot: k drawn
``train/good`` images, all their patches; ``full``: every training image up to
``max_images``, with the coreset), then every test image through
:meth:`~winclip_nb.core.detector.Detector.detect_batch` fed by a ``DataLoader`` that
decodes and resizes in worker processes. Maps are resized on the device to the evaluation
size (default 256 x 256, masks nearest-neighbour) and kept as float16. Metrics
(:data:`~winclip_nb.bench.metrics.METRIC_KEYS`) are reported in percent; the map they
are computed on is the method's ``scored_map``.

Example (offline, random weights, synthetic data):
    >>> cfg = BenchmarkConfig(model=WinCLIPConfig(pretrained="random", image_size=112))
    >>> results = run_benchmark(cfg)  # doctest: +SKIP
    >>> print(format_table(results))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from .. import __version__
from ..core.errors import ConfigError, DataError, ImageReadError
from ..core.runtime import progress, resolve_device
from ..core.scorers import scorer_class
from ..data.datasets import LABEL_DEFECTIVE, ClassData, sample_k_shot
from ..data.files import safe_name
from .config import BenchmarkConfig, k_shot_label
from .loader import (
    TestImageDataset,
    _collate,
    _stack_full_resolution,
    _store_maps,
    default_workers,
    load_benchmark_classes,
    resolve_dataset_root,
)
from .metrics import METRIC_KEYS, compute_metrics
from .report import _class_line, _header_lines, save_examples_figure
from .store import (
    _check_out_dir,
    _combine_seeds,
    _finished_classes,
    _percent,
    _rebuild_results,
    _record_class,
    config_fingerprint,
)

EXAMPLES_DIR = "examples"
EXPLAIN_DIR = "explain"
THROUGHPUT_NOTE = (
    "images_per_s: test images per second at the given batch size, image decoding and "
    "I/O included, first (warm-up) batch excluded"
)


# ======================================================================================
# One class
# ======================================================================================
def memory_images(class_data: ClassData, cfg: BenchmarkConfig, seed: int) -> list[Path]:
    """The normal images of the memory: k drawn with ``seed``, or the first ``max_images``."""
    cfg = cfg.validate()
    if cfg.zero_shot:
        return []
    if cfg.k_shot == "full":
        train = sample_k_shot(class_data.train, "full", seed)
        return train[: cfg.max_images] if cfg.max_images else train
    if cfg.k_shot > class_data.n_train:
        raise ConfigError(
            f"k_shot={cfg.k_shot} but class {class_data.name!r} has only {class_data.n_train} "
            f"training images in {class_data.train_source or class_data.root}"
        )
    return sample_k_shot(class_data.train, cfg.k_shot, seed)


def evaluate_class(
    winclip: Any,
    class_data: ClassData,
    cfg: BenchmarkConfig,
    *,
    seed: int | None = None,
    progress: bool = True,
    return_maps: bool = False,
) -> dict[str, Any]:
    """Fit one class, run every test image, compute the metrics.

    Args:
        winclip: a :class:`~winclip_nb.WinCLIP` built with the run's settings
            (:func:`_load_model`); it is not changed.
        class_data: from :func:`~winclip_nb.data.load_mvtec_class`.
        cfg: k-shot, eval size, workers, skip_bad (the model's settings are the winclip's).
        seed: k-shot draw and coreset seed (default: the first of ``cfg.seeds``).
        return_maps: also return ``maps`` (N, E, E) float16, ``masks`` (N, E, E) bool,
            ``scores`` (N,), ``labels`` (N,) and ``paths`` of the evaluated images.

    Returns:
        ``{metric: percent or None, "n_test", "n_defective", "n_memory_images",
        "seconds", "memory_seconds", "test_seconds", "images_per_s", "peak_gpu_mb",
        "skipped_files"}`` (and ``fitted``, the class's :class:`FittedClass`, with
        ``return_maps``).
    """
    cfg = cfg.validate()
    seed = cfg.seeds[0] if seed is None else int(seed)
    device = winclip.device
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    anchors = winclip.build_text_anchors(class_data.name)
    train = memory_images(class_data, cfg, seed)
    fitted = winclip.fit_images(
        anchors, train, coreset_ratio=cfg.effective_coreset_ratio, seed=seed, progress=progress
    )
    memory_seconds = time.perf_counter() - start
    arrays = _run_test_images(winclip, fitted, class_data, cfg, progress, seed)
    ok = arrays["ok"]
    labels = class_data.labels[ok]
    maps, masks, scores = arrays["maps"], arrays["masks"], arrays["scores"]
    if labels.size == 0:
        raise DataError(f"no readable test images left for class {class_data.name!r}")
    metrics = compute_metrics(labels, scores, masks, maps)
    total = time.perf_counter() - start
    result: dict[str, Any] = {key: _percent(metrics[key]) for key in METRIC_KEYS}
    result.update(
        n_test=int(labels.size),
        n_defective=int(np.count_nonzero(labels == LABEL_DEFECTIVE)),
        n_memory_images=len(train),
        memory_patches=None if fitted.memory is None else fitted.memory.size,
        seconds=round(total, 3),
        memory_seconds=round(memory_seconds, 3),
        test_seconds=round(arrays["test_seconds"], 3),
        images_per_s=round(arrays["images_per_s"], 3),
        peak_gpu_mb=(
            round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            if device.type == "cuda"
            else None
        ),
        skipped_files=arrays["skipped"],
    )
    if return_maps:
        result.update(
            maps=maps,
            masks=masks,
            scores=scores,
            labels=labels,
            paths=[s.path for s, keep in zip(class_data.test, ok, strict=True) if keep],
            fitted=fitted,
        )
    return result


def _run_test_images(
    winclip: Any,
    fitted: Any,
    class_data: ClassData,
    cfg: BenchmarkConfig,
    show: bool,
    seed: int,
) -> dict[str, Any]:
    """Maps, masks and scores of every readable test image (see :func:`evaluate_class`)."""
    device = winclip.device
    n = class_data.n_test
    eval_size = cfg.eval_size
    workers = default_workers(device) if cfg.workers is None else cfg.workers
    dataset = TestImageDataset(class_data.test, winclip.config.image_size, eval_size)
    loader = DataLoader(
        dataset,
        # a method that scores sets (musc) scores the class's test images together
        batch_size=n if winclip.scorer.scores_sets else winclip.config.batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        collate_fn=_collate,
    )
    if eval_size:
        maps: Any = np.zeros((n, eval_size, eval_size), np.float16)
        masks: Any = np.zeros((n, eval_size, eval_size), bool)
    else:
        maps, masks = [None] * n, [None] * n
    scores = np.zeros(n, np.float64)
    ok = np.zeros(n, bool)
    skipped: list[str] = []
    batches = progress(loader, len(loader), f"{class_data.name} (seed {seed})", show, unit="batch")
    start = time.perf_counter()
    warm_end, warm_images = None, 0
    for batch in batches:
        errors = batch["error"]
        bad = [i for i, err in enumerate(errors) if err]
        if bad and not cfg.skip_bad:
            raise ImageReadError(errors[bad[0]])
        skipped += [str(class_data.test[batch["index"][i]].path) for i in bad]
        keep = [i for i, err in enumerate(errors) if not err]
        if keep:
            rows = [batch["index"][i] for i in keep]
            out = winclip.detect_batch(batch["image"][keep] if bad else batch["image"], fitted)
            # the map the method's published protocol scores (anomaly_map or raw_map)
            _store_maps(out[winclip.scorer.scored_map], batch, keep, rows, eval_size, maps, masks)
            scores[rows] = out["score"].float().cpu().numpy()
            ok[rows] = True
        if warm_end is None:
            warm_end, warm_images = time.perf_counter(), len(keep)
    end = time.perf_counter()
    measured = int(ok.sum()) - warm_images
    if measured > 0 and end > warm_end:
        images_per_s = measured / (end - warm_end)
    else:  # a single batch: no warm-up to exclude
        images_per_s = int(ok.sum()) / max(end - start, 1e-9)
    if eval_size:
        maps, masks = maps[ok], masks[ok]
    else:
        maps, masks = _stack_full_resolution(maps, masks, ok, class_data)
    return {
        "maps": maps,
        "masks": masks,
        "scores": scores[ok],
        "ok": ok,
        "skipped": skipped,
        "test_seconds": end - start,
        "images_per_s": images_per_s,
    }


def _explain_top(
    winclip: Any,
    class_data: ClassData,
    evaluated: dict[str, Any],
    n: int,
    out_dir: Path,
    explainer: Any,
) -> list[str]:
    """Explain the ``n`` most anomalous test images; returns their summary lines."""
    from ..explain.report import explain_images

    order = np.argsort(-np.asarray(evaluated["scores"]), kind="stable")[:n]
    fitted = evaluated["fitted"]
    reports = explain_images(
        winclip,
        [evaluated["paths"][i] for i in order],
        *fitted.anchors,
        class_data.name,
        out_dir=out_dir,
        explainer=explainer,
        fitted=fitted,
    )
    return [str(r.get("summary", "")) for r in reports]


# ======================================================================================
# Whole benchmark
# ======================================================================================
def _load_model(cfg: BenchmarkConfig, weights: str, seed: int, device: torch.device,
                backbone: Any = None) -> Any:
    """A WinCLIP with the run's settings; ``seed`` draws random-init weights. ``backbone``:
    an already loaded one for these weights, seed and model (its text cache is kept)."""
    from ..winclip import WinCLIP

    ratio = cfg.effective_coreset_ratio
    model = cfg.model.replace(
        pretrained=weights,
        seed=seed,
        device=str(device),
        normalization=cfg.effective_normalization,
        coreset_ratio=cfg.model.coreset_ratio if ratio is None else ratio,
    )
    return WinCLIP(config=model, backbone=backbone)


def _package_versions() -> dict[str, str]:
    import open_clip
    import sklearn

    return {
        "winclip_nb": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "open_clip": getattr(open_clip, "__version__", "unknown"),
        "sklearn": sklearn.__version__,
    }


def describe_run(
    cfg: BenchmarkConfig,
    *,
    data_root: Path,
    synthetic: bool,
    weights_requested: str,
    weights_label: str,
    random_weights: bool,
    device: torch.device,
) -> dict[str, Any]:
    """The ``config`` block of results.json: every setting plus what was actually used."""
    from ..data.synthetic import synthetic_settings

    config = cfg.to_dict()
    config.update(
        data_root=str(data_root),
        synthetic=synthetic,
        dataset=synthetic_settings(data_root) if synthetic else None,
        weights_requested=weights_requested,
        weights=weights_label,
        random_weights=random_weights,
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        workers=default_workers(device) if cfg.workers is None else cfg.workers,
        coreset_ratio=cfg.effective_coreset_ratio,
        normalization=cfg.effective_normalization,
        max_images=cfg.effective_max_images,
        k_shot_label=k_shot_label(cfg.k_shot),
        scored_map=scorer_class(cfg.model.method).scored_map,
        metrics_unit="percent",
        eval_resolution="full" if cfg.eval_size == 0 else f"{cfg.eval_size}x{cfg.eval_size}",
        throughput_note=THROUGHPUT_NOTE,
        versions=_package_versions(),
    )
    return config


def _prepare(cfg: BenchmarkConfig, log: Callable[..., None]) -> dict[str, Any]:
    """Everything checked before any model work: device, data, weights, the out folder."""
    from ..hub.weights import check_layers, resolve_weights

    device = resolve_device(cfg.model.device)
    root, synthetic = resolve_dataset_root(cfg)
    class_data = load_benchmark_classes(cfg, root)
    for data in class_data.values():
        memory_images(data, cfg, cfg.seeds[0])  # k larger than the training set fails here
    scorer = scorer_class(cfg.model.method)
    requested = cfg.model.pretrained or ("auto" if synthetic else scorer.default_weights)
    resolved = resolve_weights(cfg.model.model_name, requested, scorer.default_weights,
                               scorer.backbone_family)
    check_layers(cfg.model.model_name, cfg.model.layers)  # before a model is built
    # A tag is passed on as a tag (it carries open_clip's quick_gelu setting), never a file.
    weights = (
        "random"
        if resolved.random
        else resolved.label
        if requested.lower() == "auto"
        else requested
    )
    config = describe_run(
        dataclasses.replace(cfg, classes=list(class_data)),
        data_root=root,
        synthetic=synthetic,
        weights_requested=requested,
        weights_label=resolved.label,
        random_weights=resolved.random,
        device=device,
    )
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out must be a folder, but {out} is a file")
    if out.exists():
        _check_out_dir(out, config, cfg.force, log)
    for line in _header_lines(config):
        log(line)
    return {
        "device": device,
        "class_data": class_data,
        "weights": weights,
        "out": out,
        "random": resolved.random,
        "config": config,
    }


def _load_explainer(cfg: BenchmarkConfig, device: torch.device) -> Any:
    """Loaded before any class is computed: a LLaVA that cannot be loaded (missing, offline,
    out of memory) falls back to rule-based with a notice instead of failing after the
    metrics of a class were computed but not yet saved."""
    from ..explain.llava import DEFAULT_LLAVA_MODEL, load_explainer

    return load_explainer(
        "auto" if cfg.llava else False,
        cfg.llava_model or DEFAULT_LLAVA_MODEL,
        device=str(device),
        threshold=cfg.model.hotspot_threshold,
    )


def run_benchmark(
    cfg: BenchmarkConfig, progress: bool = True, *, verbose: bool = True
) -> dict[str, Any]:
    """Run (or resume) the benchmark; returns the results.json content.

    Fails before any model work on bad settings, a missing or malformed dataset
    (:class:`~winclip_nb.core.errors.DataError` naming the path), unavailable weights or
    device, or an ``out`` folder holding results of other settings.
    """
    cfg = cfg.validate()
    log: Callable[..., None] = print if verbose else (lambda *a, **k: None)
    run = _prepare(cfg, log)
    out, config, class_data = run["out"], run["config"], run["class_data"]
    done = _finished_classes(out, config_fingerprint(config))
    todo = [n for n in class_data if cfg.force or n not in done]
    explainer = _load_explainer(cfg, run["device"]) if cfg.explain and todo else None
    models: dict[int | None, Any] = {}
    steps = [(name, seed) for name in todo for seed in cfg.seeds]
    per_seed: dict[int, dict[str, Any]] = {}
    for name in class_data:
        if name not in todo:
            log(f"{name}: skipped (done)")
    for name, seed in progress_steps(steps, progress):
        key = seed if run["random"] else None
        if key not in models:
            models[key] = _load_model(cfg, run["weights"], seed, run["device"])
        keep_maps = seed == cfg.seeds[-1] and bool(cfg.save_examples or cfg.explain)
        per_seed[seed] = evaluate_class(
            models[key], class_data[name], cfg, seed=seed, progress=progress, return_maps=keep_maps
        )
        if seed == cfg.seeds[-1]:
            result = _finish_class(cfg, run, name, per_seed, models[key], explainer)
            _record_class(out, name, config, result)
            log(_class_line(name, result))
            per_seed = {}
    return _rebuild_results(out, config)


def progress_steps(steps: list[tuple[str, int]], show: bool) -> Any:
    """The (class, seed) steps with one overall progress bar."""
    return progress(steps, len(steps), "benchmark", show and bool(steps), unit="class")


def _finish_class(
    cfg: BenchmarkConfig,
    run: dict[str, Any],
    name: str,
    per_seed: dict[int, dict[str, Any]],
    winclip: Any,
    explainer: Any,
) -> dict[str, Any]:
    """Combine the seeds of one class; add the examples figure and explanations."""
    result = _combine_seeds(per_seed)
    evaluated = per_seed[cfg.seeds[-1]]
    if cfg.save_examples:
        figure = save_examples_figure(
            name,
            evaluated,
            cfg.save_examples,
            run["out"] / EXAMPLES_DIR / f"{safe_name(name)}.png",
            run["random"],
        )
        result["examples_figure"] = None if figure is None else str(figure)
    if cfg.explain:
        result["explainer"] = getattr(explainer, "name", "rule-based")
        result["explanations"] = _explain_top(
            winclip,
            run["class_data"][name],
            evaluated,
            cfg.explain,
            run["out"] / EXPLAIN_DIR / safe_name(name),
            explainer,
        )
    return result
