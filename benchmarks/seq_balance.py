"""Token-budget balanced batching against the two usual recipes, on variable-length sequences.

    python benchmarks/seq_balance.py               # ~10-12 minutes on 2 CPU cores
    python benchmarks/seq_balance.py --quick       # a smoke run (tiny data, 2 short rounds)
    python benchmarks/seq_balance.py --tiny        # smaller still: 1 round, does it still run?

Two ranks (gloo, CPU, one thread each, started by torch's elastic launcher) train the same
model on the same samples through shardwise's public path (`parallelize`, then
`forward_backward` per micro-batch: DDP, the trainer's loss, summed token loss x world size /
the step's target count, gradients averaged over the ranks), and AdamW; each method's steps
are planned up front, alike on every rank (support/batching_plans.py):
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

A side (one method, in one round) trains whole epochs until it has run --side-seconds (at
least one epoch): a fraction of a second of work swings 2x on a shared machine, seconds do
not, and whole epochs keep every method on the same samples. Per case, every round runs each
method once and shardwise a second time (`shardwise_again`, the A/A twin), in an order
rotated every round (support/rounds.py); a speedup is the median over rounds of the round's
shardwise tokens/s over the baseline's, with its min-max, the A/A band (shardwise_again /
shardwise) and whether it is resolved (further from 1 than the A/A noise).

Measured per step and rank: compute (from the step's start to this rank's last gradient,
stamped by a post-accumulate-grad hook) and wait (from there until `forward_backward` returns,
i.e. until DDP's all-reduce is done, which is where a fast rank waits for a slow one).
`imbalance` is the sum over steps of the slowest rank's compute over the sum of the mean
rank's, and `predicted_imbalance` the same for the cost model's prediction;
`padding_fraction` is the share of computed slots that hold no real token (exact: it depends
on the batches, not the clock);
`tokens_per_s` counts real tokens only, over the side's wall time. A control, `identical`, runs
shardwise's rank-0 batches on both ranks: its imbalance is the machine's timing noise, the
imbalance's A/A band; `imbalance` is reported as the median over rounds with its min-max, that
band, and resolved when it exceeds the band. The last line is JSON: the LSTM heavy-tailed
figures at the top, every case under "cases".
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from shardwise.agent import launch
from shardwise.config import TrainConfig
from shardwise.data.batch import collate, pack_collate
from shardwise.distributed import (
    DistEnv,
    all_gather_floats,
    all_reduce_sum,
    barrier,
    init_distributed,
    shutdown_distributed,
)
from shardwise.models import RecurrentLM, TransformerLM
from shardwise.parallel.mesh import Layout
from shardwise.parallel.model import ParallelModel
from shardwise.parallel.parallelism import Parallelism
from shardwise.parallel.parallelize import parallelize
from shardwise.parallel.sync import sync_strategy
from support.batching_plans import (
    CONTROL,
    HEADLINE,
    MAX_LEN,
    METHODS,
    WORLD_SIZE,
    Case,
    Step,
    build_cases,
    methods_for,
    plan,
)
from support.rounds import (
    Comparison,
    add_rounds_flag,
    again,
    interleave,
    parse_with_tiny,
    round_line,
)

TWIN = again("shardwise")  # shardwise run a second time in every round: the A/A noise floor


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    report = launch(worker, WORLD_SIZE, vars(args))
    report["setup"]["benchmark_wall_s"] = round(time.perf_counter() - started, 1)
    print_table(report)
    headline = report["cases"][HEADLINE]
    figures = {k: v for k, v in headline.items() if k.startswith(("speedup_vs_", "imbalance"))}
    shardwise = headline["shardwise"]
    print(
        json.dumps(
            {
                **figures,
                "padding_fraction": shardwise["padding_fraction"],
                "wait_fraction": shardwise["wait_fraction"],
                **report,
            }
        )
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_rounds_flag(parser, default=5)
    parser.add_argument(
        "--side-seconds",
        type=float,
        default=5.0,
        help="each side trains whole epochs until it has run this long (default 5)",
    )
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
    parser.add_argument("--quick", action="store_true", help="tiny data, 2 short rounds")
    tiny = {"rounds": 1, "side_seconds": 0.0, "synthetic": 64, "lstm_sequences": 32}
    tiny |= {"transformer_sequences": 16, "tokens_per_batch": 256}
    args = parse_with_tiny(parser, tiny | {"transformer_tokens_per_batch": 256})
    if args.quick:
        args.rounds, args.side_seconds = 2, 0.5
        args.synthetic, args.transformer_sequences = 200, 60
        args.lstm_sequences = 200
        args.tokens_per_batch = args.transformer_tokens_per_batch = 512
    return args


# ---- one worker: every run, interleaved ------------------------------------------------------


def worker(settings: dict[str, Any]) -> dict[str, Any] | None:
    env = init_distributed("cpu", timeout_s=300)
    torch.set_num_threads(1)
    try:
        layout = Layout.for_world(env.world_size).build(env, timeout_s=300)  # data parallel only
        cases = build_cases(settings)
        plans = {(c.name, m): plan(c, m, settings["seed"]) for c in cases for m in methods_for(c)}
        if not all(plans.values()):
            raise SystemExit("a dataset is too small for one step of B sequences; add sequences")
        for case in cases:  # warm-up: first calls of every kernel, allocator growth
            for method in methods_for(case):
                run(case, method, plans[case.name, method][:2], layout, env, min_seconds=0.0)
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for case in cases:
            # Case by case: each case's methods alternate round by round, which is what its
            # ratios compare; rounds of different cases need not sit together.
            sides = {
                method: partial(
                    run,
                    case,
                    method,
                    plans[case.name, method],
                    layout,
                    env,
                    settings["side_seconds"],
                )
                for method in methods_for(case)
            }
            on_round = partial(print_round, case, settings["rounds"]) if env.is_main else None
            runs[case.name] = interleave(
                sides, settings["rounds"], aa="shardwise", on_round=on_round
            )
        return summarise(cases, runs, settings) if env.is_main else None
    finally:
        shutdown_distributed()


def build_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "lstm":
        return RecurrentLM(embed_dim=64, hidden_dim=128, num_layers=1)
    return TransformerLM(dim=128, num_layers=2, num_heads=4, max_len=MAX_LEN)


def run(
    case: Case, method: str, steps: list[Step], layout: Layout, env: DistEnv, min_seconds: float
) -> dict[str, Any]:
    """Train whole epochs of `steps` until `min_seconds` have passed; the side's figures."""
    model = parallelize(
        build_model(case.model), Parallelism(layout, sync_strategy("allreduce")), env
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    last_grad = [0.0]
    for parameter in model.parameters():
        parameter.register_post_accumulate_grad_hook(
            lambda _: last_grad.__setitem__(0, time.perf_counter())
        )
    pack = method == "shardwise" and case.model == "transformer"
    compute, wait, counts = [], [], torch.zeros(2, dtype=torch.float64)
    epochs = 0
    barrier(env)
    started = time.perf_counter()
    while True:
        epochs += 1
        for step in steps:
            step_started = time.perf_counter()
            counts += train_step(model, case, step, env, pack)
            backward_done = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            compute.append(last_grad[0] - step_started)
            wait.append(backward_done - last_grad[0])
        if any_rank_done(time.perf_counter() - started >= min_seconds, env):
            break
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
        "steps": len(steps) * epochs,
        "epochs": epochs,
    }


def any_rank_done(mine: bool, env: DistEnv) -> bool:
    """Whether any rank is done: the ranks' clocks differ a little, their epoch counts must not."""
    return all_reduce_sum(torch.tensor([float(mine)]), env).item() > 0


def train_step(
    model: ParallelModel, case: Case, step: Step, env: DistEnv, pack: bool
) -> torch.Tensor:
    """Forward and backward of this rank's micro-batches; [real tokens, slots] computed."""
    counts = torch.zeros(2, dtype=torch.float64)
    mine = step.batches[env.rank]
    for index, indices in enumerate(mine):
        chosen = [case.sequences[i] for i in indices]
        batch = (pack_collate if pack else collate)(chosen, step.step_tokens)
        model.forward_backward(
            batch.tokens,
            batch.targets,
            step.step_tokens,
            sync=index == len(mine) - 1,  # replicas average once, after the last micro-batch
            **batch.model_kwargs(env.device),
        )
        counts += torch.tensor([batch.n_tokens, batch.n_slots], dtype=torch.float64)
    return counts


def print_round(case: Case, rounds: int, index: int, results: dict[str, dict[str, Any]]) -> None:
    tokens_per_s = {name: result["tokens_per_s"] for name, result in results.items()}
    ours = tokens_per_s["shardwise"]
    shown = {f"vs {name}": ours / tokens_per_s[name] for name in ("fixed", "grouped")}
    shown["A/A"] = tokens_per_s[TWIN] / ours
    line = round_line(index, rounds, tokens_per_s, "tokens/s", shown)
    print(f"{case.name}: {line}", flush=True)


# ---- the report ------------------------------------------------------------------------------


def summarise(
    cases: list[Case], runs: dict[str, dict[str, list[dict[str, Any]]]], settings: dict
) -> dict[str, Any]:
    report: dict[str, Any] = {"cases": {}}
    for case in cases:
        report["cases"][case.name] = summarise_case(case, runs[case.name])
    report["setup"] = {
        "world_size": WORLD_SIZE,
        "threads_per_rank": torch.get_num_threads(),
        "rounds": settings["rounds"],
        "side_seconds": settings["side_seconds"],
        "lstm": "RecurrentLM(embed 64, hidden 128, 1 layer)",
        "transformer": "TransformerLM(dim 128, 2 layers, 4 heads)",
        "synthetic": f"{settings['synthetic']} log-normal lengths, median 64, sigma 1, 8..1024",
        "sort_window": settings["sort_window"],
    }
    return report


def summarise_case(case: Case, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Each side's medians over rounds; speedups and imbalance as per-round figures."""
    entry: dict[str, Any] = {}
    for method, samples in runs.items():
        entry[method] = medians(samples)
        entry[method]["tokens_per_s_runs"] = [round(sample["tokens_per_s"]) for sample in samples]
    tokens_per_s = {m: [sample["tokens_per_s"] for sample in runs[m]] for m in runs}
    for baseline in ("fixed", "grouped"):
        speedup = Comparison.between(tokens_per_s, "shardwise", baseline, aa="shardwise")
        print(f"{case.name}: {speedup.line(f'speedup_vs_{baseline}')}")
        entry.update(speedup.figures(f"speedup_vs_{baseline}"))
    imbalance = [sample["imbalance"] for sample in runs["shardwise"]]
    if CONTROL in runs:  # the control's imbalance is the timing noise: imbalance's A/A band
        balance = Comparison.of(imbalance, [sample["imbalance"] for sample in runs[CONTROL]])
        print(f"{case.name}: {balance.line('imbalance')}")
        entry.update(balance.figures("imbalance", 4))
    else:
        entry["imbalance"] = round(statistics.median(imbalance), 4)
        entry["imbalance_range"] = [round(min(imbalance), 4), round(max(imbalance), 4)]
    entry["tokens_per_batch"] = case.tokens_per_batch
    entry["batch_size_of_baselines"] = case.batch_size
    entry["sequences"] = len(case.sequences)
    return entry


def medians(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over rounds (per rank for lists)."""
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
    print(f"{'case':26s} {'method':15s} {'tok/s':>8s}  pad    imbal  predic wait")
    for name, entry in report["cases"].items():
        for method in (m for m in (*METHODS, TWIN, CONTROL) if m in entry):
            row = entry[method]
            figures = (row[key] for key in columns)
            print(f"{name:26s} {method:15s} {row['tokens_per_s']:8.0f} ", end="")
            print(" ".join(f"{value:6.3f}" for value in figures))


if __name__ == "__main__":
    main()
