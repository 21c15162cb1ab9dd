"""The engine stays small enough to read (issue 15): no engine file over 400 lines and no function
in one over 60 lines, counted from its ``def`` to its last line (docstring included)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ["specdec/engine.py", "specdec/step.py", "specdec/driver.py", "specdec/runner.py", "specdec/api.py"]
MAX_FILE, MAX_FUNCTION = 400, 60


def long_functions(source: str, limit: int) -> list[tuple[str, int]]:
    """``(qualified name, lines)`` of every function or method longer than ``limit`` lines."""
    found = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            name = f"{prefix}{getattr(child, 'name', '')}"
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = child.end_lineno - child.lineno + 1
                if lines > limit:
                    found.append((name, lines))
            visit(child, f"{name}." if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  else prefix)
    visit(ast.parse(source), "")
    return found


@pytest.mark.parametrize("path", ENGINE)
def test_engine_files_and_functions_are_small(path):
    source = (ROOT / path).read_text()
    assert len(source.splitlines()) <= MAX_FILE, f"{path} has {len(source.splitlines())} lines (at most {MAX_FILE})"
    assert long_functions(source, MAX_FUNCTION) == [], f"{path}: functions over {MAX_FUNCTION} lines"


def test_the_counter_sees_long_functions_and_methods():
    """The check can fail: a 61-line method inside a class and a nested function are both caught."""
    sixty = "".join(["        x = 1\n"] * 60)
    source = "class A:\n    def f(self):\n" + sixty + "def g():\n    def h():\n" + sixty
    assert long_functions(source, MAX_FUNCTION) == [("A.f", 61), ("g", 62), ("g.h", 61)]
    assert long_functions(source, 62) == []
