"""Pipeline bubble against its bound, and shardwise's pipeline against plain torch pipelining.

    python benchmarks/pipeline_speed.py               # 2 stages on 2 gloo processes
    python benchmarks/pipeline_speed.py --repeats 3 --dim 128

Two measurements, in one 2-process job (one thread per process, one stage each):
- Bubble: a TransformerLM cut into K=2 stages trains under GPipe with M = 1, 4 and 8
  micro-batches of one fixed batch. Each rank adds up the time its stage spends computing
  (forward and backward of a micro-batch) during `train_step`; a rank's bubble is the share of
  the step it spends not computing (waiting, communicating, summing the loss), and the figure
  is the mean over ranks, against the bound (K-1)/(M+K-1) of a perfectly balanced pipeline
  whose communication is free.
- Throughput: the same model and cut trained by `PipelineRunner` (1F1B, M=8) and by plain
  `torch.distributed.pipelining` (PipelineStage with shapes inferred by torch, Schedule1F1B,
  the same loss), each step including the AdamW update and ending at a barrier. Steps of the
  two alternate, and the ratio is the median plain step time over the median shardwise step
  time (above 1: shardwise is faster).
Settings alternate within every repeat, and medians are compared, so that load from other
processes on the machine falls on both sides alike. The last line
is JSON with `ratio_vs_torch_pipelining`, and `bubble_measured` / `bubble_bound` for M=8.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.pipelining import PipelineStage, Schedule1F1B

from shardwise.data.batch import Batch
from shardwise.distributed import DistEnv, all_gather_floats
from shardwise.launch import free_port
from shardwise.parallel.mesh import build_mesh
from shardwise.parallel.pipeline import PipelineRunner, token_loss_sum
from shardwise.parallel.stages import split_into_stages
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
    bubble = {m: statistics.mean(ranks) for m, ranks in report["bubble"].items()}
    for m in BUBBLE_MICROBATCHES:
        ranks, bound = report["bubble"][str(m)], (STAGES - 1) / (m + STAGES - 1)
        print(
            f"M={m}: bubble measured {bubble[str(m)]:.3f} (per rank "
            f"{', '.join(f'{r:.3f}' for r in ranks)})  bound {bound:.3f}"
        )
    print(
        f"step time (M=8, 1F1B): shardwise {report['ours_s'] * 1e3:.1f} ms, plain torch "
        f"pipelining {report['plain_s'] * 1e3:.1f} ms"
    )
    result = {
        "ratio_vs_torch_pipelining": round(report["plain_s"] / report["ours_s"], 3),
        "bubble_measured": round(bubble["8"], 3),
        "bubble_bound": round((STAGES - 1) / (8 + STAGES - 1), 3),
        "bubble_measured_by_m": {m: round(v, 3) for m, v in bubble.items()},
        "bubble_bound_by_m": {
            str(m): round((STAGES - 1) / (m + STAGES - 1), 3) for m in BUBBLE_MICROBATCHES
        },
        "repeats": args.repeats,
    }
    print(json.dumps(result), flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model_flags(parser, dim=256, layers=4, heads=4, batch=16, length=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    return parser.parse_args()


def worker(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)  # one core per stage on a 2-core machine
    join_gloo(rank, STAGES, port, timeout_s=120)
    env = DistEnv(rank, STAGES, rank, STAGES, torch.device("cpu"))
    BusyClock.install()
    batch = fixed_batch(args)
    bubble = measure_bubbles(args, env, batch)
    ours_s, plain_s = measure_throughput(args, env, batch)
    if rank == 0:
        report = {"bubble": bubble, "ours_s": ours_s, "plain_s": plain_s}
        Path(out, "report.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def measure_bubbles(args: argparse.Namespace, env: DistEnv, batch: Batch) -> dict[str, list[float]]:
    """Per M, each rank's median share of `train_step` time spent not computing."""
    runners = {m: make_runner(args, env, "gpipe", m) for m in BUBBLE_MICROBATCHES}
    for runner in runners.values():  # warm up: shapes, buffers, communicators
        runner.train_step(batch)
    samples: dict[int, list[list[float]]] = {m: [] for m in BUBBLE_MICROBATCHES}
    for _ in range(args.repeats):
        for m, runner in runners.items():
            busy = wall = 0.0
            for _ in range(args.steps):
                dist.barrier()
                BusyClock.busy = 0.0
                started = time.perf_counter()
                runner.train_step(batch)
                wall += time.perf_counter() - started
                busy += BusyClock.busy
                for p in runner.parameters():
                    p.grad = None
            samples[m].append([1 - row[0] / row[1] for row in all_gather_floats([busy, wall], env)])
    return {
        str(m): [statistics.median(rank) for rank in zip(*values, strict=True)]
        for m, values in samples.items()
    }


def measure_throughput(args: argparse.Namespace, env: DistEnv, batch: Batch) -> tuple[float, float]:
    runner = make_runner(args, env, "1f1b", 8)
    ours_optimizer = torch.optim.AdamW(runner.parameters(), lr=1e-4)
    plain_schedule, plain_stage = make_plain(args, env, 8)
    plain_optimizer = torch.optim.AdamW(plain_stage.parameters(), lr=1e-4)

    def ours() -> None:
        runner.train_step(batch, reduce_loss=False)  # plain pipelining gathers no loss either
        ours_optimizer.step()
        ours_optimizer.zero_grad(set_to_none=True)

    def plain() -> None:
        step_plain(plain_schedule, env, batch)
        plain_optimizer.step()
        plain_optimizer.zero_grad(set_to_none=True)

    ours(), plain()  # warm up (plain pipelining infers shapes on its first step)
    times: dict[str, list[float]] = {"ours": [], "plain": []}
    order = [("ours", ours), ("plain", plain)]
    for repeat in range(args.repeats * args.steps):
        # Alternate step by step, and who goes first, so background load hits both alike.
        for name, step in order[:: 1 if repeat % 2 == 0 else -1]:
            dist.barrier()
            started = time.perf_counter()
            step()
            dist.barrier()
            times[name].append(time.perf_counter() - started)
    return statistics.median(times["ours"]), statistics.median(times["plain"])


def cut(args: argparse.Namespace) -> list[str]:
    return [f"blocks.{args.layers // 2}"]


def make_runner(args: argparse.Namespace, env: DistEnv, schedule: str, m: int) -> PipelineRunner:
    return PipelineRunner(
        build_transformer(args), build_mesh(env, pp=STAGES), cut(args), schedule, m
    )


def make_plain(
    args: argparse.Namespace, env: DistEnv, m: int
) -> tuple[Schedule1F1B, torch.nn.Module]:
    """Stock pipelining on the same cut: shapes inferred by torch, no shardwise runner."""
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
