"""Exercises a learner can check, with reference solutions that stay working.

Each exercise of a notebook is a code cell tagged ``exercise``: the learner replaces
``answer = ...`` with code, and the cell calls :func:`check`, which prints ``correct: ...``
or ``not yet: hint ...`` and never raises (an unanswered exercise says so). The notebook
parameter ``solutions=True`` makes the cells take :func:`solution` instead, the reference
answer kept here in the package; ``make test`` runs the notebooks that way and fails if
any check fails, so the solutions cannot rot.

An exercise is registered with :func:`exercise` on the function that solves it from the
notebook's own values (``**context``), plus a small ``example`` context for the tests::

    answer = ...  # your code: the probability of the anomalous anchor
    if solutions:
        answer = solution("02.two_anchor_probability", cos_normal=0.2, cos_anomalous=0.25)
    check("02.two_anchor_probability", answer, cos_normal=0.2, cos_anomalous=0.25)

Example:
    >>> check("00.example", 4, x=2)
    correct: 2 squared is 4.
    >>> check("00.example", 5, x=2)
    not yet: 5 is not it. Hint: multiply x by itself.
    >>> check("00.example", ..., x=2)
    not answered yet: what is x squared? Replace `answer = ...` with your code.
    >>> is_correct("00.example", 4, x=2)
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Numbers and arrays count as equal within these tolerances (``numpy.allclose``).
ATOL, RTOL = 1e-4, 1e-3


def as_array(values: Any) -> np.ndarray:
    """``values`` (numbers, lists, numpy arrays or torch tensors) as a float64 numpy array.

    >>> as_array([1, 2]).dtype
    dtype('float64')
    """
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def close(answer: Any, expected: Any) -> bool:
    """Equal, or all-close for numbers and arrays of the same shape (tensors included).

    >>> close(0.30001, 0.3), close([1, 2], [1, 2.5]), close("tokens", "tokens")
    (True, False, True)
    """
    if isinstance(expected, (str, bool)) or expected is None:
        return bool(answer == expected)
    a, e = as_array(answer), as_array(expected)
    return a.shape == e.shape and bool(np.allclose(a, e, atol=ATOL, rtol=RTOL))


@dataclass(frozen=True)
class Exercise:
    """One checkable exercise: its question, the reference solution, a hint."""

    name: str
    question: str
    hint: str
    solve: Callable[..., Any]
    example: Callable[[], dict[str, Any]]
    compare: Callable[[Any, Any], bool] = close
    explain: Callable[[Any], str] | None = None


#: Every registered exercise by name (``"<notebook number>.<name>"``).
EXERCISES: dict[str, Exercise] = {}


def exercise(
    name: str,
    question: str,
    hint: str,
    example: Callable[[], dict[str, Any]],
    compare: Callable[[Any, Any], bool] = close,
    explain: Callable[[Any], str] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated function as the reference solution of exercise ``name``.

    ``example()`` returns a context the tests solve and check; ``explain(expected)``, if
    given, is printed after a correct answer (one sentence on what it means).
    """

    def register(solve: Callable[..., Any]) -> Callable[..., Any]:
        if name in EXERCISES:
            raise ValueError(f"exercise {name!r} is registered twice")
        EXERCISES[name] = Exercise(name, question, hint, solve, example, compare, explain)
        return solve

    return register


def _get(name: str) -> Exercise:
    if name not in EXERCISES:
        raise KeyError(f"no exercise {name!r}; known: {', '.join(sorted(EXERCISES))}")
    return EXERCISES[name]


def solution(name: str, **context: Any) -> Any:
    """The reference answer of exercise ``name`` for the notebook's values ``context``."""
    return _get(name).solve(**context)


def is_correct(name: str, answer: Any, **context: Any) -> bool:
    """True if ``answer`` solves exercise ``name`` for ``context`` (silent, never raises)."""
    if answer is ... or answer is None:
        return False
    ex = _get(name)
    try:
        return bool(ex.compare(answer, ex.solve(**context)))
    except Exception:  # noqa: BLE001 - any answer is just wrong, never a traceback
        return False


def check(name: str, answer: Any, **context: Any) -> None:
    """Print whether ``answer`` solves exercise ``name`` for ``context``.

    Prints ``correct: ...``, ``not yet: ... Hint: ...`` (an answer of the wrong value, type
    or shape) or ``not answered yet: ...`` (``...`` or None); never raises, and returns
    nothing, so a notebook cell shows only the message (:func:`is_correct` returns it).
    """
    ex = _get(name)
    if answer is ... or answer is None:
        print(f"not answered yet: {ex.question} Replace `answer = ...` with your code.")
    elif is_correct(name, answer, **context):
        expected = ex.solve(**context)
        print("correct: " + (ex.explain(expected) if ex.explain else "well done."))
    else:
        shown = repr(answer) if len(repr(answer)) <= 60 else type(answer).__name__
        print(f"not yet: {shown} is not it. Hint: {ex.hint}")


@exercise(
    "00.example",
    question="what is x squared?",
    hint="multiply x by itself.",
    example=lambda: {"x": 3},
    explain=lambda expected: f"2 squared is {expected}.",
)
def _square(x: float) -> float:
    return x * x


from . import nb00, nb01, nb02, nb03, nb04, nb05, nb06, nb07, nb08, nb09  # noqa: E402,F401 - each notebook's exercises register on import

__all__ = [
    "EXERCISES", "Exercise", "as_array", "check", "close", "exercise", "is_correct", "solution",
]  # fmt: skip
