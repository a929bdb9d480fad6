"""The built-in models go through the path users' models take: no module but their own names them.

A check by type (`isinstance(model, TransformerLM)`) or by built-in name (`== "transformer"`)
elsewhere is a code path users' models never reach; the built-ins say what they need through the
convention any model may follow (`layer_names`, `forward_layer`, `layer_uses`, `tp_styles`, the
probed call), and the registry says what only a name can tell (models/__init__.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "shardwise"
BUILTIN_TYPES = frozenset({"RecurrentLM", "TransformerLM"})
BUILTIN_NAMES = frozenset({"lstm", "gru", "transformer"})
# The built-ins themselves, and the registry that builds them by name.
OWN = frozenset({"models/__init__.py", "models/recurrent.py", "models/transformer.py"})
# Choices about the built-ins made from the --model name alone, before any model is built and
# without torch (the config is read by --help): defaults and rules, not code paths.
ALLOWED = {
    "config/data_settings.py": "the default --model is the LSTM",
    "config/train_config.py": "the peak learning rate measured per model family (a recipe), "
    "and packing: on by default for the Transformer, refused for other names",
}


def docstrings(tree: ast.AST) -> set[int]:
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, kinds)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }


def is_builtin(value: object) -> bool:
    return isinstance(value, str) and value in BUILTIN_NAMES | BUILTIN_TYPES


def builtin_references(path: Path) -> list[str]:
    """`line: what` for each reference to a built-in's type or name outside docstrings."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    skipped = docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in BUILTIN_TYPES:
            found.append(f"{node.lineno}: {node.id}")
        elif isinstance(node, ast.Attribute) and node.attr in BUILTIN_TYPES:
            found.append(f"{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom):
            names = [alias.name for alias in node.names if alias.name in BUILTIN_TYPES]
            found += [f"{node.lineno}: import {name}" for name in names]
        elif isinstance(node, ast.Constant) and id(node) not in skipped and is_builtin(node.value):
            found.append(f"{node.lineno}: {node.value!r}")
    return found


CHECKED = [
    path
    for path in sorted(SRC.rglob("*.py"))
    if str(path.relative_to(SRC)) not in OWN | set(ALLOWED)
]


@pytest.mark.parametrize("path", CHECKED, ids=lambda path: str(path.relative_to(SRC)))
def test_no_module_but_the_built_ins_own_names_them(path: Path) -> None:
    assert builtin_references(path) == [], f"{path.relative_to(SRC)} special-cases a built-in"


def test_the_check_sees_a_special_case(tmp_path: Path) -> None:
    special = tmp_path / "special.py"
    special.write_text(
        '"""Mentioning "transformer" in a docstring is fine."""\n'
        "from shardwise.models import TransformerLM\n"
        "def f(model, name):\n"
        "    return isinstance(model, models.RecurrentLM) or name == 'gru'\n"
    )
    assert builtin_references(special) == [
        "2: import TransformerLM",
        "4: .RecurrentLM",
        "4: 'gru'",
    ]


def test_the_exceptions_are_modules_that_exist() -> None:
    assert all((SRC / name).is_file() for name in [*OWN, *ALLOWED])
