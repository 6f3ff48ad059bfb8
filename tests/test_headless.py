"""Every notebook under plain papermill, the README's command line, with the CPU loaded.

No ``WINCLIP_NB_*`` variable is set (not reference mode, not headless by flag): the
notebooks must tell by themselves that no person can use a widget, and draw static
figures. Widgets under papermill race with nbclient and can leave a run waiting forever
(jupyter/nbclient#312), and a single run cannot show a race absent, so notebook 04 (the
widget explorer) runs several times. One busy-looping process runs beside them, as on a
shared machine. Each cell has a timeout, and each run a hard wall-clock limit, so a hang
fails the test instead of stalling CI.

Marked ``headless``: ``make test-headless`` runs it (``.ci/run`` after ``make test``);
``make test`` leaves it out.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
#: papermill's per-cell timeout and each run's wall-clock limit, in seconds.
CELL_TIMEOUT_S = 240
RUN_LIMIT_S = 420
#: Runs of the widget notebook under load.
EXPLORER_RUNS = 5
#: The README's papermill examples: the parameters each line passes (06's data_root and
#: device, which need MVTec-AD and a GPU, left out).
README_PARAMETERS = {
    "00_quickstart": ["-p", "defect", "hole", "-p", "n_train", "6"],
    "01_token_extraction": ["-y", "layers: [6, 9, 11]"],
    "04_fusion_foreground_mad": ["-p", "sigma", "6.0"],
    "08_winclip_plus": ["-p", "image_size", "112"],
}
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"

pytestmark = pytest.mark.headless


def plain_environment() -> dict[str, str]:
    """This environment without any WINCLIP_NB_* variable, offline (no weights here)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WINCLIP_NB_")}
    env["HF_HUB_OFFLINE"] = "1"
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


@pytest.fixture(scope="module", autouse=True)
def cpu_load():
    """One process that keeps a core busy for the whole module."""
    load = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    yield
    load.kill()
    load.wait()


def run_papermill(name: str, out: Path) -> tuple[nbformat.NotebookNode, float]:
    """``papermill notebooks/NAME.ipynb OUT --cwd notebooks`` (+ the README's parameters)."""
    command = [
        sys.executable, "-m", "papermill", str(NOTEBOOKS / f"{name}.ipynb"), str(out),
        "--cwd", str(NOTEBOOKS), "--execution-timeout", str(CELL_TIMEOUT_S),
        "--no-progress-bar", *README_PARAMETERS.get(name, []),
    ]  # fmt: skip
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, env=plain_environment(), capture_output=True, text=True, timeout=RUN_LIMIT_S
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name} under papermill did not finish in {RUN_LIMIT_S} s (hung)")
    seconds = time.perf_counter() - start
    assert done.returncode == 0, f"{name} failed under papermill:\n{done.stderr[-3000:]}"
    return nbformat.read(out, as_version=4), seconds


def mime_types(nb: nbformat.NotebookNode) -> set[str]:
    return {
        mime
        for cell in nb.cells
        for output in cell.get("outputs", [])
        for mime in output.get("data", {})
    }


@pytest.mark.parametrize(
    "name", sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb") if p.stem[:2] != "04")
)
def test_notebook_runs_under_plain_papermill(name: str, tmp_path: Path) -> None:
    nb, seconds = run_papermill(name, tmp_path / f"{name}.ipynb")
    assert WIDGET_MIME not in mime_types(nb)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    print(f"{name}: {seconds:.1f} s")


@pytest.mark.parametrize("run", range(1, EXPLORER_RUNS + 1))
def test_explorer_notebook_never_hangs_and_draws_a_static_figure(run: int, tmp_path: Path) -> None:
    name = "04_fusion_foreground_mad"
    nb, seconds = run_papermill(name, tmp_path / f"{name}.ipynb")
    explorer_cell = next(c for c in nb.cells if c.cell_type == "code" and "explorer(" in c.source)
    shown = {mime for o in explorer_cell.outputs for mime in o.get("data", {})}
    assert WIDGET_MIME not in shown and "image/png" in shown, shown
    print(f"{name} run {run}: {seconds:.1f} s")
