"""Peak memory per rank of pipeline training against one process, for a ~1.5 GB training state.

    python benchmarks/pipeline_memory.py              # single vs pp 2 vs pp 4: ~8 min, 2 cores
    python benchmarks/pipeline_memory.py --rounds 2 --dim 128 --layers 4 --heads 4   # smoke
    python benchmarks/pipeline_memory.py --tiny       # smallest sizes: does it still run?

A TransformerLM whose parameters, gradients and AdamW moments take about 1.5 GB trains for a
few steps, once in a single process and once cut into 2 and into 4 pipeline stages (one gloo
process per stage, 1F1B). Each process records its resident memory when torch is imported and
its process group is up (an idle torch process), and its peak resident memory after training;
a layout's figure is the largest rank's peak above idle. Every round runs each layout in fresh
processes, and the single process a second time (the A/A twin), in an order rotated every round
(support/rounds.py). Peak memory is far steadier than time, but not exact (allocator and page
cache state), so the same rule holds: `mem_ratio_pp2` and `mem_ratio_pp4` (pipeline rank /
single process; ideal 1/K) are medians of per-round ratios, with their min-max, the A/A band
(single again / single) and whether they are resolved. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shardwise.data.batch import Batch
from shardwise.distributed import DistEnv
from shardwise.loss import token_loss_sum
from shardwise.parallel.mesh import Layout
from shardwise.parallel.parallelism import Parallelism, PipelineStages
from shardwise.parallel.parallelize import parallelize
from shardwise.parallel.schedules import pipeline_schedule
from shardwise.parallel.sync import sync_strategy
from shardwise.stores import free_port
from support.rounds import Comparison, add_rounds_flag, interleave, parse_with_tiny, round_line
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
    layouts = {"single": 1, "pp2": 2, "pp4": 4}
    sides = {layout: partial(run, args, world) for layout, world in layouts.items()}
    peaks = interleave(sides, args.rounds, aa="single", on_round=partial(show, args.rounds))
    result: dict[str, object] = {}
    for layout in ("pp2", "pp4"):
        ratio = Comparison.between(peaks, layout, "single", aa="single")
        print(ratio.line(f"mem_ratio_{layout}"))
        result.update(ratio.figures(f"mem_ratio_{layout}"))
    for layout in layouts:  # absolute peaks beside the ratios, for context
        result[f"{layout}_peak_mib"] = round(statistics.median(peaks[layout]) / MIB)
    result["training_state_gb"] = round(16 * params / 1e9, 3)
    result["rounds"] = args.rounds
    print(json.dumps(result), flush=True)


def show(rounds: int, index: int, peaks: dict[str, float]) -> None:
    mib = {layout: peak / MIB for layout, peak in peaks.items()}
    ratios = {f"{k}/single": mib[k] / mib["single"] for k in ("pp2", "pp4", "single_again")}
    print(round_line(index, rounds, mib, "MiB, largest rank's peak above idle", ratios), flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model_flags(parser, dim=992, layers=8, heads=8, batch=4, length=64)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    add_rounds_flag(parser, default=5)
    tiny = {"dim": 64, "layers": 4, "heads": 2, "batch": 4, "length": 16}  # a block per stage
    return parse_with_tiny(parser, tiny | {"rounds": 1, "steps": 1})


def count_parameters(args: argparse.Namespace) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build_transformer(args).parameters())


def run(args: argparse.Namespace, world: int) -> int:
    """Train once on `world` fresh processes; the largest rank's peak RSS above idle, in bytes."""
    with tempfile.TemporaryDirectory(prefix="pipeline-memory-") as out:
        mp.start_processes(
            worker, args=(world, free_port(), args, out), nprocs=world, start_method="spawn"
        )
        return max(
            json.loads(Path(out, f"{rank}.json").read_text())["above_idle"] for rank in range(world)
        )


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
    layout = Layout.for_world(stages, pp=stages).build(env, timeout_s=300)
    stages = PipelineStages(tuple(cuts), pipeline_schedule("1f1b"), args.microbatches)
    setting = Parallelism(layout, sync_strategy("allreduce"), stages)
    model = parallelize(build_transformer(args), setting, env)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(args.steps):
        model.forward_backward(batch.tokens, batch.targets, batch.step_tokens)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


if __name__ == "__main__":
    main()
