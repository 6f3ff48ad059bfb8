"""Command-line options derived from config dataclasses: one definition per setting.

Every field made with :func:`~winclip_nb.core.config.setting` carries its default, help
text and check; :func:`add_config_arguments` turns the fields of a dataclass into
``--options`` (``--text-weight 0.5``, ``--layers 6 9 11``, ``--method {tokens,windows}``)
without writing any of them twice, and :func:`config_changes` reads back only the
options a user actually gave.

Example:
    >>> import argparse
    >>> from winclip_nb.core.config import WinCLIPConfig
    >>> parser = argparse.ArgumentParser()
    >>> add_config_arguments(parser, WinCLIPConfig, only=("sigma", "layers"))
    >>> config_changes(parser.parse_args(["--sigma", "2", "--layers", "6", "11"]), WinCLIPConfig)
    {'layers': (6, 11), 'sigma': 2.0}
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Sequence
from typing import Any

#: Option names that differ from the field's (``--model`` for ``model_name``).
FLAGS = {"model_name": "--model", "pretrained": "--weights", "dataset_format": "--dataset"}


def _kind(cls: type, f: dataclasses.Field) -> tuple[Any, bool]:
    """(element type, is a sequence) of a field, from its annotation."""
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin in (tuple, list):
        return (args[0] if args else str), True
    if args and typing.get_origin(args[0]) in (tuple, list):
        return typing.get_args(args[0])[0], True
    base = args[0] if args else hint
    return (base if base in (int, float, str, bool) else str), False


def add_config_arguments(
    parser: argparse.ArgumentParser | Any,
    cls: type,
    *,
    only: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> None:
    """One ``--option`` per field of ``cls`` (all, or ``only``, minus ``exclude``).

    Options default to ``argparse.SUPPRESS``: an option not given is absent from the
    parsed namespace, so the dataclass's own default applies (written once, there).
    """
    for f in dataclasses.fields(cls):
        if (
            "help" not in f.metadata
            or f.name in exclude
            or (only is not None and f.name not in only)
        ):
            continue
        element, many = _kind(cls, f)
        default = f.default if f.default is not dataclasses.MISSING else None
        text = f.metadata["help"]
        if default is not None and "default" not in text:
            text += f" (default: {' '.join(map(str, default)) if many else default})"
        flag = FLAGS.get(f.name, "--" + f.name.replace("_", "-"))
        help_text = text.replace("%", "%%")  # argparse formats help with %
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if element is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = element
            kwargs["metavar"] = flag.lstrip("-").upper().replace("-", "_")
            if many:
                kwargs["nargs"] = "+"
        choices = f.metadata.get("choices")
        if choices:
            kwargs["choices"] = tuple(choices() if callable(choices) else choices)
            kwargs.pop("metavar", None)
        parser.add_argument(flag, **kwargs)


def config_changes(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` that ``args`` holds (given on the command line), typed."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    changes = {}
    for name, value in vars(args).items():
        if name in names:
            changes[name] = tuple(value) if isinstance(value, list) else value
    return changes
