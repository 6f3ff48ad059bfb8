"""The ``winclip-nb`` command line: entry points, one-line errors, lazy subcommands, prefetch.

Everything here fails (or finishes) before a model is built, so the module is fast; the
benchmark runs themselves are tested in ``test_benchmark.py``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from winclip_nb import __version__, cli
from winclip_nb.bench import protocol as B
from winclip_nb.data import make_synthetic_mvtec

PYTHON = sys.executable
CONSOLE_SCRIPT = Path(sys.executable).with_name("winclip-nb")


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return make_synthetic_mvtec(
        tmp_path_factory.mktemp("cli_mvtec"),
        ["disc"],
        n_train=2,
        n_test_good=1,
        n_test_per_defect=1,
        image_size=64,
    )


@pytest.fixture()
def data(tiny_root, tmp_path) -> Path:
    """A writable copy of the tiny set (tests break it in different ways)."""
    copy = tmp_path / "data"
    shutil.copytree(tiny_root, copy)
    return copy


@pytest.fixture()
def no_model(monkeypatch):
    """Fail the test if any model would be built."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the error was found")

    monkeypatch.setattr(B, "_load_model", refuse)


@pytest.fixture()
def restore_offline_env(monkeypatch):
    """``--offline`` writes os.environ; make monkeypatch restore both variables."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "0")


def bench(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "benchmark", "--data-root", str(root), "--weights", "random", "--device", "cpu",
        "--image-size", "112", "--out", str(out), "--no-progress", *extra,
    ]  # fmt: skip


def single_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("winclip-nb: error: ") and "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------- entry points (subprocess)
def test_python_m_help_lists_every_subcommand():
    done = subprocess.run(
        [PYTHON, "-m", "winclip_nb", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    for command in ("benchmark", "merge", "explain", "run-notebooks", "bench-speed", "prefetch"):
        assert command in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_console_script_cuda_without_cuda_exits_2(tiny_root, tmp_path):
    command = [str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.exists() else [PYTHON, "-m", "winclip_nb"]
    done = subprocess.run(
        [*command, *bench(tiny_root, tmp_path / "out"), "--device", "cuda"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    line = single_error_line(done.stderr)
    assert "'cuda'" in line and "CUDA is not available" in line
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------ in-process
def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"winclip-nb {__version__}"


def test_usage_errors_exit_2_without_raising(capsys):
    assert cli.main([]) == 2  # no subcommand
    assert cli.main(["benchmark", "--k-shot", "three"]) == 2
    assert "k_shot must be 'full' or an integer" in capsys.readouterr().err


def _break_missing_root(root: Path) -> tuple[list[str], Path]:
    missing = root / "nowhere"
    return ["--data-root", str(missing)], missing


def _break_missing_class(root: Path) -> tuple[list[str], Path]:
    return ["--classes", "nope"], root / "nope"


def _break_empty_train(root: Path) -> tuple[list[str], Path]:
    folder = root / "disc" / "train" / "good"
    for image in folder.iterdir():
        image.unlink()
    return [], folder


def _break_missing_mask(root: Path) -> tuple[list[str], Path]:
    (root / "disc" / "ground_truth" / "crack" / "000_mask.png").unlink()
    return [], root / "disc" / "test" / "crack" / "000.png"


@pytest.mark.parametrize(
    "break_data",
    [_break_missing_root, _break_missing_class, _break_empty_train, _break_missing_mask],
    ids=["missing root", "missing class folder", "empty train/good", "defect without mask"],
)
def test_bad_data_is_one_line_naming_the_path(data, tmp_path, capsys, no_model, break_data):
    extra, path = break_data(data)
    assert cli.main(bench(data, tmp_path / "out", *extra)) == 2
    line = single_error_line(capsys.readouterr().err)
    assert str(path) in line
    assert not (tmp_path / "out" / "results.json").exists()


def test_debug_flag_before_or_after_the_subcommand_shows_the_traceback(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    args = bench(missing, tmp_path / "out")
    for argv in (["--debug", *args], [*args, "--debug"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and f"dataset root not found: {missing}" in err


def test_settings_errors_stop_before_any_model(data, tmp_path, capsys, no_model):
    assert cli.main(bench(data, tmp_path / "o", "--k-shot", "3")) == 2
    assert "k_shot=3 but class 'disc' has only 2 training images" in capsys.readouterr().err
    argv = bench(data, tmp_path / "o", "--k-shot", "0", "--normalization", "calibrated")
    assert cli.main(argv) == 2
    assert "per_image" in single_error_line(capsys.readouterr().err)
    assert cli.main(bench(data, tmp_path / "o", "--eval-size", "3")) == 2
    assert "eval_size" in single_error_line(capsys.readouterr().err)


def test_real_data_defaults_to_openai_and_fails_fast_offline(
    data, tmp_path, capsys, no_model, restore_offline_env
):
    from winclip_nb.hub.weights import cached_tag_file

    if cached_tag_file("ViT-B-16", "openai"):
        pytest.skip("the openai checkpoint is cached on this machine")
    (data / "SYNTHETIC.json").unlink()  # now it looks like a real dataset
    argv = [a for a in bench(data, tmp_path / "o") if a not in ("--weights", "random")]
    assert cli.main(["--offline", *argv]) == 2
    line = single_error_line(capsys.readouterr().err)
    assert "openai" in line and "not reachable" in line and "prefetch" in line


def test_merge_of_a_missing_folder_is_one_line(tmp_path, capsys):
    missing = tmp_path / "shard"
    assert cli.main(["merge", str(missing), "--out", str(tmp_path / "m")]) == 2
    assert str(missing) in single_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------- lazy subcommands
def test_lazy_subcommand_gets_its_arguments_and_global_flags(monkeypatch):
    seen: dict = {}
    module = types.ModuleType("fake_speed")

    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--repeat", type=int, default=1)
        parser.add_argument("images", nargs="*")

    def run(args: argparse.Namespace) -> int:
        seen.update(vars(args))
        return 7

    module.add_speed_arguments, module.run_speed_cli = add, run
    monkeypatch.setitem(sys.modules, "fake_speed", module)
    command = cli._LazyCommand("fake_speed", "add_speed_arguments", "run_speed_cli", "speed")
    monkeypatch.setitem(cli.LAZY_COMMANDS, "bench-speed", command)
    argv = ["--debug", "bench-speed", "--repeat", "3", "--offline", "a.png", "b.png"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    assert cli.main(argv) == 7
    assert seen == {"repeat": 3, "images": ["a.png", "b.png"], "debug": True}


def test_lazy_subcommand_whose_module_is_missing_says_not_available(monkeypatch, capsys):
    command = cli._LazyCommand("winclip_nb._no_such_module", "add", "run", "missing")
    monkeypatch.setitem(cli.LAZY_COMMANDS, "run-notebooks", command)
    assert cli.main(["run-notebooks", "--anything"]) == 2
    err = capsys.readouterr().err
    assert "run-notebooks: not available:" in err and "_no_such_module" in err


def test_explain_help_comes_from_the_explain_module(capsys):
    assert cli.main(["explain", "--help"]) == 0
    out = capsys.readouterr().out
    assert "winclip-nb explain" in out and "--class-name" in out


# ------------------------------------------------------------------------- prefetch
def test_prefetch_checks_an_mvtec_folder(tiny_root, capsys):
    assert cli.main(["prefetch", "--weights", "random", "--no-llava", "--mvtec-root",
                     str(tiny_root)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "1 classes" in out
    disc = next(line for line in out.splitlines() if line.strip().startswith("disc"))
    assert disc.split()[1:5] == ["train", "2", "test", "5"]  # 1 good + 4 defects
    assert "good 1, defective 4, 4 defect types" in disc
    assert "random init requested, nothing to download" in out


@pytest.mark.parametrize(
    "method, model, tag",
    [(None, "ViT-B-16", "openai"), ("windows", "ViT-B-16-plus-240", "laion400m_e31")],
    ids=["default method", "windows"],
)
def test_prefetch_offline_fails_with_one_line(capsys, restore_offline_env, method, model, tag):
    """Without options prefetch fetches the tokens method's model and tag; ``--method``
    picks that method's (windows: the paper's ViT-B-16-plus-240, LAION-400M weights)."""
    from winclip_nb.hub.weights import cached_tag_file

    if cached_tag_file(model, tag):
        pytest.skip(f"the {model}/{tag} checkpoint is cached on this machine")
    method_args = [] if method is None else ["--method", method]
    assert cli.main(["--offline", "prefetch", *method_args, "--no-llava"]) == 2
    line = single_error_line(capsys.readouterr().err)
    assert "not reachable" in line and f" {model}/{tag}:" in line


def test_prefetch_method_picks_its_model_and_tag_unless_told(monkeypatch, capsys):
    from winclip_nb.hub import prefetch

    fetched: list[tuple[str, str]] = []
    monkeypatch.setattr(prefetch, "_prefetch_model", lambda *args: fetched.append(args))
    for argv in (
        [],
        ["--method", "windows"],
        ["--method", "windows", "--model", "ViT-B-16", "--weights", "random"],
        ["--method", "tokens", "--weights", "laion2b_s34b_b88k"],
        ["--method", "anomalydino"],
        ["--method", "musc"],
    ):
        assert cli.main(["prefetch", *argv, "--no-llava"]) == 0
    assert fetched == [
        ("open_clip", "ViT-B-16", "openai"),
        ("open_clip", "ViT-B-16-plus-240", "laion400m_e31"),
        ("open_clip", "ViT-B-16", "random"),
        ("open_clip", "ViT-B-16", "laion2b_s34b_b88k"),
        ("timm", "vit_small_patch14_dinov2", "lvd142m"),
        ("open_clip", "ViT-B-16", "openai"),
    ]
    capsys.readouterr()
    assert cli.main(["prefetch", "--method", "nope", "--no-llava"]) == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    # The real fetch of a random-init windows model downloads nothing.
    monkeypatch.undo()
    argv = ["prefetch", "--method", "windows", "--weights", "random", "--no-llava"]
    assert cli.main(argv) == 0
    assert "random init requested, nothing to download" in capsys.readouterr().out
