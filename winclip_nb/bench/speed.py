"""Throughput of the detector (``winclip-nb bench-speed``, ``benchmarks/throughput.py``).

On a synthetic set (object class ``disc``, 256 px PNGs, so the foreground mask runs)
one run measures, at one batch size and thread count:

- **backbone**: images/s of :meth:`~winclip_nb.backbone.ClipBackbone.forward` on
  pre-resized ``(B, S, S, 3)`` uint8 batches (the multi-layer tokens and nothing else);
- **detect**: images/s of :meth:`~winclip_nb.detector.WinCLIP.detect_resized` on the same
  batches: tokens, text map, NN map against a full-size memory, fusion, normalisation,
  upsampling, smoothing and image score;
- **detect with decode**: images/s of :meth:`~winclip_nb.detector.WinCLIP.detect` from
  file paths (decoding, resizing, detection, maps at the original size and hotspots);
- the memory-bank build time, the coreset selection time (:func:`greedy_coreset`
  alone) and the time to extract the features it selects from;
- peak resident memory of the process and, on CUDA, peak allocated GPU memory
  during detection.

One untimed batch warms every path up. Then every batch goes through backbone,
detect and detect with decode in turn (A B C A B C ...), ``repeats`` times, and the
medians of the per-batch rates are reported, so a busy machine slows all paths alike
(``ratio_paired_median`` is the median over batches of backbone time / detect time).
Compare the ratios within one run, not absolute numbers across machines.

Example (offline, random weights; ~2 minutes on a 2-core CPU):
    >>> cfg = SpeedConfig(device="cpu", n_images=8, memory_images=10)
    >>> result = run_speed(cfg)  # doctest: +SKIP
    >>> print(format_speed_table(result))  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import math
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.anchors import TextAnchors
from ..core.config import WinCLIPConfig, check_fields, number, setting
from ..core.errors import WinCLIPError
from ..core.scorers import Scorer
from ..data.files import atomic_write
from ..options import add_config_arguments, config_changes

#: An object class, so the foreground mask (OpenCV) is part of the timed path.
SPEED_CLASS = "disc"
SYNTHETIC_SIZE = 256
ANCHOR_MODES = ("text", "random")
#: Functions listed by ``--profile``.
PROFILE_TOP = 20

#: Targets: detect / backbone throughput on CPU (batch 8), coreset time as a fraction of
#: the feature extraction it selects from, GPU memory during detection (batch 32).
TARGET_MIN_RATIO = 0.85
TARGET_MAX_CORESET_FRACTION = 0.10
TARGET_MAX_GPU_MB = 2048.0

REQUIRED_KEYS = (
    "backbone_img_per_s",
    "detect_img_per_s",
    "detect_with_decode_img_per_s",
    "ratio",
    "coreset_s",
    "feature_extract_s",
    "coreset_fraction",
    "memory_build_s",
    "peak_rss_mb",
    "peak_gpu_mb",
    "machine",
    "device",
    "batch_size",
    "threads",
    "weights",
    "random_weights",
    "torch_version",
    "targets",
)


@dataclass
class SpeedConfig:
    """Settings of one speed run (see the module docstring): the detector's (``model``:
    device, weights, batch size, input size, precision, seed) and the harness's."""

    model: WinCLIPConfig = field(default_factory=lambda: WinCLIPConfig(pretrained="random"))
    n_images: int = setting(32, "test images timed per pass", number(1, integer=True))
    memory_images: int = setting(
        50, "normal images in the memory bank (10 % coreset)", number(1, integer=True)
    )
    repeats: int = setting(
        3, "timed passes of each path (medians are reported)", number(1, integer=True)
    )
    threads: int | None = setting(
        None, "torch CPU threads (default: torch's current)", number(1, integer=True, optional=True)
    )
    data_dir: str | None = setting(
        None, "folder for the synthetic images (kept and reused; default: a temporary folder)"
    )
    anchors: str = setting(
        "text",
        "text: the class's prompt anchors; random: seeded random "
        "unit vectors (skips text encoding)",
        choices=ANCHOR_MODES,
    )
    profile: bool = setting(False, "print a cProfile of one detect pass")

    def validate(self) -> SpeedConfig:
        """Raise :class:`ConfigError` naming the first bad setting; return self."""
        return check_fields(self)


# ------------------------------------------------------------------ measurements
def _sync(device: torch.device) -> None:
    """Wait for queued GPU work (only at the end of a timed pass)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall-clock seconds of ``fn()`` including the device work it queued."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (current RSS where no peak is kept)."""
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 1024**2 if sys.platform == "darwin" else peak / 1024  # bytes vs KiB
    except ImportError:  # Windows
        import psutil

        info = psutil.Process().memory_info()
        return getattr(info, "peak_wset", info.rss) / 1024**2


def machine_info(device: torch.device) -> dict[str, Any]:
    """Platform, CPU model, core counts and (on CUDA) the GPU name."""
    cpu_model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except ImportError:  # pragma: no cover - psutil is a dependency
        physical = None
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model,
        "logical_cores": os.cpu_count(),
        "physical_cores": physical,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    return info


@contextlib.contextmanager
def _torch_threads(n_threads: int | None) -> Iterator[int]:
    """Run with ``n_threads`` torch CPU threads (None: torch's current), then restore."""
    before = torch.get_num_threads()
    if n_threads is not None:
        torch.set_num_threads(n_threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _synthetic_paths(root: Path, cfg: SpeedConfig) -> tuple[list[Path], list[Path]]:
    """(memory image paths, test image paths) of a synthetic set written under ``root``."""
    from ..data import SYNTHETIC_DEFECTS, load_mvtec_class, make_synthetic_mvtec

    per_defect = max(1, math.ceil(cfg.n_images / 2 / len(SYNTHETIC_DEFECTS)))
    make_synthetic_mvtec(
        root,
        [SPEED_CLASS],
        n_train=cfg.memory_images,
        n_test_good=max(1, math.ceil(cfg.n_images / 2)),
        n_test_per_defect=per_defect,
        image_size=SYNTHETIC_SIZE,
        seed=cfg.model.seed,
    )
    data = load_mvtec_class(root, SPEED_CLASS)
    tests = [sample.path for sample in data.test]
    tests = (tests * math.ceil(cfg.n_images / len(tests)))[: cfg.n_images]
    return list(data.train[: cfg.memory_images]), tests


def _target(value: float | None, limit: float, rule: str, applies: bool) -> dict[str, Any]:
    """One target: ``value rule limit`` ('>=' or '<='); pass is None where it does not apply."""
    passed = None
    if applies and value is not None:
        passed = bool(value >= limit if rule == ">=" else value <= limit)
    return {"value": value, "rule": rule, "limit": limit, "applies": applies, "pass": passed}


def _profile_detect(fn: Callable[[], Any], top: int = PROFILE_TOP) -> str:
    """cProfile of one call, the ``top`` functions by own time."""
    profiler = cProfile.Profile()
    profiler.enable()
    fn()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def random_anchors(winclip: Any, class_name: str, seed: int) -> TextAnchors:
    """Seeded random unit anchors for ``class_name``: the speed of a forward pass does not
    depend on the text, and these skip encoding the prompt ensemble."""
    if type(winclip.scorer).anchors is Scorer.anchors:  # a method without text
        return winclip.scorer.anchors(class_name)
    gen = torch.Generator().manual_seed(seed)
    pair = torch.randn(2, winclip.backbone.embed_dim, generator=gen)
    pair = torch.nn.functional.normalize(pair, dim=-1).to(winclip.device)
    return TextAnchors(pair[0], pair[1], class_name)


def _anchors(winclip: Any, cfg: SpeedConfig) -> TextAnchors:
    """The class's text anchors, or seeded random unit vectors (``cfg.anchors``)."""
    if cfg.anchors == "text":
        return winclip.build_text_anchors(SPEED_CLASS)
    return random_anchors(winclip, SPEED_CLASS, cfg.model.seed)


def run_speed(cfg: SpeedConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure the throughput of the detector; returns the JSON-ready result.

    Args:
        cfg: the run's settings.
        log: called with progress lines (e.g. ``print``); None is silent.

    Returns:
        A dict with every key of :data:`REQUIRED_KEYS` plus raw samples and extras.
    """
    from ..core.memory import coreset_size, greedy_coreset
    from ..core.runtime import resolve_device
    from ..winclip import WinCLIP

    cfg.validate()
    model_cfg = cfg.model
    say = log or (lambda _msg: None)
    device = resolve_device(model_cfg.device)
    with _torch_threads(cfg.threads) as threads, contextlib.ExitStack() as stack:
        if cfg.data_dir is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="winclip_speed_")))
        else:
            root = Path(cfg.data_dir)
        memory_paths, test_paths = _synthetic_paths(root, cfg)

        weights = model_cfg.pretrained
        say(f"model: {model_cfg.model_name} ({weights}) on {device}, {threads} CPU threads")
        start = time.perf_counter()
        winclip = WinCLIP(config=model_cfg.replace(device=str(device)))
        model_load_s = time.perf_counter() - start
        start = time.perf_counter()
        anchors = _anchors(winclip, cfg)
        text_anchors_s = time.perf_counter() - start

        # --- memory: build, then its parts measured on their own
        say(f"memory bank from {len(memory_paths)} images")
        memory_build_s = _timed(
            lambda: winclip.build_normal_memory(memory_paths, *anchors, progress=False), device
        )
        cal = winclip.config
        memory_resized = np.stack([winclip.prepare(path)[0] for path in memory_paths])
        extracted: dict[str, torch.Tensor] = {}

        def extract() -> None:
            bs = cal.batch_size
            parts = [
                winclip.backbone(memory_resized[i : i + bs])[0]
                for i in range(0, len(memory_resized), bs)
            ]
            extracted["tokens"] = torch.cat(parts)

        feature_extract_s = _timed(extract, device)
        tokens = extracted.pop("tokens")
        n_img, n_layers, n_patch, dim = tokens.shape
        flat = tokens.permute(0, 2, 1, 3).reshape(n_img * n_patch, n_layers * dim)
        del tokens

        def select() -> None:
            greedy_coreset(flat, cal.coreset_ratio, cal.coreset_projection_dim, cal.seed)

        coreset_runs = [_timed(select, device) for _ in range(cfg.repeats)]
        n_picks = coreset_size(flat.shape[0], cal.coreset_ratio)

        # --- throughput: A (backbone) B (detect) C (detect from files), interleaved per
        # batch, so the three paths of one batch see the same machine load.
        test_resized = [winclip.prepare(path)[0] for path in test_paths]
        bs = cal.batch_size
        starts = range(0, len(test_paths), bs)
        batches = [np.stack(test_resized[i : i + bs]) for i in starts]
        path_batches = [test_paths[i : i + bs] for i in starts]
        n = len(test_paths)

        def paths_for(j: int) -> dict[str, Callable[[], Any]]:
            return {
                "backbone": lambda: winclip.backbone(batches[j]),
                "detect": lambda: winclip.detect_resized(batches[j], *anchors),
                "detect_with_decode": lambda: winclip.detect(
                    list(path_batches[j]), *anchors, batch_size=bs
                ),
            }

        say("warm-up (untimed)")
        for fn in paths_for(0).values():
            fn()
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        names = ("backbone", "detect", "detect_with_decode")
        samples: dict[str, list[float]] = {name: [] for name in names}
        batch_sizes: list[int] = []
        for repeat in range(cfg.repeats):
            for j, batch in enumerate(batches):
                batch_sizes.append(len(batch))
                for name, fn in paths_for(j).items():
                    samples[name].append(_timed(fn, device))
            done = slice(-len(batches), None)
            say(
                f"repeat {repeat + 1}/{cfg.repeats}: "
                + ", ".join(f"{k} {n / sum(v[done]):.2f} img/s" for k, v in samples.items())
            )
        peak_gpu_mb = (
            torch.cuda.max_memory_allocated(device) / 1024**2 if device.type == "cuda" else None
        )
        profile_text = None
        if cfg.profile:
            profile_text = _profile_detect(
                lambda: [winclip.detect_resized(batch, *anchors) for batch in batches]
            )

        rate = {
            name: statistics.median(k / t for k, t in zip(batch_sizes, times, strict=True))
            for name, times in samples.items()
        }
        paired = [b / d for b, d in zip(samples["backbone"], samples["detect"], strict=True)]
        ratio = rate["detect"] / rate["backbone"]
        coreset_s = statistics.median(coreset_runs)
        coreset_fraction = coreset_s / feature_extract_s
        random_weights = winclip.random_weights
        weights_label = winclip.weights_label
        memory_size = winclip.memory.size if winclip.memory is not None else 0
        backbone_dtype = str(winclip.backbone.dtype).replace("torch.", "")

    on_cpu = device.type == "cpu"
    targets = {
        "ratio": _target(round(ratio, 4), TARGET_MIN_RATIO, ">=", on_cpu),
        "coreset_fraction": _target(
            round(coreset_fraction, 4), TARGET_MAX_CORESET_FRACTION, "<=", True
        ),
        "peak_gpu_mb": _target(
            None if peak_gpu_mb is None else round(peak_gpu_mb, 1),
            TARGET_MAX_GPU_MB,
            "<=",
            not on_cpu,
        ),
    }
    result: dict[str, Any] = {
        "backbone_img_per_s": round(rate["backbone"], 3),
        "detect_img_per_s": round(rate["detect"], 3),
        "detect_with_decode_img_per_s": round(rate["detect_with_decode"], 3),
        "ratio": round(ratio, 4),
        "ratio_paired_median": round(statistics.median(paired), 4),
        "coreset_s": round(coreset_s, 6),
        "feature_extract_s": round(feature_extract_s, 6),
        "coreset_fraction": round(coreset_fraction, 4),
        "memory_build_s": round(memory_build_s, 4),
        "model_load_s": round(model_load_s, 3),
        "anchors": cfg.anchors,
        "anchors_s": round(text_anchors_s, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_gpu_mb": None if peak_gpu_mb is None else round(peak_gpu_mb, 1),
        "machine": machine_info(device),
        "device": str(device),
        "backbone_dtype": backbone_dtype,
        "batch_size": cal.batch_size,
        "threads": threads,
        "weights": weights_label,
        "random_weights": random_weights,
        "torch_version": torch.__version__,
        "image_size": cal.image_size,
        "n_images": n,
        "memory_images": len(memory_paths),
        "memory_patches": n_img * n_patch,
        "memory_size": memory_size,
        "coreset_picks": n_picks,
        "repeats": cfg.repeats,
        "samples_batch_sizes": batch_sizes,
        "samples_s": {k: [round(t, 4) for t in v] for k, v in samples.items()}
        | {"coreset": [round(t, 6) for t in coreset_runs]},
        "targets": targets,
        "targets_met": all(t["pass"] for t in targets.values() if t["applies"]),
        "config": {**cal.to_dict(), **{k: v for k, v in vars(cfg).items() if k != "model"}},
    }
    if profile_text is not None:
        result["profile"] = profile_text
    return result


# ---------------------------------------------------------------------- report
def format_speed_table(result: dict[str, Any]) -> str:
    """Plain-text table of a :func:`run_speed` result."""
    machine = result["machine"]
    gpu = result["peak_gpu_mb"]
    rows = [
        ("backbone only (tokens)", f"{result['backbone_img_per_s']:.2f} img/s"),
        ("detect_resized (tokens -> maps, scores)", f"{result['detect_img_per_s']:.2f} img/s"),
        (
            "detect from files (decode + detect)",
            f"{result['detect_with_decode_img_per_s']:.2f} img/s",
        ),
        ("ratio detect / backbone", f"{result['ratio']:.3f}"),
        ("  (median of per-batch ratios)", f"{result['ratio_paired_median']:.3f}"),
        ("memory bank build", f"{result['memory_build_s']:.2f} s"),
        (
            f"  feature extraction ({result['memory_images']} images)",
            f"{result['feature_extract_s']:.2f} s",
        ),
        (
            f"  coreset ({result['coreset_picks']} of {result['memory_patches']} patches)",
            f"{result['coreset_s']:.3f} s",
        ),
        ("  coreset / feature extraction", f"{result['coreset_fraction']:.3f}"),
        ("peak RSS", f"{result['peak_rss_mb']:.0f} MiB"),
        ("peak GPU memory (detection)", "n/a" if gpu is None else f"{gpu:.0f} MiB"),
    ]
    lines = [
        f"winclip_nb speed: {result['device']} ({result['backbone_dtype']}), "
        f"batch {result['batch_size']}, {result['threads']} threads, "
        f"image {result['image_size']} px, weights {result['weights']}",
        f"machine: {machine['cpu_model']}, {machine['logical_cores']} logical cores"
        + (f", GPU {machine['gpu']}" if machine.get("gpu") else ""),
        f"torch {result['torch_version']}; {result['n_images']} test images; medians of "
        f"{result['repeats']} repeats x {len(result['samples_batch_sizes']) // result['repeats']}"
        " batches, interleaved per batch",
        "",
        f"{'measurement':<46}{'value':>14}",
        "-" * 60,
        *(f"{label:<46}{value:>14}" for label, value in rows),
        "",
        "targets:",
    ]
    for name, target in result["targets"].items():
        if not target["applies"]:
            verdict = "n/a on this device"
        else:
            verdict = "PASS" if target["pass"] else "FAIL"
        value = "n/a" if target["value"] is None else f"{target['value']:g}"
        lines.append(f"  {name:<18} {value:>10} {target['rule']} {target['limit']:<8g} {verdict}")
    if result["random_weights"]:
        lines += ["", "random weights: timings only (scores are meaningless)"]
    return "\n".join(lines)


# ------------------------------------------------------------------------- CLI
#: The detector settings a speed run takes from the command line.
MODEL_OPTIONS = (
    "device",
    "pretrained",
    "model_name",
    "batch_size",
    "image_size",
    "precision",
    "seed",
)


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``winclip-nb bench-speed`` and ``benchmarks/throughput.py`` (weights
    default to random here: speed does not depend on them)."""
    add_config_arguments(parser, SpeedConfig)
    add_config_arguments(parser, WinCLIPConfig, only=MODEL_OPTIONS)
    parser.add_argument("--json", default=None, metavar="PATH", help="write the result here")


def config_from_args(args: argparse.Namespace) -> SpeedConfig:
    """A :class:`SpeedConfig` from parsed :func:`add_speed_arguments` options."""
    model = WinCLIPConfig(**{"pretrained": "random", **config_changes(args, WinCLIPConfig)})
    return SpeedConfig(model=model, **config_changes(args, SpeedConfig))


def run_speed_cli(args: argparse.Namespace) -> int:
    """Run the speed benchmark from parsed options; print the table, write ``--json``."""
    result = run_speed(config_from_args(args), log=lambda msg: print(msg, file=sys.stderr))
    if result.get("profile"):
        print(result["profile"])
    print(format_speed_table(result))
    if args.json:
        write_json(args.json, result)
    return 0


def write_json(path: str | os.PathLike, result: dict[str, Any]) -> Path:
    """Write a speed result as indented JSON (folders created) and say where."""
    path = atomic_write(path, json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path}")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``benchmarks/throughput.py``; package errors end as one line, exit 2."""
    parser = argparse.ArgumentParser(
        prog="throughput", description="Throughput of the winclip_nb detector."
    )
    add_speed_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_speed_cli(args)
    except WinCLIPError as exc:
        print(f"throughput: error: {exc}", file=sys.stderr)
        return 2


__all__ = [
    "REQUIRED_KEYS",
    "SpeedConfig",
    "add_speed_arguments",
    "format_speed_table",
    "main",
    "run_speed",
    "run_speed_cli",
]
