"""Helpers for the tutorial notebooks: set-up, reference mode, headless runs.

Every notebook calls :func:`setup` right after its ``parameters`` cell. Outside
reference mode it passes the parameters through (``weights="auto"``: pretrained when
cached or reachable, else random init with a visible banner). With the environment
variable ``WINCLIP_NB_REFERENCE=1`` it forces the deterministic *reference mode*:
offline, random weights, the synthetic dataset, CPU, fixed seeds and thread count.
The committed notebooks are executed in reference mode, so their stored outputs can
be compared exactly by ``pytest --nbval``.

:func:`run_notebooks` executes the series with papermill (``winclip-nb run-notebooks``);
``in_place=True, reference=True`` regenerates the committed notebooks and stamps each
with :func:`source_hash` of the package, which the tests compare with the sources.

Example:
    >>> env = setup(weights="random", device="cpu", data_root=None)  # doctest: +SKIP
    winclip_nb 0.1.0 | weights random | device cpu | data synthetic: disc, weave, washer | ...
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .config import DEFAULT_SEED
from .errors import ConfigError, DataError

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
#: Notebook files of the series: two digits, underscore, name.
NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"
#: Default folder for executed copies (``run_notebooks`` without ``in_place``).
DEFAULT_RUN_DIR = "executed_notebooks"
DEFAULT_KERNEL = "python3"
#: Notebook metadata key holding the source hash and run settings.
METADATA_KEY = "winclip_nb"
#: Cell metadata written by papermill / nbclient that changes on every run.
VOLATILE_CELL_METADATA = ("papermill", "execution", "ExecuteTime", "collapsed", "scrolled")
VOLATILE_NOTEBOOK_METADATA = ("papermill", "widgets")
#: Output types whose text may name local paths.
TEXT_MIME_TYPES = ("text/plain", "text/html", "text/markdown")
_TRUE = {"1", "true", "yes", "on"}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def reference_mode() -> bool:
    """True when ``WINCLIP_NB_REFERENCE`` is set to 1/true/yes/on."""
    return _env_flag(REFERENCE_ENV_VAR)


def headless() -> bool:
    """True when no notebook frontend can show widgets (reference mode or papermill runs)."""
    return reference_mode() or _env_flag(HEADLESS_ENV_VAR)


def work_dir(name: str) -> Path:
    """A folder for a notebook's output files, inside the package cache (created).

    ``$WINCLIP_NB_CACHE/notebooks/<name>``, else ``~/.cache/winclip_nb/notebooks/<name>``.
    """
    from .data import CACHE_ENV_VAR

    cache = os.environ.get(CACHE_ENV_VAR)
    base = Path(cache).expanduser() if cache else Path.home() / ".cache" / "winclip_nb"
    folder = base / "notebooks" / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _choose_class(root: Path, class_name: str | None) -> str:
    """``class_name`` if the dataset has it; a default synthetic name falls back to the first."""
    from .data import SYNTHETIC_CLASSES, list_mvtec_classes

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
    seed: int = DEFAULT_SEED,
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

    from .data import default_synthetic_root, is_synthetic_root, make_synthetic_mvtec

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
    from .results import RANDOM_WEIGHTS_BANNER

    line = f"model {winclip.config.model_name}, weights: {winclip.weights_label}"
    if winclip.random_weights:
        line += f"\n{'!' * 72}\n{RANDOM_WEIGHTS_BANNER}\n{'!' * 72}"
    return line


def pick_test_samples(data: Any, n_good: int = 1, n_per_defect: int = 1) -> list[Any]:
    """The first ``n_good`` good test samples, then the first ``n_per_defect`` of each defect.

    Args:
        data: a :class:`winclip_nb.data.ClassData`.
    """
    from .data import GOOD

    picked = [s for s in data.test if s.defect == GOOD][:n_good]
    for defect in data.defect_types:
        picked += [s for s in data.test if s.defect == defect][:n_per_defect]
    return picked


# --------------------------------------------------------------------- source hash
def source_hash(package_dir: str | os.PathLike | None = None) -> str:
    """SHA-256 over the package's ``.py`` files (sorted relative paths and contents).

    Line endings are normalised to ``\\n`` so a Windows checkout hashes the same. The
    committed notebooks store this in ``metadata["winclip_nb"]["source_hash"]``; a
    mismatch means they were executed with other package sources.
    """
    base = Path(package_dir) if package_dir is not None else Path(__file__).resolve().parent
    digest = hashlib.sha256()
    files = sorted(
        (p for p in base.rglob("*.py") if "__pycache__" not in p.parts),
        key=lambda p: p.relative_to(base).as_posix(),
    )
    for path in files:
        digest.update(path.relative_to(base).as_posix().encode("utf-8") + b"\0")
        digest.update(path.read_bytes().replace(b"\r\n", b"\n") + b"\0")
    return digest.hexdigest()


# ------------------------------------------------------------------ headless runs
def notebooks_dir() -> Path:
    """The ``notebooks/`` folder of the source checkout the package was installed from."""
    folder = Path(__file__).resolve().parent.parent / "notebooks"
    if not folder.is_dir():
        raise DataError(
            f"notebooks folder not found: {folder} (run from a source checkout, "
            "installed with `pip install -e .`)"
        )
    return folder


def select_notebooks(
    notebooks: Sequence[str | os.PathLike] | None = None, folder: Path | None = None
) -> list[Path]:
    """All notebooks of the series in order, or those named.

    Names may be numbers (``"3"``, ``"03"``), file names (``"03_coreset_memory.ipynb"``,
    with or without suffix) or paths.
    """
    folder = folder or notebooks_dir()
    available = sorted(folder.glob(NOTEBOOK_GLOB))
    if notebooks is None:
        return available
    chosen: list[Path] = []
    for item in notebooks:
        text = str(item)
        path = Path(text)
        if path.suffix == ".ipynb" and path.is_file() and path.parent != Path("."):
            matches = [path]
        elif text.isdigit():
            matches = [p for p in available if p.name[:2] == f"{int(text):02d}"]
        else:
            stem = path.name.removesuffix(".ipynb")
            matches = [p for p in available if p.stem == stem]
        if not matches:
            raise ConfigError(
                f"no notebook {text!r} in {folder}; "
                f"available: {', '.join(p.name for p in available)}"
            )
        chosen += [m for m in matches if m not in chosen]
    return chosen


@contextlib.contextmanager
def _environ(changes: Mapping[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _tags(cell: Any) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def _shorten_home_paths(nb: Any) -> None:
    """Write the home folder as ``~`` in stored text outputs (no user names in the repo)."""
    home = str(Path.home())
    if len(home) <= 1:
        return
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if "text" in output:
                output["text"] = output["text"].replace(home, "~")
            for mime in TEXT_MIME_TYPES:
                value = output.get("data", {}).get(mime)
                if isinstance(value, str):
                    output["data"][mime] = value.replace(home, "~")


def finalize_notebook(
    nb: Any,
    *,
    reference: bool,
    parameters: Mapping[str, Any] | None,
    in_place: bool,
    digest: str | None = None,
) -> Any:
    """Drop volatile metadata (papermill, timings, widget state), stamp the source hash.

    Paths under the home folder are written with ``~`` in the stored text outputs.
    ``digest``: the :func:`source_hash` the notebook ran with (default: the current one).

    In-place runs also drop any ``injected-parameters`` cell. Returns ``nb`` (changed).
    """
    for key in VOLATILE_NOTEBOOK_METADATA:
        nb.metadata.pop(key, None)
    if in_place:
        nb.cells = [c for c in nb.cells if "injected-parameters" not in _tags(c)]
    for cell in nb.cells:
        for key in VOLATILE_CELL_METADATA:
            cell.metadata.pop(key, None)
        if cell.metadata.get("tags") == []:
            del cell.metadata["tags"]
    _shorten_home_paths(nb)
    nb.metadata[METADATA_KEY] = {
        "source_hash": digest or source_hash(),
        "reference": bool(reference),
        "parameters": dict(parameters or {}),
    }
    return nb


def run_notebooks(
    output_dir: str | os.PathLike | None = None,
    parameters: dict[str, Any] | None = None,
    notebooks: Sequence[str | os.PathLike] | None = None,
    in_place: bool = False,
    reference: bool = False,
    kernel_name: str | None = None,
) -> list[tuple[Path, float]]:
    """Execute notebooks in order with papermill; print and return ``(path, seconds)``.

    Args:
        output_dir: where executed copies go (default ``executed_notebooks/``);
            not allowed with ``in_place``.
        parameters: papermill parameters for every notebook (names a notebook does not
            have are ignored by it); not allowed with ``in_place``.
        notebooks: names or numbers to run (default all, see :func:`select_notebooks`).
        in_place: overwrite the source notebooks (only after a successful run).
        reference: set ``WINCLIP_NB_REFERENCE=1`` for the kernels (deterministic outputs).
        kernel_name: Jupyter kernel (default ``python3`` of the current environment).

    Returns:
        ``[(written notebook path, seconds), ...]``. A failing notebook raises
        papermill's ``PapermillExecutionError``; its partial output is kept in
        ``output_dir`` (not written over the source in-place).
    """
    import nbformat
    import papermill

    if in_place and parameters:
        raise ConfigError(
            "in-place runs take no parameters (the committed notebooks must keep their "
            f"defaults), got {sorted(parameters)}"
        )
    if in_place and output_dir is not None:
        raise ConfigError("give either in_place=True or an output_dir, not both")
    paths = select_notebooks(notebooks)
    out_dir = None if in_place else Path(output_dir or DEFAULT_RUN_DIR)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    env_changes = {HEADLESS_ENV_VAR: "1"}
    if reference:
        env_changes |= {REFERENCE_ENV_VAR: "1", "HF_HUB_OFFLINE": "1", **REFERENCE_CPU_KERNELS}
    timings: list[tuple[Path, float]] = []
    with _environ(env_changes), tempfile.TemporaryDirectory(prefix="winclip_nb_run_") as tmp:
        for path in paths:
            executed = Path(tmp) / path.name
            dest = path if in_place else out_dir / path.name  # type: ignore[operator]
            digest = source_hash()  # what the kernel imports
            start = time.perf_counter()
            try:
                papermill.execute_notebook(
                    str(path),
                    str(executed),
                    parameters=dict(parameters or {}),
                    kernel_name=kernel_name or DEFAULT_KERNEL,
                    cwd=str(path.parent),
                    progress_bar=False,
                    log_output=False,
                )
            except Exception:
                failed_dir = out_dir or Path(DEFAULT_RUN_DIR)
                failed_copy = failed_dir / f"{path.stem}.failed.ipynb"
                if executed.is_file():
                    failed_dir.mkdir(parents=True, exist_ok=True)
                    executed.replace(failed_copy)
                    print(f"{path.name}: FAILED, partial output in {failed_copy}", file=sys.stderr)
                raise
            seconds = time.perf_counter() - start
            if source_hash() != digest:
                print(
                    f"{path.name}: winclip_nb sources changed during the run; run it again",
                    file=sys.stderr,
                )
            nb = nbformat.read(executed, as_version=4)
            finalize_notebook(
                nb, reference=reference, parameters=parameters, in_place=in_place, digest=digest
            )
            nbformat.write(nb, dest)
            timings.append((dest, seconds))
            print(f"{path.name:<36} {seconds:7.1f} s", flush=True)
    total = sum(s for _, s in timings)
    print(f"{len(timings)} notebook(s) in {total:.1f} s" + ("" if in_place else f" -> {out_dir}"))
    return timings


def parse_parameter_value(text: str) -> Any:
    """Papermill's ``-p`` typing: ``True``/``False``/``None``, int, float, else the string.

    Example:
        >>> [parse_parameter_value(v) for v in ("3", "0.5", "None", "True", "cuda")]
        [3, 0.5, None, True, 'cuda']
    """
    named = {"True": True, "False": False, "None": None}
    if text in named:
        return named[text]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def add_run_notebooks_arguments(parser: argparse.ArgumentParser) -> None:
    """``winclip-nb run-notebooks [--output-dir DIR] [-p NAME VALUE ...] [--in-place]
    [--reference] [--only NN ...] [--kernel NAME]``."""
    parser.add_argument(
        "--output-dir", default=None, help=f"folder for executed copies (default {DEFAULT_RUN_DIR})"
    )
    parser.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        metavar=("NAME", "VALUE"),
        default=[],
        help="papermill parameter for every notebook, e.g. -p device cuda (repeatable)",
    )
    parser.add_argument(
        "--in-place",
        action="store_true",
        help="overwrite the notebooks themselves (no parameters allowed; `make notebooks`)",
    )
    parser.add_argument(
        "--reference",
        action="store_true",
        help=f"reference mode ({REFERENCE_ENV_VAR}=1): offline, random weights, synthetic, CPU",
    )
    parser.add_argument(
        "--only", nargs="+", default=None, metavar="NN", help="run only these notebooks (numbers)"
    )
    parser.add_argument("--kernel", default=None, help=f"Jupyter kernel (default {DEFAULT_KERNEL})")


def run_notebooks_cli(args: argparse.Namespace) -> int:
    """Run :func:`run_notebooks` from parsed arguments; return the exit code (0)."""
    parameters = {name: parse_parameter_value(value) for name, value in args.parameter}
    run_notebooks(
        output_dir=args.output_dir,
        parameters=parameters or None,
        notebooks=args.only,
        in_place=args.in_place,
        reference=args.reference,
        kernel_name=args.kernel,
    )
    return 0


__all__ = [
    "HEADLESS_ENV_VAR",
    "REFERENCE_ENV_VAR",
    "add_run_notebooks_arguments",
    "banner",
    "compact_inline_figures",
    "finalize_notebook",
    "headless",
    "notebooks_dir",
    "parse_parameter_value",
    "pick_test_samples",
    "reference_mode",
    "run_notebooks",
    "run_notebooks_cli",
    "select_notebooks",
    "setup",
    "source_hash",
    "weights_banner",
    "work_dir",
]
