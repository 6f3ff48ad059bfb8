"""The LLaVA-OneVision explainer (notebook 05).

LLaVA sees a crop of the region with context and the whole image with the region
outlined, and is asked for a JSON answer (description and severity). Location and
confidence still come from the map (the language model does not see z-scores); an
answer it cannot parse falls back to the rule-based description, and says so.
"""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..core.config import DEFAULTS
from ..core.errors import ExplainerError
from ..core.results import DetectionResult, Hotspot
from .rules import RuleBasedExplainer, _as_rgb, _class_words, _normalise_severity

DEFAULT_LLAVA_MODEL = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"

# --- LLaVA -------------------------------------------------------------------------------
LLAVA_MAX_NEW_TOKENS = 60

#: Context around a region in the crop shown to LLaVA: this fraction of the box side on
#: each side, at least ``CROP_MIN_MARGIN_PX``.
CROP_MARGIN_FRACTION = 0.25

CROP_MIN_MARGIN_PX = 32

LLAVA_PROMPT = (
    "You are inspecting a photo of a {class_name} for manufacturing defects. "
    "The first image is a close-up of a region that an anomaly detector flagged; "
    "the second image shows the whole {class_name} with that region outlined by a red box. "
    "Describe the defect inside the red box in one sentence and rate its severity as "
    'low, medium or high. Answer only with JSON: {{"description": "...", "severity": "..."}}'
)

#: Free-text answers count as a description only with this many distinct words of letters.
MIN_FREE_TEXT_WORDS = 3

MAX_DESCRIPTION_CHARS = 300

_LLAVA_CACHE: dict[tuple[str, str, str], tuple[Any, Any]] = {}


def _clean_description(text: str | None) -> str | None:
    """Collapse whitespace, strip quotes, cap the length; None unless it holds words."""
    if text is None:
        return None
    text = re.sub(r"\s+", " ", str(text)).strip().strip("\"'`").strip()
    if len(re.findall(r"[A-Za-z]{2,}", text)) < 1:
        return None
    if len(text) > MAX_DESCRIPTION_CHARS:
        text = text[: MAX_DESCRIPTION_CHARS - 3].rstrip() + "..."
    return text


def _looks_like_language(text: str) -> bool:
    """At least MIN_FREE_TEXT_WORDS distinct letter words and >= 80 % plain characters."""
    words = {w.lower() for w in re.findall(r"[A-Za-z]{2,}", text)}
    visible = re.sub(r"\s", "", text)
    if len(words) < MIN_FREE_TEXT_WORDS or not visible:
        return False
    plain = len(re.findall(r"[A-Za-z0-9.,;:'\"()%-]", visible))
    return plain / len(visible) >= 0.8


_SEVERITY_WORDS = r"low|medium|moderate|high|minor|slight|severe|critical|major"


def parse_llava_answer(text: str) -> tuple[str | None, str | None]:
    """``(description, severity)`` from a language model's answer; ``(None, None)`` if unusable.

    Accepted, in this order: a JSON object (inside code fences or prose, keys
    ``description``/``defect`` and ``severity``), labelled lines ``Description: ...
    Severity: ...``, or plain sentences (with a severity only when phrased as
    "high severity" / "severity: high"). Severity is one of low/medium/high or None.

    Example:
        >>> parse_llava_answer('{"description": "A dent.", "severity": "High"}')
        ('A dent.', 'high')
        >>> parse_llava_answer("Description: a scratch near the rim. Severity: moderate")
        ('a scratch near the rim.', 'medium')
        >>> parse_llava_answer("t\\ufffd\\u0444^\\ufffdj")
        (None, None)
    """
    if not text or not text.strip():
        return None, None
    text = text.strip()
    # 1. JSON object somewhere in the text.
    for match in re.finditer(r"\{.*?\}", text, flags=re.DOTALL):
        try:
            obj = json.loads(match.group(0))
        except ValueError:
            continue
        if isinstance(obj, dict):
            lowered = {str(k).strip().lower(): v for k, v in obj.items()}
            raw = next(
                (lowered[k] for k in ("description", "defect", "desc", "answer") if k in lowered),
                None,
            )
            desc = _clean_description(raw if isinstance(raw, str) else None)
            sev_raw = lowered.get("severity")
            sev = _normalise_severity(sev_raw if isinstance(sev_raw, str) else None)
            if desc or sev:
                return desc, sev
    # 2. Labelled fields (also JSON-like text that json.loads rejected, e.g. single quotes).
    label_desc = re.search(
        r"[\"']?description[\"']?\s*[:=\-]\s*(.+?)(?=[\"']?\s*,?\s*[\"']?severity[\"']?\s*[:=\-]|$)",
        text,
        flags=re.IGNORECASE | re.DOTALL,
    )
    label_sev = re.search(
        rf"[\"']?severity[\"']?\s*[:=\-]\s*\**\s*[\"']?({_SEVERITY_WORDS})\b",
        text,
        flags=re.IGNORECASE,
    )
    if label_desc or label_sev:
        desc = _clean_description(label_desc.group(1).rstrip(",}") if label_desc else None)
        sev = _normalise_severity(label_sev.group(1) if label_sev else None)
        if desc or sev:
            return desc, sev
    # 3. Plain sentences.
    if _looks_like_language(text):
        sev_match = re.search(
            rf"\b({_SEVERITY_WORDS})\s+severity\b|\bseverity\s+(?:is\s+|of\s+)?({_SEVERITY_WORDS})\b",
            text,
            flags=re.IGNORECASE,
        )
        sev = _normalise_severity((sev_match.group(1) or sev_match.group(2)) if sev_match else None)
        first_sentence = re.split(r"(?<=[.!?])\s+", text, maxsplit=1)[0]
        return _clean_description(first_sentence), sev
    return None, None


def answer_summary(answer: str | None, limit: int = 60) -> str:
    """How a model's answer reads in a report: its description, or ``unparsable answer
    (N bytes)`` when :func:`parse_llava_answer` finds none (a random-weight model emits
    random tokens, which are bytes, not words).

    Example:
        >>> answer_summary('{"description": "a dark hole", "severity": "high"}')
        'a dark hole (severity high)'
        >>> answer_summary("\x1d\x1d%%##")
        'unparsable answer (6 bytes)'
    """
    description, severity = parse_llava_answer(answer or "")
    if description is None and severity is None:
        return f"unparsable answer ({len((answer or '').encode('utf-8'))} bytes)"
    text = description or "(no description)"
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return text + (f" (severity {severity})" if severity else "")


def crop_with_margin(image: np.ndarray, box: Sequence[int]) -> np.ndarray:
    """Box plus ``max(CROP_MIN_MARGIN_PX, CROP_MARGIN_FRACTION * side)`` on each side, clipped."""
    height, width = image.shape[:2]
    x0, y0, x1, y1 = (int(v) for v in box)
    mx = max(CROP_MIN_MARGIN_PX, round(CROP_MARGIN_FRACTION * (x1 - x0)))
    my = max(CROP_MIN_MARGIN_PX, round(CROP_MARGIN_FRACTION * (y1 - y0)))
    return image[max(0, y0 - my) : min(height, y1 + my), max(0, x0 - mx) : min(width, x1 + mx)]


def image_with_box(image: np.ndarray, box: Sequence[int]) -> Image.Image:
    """The whole image as PIL with ``box`` outlined in red."""
    pil = Image.fromarray(image)
    x0, y0, x1, y1 = (int(v) for v in box)
    line = max(2, round(min(image.shape[:2]) / 150))
    ImageDraw.Draw(pil).rectangle(
        [x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=(255, 0, 0), width=line
    )
    return pil


def _looks_like_local_path(source: str) -> bool:
    """True for anything that cannot be a hub id ``name`` or ``org/name``."""
    return (
        source.startswith((".", "/", "~", "\\"))
        or source.count("/") > 1
        or "\\" in source
        or (len(source) > 1 and source[1] == ":")
    )


def _hub_offline() -> bool:
    return any(
        os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def resolve_llava_source(model_id_or_path: str | Path) -> str:
    """A local folder for ``model_id_or_path``, or the hub id if it must be downloaded.

    A path that does not exist raises :class:`ExplainerError` at once. A hub id is looked
    up in the local Hugging Face cache first (no network); if it is not cached, it fails
    fast too when ``HF_HUB_OFFLINE`` is set or the hub does not answer a quick probe.
    """
    source = str(model_id_or_path)
    local = Path(source).expanduser()
    if local.is_dir():
        return str(local.resolve())
    if local.exists() or _looks_like_local_path(source):
        raise ExplainerError(f"LLaVA model folder {source} does not exist (or is not a folder)")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(source, local_files_only=True)
    except Exception as exc:  # not cached (or huggingface_hub missing)
        if _hub_offline():
            raise ExplainerError(
                f"LLaVA model {source} is not in the local Hugging Face cache and "
                f"HF_HUB_OFFLINE is set ({type(exc).__name__}); download it once with "
                "network access or pass a local folder"
            ) from exc
        # Without this probe an offline machine spends minutes in download retries.
        from ..hub.weights import hub_reachable

        if not hub_reachable():
            raise ExplainerError(
                f"LLaVA model {source} is not in the local Hugging Face cache and the hub "
                "cannot be reached (offline?); download it once with network access or pass "
                "a local folder"
            ) from exc
    return source


def _resolve_device(device: str, model: str | Path) -> str:
    """The device name for LLaVA; a device that is not there is an :class:`ExplainerError`
    naming the model (so that ``use_llava=True`` can fall back to the rules)."""
    from ..core.errors import DeviceError
    from ..core.runtime import resolve_device

    try:
        return str(resolve_device(device or "auto"))
    except DeviceError as exc:
        raise ExplainerError(f"cannot load LLaVA model {model}: {exc}") from exc


class LlavaExplainer:
    """Describe hotspots with LLaVA-OneVision (any checkpoint in the hub's llava-hf format).

    Build with :meth:`from_pretrained`; models are cached per (folder, device, dtype), so
    a second explainer for the same model does not load it again.
    """

    def __init__(
        self, model: Any, processor: Any, name: str, device: str, dtype: Any, threshold: float
    ) -> None:
        self.model = model
        self.processor = processor
        self.name = name
        self.device = device
        self.dtype = dtype
        self.rule_based = RuleBasedExplainer(threshold)
        self.max_new_tokens = LLAVA_MAX_NEW_TOKENS

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str | Path,
        device: str = "auto",
        dtype: Any = None,
        threshold: float = DEFAULTS.hotspot_threshold,
    ) -> LlavaExplainer:
        """Load (or reuse) model and processor; float16 on CUDA, float32 on CPU by default.

        Raises :class:`ExplainerError` naming the model and the cause on any failure
        (missing folder, offline hub, missing package, out of memory, ...).
        """
        source = resolve_llava_source(model_id_or_path)  # fails fast before heavy imports
        try:
            import torch
            from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration
        except ImportError as exc:
            raise ExplainerError(
                f"cannot load LLaVA model {model_id_or_path}: {type(exc).__name__}: {exc}"
            ) from exc
        resolved_device = _resolve_device(device, model_id_or_path)
        if dtype is None:
            dtype = torch.float16 if resolved_device.startswith("cuda") else torch.float32
        key = (source, resolved_device, str(dtype))
        if key not in _LLAVA_CACHE:
            if resolved_device == "cpu":
                print(
                    f"Note: LLaVA ({model_id_or_path}) runs on CPU in {str(dtype)[6:]}: "
                    "expect many seconds per region.",
                    file=sys.stderr,
                )
            try:
                processor = AutoProcessor.from_pretrained(source)
                model = LlavaOnevisionForConditionalGeneration.from_pretrained(source, dtype=dtype)
                model = model.to(resolved_device).eval()
            except Exception as exc:
                raise ExplainerError(
                    f"cannot load LLaVA model {model_id_or_path}: {type(exc).__name__}: {exc}"
                ) from exc
            _LLAVA_CACHE[key] = (model, processor)
        model, processor = _LLAVA_CACHE[key]
        return cls(model, processor, f"llava:{model_id_or_path}", resolved_device, dtype, threshold)

    def ask(self, images: Sequence[Image.Image], prompt: str) -> str:
        """Greedy answer (at most ``max_new_tokens``) to ``prompt`` about ``images``."""
        import torch

        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
        conversation = [{"role": "user", "content": content}]
        text = self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        # Nested list: all images belong to one sample (multi-image mode, no anyres tiling).
        inputs = self.processor(images=[list(images)], text=[text], return_tensors="pt")
        inputs = {
            k: (
                v.to(self.device, dtype=self.dtype)
                if torch.is_floating_point(v)
                else v.to(self.device)
            )
            for k, v in inputs.items()
        }
        with torch.inference_mode():
            output = self.model.generate(
                **inputs, do_sample=False, max_new_tokens=self.max_new_tokens
            )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return self.processor.batch_decode(new_tokens, skip_special_tokens=True)[0].strip()

    def explain_region(
        self,
        image: Any,
        result: DetectionResult,
        hotspot: Hotspot,
        class_name: str,
        threshold: float | None = None,
    ) -> dict[str, Any]:
        """Same keys as :meth:`RuleBasedExplainer.explain_region`; description and severity
        from LLaVA when its answer parses, else the rule-based ones (marked in
        ``description_source`` / ``severity_source``)."""
        rgb = _as_rgb(image)
        explanation = self.rule_based.explain_region(rgb, result, hotspot, class_name, threshold)
        crop = Image.fromarray(np.ascontiguousarray(crop_with_margin(rgb, hotspot.box)))
        overview = image_with_box(rgb, hotspot.box)
        prompt = LLAVA_PROMPT.format(class_name=_class_words(class_name))
        try:
            answer = self.ask([crop, overview], prompt)
        except Exception as exc:  # generation failed: keep the report, say why
            explanation["description_source"] = (
                f"rule-based (LLaVA failed: {type(exc).__name__}: {exc})"
            )
            return explanation
        description, severity = parse_llava_answer(answer)
        explanation["llava_answer"] = answer
        if description:
            explanation["description"] = description
            explanation["description_source"] = "llava"
        else:
            explanation["description_source"] = "rule-based (unparsable LLaVA answer)"
        if severity:
            explanation["severity"] = severity
            explanation["severity_source"] = "llava"
        return explanation


#: ``use_llava`` values: LLaVA with the rule-based fallback, LLaVA or an error, no LLaVA.
LLAVA_FALLBACK = (True, "auto")
LLAVA_REQUIRED = "require"
LLAVA_OFF = (False, "no", "off")
#: LLaVA models whose fallback was already announced (the warning is said once per model).
_FALLBACK_WARNED: set[str] = set()


class ExplainerFallbackWarning(UserWarning):
    """LLaVA could not be loaded; the rule-based explainer is used instead."""


def load_explainer(
    use_llava: bool | str = True,
    llava_model: str | Path = DEFAULT_LLAVA_MODEL,
    device: str = "auto",
    threshold: float = DEFAULTS.hotspot_threshold,
) -> RuleBasedExplainer | LlavaExplainer:
    """The explainer to use.

    ``True`` (or ``"auto"``): LLaVA when it loads; when it cannot (weights missing,
    offline, out of memory) the rule-based explainer, with one
    :class:`ExplainerFallbackWarning` per model that names the model and the cause.
    ``"require"``: LLaVA, or :class:`ExplainerError` naming the model and the cause.
    ``False``: rule-based. Reports name the explainer that was used.
    """
    if use_llava in LLAVA_OFF:
        return RuleBasedExplainer(threshold)
    if use_llava not in (*LLAVA_FALLBACK, LLAVA_REQUIRED):
        raise ExplainerError(
            f"use_llava must be True, False, 'auto' or 'require', got {use_llava!r}"
        )
    try:
        try:
            return LlavaExplainer.from_pretrained(llava_model, device=device, threshold=threshold)
        except (RuntimeError, MemoryError) as exc:  # torch's OutOfMemoryError is a RuntimeError
            raise ExplainerError(
                f"cannot load LLaVA model {llava_model}: {type(exc).__name__}: {exc}"
            ) from exc
    except ExplainerError as exc:
        if use_llava == LLAVA_REQUIRED:
            raise
        if str(llava_model) not in _FALLBACK_WARNED:
            _FALLBACK_WARNED.add(str(llava_model))
            reason = " ".join(str(exc).split())
            warnings.warn(
                f"LLaVA-OneVision could not be loaded, so the rule-based explainer describes "
                f"the regions instead ({reason}). Pass use_llava='require' to make this an "
                "error.",
                ExplainerFallbackWarning,
                stacklevel=3,
            )
        return RuleBasedExplainer(threshold)
