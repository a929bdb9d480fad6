"""Interleaved rounds for benchmarks on a noisy shared machine: who runs when, and what the
per-round ratios say.

    samples = interleave({"ours": time_ours, "theirs": time_theirs}, rounds=5, aa="ours")
    overhead = Comparison.between(samples, "ours", "theirs", aa="ours")  # ours / theirs

Every round runs each side once, plus an A/A twin (`again("ours")`, the same side a second
time), in an order rotated one place per round so that no side always goes first. A round's
ratio compares sides that ran minutes apart at most, so load that drifts over the run falls on
both; the median of the per-round ratios is the figure, their min-max its spread, and the
twin's ratios to its side (the A/A band) the noise floor: a ratio whose distance from 1 does
not exceed the A/A noise is "not resolved". Pure Python: no torch, cheap to import and test.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

AGAIN = "_again"


def again(side: str) -> str:
    """The name of `side`'s A/A twin: `again("ours") == "ours_again"`."""
    return side + AGAIN


def base_side(name: str) -> str:
    """The side a name runs: `base_side("ours_again") == base_side("ours") == "ours"`."""
    return name.removesuffix(AGAIN)


def round_orders(sides: Sequence[str], rounds: int, aa: str | None = None) -> list[list[str]]:
    """Each round's running order: `sides` (and `aa`'s twin last) rotated one place a round.

    round_orders(["a", "b"], 3, aa="a")  # [[a, b, a_again], [b, a_again, a], [a_again, a, b]]

    Rotation rather than a fixed order: a later run in a process profits from warm caches, and
    the first run of a round follows whatever the machine did in between.
    """
    if aa is not None and aa not in sides:
        raise ValueError(f"the A/A side {aa!r} is not one of {list(sides)}")
    names = [*sides, *([again(aa)] if aa is not None else [])]
    return [names[r % len(names) :] + names[: r % len(names)] for r in range(rounds)]


def interleave(
    sides: Mapping[str, Callable[[], T]],
    rounds: int,
    aa: str | None = None,
    on_round: Callable[[int, dict[str, T]], None] | None = None,
) -> dict[str, list[T]]:
    """Call every side once per round in `round_orders`; each name's results, one per round.

    samples = interleave({"a": run_a, "b": run_b}, 5, aa="a")  # keys a, b, a_again
    on_round(index, {name: result} in running order) is called after each round, to print it.
    """
    samples: dict[str, list[T]] = {}
    for index, order in enumerate(round_orders(list(sides), rounds, aa)):
        results = {name: sides[base_side(name)]() for name in order}
        for name, result in results.items():
            samples.setdefault(name, []).append(result)
        if on_round is not None:
            on_round(index, results)
    return samples


def ratios(samples: Mapping[str, Sequence[float]], numerator: str, denominator: str) -> list[float]:
    """Per-round `numerator / denominator` (the two sides' values from the same round)."""
    pairs = zip(samples[numerator], samples[denominator], strict=True)
    return [top / bottom for top, bottom in pairs]


@dataclass(frozen=True)
class Comparison:
    """A per-round ratio against its A/A noise floor.

    c = Comparison.of([1.02, 0.99, 1.04, 1.01, 1.03], aa_ratios=[1.01, 0.97, 1.02, 1.00, 0.99])
    c.median, c.resolved  # 1.02, False: 2% from 1 is within the A/A's 3%
    """

    ratios: tuple[float, ...]
    aa_ratios: tuple[float, ...]

    @classmethod
    def of(cls, ratios: Sequence[float], aa_ratios: Sequence[float]) -> Comparison:
        if not ratios or not aa_ratios:
            raise ValueError("a comparison needs at least one round and one A/A round")
        return cls(tuple(ratios), tuple(aa_ratios))

    @classmethod
    def between(
        cls, samples: Mapping[str, Sequence[float]], numerator: str, denominator: str, aa: str
    ) -> Comparison:
        """numerator / denominator per round, against `again(aa) / aa` per round."""
        return cls.of(ratios(samples, numerator, denominator), ratios(samples, again(aa), aa))

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)

    @property
    def noise(self) -> float:
        """The A/A band's widest distance from 1: how far a ratio moves with nothing changed."""
        return max(abs(r - 1) for r in self.aa_ratios)

    @property
    def resolved(self) -> bool:
        """Whether the median's distance from 1 exceeds the A/A noise."""
        return abs(self.median - 1) > self.noise

    def figures(self, key: str, digits: int = 3) -> dict[str, float | list[float] | bool]:
        """The JSON figures under `key`: the median, `_range`, `_aa_range` and `_resolved`."""
        return {
            key: round(self.median, digits),
            f"{key}_range": [round(min(self.ratios), digits), round(max(self.ratios), digits)],
            f"{key}_aa_range": [
                round(min(self.aa_ratios), digits),
                round(max(self.aa_ratios), digits),
            ],
            f"{key}_resolved": self.resolved,
        }

    def line(self, key: str) -> str:
        """One line for a person: the median, its spread, the A/A band and the verdict."""
        verdict = "resolved" if self.resolved else "not resolved (within the A/A noise)"
        return (
            f"{key} {self.median:.3f} (rounds {min(self.ratios):.3f}-{max(self.ratios):.3f}; "
            f"A/A {min(self.aa_ratios):.3f}-{max(self.aa_ratios):.3f}, "
            f"noise {self.noise:.1%}): {verdict}"
        )


def round_line(
    index: int,
    rounds: int,
    values: Mapping[str, float],
    unit: str,
    ratios: Mapping[str, float] | None = None,
) -> str:
    """One round's values in running order, and its ratios.

    round_line(0, 5, {"a": 41.2, "b": 40.1}, "ms/step", {"a/b": 1.027})
    # 'round 1/5 (ms/step): a 41.2, b 40.1 | a/b 1.027'
    """
    shown = ", ".join(f"{name} {_short(value)}" for name, value in values.items())
    line = f"round {index + 1}/{rounds} ({unit}): {shown}"
    if ratios:
        line += " | " + ", ".join(f"{name} {value:.3f}" for name, value in ratios.items())
    return line


def _short(value: float) -> str:
    """Three significant digits, but whole numbers from 100 up (no exponents for tokens/s)."""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def add_rounds_flag(parser: argparse.ArgumentParser, default: int) -> None:
    """Add --rounds (alias --repeats, the older name): rounds of every side, at least 5 by rule."""
    parser.add_argument(
        "--rounds",
        "--repeats",
        dest="rounds",
        type=int,
        default=default,
        help=f"interleaved rounds of every side (default {default}; fewer only to smoke-test)",
    )


def parse_with_tiny(
    parser: argparse.ArgumentParser, tiny: Mapping[str, object], argv: Sequence[str] | None = None
) -> argparse.Namespace:
    """Parse with a --tiny flag, which swaps the defaults for `tiny`'s (flags given still win).

    args = parse_with_tiny(parser, {"rounds": 1, "steps": 2})  # `script.py --tiny`: 1 round

    --tiny runs the script's own path at its smallest sizes, one round and its A/A twin, in
    seconds: a check that the script still runs to its JSON line, never a measurement.
    """
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="smallest sizes, 1 round and its A/A twin, seconds a side: a check, not a result",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(tiny) - set(vars(args)))
    if unknown:
        raise ValueError(f"tiny sizes for flags the parser lacks: {unknown}")
    if args.tiny:
        parser.set_defaults(**tiny)
        args = parser.parse_args(argv)
    return args
