"""Pipeline bubble against its bound, and shardwise's pipeline against plain torch pipelining.

    python benchmarks/pipeline_speed.py                      # ~4 minutes on 2 cores
    python benchmarks/pipeline_speed.py --rounds 2 --steps 3 --dim 64 --layers 2   # smoke test
    python benchmarks/pipeline_speed.py --tiny               # smallest sizes: does it still run?

Two measurements, in one 2-process job (one thread per process, one stage each), each in
interleaved rounds (support/rounds.py) of `--steps` steps per side:
- Bubble: a TransformerLM cut into K=2 stages trains under GPipe with M = 1, 4 and 8
  micro-batches of one fixed batch, the three in an order rotated every round. Each rank adds
  up the time its stage spends computing (forward and backward of a micro-batch) during
  `forward_backward`; a rank's bubble is the share of the steps it spends not computing
  (waiting, communicating, summing the loss). A round's figure is the mean over ranks;
  `bubble_measured` is the median over rounds (with its min-max), against the bound
  (K-1)/(M+K-1) of a perfectly balanced pipeline whose communication is free.
- Throughput: the same model and cut trained through shardwise's public path (`parallelize`,
  then `forward_backward`; 1F1B, M=8) and by plain `torch.distributed.pipelining`
  (PipelineStage with shapes inferred by torch, Schedule1F1B, the same loss), each step
  including the AdamW update, each side's steps between two barriers. Every round runs
  shardwise, plain, and shardwise again (the A/A twin) in a rotated order;
  `ratio_vs_torch_pipelining` is the median over rounds of plain step time / shardwise step
  time (above 1: shardwise is faster), with its min-max, the A/A band (shardwise again /
  shardwise) and whether it is resolved (further from 1 than the A/A noise).
The last line is JSON with those figures, and `bubble_measured` / `bubble_bound` for M=8.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.pipelining import PipelineStage, Schedule1F1B

from shardwise.data.batch import Batch
from shardwise.distributed import DistEnv, all_gather_floats
from shardwise.loss import token_loss_sum
from shardwise.parallel.mesh import Layout
from shardwise.parallel.model import ParallelModel
from shardwise.parallel.parallelism import Parallelism, PipelineStages
from shardwise.parallel.parallelize import parallelize
from shardwise.parallel.schedules import pipeline_schedule
from shardwise.parallel.stages import split_into_stages
from shardwise.parallel.sync import sync_strategy
from shardwise.stores import free_port
from support.rounds import Comparison, add_rounds_flag, interleave, parse_with_tiny, round_line
from support.transformer_job import build_transformer, fixed_batch, join_gloo, model_flags

STAGES = 2
BUBBLE_MICROBATCHES = (1, 4, 8)


class BusyClock:
    """Seconds this process spends inside pipeline stage compute (forward or backward)."""

    busy = 0.0

    @classmethod
    def install(cls) -> None:
        for name in ("forward_one_chunk", "backward_one_chunk"):
            setattr(PipelineStage, name, cls._timed(getattr(PipelineStage, name)))

    @classmethod
    def _timed(cls, method: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                cls.busy += time.perf_counter() - started

        return timed


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="pipeline-speed-") as out:
        mp.start_processes(
            worker, args=(free_port(), args, out), nprocs=STAGES, start_method="spawn"
        )
        report = json.loads(Path(out, "report.json").read_text())
    bubble = bubbles_by_round(report["bubble"])
    speed = Comparison.between(report["step_s"], "plain", "ours", aa="ours")
    print(speed.line("ratio_vs_torch_pipelining"))
    medians_ms = {side: statistics.median(s) * 1e3 for side, s in report["step_s"].items()}
    print(
        f"step time (M=8, 1F1B, medians for context): shardwise {medians_ms['ours']:.1f} ms, "
        f"plain torch pipelining {medians_ms['plain']:.1f} ms"
    )
    result = {
        **speed.figures("ratio_vs_torch_pipelining"),
        "bubble_measured": round(statistics.median(bubble["8"]), 3),
        "bubble_measured_range": [round(min(bubble["8"]), 3), round(max(bubble["8"]), 3)],
        "bubble_bound": round(bound(8), 3),
        "bubble_measured_by_m": {m: round(statistics.median(v), 3) for m, v in bubble.items()},
        "bubble_bound_by_m": {str(m): round(bound(m), 3) for m in BUBBLE_MICROBATCHES},
        "step_ms_medians": {side: round(ms, 1) for side, ms in medians_ms.items()},
        "rounds": args.rounds,
        "steps_per_round": args.steps,
    }
    print(json.dumps(result), flush=True)


def bubbles_by_round(per_rank: dict[str, list[list[float]]]) -> dict[str, list[float]]:
    """Per M, each round's bubble (the mean over ranks); prints each M's median and spread."""
    bubble = {m: [statistics.mean(ranks) for ranks in rounds] for m, rounds in per_rank.items()}
    for m in BUBBLE_MICROBATCHES:
        ranks = [statistics.median(rank) for rank in zip(*per_rank[str(m)], strict=True)]
        rounds = bubble[str(m)]
        print(
            f"M={m}: bubble measured {statistics.median(rounds):.3f} "
            f"(rounds {min(rounds):.3f}-{max(rounds):.3f}; per rank "
            f"{', '.join(f'{r:.3f}' for r in ranks)})  bound {bound(m):.3f}"
        )
    return bubble


def bound(m: int) -> float:
    """The bubble of a perfectly balanced K-stage pipeline with free communication."""
    return (STAGES - 1) / (m + STAGES - 1)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model_flags(parser, dim=256, layers=4, heads=4, batch=16, length=128)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per side and round")
    add_rounds_flag(parser, default=5)
    tiny = {"dim": 64, "layers": 2, "heads": 2, "batch": 8, "length": 16}  # 8: M up to 8
    return parse_with_tiny(parser, tiny | {"rounds": 1, "steps": 2})


def worker(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)  # one core per stage on a 2-core machine
    join_gloo(rank, STAGES, port, timeout_s=120)
    env = DistEnv(rank, STAGES, rank, STAGES, torch.device("cpu"))
    layout = Layout.for_world(STAGES, pp=STAGES).build(env, timeout_s=120)
    BusyClock.install()
    batch = fixed_batch(args)
    bubble = measure_bubbles(args, env, layout, batch)
    step_s = measure_throughput(args, env, layout, batch)
    if rank == 0:
        report = {"bubble": bubble, "step_s": step_s}
        Path(out, "report.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def measure_bubbles(
    args: argparse.Namespace, env: DistEnv, layout: Layout, batch: Batch
) -> dict[str, list[list[float]]]:
    """Per M, per round, each rank's share of `forward_backward` time spent not computing."""
    models = {m: make_ours(args, env, layout, "gpipe", m) for m in BUBBLE_MICROBATCHES}
    for model in models.values():  # warm up: shapes, buffers, communicators
        train_ours(model, batch)

    def bubble(model: ParallelModel) -> list[float]:
        busy = wall = 0.0
        for _ in range(args.steps):
            dist.barrier()
            BusyClock.busy = 0.0
            started = time.perf_counter()
            train_ours(model, batch)
            wall += time.perf_counter() - started
            busy += BusyClock.busy
            for p in model.parameters():
                p.grad = None
        return [1 - row[0] / row[1] for row in all_gather_floats([busy, wall], env)]

    sides = {str(m): partial(bubble, model) for m, model in models.items()}
    return interleave(sides, args.rounds)


def measure_throughput(
    args: argparse.Namespace, env: DistEnv, layout: Layout, batch: Batch
) -> dict[str, list[float]]:
    """Seconds per step of shardwise (`ours`), plain pipelining and `ours_again`, per round."""
    model = make_ours(args, env, layout, "1f1b", 8)
    ours_optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    plain_schedule, plain_stage = make_plain(args, env, 8)
    plain_optimizer = torch.optim.AdamW(plain_stage.parameters(), lr=1e-4)

    def ours() -> None:
        train_ours(model, batch)  # no loss collective, as plain pipelining gathers none
        ours_optimizer.step()
        ours_optimizer.zero_grad(set_to_none=True)

    def plain() -> None:
        step_plain(plain_schedule, env, batch)
        plain_optimizer.step()
        plain_optimizer.zero_grad(set_to_none=True)

    def seconds_per_step(step: Callable[[], None]) -> float:
        dist.barrier()
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        dist.barrier()
        return (time.perf_counter() - started) / args.steps

    ours(), plain()  # warm up (plain pipelining infers shapes on its first step)
    sides = {"ours": partial(seconds_per_step, ours), "plain": partial(seconds_per_step, plain)}

    def show(index: int, results: dict[str, float]) -> None:
        if env.rank == 0:
            ms = {side: seconds * 1e3 for side, seconds in results.items()}
            shown = {"plain/ours": ms["plain"] / ms["ours"], "A/A": ms["ours_again"] / ms["ours"]}
            print(round_line(index, args.rounds, ms, "ms/step", shown), flush=True)

    return interleave(sides, args.rounds, aa="ours", on_round=show)


def cut(args: argparse.Namespace) -> list[str]:
    return [f"blocks.{args.layers // 2}"]


def make_ours(
    args: argparse.Namespace, env: DistEnv, layout: Layout, schedule: str, m: int
) -> ParallelModel:
    """Shardwise's public path: the whole model, parallelized for this rank's stage."""
    stages = PipelineStages(tuple(cut(args)), pipeline_schedule(schedule), m)
    return parallelize(
        build_transformer(args), Parallelism(layout, sync_strategy("allreduce"), stages), env
    )


def train_ours(model: ParallelModel, batch: Batch) -> None:
    """One step's forward and backward through the public call (the owned loss is unused)."""
    model.forward_backward(batch.tokens, batch.targets, batch.step_tokens)


def make_plain(
    args: argparse.Namespace, env: DistEnv, m: int
) -> tuple[Schedule1F1B, torch.nn.Module]:
    """Stock pipelining on the same cut: shapes inferred by torch, no shardwise pipeline."""
    stage = split_into_stages(build_transformer(args), cut(args))[env.rank]

    def loss(logits: torch.Tensor, targets: torch.Tensor, step_tokens: int) -> torch.Tensor:
        return token_loss_sum(logits, targets) / step_tokens

    pipeline_stage = PipelineStage(stage, env.rank, STAGES, env.device)
    return Schedule1F1B(pipeline_stage, m, loss_fn=loss, scale_grads=False), stage


def step_plain(schedule: Schedule1F1B, env: DistEnv, batch: Batch) -> None:
    options = {"loss_kwargs": {"step_tokens": batch.step_tokens}, "return_outputs": False}
    if env.rank == 0:
        schedule.step(batch.tokens, **options)
    else:
        schedule.step(target=batch.targets, **options)


if __name__ == "__main__":
    main()
