"""An interactive explorer of the stage-04 post-processing (notebook 04).

:func:`explorer` shows class and image pickers, a text/NN weight slider, the smoothing
sigma, the hotspot threshold and the normalisation mode, and redraws the heat map and
the hotspot boxes live, for any method. The scorer runs once per image (its branch maps
are cached), and every control change only repeats the cheap steps (fusion, upsampling,
normalisation, smoothing, hotspots) through the detector's own
:meth:`~winclip_nb.core.detector.Detector.postprocess`.

Without a notebook frontend (papermill, nbval, ``WINCLIP_NB_REFERENCE=1`` or
``WINCLIP_NB_HEADLESS=1``) it draws one static figure instead of the widget.

Example:
    >>> ex = explorer(winclip, {"disc": (normal_anchor, anomalous_anchor)},
    ...               {"disc": test_paths})                                  # doctest: +SKIP
    >>> fig = ex.update(text_weight=0.5, sigma=2.0)   # what a slider change calls  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.anchors import TextAnchors
from ..core.config import NORMALIZATION_MODES, WinCLIPConfig
from ..core.detector import FittedClass
from ..core.errors import ConfigError
from ..core.maps import find_hotspots
from ..core.results import Hotspot
from .helpers import cell_from_frontend, headless

#: Slider ranges: (min, max, step).
SIGMA_RANGE = (0.0, 16.0, 0.5)
THRESHOLD_RANGE = (0.0, 12.0, 0.25)
WEIGHT_STEP = 0.05
PANEL_SIZE = 3.6

#: A class's set-up: its :class:`FittedClass`, or (normal_anchor, anomalous_anchor) for
#: zero-shot; given per class or by a callback ``class_name -> set-up``.
ClassSetup = FittedClass | tuple
AnchorSource = Mapping[str, ClassSetup] | Callable[[str], ClassSetup]
#: Explorer controls -> the config fields they set (``nn_weight`` follows ``text_weight``).
CONTROLS = {
    "text_weight": "text_weight",
    "sigma": "sigma",
    "threshold": "hotspot_threshold",
    "normalization": "normalization",
}


def has_frontend() -> bool:
    """True when live widgets can be used: not headless (reference mode,
    ``WINCLIP_NB_HEADLESS=1``) and the running cell came from a frontend a person uses
    (:func:`~winclip_nb.nb.helpers.cell_from_frontend`; False under papermill, nbclient,
    nbconvert and nbval, which would otherwise risk hanging on widget messages)."""
    return not headless() and cell_from_frontend()


@dataclass
class ExplorerState:
    """The explorer's selection and settings: a class, an image and a detector config
    (fusion weights, sigma, hotspot threshold, normalisation), checked by the config."""

    class_name: str
    image_index: int = 0
    config: WinCLIPConfig = dataclasses.field(default_factory=WinCLIPConfig)

    @property
    def text_weight(self) -> float:
        return self.config.text_weight

    def changed(self, **changes: Any) -> ExplorerState:
        """A new state; control names (see ``CONTROLS``) change the config."""
        unknown = set(changes) - set(CONTROLS) - {"class_name", "image_index"}
        if unknown:
            raise ConfigError(f"unknown explorer settings: {sorted(unknown)}")
        settings = {CONTROLS[k]: v for k, v in changes.items() if k in CONTROLS}
        if "text_weight" in settings:
            settings["nn_weight"] = round(1.0 - float(settings["text_weight"]), 6)
        config = self.config.replace(**settings) if settings else self.config
        picks = {k: v for k, v in changes.items() if k in ("class_name", "image_index")}
        return dataclasses.replace(self, config=config, **picks)


def _image_label(item: Any, index: int) -> str:
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        return f"{path.parent.name}/{path.name}"
    return f"image {index}"


class Explorer:
    """State, cached branch maps and drawing behind :func:`explorer`.

    Works for every method through the scorer interface: the scorer's branch maps are
    computed once per image, and every control change only repeats the detector's
    post-processing (fusion, upsampling, normalisation, smoothing, score) and hotspots.

    Args:
        winclip: a :class:`winclip_nb.WinCLIP`.
        anchors_by_class: class -> set-up (its :class:`FittedClass`, or a pair of anchors for
            zero-shot), or a callback ``class_name -> set-up`` called once per class.
        images_by_class: class -> images (paths, arrays or PIL images).
        masks: optional class -> ground-truth masks (paths or (H, W) bool arrays, None for
            good images), drawn as contours.
    """

    def __init__(
        self,
        winclip: Any,
        anchors_by_class: AnchorSource,
        images_by_class: Mapping[str, Sequence[Any]],
        masks: Mapping[str, Sequence[Any]] | None = None,
        state: ExplorerState | None = None,
    ) -> None:
        if not images_by_class or not any(len(v) for v in images_by_class.values()):
            raise ConfigError("explorer needs at least one image in images_by_class")
        self.winclip = winclip
        self.anchors_by_class = anchors_by_class
        self.images_by_class = {k: list(v) for k, v in images_by_class.items()}
        self.masks = {k: list(v) for k, v in (masks or {}).items()}
        first = next(k for k, v in self.images_by_class.items() if v)
        self.state = state or ExplorerState(class_name=first, config=winclip.config)
        self._fitted: dict[str, FittedClass] = {}
        self._branches: dict[tuple[str, int], dict[str, Any]] = {}
        self.output: Any = None  # ipywidgets.Output once widget() was called
        self.controls: dict[str, Any] = {}
        self.last: dict[str, Any] = {}
        self._validate(self.state)

    # ------------------------------------------------------------------ state
    def _validate(self, state: ExplorerState) -> None:
        if state.class_name not in self.images_by_class:
            raise ConfigError(
                f"unknown class {state.class_name!r}; known: {', '.join(self.images_by_class)}"
            )
        n = len(self.images_by_class[state.class_name])
        if not 0 <= state.image_index < n:
            raise ConfigError(f"image_index must be in 0..{n - 1}, got {state.image_index}")

    def fitted(self, class_name: str) -> FittedClass:
        """The class's :class:`FittedClass` (set up on first use)."""
        if class_name not in self._fitted:
            source = self.anchors_by_class
            setup = source(class_name) if callable(source) else source[class_name]
            if not isinstance(setup, FittedClass):
                if len(setup) != 2:
                    raise ConfigError(
                        f"set-up for {class_name!r} must be a FittedClass or "
                        f"(normal, anomalous) anchors, got {len(setup)} items"
                    )
                setup = FittedClass(TextAnchors(setup[0], setup[1], class_name))
            self._fitted[class_name] = setup
        return self._fitted[class_name]

    # ---------------------------------------------------------------- compute
    @torch.inference_mode()
    def _branch_maps(self, class_name: str, index: int) -> dict[str, Any]:
        """Cached per (class, image): the resized image, the scorer's output, foreground."""
        key = (class_name, index)
        if key not in self._branches:
            wc, fitted = self.winclip, self.fitted(class_name)
            resized, _ = wc.prepare(self.images_by_class[class_name][index])
            fg = wc.foreground(resized[None], fitted.class_name, self.state.config.fg_threshold)
            scores = wc.scorer.score(
                wc.backbone.to_pixels(resized[None]), fitted.anchors, fitted.memory
            )
            self._branches[key] = {
                "resized": resized,
                "scores": scores,
                "fg": torch.from_numpy(fg).to(wc.device),
            }
        return self._branches[key]

    @torch.inference_mode()
    def compute(self, state: ExplorerState | None = None) -> dict[str, Any]:
        """Post-process the cached maps for ``state`` (default: the current state).

        Returns ``{"resized" (S, S, 3) uint8, "anomaly_map" (S, S), "fused_map" (h, w),
        "fg_mask" (S, S) bool, "score", "hotspots", "normalization"}`` (the mode actually
        used: ``per_image`` without calibration statistics).
        """
        state = state or self.state
        self._validate(state)
        branch = self._branch_maps(state.class_name, state.image_index)
        out = self.winclip.postprocess(
            branch["scores"], branch["fg"], self.fitted(state.class_name), state.config
        )
        cfg = state.config
        anomaly_map = out["anomaly_map"][0].float().cpu().numpy()
        fg_np = out["fg_mask"][0].cpu().numpy()
        hotspots: list[Hotspot] = find_hotspots(
            anomaly_map, cfg.hotspot_threshold, cfg.top_k, cfg.min_hotspot_area, fg_np
        )
        return {
            "resized": branch["resized"],
            "anomaly_map": anomaly_map,
            "fused_map": out["fused_map"][0].float().cpu().numpy(),
            "fg_mask": fg_np,
            "score": float(out["score"][0]),
            "hotspots": hotspots,
            "normalization": out["normalization"],
        }

    def _mask(self, class_name: str, index: int, size: int) -> np.ndarray | None:
        masks = self.masks.get(class_name)
        if not masks or index >= len(masks) or masks[index] is None:
            return None
        import cv2

        from ..data.images import load_mask

        item = masks[index]
        mask = load_mask(item) if isinstance(item, (str, os.PathLike)) else np.asarray(item)
        return cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)

    # ------------------------------------------------------------------- draw
    def draw(self, state: ExplorerState | None = None) -> Any:
        """A :class:`matplotlib.figure.Figure`: image with boxes, heat map, fused patch map."""
        from matplotlib.figure import Figure

        from .figures import MAP_CMAP, Z_CMAP, draw_boxes, overlay_heatmap, random_weights_banner

        state = state or self.state
        out = self.compute(state)
        self.last = out
        fig = Figure(figsize=(3 * PANEL_SIZE, PANEL_SIZE + 0.6), layout="constrained")
        axes = fig.subplots(1, 3)
        n = len(out["hotspots"])
        draw_boxes(out["resized"], out["hotspots"], ax=axes[0], title=f"{n} hotspot(s)")
        mask = self._mask(state.class_name, state.image_index, out["resized"].shape[0])
        if mask is not None and mask.any():
            axes[0].contour(mask, levels=[0.5], colors="lime", linewidths=1.0)
        overlay_heatmap(
            out["resized"], out["anomaly_map"], ax=axes[1], title=f"score {out['score']:.2f}"
        )
        fused = out["fused_map"]
        if fused.min() < 0:  # signed z-scores (calibrated branches): symmetric coolwarm
            limit = float(np.abs(fused).max()) or 1.0
            shown = axes[2].imshow(fused, cmap=Z_CMAP, vmin=-limit, vmax=limit)
            axes[2].set_title("fused z (patch grid)")
        else:  # probabilities or distances: viridis, the range on the colour bar
            shown = axes[2].imshow(fused, cmap=MAP_CMAP)
            axes[2].set_title("fused map (patch grid)")
        fig.colorbar(shown, ax=axes[2], fraction=0.046, pad=0.04)
        axes[2].set_axis_off()
        label = _image_label(self.images_by_class[state.class_name][state.image_index], 0)
        cfg = state.config
        weights = (
            f"text {cfg.text_weight:.2f} / NN {cfg.nn_weight:.2f} | "
            if self.winclip.scorer.uses_fusion_weights
            else f"{cfg.method} | "
        )
        fig.suptitle(
            f"{state.class_name} {label} | {weights}sigma {cfg.sigma:g} | "
            f"z > {cfg.hotspot_threshold:g} | {out['normalization']}",
            fontsize=10,
        )
        if getattr(self.winclip, "random_weights", False):
            random_weights_banner(fig)
        return fig

    def update(self, **changes: Any) -> Any:
        """The widgets' callback: change settings, recompute, redraw; returns the figure.

        ``changes``: ``class_name``, ``image_index`` or a control (``text_weight``,
        ``sigma``, ``threshold``, ``normalization``). Changing the class resets the image
        index to 0. Invalid values raise :class:`ConfigError` and keep the state.
        """
        if "class_name" in changes and changes["class_name"] != self.state.class_name:
            changes.setdefault("image_index", 0)
        new_state = self.state.changed(**changes)
        self._validate(new_state)
        self.state = new_state
        fig = self.draw()
        if self.output is not None:
            from IPython.display import clear_output, display

            with self.output:
                clear_output(wait=True)
                display(fig)
        return fig

    # ----------------------------------------------------------------- widget
    def widget(self) -> Any:
        """The ipywidgets UI (a VBox); each control calls :meth:`update`."""
        import ipywidgets as widgets

        s, cfg = self.state, self.state.config
        style = {"description_width": "90px"}
        classes = widgets.Dropdown(
            options=list(self.images_by_class), value=s.class_name, description="class"
        )
        images = widgets.Dropdown(
            options=self._image_options(s.class_name), value=s.image_index, description="image"
        )
        weight = widgets.FloatSlider(
            value=cfg.text_weight,
            disabled=not self.winclip.scorer.uses_fusion_weights,
            min=0.0,
            max=1.0,
            step=WEIGHT_STEP,
            style=style,
            description="text weight",
            continuous_update=False,
            readout_format=".2f",
        )
        sigma = widgets.FloatSlider(
            value=cfg.sigma,
            min=SIGMA_RANGE[0],
            max=SIGMA_RANGE[1],
            step=SIGMA_RANGE[2],
            description="sigma",
            style=style,
            continuous_update=False,
        )
        threshold = widgets.FloatSlider(
            value=cfg.hotspot_threshold,
            min=THRESHOLD_RANGE[0],
            max=THRESHOLD_RANGE[1],
            step=THRESHOLD_RANGE[2],
            description="threshold z",
            style=style,
            continuous_update=False,
        )
        mode = widgets.ToggleButtons(
            options=list(NORMALIZATION_MODES), value=cfg.normalization, description="normalise"
        )
        self.output = widgets.Output()

        def on_class(change: dict[str, Any]) -> None:
            images.unobserve(on_image, names="value")
            images.options = self._image_options(change["new"])
            images.value = 0
            images.observe(on_image, names="value")
            self.update(class_name=change["new"], image_index=0)

        def on_image(change: dict[str, Any]) -> None:
            self.update(image_index=change["new"])

        classes.observe(on_class, names="value")
        images.observe(on_image, names="value")
        for control, name in (
            (weight, "text_weight"),
            (sigma, "sigma"),
            (threshold, "threshold"),
            (mode, "normalization"),
        ):
            control.observe(lambda change, key=name: self.update(**{key: change["new"]}), "value")
        self.controls = {
            "class_name": classes,
            "image_index": images,
            "text_weight": weight,
            "sigma": sigma,
            "threshold": threshold,
            "normalization": mode,
        }
        self.update()
        return widgets.VBox(
            [
                widgets.HBox([classes, images]),
                widgets.HBox([weight, sigma]),
                widgets.HBox([threshold, mode]),
                self.output,
            ]
        )

    def _image_options(self, class_name: str) -> list[tuple[str, int]]:
        return [
            (_image_label(item, i), i) for i, item in enumerate(self.images_by_class[class_name])
        ]


def explorer(
    winclip: Any,
    anchors_by_class: AnchorSource,
    images_by_class: Mapping[str, Sequence[Any]],
    masks: Mapping[str, Sequence[Any]] | None = None,
    *,
    interactive: bool | None = None,
    **initial: Any,
) -> Explorer:
    """Show the interactive explorer, or one static figure when there is no frontend.

    Args:
        winclip: a :class:`winclip_nb.WinCLIP`.
        anchors_by_class: class -> (normal, anomalous[, memory]) or a callback returning that.
        images_by_class: class -> list of images.
        masks: optional class -> list of ground-truth masks (None for good images).
        interactive: None -> :func:`has_frontend`; False forces the static figure.
        initial: starting ``class_name``, ``image_index`` and controls (``text_weight``,
            ``sigma``, ``threshold``, ``normalization``).

    Returns:
        The :class:`Explorer` (its ``update`` is the widgets' callback).
    """
    from IPython.display import display

    first = next((k for k, v in images_by_class.items() if len(v)), None)
    state = ExplorerState(class_name=initial.pop("class_name", first), config=winclip.config)
    ex = Explorer(winclip, anchors_by_class, images_by_class, masks, state.changed(**initial))
    if interactive is None:
        interactive = has_frontend()
    if interactive:
        display(ex.widget())
    else:
        display(ex.draw())
    return ex


__all__ = ["Explorer", "ExplorerState", "explorer", "has_frontend"]
