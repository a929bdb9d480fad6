"""What sharding and recompute save a rank, what they cost a step, and how well it was predicted.

    python benchmarks/memory.py                        # ~1 GB of training state: hours on 2 cores
    python benchmarks/memory.py --state-gb 0.25 --rounds 3      # what runs here in ~1 h
    python benchmarks/memory.py --tiny                 # smallest sizes: does it still run?

A TransformerLM and an LSTM, each sized to `--state-gb` of training state (parameters,
gradients and AdamW's two moments: 16 bytes a parameter), train a few steps in the real
`shardwise train` on 2 and on 4 ranks (gloo, each its share of the cores): plain DDP,
`--shard full`, `--shard grads`, and at 2 ranks `--pp 2`. A long-sequence Transformer trains
on rows of exactly `--long-len` random tokens on one rank without recompute, with
`--recompute full` and with `--recompute selective`. Every side is a fresh process tree; every
round runs each side once plus an A/A twin (DDP again, and no-recompute again), in an order
rotated every round (support/rounds.py). A side's memory is
its largest rank's peak above that rank's start baseline (summary.json, memory/record.py: CPU
peak resident memory, GPU max_memory_allocated); its time the median step of its slowest rank,
the first step left out. Figures are medians of per-round ratios with their range, A/A band and
verdict:

- `mem_ratio_shard_dp2`, `mem_ratio_shard_dp4`: --shard full over DDP (targets <= 0.60, <= 0.40),
  for the Transformer; `_lstm` and `grads` variants beside them;
- `shard_time_ratio_dp2`, `_dp4`: --shard full's step time over DDP's, at equal batches;
- `recompute_activation_ratio`: activations without recompute over with --recompute full (target
  >= 2), activations being the peak above baseline less the state (predicted exactly: it is the
  parameters' bytes); `recompute_time_ratio`: full's step time over none's (target <= 1.4);
  `_selective` variants beside them. On CPU a run with --recompute fixes glibc's mmap threshold
  (memory/measure.py), which costs step time of its own: `recompute_time_ratio_equal_allocator`
  sets full's step against none's at that same threshold (the side `long_none_fixed`), which is
  recompute's own cost; the plain ratio is what a user switching it on sees;
- `memory_error_median`, `memory_error_max`: every rank of every run, |predicted - measured| /
  measured of the peak above the baseline (memory_prediction.py covers more layouts).

Sides whose technique is not registered are skipped, named under `skipped`, their figures null.
`--mmap-threshold BYTES` runs every side with glibc's MALLOC_MMAP_THRESHOLD_ held fixed (see
README: on CPU the default dynamic threshold lets a heap that fragments hold freed memory). The
last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from shardwise.memory.measure import FIXED_MMAP_THRESHOLD
from shardwise.techniques import settings
from support.memory_runs import MODELS_MODULE, Case, Run, run_case, write_models
from support.rounds import Comparison, add_rounds_flag, interleave, parse_with_tiny, round_line

MIB = 2**20
BYTES_PER_PARAMETER = 16  # parameter, gradient, and AdamW's two moments, fp32


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="memory-bench-") as folder:
        work = Path(folder)
        text = prepare_work(work, args)
        sides, skipped = side_cases(args)
        for name, why in skipped.items():
            print(f"{name}: skipped ({why})", flush=True)
        rows = full_rows(work, args.long_len)
        runs = {
            name: partial(run_case, case, rows if name.startswith("long") else text, work)
            for name, case in sides.items()
        }
        samples = measured(runs, args.rounds)
    print(json.dumps(figures(samples, skipped, args)), flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--state-gb", type=float, default=1.0, help="training state per model")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--layers", type=int, default=12, help="the Transformer's blocks")
    parser.add_argument("--long-len", type=int, default=1024, help="the recompute sides' rows")
    parser.add_argument("--long-dim", type=int, default=256)
    parser.add_argument("--long-layers", type=int, default=4)
    parser.add_argument(
        "--ranks", default="2,4", help='world sizes of the sharding sides ("": none of them)'
    )
    parser.add_argument("--models", default="transformer,lstm", help="of the sharding sides")
    parser.add_argument("--mmap-threshold", type=int, default=0, help="MALLOC_MMAP_THRESHOLD_")
    add_rounds_flag(parser, default=3)
    tiny = {"state_gb": 0.01, "layers": 2, "steps": 2, "max_len": 32, "long_len": 128}
    tiny |= {"long_dim": 32, "long_layers": 2, "ranks": "2", "models": "transformer", "rounds": 1}
    return parse_with_tiny(parser, tiny)


def prepare_work(work: Path, args: argparse.Namespace, long: bool = True) -> Path:
    """Write into `work` the models `shardwise train` imports (bench_models: the Transformer and
    the LSTM of `model_sizes`, and with `long` the long-sequence Transformer of --long-*) and the
    embedded corpus; the corpus's path."""
    transformer, lstm = model_sizes(args)
    more = {"long_transformer": long_sizes(args)} if long else {}
    write_models(work, transformer, lstm, **more)
    return corpus(work)


def model_sizes(args: argparse.Namespace) -> tuple[dict, dict]:
    """The Transformer (`--layers` blocks, GPT-2 small's 12 by default, of the width a multiple
    of 64 that fills the state) and the LSTM (2 layers of the hidden size that fills it).
    Sharding gathers one block at a time, so its saving depends on the depth: a block is a
    twelfth of this Transformer, half of the LSTM."""
    parameters = args.state_gb * 1e9 / BYTES_PER_PARAMETER
    layers = args.layers
    dim = max(64, round(math.sqrt(parameters / (12 * layers)) / 64) * 64)  # 12 dim^2 a block
    transformer = {"dim": dim, "num_layers": layers, "num_heads": max(1, dim // 128)}
    transformer["max_len"] = args.max_len
    hidden = max(32, round(math.sqrt(parameters / 16) / 32) * 32)  # 2 layers of ~8 h^2
    lstm = {"embed_dim": 128, "hidden_dim": hidden, "num_layers": 2}
    return transformer, lstm


def long_sizes(args: argparse.Namespace) -> dict:
    """The long-sequence Transformer of the recompute sides (its own factory)."""
    long = {"dim": args.long_dim, "num_layers": args.long_layers, "max_len": args.long_len}
    long["num_heads"] = max(1, args.long_dim // 64)
    return long


def side_cases(args: argparse.Namespace) -> tuple[dict[str, Case], dict[str, str]]:
    known = settings()
    env = {"MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)} if args.mmap_threshold else {}
    batch = f"--batching fixed --batch-size {args.batch_size} --max-len {args.max_len}"
    batch += f" --max-steps {args.steps} --lr 1e-4 --checkpoint-every 0"
    sides, skipped = {}, {}

    def add(
        name: str, model: str, flags: str, needs: str | None = None, more: dict | None = None
    ) -> None:
        if needs is not None and needs not in known:
            skipped[name] = f"--{needs.replace('_', '-')} is not a registered technique's setting"
            return
        sides[name] = Case(name, f"{MODELS_MODULE}:{model}", flags, env | (more or {}))

    for ranks in world_sizes(args):
        for model in args.models.split(","):
            tag = f"{model}_dp{ranks}"
            add(f"{tag}_ddp", model, f"--nproc {ranks} {batch}")
            add(f"{tag}_shard_full", model, f"--nproc {ranks} --shard full {batch}", "shard")
            if not args.tiny:  # does it still run: DDP against full sharding is enough
                add(f"{tag}_shard_grads", model, f"--nproc {ranks} --shard grads {batch}", "shard")
            if ranks == 2 and not args.tiny:
                add(f"{tag}_pp2", model, f"--nproc 2 --pp 2 --microbatches 2 {batch}")
    long = f"--batching fixed --batch-size 4 --max-len {args.long_len} --max-steps {args.steps}"
    long += " --lr 1e-4 --checkpoint-every 0 --nproc 1"
    add("long_none", "long_transformer", long)
    if not args.mmap_threshold and not args.tiny:  # none's step at recompute's allocator
        fixed = {"MALLOC_MMAP_THRESHOLD_": str(FIXED_MMAP_THRESHOLD)}
        add("long_none_fixed", "long_transformer", long, more=fixed)
    add("long_full", "long_transformer", f"{long} --recompute full", "recompute")
    if not args.tiny:
        add("long_selective", "long_transformer", f"{long} --recompute selective", "recompute")
    return sides, skipped


def world_sizes(args: argparse.Namespace) -> list[int]:
    """The sharding sides' world sizes (--ranks ""; none: the recompute sides alone)."""
    return [int(ranks) for ranks in args.ranks.split(",") if ranks.strip()]


def corpus(work: Path) -> Path:
    """The embedded corpus as a file (long paragraphs: most rows fill --max-len)."""
    from shardwise.data.corpus import default_paragraphs

    path = work / "corpus.txt"
    if not path.exists():
        path.write_text("\n\n".join(default_paragraphs()) + "\n", encoding="utf-8")
    return path


def full_rows(work: Path, length: int, count: int = 256) -> Path:
    """Token rows of exactly `length` tokens (seed 0): every batch of the recompute sides is
    as wide as --long-len, so each step holds the same activations."""
    path = work / f"rows-{length}.jsonl"
    if not path.exists():
        rng = np.random.default_rng(0)
        rows = rng.integers(1, 250, size=(count, length))
        path.write_text("".join(json.dumps({"tokens": row.tolist()}) + "\n" for row in rows))
    return path


# The A/A twins: the Transformer's DDP at 2 ranks (the noise band of every memory and sharding
# ratio) and the long-sequence Transformer without recompute (of the recompute ratios).
TWINS = ("transformer_dp2_ddp", "long_none")


def measured(runs: dict[str, Callable[[], Run]], rounds: int) -> dict[str, list[Run]]:
    """Every side once a round, and the twins again, in an order rotated every round."""
    sides = dict(runs) | {f"{twin}_again": runs[twin] for twin in TWINS if twin in runs}
    return interleave(sides, rounds, on_round=show(rounds))


def show(rounds: int) -> Callable[[int, dict[str, Run]], None]:
    def line(index: int, results: dict[str, Run]) -> None:
        above = {name: run.above_baseline / MIB for name, run in results.items()}
        print(round_line(index, rounds, above, "MiB, largest rank's peak above its baseline"))
        times = {name: run.step_s for name, run in results.items()}
        print(round_line(index, rounds, times, "s a step, slowest rank"), flush=True)

    return line


def figures(samples: dict[str, list[Run]], skipped: dict[str, str], args) -> dict:
    result: dict[str, object] = {}
    memory = {name: [run.above_baseline for run in runs] for name, runs in samples.items()}
    times = {name: [run.step_s for run in runs] for name, runs in samples.items()}
    activations = {name: [_activations(run) for run in runs] for name, runs in samples.items()}
    for ranks in world_sizes(args):
        for model, suffix in (("transformer", ""), ("lstm", "_lstm")):
            tag = f"{model}_dp{ranks}"
            base = f"{tag}_ddp"
            for mode, key in (("full", ""), ("grads", "_grads")):
                side = f"{tag}_shard_{mode}"
                _ratio(result, memory, side, base, f"mem_ratio_shard{key}_dp{ranks}{suffix}")
                _ratio(result, times, side, base, f"shard{key}_time_ratio_dp{ranks}{suffix}")
            if ranks == 2:
                _ratio(result, memory, f"{tag}_pp2", base, f"mem_ratio_pp2{suffix}")
    for mode, key in (("full", ""), ("selective", "_selective")):
        side = f"long_{mode}"
        _ratio(result, activations, "long_none", side, f"recompute_activation_ratio{key}")
        _ratio(result, times, side, "long_none", f"recompute_time_ratio{key}")
        equal = f"recompute_time_ratio{key}_equal_allocator"
        _ratio(result, times, side, "long_none_fixed", equal)
    errors = [abs(e) for runs in samples.values() for run in runs for e in run.errors if e]
    result["memory_error_median"] = round(statistics.median(errors), 4) if errors else None
    result["memory_error_max"] = round(max(errors), 4) if errors else None
    result["targets"] = _targets(result)
    result["peak_mib"] = {n: round(statistics.median(v) / MIB) for n, v in memory.items()}
    result["step_s"] = {n: round(statistics.median(v), 3) for n, v in times.items()}
    result["state_gb"] = args.state_gb
    result["mmap_threshold"] = args.mmap_threshold or None
    result["skipped"] = skipped
    result["rounds"] = args.rounds
    return result


def _activations(run: Run) -> float:
    """The peak above baseline less the state the prediction counts exactly (the largest rank)."""
    state = ("parameters", "gradients", "optimizer")
    return max(
        rank["peak_bytes"] - rank["baseline_bytes"] - sum(rank["predicted_parts"][p] for p in state)
        for rank in run.ranks
    )


def _ratio(result: dict, samples: dict[str, list[float]], top: str, bottom: str, key: str) -> None:
    """top / bottom per round, against the A/A band of the twin of its kind (TWINS)."""
    twin = TWINS[1] if bottom.startswith("long") or top.startswith("long") else TWINS[0]
    if top not in samples or bottom not in samples or f"{twin}_again" not in samples:
        result[key] = None
        return
    comparison = Comparison.between(samples, top, bottom, aa=twin)
    print(comparison.line(key), flush=True)
    result.update(comparison.figures(key))


def _targets(result: dict) -> dict[str, bool | None]:
    def at_most(key: str, limit: float) -> bool | None:
        value = result.get(key)
        return None if value is None else value <= limit

    def at_least(key: str, limit: float) -> bool | None:
        value = result.get(key)
        return None if value is None else value >= limit

    return {
        "mem_ratio_shard_dp2<=0.60": at_most("mem_ratio_shard_dp2", 0.60),
        "mem_ratio_shard_dp4<=0.40": at_most("mem_ratio_shard_dp4", 0.40),
        "recompute_activation_ratio>=2": at_least("recompute_activation_ratio", 2.0),
        "recompute_time_ratio<=1.4": at_most("recompute_time_ratio", 1.4),
        "recompute_time_ratio_equal_allocator<=1.4": at_most(
            "recompute_time_ratio_equal_allocator", 1.4
        ),
        "memory_error_median<=0.10": at_most("memory_error_median", 0.10),
        "memory_error_max<=0.20": at_most("memory_error_max", 0.20),
    }


if __name__ == "__main__":
    main()
