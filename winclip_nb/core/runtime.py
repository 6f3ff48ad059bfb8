"""Where and how things run: device, dtype, the host thread pool and progress bars.

Example:
    >>> resolve_device("cpu"), resolve_dtype("auto", torch.device("cpu"))
    (device(type='cpu'), torch.float32)
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from .errors import DeviceError

#: Most threads for per-image host work (decoding, foreground masks).
MAX_HOST_WORKERS = 8
_POOL: list[ThreadPoolExecutor] = []
_POOL_LOCK = threading.Lock()


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without CUDA raises."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as err:
        raise DeviceError(f"unknown device {name!r}: use 'auto', 'cpu' or 'cuda'") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            f"device {name!r} was requested but CUDA is not available on this machine "
            "(use device='cpu' or 'auto')"
        )
    return dev


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The backbone's dtype: ``auto`` is fp16 on CUDA and fp32 elsewhere."""
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def host_pool() -> ThreadPoolExecutor:
    """The shared thread pool for per-image host work (OpenCV and PIL release the GIL)."""
    with _POOL_LOCK:
        if not _POOL:
            workers = max(1, min(MAX_HOST_WORKERS, os.cpu_count() or 1))
            _POOL.append(ThreadPoolExecutor(workers, thread_name_prefix="winclip_nb"))
        return _POOL[0]


def map_images(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """``[fn(x) for x in items]``, spread over the host pool when there are several."""
    if len(items) < 2 or (os.cpu_count() or 1) < 2:
        return [fn(x) for x in items]
    return list(host_pool().map(fn, items))


def to_device(array: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """numpy or CPU tensor -> ``device``; to CUDA through pinned memory, without a sync."""
    tensor = torch.as_tensor(array if torch.is_tensor(array) else np.ascontiguousarray(array))
    if device.type != "cuda" or tensor.device.type == "cuda":
        return tensor.to(device)
    return (tensor if tensor.is_pinned() else tensor.pin_memory()).to(device, non_blocking=True)


def batched(fn: Callable[[Any], Any], items: Any, batch_size: int, desc: str = "batches",
            enabled: bool = False) -> list[Any]:
    """``[fn(items[i : i + batch_size]) for each batch]``, with a progress bar if ``enabled``."""
    starts = range(0, len(items), batch_size)
    return [fn(items[i : i + batch_size]) for i in progress(starts, len(starts), desc, enabled)]


def progress(iterable: Iterable, total: int, desc: str, enabled: bool = True, **kw: Any) -> Any:
    """``iterable`` with a tqdm bar when ``enabled`` (and more than one step)."""
    if not enabled or total < 2:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=kw.pop("leave", False), **kw)
