"""The benchmark's result store: class files, results.json / results.csv, resume, merge.

Files under ``out`` (default ``results/benchmark``)::

    classes/<class>.json   one finished class, written atomically, with the config fingerprint
    results.json           {"config": ..., "classes": {name: {...}}, "mean": {...}}
    results.csv            one row per class plus MEAN

A rerun with the same settings and ``out`` skips finished classes; other settings in the
same ``out`` are refused unless ``force``. A setting missing from an older file counts as
its default. Runs of disjoint classes (shards) combine with :func:`merge_results`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import ConfigError, DataError
from ..data.datasets import MVTEC_CLASSES
from ..data.files import atomic_write, file_lock, remove_stale_temps, safe_name
from .metrics import METRIC_KEYS

CLASS_DIR = "classes"

RESULTS_JSON = "results.json"

RESULTS_CSV = "results.csv"

#: Advisory lock file under ``out``: held while class files and results.json are written.
LOCK_FILE = ".lock"

MEAN_ROW = "MEAN"

#: Config keys that do not change any metric: ignored when runs are compared (resume, merge).
RUNTIME_KEYS = frozenset(
    {
        "classes",
        "out",
        "data_root",
        "device",
        "device_name",
        "workers",
        "batch_size",
        "force",
        "skip_bad",
        "save_examples",
        "explain",
        "llava",
        "llava_model",
        "weights_requested",
        "versions",
        "throughput_note",
        "merged_from",
        "nn_chunk_size",
        "hotspot_threshold",
        "top_k",
        "min_hotspot_area",
        "k_shot_label",
        "scored_map",
        "scored_maps",
        "metrics_unit",
        "eval_resolution",
    }
)


def comparable_config(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a run's config that decides its numbers (no paths, device, timing keys).

    A setting missing from a file written by an older version counts as its default (for
    that file's method), so such a folder is refused on resume only when a setting really
    differs.
    """
    from ..core.config import WinCLIPConfig
    from .config import BenchmarkConfig  # config imports the loader, which imports this

    method = config.get("method", "tokens")
    defaults = BenchmarkConfig(model=WinCLIPConfig(method=method)).to_dict()
    full = {**defaults, **config}
    return {k: v for k, v in full.items() if k not in RUNTIME_KEYS}


def config_fingerprint(config: dict[str, Any]) -> str:
    """16 hex digits of SHA-256 over :func:`comparable_config` (sorted JSON)."""
    text = json.dumps(comparable_config(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every comparable key that differs.

    >>> config_differences({"k_shot": "full", "out": "a"}, {"k_shot": 4, "out": "b"})
    ["k_shot: 'full' -> 4"]
    """
    a, b = comparable_config(old), comparable_config(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a | b) if a.get(k) != b.get(k)]


def _percent(value: float) -> float | None:
    """A fraction -> percent rounded to 4 decimals; nan -> None (JSON null)."""
    return None if value is None or not math.isfinite(value) else round(100.0 * value, 4)


def _to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, allow_nan=False, default=str) + "\n"


def _class_order(names: Iterable[str]) -> list[str]:
    """MVTec's class order first, then alphabetical."""
    canonical = {name: i for i, name in enumerate(MVTEC_CLASSES)}
    return sorted(set(names), key=lambda n: (canonical.get(n, len(canonical)), n))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _class_files(out: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(path, content) of every readable class file under ``out/classes``."""
    folder = out / CLASS_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob("*.json")):
        content = _read_json(path)
        if content is not None and "fingerprint" in content and "result" in content:
            found.append((path, content))
    return found


def _mean_over_classes(classes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per-metric mean over classes (classes with an undefined metric left out)."""
    mean: dict[str, Any] = {}
    for key in METRIC_KEYS:
        values = [c[key] for c in classes.values() if c.get(key) is not None]
        mean[key] = round(float(np.mean(values)), 4) if values else None
    per_seed = [c.get("per_seed") for c in classes.values()]
    if classes and all(p and len(p) > 1 for p in per_seed):
        seeds = sorted(set.intersection(*(set(p) for p in per_seed)))
        if len(seeds) > 1:  # std over seeds of the per-seed class mean
            mean["std"] = {}
            for key in METRIC_KEYS:
                seed_means = []
                for s in seeds:
                    values = [p[s][key] for p in per_seed if p[s].get(key) is not None]
                    if values:
                        seed_means.append(float(np.mean(values)))
                mean["std"][key] = (
                    round(float(np.std(seed_means, ddof=1)), 4) if len(seed_means) > 1 else None
                )
    mean["n_test"] = int(sum(c.get("n_test", 0) for c in classes.values()))
    mean["n_defective"] = int(sum(c.get("n_defective", 0) for c in classes.values()))
    speeds = [c["images_per_s"] for c in classes.values() if c.get("images_per_s")]
    mean["images_per_s"] = round(float(np.mean(speeds)), 3) if speeds else None
    mean["seconds"] = round(float(sum(c.get("seconds", 0.0) for c in classes.values())), 3)
    return mean


def build_results(config: dict[str, Any], classes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The results.json content: config, classes in MVTec order, mean over classes."""
    ordered = {name: classes[name] for name in _class_order(classes)}
    return {"config": config, "classes": ordered, "mean": _mean_over_classes(ordered)}


def results_csv(results: dict[str, Any]) -> str:
    """CSV text: one row per class plus MEAN; metrics in percent, std columns with >1 seed."""
    classes = results["classes"]
    with_std = any("std" in c for c in classes.values())
    header = ["class", *METRIC_KEYS]
    if with_std:
        header += [f"{k}_std" for k in METRIC_KEYS]
    header += ["n_test", "n_defective", "seconds", "images_per_s"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    rows = [*classes.items(), (MEAN_ROW, results["mean"])]
    for name, row in rows:
        values = [name, *(row.get(k) for k in METRIC_KEYS)]
        if with_std:
            values += [row.get("std", {}).get(k) for k in METRIC_KEYS]
        values += [row.get(k) for k in ("n_test", "n_defective", "seconds", "images_per_s")]
        writer.writerow(["" if v is None else v for v in values])
    return buffer.getvalue()


def write_results(out: str | os.PathLike, results: dict[str, Any]) -> None:
    """Write ``results.json`` and ``results.csv`` under ``out`` (each atomically)."""
    out = Path(out)
    atomic_write(out / RESULTS_JSON, _to_json(results))
    atomic_write(out / RESULTS_CSV, results_csv(results))


def _write_class_file(out: Path, name: str, config: dict[str, Any], result: dict[str, Any]) -> Path:
    path = out / CLASS_DIR / f"{safe_name(name)}.json"
    content = {
        "class": name,
        "fingerprint": config_fingerprint(config),
        "config": config,
        "result": result,
    }
    atomic_write(path, _to_json(content))
    return path


def _finished_classes(out: Path, fingerprint: str) -> dict[str, dict[str, Any]]:
    return {
        c["class"]: c["result"]
        for _, c in _class_files(out)
        if config_fingerprint(c.get("config", {})) == fingerprint
    }


def _rebuild_results(out: Path, config: dict[str, Any]) -> dict[str, Any]:
    """results.json / results.csv from every class file of these settings on disk (under
    the ``out`` lock). ``config["classes"]`` becomes this run's classes plus every finished
    one (shards writing into one ``out`` each add theirs)."""
    with file_lock(out / LOCK_FILE):
        return _rebuild(out, config)


def _rebuild(out: Path, config: dict[str, Any]) -> dict[str, Any]:
    finished = _finished_classes(out, config_fingerprint(config))
    names = list(dict.fromkeys([*config.get("classes", []), *_class_order(finished)]))
    results = build_results(dict(config, classes=names), finished)
    write_results(out, results)
    return results


def _record_class(
    out: Path, name: str, config: dict[str, Any], result: dict[str, Any]
) -> dict[str, Any]:
    """Save one finished class and rebuild the result files, under the ``out`` lock."""
    with file_lock(out / LOCK_FILE):
        _write_class_file(out, name, config, result)
        return _rebuild(out, config)


def _check_out_dir(out: Path, config: dict[str, Any], force: bool, log: Callable) -> None:
    """Refuse an ``out`` holding results of other settings (``force``: remove those); remove
    temporary files a killed run left. Under the ``out`` lock."""
    with file_lock(out / LOCK_FILE):
        _check_foreign(out, config, force, log)
        remove_stale_temps(out, out / CLASS_DIR)


def _check_foreign(out: Path, config: dict[str, Any], force: bool, log: Callable) -> None:
    fingerprint = config_fingerprint(config)
    foreign = [
        (p, c)
        for p, c in _class_files(out)
        if config_fingerprint(c.get("config", {})) != fingerprint
    ]
    summary = _read_json(out / RESULTS_JSON)
    summary_foreign = (
        summary is not None
        and isinstance(summary.get("config"), dict)
        and config_fingerprint(summary["config"]) != fingerprint
    )
    if not foreign and not summary_foreign:
        return
    old_config = foreign[0][1].get("config", {}) if foreign else summary["config"]  # type: ignore[index]
    if not force:
        diff = "; ".join(config_differences(old_config, config)) or "settings differ"
        raise ConfigError(
            f"{out} holds results of other settings ({diff}); use another --out, "
            "or --force to replace them"
        )
    for path, _ in foreign:
        path.unlink(missing_ok=True)
    if summary_foreign:
        for name in (RESULTS_JSON, RESULTS_CSV):
            (out / name).unlink(missing_ok=True)
    log(f"--force: removed {len(foreign)} class result(s) of other settings from {out}")


def _combine_seeds(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds of each metric, sample std (ddof=1) with >1 seed; sums of timings."""
    runs = list(per_seed.values())
    combined: dict[str, Any] = {}
    for key in METRIC_KEYS:
        values = [r[key] for r in runs if r[key] is not None]
        combined[key] = round(float(np.mean(values)), 4) if values else None
    if len(runs) > 1:
        combined["std"] = {}
        for key in METRIC_KEYS:
            values = [r[key] for r in runs if r[key] is not None]
            combined["std"][key] = (
                round(float(np.std(values, ddof=1)), 4) if len(values) > 1 else None
            )
        combined["per_seed"] = {str(s): {k: r[k] for k in METRIC_KEYS} for s, r in per_seed.items()}
    last = runs[-1]
    combined.update(
        n_test=last["n_test"],
        n_defective=last["n_defective"],
        n_memory_images=last["n_memory_images"],
        memory_patches=last["memory_patches"],
        seconds=round(sum(r["seconds"] for r in runs), 3),
        images_per_s=round(float(np.mean([r["images_per_s"] for r in runs])), 3),
        peak_gpu_mb=max((r["peak_gpu_mb"] or 0.0 for r in runs), default=0.0) or None,
        skipped_files=sorted({f for r in runs for f in r["skipped_files"]}),
    )
    combined["n_skipped"] = len(combined["skipped_files"])
    return combined


# ======================================================================================
# Merge
# ======================================================================================
def merge_results(
    dirs: Sequence[str | os.PathLike], out: str | os.PathLike, *, verbose: bool = True
) -> dict[str, Any]:
    """Combine the per-class results of runs over disjoint classes into ``out``.

    Every input folder needs a results.json; runs whose settings differ (ignoring the
    class list, output folder, device, workers and timing keys) are refused with
    :class:`ConfigError`, and so is a class present in two runs with different values.
    Writes ``out/classes/*.json``, results.json and results.csv; returns the results.
    """
    log: Callable[..., None] = print if verbose else (lambda *a, **k: None)
    if not dirs:
        raise ConfigError("merge needs at least one results folder")
    runs: list[tuple[Path, dict[str, Any]]] = []
    for folder in map(Path, dirs):
        if not folder.is_dir():
            raise DataError(f"results folder not found: {folder}")
        content = _read_json(folder / RESULTS_JSON)
        if content is None or not isinstance(content.get("classes"), dict):
            raise DataError(f"no readable {RESULTS_JSON} in {folder}")
        runs.append((folder, content))
    first_dir, first = runs[0]
    fingerprint = config_fingerprint(first["config"])
    classes: dict[str, dict[str, Any]] = {}
    source: dict[str, Path] = {}
    for folder, content in runs:
        if config_fingerprint(content["config"]) != fingerprint:
            diff = "; ".join(config_differences(first["config"], content["config"]))
            raise ConfigError(f"cannot merge {folder} with {first_dir}: settings differ ({diff})")
        if content["config"].get("versions") != first["config"].get("versions"):
            log(f"note: package versions of {folder} differ from {first_dir}")
        for name, result in content["classes"].items():
            if name in classes and _metrics_of(classes[name]) != _metrics_of(result):
                raise ConfigError(
                    f"class {name!r} is in both {source[name]} and {folder} with different values"
                )
            classes.setdefault(name, result)
            source.setdefault(name, folder)
    devices = list(dict.fromkeys(str(c["config"].get("device")) for _, c in runs))
    config = dict(first["config"])
    config.update(
        classes=_class_order(classes),
        out=str(out),
        device=devices[0] if len(devices) == 1 else ", ".join(devices),
        merged_from=[str(d) for d, _ in runs],
    )
    out = Path(out)
    with file_lock(out / LOCK_FILE):
        _check_foreign(out, config, force=False, log=log)
        for name, result in classes.items():
            _write_class_file(out, name, config, result)
        results = build_results(config, _finished_classes(out, fingerprint))
        write_results(out, results)
    return results


def _metrics_of(result: dict[str, Any]) -> dict[str, Any]:
    return {k: result.get(k) for k in METRIC_KEYS}
