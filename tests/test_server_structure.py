"""The shape of `sot.server`: modules by concern, each small and documented; short route handlers; no asserts
standing in for checks; and the imports other code relies on still work."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import sot.server

SERVER = Path(sot.server.__file__).parent
MODULES = sorted(SERVER.glob("*.py"))
MAX_LINES = 400
MAX_FUNCTION_LINES = 60
MAX_HANDLER_LINES = 40


def functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]


def length(node: ast.AST) -> int:
    start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
    return (node.end_lineno or node.lineno) - start + 1


@pytest.mark.parametrize("path", MODULES, ids=[p.name for p in MODULES])
def test_each_module_is_small_documented_and_asserts_nothing(path: Path) -> None:
    source = path.read_text()
    tree = ast.parse(source)
    assert len(source.splitlines()) <= MAX_LINES
    docstring = ast.get_docstring(tree)
    assert docstring and docstring.strip(), "every module opens with a docstring"
    assert not [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Assert)]
    too_long = {f.name: length(f) for f in functions(tree) if length(f) > MAX_FUNCTION_LINES}
    assert not too_long


def test_route_handlers_are_short() -> None:
    handlers = []
    for path in MODULES:
        for function in functions(ast.parse(path.read_text())):
            routes = [
                d
                for d in function.decorator_list
                if isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr in ("get", "post")
            ]
            if routes:
                handlers.append((function.name, length(function)))
    assert {"chat_completions", "sot_stream", "list_models", "health"} <= {name for name, _ in handlers}
    assert [(name, n) for name, n in handlers if n > MAX_HANDLER_LINES] == []


def test_the_imports_other_code_uses_still_work() -> None:
    from sot.server import ServerSettings, create_app
    from sot.server.app import AnswerText, StopFilter
    from sot.server.app import ServerSettings as AppSettings
    from sot.server.app import create_app as app_create_app

    assert (ServerSettings, create_app) == (AppSettings, app_create_app)
    assert AnswerText().sent == "" and StopFilter(["x"]).push("ab") == "ab"
