"""The ``winclip-nb`` command line.

Subcommands::

    winclip-nb benchmark [options]          MVTec-AD benchmark (see winclip_nb.bench)
    winclip-nb merge DIR [DIR ...] --out D  combine benchmark shards into one table
    winclip-nb explain IMAGE ... [options]  detect and explain single images
    winclip-nb run-notebooks [options]      execute the tutorial notebooks
    winclip-nb bench-speed [options]        throughput of the detector
    winclip-nb grid plan|run|summary ...    a benchmark grid as a SLURM job array
    winclip-nb prefetch [options]           download weights into the caches, check MVTec-AD

Global flags (before or after the subcommand): ``--debug`` shows tracebacks,
``--offline`` sets ``HF_HUB_OFFLINE=1`` before anything heavy is imported.
Errors of this package (and missing or unreadable user paths) end with one line
``winclip-nb: error: <message>`` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence

from . import __version__
from .core.errors import WinCLIPError

PROG = "winclip-nb"
EXIT_OK = 0
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
GLOBAL_FLAGS = ("--debug", "--offline")
#: Errors shown as one line (user paths that do not exist or cannot be read are in here).
USER_ERRORS = (
    WinCLIPError,
    FileNotFoundError,
    PermissionError,
    NotADirectoryError,
    IsADirectoryError,
)


class _LazyCommand:
    """A subcommand whose module is imported only when it runs.

    Its own parser (``add_arguments(parser)``) parses the arguments after the
    subcommand name; a module that cannot be imported turns into ``not available``.
    """

    def __init__(self, module: str, add_name: str, run_name: str, help_text: str) -> None:
        self.module, self.add_name, self.run_name, self.help = module, add_name, run_name, help_text

    def load(
        self,
    ) -> tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]:
        module = importlib.import_module(self.module)
        return getattr(module, self.add_name), getattr(module, self.run_name)


LAZY_COMMANDS: dict[str, _LazyCommand] = {
    "explain": _LazyCommand(
        "winclip_nb.explain.report",
        "add_explain_arguments",
        "run_explain_cli",
        "detect anomalies in images and explain them (LLaVA or rule-based)",
    ),
    "run-notebooks": _LazyCommand(
        "winclip_nb.nb.runner",
        "add_run_notebooks_arguments",
        "run_notebooks_cli",
        "execute the tutorial notebooks",
    ),
    "grid": _LazyCommand(
        "winclip_nb.bench.grid",
        "add_grid_arguments",
        "run_grid_cli",
        "a benchmark grid as a SLURM job array: plan, run one task, summary",
    ),
    "bench-speed": _LazyCommand(
        "winclip_nb.bench.speed",
        "add_speed_arguments",
        "run_speed_cli",
        "measure the detector's throughput",
    ),
}


# ------------------------------------------------------------------------- parser
def _add_global_flags(parser: argparse.ArgumentParser, *, top_level: bool) -> None:
    """``--debug``/``--offline``; on subparsers they default to SUPPRESS so a value
    given before the subcommand is not overwritten."""
    default = False if top_level else argparse.SUPPRESS
    parser.add_argument(
        "--debug", action="store_true", default=default, help="show full tracebacks on errors"
    )
    parser.add_argument(
        "--offline",
        action="store_true",
        default=default,
        help="never contact the model hub (sets HF_HUB_OFFLINE=1)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The full parser (lazy subcommands are listed; their options parse when they run)."""
    from .bench.command import add_benchmark_arguments
    from .hub.prefetch import add_prefetch_arguments, run_prefetch

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Zero-/few-shot industrial anomaly detection with CLIP (WinCLIP style).",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _add_global_flags(parser, top_level=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    bench = sub.add_parser(
        "benchmark",
        help="MVTec-AD benchmark: per-class metrics and files",
        description="Run (or resume) the MVTec-AD benchmark.",
    )
    add_benchmark_arguments(bench)
    _add_global_flags(bench, top_level=False)
    bench.set_defaults(handler=_run_benchmark)

    merge = sub.add_parser(
        "merge",
        help="combine benchmark runs over disjoint classes",
        description="Combine the per-class results of several "
        "benchmark output folders (same settings) into one table.",
    )
    merge.add_argument("dirs", nargs="+", metavar="DIR", help="benchmark output folders")
    merge.add_argument("--out", required=True, metavar="DIR", help="folder for the merged results")
    _add_global_flags(merge, top_level=False)
    merge.set_defaults(handler=_run_merge)

    prefetch = sub.add_parser(
        "prefetch",
        help="download model weights for offline use",
        description="Download the CLIP weights (and LLaVA) into the "
        "normal caches so later runs work offline; check MVTec-AD.",
    )
    add_prefetch_arguments(prefetch)
    _add_global_flags(prefetch, top_level=False)
    prefetch.set_defaults(handler=run_prefetch)

    for name, command in LAZY_COMMANDS.items():
        sub.add_parser(name, help=command.help, add_help=False)
    return parser


# ------------------------------------------------------------------------ handlers
def _run_benchmark(args: argparse.Namespace) -> int:
    from .bench.command import run_benchmark_cli

    return run_benchmark_cli(args)


def _run_merge(args: argparse.Namespace) -> int:
    from .bench.report import format_table
    from .bench.store import merge_results

    results = merge_results(args.dirs, args.out)
    print(format_table(results))
    print(f"\nmerged {len(results['classes'])} classes into {args.out}")
    return EXIT_OK


def _run_lazy(name: str, rest: list[str], debug: bool) -> int:
    command = LAZY_COMMANDS[name]
    try:
        add_arguments, run = command.load()
    except (ImportError, AttributeError) as exc:
        if debug:
            raise
        print(f"{PROG} {name}: not available: {exc}", file=sys.stderr)
        return EXIT_ERROR
    parser = argparse.ArgumentParser(prog=f"{PROG} {name}", description=command.help)
    add_arguments(parser)
    args = parser.parse_args(rest)
    args.debug = debug
    return int(run(args) or 0)


# ---------------------------------------------------------------------------- main
def _split_lazy(argv: list[str]) -> tuple[str, list[str]] | None:
    """(lazy command, its arguments without global flags), or None for other commands."""
    for i, token in enumerate(argv):
        if token in GLOBAL_FLAGS:
            continue
        if token.startswith("-"):
            return None  # --help, --version, or an error argparse reports
        if token in LAZY_COMMANDS:
            return token, [t for t in argv[i + 1 :] if t not in GLOBAL_FLAGS]
        return None
    return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _one_line_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
    return f"{PROG}: warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (never raises SystemExit). Warnings
    show as one line each (``winclip-nb: warning: ...``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.formatwarning = _one_line_warning
    debug = "--debug" in argv
    if "--offline" in argv:  # before huggingface_hub is first imported
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        lazy = _split_lazy(argv)
        if lazy is not None:
            return _run_lazy(lazy[0], lazy[1], debug)
        args = build_parser().parse_args(argv)
        debug = bool(getattr(args, "debug", False))
        return int(args.handler(args) or 0)
    except SystemExit as exc:  # argparse: --help, --version, usage errors
        code = exc.code
        return code if isinstance(code, int) else (EXIT_OK if code is None else EXIT_ERROR)
    except USER_ERRORS as exc:
        if debug:
            traceback.print_exc()
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


__all__ = ["LAZY_COMMANDS", "build_parser", "main"]
