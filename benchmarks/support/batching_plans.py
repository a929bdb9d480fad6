"""What seq_balance trains: its cases (a model on a dataset) and each batching method's plan
of optimizer steps, worked out alike on every rank before anything is timed.

    cases = build_cases(settings)                      # LSTM and Transformer, two datasets each
    steps = plan(cases[0], "shardwise", seed=0)        # [Step(batches per rank, ...), ...]

The recipes themselves are described in seq_balance.py's docstring.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import DistributedSampler

from shardwise.data.corpus import read_sequences
from shardwise.data.cost import batch_cost, cost_model_for
from shardwise.data.fit import fit_to_max_length
from shardwise.data.token_sampler import TokenBudgetSampler

WORLD_SIZE = 2
METHODS = ("fixed", "grouped", "shardwise")
# Both ranks run the same batches as shardwise's rank 0: whatever imbalance it shows is the
# machine's timing noise, the floor under every other measured imbalance.
CONTROL = "identical"
HEADLINE = "lstm/heavy_tailed"
MAX_LEN = 1024
MEGABATCH_BATCHES = 50  # group_by_length's megabatch, in batches


@dataclass(frozen=True)
class Step:
    """One optimizer step: `batches[rank]` lists that rank's micro-batches of sample indices."""

    batches: tuple[tuple[tuple[int, ...], ...], ...]
    step_tokens: int
    rank_costs: tuple[float, ...]  # predicted under the case's cost model


@dataclass(frozen=True)
class Case:
    """A model on a dataset; `batch_size` (B) is the baselines' sequences per batch."""

    model: str
    dataset: str
    sequences: list[np.ndarray]
    tokens_per_batch: int
    batch_size: int
    sort_window: int

    @property
    def name(self) -> str:
        return f"{self.model}/{self.dataset}"


def build_cases(settings: dict[str, Any]) -> list[Case]:
    rng = np.random.default_rng(settings["seed"])
    lengths = np.clip(np.round(rng.lognormal(np.log(64), 1.0, settings["synthetic"])), 8, MAX_LEN)
    datasets = {
        "heavy_tailed": [rng.integers(0, 256, size=int(n), dtype=np.uint8) for n in lengths],
        "embedded": fit_to_max_length(read_sequences(None), MAX_LEN)[0],
    }
    # How many sequences each case keeps (None: all), to bound the fixed recipe's run time.
    counts = {
        ("lstm", "heavy_tailed"): None,
        ("lstm", "embedded"): settings["lstm_sequences"],
        ("transformer", "heavy_tailed"): settings["transformer_sequences"],
        ("transformer", "embedded"): settings["transformer_sequences"],
    }
    cases = []
    for (model, name), count in counts.items():
        sequences = datasets[name]
        if count is not None and count < len(sequences):
            chosen = sorted(rng.choice(len(sequences), count, replace=False))
            sequences = [sequences[i] for i in chosen]
        budget = settings[
            "transformer_tokens_per_batch" if model == "transformer" else "tokens_per_batch"
        ]
        # B sequences of mean length hold as many real tokens as one token budget.
        size = max(1, round(budget / np.mean([len(seq) - 1 for seq in sequences])))
        # Whole steps of B per rank only, so every method trains on exactly these samples.
        sequences = sequences[: len(sequences) - len(sequences) % (WORLD_SIZE * size)]
        cases.append(Case(model, name, sequences, budget, size, settings["sort_window"]))
    return cases


def methods_for(case: Case) -> tuple[str, ...]:
    return (*METHODS, CONTROL) if case.name == HEADLINE else METHODS


def plan(case: Case, method: str, seed: int) -> list[Step]:
    work = np.array([len(seq) - 1 for seq in case.sequences])
    if method == "shardwise":
        return shardwise_plan(case, work, seed)
    if method == CONTROL:
        steps = shardwise_plan(case, work, seed)
        return [to_step([s.batches[0][0]] * WORLD_SIZE, work, case.model) for s in steps]
    size = case.batch_size
    if method == "fixed":
        orders = [
            list(DistributedSampler(range(len(work)), WORLD_SIZE, rank, seed=seed, drop_last=True))
            for rank in range(WORLD_SIZE)
        ]
        per_rank = [
            [order[i : i + size] for i in range(0, len(order) - size + 1, size)] for order in orders
        ]
        steps = zip(*per_rank, strict=False)
    else:
        order = grouped_order(work, size, seed)
        batches = [order[i : i + size] for i in range(0, len(order) - size + 1, size)]
        steps = zip(*(batches[r::WORLD_SIZE] for r in range(WORLD_SIZE)), strict=False)
    return [to_step(step, work, case.model) for step in steps]


def grouped_order(work: np.ndarray, size: int, seed: int) -> list[int]:
    """A random order, sorted longest first within megabatches of MEGABATCH_BATCHES batches."""
    order = np.random.default_rng(seed).permutation(len(work))
    span = MEGABATCH_BATCHES * size
    megabatches = [order[i : i + span] for i in range(0, len(order), span)]
    return [int(i) for mega in megabatches for i in mega[np.argsort(-work[mega], kind="stable")]]


def shardwise_plan(case: Case, work: np.ndarray, seed: int) -> list[Step]:
    sampler = TokenBudgetSampler(
        work + 1,
        case.tokens_per_batch,
        WORLD_SIZE,
        seed=seed,
        cost_model=cost_model_for(case.model),
        packing=case.model == "transformer",
        sort_window=case.sort_window,
    )
    steps = []
    for step in sampler.steps():
        steps.append(Step(step.batches, step.step_tokens, step.rank_costs))
        if step.position[0] > 0:
            return steps
    raise AssertionError("the sampler is infinite")


def to_step(rank_batches: Sequence[Sequence[int]], work: np.ndarray, model: str) -> Step:
    """A step of one padded micro-batch per rank."""
    batches = tuple((tuple(int(i) for i in batch),) for batch in rank_batches)
    costs = tuple(batch_cost(cost_model_for(model), work[list(b)]) for (b,) in batches)
    return Step(batches, int(sum(work[list(b)].sum() for (b,) in batches)), costs)
