"""Token-budget balanced batching against the two usual recipes, on variable-length sequences.

    python benchmarks/seq_balance.py               # ~4 minutes on 2 CPU cores
    python benchmarks/seq_balance.py --quick       # a smoke run of a few seconds

Two ranks (gloo, CPU, one thread each, started by torch's elastic launcher) train the same
DDP-wrapped model on the same samples, one epoch per run, with the trainer's loss (summed token
loss x world size / the step's target count), and AdamW:
- fixed:     `DistributedSampler` order, B sequences per rank and step, padded to the longest.
- grouped:   the `group_by_length` recipe: megabatches of 50 batches of B, each sorted longest
             first, consecutive batches dealt to the ranks in turn; no cross-rank balancing.
- shardwise: `TokenBudgetSampler`, --tokens-per-batch per rank and step, balanced under the
             model's cost model; the Transformer's batches are packed into rows.
B is the budget over the mean length, so every method holds as many real tokens per batch on
average, and each dataset is cut to whole steps of B per rank, so every method trains on the
same samples. Budgets: 4096 tokens for the LSTM, 1024 for the Transformer (~5x slower per
token, and it needs enough steps per epoch to time). Cases: LSTM and Transformer, each on the
embedded corpus (Python's documentation) and on synthetic log-normal lengths clipped to
8..1024 (median 64, sigma 1); the fixed recipe pads ~80% of its slots, so to stay within
minutes the LSTM takes 1200 of the corpus's sequences and the Transformer 250 of each
dataset, chosen at random (seeded).

Measured per step and rank: compute (from the step's start to this rank's last gradient,
stamped by a post-accumulate-grad hook) and wait (from there until backward returns, i.e. until
DDP's all-reduce is done, which is where a fast rank waits for a slow one). `imbalance` is the
sum over steps of the slowest rank's compute over the sum of the mean rank's, and
`predicted_imbalance` the same for the cost model's prediction; `padding_fraction` is the share
of computed slots that hold no real token; `tokens_per_s` counts real tokens only, over the
run's wall time. A control, `identical`, runs shardwise's rank-0 batches on both ranks: its
imbalance is the machine's timing noise, the floor under every other. Methods alternate within
every repeat (in a rotating order); figures are medians over repeats, and speedups medians of
the ratios within each repeat. The last line is JSON: the LSTM heavy-tailed figures at the top,
every case under "cases".
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DistributedSampler

from shardwise.config import TrainConfig
from shardwise.data.batch import IGNORE_INDEX, Batch, collate, pack_collate
from shardwise.data.corpus import read_sequences
from shardwise.data.cost import batch_cost, cost_model_for
from shardwise.data.fit import fit_to_max_length
from shardwise.data.token_sampler import TokenBudgetSampler
from shardwise.distributed import (
    DistEnv,
    all_gather_floats,
    all_reduce_sum,
    barrier,
    init_distributed,
    shutdown_distributed,
)
from shardwise.launch import run_local
from shardwise.models import RecurrentLM, TransformerLM
from shardwise.parallel.data_parallel import gradient_sync, wrap_data_parallel

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


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    report = run_local(worker, WORLD_SIZE, vars(args))[0]
    report["setup"]["benchmark_wall_s"] = round(time.perf_counter() - started, 1)
    print_table(report)
    headline = report["cases"]["lstm/heavy_tailed"]
    print(
        json.dumps(
            {
                "speedup_vs_fixed": headline["speedup_vs_fixed"],
                "speedup_vs_grouped": headline["speedup_vs_grouped"],
                "padding_fraction": headline["shardwise"]["padding_fraction"],
                "imbalance": headline["shardwise"]["imbalance"],
                "wait_fraction": headline["shardwise"]["wait_fraction"],
                **report,
            }
        )
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens-per-batch", type=int, default=4096, help="LSTM, per rank")
    parser.add_argument("--transformer-tokens-per-batch", type=int, default=1024)
    parser.add_argument("--synthetic", type=int, default=2000, help="synthetic sequences")
    parser.add_argument("--lstm-sequences", type=int, default=1200, help="of the embedded corpus")
    parser.add_argument("--transformer-sequences", type=int, default=250, help="of each dataset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--sort-window",
        type=int,
        default=TrainConfig.model_fields["sort_window"].default,
        help="sequences sorted together (default: shardwise train's)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny data, one repeat")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.synthetic, args.transformer_sequences = 1, 200, 60
        args.lstm_sequences = 200
        args.tokens_per_batch = args.transformer_tokens_per_batch = 512
    return args


# ---- data and plans (the same on every rank) -------------------------------------------------


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


# ---- one worker: every run, interleaved ------------------------------------------------------


def worker(settings: dict[str, Any]) -> dict[str, Any] | None:
    env = init_distributed("cpu", timeout_s=300)
    torch.set_num_threads(1)
    try:
        cases = build_cases(settings)
        plans = {(c.name, m): plan(c, m, settings["seed"]) for c in cases for m in methods_for(c)}
        if not all(plans.values()):
            raise SystemExit("a dataset is too small for one step of B sequences; add sequences")
        for case in cases:  # warm-up: first calls of every kernel, allocator growth
            for method in methods_for(case):
                run(case, method, plans[case.name, method][:2], env)
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {key: [] for key in plans}
        for repeat in range(settings["repeats"]):
            for case in cases:
                methods = methods_for(case)
                shift = repeat % len(methods)
                for method in methods[shift:] + methods[:shift]:
                    runs[case.name, method].append(run(case, method, plans[case.name, method], env))
        return summarise(cases, runs, settings) if env.is_main else None
    finally:
        shutdown_distributed()


def build_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "lstm":
        return RecurrentLM(embed_dim=64, hidden_dim=128, num_layers=1)
    return TransformerLM(dim=128, num_layers=2, num_heads=4, max_len=MAX_LEN)


def run(case: Case, method: str, steps: list[Step], env: DistEnv) -> dict[str, Any]:
    model = wrap_data_parallel(build_model(case.model), env)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    last_grad = [0.0]
    for parameter in model.parameters():
        parameter.register_post_accumulate_grad_hook(
            lambda _: last_grad.__setitem__(0, time.perf_counter())
        )
    pack = method == "shardwise" and case.model == "transformer"
    compute, wait, counts = [], [], torch.zeros(2, dtype=torch.float64)
    barrier(env)
    started = time.perf_counter()
    for step in steps:
        step_started = time.perf_counter()
        mine = step.batches[env.rank]
        for index, indices in enumerate(mine):
            chosen = [case.sequences[i] for i in indices]
            batch = (pack_collate if pack else collate)(chosen, step.step_tokens)
            with gradient_sync(model, enabled=index == len(mine) - 1):
                (loss_sum(model, batch) * env.world_size / step.step_tokens).backward()
            counts += torch.tensor([batch.n_tokens, batch.n_slots], dtype=torch.float64)
        backward_done = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        compute.append(last_grad[0] - step_started)
        wait.append(backward_done - last_grad[0])
    barrier(env)
    wall = time.perf_counter() - started
    tokens, slots = all_reduce_sum(counts, env).tolist()
    per_rank_compute = np.array(all_gather_floats(compute, env))  # [rank, step]
    per_rank_wait = np.array(all_gather_floats(wait, env)).sum(axis=1)
    predicted = np.array([step.rank_costs for step in steps])  # [step, rank]
    return {
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "padding_fraction": 1 - tokens / slots,
        "imbalance": float(
            per_rank_compute.max(axis=0).sum() / per_rank_compute.mean(axis=0).sum()
        ),
        "predicted_imbalance": float(predicted.max(axis=1).sum() / predicted.mean(axis=1).sum()),
        "wait_s_per_rank": per_rank_wait.tolist(),
        "wait_fraction": float(per_rank_wait.mean() / wall),
        "wall_s": wall,
        "steps": len(steps),
    }


def loss_sum(model: nn.Module, batch: Batch) -> torch.Tensor:
    logits = model(batch.tokens, **batch.model_kwargs(batch.tokens.device))
    return F.cross_entropy(
        logits.flatten(0, 1).float(),
        batch.targets.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


# ---- the report ------------------------------------------------------------------------------


def summarise(
    cases: list[Case], runs: dict[tuple[str, str], list[dict[str, float]]], settings: dict
) -> dict[str, Any]:
    report: dict[str, Any] = {"cases": {}}
    for case in cases:
        entry: dict[str, Any] = {}
        for method in methods_for(case):
            entry[method] = medians(runs[case.name, method])
            entry[method]["tokens_per_s_runs"] = [
                round(sample["tokens_per_s"]) for sample in runs[case.name, method]
            ]
        for baseline in ("fixed", "grouped"):
            # Ratios within a repeat, where the runs sat next to each other in time, then the
            # median: steadier than a ratio of medians when the machine's load drifts.
            pairs = zip(runs[case.name, "shardwise"], runs[case.name, baseline], strict=True)
            ratios = [ours["tokens_per_s"] / theirs["tokens_per_s"] for ours, theirs in pairs]
            entry[f"speedup_vs_{baseline}"] = round(statistics.median(ratios), 3)
        entry["tokens_per_batch"] = case.tokens_per_batch
        entry["batch_size_of_baselines"] = case.batch_size
        entry["sequences"] = len(case.sequences)
        report["cases"][case.name] = entry
    report["setup"] = {
        "world_size": WORLD_SIZE,
        "threads_per_rank": torch.get_num_threads(),
        "repeats": settings["repeats"],
        "lstm": "RecurrentLM(embed 64, hidden 128, 1 layer)",
        "transformer": "TransformerLM(dim 128, 2 layers, 4 heads)",
        "synthetic": f"{settings['synthetic']} log-normal lengths, median 64, sigma 1, 8..1024",
        "sort_window": settings["sort_window"],
    }
    return report


def medians(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over repeats (per rank for lists)."""
    out: dict[str, Any] = {}
    for key, first in samples[0].items():
        if isinstance(first, list):
            ranks = zip(*(sample[key] for sample in samples), strict=True)
            out[key] = [round(statistics.median(values), 4) for values in ranks]
        else:
            out[key] = round(statistics.median(s[key] for s in samples), 4)
    return out


def print_table(report: dict[str, Any]) -> None:
    columns = ("padding_fraction", "imbalance", "predicted_imbalance", "wait_fraction")
    print(f"{'case':26s} {'method':10s} {'tok/s':>8s}  pad    imbal  predic wait")
    for name, entry in report["cases"].items():
        for method in (m for m in (*METHODS, CONTROL) if m in entry):
            row = entry[method]
            figures = (row[key] for key in columns)
            print(f"{name:26s} {method:10s} {row['tokens_per_s']:8.0f} ", end="")
            print(" ".join(f"{value:6.3f}" for value in figures))


if __name__ == "__main__":
    main()
