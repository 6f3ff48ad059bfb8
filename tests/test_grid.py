"""A benchmark grid as a SLURM job array: plan, every task run as the array would run
it, one summary table over methods x k-shots x seeds (``winclip_nb.bench.grid``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from winclip_nb.bench import grid
from winclip_nb.bench.metrics import METRIC_KEYS
from winclip_nb.cli import main
from winclip_nb.core.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def bench_args(synthetic_root):
    return [
        "--weights",
        "random",
        "--data-root",
        str(synthetic_root),
        "--image-size",
        "64",
        "--eval-size",
        "64",
        "--no-progress",
    ]


@pytest.fixture(scope="module")
def planned(tmp_path_factory, bench_args):
    out = tmp_path_factory.mktemp("grid")
    plan = grid.plan_grid(out, ["tokens"], [0, "1"], [0, 1], ["disc", "weave"], 1, bench_args)
    return out, plan


def test_plan_has_one_task_per_setting_and_shard(planned):
    out, plan = planned
    assert len(plan["tasks"]) == 1 * 2 * 2 * 2  # methods x k-shots x seeds x shards
    assert json.loads((out / grid.PLAN_FILE).read_text()) == plan
    settings = {(t["method"], t["k_shot"], t["seed"]) for t in plan["tasks"]}
    assert settings == {("tokens", k, s) for k in (0, 1) for s in (0, 1)}
    assert sorted(
        c for t in plan["tasks"] if t["k_shot"] == 0 and t["seed"] == 0 for c in t["classes"]
    ) == ["disc", "weave"]


def test_plan_refuses_what_the_grid_sets_and_bad_values(tmp_path, bench_args):
    with pytest.raises(ConfigError, match="--out is set by the grid"):
        grid.plan_grid(tmp_path, ["tokens"], [0], [0], ["disc"], 1, [*bench_args, "--out", "x"])
    with pytest.raises(ConfigError, match="methods must be some of"):
        grid.plan_grid(tmp_path, ["patchcore"], [0], [0], ["disc"], 1, bench_args)
    with pytest.raises(ConfigError, match="k_shot must be"):
        grid.plan_grid(tmp_path, ["tokens"], ["many"], [0], ["disc"], 1, bench_args)
    with pytest.raises(DataError, match="no grid plan"):
        grid.summarize(tmp_path / "nowhere")


def test_array_tasks_then_summary(planned, reused_models):
    out, plan = planned
    for index in range(len(plan["tasks"]) - 1):  # the array, one task left to run
        grid.run_task(out, index)
    partial = grid.summarize(out)
    last = plan["tasks"][-1]
    unfinished = [r for r in partial["rows"] if not r["complete"]]
    assert len(unfinished) == 1 and f"seed {last['seed']}" in unfinished[0]["missing"][0]
    assert "not complete yet" in grid.format_summary_table(partial)

    grid.run_task(out, len(plan["tasks"]) - 1)
    summary = grid.summarize(out)
    assert all(r["complete"] and r["n_seeds"] == 2 for r in summary["rows"])
    for row in summary["rows"]:
        k = 0 if row["k_shot"] == "zero-shot" else 1
        means = [
            json.loads((grid.setting_dir(out, "tokens", k, s) / "results.json").read_text())["mean"]
            for s in (0, 1)
        ]
        for key in METRIC_KEYS:
            values = [m[key] for m in means if m[key] is not None]
            assert row["mean"][key] == pytest.approx(np.mean(values), abs=1e-3)
            if len(values) == 2:
                assert row["std"][key] == pytest.approx(np.std(values, ddof=1), abs=1e-3)
    csv_rows = (out / grid.SUMMARY_CSV).read_text().splitlines()
    assert len(csv_rows) == 1 + len(summary["rows"]) and csv_rows[0].startswith("method,k_shot")
    # seeds differ, so a random-weight grid gives a spread over seeds
    assert any(v for r in summary["rows"] for v in r["std"].values())


def test_a_task_run_again_skips_its_finished_classes(planned, reused_models, capsys):
    out, plan = planned
    grid.run_task(out, 0)  # already done by the previous test (or now)
    capsys.readouterr()
    grid.run_task(out, 0)
    assert "skipped (done)" in capsys.readouterr().out


def test_grid_command_line(tmp_path, bench_args, capsys):
    out = tmp_path / "g"
    code = main(
        [
            "grid",
            "plan",
            "--out",
            str(out),
            "--methods",
            "tokens",
            "--k-shot",
            "0",
            "--seeds",
            "0",
            "--classes-per-task",
            "2",
            "--",
            *bench_args,
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0 and "2 tasks" in printed and "--array=0-1" in printed
    tasks = json.loads((out / grid.PLAN_FILE).read_text())["tasks"]
    assert [t["classes"] for t in tasks] == [["disc", "washer"], ["weave"]]
    assert main(["grid", "run", str(out), "--task", "5"]) == 2
    assert "task must be in 0..1" in capsys.readouterr().err
