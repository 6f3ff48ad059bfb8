"""``winclip-nb benchmark`` and ``winclip-nb merge``: options and entry points."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..core.config import WinCLIPConfig
from ..core.errors import ConfigError
from ..core.results import RANDOM_WEIGHTS_BANNER
from ..options import add_config_arguments, config_changes
from .config import BenchmarkConfig, k_shot_label, parse_k_shot
from .protocol import run_benchmark
from .report import format_summary, format_table
from .store import RESULTS_CSV, RESULTS_JSON


# ======================================================================================
# Command line
# ======================================================================================
def _k_shot_arg(text: str) -> int | str:
    try:
        return parse_k_shot(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


#: Model settings that the benchmark protocol sets itself (per seed, per k-shot).
PROTOCOL_FIELDS = ("seed", "coreset_ratio", "normalization")


def add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``winclip-nb benchmark``: the protocol's (:class:`BenchmarkConfig`) and the
    model's (:class:`~winclip_nb.core.config.WinCLIPConfig`), derived from their fields."""
    protocol = parser.add_argument_group("benchmark")
    add_config_arguments(protocol, BenchmarkConfig)
    protocol.add_argument(
        "--k-shot",
        type=_k_shot_arg,
        nargs="+",
        default=["full"],
        metavar="{0,1,2,4,...,full}",
        help="0: zero-shot (text only); k: k drawn train/good images, every patch kept; full: "
        "all train/good images with the coreset (default: full). Several values run one after "
        "the other, each into <out>/<k-shot label>, then a summary table",
    )
    protocol.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_arguments(parser.add_argument_group("model"), WinCLIPConfig, exclude=PROTOCOL_FIELDS)


def configs_from_args(args: argparse.Namespace) -> list[BenchmarkConfig]:
    """One validated :class:`BenchmarkConfig` per ``--k-shot`` value.

    With several values each run writes into ``<out>/<k-shot label>`` (e.g.
    ``results/benchmark/zero-shot``), so they can be resumed one by one.
    """
    changes = config_changes(args, WinCLIPConfig)
    model = WinCLIPConfig(**{k: v for k, v in changes.items() if k not in PROTOCOL_FIELDS})
    values = config_changes(args, BenchmarkConfig)
    values.pop("k_shot", None)
    shots = list(dict.fromkeys(getattr(args, "k_shot", ["full"])))
    out = values.pop("out", BenchmarkConfig.out)
    configs = []
    for k in shots:
        k_out = out if len(shots) == 1 else str(Path(out) / k_shot_label(k))
        configs.append(BenchmarkConfig(model=model, k_shot=k, out=k_out, **values).validate())
    return configs


def config_from_args(args: argparse.Namespace) -> BenchmarkConfig:
    """The :class:`BenchmarkConfig` of parsed options with a single ``--k-shot`` value."""
    configs = configs_from_args(args)
    if len(configs) != 1:
        raise ConfigError(f"expected one --k-shot value, got {len(configs)}")
    return configs[0]


def run_benchmark_cli(args: argparse.Namespace) -> int:
    """``winclip-nb benchmark``: run each k-shot, print the tables and where the files are."""
    configs = configs_from_args(args)
    runs = []
    for cfg in configs:
        results = run_benchmark(cfg, progress=not getattr(args, "no_progress", False))
        runs.append(results)
        print()
        print(format_table(results))
        out = Path(cfg.out)
        print(f"\nwritten: {out / RESULTS_JSON}, {out / RESULTS_CSV}", file=sys.stdout)
    if len(runs) > 1:
        print()
        print(format_summary(runs))
        if runs[0]["config"].get("random_weights"):
            print(RANDOM_WEIGHTS_BANNER)
    return 0
