"""anomalib 2.7's WinCLIP on the same weights as a ``method="windows"`` detector.

Used by the parity tests, the method speed comparison and notebook 07. anomalib is an
optional dependency: ``pip install -e ".[parity]"`` (``anomalib==2.7.0``).

anomalib 2.7 hands its window sequences to the vision transformer as (L, N, D), the
layout of the open_clip releases it supports (< 2.26.1). open_clip 3.x transformers
take (N, L, D), so with it anomalib's attention runs across windows instead of within
each window and every window gets the same embedding. :func:`load_anomalib_winclip`
therefore wraps the transformer during anomalib's window pass with
:class:`SequenceFirst`, which restores the layout anomalib assumes and changes nothing
else; ``sequence_first=False`` gives anomalib exactly as installed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError

ANOMALIB_VERSION = "2.7.0"


class SequenceFirst(nn.Module):
    """Run a batch-first transformer on sequence-first (L, N, D) input."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.transpose(0, 1)).transpose(0, 1)


def sequence_first_windows(model: Any) -> Any:
    """Make ``model._get_window_embeddings`` see a sequence-first transformer (in place)."""
    original = type(model)._get_window_embeddings

    def window_embeddings(feature_map: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        visual = model.clip.visual
        inner = visual.transformer
        visual.transformer = SequenceFirst(inner)
        try:
            return original(model, feature_map, masks)
        finally:
            visual.transformer = inner

    model._get_window_embeddings = window_embeddings
    return model


def import_anomalib_winclip() -> Any:
    """anomalib's ``winclip.torch_model`` module, or a clear error naming the extra."""
    try:
        from anomalib.models.image.winclip import torch_model
    except ImportError as exc:
        raise ConfigError(
            f"anomalib is not installed ({exc}); install the optional extra: "
            f'pip install -e ".[parity]" (anomalib=={ANOMALIB_VERSION})'
        ) from exc
    return torch_model


def load_anomalib_winclip(
    winclip: Any,
    class_name: str | None = None,
    *,
    anchors: Any = None,
    sequence_first: bool = True,
) -> Any:
    """anomalib's ``WinClipModel`` holding the CLIP weights of a windows ``WinCLIP``.

    The model is built with anomalib's ``PRETRAINED`` set to None (random init, no
    download), then gets ``winclip``'s state dict. Same backbone and input size required.

    Args:
        winclip: a :class:`~winclip_nb.detector.WinCLIP` with ``method="windows"``.
        class_name: if given, anomalib collects its text embeddings for it.
        anchors: (2, D) normal and anomalous text anchors to use as anomalib's text
            embeddings instead of its own prompts (e.g. ``fitted.anchors.stacked()``), so
            both implementations score against the same anchors.
        sequence_first: wrap anomalib's window pass (see the module docstring).
    """
    torch_model = import_anomalib_winclip()
    cfg = winclip.config
    if cfg.model_name != torch_model.BACKBONE or cfg.image_size != 240:
        raise ConfigError(
            f"anomalib's WinClipModel is fixed to {torch_model.BACKBONE} at 240 px; this "
            f"detector uses {cfg.model_name} at {cfg.image_size} px"
        )
    saved = torch_model.PRETRAINED
    torch_model.PRETRAINED = None
    try:
        model = torch_model.WinClipModel(scales=tuple(cfg.window_scales))
    finally:
        torch_model.PRETRAINED = saved
    state = {k: v.float() for k, v in winclip.backbone.model.state_dict().items()}
    model.clip.load_state_dict(state)
    model = model.to(winclip.device).eval()
    if sequence_first:
        sequence_first_windows(model)
    if class_name is not None:
        model.setup(class_name)
    if anchors is not None:
        if class_name is not None:
            raise ConfigError("give either class_name (anomalib's prompts) or anchors, not both")
        model._text_embeddings = anchors.float().to(winclip.device)  # noqa: SLF001 - the one place
    return model


def load_anomalib_anomalydino(detector: Any, references: Any) -> Any:
    """anomalib's ``AnomalyDINOModel`` holding the DINOv2 weights of an ``anomalydino``
    detector, fitted on the same ``references`` ((k, S, S, 3) uint8 or normalised pixels).

    anomalib builds its encoder with pretrained weights; here it is built random (no
    download) and then gets the detector's state dict. ``pca_mask`` maps to anomalib's
    ``masking``; every patch is kept (no coreset), one nearest neighbour.
    """
    try:
        from anomalib.models.image.anomaly_dino import torch_model
    except ImportError as exc:
        raise ConfigError(
            f"anomalib is not installed ({exc}); install the optional extra: "
            f'pip install -e ".[parity]" (anomalib=={ANOMALIB_VERSION})'
        ) from exc
    cfg = detector.config
    original = torch_model.TimmFeatureExtractor

    def random_init(*args: Any, **kwargs: Any) -> Any:
        return original(*args, **{**kwargs, "pre_trained": False})

    torch_model.TimmFeatureExtractor = random_init
    try:
        model = torch_model.AnomalyDINOModel(encoder_name=cfg.model_name, masking=cfg.pca_mask)
    finally:
        torch_model.TimmFeatureExtractor = original
    state = {k: v.float() for k, v in detector.backbone.model.state_dict().items()}
    model.feature_encoder.feature_extractor.load_state_dict(state)
    model = model.to(detector.device).float()
    model.train()
    with torch.no_grad():
        model(detector.backbone.to_pixels(references).float())
    model.fit()
    return model.eval()


__all__ = [
    "load_anomalib_anomalydino",
    "ANOMALIB_VERSION",
    "SequenceFirst",
    "import_anomalib_winclip",
    "load_anomalib_winclip",
    "sequence_first_windows",
]
