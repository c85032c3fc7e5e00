"""README's promises each name the test behind them: every named test must exist, so a renamed or
deleted test cannot leave a promise unbacked without this failing."""

from __future__ import annotations

import ast
import re
from pathlib import Path

BASE = Path(__file__).resolve().parent.parent


def promise_rows() -> list[str]:
    text = (BASE / "README.md").read_text(encoding="utf-8")
    section = text.split("## Our promises, and the test behind each", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| promise")]


def named_tests(row: str) -> list[tuple[str, str | None]]:
    """(file under tests/, function or None) for each `file.py::name`, `::name` (same file as the
    one before) or bare `file.py` reference in the row's second cell."""
    refs, current = [], None
    for ref in re.findall(r"`([^`]+)`", row.split("|")[2]):
        path, _, name = ref.partition("::")
        current = path or current
        refs.append((current, name.split(" ")[0] or None))
    return refs


def test_the_promises_table_is_there_and_every_row_names_a_test():
    rows = promise_rows()
    assert len(rows) >= 15
    for row in rows:
        assert named_tests(row), row


def test_every_test_the_promises_name_exists():
    missing = []
    for row in promise_rows():
        for path, name in named_tests(row):
            file = BASE / "tests" / path
            if not file.is_file():
                missing.append(path)
                continue
            if name is None:
                continue
            functions = {
                node.name for node in ast.walk(ast.parse(file.read_text())) if isinstance(node, ast.FunctionDef)
            }
            if name not in functions:
                missing.append(f"{path}::{name}")
    assert not missing, missing
