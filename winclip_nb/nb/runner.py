"""Running the notebooks headless: ``winclip-nb run-notebooks`` (papermill) and the source
hash that ties the committed notebooks to the package sources they ran with.

:func:`run_notebooks` executes the series with papermill; ``in_place=True,
reference=True`` regenerates the committed notebooks (``make notebooks``) and stamps each
with :func:`source_hash` of the package, which the tests compare with the sources.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError, DataError, WinCLIPError
from .helpers import HEADLESS_ENV_VAR, REFERENCE_CPU_KERNELS, REFERENCE_ENV_VAR

#: Notebook files of the series: two digits, underscore, name.
NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"

#: Default folder for executed copies (``run_notebooks`` without ``in_place``).
DEFAULT_RUN_DIR = "executed_notebooks"

DEFAULT_KERNEL = "python3"

#: Seconds one cell may run before the notebook fails (``--timeout``). Generous: notebook
#: 06 on the full MVTec-AD runs the whole benchmark in one cell.
DEFAULT_CELL_TIMEOUT_S = 3600


class NotebookError(WinCLIPError):
    """A notebook failed or a cell ran over its timeout (names the notebook and cell)."""

#: Notebook metadata key holding the source hash and run settings.
METADATA_KEY = "winclip_nb"

#: Cell metadata written by papermill / nbclient that changes on every run.
VOLATILE_CELL_METADATA = ("papermill", "execution", "ExecuteTime", "collapsed", "scrolled")

VOLATILE_NOTEBOOK_METADATA = ("papermill", "widgets")

#: Output types whose text may name local paths.
TEXT_MIME_TYPES = ("text/plain", "text/html", "text/markdown")


# --------------------------------------------------------------------- source hash
def source_hash(package_dir: str | os.PathLike | None = None) -> str:
    """SHA-256 over the package's ``.py`` files (sorted relative paths and contents).

    Line endings are normalised to ``\\n`` so a Windows checkout hashes the same. The
    committed notebooks store this in ``metadata["winclip_nb"]["source_hash"]``; a
    mismatch means they were executed with other package sources.
    """
    base = Path(package_dir) if package_dir is not None else Path(__file__).resolve().parents[1]
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
def _running_cell(cells: Sequence[Any]) -> int | None:
    """Index of the cell a run stopped in: the one papermill marks as running, else the
    last one it started (a timed-out cell is interrupted and marked completed)."""
    started = None
    for index, cell in enumerate(cells):
        meta = cell.get("metadata", {}).get("papermill", {})
        if meta.get("status") == "running":
            return index
        if meta.get("start_time"):
            started = index
    return started


def _failed_cell(nb: Any) -> str:
    """``code cell 3 ('from ...')``: where an executed notebook stopped, counted among the
    notebook's own code cells (papermill's injected parameters left out), with its first
    line. The cell with an unexpected error output, else the cell that was running."""
    cells = [c for c in nb.cells if c.cell_type == "code" and "injected-parameters" not in _tags(c)]
    index = next(
        (
            i for i, c in enumerate(cells)
            if "raises-exception" not in _tags(c)
            and any(o.get("output_type") == "error" for o in c.get("outputs", []))
        ),
        None,
    )  # fmt: skip
    if index is None:
        index = _running_cell(cells)
    if index is None:
        return "a cell"
    first = next((line for line in cells[index].source.splitlines() if line.strip()), "")
    first = first if len(first) <= 60 else first[:57] + "..."
    return f"code cell {index + 1} ({first!r})"


def notebook_error(
    name: str, exc: BaseException, executed: Path | None, timeout: float
) -> NotebookError:
    """One :class:`NotebookError` for a failed papermill run: which notebook, which cell,
    and why (the cell's exception, or the per-cell timeout)."""
    import nbformat

    where = "a cell"
    if executed is not None and executed.is_file():
        with contextlib.suppress(Exception):
            where = _failed_cell(nbformat.read(executed, as_version=4))
    if isinstance(exc, TimeoutError):  # nbclient's CellTimeoutError
        return NotebookError(
            f"{name}: {where} ran longer than the per-cell timeout of {timeout:g} s "
            "(raise it with --timeout)"
        )
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    reason = f"{ename}: {evalue}" if ename else f"{type(exc).__name__}: {exc}"
    return NotebookError(f"{name}: {where} failed: {' '.join(str(reason).split())}")



def notebooks_dir() -> Path:
    """The ``notebooks/`` folder of the source checkout the package was installed from."""
    folder = Path(__file__).resolve().parents[2] / "notebooks"
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
    timeout: float = DEFAULT_CELL_TIMEOUT_S,
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
        timeout: seconds one cell may run (papermill's ``execution_timeout``).

    Returns:
        ``[(written notebook path, seconds), ...]``. A failing notebook, or a cell over
        ``timeout``, raises :class:`NotebookError` naming the notebook and the cell; its
        partial output is kept in ``output_dir`` (never written over the source).
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
    if not timeout or timeout <= 0:
        raise ConfigError(f"timeout={timeout!r} must be a number of seconds > 0")
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
                    execution_timeout=timeout,
                )
            except Exception as exc:
                error = notebook_error(path.name, exc, executed, timeout)
                failed_dir = out_dir or Path(DEFAULT_RUN_DIR)
                failed_copy = failed_dir / f"{path.stem}.failed.ipynb"
                if executed.is_file():
                    failed_dir.mkdir(parents=True, exist_ok=True)
                    executed.replace(failed_copy)
                    print(f"{path.name}: FAILED, partial output in {failed_copy}", file=sys.stderr)
                raise error from exc
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
    [--reference] [--only NN ...] [--kernel NAME] [--timeout S]``."""
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
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_CELL_TIMEOUT_S,
        metavar="S",
        help="seconds one cell may run before the notebook fails "
        f"(default {DEFAULT_CELL_TIMEOUT_S})",
    )


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
        timeout=args.timeout,
    )
    return 0
