"""winclip_nb: zero-/few-shot industrial anomaly detection with CLIP, WinCLIP style.

The package reads like the pipeline:

==================  ==========================================================================
``core``            what the notebooks teach (stages 01-04 and 07), importing nothing else
``winclip``         ``WinCLIP``: the core detector plus weights, image files and bank files
``data``            image decoding, MVTec-AD / VisA / folder datasets, the synthetic set, files
``hub``             weights: names, tags, files, caches; ``prefetch``
``explain``         rule-based and LLaVA-OneVision explanations, reports (notebook 05)
``bench``           benchmark protocol, result store, metrics, speed, anomalib parity (06)
``nb``              notebook helpers, runner, figures, the interactive explorer
``cli``             the ``winclip-nb`` command
==================  ==========================================================================
"""

from __future__ import annotations

__version__ = "0.1.0"

#: Public name -> the module that defines it (imported on first use: `import winclip_nb`
#: stays light).
_PUBLIC = {
    "WinCLIP": "winclip",
    "detect_and_explain": "explain.report",
    "WinCLIPConfig": "core.config",
    "DetectionResult": "core.results",
    "Hotspot": "core.results",
    "FittedClass": "core.detector",
    "TextAnchors": "core.anchors",
    **dict.fromkeys(
        (
            "WinCLIPError",
            "ConfigError",
            "DataError",
            "ImageReadError",
            "WeightsError",
            "DeviceError",
            "MemoryBankError",
            "ExplainerError",
            "StorageError",
        ),
        "core.errors",
    ),
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'winclip_nb' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
