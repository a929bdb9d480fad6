"""What glibc's mmap threshold does to a CPU rank's peak memory and step time.

    python benchmarks/allocator.py                   # 0.25 GB Transformer, 5 rounds
    python benchmarks/allocator.py --tiny            # smallest sizes: does it still run?

By default glibc raises its mmap threshold each time a large block is freed, so later large
tensors come from the heap, whose freed pages a fragmented heap cannot return: on CPU the peak
resident memory then depends on the order of frees more than on what the run holds. With
MALLOC_MMAP_THRESHOLD_ fixed (here 128 KiB), every large tensor is its own mapping, returned
when freed; a CPU run with --shard or --recompute fixes it in its workers by itself
(memory/measure.py), and SHARDWISE_KEEP_MALLOC=1 keeps glibc's default, as the default sides
do. The 0.25 GB Transformer of memory.py trains in the real `shardwise train` on 2 ranks under
DDP and under --shard full, each with the default allocator and with the fixed threshold; every
round runs the four sides and DDP's default again (the A/A twin), in an order rotated every round.
Figures (medians of per-round ratios, range, A/A band, verdict):

- `peak_ratio_fixed_ddp`, `peak_ratio_fixed_shard`: the fixed threshold's peak above baseline
  over the default's (largest rank);
- `time_ratio_fixed_ddp`, `time_ratio_fixed_shard`: the same for the step time (slowest rank,
  median step, the first left out): what the mappings cost;
- `mem_ratio_shard_dp2_default`, `mem_ratio_shard_dp2_fixed`: --shard full over DDP under each.

The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from functools import partial
from pathlib import Path

from memory import prepare_work, show
from support.memory_runs import MODELS_MODULE, Case, Run, run_case
from support.rounds import Comparison, add_rounds_flag, interleave, parse_with_tiny

FIXED = 131072  # bytes: glibc's default threshold before it starts moving


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="allocator-bench-") as folder:
        work = Path(folder)
        text = prepare_work(work, args, long=False)
        runs = {name: partial(run_case, case, text, work) for name, case in cases(args).items()}
        samples = interleave(runs, args.rounds, aa="ddp_default", on_round=show(args.rounds))
    print(json.dumps(figures(samples, args)), flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--state-gb", type=float, default=0.25, help="the Transformer's state")
    parser.add_argument("--layers", type=int, default=12, help="the Transformer's blocks")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-len", type=int, default=64)
    add_rounds_flag(parser, default=5)
    tiny = {"state_gb": 0.01, "layers": 2, "steps": 2, "max_len": 32, "rounds": 1}
    return parse_with_tiny(parser, tiny)


def cases(args: argparse.Namespace) -> dict[str, Case]:
    flags = f"--nproc 2 --batching fixed --batch-size {args.batch_size} --max-len {args.max_len}"
    flags += f" --max-steps {args.steps} --lr 1e-4 --checkpoint-every 0"
    model = f"{MODELS_MODULE}:transformer"
    fixed = {"MALLOC_MMAP_THRESHOLD_": str(FIXED)}
    default = {"SHARDWISE_KEEP_MALLOC": "1"}  # sharding's workers would fix it themselves
    return {
        "ddp_default": Case("ddp_default", model, flags, default),
        "ddp_fixed": Case("ddp_fixed", model, flags, fixed),
        "shard_default": Case("shard_default", model, f"{flags} --shard full", default),
        "shard_fixed": Case("shard_fixed", model, f"{flags} --shard full", fixed),
    }


def figures(samples: dict[str, list[Run]], args: argparse.Namespace) -> dict:
    memory = {name: [run.above_baseline for run in runs] for name, runs in samples.items()}
    times = {name: [run.step_s for run in runs] for name, runs in samples.items()}
    result: dict[str, object] = {}
    pairs = {
        "peak_ratio_fixed_ddp": (memory, "ddp_fixed", "ddp_default"),
        "peak_ratio_fixed_shard": (memory, "shard_fixed", "shard_default"),
        "time_ratio_fixed_ddp": (times, "ddp_fixed", "ddp_default"),
        "time_ratio_fixed_shard": (times, "shard_fixed", "shard_default"),
        "mem_ratio_shard_dp2_default": (memory, "shard_default", "ddp_default"),
        "mem_ratio_shard_dp2_fixed": (memory, "shard_fixed", "ddp_fixed"),
    }
    for key, (values, top, bottom) in pairs.items():
        comparison = Comparison.between(values, top, bottom, aa="ddp_default")
        print(comparison.line(key), flush=True)
        result.update(comparison.figures(key))
    result["state_gb"], result["layers"], result["rounds"] = args.state_gb, args.layers, args.rounds
    result["mmap_threshold"] = FIXED
    return result


if __name__ == "__main__":
    main()
