"""The `distributed` marker: `pytest -m "not distributed"` leaves out every multi-process test."""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).parent


class _Collected:
    """A plugin that keeps the node ids a collection ended with (after `-m` deselected some)."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.ids = [item.nodeid for item in session.items]


def collect(*args: str) -> list[str]:
    """The node ids `pytest --collect-only *args` selects, collected in this process (no torch
    start-up to pay again)."""
    collected = _Collected()
    code = pytest.main(
        ["--collect-only", "-q", "-p", "no:cacheprovider", f"--rootdir={TESTS.parent}", *args],
        plugins=[collected],
    )
    assert code in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED), code
    return collected.ids


@pytest.mark.timeout(60)
def test_every_test_under_tests_distributed_is_marked_distributed() -> None:
    everything = collect(str(TESTS / "distributed"))
    assert everything  # the folder holds tests, so the two selections below say something
    assert collect("-m", "distributed", str(TESTS / "distributed")) == everything
    assert collect("-m", "not distributed", str(TESTS / "distributed")) == []


@pytest.mark.timeout(60)
def test_a_multi_process_test_elsewhere_carries_the_marker_itself() -> None:
    path = TESTS / "test_import_path.py"
    marked = collect("-m", "distributed", str(path))
    unmarked = collect("-m", "not distributed", str(path))
    real_run = "test_a_real_run_imports_the_library_but_the_users_model_from_the_working_directory"
    assert sorted(marked) == [
        f"tests/test_import_path.py::{real_run}[{style}]" for style in ("-m", "script")
    ]
    assert not set(marked) & set(unmarked) and unmarked  # the one-process tests stay unmarked


@pytest.mark.timeout(60)
def test_a_helper_named_testing_something_is_not_collected_as_a_test(tmp_path: Path) -> None:
    # pytest's default prefix "test" also matched testing_slowdown, once imported into
    # tests/train/test_timing.py: a helper ran as a test of its own.
    module = tmp_path / "test_with_a_helper.py"
    module.write_text(
        "def testing_slowdown(factor=1.0):\n    return factor\n\n\n"
        "def test_the_real_one():\n    assert testing_slowdown() == 1.0\n"
    )
    ids = collect("-c", str(TESTS.parent / "pyproject.toml"), str(module))
    assert [node.rpartition("::")[2] for node in ids] == ["test_the_real_one"]
