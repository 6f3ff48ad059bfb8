"""Exercises a learner can check: every registered exercise accepts its reference solution,
reports a wrong answer as wrong (never raising), and the notebooks with exercises run
with ``solutions=True`` with every check correct (in a temporary copy, reference mode)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import nbformat
import numpy as np
import pytest

from winclip_nb.nb import runner
from winclip_nb.nb.exercises import EXERCISES, check, close, is_correct, solution

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"


def printed(name: str, answer, **context) -> tuple[bool, str]:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert check(name, answer, **context) is None  # a cell shows only the message
    text = buffer.getvalue()
    assert is_correct(name, answer, **context) == text.startswith("correct: "), text
    return text.startswith("correct: "), text


def wrong(answer):
    """An answer that differs from ``answer`` (a number off by 10 %, a flipped flag, ...)."""
    if isinstance(answer, bool):
        return not answer
    if isinstance(answer, str):
        return answer + "_not"
    if hasattr(answer, "detach"):
        answer = answer.detach().cpu().numpy()
    array = np.asarray(answer, dtype=float)
    return array * 1.1 + 0.5


def notebooks_with_exercises() -> list[str]:
    found = []
    for path in sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        if any("exercise" in c.metadata.get("tags", []) for c in nb.cells):
            found.append(path.name)
    return found


@pytest.mark.parametrize("name", sorted(EXERCISES))
def test_the_solution_is_correct_and_a_wrong_answer_is_not(name: str) -> None:
    context = EXERCISES[name].example()
    answer = solution(name, **context)
    ok, text = printed(name, answer, **context)
    assert ok and text.startswith("correct"), text
    ok, text = printed(name, wrong(answer), **context)
    assert not ok and text.startswith("not yet: ") and "Hint: " in text, text


@pytest.mark.parametrize("name", sorted(EXERCISES))
def test_unanswered_or_nonsense_answers_never_raise(name: str) -> None:
    context = EXERCISES[name].example()
    ok, text = printed(name, ..., **context)
    assert not ok and text.startswith("not answered yet: ")
    for nonsense in ("abc", [1, 2, 3], {"a": 1}, object()):
        ok, text = printed(name, nonsense, **context)
        assert not ok and text.startswith("not yet: "), text


def test_close() -> None:
    assert close(np.float32(0.5), 0.50001) and not close([0.5], 0.5)  # shapes must match
    assert close(True, True) and not close(False, True)  # flags compare exactly


def test_each_notebook_with_exercises_has_at_least_two_and_checks_each() -> None:
    for name in notebooks_with_exercises():
        nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
        cells = [c for c in nb.cells if "exercise" in c.metadata.get("tags", [])]
        assert len(cells) >= 2, name
        for cell in cells:
            assert "check(" in cell.source and "if solutions:" in cell.source, cell.source
            outputs = "".join(o.get("text", "") for o in cell.get("outputs", []))
            assert outputs.startswith("not answered yet: "), (name, outputs)  # as committed


def test_notebooks_pass_their_checks_with_the_solutions(tmp_path: Path) -> None:
    names = notebooks_with_exercises()
    assert names, "no notebook has exercise cells"
    runner.run_notebooks(
        output_dir=tmp_path, parameters={"solutions": True}, notebooks=names, reference=True
    )
    for name in names:
        nb = nbformat.read(tmp_path / name, as_version=4)
        for cell in (c for c in nb.cells if "exercise" in c.metadata.get("tags", [])):
            outputs = "".join(o.get("text", "") for o in cell.get("outputs", []))
            assert "correct: " in outputs and "not yet" not in outputs, (name, cell.source)
