"""Notebooks 00 and 04 in a real JupyterLab, driven by chromium through Playwright.

A JupyterLab server is started from the Python running the tests, on 127.0.0.1 with a
token, serving a temporary copy of ``notebooks/`` (the committed notebooks are never
written). Its environment has ``WINCLIP_NB_REFERENCE`` and ``WINCLIP_NB_HEADLESS``
removed, so the notebooks run as in a user's JupyterLab (``weights="auto"``, which falls
back to random init offline) and the explorer of notebook 04 shows its ipywidgets
controls; ``HF_HUB_OFFLINE=1`` and ``CUDA_VISIBLE_DEVICES=`` keep it offline on CPU.

Each notebook has its outputs cleared and is run with "Run All Cells"; the test waits
until the run finished and the kernel is idle, then checks that every code cell ran and
that no cell has an error output. In notebook 04 it checks that the explorer is live
widgets (sliders, dropdowns, an Output with a figure), not the static fallback figure,
and that moving the sigma slider and picking another image redraw the figure.

Screenshots go to ``$WINCLIP_NB_SCREENSHOTS`` if set, else to a pytest temporary
folder; the folder is printed in the test output. Skips without the ``playwright``
package or a chromium executable (``$WINCLIP_NB_CHROMIUM``, else ``chromium`` on PATH).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sync_api = pytest.importorskip(
    "playwright.sync_api",
    reason="browser test needs the playwright package (pip install -e '.[dev]')",
)

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO / "notebooks"
CHROMIUM_ENV_VAR = "WINCLIP_NB_CHROMIUM"
SCREENSHOT_ENV_VAR = "WINCLIP_NB_SCREENSHOTS"
#: Removed from the server's environment: with them the explorer draws a static figure.
HEADLESS_VARS = ("WINCLIP_NB_REFERENCE", "WINCLIP_NB_HEADLESS")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Seconds (all waits are bounded so that a hang fails the test).
SERVER_START_S = 120
SERVER_STOP_S = 20
PAGE_LOAD_S = 120
KERNEL_START_S = 120
NOTEBOOK_RUN_S = {"00_quickstart.ipynb": 300, "04_fusion_foreground_mad.ipynb": 420}
REDRAW_S = 120
VIEWPORT = {"width": 1400, "height": 900}
MAX_SCREENSHOT_HEIGHT = 20000
#: JupyterLab user settings for the test server: every cell attached to the DOM (so the
#: whole notebook can be inspected and photographed), no news or update checks.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}


def _chromium() -> str | None:
    return os.environ.get(CHROMIUM_ENV_VAR) or shutil.which("chromium")


CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or not Path(CHROMIUM).is_file(),
    reason="browser test needs chromium: apt-get install chromium, or set "
    f"${CHROMIUM_ENV_VAR}" + (f" ({CHROMIUM} does not exist)" if CHROMIUM else ""),
)


def _say(config: pytest.Config, text: str) -> None:
    """A line in pytest's terminal output, shown without ``-s``."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print(text)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(text)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _server_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in HEADLESS_VARS}
    env["HF_HUB_OFFLINE"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""
    # the kernel imports winclip_nb from this checkout
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for name, folder in (
        ("JUPYTER_CONFIG_DIR", "config"),
        ("JUPYTER_DATA_DIR", "data"),
        ("JUPYTER_RUNTIME_DIR", "runtime"),
        ("JUPYTERLAB_SETTINGS_DIR", "settings"),
        ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"),
    ):
        (tmp / folder).mkdir(parents=True, exist_ok=True)
        env[name] = str(tmp / folder)
    for relative, settings in LAB_SETTINGS.items():
        path = tmp / "settings" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings))
    return env


class LabServer:
    """A JupyterLab process serving ``root`` on 127.0.0.1:``port`` with ``token``."""

    def __init__(self, root: Path, tmp: Path) -> None:
        self.root = root
        self.port = _free_port()
        self.token = secrets.token_hex(16)
        self.log_path = tmp / "jupyterlab.log"
        self._log = self.log_path.open("wb")
        command = [
            sys.executable,
            "-m",
            "jupyter",
            "lab",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={root}",
            "--allow-root",  # CI runs as root; the server only listens on 127.0.0.1
            "--LabApp.expose_app_in_browser=True",
            "--LabApp.extension_manager=readonly",
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ]
        self.process = subprocess.Popen(
            command,
            cwd=root,
            env=_server_env(tmp),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, path: str, method: str = "GET", timeout: float = 10.0) -> object:
        request = urllib.request.Request(
            f"{self.base_url}{path}",
            method=method,
            headers={"Authorization": f"token {self.token}"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
        return json.loads(body) if body else None

    def log_tail(self, n: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def wait_ready(self, timeout: float = SERVER_START_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"JupyterLab exited early:\n{self.log_tail()}")
            try:
                self.api("/api/status", timeout=2.0)
                return
            except (OSError, urllib.error.URLError):
                time.sleep(0.5)
        raise TimeoutError(f"JupyterLab not ready after {timeout} s:\n{self.log_tail()}")

    def shutdown_kernels(self) -> None:
        """Stop every kernel (frees the CPU and memory for the next notebook)."""
        try:
            for kernel in self.api("/api/kernels"):  # type: ignore[union-attr]
                self.api(f"/api/kernels/{kernel['id']}", method="DELETE", timeout=30.0)
        except (OSError, urllib.error.URLError, ValueError):
            pass

    def stop(self) -> None:
        try:
            if self.process.poll() is None:
                self.shutdown_kernels()
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(SERVER_STOP_S)
                except subprocess.TimeoutExpired:
                    os.killpg(self.process.pid, signal.SIGKILL)  # its own session only
                    self.process.wait(SERVER_STOP_S)
        finally:
            self._log.close()


@pytest.fixture(scope="module")
def screenshot_dir(request, tmp_path_factory) -> Path:
    given = os.environ.get(SCREENSHOT_ENV_VAR)
    folder = Path(given).expanduser() if given else tmp_path_factory.mktemp("browser_screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    _say(request.config, f"\nbrowser test screenshots: {folder.resolve()}")
    return folder


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("jupyterlab")
    root = tmp / "notebooks"
    shutil.copytree(NOTEBOOK_DIR, root)
    server = LabServer(root, tmp)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        instance = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield instance
        finally:
            instance.close()


@pytest.fixture
def page(browser, lab):
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(PAGE_LOAD_S * 1000)
    page = context.new_page()
    try:
        yield page
    finally:
        context.close()
        lab.shutdown_kernels()


# JavaScript run in the page; `window.jupyterapp` is exposed by the server option above.
PANEL_JS = "window.jupyterapp.shell.currentWidget"
KERNEL_IDLE_JS = f"""() => {{
    const panel = {PANEL_JS};
    const kernel = panel && panel.sessionContext && panel.sessionContext.session
        && panel.sessionContext.session.kernel;
    return !!kernel && kernel.status === 'idle';
}}"""
RUN_ALL_JS = """async () => {
    const commands = window.jupyterapp.commands;
    await commands.execute('notebook:clear-all-cell-outputs');
    window.__run = {done: false};
    commands.execute('notebook:run-all-cells').then(
        (result) => { window.__run = {done: true, result: String(result)}; },
        (error) => { window.__run = {done: true, error: String(error)}; });
}"""
CELLS_JS = f"""() => {{
    const panel = {PANEL_JS};
    return panel.content.widgets
        .filter((cell) => cell.model.type === 'code')
        .map((cell) => ({{
            source: cell.model.sharedModel.getSource().slice(0, 80),
            execution_count: cell.model.executionCount,
            outputs: cell.model.outputs.toJSON(),
        }}));
}}"""


def _open_notebook(page, lab: LabServer, name: str) -> None:
    page.goto(f"{lab.base_url}/lab/tree/{name}?token={lab.token}")
    page.wait_for_function(
        f"""() => window.jupyterapp && {PANEL_JS} && {PANEL_JS}.context
            && {PANEL_JS}.context.path.endsWith({json.dumps(name)})""",
        timeout=PAGE_LOAD_S * 1000,
    )
    page.wait_for_function(KERNEL_IDLE_JS, timeout=KERNEL_START_S * 1000)


def _run_all(page, lab: LabServer, name: str) -> list[dict]:
    """Clear outputs, Run All Cells, wait for the end and an idle kernel; the code cells."""
    page.evaluate(RUN_ALL_JS)
    timeout = NOTEBOOK_RUN_S[name]
    try:
        page.wait_for_function(
            f"() => window.__run.done && ({KERNEL_IDLE_JS})()", timeout=timeout * 1000
        )
    except sync_api.TimeoutError:
        pytest.fail(f"{name}: run did not finish within {timeout} s\n{lab.log_tail()}")
    run = page.evaluate("window.__run")
    assert "error" not in run, f"{name}: Run All Cells failed: {run}"
    return page.evaluate(CELLS_JS)


def _errors(cells: list[dict]) -> list[str]:
    found = []
    for i, cell in enumerate(cells):
        for output in cell["outputs"]:
            if output.get("output_type") == "error":
                found.append(
                    f"code cell {i} ({cell['source']!r}): {output.get('ename')}: "
                    f"{output.get('evalue')}"
                )
    return found


#: The notebook's DOM nodes; its scrolling element is the one with the most hidden height.
NODES_JS = f"[{PANEL_JS}.content.node, ...{PANEL_JS}.content.node.querySelectorAll('*')]"
HIDDEN_HEIGHT_JS = f"""() => Math.max(...{NODES_JS}.map((n) => n.scrollHeight - n.clientHeight))"""
SCROLL_TOP_JS = f"() => {NODES_JS}.forEach((n) => {{ n.scrollTop = 0; }})"


def _full_page_screenshot(page, path: Path) -> None:
    """The whole notebook: the window is made as tall as the notebook for the shot."""
    page.evaluate("window.jupyterapp.shell.collapseLeft()")
    hidden = int(page.evaluate(HIDDEN_HEIGHT_JS))
    height = min(VIEWPORT["height"] + hidden, MAX_SCREENSHOT_HEIGHT)
    page.set_viewport_size({"width": VIEWPORT["width"], "height": height})
    try:
        page.wait_for_timeout(1000)  # relayout
        page.evaluate(SCROLL_TOP_JS)
        page.wait_for_timeout(500)
        page.screenshot(path=str(path), full_page=True)
    finally:
        page.set_viewport_size(VIEWPORT)
        page.evaluate("window.jupyterapp.shell.expandLeft()")


def _check_notebook(page, lab: LabServer, name: str, screenshot_dir: Path) -> list[dict]:
    _open_notebook(page, lab, name)
    cells = _run_all(page, lab, name)
    _full_page_screenshot(page, screenshot_dir / f"{Path(name).stem}.png")
    assert cells, f"{name}: no code cells found"
    assert not _errors(cells), f"{name}: cells with errors:\n" + "\n".join(_errors(cells))
    not_run = [i for i, cell in enumerate(cells) if cell["execution_count"] is None]
    assert not not_run, f"{name}: code cells that did not run: {not_run}"
    return cells


def test_quickstart_runs_in_jupyterlab(page, lab, screenshot_dir):
    cells = _check_notebook(page, lab, "00_quickstart.ipynb", screenshot_dir)
    text = json.dumps([cell["outputs"] for cell in cells])
    assert "image/png" in text, "00_quickstart: no figure in the outputs"
    assert page.locator(".jp-OutputArea-output img").count() >= 1
    # The pipeline diagram (a Mermaid block in markdown) renders as a drawing, not as code.
    diagram = page.locator(".jp-RenderedMermaid").first
    diagram.wait_for(state="attached", timeout=60_000)
    assert diagram.locator("svg, img").count() >= 1, diagram.inner_html()[:500]


EXPLORER = ".jp-OutputArea-output .widget-vbox"
EXPLORER_IMAGE = f"{EXPLORER} .widget-output img"


def _explorer_image(page) -> str:
    return page.locator(EXPLORER_IMAGE).first.get_attribute("src") or ""


def _wait_redraw(page, before: str, what: str) -> str:
    try:
        page.wait_for_function(
            """([selector, before]) => {
                const img = document.querySelector(selector);
                return !!img && !!img.getAttribute('src') && img.getAttribute('src') !== before;
            }""",
            arg=[EXPLORER_IMAGE, before],
            timeout=REDRAW_S * 1000,
        )
    except sync_api.TimeoutError:
        pytest.fail(f"explorer figure did not change within {REDRAW_S} s after {what}")
    page.wait_for_function(KERNEL_IDLE_JS, timeout=REDRAW_S * 1000)
    return _explorer_image(page)


def test_fusion_explorer_is_live_in_jupyterlab(page, lab, screenshot_dir):
    cells = _check_notebook(page, lab, "04_fusion_foreground_mad.ipynb", screenshot_dir)

    # the explorer cell displays a widget view, not the static figure
    last = cells[-1]
    mimes = [m for output in last["outputs"] for m in output.get("data", {})]
    assert "application/vnd.jupyter.widget-view+json" in mimes, (
        f"explorer cell shows {mimes}, not a widget (static fallback?)"
    )
    explorer = page.locator(EXPLORER).first
    explorer.scroll_into_view_if_needed()
    assert explorer.locator(".widget-slider").count() == 3, "expected 3 sliders"
    assert explorer.locator(".widget-dropdown select").count() == 2, "expected 2 dropdowns"
    assert explorer.locator(".widget-toggle-buttons").count() == 1
    assert explorer.locator(".widget-output img").count() == 1, "no figure in the Output"
    explorer.screenshot(path=str(screenshot_dir / "04_explorer_before.png"))
    first = _explorer_image(page)
    assert first.startswith("data:image/"), first[:40]

    # move the sigma slider with the mouse (continuous_update=False: redraw on release)
    sigma = explorer.locator(".widget-slider").filter(has_text="sigma")
    readout = sigma.locator(".widget-readout")
    sigma_before = readout.inner_text().strip()
    handle = sigma.locator(".noUi-handle").first
    track = sigma.locator(".noUi-target").first
    box, track_box = handle.bounding_box(), track.bounding_box()
    assert box and track_box
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(
        track_box["x"] + 0.9 * track_box["width"], box["y"] + box["height"] / 2, steps=10
    )
    page.mouse.up()
    after_slider = _wait_redraw(page, first, "moving the sigma slider")
    assert readout.inner_text().strip() != sigma_before
    explorer.screenshot(path=str(screenshot_dir / "04_explorer_sigma.png"))

    # pick another image in the image dropdown
    images = explorer.locator(".widget-dropdown").filter(has_text="image").locator("select")
    current = images.input_value()
    options = images.locator("option").evaluate_all("(opts) => opts.map((o) => o.value)")
    other = next(value for value in options if value != current)
    images.select_option(other)
    after_image = _wait_redraw(page, after_slider, "picking another image")
    assert after_image not in (first, after_slider)
    explorer.screenshot(path=str(screenshot_dir / "04_explorer_image.png"))

    cells = page.evaluate(CELLS_JS)
    assert not _errors(cells), "errors after changing the explorer:\n" + "\n".join(_errors(cells))
