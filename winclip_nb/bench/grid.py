"""A benchmark grid (methods x k-shots x seeds x class shards) as a SLURM job array.

Three steps, each a ``winclip-nb grid`` subcommand::

    winclip-nb grid plan --out results/grid --methods tokens windows --k-shot 0 1 2 4 \\
        --seeds 0 1 2 --classes-per-task 5 -- --device cuda --data-root /data/mvtec
    sbatch --array=0-$((N - 1)) grid.sbatch        # each task: winclip-nb grid run ... --task $ID
    winclip-nb grid summary results/grid

``plan`` lists the dataset's classes, splits them into shards and writes
``<out>/grid.json``: one task per (method, k-shot, seed, class shard), each a
``winclip-nb benchmark`` run with the options after ``--``. ``run`` executes one task
into ``<out>/<method>/<k-shot>/seed-<s>``; the shards of one setting write into the same
folder, which the result store keeps consistent (a lock, atomic class files, resume), so a
task that is killed and run again skips its finished classes. ``summary`` reads every
setting's ``results.json`` and prints one row per (method, k-shot): the mean over classes
of each seed, then mean and standard deviation over the seeds; it writes ``summary.json``
and ``summary.csv`` and names the settings that are not complete yet.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from ..core.config import method_names
from ..core.errors import ConfigError, DataError
from ..data.files import atomic_write
from .config import k_shot_label, parse_k_shot
from .metrics import METRIC_KEYS
from .report import METRIC_TITLES
from .store import RESULTS_JSON, _read_json

PLAN_FILE = "grid.json"
SUMMARY_JSON = "summary.json"
SUMMARY_CSV = "summary.csv"
PLAN_VERSION = 1


def setting_dir(out: Path, method: str, k_shot: int | str, seed: int) -> Path:
    """Where one setting's shards write: ``<out>/<method>/<k-shot label>/seed-<seed>``."""
    return Path(out) / method / k_shot_label(k_shot) / f"seed-{seed}"


def plan_grid(
    out: str | Path,
    methods: list[str],
    k_shots: list[Any],
    seeds: list[int],
    classes: list[str],
    classes_per_task: int,
    benchmark_args: list[str],
) -> dict:
    """Write ``<out>/grid.json`` (one task per setting and class shard) and return it."""
    unknown = [m for m in methods if m not in method_names()]
    if unknown or not methods:
        raise ConfigError(f"methods must be some of {method_names()}, got {methods}")
    if classes_per_task < 1:
        raise ConfigError(f"classes_per_task must be >= 1, got {classes_per_task}")
    if not classes:
        raise DataError("no classes to plan: the dataset has none (check --data-root)")
    for flag in ("--out", "--method", "--k-shot", "--seeds", "--classes"):
        if flag in benchmark_args:
            raise ConfigError(f"{flag} is set by the grid; remove it from the benchmark options")
    shards = [classes[i : i + classes_per_task] for i in range(0, len(classes), classes_per_task)]
    tasks = [
        {"method": m, "k_shot": parse_k_shot(k), "seed": int(s), "classes": shard}
        for m in methods
        for k in dict.fromkeys(k_shots)
        for s in dict.fromkeys(seeds)
        for shard in shards
    ]
    plan = {
        "version": PLAN_VERSION,
        "classes": list(classes),
        "benchmark_args": benchmark_args,
        "tasks": tasks,
    }
    atomic_write(Path(out) / PLAN_FILE, json.dumps(plan, indent=2) + "\n")
    return plan


def read_plan(out: str | Path) -> dict:
    """The plan under ``out`` (a clear error when there is none)."""
    plan = _read_json(Path(out) / PLAN_FILE)
    if plan is None or plan.get("version") != PLAN_VERSION:
        raise DataError(f"no grid plan in {out}: run `winclip-nb grid plan --out {out}` first")
    return plan


def task_arguments(out: str | Path, task: dict) -> list[str]:
    """The ``winclip-nb benchmark`` arguments of one task."""
    folder = setting_dir(Path(out), task["method"], task["k_shot"], task["seed"])
    return [
        "--method",
        task["method"],
        "--k-shot",
        str(task["k_shot"]),
        "--seeds",
        str(task["seed"]),
        "--classes",
        *task["classes"],
        "--out",
        str(folder),
    ]


def run_task(out: str | Path, index: int, extra: list[str] | None = None) -> dict:
    """Run task ``index`` of the plan under ``out``; returns its results."""
    from .command import add_benchmark_arguments, configs_from_args
    from .protocol import run_benchmark

    plan = read_plan(out)
    tasks = plan["tasks"]
    if not 0 <= index < len(tasks):
        raise ConfigError(f"task must be in 0..{len(tasks) - 1} for the plan in {out}, got {index}")
    parser = argparse.ArgumentParser(prog="winclip-nb benchmark")
    add_benchmark_arguments(parser)
    args = parser.parse_args(
        [*plan["benchmark_args"], *(extra or []), *task_arguments(out, tasks[index])]
    )
    (cfg,) = configs_from_args(args)
    return run_benchmark(cfg, progress=not args.no_progress)


def summarize(out: str | Path) -> dict:
    """Mean and std over seeds of each setting's class means; missing classes are named."""
    plan = read_plan(out)
    settings: dict[tuple[str, str], dict] = {}
    for task in plan["tasks"]:
        key = (task["method"], k_shot_label(task["k_shot"]))
        row = settings.setdefault(key, {"method": key[0], "k_shot": key[1], "seeds": {}})
        row["seeds"].setdefault(
            task["seed"], setting_dir(Path(out), task["method"], task["k_shot"], task["seed"])
        )
    rows = []
    for row in settings.values():
        per_seed, missing = {}, []
        for seed, folder in row.pop("seeds").items():
            results = _read_json(folder / RESULTS_JSON) or {"classes": {}}
            lacking = [c for c in plan["classes"] if c not in results["classes"]]
            missing += [f"seed {seed}: {', '.join(lacking)}"] if lacking else []
            if not lacking:
                per_seed[seed] = results["mean"]
        row.update(
            _over_seeds(per_seed), n_seeds=len(per_seed), missing=missing, complete=not missing
        )
        rows.append(row)
    summary = {"classes": plan["classes"], "rows": rows}
    atomic_write(Path(out) / SUMMARY_JSON, json.dumps(summary, indent=2) + "\n")
    atomic_write(Path(out) / SUMMARY_CSV, summary_csv(summary))
    return summary


def _over_seeds(per_seed: dict[int, dict]) -> dict:
    """Each metric's mean over seeds and sample std (None with fewer than two seeds)."""
    out: dict[str, Any] = {"mean": {}, "std": {}}
    for key in METRIC_KEYS:
        values = [m[key] for m in per_seed.values() if m.get(key) is not None]
        out["mean"][key] = round(float(np.mean(values)), 4) if values else None
        out["std"][key] = round(float(np.std(values, ddof=1)), 4) if len(values) > 1 else None
    return out


def summary_csv(summary: dict) -> str:
    """One CSV row per setting: method, k-shot, seeds, each metric's mean and std."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        ["method", "k_shot", "n_seeds", *METRIC_KEYS, *(f"{k}_std" for k in METRIC_KEYS)]
    )
    for row in summary["rows"]:
        values = [row["mean"][k] for k in METRIC_KEYS] + [row["std"][k] for k in METRIC_KEYS]
        writer.writerow(
            [
                row["method"],
                row["k_shot"],
                row["n_seeds"],
                *("" if v is None else v for v in values),
            ]
        )
    return buffer.getvalue()


def format_summary_table(summary: dict) -> str:
    """The printed grid summary: mean±std over seeds of the class means, per setting."""
    head = f"{'method':<10}{'k-shot':<11}{'seeds':>5}" + "".join(
        METRIC_TITLES[k].rjust(13) for k in METRIC_KEYS
    )
    lines = [
        f"MEAN over {len(summary['classes'])} classes, mean±std over seeds",
        head,
        "-" * len(head),
    ]
    for row in summary["rows"]:
        cells = []
        for k in METRIC_KEYS:
            mean, std = row["mean"][k], row["std"][k]
            text = "n/a" if mean is None else f"{mean:.1f}" + ("" if std is None else f"±{std:.1f}")
            cells.append(text.rjust(13))
        lines.append(f"{row['method']:<10}{row['k_shot']:<11}{row['n_seeds']:>5}" + "".join(cells))
    incomplete = [
        f"{r['method']} {r['k_shot']} ({'; '.join(r['missing'])})"
        for r in summary["rows"]
        if not r["complete"]
    ]
    if incomplete:
        lines += ["", "not complete yet (left out of the means): " + ", ".join(incomplete)]
    return "\n".join(lines)


# ------------------------------------------------------------------------------- CLI
def add_grid_arguments(parser: argparse.ArgumentParser) -> None:
    """``winclip-nb grid plan|run|summary``."""
    sub = parser.add_subparsers(dest="step", required=True)
    plan = sub.add_parser("plan", help="write <out>/grid.json: one task per setting and shard")
    plan.add_argument("--out", required=True, metavar="DIR", help="the grid's folder")
    plan.add_argument("--methods", nargs="+", default=["tokens"], choices=method_names())
    plan.add_argument("--k-shot", nargs="+", default=["full"], metavar="K")
    plan.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="S")
    plan.add_argument(
        "--classes",
        nargs="+",
        default=None,
        metavar="NAME",
        help="default: every class of the dataset",
    )
    plan.add_argument("--classes-per-task", type=int, default=1, metavar="N")
    plan.add_argument(
        "benchmark_args",
        nargs=argparse.REMAINDER,
        help="after --: options for every benchmark run (e.g. --device cuda)",
    )
    run = sub.add_parser("run", help="run one task of the plan (e.g. $SLURM_ARRAY_TASK_ID)")
    run.add_argument("out", metavar="DIR")
    run.add_argument("--task", type=int, required=True, metavar="I")
    summary = sub.add_parser("summary", help="one table over every setting of the grid")
    summary.add_argument("out", metavar="DIR")


def run_grid_cli(args: argparse.Namespace) -> int:
    if args.step == "plan":
        extra = [a for a in args.benchmark_args if a != "--"]
        classes = args.classes or _dataset_classes(extra)
        plan = plan_grid(
            args.out, args.methods, args.k_shot, args.seeds, classes, args.classes_per_task, extra
        )
        n = len(plan["tasks"])
        print(f"{n} tasks in {Path(args.out) / PLAN_FILE} ({len(classes)} classes)")
        print(
            f"SLURM: sbatch --array=0-{n - 1} ... with, per task: "
            f"winclip-nb grid run {args.out} --task $SLURM_ARRAY_TASK_ID"
        )
    elif args.step == "run":
        run_task(args.out, args.task)
    else:
        print(format_summary_table(summarize(args.out)))
        print(f"\nwritten: {Path(args.out) / SUMMARY_JSON}, {Path(args.out) / SUMMARY_CSV}")
    return 0


def _dataset_classes(benchmark_args: list[str]) -> list[str]:
    """The classes the benchmark options' dataset holds (as a benchmark run would list them)."""
    from .command import add_benchmark_arguments, configs_from_args
    from .loader import load_benchmark_classes, resolve_dataset_root

    parser = argparse.ArgumentParser(prog="winclip-nb benchmark")
    add_benchmark_arguments(parser)
    (cfg,) = configs_from_args(parser.parse_args(benchmark_args))
    root, _ = resolve_dataset_root(cfg)
    return list(load_benchmark_classes(cfg, root))


__all__ = ["format_summary_table", "plan_grid", "run_task", "setting_dir", "summarize"]
