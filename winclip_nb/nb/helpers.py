"""Helpers the tutorial notebooks call: set-up, reference mode, banners, sample picking.

Every notebook calls :func:`setup` right after its ``parameters`` cell. Outside
reference mode it passes the parameters through (``weights="auto"``: pretrained when
cached or reachable, else random init with a visible banner). With the environment
variable ``WINCLIP_NB_REFERENCE=1`` it forces the deterministic *reference mode*:
offline, random weights, the synthetic dataset, CPU, fixed seeds and thread count.
The committed notebooks are executed in reference mode, so their stored outputs can
be compared exactly by ``pytest --nbval``.

Example:
    >>> env = setup(weights="random", device="cpu", data_root=None)  # doctest: +SKIP
    winclip_nb 0.1.0 | weights random | device cpu | data synthetic: disc, weave, washer | ...
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..core.config import DEFAULTS
from ..core.errors import DataError

#: ``1`` forces reference mode: offline, random weights, synthetic data, CPU.
REFERENCE_ENV_VAR = "WINCLIP_NB_REFERENCE"

#: ``1`` means no notebook frontend (papermill, nbval, CI): widgets fall back to figures.
HEADLESS_ENV_VAR = "WINCLIP_NB_HEADLESS"

#: Torch threads in reference mode (same reduction order on every machine).
REFERENCE_THREADS = 2

#: CPU kernel paths fixed in reference mode (environment variables, read when MKL and
#: oneDNN run their first kernel): MKL's reproducibility branch and oneDNN's instruction
#: set. Without them each library picks kernels for the CPU at hand (AVX-512, AVX2, ...),
#: and those round differently, so stored outputs made on one machine differ from a
#: rerun on another in the last digits. An AVX2 CPU runs the same kernels either way.
REFERENCE_CPU_KERNELS = {"MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2"}

#: JPEG quality of inline figures in reference mode (committed notebooks).
INLINE_JPEG_QUALITY = 85

#: Class used when ``class_name`` is not given.
DEFAULT_NOTEBOOK_CLASS = "disc"

_TRUE = {"1", "true", "yes", "on"}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def reference_mode() -> bool:
    """True when ``WINCLIP_NB_REFERENCE`` is set to 1/true/yes/on."""
    return _env_flag(REFERENCE_ENV_VAR)


def headless() -> bool:
    """True when no notebook frontend can show widgets (reference mode or papermill runs)."""
    return reference_mode() or _env_flag(HEADLESS_ENV_VAR)


def cell_from_frontend() -> bool:
    """True when the cell running now was sent by a frontend a person can use.

    The rule: the kernel's current ``execute_request`` allows input (``allow_stdin``).
    Frontends that show widgets (JupyterLab, Notebook 7, VS Code) send ``allow_stdin:
    true`` with each cell, because a cell may call ``input()``; headless clients
    (papermill, nbclient, ``jupyter nbconvert --execute``, nbval) send ``false``, since
    nobody could answer. It needs no environment variable and no process names.

    Limits: a frontend that sends ``allow_stdin: false`` (some consoles) counts as
    headless, and a headless client that allows input counts as a frontend; outside an
    IPython kernel (a plain script or doctest) this is False. The notebooks' explicit
    ``interactive`` parameter overrides the rule either way.
    """
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    kernel = getattr(get_ipython(), "kernel", None)
    if kernel is None:
        return False
    get_parent = getattr(kernel, "get_parent", None)
    parent = get_parent("shell") if callable(get_parent) else getattr(kernel, "_parent", None)
    content = (parent or {}).get("content") or {}
    return bool(content.get("allow_stdin", False))


def work_dir(name: str) -> Path:
    """A folder for a notebook's output files in the package cache (created):
    ``$WINCLIP_NB_CACHE/notebooks/<name>``, else ``~/.cache/winclip_nb/notebooks/<name>``."""
    from ..data.files import ensure_folder
    from ..data.synthetic import cache_dir

    folder = cache_dir() / "notebooks" / name
    ensure_folder(folder)
    return folder


def _choose_class(root: Path, class_name: str | None) -> str:
    """``class_name`` if the dataset has it; a default synthetic name falls back to the first."""
    from ..data import SYNTHETIC_CLASSES, list_mvtec_classes

    available = list_mvtec_classes(root)
    if not available:
        raise DataError(f"no classes (<class>/train/good folders) found under {root}")
    if class_name in available:
        return str(class_name)
    if class_name is None or class_name in SYNTHETIC_CLASSES:
        chosen = available[0]
        if class_name is not None:
            print(f"class {class_name!r} is not in this dataset; using {chosen!r}")
        return chosen
    raise DataError(
        f"class {class_name!r} not found under {root}; available: {', '.join(available)}"
    )


def setup(
    weights: str | os.PathLike | None = "auto",
    device: str = "auto",
    data_root: str | os.PathLike | None = None,
    class_name: str | None = None,
    *,
    seed: int = DEFAULTS.seed,
    threads: int | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Resolve a notebook's parameters, seed everything and print a one-line banner.

    Args:
        weights: ``"auto"``, an open_clip tag, a checkpoint path or ``"random"``.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        data_root: an MVTec-AD style folder; None or ``""`` -> the synthetic dataset
            (written on first use to :func:`winclip_nb.data.default_synthetic_root`).
        class_name: class to use; None or a synthetic name missing from the data ->
            the dataset's first class.
        threads: torch CPU threads (None: torch's default; reference mode: 2).

    In reference mode (``WINCLIP_NB_REFERENCE=1``) weights, device and data are forced
    to ``"random"``, ``"cpu"`` and the synthetic set, ``HF_HUB_OFFLINE=1`` is set, and
    inline figures are stored as JPEG (see :func:`compact_inline_figures`).

    Returns:
        ``{"reference", "weights", "device", "data_root" (Path), "synthetic",
        "class_name", "seed", "threads"}``.
    """
    import torch

    from ..data import default_synthetic_root, is_synthetic_root, make_synthetic_mvtec

    reference = reference_mode()
    if reference:
        os.environ["HF_HUB_OFFLINE"] = "1"
        for name, value in REFERENCE_CPU_KERNELS.items():
            os.environ.setdefault(name, value)
        weights, device, data_root = "random", "cpu", None
        threads = REFERENCE_THREADS
        compact_inline_figures()
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

    if data_root is None or str(data_root).strip() == "":
        root = make_synthetic_mvtec(default_synthetic_root())
    else:
        root = Path(data_root).expanduser()
        if not root.is_dir():
            raise DataError(f"data_root is not a folder: {root}")
    synthetic = is_synthetic_root(root)
    chosen = _choose_class(root, class_name or DEFAULT_NOTEBOOK_CLASS)
    env = {
        "reference": reference,
        "weights": "random" if weights is None else str(weights),
        "device": str(device),
        "data_root": root,
        "synthetic": synthetic,
        "class_name": chosen,
        "seed": int(seed),
        "threads": torch.get_num_threads(),
    }
    if verbose:
        print(banner(env))
    return env


def compact_inline_figures(quality: int = INLINE_JPEG_QUALITY) -> bool:
    """Store inline matplotlib figures as JPEG instead of PNG; True if applied.

    The synthetic images are noisy, so PNG figures of them take hundreds of kB each;
    JPEG keeps the committed notebooks small. Only inside an IPython kernel.
    """
    try:
        from IPython import get_ipython
        from matplotlib_inline.backend_inline import set_matplotlib_formats
    except ImportError:
        return False
    if get_ipython() is None:
        return False
    set_matplotlib_formats("jpeg", pil_kwargs={"quality": int(quality)})
    return True


def banner(env: Mapping[str, Any]) -> str:
    """The one-line summary :func:`setup` prints (no paths, so it is stable).

    Example:
        >>> banner({"reference": True, "weights": "random", "device": "cpu",
        ...         "synthetic": True, "class_name": "disc", "seed": 0})  # doctest: +ELLIPSIS
        'winclip_nb ... | REFERENCE MODE (offline, random weights, synthetic data, CPU) | ...'
    """
    data = "synthetic data" if env["synthetic"] else "data_root"
    if env["reference"]:
        mode = "REFERENCE MODE (offline, random weights, synthetic data, CPU)"
    else:
        mode = f"weights {env['weights']} | device {env['device']} | {data}"
    return f"winclip_nb {__version__} | {mode} | class {env['class_name']} | seed {env['seed']}"


def weights_banner(winclip: Any) -> str:
    """What weights a detector uses; the RANDOM WEIGHTS warning when it is random-init."""
    from ..core.results import RANDOM_WEIGHTS_BANNER

    line = f"model {winclip.config.model_name}, weights: {winclip.weights_label}"
    if winclip.random_weights:
        line += f"\n{'!' * 72}\n{RANDOM_WEIGHTS_BANNER}\n{'!' * 72}"
    return line


def pick_test_samples(data: Any, n_good: int = 1, n_per_defect: int = 1) -> list[Any]:
    """The first ``n_good`` good test samples, then the first ``n_per_defect`` of each defect.

    Args:
        data: a :class:`winclip_nb.data.ClassData`.
    """
    from ..data import GOOD

    picked = [s for s in data.test if s.defect == GOOD][:n_good]
    for defect in data.defect_types:
        picked += [s for s in data.test if s.defect == defect][:n_per_defect]
    return picked
