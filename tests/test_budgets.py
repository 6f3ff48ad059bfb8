"""The package's size budgets (``make loc``): a small core that learners can read."""

from __future__ import annotations

import importlib.util
from pathlib import Path

LOC = Path(__file__).resolve().parents[1] / "benchmarks" / "loc.py"


def _loc():
    spec = importlib.util.spec_from_file_location("loc", LOC)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_code_lines_skip_docstrings_comments_and_blanks():
    loc = _loc()
    source = 'def f(x):\n    """Doc\n    more."""\n\n    # comment\n    return x  # trailing\n'
    assert loc.code_lines(source) == {1, 6}


def test_method_name_places_are_found():
    import ast

    loc = _loc()
    tree = ast.parse('if cfg.method == "windows":\n    pass\nTABLE = {"tokens": 1}\nx = y == 2\n')
    assert loc.method_name_places(tree, ("tokens", "windows")) == [1, 3]


def test_budgets_are_met():
    loc = _loc()
    m = loc.measure()
    budgets = loc.BUDGETS
    assert m["core_code_lines"] <= budgets["core_code_lines"]
    assert not m["long_core_functions"] and not m["long_core_classes"], (
        m["long_core_functions"], m["long_core_classes"])  # fmt: skip
    assert not m["long_files"], m["long_files"]
    assert len(m["method_name_places"]) <= budgets["method_name_places"], m["method_name_places"]
