"""The notebooks' parameters, checked right after the ``parameters`` cell.

Every parameter a notebook takes (from papermill's ``-p``, or edited by hand) is checked by
:func:`check_parameters` before any work: its type, its range, that a path exists, that a
name is one the package knows. All problems are reported at once, each naming the
parameter, the value and what it accepts, as one :class:`~winclip_nb.core.errors.ConfigError`.

Rules that need the data are applied where the data is read
(:func:`~winclip_nb.nb.helpers.setup`, :func:`pick_sample`): a class or defect name that
is the notebook's default but is missing from the dataset (the synthetic ``disc`` on
MVTec-AD, say) falls back to the dataset's first one, with a printed note, so that a
notebook runs unchanged on other data; any other missing name is an error naming the
available ones. Reference mode (``WINCLIP_NB_REFERENCE=1``) overrides only ``weights``,
``device`` and ``data_root`` (random, CPU, the synthetic set) and the sizes a notebook
documents as shrunk there; every other parameter is used as given.

Example:
    >>> check_parameters("00_quickstart", {**DEFAULTS_00, "n_train": 0})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    winclip_nb.core.errors.ConfigError: bad parameters for notebook 00_quickstart: n_train=0 ...
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..core.config import NORMALIZATION_MODES, Check, distinct_ints, number, one_of
from ..core.errors import ConfigError


def text(optional: bool = False) -> Check:
    """A non-empty string (or None with ``optional``)."""

    def check(value: Any) -> str | None:
        if value is None and optional:
            return None
        ok = isinstance(value, str) and value.strip() != ""
        return None if ok else "a non-empty string" + (" or None" if optional else "")

    return check


def folder(optional: bool = True, must_exist: bool = True) -> Check:
    """An existing folder (or None / "" with ``optional``)."""

    def check(value: Any) -> str | None:
        if optional and (value is None or value == ""):
            return None
        if not isinstance(value, (str, Path)):
            return "a folder path" + (" or None" if optional else "")
        if must_exist and not Path(value).expanduser().is_dir():
            return "an existing folder" + (" or None" if optional else "")
        return None

    return check


def weights(value: Any) -> str | None:
    """``auto``, ``random``, an open_clip tag, or an existing checkpoint file."""
    if not isinstance(value, str) or not value.strip():
        return "'auto', 'random', an open_clip tag such as 'openai', or a checkpoint file"
    looks_like_file = "/" in value or value.endswith((".pt", ".pth", ".bin", ".safetensors"))
    if looks_like_file and not Path(value).expanduser().is_file():
        return "an existing checkpoint file (this one does not exist)"
    return None


def device(value: Any) -> str | None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    ok = value in ("auto", "cpu", "cuda") or (
        isinstance(value, str) and value.startswith("cuda:") and value[5:].isdigit()
    )
    return None if ok else "'auto', 'cpu', 'cuda' or 'cuda:N'"


def boolean(optional: bool = False) -> Check:
    def check(value: Any) -> str | None:
        ok = isinstance(value, bool) or (optional and value is None)
        return None if ok else "True or False" + (" or None" if optional else "")

    return check


def k_shot(allow_full: bool = True) -> Check:
    def check(value: Any) -> str | None:
        if allow_full and value == "full":
            return None
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return None
        return "an integer >= 0" + (" or 'full'" if allow_full else "")

    return check


def numbers(low: float, high: float, min_items: int = 1) -> Check:
    """A list of numbers in [low, high]."""

    def check(value: Any) -> str | None:
        ok = isinstance(value, (list, tuple)) and len(value) >= min_items
        ok = ok and all(number(low, high)(v) is None for v in value)
        return None if ok else f"a list of numbers in [{low}, {high}]"

    return check


def names(optional: bool = True) -> Check:
    """A list of names (or None)."""

    def check(value: Any) -> str | None:
        if value is None and optional:
            return None
        ok = isinstance(value, (list, tuple)) and value and all(text()(v) is None for v in value)
        return None if ok else "a list of names" + (" or None" if optional else "")

    return check


def count(minimum: int, optional: bool = False) -> Check:
    """A whole number (an ``int``, not ``6.0``) >= ``minimum`` (or None with ``optional``)."""

    def check(value: Any) -> str | None:
        if value is None and optional:
            return None
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
        return None if ok else f"an integer >= {minimum}" + (" or None" if optional else "")

    return check


def int_list(minimum: int) -> Check:
    """A list (or tuple) of distinct integers >= ``minimum``."""

    def check(value: Any) -> str | None:
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        )
        if ok and distinct_ints(minimum)(value) is None:
            return None
        return f"a list of distinct integers >= {minimum} (lists go with -y: -y NAME '[9, 10]')"

    return check


def grid_cell(value: Any) -> str | None:
    ok = value is None or (
        isinstance(value, (list, tuple)) and len(value) == 2
        and all(isinstance(v, int) and v >= 0 for v in value)
    )  # fmt: skip
    return None if ok else "None or (row, col), two integers >= 0"


COMMON: dict[str, Check] = {
    "data_root": folder(),
    "class_name": text(),
    "weights": weights,
    "device": device,
    "seed": count(0),
}
#: Each notebook's parameters and their checks (the names must match its parameters cell).
PARAMETERS: dict[str, dict[str, Check]] = {
    "00_quickstart": {**COMMON, "n_train": count(1), "defect": text(),
                      "out_dir": folder(must_exist=False), "solutions": boolean()},
    "01_token_extraction": {**COMMON, "layers": int_list(0),
                            "n_per_defect": count(1), "query_patch": grid_cell,
                            "solutions": boolean()},
    "02_text_anchors": {**COMMON, "n_good": count(1),
                        "n_per_defect": count(1),
                        "defect_coverage": number(0, 1, open_low=True),
                        "solutions": boolean()},
    "03_coreset_memory": {**COMMON, "n_train": count(1),
                          "coreset_ratio": number(0, 1, open_low=True),
                          "ratios": numbers(1e-9, 1), "solutions": boolean()},
    "04_fusion_foreground_mad": {
        **COMMON, "n_train": count(1), "defect": text(),
        "text_weight": number(0), "nn_weight": number(0), "sigma": number(0),
        "threshold": number(), "normalization": one_of(NORMALIZATION_MODES),
        "fg_threshold": number(0, 1), "interactive": boolean(optional=True),
        "solutions": boolean(),
    },
    "05_llava_explanations": {
        **COMMON, "n_train": count(1), "defect": text(),
        "top_k": count(1), "top_n": count(1),
        "llava_model": text(), "llava_device": device, "out_dir": folder(must_exist=False),
        "solutions": boolean(),
    },
    "06_mvtec_benchmark": {
        **{k: v for k, v in COMMON.items() if k != "class_name"},
        "classes": names(), "small_classes": names(optional=False), "k_shot": k_shot(),
        "max_images": count(1), "small_max_images": count(1),
        "image_size": count(32), "save_examples": count(0),
        "out_dir": folder(must_exist=False), "force": boolean(), "solutions": boolean(),
    },
    "07_winclip_windows": {"window_scales": int_list(1), "seed": count(0), "solutions": boolean()},
    "08_winclip_plus": {
        **COMMON, "tokens_weights": weights, "image_size": count(32, optional=True),
        "window_scales": int_list(1), "k_shot": k_shot(allow_full=False),
        "n_test": count(1), "speed_repeats": count(1), "solutions": boolean(),
    },
    "09_beyond_winclip": {
        **COMMON, "image_size": count(32, optional=True), "k_shot": k_shot(allow_full=False),
        "n_good": count(1), "speed_repeats": count(1), "solutions": boolean(),
    },
}  # fmt: skip
#: Defaults of notebook 00 (for the example above and the tests).
DEFAULTS_00 = {"data_root": None, "class_name": "disc", "weights": "auto", "device": "auto",
               "n_train": 6, "defect": "hole", "out_dir": None, "solutions": False,
               "seed": 0}  # fmt: skip


def check_parameters(notebook: str, values: Mapping[str, Any]) -> None:
    """Check a notebook's parameters (``values``: e.g. ``globals()``).

    Raises :class:`ConfigError` listing every bad one: name, value, what it accepts.
    """
    spec = PARAMETERS.get(notebook)
    if spec is None:
        known = ", ".join(sorted(PARAMETERS))
        raise ConfigError(f"no parameter checks for notebook {notebook!r}; known: {known}")
    problems = []
    for name, check in spec.items():
        if name not in values:
            problems.append(f"{name} is missing")
            continue
        try:
            problem = check(values[name])
        except (TypeError, ValueError):
            problem = (check.__doc__ or "another value").strip().rstrip(".")
        if problem:
            problems.append(f"{name}={values[name]!r} must be {problem}")
    if problems:
        raise ConfigError(f"bad parameters for notebook {notebook}: " + "; ".join(problems))


def known_names(name: str, chosen: Sequence[str], available: Sequence[str]) -> list[str]:
    """``chosen`` if every one is in ``available``, else a :class:`ConfigError` naming the
    parameter, the unknown names and the available ones.

    >>> known_names("classes", ["disc"], ["disc", "weave"])
    ['disc']
    """
    unknown = [c for c in chosen if c not in available]
    if unknown:
        raise ConfigError(
            f"{name}={list(chosen)!r}: {', '.join(map(repr, unknown))} not in this dataset; "
            f"available: {', '.join(available)}"
        )
    return list(chosen)


def pick_sample(data: Any, defect: str, default: str, log: Callable[[str], None] = print) -> Any:
    """The first test image of ``defect``; the notebook's ``default`` defect missing from
    the data falls back to the last test image with a note, any other name is an error."""
    found = next((s for s in data.test if s.defect == defect), None)
    if found is not None:
        return found
    if defect == default:
        log(f"defect {defect!r} is not in class {data.name!r}; using {data.test[-1].path.name}")
        return data.test[-1]
    raise ConfigError(
        f"defect={defect!r} is not a defect type of class {data.name!r}; "
        f"available: {', '.join(data.defect_types) or 'none'}"
    )
