"""``winclip-nb prefetch``: fill the caches on a connected machine so later runs work offline.

The method's model (``--method``: CLIP through open_clip, DINOv2 through timm) goes to
the Hugging Face cache, LLaVA-OneVision too;
a file that is already there is reported, not downloaded again. ``--mvtec-root`` also
checks a dataset copy (every class loads, counts printed).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from ..core.errors import DataError, WeightsError
from ..core.scorers import SCORERS, scorer_class
from .weights import CATALOGUES, hub_reachable, load_open_clip, load_timm, resolve_weights


def add_prefetch_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``winclip-nb prefetch``."""
    parser.add_argument(
        "--method",
        default="tokens",
        choices=tuple(SCORERS),
        help="whose model and weights to fetch by default (default: tokens)",
    )
    parser.add_argument(
        "--model", default=None,
        help="model name, open_clip's or timm's as the method uses (default: the method's)"
    )
    parser.add_argument(
        "--weights",
        default=None,
        help="pretrained tag, or 'random' to skip the model download (default: the method's)",
    )
    llava = parser.add_mutually_exclusive_group()
    llava.add_argument(
        "--llava-model",
        default=None,
        help="LLaVA-OneVision hub id (default: the explainer's default model)",
    )
    llava.add_argument("--no-llava", action="store_true", help="do not download LLaVA")
    parser.add_argument(
        "--mvtec-root",
        default=None,
        metavar="DIR",
        help="check an MVTec-AD folder: every class loads, counts printed",
    )


def _check_mvtec(root: str) -> None:
    from ..data import list_mvtec_classes, load_mvtec_class

    names = list_mvtec_classes(root)
    if not names:
        raise DataError(f"no MVTec-AD classes under {root}: expected <class>/train/good folders")
    print(f"MVTec-AD at {root}: {len(names)} classes")
    for name in names:
        data = load_mvtec_class(root, name)
        print(
            f"  {name:<12} train {data.n_train:>4}  test {data.n_test:>4} "
            f"(good {data.n_good}, defective {data.n_defective}, "
            f"{len(data.defect_types)} defect types)"
        )


#: Per model family: the name printed and how its model is loaded (which downloads it).
FAMILIES: dict[str, tuple[str, Callable[[str, str], object]]] = {
    "open_clip": ("CLIP", lambda name, weights: load_open_clip(name, weights, "cpu")),
    "timm": ("timm", lambda name, weights: load_timm(name, weights, "cpu")),
}


def _prefetch_model(family: str, model_name: str, weights: str) -> None:
    """Load the model once (downloading its checkpoint unless cached); print where it is."""
    label, load = FAMILIES[family]
    resolved = resolve_weights(model_name, weights, family=family)
    if resolved.random:
        print(f"{label}: random init requested, nothing to download ({resolved.label})")
        return
    was_cached = bool(resolved.source and os.path.isfile(resolved.source))
    load(model_name, weights)  # checks the file (or downloads it)
    if was_cached:
        print(f"{label} {model_name}/{resolved.label}: already cached at {resolved.source}")
        return
    where = CATALOGUES[family]()[2](model_name, resolved.label) or "the Hugging Face cache"
    print(f"{label} {model_name}/{resolved.label}: cached at {where}")


def _prefetch_llava(model_id: str) -> None:
    from huggingface_hub import snapshot_download

    if Path(model_id).expanduser().is_dir():
        print(f"LLaVA: local folder {model_id}, nothing to download")
        return
    try:
        path = snapshot_download(model_id, local_files_only=True)
        print(f"LLaVA {model_id}: already cached at {path}")
        return
    except Exception:  # noqa: BLE001 - not cached yet: download below
        pass
    if not hub_reachable():
        raise WeightsError(
            f"cannot download LLaVA model {model_id}: the model hub is not reachable (offline, "
            "or HF_HUB_OFFLINE is set); run prefetch on a machine with network access"
        )
    try:
        path = snapshot_download(model_id)
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise WeightsError(
            f"cannot download LLaVA model {model_id}: {type(exc).__name__}: {first_line}"
        ) from exc
    print(f"LLaVA {model_id}: cached at {path}")


def run_prefetch(args: argparse.Namespace) -> int:
    """``winclip-nb prefetch``: the dataset check, CLIP, then LLaVA; prints where each is."""
    if args.mvtec_root:
        _check_mvtec(args.mvtec_root)
    scorer = scorer_class(args.method)
    _prefetch_model(scorer.backbone_family, args.model or scorer.preset["model_name"],
                    args.weights or scorer.default_weights)
    if not args.no_llava:
        from ..explain.llava import DEFAULT_LLAVA_MODEL

        _prefetch_llava(args.llava_model or DEFAULT_LLAVA_MODEL)
    try:
        from huggingface_hub import constants

        print(f"Hugging Face cache: {constants.HF_HUB_CACHE}")
    except ImportError:  # pragma: no cover - ships with open_clip
        pass
    return 0
