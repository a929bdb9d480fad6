"""What bounding the host's kernel caches does to a CPU run's memory and step time.

    python benchmarks/kernel_caches.py             # bf16 Transformer and LSTM, 5 rounds
    python benchmarks/kernel_caches.py --tiny      # smallest sizes: does it still run?

PyTorch's oneDNN kernels on a CPU (bf16 matmuls and attention, recurrent layers) are compiled
per shape and kept in two caches of 1024 entries each by default; `shardwise` bounds each to 64
(memory/kernels.py) unless ONEDNN_PRIMITIVE_CACHE_CAPACITY or LRU_CACHE_CAPACITY is set. Each
model trains in the real `shardwise train`, one process, bf16, on heavy-tailed lengths in fixed
batches (each padded to its longest row: a new batch shape at most steps), with the caches
bounded (`_bounded`: shardwise's default) and at the libraries' 1024 (`_library`: the variables
set); every round runs the four sides and the bounded Transformer again (the A/A twin), in an
order rotated every round. glibc's mmap threshold is held fixed on every side
(`--mmap-threshold`, as memory_prediction.py's), so that freed activations are given back and
the peak shows what stays. `--capacity N` bounds the bounded sides at N entries instead.
Figures (medians of per-round ratios, range, A/A band, verdict):

- `kept_ratio_transformer`, `_lstm`: the bounded side's peak above its baseline over the
  library side's;
- `time_ratio_transformer`, `_lstm`: the same for the median step time (the first left out):
  what recompiling evicted kernels costs;
- `memory_error_*`: the prediction's error above the baseline on each side (summary.json).

The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from functools import partial
from pathlib import Path

from memory import show
from memory_prediction import heavy_tailed
from shardwise.memory.kernels import CAPACITY
from support.memory_runs import MODELS_MODULE, Case, Run, run_case, write_models
from support.rounds import Comparison, add_rounds_flag, interleave, parse_with_tiny

LIBRARY = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024", "LRU_CACHE_CAPACITY": "1024"}
MODELS = ("transformer", "lstm")


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="kernel-caches-bench-") as folder:
        work = Path(folder)
        write_models(
            work,
            {"dim": args.dim, "num_layers": args.layers, "max_len": args.max_len},
            {"embed_dim": 128, "hidden_dim": args.hidden, "num_layers": 2},
        )
        data = heavy_tailed(work / "heavy.jsonl", args.long, args.max_len)
        runs = {name: partial(run_case, case, data, work) for name, case in cases(args).items()}
        aa = f"{MODELS[0]}_bounded"
        samples = interleave(runs, args.rounds, aa=aa, on_round=show(args.rounds))
    print(json.dumps(figures(samples, args)), flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=256, help="the Transformer's width")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512, help="the LSTM's hidden size")
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--long", type=int, default=6, help="long sequences in the corpus")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--mmap-threshold", type=int, default=131072, help="0: glibc's own")
    parser.add_argument(
        "--capacity", type=int, default=0, help="the bounded sides' entries (0: shardwise's own)"
    )
    add_rounds_flag(parser, default=5)
    tiny = {"dim": 64, "layers": 1, "hidden": 64, "max_len": 64, "steps": 4, "rounds": 1}
    return parse_with_tiny(parser, tiny | {"long": 2})


def cases(args: argparse.Namespace) -> dict[str, Case]:
    flags = (
        f"--nproc 1 --precision bf16 --batching fixed --batch-size {args.batch_size} "
        f"--max-steps {args.steps} --max-len {args.max_len} --checkpoint-every 0"
    )
    fixed = {"MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)} if args.mmap_threshold else {}
    own = {name: str(args.capacity) for name in LIBRARY} if args.capacity else {}
    found = {}
    for model in MODELS:
        bounded = Case(f"{model}_bounded", f"{MODELS_MODULE}:{model}", flags, fixed | own)
        found[bounded.name] = bounded
        library = Case(f"{model}_library", bounded.model, flags, fixed | LIBRARY)
        found[library.name] = library
    return found


def figures(samples: dict[str, list[Run]], args: argparse.Namespace) -> dict:
    result: dict[str, object] = {}
    memory = {name: [run.above_baseline for run in runs] for name, runs in samples.items()}
    times = {name: [run.step_s for run in runs] for name, runs in samples.items()}
    aa = f"{MODELS[0]}_bounded"
    for model in MODELS:
        bounded, library = f"{model}_bounded", f"{model}_library"
        for key, values in (("kept", memory), ("time", times)):
            comparison = Comparison.between(values, bounded, library, aa=aa)
            result |= comparison.figures(f"{key}_ratio_{model}")
        for side in (bounded, library):
            result[f"kept_mib_{side}"] = round(statistics.median(memory[side]) / 2**20, 1)
            errors = [abs(error) for run in samples[side] for error in run.errors]
            result[f"memory_error_{side}"] = round(max(errors), 4)
    capacity = args.capacity or CAPACITY
    result |= {"rounds": args.rounds, "mmap_threshold": args.mmap_threshold, "capacity": capacity}
    return result


if __name__ == "__main__":
    main()
