"""Weights: one resolver for open_clip names, tags and files, and the backbone factory.

``pretrained`` may be an open_clip tag (``"openai"``, ``"laion400m_e31"``), a local
checkpoint file, ``"random"`` (random init, offline) or ``"auto"`` (the method's tag when
it is cached or the hub answers, else random with a warning). Offline, a tag that is not
in the cache fails at once with a message naming the remedies, instead of after a long
series of hub retries. :func:`build_backbone` turns a config into a
:class:`~winclip_nb.core.backbone.ClipBackbone`.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from ..core.backbone import ClipBackbone
from ..core.config import WinCLIPConfig
from ..core.errors import ConfigError, WeightsError
from ..core.runtime import resolve_device

#: Names that build a random-init model (no download, for offline runs and tests).
RANDOM_WEIGHTS = ("random", "none", "")

#: ``"auto"``: the default tag when it is cached or the hub answers fast, else random.
AUTO_WEIGHTS = "auto"

#: Seconds to wait for the model hub before declaring the machine offline.
HUB_PROBE_TIMEOUT_S = 3.0

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")

_HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_TIMM_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedWeights:
    """Where a model's weights come from.

    ``source`` is what open_clip gets as ``pretrained`` (``None`` for random init,
    else a tag or a file path); ``label`` is what reports print.
    """

    label: str
    source: str | None
    random: bool
    quick_gelu: bool = False


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """True when the model hub answers a TCP connect within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_weight_files(hf_hub: str) -> tuple[str, tuple[str, ...]]:
    """Repo id and checkpoint file names, in open_clip's order, of a tag's ``hf_hub`` entry.

    ``"org/name/"`` means open_clip's default file (its safetensors version first);
    ``"org/name/file.bin"`` names the file (``file.safetensors`` is tried first).

    Example:
        >>> hub_weight_files("org/name/pytorch_model.bin")
        ('org/name', ('pytorch_model.safetensors', 'pytorch_model.bin'))
    """
    repo_id, filename = os.path.split(hf_hub.strip())
    repo_id = repo_id.strip("/")
    if not repo_id:
        return "", ()
    if not filename or filename == _HF_WEIGHT_FILES[1]:
        return repo_id, _HF_WEIGHT_FILES
    if filename.endswith((".bin", ".pth")):
        return repo_id, (filename[:-4] + ".safetensors", filename)
    return repo_id, (filename,)


def cached_tag_file(model_name: str, tag: str) -> str | None:
    """Path of an already-downloaded checkpoint for ``(model_name, tag)``, if any."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    hub_id, filenames = hub_weight_files(cfg.get("hf_hub") or "")
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - huggingface_hub ships with open_clip
            return None
        for filename in filenames:
            found = try_to_load_from_cache(hub_id, filename)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    url = cfg.get("url") or ""
    if url:
        local = Path.home() / ".cache" / "clip" / os.path.basename(urlparse(url).path)
        if local.is_file():
            return str(local)
    return None


def cached_timm_file(model_name: str, tag: str) -> str | None:
    """Path of an already-downloaded timm checkpoint ``model_name.tag``, if any."""
    from huggingface_hub import try_to_load_from_cache

    for filename in _TIMM_WEIGHT_FILES:
        found = try_to_load_from_cache(f"timm/{model_name}.{tag}", filename)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def _open_clip_catalogue() -> tuple[Callable, Callable, Callable]:
    import open_clip

    return open_clip.list_models, open_clip.list_pretrained_tags_by_model, cached_tag_file


def _timm_catalogue() -> tuple[Callable, Callable, Callable]:
    import timm

    def tags(model_name: str) -> list[str]:
        return [n.split(".", 1)[1] for n in timm.list_pretrained(f"{model_name}.*")]

    return timm.list_models, tags, cached_timm_file


#: Model families: (list of model names, tags of a model, cached file of a tag or None).
CATALOGUES: dict[str, Callable[[], tuple[Callable, Callable, Callable]]] = {
    "open_clip": _open_clip_catalogue,
    "timm": _timm_catalogue,
}


def resolve_weights(
    model_name: str, pretrained: str | os.PathLike | None, auto_tag: str | None = None,
    family: str = "open_clip",
) -> ResolvedWeights:
    """Turn ``pretrained`` (tag | local file | ``"random"`` | ``"auto"``) into a source.

    One resolver for both model families (``open_clip`` and ``timm``, see
    :data:`CATALOGUES`). Offline, a tag that is not in the local cache fails at once with
    a message naming the remedies, instead of after a long series of hub retries.
    ``"auto"`` means ``auto_tag`` (the method's own tag) when it is cached or the hub
    answers, else random.

    Example:
        >>> resolve_weights("ViT-B-16", "random").random
        True
        >>> resolve_weights("vit_small_patch14_dinov2", "random", family="timm").label
        'random'
    """
    if family not in CATALOGUES:
        raise ConfigError(f"unknown model family {family!r}; known: {', '.join(CATALOGUES)}")
    list_models, list_tags, cached_file = CATALOGUES[family]()
    known = list_models()
    if model_name not in known:
        close = [m for m in known if model_name.lower()[:5] in m.lower()]
        raise ConfigError(
            f"unknown {family} model {model_name!r}"
            + (f"; similar names: {', '.join(close[:8])}" if close else "")
        )
    if pretrained is None or str(pretrained).strip().lower() in RANDOM_WEIGHTS:
        return ResolvedWeights(label="random", source=None, random=True)

    text = str(pretrained)
    path = Path(text).expanduser()
    looks_like_path = (
        path.suffix.lower() in CHECKPOINT_SUFFIXES or os.sep in text or "/" in text or path.exists()
    )
    tags = list_tags(model_name)
    if looks_like_path and text not in tags:
        if not path.is_file():
            raise WeightsError(f"weights file not found: {text}")
        return ResolvedWeights(label=str(path), source=str(path), random=False)

    if text.lower() == AUTO_WEIGHTS:
        # the method's own tag (``auto_tag``), never a guess among the model's tags
        if auto_tag not in tags:
            log.warning(
                "weights='auto': %s has no %r weights (its tags: %s); using random init",
                model_name,
                auto_tag,
                ", ".join(tags) or "none",
            )
            return ResolvedWeights(label="random (auto: no such tag)", source=None, random=True)
        if cached_file(model_name, auto_tag) or hub_reachable():
            return resolve_weights(model_name, auto_tag, family=family)
        log.warning("weights='auto': no cached checkpoint and no hub access, using random init")
        return ResolvedWeights(label="random (auto: offline)", source=None, random=True)

    if text not in tags:
        raise WeightsError(
            f"unknown pretrained tag {text!r} for {model_name}; known tags: {', '.join(tags)}; "
            "or pass a checkpoint file path, or 'random'"
        )
    quick_gelu = family == "open_clip" and bool(
        __import__("open_clip").get_pretrained_cfg(model_name, text).get("quick_gelu", False))
    cached = cached_file(model_name, text)
    if cached:
        return ResolvedWeights(label=text, source=cached, random=False, quick_gelu=quick_gelu)
    if not hub_reachable():
        raise WeightsError(
            f"cannot load pretrained weights {model_name}/{text}: the model hub is not reachable "
            "and the checkpoint is not in the local cache. Remedies: run `winclip-nb prefetch` "
            "on a machine with network access (fills the cache), pass a local checkpoint file "
            "as weights/pretrained, or use pretrained='random' for an offline (meaningless) model."
        )
    return ResolvedWeights(label=text, source=text, random=False, quick_gelu=quick_gelu)


def native_image_size(model_name: str) -> int | None:
    """The input side ``model_name`` is built for (open_clip's model config), if known.

    >>> native_image_size("ViT-B-16"), native_image_size("ViT-B-16-plus-240")
    (224, 240)
    """
    import open_clip

    size = ((open_clip.get_model_config(model_name) or {}).get("vision_cfg") or {}).get(
        "image_size"
    )
    return int(size) if isinstance(size, int) else None


def check_layers(model_name: str, layers: Sequence[int]) -> tuple[int, ...]:
    """Layer indices valid for the vision transformer of ``model_name``, checked from
    open_clip's model config without building the model (unknown depth: not checked).

    >>> check_layers("ViT-B-16", [9, 10, 11])
    (9, 10, 11)
    """
    import open_clip

    vision = (open_clip.get_model_config(model_name) or {}).get("vision_cfg") or {}
    n_blocks = vision.get("layers")
    indices = tuple(int(i) for i in layers)
    if isinstance(n_blocks, int):
        bad = [i for i in indices if not 0 <= i < n_blocks]
        if bad:
            raise ConfigError(
                f"unknown layer indices {bad} for {model_name}: it has {n_blocks} transformer "
                f"blocks, valid indices are 0..{n_blocks - 1}"
            )
    return indices


def load_open_clip(
    model_name: str,
    pretrained: str | os.PathLike | None,
    device: str | torch.device = "cpu",
    image_size: int | None = None,
    seed: int = 0,
    auto_tag: str | None = None,
) -> tuple[nn.Module, object, ResolvedWeights]:
    """Build an open_clip model, its tokenizer and the resolved weights (eval mode).

    A random-init model is drawn from ``seed`` without touching the global RNG, so the
    same seed always gives the same random weights. ``image_size`` other than the
    model's own builds it at that size (positional embeddings interpolated).
    """
    import open_clip

    weights = resolve_weights(model_name, pretrained, auto_tag)
    kwargs: dict = {"force_quick_gelu": weights.quick_gelu}
    if image_size is not None and image_size != native_image_size(model_name):
        kwargs["force_image_size"] = image_size
    root_logger = logging.getLogger()
    old_level = root_logger.level
    root_logger.setLevel(logging.ERROR)  # open_clip logs a warning on every random init
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.create_model(model_name, pretrained=weights.source, **kwargs)
    except WeightsError:
        raise
    except Exception as err:  # noqa: BLE001 - open_clip raises many types for bad files
        if weights.source is not None and os.path.isfile(weights.source):
            raise WeightsError(
                f"{weights.source} is not a usable open_clip checkpoint for {model_name}: "
                f"{type(err).__name__}: {err}"
            ) from err
        raise WeightsError(f"could not load {model_name}/{weights.label}: {err}") from err
    finally:
        root_logger.setLevel(old_level)
    model = model.to(resolve_device(device)).eval()
    return model, open_clip.get_tokenizer(model_name), weights


def load_timm(
    model_name: str,
    pretrained: str | os.PathLike | None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    auto_tag: str | None = None,
) -> tuple[nn.Module, ResolvedWeights]:
    """Build a timm vision transformer (``dynamic_img_size``: any multiple of the patch
    size) and its resolved weights, eval mode; random init drawn from ``seed``."""
    import timm

    weights = resolve_weights(model_name, pretrained, auto_tag, family="timm")
    kwargs: dict = {"dynamic_img_size": True, "pretrained": not weights.random}
    name = model_name
    if weights.source is not None and os.path.isfile(weights.source):  # a file, or a cached tag
        kwargs["pretrained_cfg_overlay"] = {"file": weights.source}
    elif not weights.random:  # a tag to download
        name = f"{model_name}.{weights.label}"
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = timm.create_model(name, **kwargs)
    except Exception as err:  # noqa: BLE001 - timm raises many types for bad files
        raise WeightsError(f"could not load {model_name}/{weights.label}: "
                           f"{type(err).__name__}: {err}") from err
    return model.to(resolve_device(device)).eval(), weights


def _clip_backbone(config: WinCLIPConfig, tag: str, pretrained: str) -> ClipBackbone:
    model, tokenizer, weights = load_open_clip(
        config.model_name, pretrained, config.device, config.image_size, config.seed, tag
    )
    return ClipBackbone(model, tokenizer, config.layers, config.image_size, config.device,
                        config.precision, weights.label, weights.random)


def _timm_backbone(config: WinCLIPConfig, tag: str, pretrained: str) -> nn.Module:
    from ..core.anomalydino import ViTBackbone

    model, weights = load_timm(config.model_name, pretrained, config.device, config.seed, tag)
    return ViTBackbone(model, config.layers, config.image_size, config.device,
                       config.precision, weights.label, weights.random)


#: Backbone builders by model family (a scorer's ``backbone_family``).
BACKBONE_BUILDERS: dict[str, Callable[[WinCLIPConfig, str, str], nn.Module]] = {
    "open_clip": _clip_backbone,
    "timm": _timm_backbone,
}


def build_backbone(config: WinCLIPConfig) -> nn.Module:
    """The backbone a config describes (model, weights, layers, size, device, precision),
    built by its method's model family (the method's tag for ``pretrained="auto"``)."""
    from ..core.scorers import scorer_class

    scorer = scorer_class(config.method)
    tag = scorer.default_weights
    pretrained = tag if config.pretrained is None else config.pretrained
    return BACKBONE_BUILDERS[scorer.backbone_family](config, tag, pretrained)
