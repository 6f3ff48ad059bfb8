"""The committed notebooks (executed, parameterised, up to date) and their helpers.

The notebooks themselves are executed and compared by ``pytest --nbval notebooks/``;
these tests only read them, so they stay fast.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

import winclip_nb
from winclip_nb.core.errors import ConfigError, DataError
from winclip_nb.core.maps import find_hotspots
from winclip_nb.nb import helpers, runner
from winclip_nb.nb.runner import (
    finalize_notebook,
    parse_parameter_value,
    select_notebooks,
    source_hash,
)
from winclip_nb.nb.widgets import Explorer, explorer, has_frontend

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
EXPECTED = [
    "00_quickstart.ipynb",
    "01_token_extraction.ipynb",
    "02_text_anchors.ipynb",
    "03_coreset_memory.ipynb",
    "04_fusion_foreground_mad.ipynb",
    "05_llava_explanations.ipynb",
    "06_mvtec_benchmark.ipynb",
    "07_winclip_windows.ipynb",
    "08_winclip_plus.ipynb",
    "09_beyond_winclip.ipynb",
]
REGENERATE = "regenerate with `make notebooks`"
#: The one notebook that needs no model (no weights, device or data parameters).
MODEL_FREE = "07_winclip_windows.ipynb"
NBVAL_MARKERS = {
    "NBVAL_IGNORE_OUTPUT",
    "NBVAL_SKIP",
    "NBVAL_RAISES_EXCEPTION",
    "NBVAL_CHECK_OUTPUT",
}


def _read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK_DIR / name, as_version=4)


def _code_cells(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [c for c in nb.cells if c.cell_type == "code"]


def _tags(cell: nbformat.NotebookNode) -> list[str]:
    return list(cell.metadata.get("tags", []))


# ------------------------------------------------------------------ committed notebooks
def test_series_is_complete() -> None:
    assert [p.name for p in select_notebooks(folder=NOTEBOOK_DIR)] == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_is_executed(name: str) -> None:
    nb = _read(name)
    unexecuted = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
                  and c.get("execution_count") is None]  # fmt: skip
    assert not unexecuted, f"{name}: code cells {unexecuted} were never executed; {REGENERATE}"
    counts = [c.execution_count for c in _code_cells(nb)]
    assert counts == list(range(1, len(counts) + 1)), f"{name}: not run top to bottom; {REGENERATE}"
    errors = [o for c in _code_cells(nb) for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{name}: stored outputs contain an error; {REGENERATE}"


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_has_one_parameters_cell(name: str) -> None:
    nb = _read(name)
    tagged = [c for c in nb.cells if "parameters" in _tags(c)]
    assert len(tagged) == 1, f"{name}: needs exactly one cell tagged 'parameters'"
    assert tagged[0].cell_type == "code"
    assert not any("injected-parameters" in _tags(c) for c in nb.cells), (
        f"{name}: holds papermill's injected-parameters cell; {REGENERATE}"
    )
    source = tagged[0].source
    if name == MODEL_FREE:  # windows and harmonic aggregation only: no model, no data
        assert "seed = " in source and "weights = " not in source
        return
    for name_ in ("weights", "device", "data_root"):
        assert f"{name_} = " in source, f"{name}: parameter {name_!r} missing"


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_matches_package_sources(name: str) -> None:
    meta = _read(name).metadata
    assert "papermill" not in meta, f"{name}: volatile papermill metadata stored; {REGENERATE}"
    stored = meta.get("winclip_nb", {})
    assert stored.get("reference") is True, f"{name}: not executed in reference mode; {REGENERATE}"
    assert stored.get("source_hash") == source_hash(), (
        f"{name} was executed with other winclip_nb sources than the current ones; {REGENERATE}"
    )


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_outputs_hold_no_home_folder(name: str) -> None:
    home = str(Path.home())
    if len(home) <= 1:
        pytest.skip("home folder is /")
    text = json.dumps([c.get("outputs", []) for c in _read(name).cells])
    assert home not in text, f"{name}: outputs name {home}; {REGENERATE}"


@pytest.mark.parametrize("name", EXPECTED)
def test_nbval_markers_are_recognised(name: str) -> None:
    # nbval only honours a marker that is a whole comment line, e.g. "# NBVAL_IGNORE_OUTPUT".
    for cell in _code_cells(_read(name)):
        for line in cell.source.splitlines():
            if "NBVAL_" in line:
                assert line.strip().lstrip("#").strip() in NBVAL_MARKERS, (
                    f"{name}: {line.strip()!r} is not a marker nbval recognises"
                )


# ------------------------------------------------------------------------ source hash
def _write(folder: Path, files: dict[str, bytes]) -> Path:
    for rel, content in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return folder


def test_source_hash_by_hand(tmp_path: Path) -> None:
    _write(tmp_path, {"a.py": b"x = 1\n"})
    expected = hashlib.sha256(b"a.py\0x = 1\n\0").hexdigest()
    assert source_hash(tmp_path) == expected


def test_source_hash_tracks_python_sources_only(tmp_path: Path) -> None:
    base = _write(tmp_path / "pkg", {"a.py": b"x = 1\n", "sub/b.py": b"y = 2\n"})
    reference = source_hash(base)
    assert len(reference) == 64
    # Not counted: other files and caches.
    _write(base, {"README.md": b"text", "__pycache__/a.cpython-311.py": b"junk"})
    assert source_hash(base) == reference
    # Same content, other creation order and CRLF line endings: same hash.
    other = _write(tmp_path / "other", {"sub/b.py": b"y = 2\r\n", "a.py": b"x = 1\r\n"})
    assert source_hash(other) == reference
    # Any change of content or of a file name changes it.
    _write(base, {"sub/b.py": b"y = 3\n"})
    assert source_hash(base) != reference
    _write(base, {"sub/b.py": b"y = 2\n"})
    assert source_hash(base) == reference
    (base / "sub" / "b.py").rename(base / "sub" / "c.py")
    assert source_hash(base) != reference


def test_source_hash_default_is_the_package() -> None:
    package = Path(winclip_nb.__file__).resolve().parent
    assert source_hash() == source_hash(package)


# ------------------------------------------------------------------ runner helpers
def test_select_notebooks_by_number_and_name() -> None:
    picked = select_notebooks(["3", "00", "04_fusion_foreground_mad"], folder=NOTEBOOK_DIR)
    assert [p.name for p in picked] == [EXPECTED[3], EXPECTED[0], EXPECTED[4]]
    with pytest.raises(ConfigError, match="no notebook '17'"):
        select_notebooks(["17"], folder=NOTEBOOK_DIR)


def test_parse_parameter_value() -> None:
    values = ["3", "-2", "0.5", "None", "True", "False", "cuda", "/data/mvtec", "1e-3"]
    assert [parse_parameter_value(v) for v in values] == [
        3, -2, 0.5, None, True, False, "cuda", "/data/mvtec", 0.001,
    ]  # fmt: skip


def test_run_notebooks_refuses_parameters_in_place() -> None:
    with pytest.raises(ConfigError, match="in-place runs take no parameters"):
        runner.run_notebooks(in_place=True, parameters={"device": "cuda"})
    with pytest.raises(ConfigError, match="not both"):
        runner.run_notebooks(in_place=True, output_dir="somewhere")


def test_cli_arguments_reach_run_notebooks(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}
    monkeypatch.setattr(runner, "run_notebooks", lambda **kwargs: seen.update(kwargs) or [])
    parser = argparse.ArgumentParser()
    runner.add_run_notebooks_arguments(parser)
    args = parser.parse_args(["-p", "device", "cuda", "-p", "n_train", "4", "--only", "0", "6"])
    assert runner.run_notebooks_cli(args) == 0
    assert seen["parameters"] == {"device": "cuda", "n_train": 4}
    assert seen["notebooks"] == ["0", "6"] and not seen["in_place"] and not seen["reference"]
    assert seen["timeout"] == runner.DEFAULT_CELL_TIMEOUT_S
    args = parser.parse_args(["--timeout", "90"])
    runner.run_notebooks_cli(args)
    assert seen["timeout"] == 90


def test_finalize_notebook_removes_volatile_parts() -> None:
    home = str(Path.home())
    nb = nbformat.v4.new_notebook()
    nb.metadata["papermill"] = {"input_path": "x", "start_time": "2024"}
    params = nbformat.v4.new_code_cell("a = 1", metadata={"tags": ["parameters"]})
    injected = nbformat.v4.new_code_cell("a = 2", metadata={"tags": ["injected-parameters"]})
    body = nbformat.v4.new_code_cell(
        "print(path)",
        metadata={"papermill": {"duration": 1.0}, "execution": {"iopub.status.idle": "t"},
                  "tags": []},
        outputs=[nbformat.v4.new_output("stream", name="stdout", text=f"{home}/data/x.png\n")],
    )  # fmt: skip
    nb.cells = [params, injected, body]
    finalize_notebook(nb, reference=True, parameters=None, in_place=True)
    assert "papermill" not in nb.metadata
    assert nb.metadata["winclip_nb"] == {
        "source_hash": source_hash(),
        "reference": True,
        "parameters": {},
    }
    assert [c.source for c in nb.cells] == ["a = 1", "print(path)"]
    assert dict(nb.cells[1].metadata) == {}
    if len(home) > 1:
        assert nb.cells[1].outputs[0]["text"] == "~/data/x.png\n"


# ------------------------------------------------------------------------------ setup
def test_setup_reference_mode_overrides(
    monkeypatch: pytest.MonkeyPatch, synthetic_root: Path, capsys: pytest.CaptureFixture
) -> None:
    import winclip_nb.data as data

    monkeypatch.setenv(helpers.REFERENCE_ENV_VAR, "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in helpers.REFERENCE_CPU_KERNELS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(data, "default_synthetic_root", lambda: synthetic_root)
    monkeypatch.setattr(data, "make_synthetic_mvtec", lambda root: Path(root))
    threads = torch.get_num_threads()
    try:
        env = helpers.setup(weights="openai", device="cuda", data_root="/no/such/folder", seed=3)
    finally:
        torch.set_num_threads(threads)
    assert env["reference"] is True
    assert (env["weights"], env["device"], env["data_root"]) == ("random", "cpu", synthetic_root)
    assert env["synthetic"] is True and env["class_name"] == "disc" and env["seed"] == 3
    assert env["threads"] == helpers.REFERENCE_THREADS
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    kernels = helpers.REFERENCE_CPU_KERNELS
    assert {k: os.environ[k] for k in kernels} == kernels
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "REFERENCE MODE" in printed[0] and "seed 3" in printed[0]


def test_compact_inline_figures_needs_a_kernel() -> None:
    assert helpers.compact_inline_figures() is False  # plain pytest process: nothing to configure


def test_setup_checks_data_root_and_class(
    monkeypatch: pytest.MonkeyPatch, synthetic_root: Path, tmp_path: Path
) -> None:
    monkeypatch.delenv(helpers.REFERENCE_ENV_VAR, raising=False)
    with pytest.raises(DataError, match="not a folder"):
        helpers.setup(data_root=tmp_path / "missing", verbose=False)
    env = helpers.setup(data_root=synthetic_root, class_name="weave", verbose=False)
    assert env["class_name"] == "weave" and env["weights"] == "auto"
    with pytest.raises(DataError, match="class 'bottle' not found"):
        helpers.setup(data_root=synthetic_root, class_name="bottle", verbose=False)


# ---------------------------------------------------------------------------- widgets
@pytest.fixture(scope="module")
def fitted_winclip(random_winclip, synthetic_root: Path):
    """The shared detector with seeded random anchors and a 3-image memory; restored after."""
    from winclip_nb.data import load_mvtec_class

    generator = torch.Generator().manual_seed(0)
    dim = random_winclip.backbone.embed_dim
    normal, anomalous = (F.normalize(torch.randn(dim, generator=generator), dim=0) for _ in "ab")
    data = load_mvtec_class(synthetic_root, "disc")
    saved = random_winclip.fitted
    random_winclip.build_normal_memory(
        data.train[:3], normal, anomalous, class_name="disc", progress=False
    )
    try:
        yield random_winclip, normal, anomalous, data
    finally:
        random_winclip.fitted = saved


def test_explorer_callback_matches_detector(fitted_winclip) -> None:
    winclip, normal, anomalous, data = fitted_winclip
    paths = [s.path for s in data.test]
    masks = [s.mask_path for s in data.test]
    defect = next(i for i, s in enumerate(data.test) if s.defect == "hole")
    ex = Explorer(winclip, {"disc": winclip.fitted}, {"disc": paths}, {"disc": masks})
    # The widgets' callback: update() changes the state, recomputes and draws.
    fig = ex.update(image_index=defect, text_weight=0.5, sigma=2.0, normalization="per_image")
    assert isinstance(fig, Figure) and len(fig.axes) == 5  # 3 panels + 2 colour bars
    assert fig.axes[1].get_title() == f"score {ex.last['score']:.2f}"
    # the fused grid follows the colour convention: calibrated z-scores are signed
    fused_image = fig.axes[2].images[0]
    assert ex.last["fused_map"].min() < 0 and fig.axes[2].get_title() == "fused z (patch grid)"
    low, high = fused_image.get_clim()
    assert fused_image.get_cmap().name == "coolwarm" and low == -high
    other_settings = [
        {"text_weight": 0.0, "sigma": 0.0, "threshold": 1.5, "normalization": "calibrated"},
        {"text_weight": 1.0, "sigma": 6.0},
    ]
    for changes in [{}, *other_settings]:
        if changes:
            ex.state = ex.state.changed(**changes)
            ex.last = ex.compute()
        state, cfg = ex.state, ex.state.config
        resized = winclip.prepare(paths[state.image_index])[0][None]
        expected = winclip.detect_resized(
            resized,
            normal,
            anomalous,
            state.text_weight,
            cfg.nn_weight,
            normalization=cfg.normalization,
            sigma=cfg.sigma,
        )
        got = ex.last["anomaly_map"]
        np.testing.assert_allclose(got, expected["anomaly_map"][0].numpy(), atol=1e-4)
        assert ex.last["score"] == pytest.approx(float(expected["score"][0]), abs=1e-4)
        fg = expected["fg_mask"][0].numpy()
        hotspots = find_hotspots(got, cfg.hotspot_threshold, cfg.top_k, cfg.min_hotspot_area, fg)
        boxes = [h.box for h in hotspots]
        assert [h.box for h in ex.last["hotspots"]] == boxes
    # kept across updates
    assert ex.state.image_index == defect and ex.state.config.hotspot_threshold == 1.5


def test_explorer_rejects_bad_settings(fitted_winclip) -> None:
    winclip, normal, anomalous, data = fitted_winclip
    ex = Explorer(winclip, {"disc": (normal, anomalous)}, {"disc": [data.test[0].path]})
    before = ex.state
    for bad in [{"text_weight": 1.5}, {"image_index": 1}, {"normalization": "zscore"},
                {"sigma": -1.0}, {"class_name": "weave"}]:  # fmt: skip
        with pytest.raises(ConfigError):
            ex.update(**bad)
        assert ex.state == before
    with pytest.raises(ConfigError, match="unknown explorer settings"):
        ex.update(colour="red")


def test_explorer_class_callback_and_widget(fitted_winclip, monkeypatch) -> None:
    winclip, normal, anomalous, data = fitted_winclip
    disc = winclip.fitted
    calls: list[str] = []

    def prepare(name: str):
        calls.append(name)
        return disc if name == "disc" else (normal, anomalous)  # zero-shot: the anchors

    images = {
        "disc": [data.test[0].path, data.test[-1].path],
        "plain": [np.full((64, 64, 3), 90, np.uint8)],
    }
    ex = Explorer(winclip, prepare, images)
    # Skip the drawing (tested above): every control must still reach update() -> compute().
    monkeypatch.setattr(ex, "draw", lambda state=None: ex.last.update(ex.compute()) or Figure())
    ui = ex.widget()  # computes the first state
    assert ui.children and set(ex.controls) == {
        "class_name", "image_index", "text_weight", "sigma", "threshold", "normalization",
    }  # fmt: skip
    ex.controls["sigma"].value = 6.0  # a slider change calls update()
    assert ex.state.config.sigma == 6.0
    ex.controls["image_index"].value = 1
    assert ex.state.image_index == 1
    ex.controls["class_name"].value = "plain"  # zero-shot class: no memory
    assert ex.state.class_name == "plain" and ex.state.image_index == 0
    assert ex.fitted("plain").memory is None and ex.last["normalization"] == "per_image"
    ex.controls["class_name"].value = "disc"
    assert ex.fitted("disc") is disc and ex.fitted("disc").memory is not None
    assert winclip.fitted is disc  # the explorer leaves the detector's class alone
    assert calls == ["disc", "plain"]  # each class prepared once


def test_explorer_static_fallback(fitted_winclip, monkeypatch) -> None:
    import IPython.display

    winclip, normal, anomalous, data = fitted_winclip
    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj: shown.append(obj))
    monkeypatch.setenv(helpers.REFERENCE_ENV_VAR, "1")
    assert has_frontend() is False
    ex = explorer(winclip, {"disc": (normal, anomalous)}, {"disc": [data.test[0].path]}, sigma=2.0)
    assert isinstance(ex, Explorer) and ex.state.config.sigma == 2.0
    assert len(shown) == 1 and isinstance(shown[0], Figure)


def test_has_frontend_respects_headless_variable(monkeypatch) -> None:
    monkeypatch.delenv(helpers.REFERENCE_ENV_VAR, raising=False)
    monkeypatch.setenv(helpers.HEADLESS_ENV_VAR, "1")
    assert has_frontend() is False
    monkeypatch.setenv(helpers.HEADLESS_ENV_VAR, "0")
    assert has_frontend() is False  # plain pytest process: no Jupyter kernel


class _FakeKernel:
    def __init__(self, content: dict | None) -> None:
        self.parent = {"header": {"msg_type": "execute_request"}, "content": content or {}}

    def get_parent(self, channel: str = "shell") -> dict:
        assert channel == "shell"
        return self.parent


class _FakeShell:
    def __init__(self, kernel: _FakeKernel | None) -> None:
        self.kernel = kernel


@pytest.mark.parametrize(
    ("kernel", "expected"),
    [
        (_FakeKernel({"code": "x", "allow_stdin": True}), True),  # JupyterLab, VS Code
        (_FakeKernel({"code": "x", "allow_stdin": False}), False),  # papermill, nbclient, nbval
        (_FakeKernel({"code": "x"}), False),  # a client that says nothing
        (None, False),  # IPython without a kernel (a terminal)
    ],
)
def test_cell_from_frontend_reads_the_execute_request(monkeypatch, kernel, expected) -> None:
    import IPython

    monkeypatch.setattr(IPython, "get_ipython", lambda: _FakeShell(kernel))
    monkeypatch.delenv(helpers.REFERENCE_ENV_VAR, raising=False)
    monkeypatch.delenv(helpers.HEADLESS_ENV_VAR, raising=False)
    assert helpers.cell_from_frontend() is expected
    assert has_frontend() is expected
    monkeypatch.setenv(helpers.HEADLESS_ENV_VAR, "1")  # forcing headless always wins
    assert has_frontend() is False


def test_cell_from_frontend_outside_a_kernel() -> None:
    assert helpers.cell_from_frontend() is False  # pytest: no IPython shell at all


def test_a_stuck_cell_fails_with_the_notebook_and_cell_named(tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("x = 1"),
        nbformat.v4.new_code_cell("import time\n\ntime.sleep(120)  # stuck"),
        nbformat.v4.new_code_cell("print('never')"),
    ]
    path = tmp_path / "98_stuck.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(runner.NotebookError) as info:
        runner.run_notebooks(output_dir=tmp_path / "out", notebooks=[str(path)], timeout=3)
    message = str(info.value)
    assert message.startswith("98_stuck.ipynb: code cell 2 ('import time')"), message
    assert "per-cell timeout of 3 s" in message and "--timeout" in message
    assert (tmp_path / "out" / "98_stuck.failed.ipynb").is_file()
    with pytest.raises(ConfigError, match="timeout=0"):
        runner.run_notebooks(output_dir=tmp_path / "out", notebooks=[str(path)], timeout=0)


def test_a_bad_parameter_stops_the_notebook_with_one_message(tmp_path: Path) -> None:
    """The real notebook 00 under papermill with ``-p n_train 0``: its check cell fails."""
    with pytest.raises(runner.NotebookError) as info:
        runner.run_notebooks(
            output_dir=tmp_path, parameters={"n_train": 0, "device": "gpu"}, notebooks=["00"],
            timeout=120,
        )  # fmt: skip
    message = str(info.value)
    assert message.startswith(
        "00_quickstart.ipynb: code cell 3 ('from winclip_nb.nb.params import check_parameters') "
        "failed: ConfigError: bad parameters for notebook 00_quickstart: "
    ), message
    assert "n_train=0 must be an integer >= 1" in message
    assert "device='gpu' must be 'auto', 'cpu', 'cuda' or 'cuda:N'" in message
    failed = nbformat.read(tmp_path / "00_quickstart.failed.ipynb", as_version=4)
    assert not any("load_mvtec_class(" in c.source and c.get("outputs") for c in failed.cells)
