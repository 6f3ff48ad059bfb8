"""Memory-bank files: a fitted class (memory, calibration maps, anchors) as one
``.safetensors`` file with JSON metadata in its header, never unpickled.

The file records the model it was built with (name, weights, layers, input size, method,
window scales); loading it into another model is refused with a message naming the
setting. Files of the first format (before fitted classes) are refused with a message
that says how to rebuild them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from ..core.anchors import TextAnchors
from ..core.calibration import Calibration
from ..core.detector import FittedClass
from ..core.errors import MemoryBankError
from .files import atomic_write

FORMAT_VERSION = 2
HEADER_KEY = "winclip_nb"


def _memory_tensors(memory: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A memory dataclass -> its tensors (``memory.<field>[.<i>]``) and its other fields."""
    tensors, fields = {}, {}
    for f in dataclasses.fields(memory):
        value = getattr(memory, f.name)
        if isinstance(value, torch.Tensor):
            tensors[f"memory.{f.name}"] = value
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            tensors.update({f"memory.{f.name}.{i}": t for i, t in enumerate(value)})
            fields[f.name] = {"tensor_list": len(value)}
        else:
            fields[f.name] = value
    return tensors, fields


def save_fitted(fitted: FittedClass, path: str | Path, model: dict[str, Any]) -> Path:
    """Write ``fitted`` (which must have a memory) and the ``model`` settings to ``path``."""
    from safetensors.torch import save

    path = Path(path)
    if path.suffix != ".safetensors":
        raise MemoryBankError(f"memory banks are .safetensors files, got {path}")
    if fitted.memory is None:
        raise MemoryBankError("no memory bank to save: fit normal images first")
    tensors, fields = _memory_tensors(fitted.memory)
    tensors["anchors.normal"], tensors["anchors.anomalous"] = fitted.anchors
    cal = fitted.calibration
    if cal is not None:
        tensors.update({f"calibration.{k}": v for k, v in cal.normal_maps.items()})
        tensors["calibration.fg_masks"] = cal.fg_masks.to(torch.uint8)
    meta = {
        "format_version": FORMAT_VERSION,
        "model": model,
        "memory": fields,
        "class_name": fitted.class_name,
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write(
        path, save(tensors, metadata={HEADER_KEY: json.dumps(meta, sort_keys=True)})
    )


def _read(path: Path, device: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if path.suffix != ".safetensors":
        raise MemoryBankError(
            f"memory banks load only from .safetensors files (no pickle), got {path}"
        )
    if not path.is_file():
        raise MemoryBankError(f"memory bank file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
        return load_file(str(path), device=device), json.loads(header[HEADER_KEY])
    except Exception as err:  # noqa: BLE001 - safetensors raises several types
        raise MemoryBankError(f"{path} is not a winclip_nb memory bank: {err}") from err


def load_fitted(
    path: str | Path, model: dict[str, Any], memory_type: type, device: str = "cpu"
) -> FittedClass:
    """Read a file written by :func:`save_fitted` onto ``device``; refuse one built with
    other ``model`` settings or in the first format."""
    path = Path(path)
    tensors, meta = _read(path, str(device))
    if meta.get("format_version") != FORMAT_VERSION:
        raise MemoryBankError(
            f"{path} is a memory bank of an older format ({meta.get('format_version')}); "
            "rebuild it: winclip.build_normal_memory(train_images, *anchors) then "
            "winclip.save_memory(path)"
        )
    for key, value in model.items():
        saved = meta["model"].get(key)
        if json.dumps(saved) != json.dumps(value):
            raise MemoryBankError(
                f"memory bank {path} was built with {key}={saved!r}, but this "
                f"model uses {key}={value!r}; rebuild it for this model"
            )
    try:
        fields = dict(meta["memory"])
        for f in dataclasses.fields(memory_type):
            spec = fields.get(f.name)
            if isinstance(spec, dict) and "tensor_list" in spec:
                n = spec["tensor_list"]
                fields[f.name] = [tensors[f"memory.{f.name}.{i}"] for i in range(n)]
            elif f"memory.{f.name}" in tensors:
                fields[f.name] = tensors[f"memory.{f.name}"]
        memory = memory_type(**fields)
    except (TypeError, KeyError) as err:
        raise MemoryBankError(f"{path} does not hold a {memory_type.__name__}: {err}") from err
    maps = {
        k.split(".", 1)[1]: v
        for k, v in tensors.items()
        if k.startswith("calibration.") and k != "calibration.fg_masks"
    }
    try:
        calibration = None
        if maps:
            fg_masks = tensors["calibration.fg_masks"].bool()
            calibration = Calibration.from_normal_maps(maps, fg_masks)
        anchors = TextAnchors(
            tensors["anchors.normal"], tensors["anchors.anomalous"], meta["class_name"]
        )
    except KeyError as err:
        raise MemoryBankError(
            f"{path} is not a complete memory bank: {err} is missing; rebuild it"
        ) from err
    return FittedClass(anchors, memory, calibration)
