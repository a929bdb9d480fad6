"""Does shardwise's data-parallel step cost more than a hand-written DDP loop? How does it scale?

    python benchmarks/dp_overhead.py [--steps 40] [--rounds 6]    # ~9 min on 2 cores
    python benchmarks/dp_overhead.py --steps 4 --rounds 2 --batch-size 4   # smoke test
    python benchmarks/dp_overhead.py --tiny            # smallest sizes: does it still run?

On identical fixed-length data (no padding) and the same model, each round runs in one 2-rank
gloo job: shardwise's Trainer for `--steps` optimizer steps, a hand-written DDP loop doing the
same work (DistributedSampler + DataLoader, token-mean cross-entropy, global-norm clipping,
AdamW, LR schedule), if installed the same loop under Accelerate, and the Trainer a second time
(the A/A twin, the noise floor); after an untimed warm-up run of each, in an order rotated every
round (a process's later runs profit from warm caches; see support/rounds.py). Each round also
runs the Trainer alone on 1 rank for the scaling figure, before the 2-rank job in odd rounds and
after it in even ones. Each rank gets one thread, as on a machine with a core per rank. Every
figure is the median of per-round ratios, with its min-max and the A/A band:

- overhead_ratio: shardwise step time / hand-written step time at 2 ranks (target <= 1.05)
- scaling_efficiency: tokens/s on 2 ranks / (2 x tokens/s on 1 rank), i.e. 1-rank step time /
  2-rank step time; its A/A band is the 2-rank one (the 1-rank job has no twin)
- ratio_vs_accelerate: shardwise step time / the same loop under Hugging Face Accelerate
  (when `accelerate` is installed: `pip install -e .[bench]`)

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import shardwise
from shardwise.config import TrainConfig
from shardwise.data.fit import FitReport
from shardwise.data.prepare import PreparedCorpus
from shardwise.distributed import init_distributed, shutdown_distributed
from shardwise.models import build_model
from shardwise.run_dir import hold_run_dir
from shardwise.session import Session
from shardwise.train.lr_schedule import warmup_cosine
from shardwise.train.trainer import Trainer
from support.rounds import (
    Comparison,
    add_rounds_flag,
    again,
    base_side,
    parse_with_tiny,
    ratios,
    round_line,
    round_orders,
)

SEQ_LEN = 129  # 128 next-token targets per sequence
N_SEQUENCES = 4096


def fixed_length_corpus(seed: int = 0) -> PreparedCorpus:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(N_SEQUENCES, SEQ_LEN), dtype=np.uint8)
    nothing = FitReport(N_SEQUENCES, N_SEQUENCES, 0, 0, 0, 0, SEQ_LEN, 2)
    return PreparedCorpus(list(data), list(data[:8]), 256, nothing)


def run_shardwise(config: TrainConfig, corpus: PreparedCorpus) -> float:
    """Seconds per optimizer step of the Trainer's loop (its own clock, excluding eval/report)."""
    env = init_distributed("cpu", config.timeout_s)
    torch.set_num_threads(1)
    torch.manual_seed(config.seed)
    model = build_model(config.model, 256)
    # Each rank its own run dir, held as `shardwise train`'s launcher holds one: the Trainer
    # writes no checkpoint into a run dir nobody holds.
    with tempfile.TemporaryDirectory() as scratch, hold_run_dir(config, Path(scratch)) as run_dir:
        trainer = Trainer(config, Session.from_config(env, config), corpus, model, run_dir)
        trainer.fit()
        return trainer.totals.train_s / config.max_steps


def run_hand_written(config: TrainConfig, corpus: PreparedCorpus) -> float:
    """Seconds per optimizer step of a plain DDP loop doing the same work."""
    env = init_distributed("cpu", config.timeout_s)
    torch.set_num_threads(1)
    torch.manual_seed(config.seed)
    model = build_model(config.model, 256)
    if env.world_size > 1:
        model = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    scheduler = warmup_cosine(optimizer, config.warmup_steps, config.max_steps, 0.1)
    data = torch.from_numpy(np.stack(corpus.train).astype(np.int64))
    dataset = TensorDataset(data[:, :-1], data[:, 1:])
    sampler = DistributedSampler(dataset, env.world_size, env.rank, seed=config.seed)
    loader = iter(DataLoader(dataset, config.batch_size, sampler=sampler, drop_last=True))
    started = time.perf_counter()
    for _ in range(config.max_steps):
        tokens, targets = next(loader)
        logits = model(tokens)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    return (time.perf_counter() - started) / config.max_steps


def run_accelerate(config: TrainConfig, corpus: PreparedCorpus) -> float:
    """Seconds per optimizer step of the same loop written with Hugging Face Accelerate."""
    from accelerate import Accelerator

    env = init_distributed("cpu", config.timeout_s)
    torch.set_num_threads(1)
    torch.manual_seed(config.seed)
    accelerator = Accelerator(cpu=env.device.type == "cpu")
    model = build_model(config.model, 256)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    scheduler = warmup_cosine(optimizer, config.warmup_steps, config.max_steps, 0.1)
    data = torch.from_numpy(np.stack(corpus.train).astype(np.int64))
    dataset = TensorDataset(data[:, :-1], data[:, 1:])
    loader = DataLoader(dataset, config.batch_size, shuffle=True, drop_last=True)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    batches = iter(loader)
    started = time.perf_counter()
    for _ in range(config.max_steps):
        tokens, targets = next(batches)
        loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), config.clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    return (time.perf_counter() - started) / config.max_steps


def worker(config_json: str, order: list[str]) -> dict[str, float]:
    """Seconds per step of each side in `order` (a twin `x_again` runs `x` again)."""
    config = TrainConfig.model_validate_json(config_json)
    corpus = fixed_length_corpus()
    runners = {
        "shardwise": run_shardwise,
        "hand_written": run_hand_written,
        "accelerate": run_accelerate,
    }
    try:
        # Untimed short runs first: the process's one-off costs (allocator, oneDNN kernels for
        # these shapes) would otherwise land on whichever side is measured first.
        warm_up = config.model_copy(update={"max_steps": 5, "checkpoint_every": 5})
        for name in dict.fromkeys(base_side(name) for name in order):
            runners[name](warm_up, corpus)
        return {name: runners[base_side(name)](config, corpus) for name in order}
    finally:
        shutdown_distributed()


def launch(nproc: int, config: TrainConfig, order: list[str]) -> dict[str, float]:
    return shardwise.launch(worker, nproc, config.model_dump_json(), order)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per side and round")
    add_rounds_flag(parser, default=6)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model", default="lstm")
    args = parse_with_tiny(parser, {"steps": 2, "rounds": 1, "batch_size": 2})
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    config = TrainConfig(
        model=args.model,
        batching="fixed",  # identical fixed-length batches on both sides
        max_steps=args.steps,
        batch_size=args.batch_size,
        warmup_steps=5,
        log_every=10,
        checkpoint_every=args.steps,
        tensorboard=False,
        sample_bytes=0,
        eval_fraction=0.0,
        timeout_s=120,
    )
    peers = ["hand_written", *(["accelerate"] if _accelerate_installed() else [])]
    samples = measure_rounds(config, ["shardwise", *peers], args.rounds)
    print(json.dumps(figures(samples, peers, args)))


def measure_rounds(config: TrainConfig, sides: list[str], rounds: int) -> dict[str, list[float]]:
    """Seconds per step, per side and round: the 2-rank sides and their twin, and `one_rank`."""
    samples: dict[str, list[float]] = {}
    for index, order in enumerate(round_orders(sides, rounds, aa="shardwise")):
        # The 1-rank job goes first in odd rounds: neither job always follows the other.
        one_first = index % 2 == 1
        one = launch(1, config, ["shardwise"]) if one_first else {}
        two = launch(2, config, order)
        if not one_first:
            one = launch(1, config, ["shardwise"])
        for name, seconds in {**two, "one_rank": one["shardwise"]}.items():
            samples.setdefault(name, []).append(seconds)
        per_ms = {name: seconds * 1e3 for name, seconds in two.items()}
        per_ms["1 rank shardwise"] = one["shardwise"] * 1e3
        overhead = two["shardwise"] / two["hand_written"]
        aa = two[again("shardwise")] / two["shardwise"]
        shown = {"overhead": overhead, "A/A": aa}
        print(round_line(index, rounds, per_ms, "ms/step", shown), flush=True)
    return samples


def figures(
    samples: dict[str, list[float]], peers: list[str], args: argparse.Namespace
) -> dict[str, object]:
    """The JSON: each ratio's median, min-max, A/A band and verdict; step rates for context."""
    overhead = Comparison.between(samples, "shardwise", "hand_written", aa="shardwise")
    # 1-rank step time / 2-rank step time == tokens/s on 2 ranks / (2 x tokens/s on 1 rank).
    scaling = Comparison.of(ratios(samples, "one_rank", "shardwise"), overhead.aa_ratios)
    print(overhead.line("overhead_ratio"))
    print(scaling.line("scaling_efficiency"))
    tokens_per_rank_step = args.batch_size * (SEQ_LEN - 1)
    result: dict[str, object] = {
        **overhead.figures("overhead_ratio", 4),
        **scaling.figures("scaling_efficiency", 4),
        "overhead_ratio_per_round": [round(r, 3) for r in overhead.ratios],
        "tokens_per_s_2_ranks": round(
            2 * tokens_per_rank_step / statistics.median(samples["shardwise"])
        ),
        "tokens_per_s_1_rank": round(tokens_per_rank_step / statistics.median(samples["one_rank"])),
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "model": args.model,
        "world_size": 2,
        "seq_len": SEQ_LEN - 1,
        "batch_size_per_rank": args.batch_size,
    }
    for name in peers:
        peer = Comparison.between(samples, "shardwise", name, aa="shardwise")
        print(peer.line(f"ratio_vs_{name}"))
        result.update(peer.figures(f"ratio_vs_{name}", 4))
    if "accelerate" not in peers:
        result["accelerate"] = "not installed (pip install accelerate): not compared"
    return result


def _accelerate_installed() -> bool:
    try:
        import accelerate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
