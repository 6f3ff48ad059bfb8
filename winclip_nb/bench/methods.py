"""Every method's images/s in one run, and anomalib's WinCLIP beside them.

``python benchmarks/methods.py`` (or ``make speed-methods``) builds, with random weights and
on one synthetic object class, one detector per registered method (its own model and
input size) with a 1-image memory, and, when the ``[parity]`` extra is installed,
anomalib 2.7's ``WinClipModel`` holding the windows model's weights
(:mod:`winclip_nb.bench.parity`) with the same reference.

Each path gets the same images, already resized and normalised as it needs them, and
does the whole forward (maps and image scores, upsampled to the input size). One untimed
batch warms every path up; then the batches go through the paths in turn (A B C A B C ...)
``repeats`` times and the median images/s per path is reported, so a busy machine slows
all of them alike. Compare the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.config import WinCLIPConfig, check_fields, method_names, number, one_of, setting
from ..core.errors import ConfigError, WinCLIPError
from ..options import add_config_arguments, config_changes
from .speed import _sync, random_anchors, write_json

SPEED_CLASS = "disc"
#: The detector settings a comparison takes from the command line.
MODEL_OPTIONS = ("device", "batch_size", "precision", "seed")


def _methods_check(value: Any) -> str | None:
    return (
        None
        if value and all(one_of(method_names)(m) is None for m in value)
        else (f"registered methods {method_names()}")
    )


@dataclass
class MethodSpeedConfig:
    """Settings of one comparison run: the shared detector settings (``model``) and the
    harness's."""

    model: WinCLIPConfig = field(default_factory=lambda: WinCLIPConfig(pretrained="random"))
    methods: tuple[str, ...] = setting((), "methods to time (default: every registered one)")
    n_images: int = setting(8, "test images per pass", number(1, integer=True))
    repeats: int = setting(2, "timed passes of each path (medians)", number(1, integer=True))
    threads: int | None = setting(None, "torch CPU threads", number(1, integer=True, optional=True))
    anomalib: bool = setting(True, "time anomalib's WinClipModel beside the windows method")

    def validate(self) -> MethodSpeedConfig:
        check_fields(self)
        if self.methods and _methods_check(self.methods):
            raise ConfigError(f"methods must be {_methods_check(self.methods)}, got {self.methods}")
        return self


def run_method_speed(
    cfg: MethodSpeedConfig, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Measure images/s of every method (and anomalib's WinCLIP)."""
    from ..core.runtime import resolve_device
    from ..data import list_images, make_synthetic_mvtec

    cfg = cfg.validate()
    say = log or (lambda _msg: None)
    device = resolve_device(cfg.model.device)
    threads_before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = make_synthetic_mvtec(
                Path(tmp),
                [SPEED_CLASS],
                n_train=1,
                n_test_good=cfg.n_images,
                n_test_per_defect=1,
                image_size=256,
                seed=cfg.model.seed,
            )
            reference = list_images(root / SPEED_CLASS / "train" / "good")[0]
            tests = list_images(root / SPEED_CLASS / "test" / "good")[: cfg.n_images]
            paths, models, notes = _build_paths(cfg, device, reference, tests, say)
            result = _time_paths(cfg, paths, device, say)
    finally:
        torch.set_num_threads(threads_before)
    rates = result["images_per_s"]
    base = next(iter(rates.values()))
    return {
        "config": {**cfg.model.to_dict(), **{k: v for k, v in vars(cfg).items() if k != "model"}},
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": cfg.threads or threads_before,
        "torch_version": torch.__version__,
        "random_weights": True,
        "models": models,
        "images_per_s": rates,
        "relative_to_first": {name: v / base for name, v in rates.items()},
        "samples": result["samples"],
        "notes": notes,
    }


def _build_paths(
    cfg: MethodSpeedConfig,
    device: torch.device,
    reference: Path,
    tests: list[Path],
    say: Callable[[str], None],
) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """Per path: (a function of one batch, the batches it is fed); what each path runs."""
    from ..winclip import WinCLIP

    paths: dict[str, Any] = {}
    models: dict[str, str] = {}
    notes: list[str] = []
    bs = cfg.model.batch_size
    for method in cfg.methods or method_names():
        presets = dict.fromkeys(("model_name", "image_size", "text_temperature", "layers",
                                 "coreset_ratio"))  # None: the method's own
        model = WinCLIP(
            config=WinCLIPConfig(**{**cfg.model.to_dict(), **presets, "method": method,
                                    "device": str(device)})
        )
        say(f"building {method} ({model.config.model_name}, {model.config.image_size} px) ...")
        anchors = random_anchors(model, SPEED_CLASS, cfg.model.seed)
        zero_shot = model.scorer.needs_references is False
        fitted = model.fit_images(anchors, [] if zero_shot else [reference])
        images = np.stack([model.prepare(p)[0] for p in tests])
        if model.scorer.scores_sets:  # the whole set at once, each image against the others
            if len(images) < model.scorer.min_set_images:
                raise ConfigError(f"{method} scores sets of at least "
                                  f"{model.scorer.min_set_images} images; got --n-images "
                                  f"{len(images)}")
            batches = [images]
            notes.append(f"{method}: the {len(images)} images scored as one set (its mutual "
                         "scoring grows with the square of the set size)")
        else:
            batches = [images[i : i + bs] for i in range(0, len(images), bs)]
        paths[method] = (
            lambda b, m=model, f=fitted: m.detect_batch(b, f, normalization="per_image"),
            batches,
        )
        memory = "no memory (zero-shot)" if zero_shot else "1-image memory"
        models[method] = f"{model.config.model_name}, {model.config.image_size} px, {memory}"
        if cfg.anomalib and model.scorer.reference_implementation == "anomalib WinClipModel":
            _add_anomalib(model, fitted, reference, batches, paths, models, notes, say)
    if not cfg.anomalib:
        notes.append("anomalib: not measured (--no-anomalib)")
    return paths, models, notes


def _add_anomalib(
    windows: Any,
    fitted: Any,
    reference: Path,
    batches: list[np.ndarray],
    paths: dict[str, Any],
    models: dict[str, str],
    notes: list[str],
    say: Callable[[str], None],
) -> None:
    """anomalib's WinClipModel on the windows detector's weights and reference."""
    from .parity import load_anomalib_winclip

    if windows.config.image_size != 240:
        notes.append("anomalib: not measured (its WinClipModel runs only at 240 px)")
        return
    try:
        say("building anomalib 2.7 WinClipModel on the windows model's weights ...")
        model = load_anomalib_winclip(windows, anchors=fitted.anchors.stacked())
    except ConfigError as exc:
        notes.append(f"anomalib: not measured ({exc})")
        return
    to_pixels = windows.backbone.to_pixels
    with torch.inference_mode():
        model.setup(reference_images=to_pixels(windows.prepare(reference)[0][None]).float())

    def run(pixels: torch.Tensor) -> Any:
        with torch.inference_mode():
            return model(pixels)

    paths["anomalib"] = (run, [to_pixels(b).float() for b in batches])
    models["anomalib"] = "anomalib 2.7 WinClipModel, same weights and reference, fp32"
    notes.append(
        "anomalib: WinClipModel with its window sequences in the layout it assumes "
        "(winclip_nb.bench.parity)"
    )


def _time_paths(
    cfg: MethodSpeedConfig, paths: dict[str, Any], device: torch.device, say: Callable[[str], None]
) -> dict[str, Any]:
    for name, (fn, feed) in paths.items():  # warm-up, untimed
        say(f"warm-up: {name}")
        fn(feed[0])
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in paths}
    n_batches = max(len(feed) for _, feed in paths.values())
    for repeat in range(cfg.repeats):
        for j in range(n_batches):
            for name, (fn, feed) in paths.items():
                if j >= len(feed):  # a set method's single batch
                    continue
                start = time.perf_counter()
                fn(feed[j])
                _sync(device)
                samples[name].append(len(feed[j]) / (time.perf_counter() - start))
        say(
            f"repeat {repeat + 1}/{cfg.repeats}: "
            + ", ".join(f"{n} {statistics.median(v):.2f} img/s" for n, v in samples.items())
        )
    return {
        "images_per_s": {name: round(statistics.median(v), 4) for name, v in samples.items()},
        "samples": {name: [round(x, 4) for x in v] for name, v in samples.items()},
    }


def format_method_table(result: dict[str, Any]) -> str:
    """Plain-text table of a :func:`run_method_speed` result."""
    cfg = result["config"]
    first = next(iter(result["images_per_s"]))
    lines = [
        f"methods speed: {result['device']} ({result['device_name']}), batch "
        f"{cfg['batch_size']}, {result['threads']} threads, {cfg['n_images']} images x "
        f"{cfg['repeats']} repeats, interleaved; torch {result['torch_version']}",
        "",
        f"{'path':<64}{'img/s':>9}{f'vs {first}':>13}",
        "-" * 86,
    ]
    for name, rate in result["images_per_s"].items():
        label = f"{name} ({result['models'][name]})"
        lines.append(f"{label:<64}{rate:>9.2f}{result['relative_to_first'][name]:>12.3f}x")
    lines += ["", *result["notes"], "random weights: timings only (scores are meaningless)"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``benchmarks/methods.py``; package errors end as one line, exit 2."""
    parser = argparse.ArgumentParser(prog="methods", description="Images/s of every method.")
    add_config_arguments(parser, MethodSpeedConfig)
    add_config_arguments(parser, WinCLIPConfig, only=MODEL_OPTIONS)
    parser.add_argument("--json", default=None, metavar="PATH", help="write the result here")
    args = parser.parse_args(argv)
    try:
        model = WinCLIPConfig(**{"pretrained": "random", **config_changes(args, WinCLIPConfig)})
        cfg = MethodSpeedConfig(model=model, **config_changes(args, MethodSpeedConfig))
        result = run_method_speed(cfg, log=lambda msg: print(msg, file=sys.stderr))
    except WinCLIPError as exc:
        print(f"methods: error: {exc}", file=sys.stderr)
        return 2
    print(format_method_table(result))
    if args.json:
        write_json(args.json, result)
    return 0


__all__ = ["MethodSpeedConfig", "format_method_table", "main", "run_method_speed"]
