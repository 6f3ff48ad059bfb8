"""Size budgets of the package (``make loc``): code lines, largest functions and classes,
long files, and the places that ask which method is running.

*Code lines* are lines that are not blank, not comments and not docstrings, so
documentation is never what a budget cuts. Budgets checked (``--check`` exits 1 when one
is missed):

- ``core/`` without the method files other than the token path: at most 900 code lines
  (the shared image backbone, method presets and set scoring that the second model
  family needed were paid for by simplifying the shared code; the new methods live in
  their own files);
- no function in ``core/`` over 40 code lines, no class over 200;
- no file in the package over 600 lines in all;
- at most 2 places in the package that compare a method name or key a lookup by one
  (the registry and config validation).

Usage::

    python benchmarks/loc.py            # the table
    python benchmarks/loc.py --check    # the table, exit 1 if a budget is missed
"""

from __future__ import annotations

import argparse
import ast
import io
import sys
import tokenize
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "winclip_nb"
#: Method files of core/ beyond the token path (the token path is scorers.py).
METHOD_FILES = ("windows.py", "anomalydino.py", "musc.py")
BUDGETS = {
    "core_code_lines": 900,
    "function_code_lines": 40,
    "class_code_lines": 200,
    "file_lines": 600,
    "method_name_places": 2,
}


def code_lines(source: str) -> set[int]:
    """Line numbers holding code: not blank, not a comment, not part of a docstring."""
    tree = ast.parse(source)
    docstrings: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (
            tokenize.COMMENT,
            tokenize.NL,
            tokenize.NEWLINE,
            tokenize.INDENT,
            tokenize.DEDENT,
            tokenize.ENDMARKER,
        ):
            continue
        lines.update(range(tok.start[0], tok.end[0] + 1))
    return lines - docstrings


def method_names() -> tuple[str, ...]:
    sys.path.insert(0, str(PACKAGE.parent))
    from winclip_nb.core.scorers import SCORERS

    return tuple(SCORERS)


def method_name_places(tree: ast.AST, names: tuple[str, ...]) -> list[int]:
    """Lines that compare with a method name, or key a dict literal by one."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            parts = [node.left, *node.comparators]
            if any(isinstance(p, ast.Constant) and p.value in names for p in parts):
                found.append(node.lineno)
            elif any(isinstance(p, ast.Attribute) and p.attr == "method" for p in parts):
                found.append(node.lineno)
        elif isinstance(node, ast.Dict):
            if any(isinstance(k, ast.Constant) and k.value in names for k in node.keys):
                found.append(node.lineno)
    return found


def measure() -> dict:
    names = method_names()
    files, functions, classes, places = {}, [], [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        source = path.read_text(encoding="utf-8")
        code = code_lines(source)
        files[rel] = {"lines": source.count("\n"), "code": len(code)}
        tree = ast.parse(source)
        places += [f"{rel}:{line}" for line in method_name_places(tree, names)]
        for node in ast.walk(tree):
            span = set(range(getattr(node, "lineno", 0), getattr(node, "end_lineno", 0) + 1))
            item = (
                len(span & code),
                f"{rel}:{getattr(node, 'lineno', 0)} {getattr(node, 'name', '')}",
            )
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append(item)
            elif isinstance(node, ast.ClassDef):
                classes.append(item)
    core = {k: v for k, v in files.items() if k.startswith("core/")}
    core_token = {k: v for k, v in core.items() if Path(k).name not in METHOD_FILES}
    in_core = [f for f in functions if f[1].startswith("core/")]
    core_classes = [c for c in classes if c[1].startswith("core/")]
    return {
        "package": {
            "files": len(files),
            "lines": sum(f["lines"] for f in files.values()),
            "code": sum(f["code"] for f in files.values()),
        },
        "core": {
            "lines": sum(f["lines"] for f in core.values()),
            "code": sum(f["code"] for f in core.values()),
        },
        "core_code_lines": sum(f["code"] for f in core_token.values()),
        "largest_function": max(functions),
        "largest_class": max(classes),
        "largest_core_function": max(in_core, default=(0, "-")),
        "largest_core_class": max(core_classes, default=(0, "-")),
        "long_core_functions": sorted(f for f in in_core if f[0] > BUDGETS["function_code_lines"]),
        "long_core_classes": sorted(c for c in core_classes if c[0] > BUDGETS["class_code_lines"]),
        "long_files": sorted(
            (v["lines"], k) for k, v in files.items() if v["lines"] > BUDGETS["file_lines"]
        ),
        "largest_file": max((v["lines"], k) for k, v in files.items()),
        "method_name_places": places,
        "files": files,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a budget is missed")
    parser.add_argument("--files", action="store_true", help="list every file")
    args = parser.parse_args(argv)
    m = measure()
    b = BUDGETS
    fn, cl, fi = m["largest_core_function"], m["largest_core_class"], m["largest_file"]
    places = m["method_name_places"]
    pkg = m["package"]
    rows = [
        ("package: files / lines / code lines", f"{pkg['files']} / {pkg['lines']} / {pkg['code']}"),
        ("core/: lines / code lines", f"{m['core']['lines']} / {m['core']['code']}"),
        ("core/ without method files: code lines",
         f"{m['core_code_lines']} (budget {b['core_code_lines']})"),
        ("largest function (code lines)", f"{m['largest_function'][0]} {m['largest_function'][1]}"),
        ("largest class (code lines)", f"{m['largest_class'][0]} {m['largest_class'][1]}"),
        ("largest function in core/", f"{fn[0]} {fn[1]} (budget {b['function_code_lines']})"),
        ("largest class in core/", f"{cl[0]} {cl[1]} (budget {b['class_code_lines']})"),
        ("largest file (lines)", f"{fi[0]} {fi[1]} (budget {b['file_lines']})"),
        ("places comparing a method name",
         f"{len(places)} {places} (budget {b['method_name_places']})"),
    ]  # fmt: skip
    width = max(len(r[0]) for r in rows)
    print("\n".join(f"{label:<{width}}  {value}" for label, value in rows))
    if args.files:
        for name, f in sorted(m["files"].items()):
            print(f"  {name:<28} {f['lines']:>5} lines {f['code']:>5} code")
    missed = [
        *(
            f"core code lines {m['core_code_lines']}"
            for _ in [0]
            if m["core_code_lines"] > BUDGETS["core_code_lines"]
        ),
        *(f"long function {n} {s}" for n, s in m["long_core_functions"]),
        *(f"long class {n} {s}" for n, s in m["long_core_classes"]),
        *(f"long file {k} ({n} lines)" for n, k in m["long_files"]),
        *(
            ["method names compared in " + ", ".join(m["method_name_places"])]
            if len(m["method_name_places"]) > BUDGETS["method_name_places"]
            else []
        ),
    ]
    for line in missed:
        print(f"OVER BUDGET: {line}")
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
