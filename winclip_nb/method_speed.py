"""Tokens vs windows vs anomalib's WinCLIP: images/s of each, in one run.

``python benchmarks/methods.py`` (or ``make speed-methods``) builds, with random
weights and on one synthetic object class:

- **tokens**: ``WinCLIP(method="tokens")``, ViT-B-16 at 224 px, a 1-image memory;
- **windows**: ``WinCLIP(method="windows")``, ViT-B-16-plus-240 at 240 px, 1 reference
  (WinCLIP+ 1-shot);
- **anomalib**: anomalib 2.7's ``WinClipModel`` holding the windows model's weights
  (see :mod:`winclip_nb.parity`), with the same reference; skipped with a note when the
  ``[parity]`` extra is not installed.

Each path gets the same images, already resized and normalised as it needs them, and
does the whole forward (maps and image scores; the two WinCLIP paths also upsample to
the input size). One untimed batch warms every path up; then the batches go through
the paths in turn (A B C A B C ...) ``repeats`` times and the median images/s per path
is reported, so a busy machine slows all of them alike. Compare the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import DEFAULT_BATCH_SIZE, WINDOWS_IMAGE_SIZE
from .errors import ConfigError, WinCLIPError
from .speed import write_json

DEFAULT_N_IMAGES = 8
DEFAULT_REPEATS = 2
SPEED_CLASS = "disc"
PATHS = ("tokens", "windows", "anomalib")


@dataclass
class MethodSpeedConfig:
    """Settings of one comparison run."""

    device: str = "auto"
    batch_size: int = DEFAULT_BATCH_SIZE
    n_images: int = DEFAULT_N_IMAGES
    repeats: int = DEFAULT_REPEATS
    threads: int | None = None
    #: Input side of the windows path (anomalib runs only at 240).
    windows_image_size: int = WINDOWS_IMAGE_SIZE
    anomalib: bool = True
    seed: int = 0

    def validate(self) -> MethodSpeedConfig:
        for name in ("batch_size", "n_images", "repeats"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1 or None, got {self.threads}")
        return self


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random_anchors(dim: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random unit anchors: the speed of a forward does not depend on the text."""
    gen = torch.Generator().manual_seed(seed)
    pair = torch.nn.functional.normalize(torch.randn(2, dim, generator=gen), dim=-1)
    return pair[0].to(device), pair[1].to(device)


def run_method_speed(
    cfg: MethodSpeedConfig, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Measure images/s of the tokens, windows and (optionally) anomalib paths."""
    from .backbone import resolve_device
    from .data import list_images, make_synthetic_mvtec
    from .detector import WinCLIP

    cfg = cfg.validate()
    say = log or (lambda _msg: None)
    device = resolve_device(cfg.device)
    threads_before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = make_synthetic_mvtec(
                Path(tmp), [SPEED_CLASS], n_train=1, n_test_good=cfg.n_images,
                n_test_per_defect=1, image_size=256, seed=cfg.seed,
            )  # fmt: skip
            reference = list_images(root / SPEED_CLASS / "train" / "good")[0]
            tests = list_images(root / SPEED_CLASS / "test" / "good")[: cfg.n_images]
            say("building tokens model (ViT-B-16, 224 px) ...")
            tokens = WinCLIP(device=str(device), pretrained="random", seed=cfg.seed)
            say(f"building windows model (ViT-B-16-plus-240, {cfg.windows_image_size} px) ...")
            windows = WinCLIP(
                device=str(device), pretrained="random", method="windows",
                image_size=cfg.windows_image_size, seed=cfg.seed,
            )  # fmt: skip
            paths, notes = _build_paths(cfg, tokens, windows, reference, tests, say)
            result = _time_paths(cfg, paths, device, say)
    finally:
        torch.set_num_threads(threads_before)
    base = result["images_per_s"].get("tokens")
    ratios = {name: (v / base if base else None) for name, v in result["images_per_s"].items()}
    return {
        "config": asdict(cfg),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": cfg.threads or threads_before,
        "torch_version": torch.__version__,
        "random_weights": True,
        "images_per_s": result["images_per_s"],
        "relative_to_tokens": ratios,
        "samples": result["samples"],
        "notes": notes,
    }


def _build_paths(
    cfg: MethodSpeedConfig,
    tokens: Any,
    windows: Any,
    reference: Path,
    tests: list[Path],
    say: Callable[[str], None],
) -> tuple[dict[str, tuple[Callable[[Any], Any], list[Any]]], list[str]]:
    """Per path: a function of one batch and the batches it is fed."""
    notes: list[str] = []
    paths: dict[str, tuple[Callable[[Any], Any], list[Any]]] = {}
    bs = cfg.batch_size

    def batches(model: Any) -> list[np.ndarray]:
        images = [model.prepare(p)[0] for p in tests]
        return [np.stack(images[i : i + bs]) for i in range(0, len(images), bs)]

    for name, model in (("tokens", tokens), ("windows", windows)):
        normal, anomalous = _random_anchors(model.backbone.embed_dim, cfg.seed, model.device)
        model.class_name = SPEED_CLASS
        model.build_normal_memory([reference], normal, anomalous, progress=False)

        def run(batch: Any, model: Any = model, n: Any = normal, a: Any = anomalous) -> Any:
            return model.detect_resized(batch, n, a, normalization="per_image")

        paths[name] = (run, batches(model))

    if not cfg.anomalib:
        notes.append("anomalib: not measured (--no-anomalib)")
    elif windows.config.image_size != 240:
        notes.append("anomalib: not measured (its WinClipModel runs only at 240 px)")
    else:
        from .parity import load_anomalib_winclip

        try:
            say("building anomalib 2.7 WinClipModel on the windows model's weights ...")
            model = load_anomalib_winclip(windows)
        except ConfigError as exc:
            notes.append(f"anomalib: not measured ({exc})")
        else:
            normal, anomalous = _random_anchors(
                windows.backbone.embed_dim, cfg.seed, windows.device
            )
            model._text_embeddings = torch.stack([normal, anomalous])  # noqa: SLF001
            to_pixels = windows.backbone.to_pixels
            with torch.inference_mode():
                model.setup(reference_images=to_pixels(windows.prepare(reference)[0][None]).float())
            pixel_batches = [to_pixels(b).float() for b in batches(windows)]

            def run_anomalib(pixels: torch.Tensor) -> Any:
                with torch.inference_mode():
                    return model(pixels)

            paths["anomalib"] = (run_anomalib, pixel_batches)
            notes.append(
                "anomalib: WinClipModel with its window sequences in the layout it assumes "
                "(winclip_nb.parity); fp32"
            )
    return paths, notes


def _time_paths(
    cfg: MethodSpeedConfig,
    paths: dict[str, tuple[Callable[[Any], Any], list[Any]]],
    device: torch.device,
    say: Callable[[str], None],
) -> dict[str, Any]:
    for name, (fn, feed) in paths.items():  # warm-up, untimed
        say(f"warm-up: {name}")
        fn(feed[0])
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in paths}
    n_batches = len(next(iter(paths.values()))[1])
    for repeat in range(cfg.repeats):
        for j in range(n_batches):
            for name, (fn, feed) in paths.items():
                start = time.perf_counter()
                fn(feed[j])
                _sync(device)
                samples[name].append(len(feed[j]) / (time.perf_counter() - start))
        say(f"repeat {repeat + 1}/{cfg.repeats}: " + ", ".join(
            f"{n} {statistics.median(v):.2f} img/s" for n, v in samples.items()))  # fmt: skip
    return {
        "images_per_s": {name: round(statistics.median(v), 4) for name, v in samples.items()},
        "samples": {name: [round(x, 4) for x in v] for name, v in samples.items()},
    }


def format_method_table(result: dict[str, Any]) -> str:
    """Plain-text table of a :func:`run_method_speed` result."""
    labels = {
        "tokens": "tokens   (ViT-B-16, 224 px, 1-image memory)",
        "windows": "windows  (ViT-B-16-plus-240, WinCLIP+ 1-shot)",
        "anomalib": "anomalib (WinClipModel 2.7, same weights, 1-shot)",
    }
    cfg = result["config"]
    lines = [
        f"methods speed: {result['device']} ({result['device_name']}), batch "
        f"{cfg['batch_size']}, {result['threads']} threads, {cfg['n_images']} images x "
        f"{cfg['repeats']} repeats, interleaved; torch {result['torch_version']}",
        "",
        f"{'path':<52}{'img/s':>9}{'vs tokens':>11}",
        "-" * 72,
    ]
    for name, rate in result["images_per_s"].items():
        ratio = result["relative_to_tokens"].get(name)
        lines.append(f"{labels.get(name, name):<52}{rate:>9.2f}{ratio:>10.3f}x")
    lines += ["", *result["notes"], "random weights: timings only (scores are meaningless)"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``benchmarks/methods.py``; package errors end as one line, exit 2."""
    parser = argparse.ArgumentParser(
        prog="methods", description="Images/s of the tokens, windows and anomalib WinCLIP paths."
    )
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--n-images", type=int, default=DEFAULT_N_IMAGES)
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--windows-image-size", type=int, default=WINDOWS_IMAGE_SIZE)
    parser.add_argument("--no-anomalib", action="store_true", help="skip anomalib's model")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the result here")
    args = parser.parse_args(argv)
    cfg = MethodSpeedConfig(
        device=args.device, batch_size=args.batch_size, n_images=args.n_images,
        repeats=args.repeats, threads=args.threads,
        windows_image_size=args.windows_image_size, anomalib=not args.no_anomalib,
    )  # fmt: skip
    try:
        result = run_method_speed(cfg, log=lambda msg: print(msg, file=sys.stderr))
    except WinCLIPError as exc:
        print(f"methods: error: {exc}", file=sys.stderr)
        return 2
    print(format_method_table(result))
    if args.json:
        write_json(args.json, result)
    return 0


__all__ = ["MethodSpeedConfig", "format_method_table", "main", "run_method_speed"]
