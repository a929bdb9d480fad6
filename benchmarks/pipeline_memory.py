"""Peak memory per rank of pipeline training against one process, for a ~1.5 GB training state.

    python benchmarks/pipeline_memory.py              # single vs --pp 2 vs --pp 4, 3 repeats
    python benchmarks/pipeline_memory.py --repeats 1 --dim 512

A TransformerLM whose parameters, gradients and AdamW moments take about 1.5 GB trains for a
few steps, once in a single process and once cut into 2 and into 4 pipeline stages (one gloo
process per stage, 1F1B). Each process records its resident memory when torch is imported and
its process group is up (an idle torch process), and its peak resident memory after training;
a layout's figure is the largest rank's peak above idle. Layouts run interleaved, each run in
fresh processes, and the medians over repeats are compared. The last line is JSON with
`mem_ratio_pp2` and `mem_ratio_pp4` (pipeline rank / single process; ideal 1/K).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shardwise.data.batch import Batch
from shardwise.distributed import DistEnv
from shardwise.launch import free_port
from shardwise.parallel.mesh import build_mesh
from shardwise.parallel.pipeline import PipelineRunner, token_loss_sum
from support.transformer_job import build_transformer, fixed_batch, join_gloo, model_flags

MIB = 2**20


def main() -> None:
    args = parse_args()
    params = count_parameters(args)
    print(
        f"TransformerLM dim={args.dim} layers={args.layers}: {params / 1e6:.1f}M parameters, "
        f"training state (params + grads + AdamW) {16 * params / 1e9:.2f} GB",
        flush=True,
    )
    peaks: dict[str, list[float]] = {"single": [], "pp2": [], "pp4": []}
    for repeat in range(args.repeats):
        for layout, world in (("single", 1), ("pp2", 2), ("pp4", 4)):
            started = time.perf_counter()
            per_rank = run(args, world)
            peaks[layout].append(max(per_rank))
            print(
                f"repeat {repeat}  {layout:6s}  peak above idle per rank (MiB): "
                f"{[round(p / MIB) for p in per_rank]}  ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    median = {layout: statistics.median(values) for layout, values in peaks.items()}
    result = {
        "mem_ratio_pp2": round(median["pp2"] / median["single"], 3),
        "mem_ratio_pp4": round(median["pp4"] / median["single"], 3),
        "single_peak_mib": round(median["single"] / MIB),
        "pp2_peak_mib": round(median["pp2"] / MIB),
        "pp4_peak_mib": round(median["pp4"] / MIB),
        "training_state_gb": round(16 * params / 1e9, 3),
        "repeats": args.repeats,
    }
    print(json.dumps(result), flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model_flags(parser, dim=992, layers=8, heads=8, batch=4, length=64)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args()


def count_parameters(args: argparse.Namespace) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build_transformer(args).parameters())


def run(args: argparse.Namespace, world: int) -> list[int]:
    """Train once on `world` fresh processes; each rank's peak RSS above idle, in bytes."""
    with tempfile.TemporaryDirectory(prefix="pipeline-memory-") as out:
        mp.start_processes(
            worker, args=(world, free_port(), args, out), nprocs=world, start_method="spawn"
        )
        return [
            json.loads(Path(out, f"{rank}.json").read_text())["above_idle"] for rank in range(world)
        ]


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        join_gloo(rank, world, port, timeout_s=300)
    idle = peak_rss()
    batch = fixed_batch(args)
    if world == 1:
        train_single(args, batch)
    else:
        train_pipeline(args, batch, DistEnv(rank, world, rank, world, torch.device("cpu")))
        dist.destroy_process_group()
    Path(out, f"{rank}.json").write_text(json.dumps({"above_idle": peak_rss() - idle}))


def train_single(args: argparse.Namespace, batch: Batch) -> None:
    model = build_transformer(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(args.steps):
        (token_loss_sum(model(batch.tokens), batch.targets) / batch.step_tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def train_pipeline(args: argparse.Namespace, batch: Batch, env: DistEnv) -> None:
    stages = env.world_size
    # Whole blocks per stage, evenly: the embedding joins stage 0 and the head the last stage.
    cuts = [f"blocks.{k * args.layers // stages}" for k in range(1, stages)]
    runner = PipelineRunner(
        build_transformer(args), build_mesh(env, pp=stages), cuts, "1f1b", args.microbatches
    )
    optimizer = torch.optim.AdamW(runner.parameters(), lr=1e-4)
    for _ in range(args.steps):
        runner.train_step(batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


if __name__ == "__main__":
    main()
