"""Killed runs resume, and shards share one output folder.

A benchmark process SIGKILLed in the middle of its second class is rerun with the same
command: it skips the finished class and ends with the numbers of an uninterrupted run.
Two shard processes writing other classes into one ``--out`` at the same time both land.
Only the process that is killed and one shard run in subprocesses (each pays for the
torch import and a model); the other runs go through ``cli.main`` in this process and
share one model. 64 px input (4 x 4 patches), pixel metrics at 32 x 32.
The two write races behind that (shared temporary names, a results.json rebuilt from a
listing another writer has made stale) are also forced deterministically with threads.
A results folder written by the previous version (whose config lacks the settings added
since) is resumed too, and still refused for settings that really differ.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from winclip_nb import cli
from winclip_nb.bench import protocol
from winclip_nb.bench import store as S
from winclip_nb.bench.metrics import METRIC_KEYS
from winclip_nb.data import make_synthetic_mvtec
from winclip_nb.data.files import _host_tag, atomic_write, remove_stale_temps

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("disc", "weave", "washer")
TINY_SET = {"n_train": 2, "n_test_good": 2, "n_test_per_defect": 1, "image_size": 64}
#: Keys that measure time, not results: they differ between any two runs.
TIMING_KEYS = frozenset({"seconds", "images_per_s", "memory_seconds", "test_seconds"})
#: Run as ``python -c``: the benchmark CLI, with one class announced when it starts and
#: held (after its computation, before it is saved) so that a kill lands inside it.
HOLD_ONE_CLASS = """
import sys, time
from winclip_nb import cli
from winclip_nb.bench import protocol as B
held, real = sys.argv[1], B.evaluate_class
def evaluate(winclip, class_data, *args, **kwargs):
    if class_data.name == held:
        print(f"evaluating {held}", flush=True)
    result = real(winclip, class_data, *args, **kwargs)
    if class_data.name == held:
        time.sleep(120)
    return result
B.evaluate_class = evaluate
sys.exit(cli.main(sys.argv[2:]))
"""

pytestmark = pytest.mark.skipif(os.name != "posix", reason="SIGKILL and flock are POSIX")


def bench_args(root: Path, out: Path, *classes: str) -> list[str]:
    return [
        "benchmark", "--data-root", str(root), "--classes", *(classes or CLASSES),
        "--weights", "random", "--device", "cpu", "--image-size", "64", "--eval-size", "32",
        "--batch-size", "4", "--out", str(out), "--no-progress",
    ]  # fmt: skip


def environment() -> dict[str, str]:
    # Two torch threads, as conftest.py sets for this process: the same arithmetic.
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_cli(args: list[str]) -> str:
    """``winclip-nb ARGS`` in this process; returns its stdout (exit code 0 asserted)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = cli.main(args)
    assert code == 0, buffer.getvalue()
    return buffer.getvalue()


def without_timing(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING_KEYS}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for folder in (out, out / "classes") for p in folder.glob(".*.tmp"))


@pytest.fixture(scope="module", autouse=True)
def shared_model(reused_models):
    """The in-process runs reuse one model (and its cache of text anchors)."""


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_synthetic_mvtec(tmp_path_factory.mktemp("resume_mvtec"), list(CLASSES), **TINY_SET)


@pytest.fixture(scope="module")
def uninterrupted(root, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    run_cli(bench_args(root, out))
    return read_json(out / "results.json")


# ------------------------------------------------------------------------- kill, resume
def test_killed_in_the_second_class_resumes_to_the_uninterrupted_numbers(
    root, uninterrupted, tmp_path
):
    out = tmp_path / "out"
    first, second, third = CLASSES
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_ONE_CLASS, second, *bench_args(root, out)],
        cwd=REPO,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    watchdog = threading.Timer(240, proc.kill)
    watchdog.start()
    seen: list[str] = []
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            seen.append(line)
            if line.startswith(f"evaluating {second}"):
                break
        assert any(line.startswith(f"{first}: image AUROC") for line in seen), "".join(seen)
        assert (out / "classes" / f"{first}.json").is_file()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        watchdog.cancel()
        proc.kill()
        proc.stdout.close()  # type: ignore[union-attr]
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    # The kill landed inside the second class: the first is saved, the second is not.
    assert sorted(p.name for p in (out / "classes").glob("*.json")) == [f"{first}.json"]
    assert list(read_json(out / "results.json")["classes"]) == [first]

    # Half-written files of the killed process (a kill during a write leaves these).
    host = _host_tag()
    stale = [
        out / "classes" / f".{second}.json.{host}.{proc.pid}.0123456789ab.tmp",
        out / f".results.json.{host}.{proc.pid}.ba9876543210.tmp",
    ]
    for path in stale:
        path.write_text('{"class": "' + second + '", "fingerp')

    rerun = run_cli(bench_args(root, out))  # the same command again
    assert f"{first}: skipped (done)" in rerun
    for name in (second, third):
        assert f"{name}: image AUROC" in rerun
    assert leftovers(out) == []  # the killed run's temporary files were removed

    resumed = read_json(out / "results.json")
    assert sorted(resumed["classes"]) == sorted(CLASSES)
    for name in CLASSES:
        assert without_timing(resumed["classes"][name]) == without_timing(
            uninterrupted["classes"][name]
        ), name
        saved = read_json(out / "classes" / f"{name}.json")["result"]
        assert without_timing(saved) == without_timing(uninterrupted["classes"][name])
    assert without_timing(resumed["mean"]) == without_timing(uninterrupted["mean"])
    assert all(isinstance(resumed["mean"][k], float) for k in METRIC_KEYS)


def test_stale_temp_files_of_live_processes_and_other_machines_stay(tmp_path):
    out = tmp_path / "out"
    (out / "classes").mkdir(parents=True)
    host = _host_tag()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid = int(dead.stdout)
    token = "0123456789ab"  # atomic_write's names: .<name>.<host>.<pid>.<12 hex>.tmp
    mine = out / "classes" / f".disc.json.{host}.{os.getpid()}.{token}.tmp"
    other_host = out / "classes" / f".disc.json.otherhost.{dead_pid}.{token}.tmp"
    gone = out / f".results.csv.{host}.{dead_pid}.{token}.tmp"
    not_ours = out / f".results.csv.{host}.{dead_pid}.abc123.tmp"  # not atomic_write's name
    for path in (mine, other_host, gone, not_ours):
        path.write_text("half")
    assert remove_stale_temps(out, out / "classes") == [gone]
    assert mine.exists() and other_host.exists() and not gone.exists() and not_ours.exists()


# -------------------------------------------------------------------- shards, one --out
def test_two_shards_writing_into_one_out_both_land(root, uninterrupted, tmp_path):
    """Two processes, other classes, one --out, working at the same time (this one starts
    when the other has checked the folder and printed its header). A race test: without
    the lock it fails only when their rebuilds of results.json interleave; the forced
    versions below fail without the fix every time."""
    out = tmp_path / "shared"
    proc = subprocess.Popen(
        [sys.executable, "-m", "winclip_nb", *bench_args(root, out, "disc")],
        cwd=REPO,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = proc.stdout.readline()  # type: ignore[union-attr]
        header = proc.stdout.readline()  # type: ignore[union-attr]
        assert first.startswith("method:") and header.startswith("weights:"), first + header
        run_cli(bench_args(root, out, "weave"))
        _, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert sorted(p.name for p in (out / "classes").glob("*.json")) == ["disc.json", "weave.json"]
    results = read_json(out / "results.json")
    assert sorted(results["classes"]) == ["disc", "weave"]
    assert sorted(results["config"]["classes"]) == ["disc", "weave"]
    for name in ("disc", "weave"):
        assert without_timing(results["classes"][name]) == without_timing(
            uninterrupted["classes"][name]
        )
    csv_rows = (out / "results.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in csv_rows[1:]] == ["disc", "weave", "MEAN"]
    assert leftovers(out) == []


def _fake_result(value: float) -> dict:
    return dict.fromkeys(METRIC_KEYS, value) | {"n_test": 6, "n_defective": 4, "seconds": 1.0,
                                                "images_per_s": 2.0}  # fmt: skip


def test_results_json_is_never_rebuilt_from_a_stale_listing(tmp_path, monkeypatch):
    """Shard A lists the class files, shard B saves its class and rebuilds, then A writes
    its (stale) table: without the lock the final results.json misses B's class. A waits
    (at most 1.5 s) after listing for B to finish; with the lock B cannot start its
    write meanwhile, so A's wait runs out and B's rebuild, last, sees both classes."""
    out = tmp_path / "out"
    config = {"k_shot": "full", "sigma": 4.0, "classes": []}
    a_listed, b_done = threading.Event(), threading.Event()
    real_listing = S._finished_classes
    waited_out: list[bool] = []

    def listing(folder, fingerprint):
        found = real_listing(folder, fingerprint)
        if threading.current_thread().name == "shard-a":
            a_listed.set()
            waited_out.append(not b_done.wait(1.5))
        return found

    monkeypatch.setattr(S, "_finished_classes", listing)
    errors: list[BaseException] = []

    def shard(name: str, value: float, after: threading.Event | None) -> None:
        try:
            if after is not None:
                assert after.wait(10)
            S._record_class(out, name, dict(config, classes=[name]), _fake_result(value))
            if name == "weave":
                b_done.set()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [
        threading.Thread(target=shard, args=("disc", 80.0, None), name="shard-a"),
        threading.Thread(target=shard, args=("weave", 60.0, a_listed), name="shard-b"),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    results = read_json(out / "results.json")
    assert sorted(results["classes"]) == ["disc", "weave"]
    assert results["mean"]["image_auroc"] == 70.0
    assert "weave" in (out / "results.csv").read_text()
    assert waited_out == [True]  # B was held off while A held the lock


def test_concurrent_atomic_writes_use_their_own_temporary_files(tmp_path, monkeypatch):
    """Both writers have written their temporary file before either renames it (forced
    with a barrier): with one shared temporary name the second rename fails or installs
    the other's text."""
    target = tmp_path / "results.json"
    texts = {"one": '{"from": "one"}\n' * 50, "two": '{"from": "two"}\n'}
    barrier = threading.Barrier(2, timeout=10)
    real_replace = os.replace
    installed: list[str] = []

    def replace(src, dst):
        if Path(dst) == target:
            barrier.wait()
            installed.append(Path(src).read_text(encoding="utf-8"))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    errors: list[BaseException] = []

    def write(key: str) -> None:
        try:
            atomic_write(target, texts[key])
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(k,)) for k in texts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    assert sorted(installed) == sorted(texts.values())  # each rename moved its own text
    assert target.read_text(encoding="utf-8") in texts.values()
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "classes" / "disc.json"

    def fail(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="simulated"):
        atomic_write(target, "{}")
    assert list((tmp_path / "classes").iterdir()) == []


# --------------------------------------------------------------------------- a full disk
class TinyDisk:
    """A folder on a filesystem of ``size`` bytes: a real tmpfs when this process may mount
    one (root on Linux), else the same limit simulated in :func:`atomic_write` (every
    file the package writes goes through it). ``grow()`` gives it room."""

    def __init__(self, folder: Path, size: int, monkeypatch: pytest.MonkeyPatch) -> None:
        import errno

        from winclip_nb.data import files

        self.folder, self.real = folder, False
        folder.mkdir(parents=True, exist_ok=True)
        if os.name == "posix" and hasattr(os, "geteuid") and os.geteuid() == 0:
            mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]
            self.real = subprocess.run(mount, capture_output=True).returncode == 0
        if self.real:
            return
        self.budget: float = size
        real_open = open

        def limited_open(path, mode="r", *args, **kwargs):
            handle = real_open(path, mode, *args, **kwargs)
            if "w" not in mode or folder not in Path(path).parents:
                return handle
            write = handle.write

            def counted(data):
                self.budget -= len(data)
                if self.budget < 0:
                    raise OSError(errno.ENOSPC, "No space left on device (simulated)")
                return write(data)

            handle.write = counted
            return handle

        monkeypatch.setattr(files, "open", limited_open, raising=False)

    def grow(self) -> None:
        if self.real:
            subprocess.run(["mount", "-o", "remount,size=64m", str(self.folder)], check=True)
        else:
            self.budget = float("inf")

    def close(self) -> None:
        if self.real:
            subprocess.run(["umount", "-l", str(self.folder)], check=False)


@pytest.fixture
def tiny_disk(tmp_path, monkeypatch):
    disk = TinyDisk(tmp_path / "disk", 12 * 1024, monkeypatch)
    yield disk
    disk.close()


def all_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_a_full_disk_is_one_line_naming_the_file_and_the_run_resumes(
    root, uninterrupted, tiny_disk
):
    out = tiny_disk.folder / "out"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(bench_args(root, out))
    lines = stderr.getvalue().strip().splitlines()
    assert code == 2, stdout.getvalue() + stderr.getvalue()
    assert len(lines) == 1 and lines[0].startswith(f"winclip-nb: error: cannot write {out}/"), lines
    assert lines[0].endswith(": no space left on the device"), lines
    assert "Traceback" not in stdout.getvalue() + stderr.getvalue()
    assert leftovers(out) == [] and not [p for p in all_files(out) if p.name.endswith(".tmp")]
    finished = sorted(p.stem for p in (out / "classes").glob("*.json"))
    for path in (out / "classes").glob("*.json"):
        assert "image_auroc" in read_json(path)["result"]  # whole files only: a resume trusts them
    assert len(finished) < len(CLASSES)

    tiny_disk.grow()
    run_cli(bench_args(root, out))  # the same command, with room: resumes and finishes
    resumed = read_json(out / "results.json")
    assert sorted(resumed["classes"]) == sorted(CLASSES)
    for name in CLASSES:
        assert without_timing(resumed["classes"][name]) == without_timing(
            uninterrupted["classes"][name]
        )


def test_full_disk_errors_for_figures_and_reports(tiny_disk):
    from matplotlib.figure import Figure

    from winclip_nb import StorageError
    from winclip_nb.nb.figures import save_figure

    kept = atomic_write(tiny_disk.folder / "kept.json", '{"ok": true}')
    with pytest.raises(StorageError, match=r"cannot write .*big\.bin: no space left on the device"):
        atomic_write(tiny_disk.folder / "big.bin", b"x" * 64 * 1024)
    fig = Figure(figsize=(16, 16))
    fig.add_subplot().imshow(np.random.default_rng(0).random((256, 256)))
    with pytest.raises(StorageError, match=r"cannot write .*heat\.png"):
        save_figure(fig, tiny_disk.folder / "figs" / "heat.png", dpi=100)
    with pytest.raises(StorageError, match=r"cannot write .*kept\.json"):  # no half-replaced file
        atomic_write(kept, "x" * 64 * 1024)
    assert read_json(kept) == {"ok": True}
    assert [p.name for p in all_files(tiny_disk.folder)] == ["kept.json"]


def test_a_read_only_folder_is_a_storage_error(tmp_path):
    from winclip_nb import StorageError
    from winclip_nb.data.files import storage_error

    error = storage_error(tmp_path / "a.json", PermissionError(13, "Permission denied"))
    assert isinstance(error, StorageError) and isinstance(error, OSError)
    assert str(error) == f"cannot write {tmp_path / 'a.json'}: permission denied"


# --------------------------------------------------------- a folder of the previous version
#: The config keys results.json and the class files had before the model's settings were
#: recorded: the old BenchmarkConfig's fields and what its describe_run added.
PREVIOUS_CONFIG_KEYS = frozenset({
    "data_root", "classes", "k_shot", "max_images", "seeds", "method", "weights", "model_name",
    "device", "batch_size", "image_size", "layers", "text_weight", "nn_weight", "coreset_ratio",
    "normalization", "sigma", "eval_size", "workers", "out", "force", "save_examples", "explain",
    "llava", "llava_model", "skip_bad", "dataset_format", "synthetic", "dataset",
    "weights_requested", "random_weights", "device_name", "k_shot_label", "metrics_unit",
    "eval_resolution", "throughput_note", "versions",
})  # fmt: skip
#: What the previous version ignored when it compared runs (its fingerprint).
PREVIOUS_RUNTIME_KEYS = frozenset({
    "classes", "out", "data_root", "device", "device_name", "workers", "batch_size", "force",
    "skip_bad", "save_examples", "explain", "llava", "llava_model", "weights_requested",
    "versions", "throughput_note", "merged_from",
})  # fmt: skip


def previous_version_config(config: dict) -> dict:
    """``config`` as the previous version wrote it: no ``precision``, ``text_temperature``,
    ``fg_threshold``, ``window_scales``, ...; ``scored_maps`` (text) for ``scored_map``."""
    old = {k: v for k, v in config.items() if k in PREVIOUS_CONFIG_KEYS}
    old["scored_maps"] = (
        "anomaly_map and score after post-processing (fusion, normalisation, smoothing)"
    )
    return old


def make_previous_version(out: Path, **changes) -> None:
    """Rewrite the results folder ``out`` as the previous version left it (``changes``:
    settings to give its config), class files with that version's own fingerprint."""
    summary = read_json(out / "results.json")
    summary["config"] = dict(previous_version_config(summary["config"]), **changes)
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    for path in (out / "classes").glob("*.json"):
        content = read_json(path)
        content["config"] = dict(previous_version_config(content["config"]), **changes)
        comparable = {k: v for k, v in content["config"].items() if k not in PREVIOUS_RUNTIME_KEYS}
        text = json.dumps(comparable, sort_keys=True, default=str)
        content["fingerprint"] = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
        path.write_text(json.dumps(content, indent=2) + "\n")
    for config in [summary["config"], *(read_json(p)["config"] for p in out.glob("classes/*"))]:
        assert "precision" not in config and "text_temperature" not in config
        assert "fg_threshold" not in config and "window_scales" not in config
        assert "scored_map" not in config and "scored_maps" in config


@pytest.fixture()
def previous_version_out(uninterrupted, tmp_path) -> Path:
    """A copy of the uninterrupted run's folder, as the previous version wrote it."""
    out = Path(shutil.copytree(uninterrupted["config"]["out"], tmp_path / "previous"))
    make_previous_version(out)
    return out


@pytest.fixture()
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(protocol, "_load_model", refuse)


def test_a_folder_of_the_previous_version_resumes_without_computing(
    root, uninterrupted, previous_version_out, no_model
):
    out = previous_version_out
    class_files = {p.name: p.read_bytes() for p in (out / "classes").glob("*.json")}
    assert sorted(class_files) == sorted(f"{n}.json" for n in CLASSES)
    stdout = run_cli(bench_args(root, out))  # the same command as the run that wrote it
    for name in CLASSES:
        assert f"{name}: skipped (done)" in stdout
    # The old class files are kept as they are; results.json is rebuilt from them.
    assert {p.name: p.read_bytes() for p in (out / "classes").glob("*.json")} == class_files
    resumed = read_json(out / "results.json")
    assert resumed["classes"] == uninterrupted["classes"]
    assert resumed["mean"] == uninterrupted["mean"]
    assert resumed["config"]["scored_map"] == "anomaly_map"  # this version's config now
    assert resumed["config"]["precision"] == "auto" and "scored_maps" not in resumed["config"]


@pytest.mark.parametrize(
    ("given", "stored", "named"),
    [
        (["--fg-threshold", "0.2"], {}, "fg_threshold: 0.1 -> 0.2"),  # a key it lacks
        (["--text-temperature", "0.05"], {}, "text_temperature: 0.01 -> 0.05"),
        ([], {"sigma": 2.0}, "sigma: 2.0 -> 4.0"),  # a key it has
    ],
)
def test_a_folder_of_the_previous_version_with_other_settings_is_refused(
    root, uninterrupted, tmp_path, capsys, no_model, given, stored, named
):
    out = Path(shutil.copytree(uninterrupted["config"]["out"], tmp_path / "previous"))
    make_previous_version(out, **stored)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert cli.main([*bench_args(root, out), *given]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("winclip-nb: error:"), err
    assert named in err and "--force" in err and str(out) in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # untouched
