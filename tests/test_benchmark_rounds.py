"""The benchmarks' round statistics (benchmarks/support/rounds.py): orders, ratios, verdicts."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

# Loaded by path: benchmarks/ is not a package, and its `support` name should not shadow
# anything on the tests' import path.
_PATH = Path(__file__).parents[1] / "benchmarks" / "support" / "rounds.py"
_SPEC = importlib.util.spec_from_file_location("benchmark_rounds", _PATH)
assert _SPEC is not None and _SPEC.loader is not None
rounds = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = rounds  # dataclasses look their module up while building the class
_SPEC.loader.exec_module(rounds)


def test_every_side_goes_first_in_turn_with_the_twin_in_the_rotation() -> None:
    orders = rounds.round_orders(["a", "b"], 4, aa="a")
    assert orders == [
        ["a", "b", "a_again"],
        ["b", "a_again", "a"],
        ["a_again", "a", "b"],
        ["a", "b", "a_again"],
    ]


def test_an_aa_side_must_be_one_of_the_sides() -> None:
    with pytest.raises(ValueError, match="'c'"):
        rounds.round_orders(["a", "b"], 2, aa="c")


def test_interleave_runs_the_twin_as_its_side_and_keeps_running_order() -> None:
    calls: list[str] = []
    seen: list[list[str]] = []

    def side(name: str):
        def call() -> int:  # returns its place in the call sequence
            calls.append(name)
            return len(calls)

        return call

    samples = rounds.interleave(
        {"a": side("a"), "b": side("b")},
        2,
        aa="a",
        on_round=lambda index, results: seen.append(list(results)),
    )
    assert calls == ["a", "b", "a", "b", "a", "a"]
    assert seen == [["a", "b", "a_again"], ["b", "a_again", "a"]]
    assert samples == {"a": [1, 6], "b": [2, 4], "a_again": [3, 5]}


def test_median_range_and_resolved_verdict() -> None:
    samples = {
        "ours": [2.0, 2.0, 2.0, 2.0, 2.0],
        "theirs": [1.0, 1.0, 1.25, 0.8, 1.0],
        "ours_again": [2.0, 2.1, 1.9, 2.0, 2.0],
    }
    comparison = rounds.Comparison.between(samples, "ours", "theirs", aa="ours")
    assert comparison.ratios == (2.0, 2.0, 1.6, 2.5, 2.0)
    assert comparison.median == 2.0
    assert comparison.noise == pytest.approx(0.05)
    assert comparison.resolved
    figures = comparison.figures("speedup")
    assert figures == {
        "speedup": 2.0,
        "speedup_range": [1.6, 2.5],
        "speedup_aa_range": [0.95, 1.05],
        "speedup_resolved": True,
    }


def test_an_effect_within_the_aa_noise_is_not_resolved() -> None:
    comparison = rounds.Comparison.of([1.02, 0.99, 1.04], aa_ratios=[1.01, 0.97, 1.02])
    assert comparison.median == 1.02
    assert not comparison.resolved
    assert "not resolved" in comparison.line("overhead_ratio")


def test_a_comparison_needs_rounds_and_aa_rounds() -> None:
    with pytest.raises(ValueError):
        rounds.Comparison.of([1.0], aa_ratios=[])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    rounds.add_rounds_flag(parser, default=5)
    parser.add_argument("--steps", type=int, default=40)
    return parser


def test_tiny_swaps_the_defaults_and_a_flag_given_still_wins() -> None:
    tiny = {"rounds": 1, "steps": 2}
    full = rounds.parse_with_tiny(_parser(), tiny, [])
    assert (full.tiny, full.rounds, full.steps) == (False, 5, 40)
    small = rounds.parse_with_tiny(_parser(), tiny, ["--tiny"])
    assert (small.tiny, small.rounds, small.steps) == (True, 1, 2)
    chosen = rounds.parse_with_tiny(_parser(), tiny, ["--tiny", "--steps", "3"])
    assert (chosen.rounds, chosen.steps) == (1, 3)


def test_tiny_sizes_must_name_the_parsers_flags() -> None:
    with pytest.raises(ValueError, match="stepz"):
        rounds.parse_with_tiny(_parser(), {"stepz": 2}, [])
