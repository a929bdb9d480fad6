"""The house: arrows point one way (size is a smell to look at, never a gate: STYLE.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "shardwise"


def imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return modules


@pytest.mark.parametrize("path", sorted((SRC / "parallel").rglob("*.py")), ids=str)
def test_parallel_modules_import_neither_data_nor_train(path: Path) -> None:
    bad = {m for m in imported_modules(path) if m.startswith(("shardwise.data", "shardwise.train"))}
    assert not bad, f"{path.relative_to(SRC)} imports {sorted(bad)}"


def test_technique_declarations_load_no_torch() -> None:
    """Declarations are read by the CLI's --help, which stays instant: their runtime (torch) is
    imported when a technique is applied or costed."""
    probe = "import sys, shardwise.techniques; print('torch' in sys.modules)"
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert loaded.strip() == "False"


@pytest.mark.parametrize("path", sorted((SRC / "techniques").glob("*.py")), ids=str)
def test_technique_declarations_read_settings_not_the_config(path: Path) -> None:
    """At module level a declaration imports neither torch nor the config, data or trainer."""
    tree = ast.parse(path.read_text(), str(path))
    top = {alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    top |= {n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
    bad = {m for m in top if m.startswith(("torch", "shardwise.config", "shardwise.data"))}
    bad |= {m for m in top if m.startswith("shardwise.train")}
    assert not bad, f"{path.relative_to(SRC)} imports {sorted(bad)} at module level"


def test_the_preflight_reaches_no_train_module_but_the_builder() -> None:
    probe = "import sys, shardwise.preflight; print(sorted(m for m in sys.modules))"
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    train_modules = {m for m in eval(loaded) if m.startswith("shardwise.train.")}
    assert train_modules == {"shardwise.train.build"}


def test_the_launcher_loads_no_train_module() -> None:
    # What the launcher and its workers share is handoff.py's; the launcher never needs train/.
    probe = "import sys, shardwise.agent; print(sorted(m for m in sys.modules))"
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert "shardwise.agent" in eval(loaded)
    train_modules = [m for m in eval(loaded) if m.startswith("shardwise.train")]
    assert train_modules == []


def test_the_handoff_imports_nothing_of_either_side() -> None:
    shardwise = {m for m in imported_modules(SRC / "handoff.py") if m.startswith("shardwise")}
    assert shardwise <= {"shardwise.distributed"}, shardwise


def test_only_the_fault_module_reads_the_testing_variables() -> None:
    # Fault injection is read once, at the worker's entry, and handed in (STYLE.md).
    readers = [
        str(path.relative_to(SRC))
        for path in sorted(SRC.rglob("*.py"))
        if "SHARDWISE_TESTING_" in path.read_text(encoding="utf-8")
    ]
    assert readers == ["train/faults.py"]
