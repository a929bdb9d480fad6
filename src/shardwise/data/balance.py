"""Choose and split one optimizer step's samples into equal-cost batches; deal them to ranks.

    runs = split_padded(widths_longest_first, parts=4, budget=4096, cost_model=rnn_cost)
    owners = deal_to_ranks([cost_of(run) for run in runs], world_size=2, per_rank=2)

A padded batch costs its width on every row, so padded batches are contiguous runs of the samples
sorted longest first (any other grouping pads more) and the split only chooses the cut points.
Packed rows do not pad, so packed batches may mix lengths freely and are filled greedily.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shardwise.data.cost import CostModel, batch_cost

# Bisection on the cost threshold stops once it is known to this relative precision; finer
# cut points cannot exist anyway, since costs move in steps of one row.
_THRESHOLD_PRECISION = 1e-3
# Batches whose costs differ by less than this are balanced enough to stop refilling them.
_BALANCED = 0.01
# What a step costs beyond its batches' compute (the all-reduce, the optimizer update, the
# launch of every kernel), as a share of a full batch's cost: balancing a step by making it
# smaller pays only while the idle time it saves exceeds this. A guess that holds for small
# models, where per-step costs weigh the most; it matters little for large ones.
STEP_OVERHEAD = 0.1


def batches_needed(widths: np.ndarray, budget: int, limit: int) -> int:
    """Fewest padded batches of at most `budget` slots for rows `widths` (longest first).

    batches_needed(np.array([9, 5, 5, 2]), budget=10, limit=8)   # 3: [9], [5, 5], [2]

    A row wider than the budget gets a batch of its own. Counting stops past `limit`.
    """
    count = start = 0
    while start < len(widths) and count <= limit:
        start += max(1, budget // int(widths[start]))
        count += 1
    return count


def fill_padded(
    widths: np.ndarray, parts: int, budget: int, cost_model: CostModel, rounds: int = 8
) -> int:
    """How many leading rows of `widths` (longest first) fill `parts` batches of equal cost.

    stop = fill_padded(widths, 4, budget=4096, cost_model=attention_cost)
    batches = split_padded(widths[:stop], 4, budget=4096, cost_model=attention_cost)

    Filling every batch to the budget balances costs only if a full batch costs the same at
    every width. It does not for attention (a full batch of long rows costs more than one of
    short rows), nor when a batch holds only a few long rows (one row is a big step). So while
    the batches' costs differ by more than 1%, the fill lowers a common cost ceiling to the
    cheapest batch's cost and fills again. It keeps the fill whose ranks spend the least time
    per unit of work, counting the idle time of all but the slowest rank and `STEP_OVERHEAD`;
    the overhead is what stops it from cutting steps small for a last bit of balance. Rows
    left over start the next step.
    """
    runs = _Runs(widths, budget, cost_model)
    threshold, overhead = float("inf"), 0.0
    best, best_score = 0, -1.0
    for _ in range(rounds):
        bounds = runs.fill(threshold, parts)
        stop = bounds[-1][1]
        costs = [runs.cost(a, b) for a, b in bounds]
        if not overhead:
            if stop == len(widths):
                return stop  # everything left fits this step
            overhead = STEP_OVERHEAD * max(costs)
        score = sum(costs) / (len(costs) * (max(costs) + overhead))
        if score > best_score:
            best, best_score = stop, score
        if max(costs) * len(costs) <= (1 + _BALANCED) * sum(costs):
            break
        threshold = min(costs)
    return best


def split_padded(widths: np.ndarray, parts: int, budget: int, cost_model: CostModel) -> list[slice]:
    """Cut rows `widths` (longest first) into exactly `parts` runs with the least maximal cost.

    split_padded(np.array([8, 8, 4, 4, 4, 4]), 2, budget=16, cost_model=rnn_cost)
    # [slice(0, 2), slice(2, 6)]: 16 slots each

    Every run also stays within `budget` slots (or is a single row), which needs
    `batches_needed(widths, budget, parts) <= parts` and `len(widths) >= parts`.
    """
    runs = _Runs(widths, budget, cost_model)
    bounds = runs.fill(float("inf"), parts)
    if bounds[-1][1] < len(widths) or len(widths) < parts:
        raise ValueError(f"{len(widths)} rows do not fit {parts} batches of {budget} slots")
    low, high = runs.cost(0, 1), max(runs.cost(a, b) for a, b in bounds)
    while high - low > _THRESHOLD_PRECISION * high:
        middle = (low + high) / 2
        tighter = runs.fill(middle, parts)
        if tighter[-1][1] < len(widths):
            low = middle
        else:
            high, bounds = middle, tighter
    while len(bounds) < parts:
        bounds = runs.split_costliest(bounds)
    return [slice(a, b) for a, b in bounds]


def split_packed(lengths: np.ndarray, parts: int, cost_model: CostModel) -> list[list[int]]:
    """Deal samples to `parts` packed batches, costliest first, each to the cheapest batch.

    split_packed(np.array([9, 5, 4, 1]), 2, rnn_cost)   # [[0, 3], [1, 2]]: 10 and 9 tokens

    Each sample's cost is its cost alone, which is exact for cost models that add up over
    spans (both built-in ones do). Needs `len(lengths) >= parts`; no batch is left empty.
    """
    costs = [cost_model(np.array([length], dtype=np.int64)) for length in lengths]
    order = sorted(range(len(lengths)), key=lambda i: (-costs[i], i))
    groups: list[list[int]] = [[] for _ in range(parts)]
    loads = [0.0] * parts
    for taken, sample in enumerate(order):
        # Once only as many samples remain as there are empty batches, fill those first.
        empty = [g for g in range(parts) if not groups[g]]
        choices = empty if len(order) - taken <= len(empty) else range(parts)
        target = min(choices, key=lambda g: (loads[g], g))
        groups[target].append(sample)
        loads[target] += costs[sample]
    return [sorted(group) for group in groups]


def deal_to_ranks(costs: Sequence[float], world_size: int, per_rank: int) -> list[list[int]]:
    """Which batches each rank runs: `per_rank` each, the costliest first to the least loaded.

    deal_to_ranks([5.0, 4.0, 3.0, 2.0], world_size=2, per_rank=2)   # [[0, 3], [1, 2]]

    This is longest-processing-time-first scheduling with a fixed number of batches per rank
    (one per accumulation micro-step); ties go to the lower rank, so every rank agrees.
    """
    if len(costs) != world_size * per_rank:
        raise ValueError(f"{len(costs)} batches cannot give {world_size} ranks {per_rank} each")
    owned: list[list[int]] = [[] for _ in range(world_size)]
    loads = [0.0] * world_size
    for batch in sorted(range(len(costs)), key=lambda b: (-costs[b], b)):
        open_ranks = [r for r in range(world_size) if len(owned[r]) < per_rank]
        rank = min(open_ranks, key=lambda r: (loads[r], r))
        owned[rank].append(batch)
        loads[rank] += costs[batch]
    return owned


class _Runs:
    """Costs of contiguous runs of rows sorted longest first (each padded to its first row)."""

    def __init__(self, widths: np.ndarray, budget: int, cost_model: CostModel) -> None:
        self.widths = np.asarray(widths, dtype=np.int64)
        self.budget = budget
        self.cost_model = cost_model
        # The bisections ask for the same runs again and again; a cost model call is ~5 us.
        self._costs: dict[tuple[int, int], float] = {}

    def cost(self, start: int, stop: int) -> float:
        if (start, stop) not in self._costs:
            self._costs[start, stop] = batch_cost(self.cost_model, self.widths[start:stop])
        return self._costs[start, stop]

    def fill(self, threshold: float, limit: int) -> list[tuple[int, int]]:
        """Up to `limit` runs from the left, each as long as costs allow: at most `threshold`
        and `budget` slots, but always at least one row."""
        bounds: list[tuple[int, int]] = []
        start, rows = 0, len(self.widths)
        while start < rows and len(bounds) < limit:
            most = min(rows, start + max(1, self.budget // int(self.widths[start])))
            stop = self._last_stop_within(start, most, threshold)
            bounds.append((start, stop))
            start = stop
        return bounds

    def _last_stop_within(self, start: int, most: int, threshold: float) -> int:
        # Costs grow with the run, so bisect; a run always takes at least its first row.
        low, high = start + 1, most
        while low < high:
            middle = (low + high + 1) // 2
            if self.cost(start, middle) <= threshold:
                low = middle
            else:
                high = middle - 1
        return low

    def split_costliest(self, bounds: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Cut the costliest run of two or more rows where its halves cost most alike."""
        splittable = [i for i, (a, b) in enumerate(bounds) if b - a >= 2]
        index = max(splittable, key=lambda i: (self.cost(*bounds[i]), -i))
        start, stop = bounds[index]
        # The left part's cost grows and the right part's shrinks with the cut: bisect.
        low, high = start + 1, stop - 1
        while low < high:
            middle = (low + high) // 2
            if self.cost(start, middle) < self.cost(middle, stop):
                low = middle + 1
            else:
                high = middle
        cut = min(
            (low - 1, low),
            key=lambda c: max(self.cost(start, c), self.cost(c, stop)) if c > start else np.inf,
        )
        return [*bounds[:index], (start, cut), (cut, stop), *bounds[index + 1 :]]
