"""winclip_nb: zero-/few-shot industrial anomaly detection with CLIP, WinCLIP style.

The package mirrors the notebooks, one module per stage:

====================  ==========================================================
``backbone``  (01)    weights, open_clip model, multi-layer patch tokens
``anchors``   (02)    prompt ensemble, text anchors, text map
``memory``    (03)    k-center coreset, nearest-neighbour map, save/load
``maps``      (04)    fusion, foreground, MAD normalisation, smoothing, hotspots
``explain``   (05)    LLaVA-OneVision or rule-based reports
``benchmark`` (06)    MVTec-AD protocol, metrics, result files
====================  ==========================================================

``WinCLIP`` (in ``detector``) runs stages 01-04; ``detect_and_explain`` adds 05.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["WinCLIP", "WinCLIPConfig", "DetectionResult", "Hotspot", "detect_and_explain"]


def __getattr__(name: str):  # lazy imports keep `import winclip_nb` light
    if name == "WinCLIP":
        from .detector import WinCLIP

        return WinCLIP
    if name == "WinCLIPConfig":
        from .config import WinCLIPConfig

        return WinCLIPConfig
    if name in ("DetectionResult", "Hotspot"):
        from . import results

        return getattr(results, name)
    if name == "detect_and_explain":
        from .explain import detect_and_explain

        return detect_and_explain
    raise AttributeError(f"module 'winclip_nb' has no attribute {name!r}")
