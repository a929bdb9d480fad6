"""The training loop's bookkeeping: metrics windows, run totals, and the one imbalance formula.

    window = Window()
    window.record_step(compute_s=0.10, wait_s=0.02, rank_costs=[3.0, 2.5])
    figures = window.close(counts, gathered, now=time.perf_counter())   # after the collectives
    row = figures.row(step=10, lr=1e-3); totals.add(figures)

Everything here is pure: the trainer runs the two collectives (`Window.counts` summed over
ranks, `Window.timings` gathered from every rank) and hands the results in, so rows and totals
can be tested without processes.

Synchronisation per rank: its bytes are what the strategy's `SyncTraffic` counted in the window;
its seconds are the StepClock's wait plus the exchanges after the optimizer step that the
traffic timed (which the StepClock had counted as compute, so they move from one to the other).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from shardwise.data.batch import Batch
from shardwise.parallel.sync import SyncTraffic


def step_spread(per_rank_step_s: Sequence[Sequence[float]]) -> tuple[float, float]:
    """(slowest rank's seconds, mean rank's seconds), each summed over the steps.

    step_spread([[1.0, 2.0], [1.0, 1.0]])   # (1 + 2, 1 + 1.5) = (3.0, 2.5)
    """
    steps = list(zip(*per_rank_step_s, strict=True))
    return sum(max(step) for step in steps), sum(sum(step) / len(step) for step in steps)


def imbalance_of(slowest_s: float, mean_s: float) -> float:
    """Slowest over mean: 1.0 is perfect balance; 1.0 too when nothing was timed.

    imbalance_of(*step_spread([[1.0, 2.0], [1.0, 1.0]]))   # 3.0 / 2.5 = 1.2
    """
    return slowest_s / mean_s if mean_s > 0 else 1.0


def imbalance(per_rank_step_s: Sequence[Sequence[float]]) -> float:
    """Sum over steps of the slowest rank's time over the sum of the mean rank's time.

    imbalance([[1.0, 2.0], [1.0, 1.0]])   # (1 + 2) / (1 + 1.5) = 1.2
    imbalance([[3.0], [1.0]])             # one step's rank costs: 3 / 2 = 1.5
    """
    return imbalance_of(*step_spread(per_rank_step_s))


@dataclass
class Window:
    """What happened since the last metrics row, on this rank."""

    losses: list[torch.Tensor] = field(default_factory=list)  # per micro-step, on the device
    tokens: int = 0
    slots: int = 0
    compute_s: list[float] = field(default_factory=list)  # per step
    wait_s: list[float] = field(default_factory=list)  # per step
    predicted_imbalance: list[float] = field(default_factory=list)  # per step, token batching
    # Kept as a tensor: reading it back each step would stall a GPU's queue.
    grad_norm: torch.Tensor | float = 0.0  # of the window's last step
    started: float = field(default_factory=time.perf_counter)
    merged_steps: int | None = None  # see merge_steps

    def record_micro_step(self, loss: torch.Tensor, counted: Batch | None) -> None:
        """Add a micro-step's summed loss and the tokens of `counted` (None: a peer counts them)."""
        # The loss stays on the device: reading it back every micro-step would stall a GPU's queue.
        self.losses.append(loss)
        if counted is not None:
            self.tokens += counted.n_tokens
            self.slots += counted.n_slots

    def record_step(
        self, compute_s: float, wait_s: float, rank_costs: Sequence[float] | None = None
    ) -> None:
        """Add one optimizer step's timing (and the sampler's predicted per-rank costs)."""
        self.compute_s.append(compute_s)
        self.wait_s.append(wait_s)
        if rank_costs:
            self.predicted_imbalance.append(imbalance([[cost] for cost in rank_costs]))

    def merge_steps(self, run_steps: int) -> None:
        """Time the window as one step of `run_steps`: ranks that took different numbers of
        steps in it (asynchronous workers) then gather rows of one length and compare totals,
        and per-step figures are per step of the run."""
        self.compute_s, self.wait_s = [sum(self.compute_s)], [sum(self.wait_s)]
        self.merged_steps = run_steps

    def counts(self) -> torch.Tensor:
        """[loss sum, tokens, slots] of this rank, to be summed over ranks."""
        loss_sum = sum(float(loss) for loss in self.losses)
        return torch.tensor([loss_sum, self.tokens, self.slots], dtype=torch.float64)

    def timings(self, memory_bytes: float, traffic: SyncTraffic | None = None) -> list[float]:
        """This rank's peak memory, sync traffic since the last take and per-step times.

        gathered = all_gather_floats(window.timings(memory, strategy.traffic), env)
        """
        sent = traffic.take() if traffic is not None else SyncTraffic()
        return [
            memory_bytes,
            sent.bytes,
            sent.exchanges,
            sent.seconds,
            *self.compute_s,
            *self.wait_s,
        ]

    def close(
        self, counts: Sequence[float], gathered: Sequence[Sequence[float]], now: float
    ) -> WindowFigures:
        """The window on all ranks, from the summed `counts` and every rank's `timings`."""
        loss_sum, tokens, slots = counts
        steps = len(self.compute_s)
        predicted = self.predicted_imbalance
        return WindowFigures(
            loss_sum=loss_sum,
            tokens=tokens,
            slots=slots,
            elapsed_s=now - self.started,
            rank_compute_s=[list(row[_TIMES : _TIMES + steps]) for row in gathered],
            rank_wait_s=[list(row[_TIMES + steps :]) for row in gathered],
            rank_memory_bytes=[int(row[0]) for row in gathered],
            predicted_imbalance=sum(predicted) / len(predicted) if predicted else None,
            grad_norm=float(self.grad_norm),
            rank_sync_bytes=[int(row[1]) for row in gathered],
            rank_sync_exchanges=[int(row[2]) for row in gathered],
            rank_exchange_s=[row[3] for row in gathered],
            merged_steps=self.merged_steps,
        )


# Where a gathered `Window.timings` row's per-step times begin: after memory and the traffic.
_TIMES = 4


@dataclass(frozen=True)
class WindowFigures:
    """One metrics window over all ranks; `rank_*_s[rank][step]` are per-step seconds."""

    loss_sum: float
    tokens: float
    slots: float
    elapsed_s: float
    rank_compute_s: list[list[float]]
    rank_wait_s: list[list[float]]
    rank_memory_bytes: list[int]
    predicted_imbalance: float | None = None
    grad_norm: float = 0.0
    rank_sync_bytes: list[int] = field(default_factory=list)  # per rank, the window's payload
    rank_sync_exchanges: list[int] = field(default_factory=list)  # per rank
    rank_exchange_s: list[float] = field(default_factory=list)  # per rank, after the step
    merged_steps: int | None = None  # the run's steps in a window timed as one (async)

    @property
    def loss(self) -> float:
        """Token-mean training loss over the window."""
        return self.loss_sum / max(self.tokens, 1)

    @property
    def steps(self) -> int:
        """Optimizer steps in the window."""
        if self.merged_steps is not None:
            return self.merged_steps
        return len(self.rank_compute_s[0]) if self.rank_compute_s else 0

    def rank_sync_s(self) -> list[float]:
        """Per rank: seconds waiting at the end of backward plus in exchanges after the step."""
        return [sum(w) + e for w, e in zip(self.rank_wait_s, self.rank_exchange_s, strict=True)]

    def rank_compute_total_s(self) -> list[float]:
        """Per rank: the window's step seconds that were not synchronisation."""
        compute = self.rank_compute_s
        return [sum(c) - e for c, e in zip(compute, self.rank_exchange_s, strict=True)]

    def row(self, step: int, lr: float) -> dict[str, Any]:
        """The metrics.jsonl row for this window, ending at optimizer step `step`."""
        steps = self.steps
        sync, compute = self.rank_sync_s(), self.rank_compute_total_s()
        return {
            "step": step,
            "loss": self.loss,
            "lr": lr,
            "grad_norm": self.grad_norm,
            "tokens_per_s": self.tokens / self.elapsed_s,
            "padding_fraction": padding_fraction(self.tokens, self.slots),
            "imbalance": imbalance(self.rank_compute_s),
            "predicted_imbalance": self.predicted_imbalance,
            "rank_step_time_s": [
                (sum(c) + sum(w)) / steps
                for c, w in zip(self.rank_compute_s, self.rank_wait_s, strict=True)
            ],
            "rank_wait_s": [sum(w) for w in self.rank_wait_s],
            "rank_rss_bytes": self.rank_memory_bytes,
            "sync_bytes_per_step": [sent / max(steps, 1) for sent in self.rank_sync_bytes],
            "rank_sync_s": sync,
            "rank_sync_share": [_share(s, c) for s, c in zip(sync, compute, strict=True)],
        }


@dataclass
class RunTotals:
    """The run's sums over every closed window (all ranks)."""

    tokens: int = 0
    slots: int = 0
    train_s: float = 0.0  # wall seconds inside metrics windows (checkpoint saves excluded)
    slowest_s: float = 0.0  # summed over steps: the slowest rank's compute
    mean_s: float = 0.0  # summed over steps: the mean rank's compute
    rank_compute_s: list[float] = field(default_factory=list)  # per rank
    rank_wait_s: list[float] = field(default_factory=list)  # per rank
    steps: int = 0
    rank_sync_bytes: list[float] = field(default_factory=list)  # per rank
    rank_sync_exchanges: list[float] = field(default_factory=list)  # per rank
    rank_sync_s: list[float] = field(default_factory=list)  # per rank: wait + exchanges
    rank_sync_compute_s: list[float] = field(default_factory=list)  # per rank: the rest

    def add(self, figures: WindowFigures) -> None:
        """Count one closed window."""
        self.tokens += int(figures.tokens)
        self.slots += int(figures.slots)
        self.train_s += figures.elapsed_s
        self.rank_compute_s = _add(self.rank_compute_s, map(sum, figures.rank_compute_s))
        self.rank_wait_s = _add(self.rank_wait_s, map(sum, figures.rank_wait_s))
        self.steps += figures.steps
        self.rank_sync_bytes = _add(self.rank_sync_bytes, figures.rank_sync_bytes)
        self.rank_sync_exchanges = _add(self.rank_sync_exchanges, figures.rank_sync_exchanges)
        self.rank_sync_s = _add(self.rank_sync_s, figures.rank_sync_s())
        self.rank_sync_compute_s = _add(self.rank_sync_compute_s, figures.rank_compute_total_s())
        slowest, mean = step_spread(figures.rank_compute_s)
        self.slowest_s += slowest
        self.mean_s += mean

    @property
    def tokens_per_s(self) -> float | None:
        """Training throughput so far; None before the first window closes."""
        return self.tokens / self.train_s if self.train_s else None

    def summary_fields(
        self,
        wall_time_s: float,
        final_train_loss: float | None,
        eval_loss: float | None,
        peak_rss_bytes: list[int],
    ) -> dict[str, Any]:
        """summary.json's figures, in its order, from the totals and the run's last numbers."""
        compute, wait = self.rank_compute_s, self.rank_wait_s
        return {
            "tokens": self.tokens,
            "tokens_per_s": self.tokens_per_s or 0.0,
            "wall_time_s": wall_time_s,
            "final_train_loss": final_train_loss,
            "eval_loss": eval_loss,
            "peak_rss_bytes": peak_rss_bytes,
            "padding_fraction": padding_fraction(self.tokens, self.slots),
            "imbalance": imbalance_of(self.slowest_s, self.mean_s),
            "rank_wait_s": wait,
            "wait_fraction": sum(wait) / (sum(compute) + sum(wait)) if compute else None,
            "sync_bytes_per_step": [sent / max(self.steps, 1) for sent in self.rank_sync_bytes],
            "sync_exchanges": [int(n) for n in self.rank_sync_exchanges],
            "sync_time_s": self.rank_sync_s,
            "compute_time_s": self.rank_sync_compute_s,
        }


def _share(part: float, rest: float) -> float | None:
    return part / (part + rest) if part + rest > 0 else None


def padding_fraction(tokens: float, slots: float) -> float:
    """Share of the batch slots that held padding rather than tokens."""
    return 1 - tokens / max(slots, 1)


def _add(totals: list[float], values: Any) -> list[float]:
    values = list(values)
    return values if not totals else [a + b for a, b in zip(totals, values, strict=True)]
