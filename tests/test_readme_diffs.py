"""The README's own-loop diffs are what the example scripts contain (the scripts run elsewhere)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = {0: REPO / "examples" / "own_loop.py", 1: REPO / "examples" / "own_loop_pp.py"}


def readme_diffs() -> list[list[str]]:
    section = (REPO / "README.md").read_text().split("## Your own training loop", 1)[1]
    section = section.split("\n## ", 1)[0]
    return [block.splitlines() for block in re.findall(r"```diff\n(.*?)```", section, re.S)]


def test_the_readme_shows_both_diffs_and_the_data_parallel_one_stays_small() -> None:
    diffs = readme_diffs()
    assert len(diffs) == 2
    added = [line for line in diffs[0] if line.startswith("+")]
    assert len(added) <= 5


@pytest.mark.parametrize("index", [0, 1])
def test_each_diff_is_what_its_example_holds(index: int) -> None:
    lines = {line.strip() for line in EXAMPLES[index].read_text().splitlines()}
    for line in readme_diffs()[index]:
        sign, code = line[:1], line[1:].strip()
        if code in ("", "..."):
            continue
        if sign in ("+", " "):
            assert code in lines, f"{EXAMPLES[index].name} lacks: {code}"
        elif sign == "-" and index == 1:  # the pipeline diff starts from the data-parallel loop
            assert code not in lines, f"{EXAMPLES[index].name} still has: {code}"
