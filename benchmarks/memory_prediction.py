"""How close is each rank's predicted peak memory to the measured one, over layouts and models?

    python benchmarks/memory_prediction.py            # 22 cases, ~25 min on 2 busy cores
    python benchmarks/memory_prediction.py --cases transformer-dp2,lstm-pp2   # a few
    python benchmarks/memory_prediction.py --tiny     # smallest sizes: does it still run?

The built-in TransformerLM and RecurrentLM (LSTM) at benchmark sizes, and a model written the
way pytorch/examples writes one (time-major, a `hidden` argument, log-probabilities out, no
layer_names()), each train in the real `shardwise train` under several layouts: one process;
2 data-parallel ranks; 2 pipeline stages (1F1B and GPipe); full and grads sharding; full and
selective recompute; bf16; 2 tensor-parallel shards. The data is heavy-tailed: most sequences a
sentence, a few hundreds of tokens, in fixed batches, so each rank's costliest batch is the one
holding a long sequence, not the mean one. Every rank measures its own peak from its start
(CPU: peak resident memory, VmHWM; GPU: max_memory_allocated) and the summary sets it against
the prediction made before training (memory/record.py). Three errors per rank, (predicted -
measured) / measured:

- `memory_error_*` (the headline): of what training added above the rank's start baseline, the
  part the prediction models; on CPU a 300 MB idle torch process would otherwise hide the misses;
- `memory_error_total_*`: of the whole peak, the baseline being the rank's own measured one;
- `memory_error_launcher_*`: of the whole peak, against `--dry-run`'s prediction, whose baseline
  is the launcher's estimate (its own resident memory): what the budget check works with.

Medians and maxima are of absolute errors over every rank of every case (targets: median <=
10%, max <= 20%). `peak_at_worst_step` counts the ranks whose measured peak (metrics.jsonl, one
row a step) was first reached (98% of it) at the step of their predicted worst batch, and
`largest_rise_at_worst_step` those whose peak rose the most at that step (on CPU a heap that
fragments can creep higher on later steps; the first step, which holds the start, is left out).
No clock is compared, so no A/A twin: `--rounds` repeats every case (default 1: memory is
steady, a round is long). `--mmap-threshold BYTES` runs every case with glibc's
MALLOC_MMAP_THRESHOLD_ held fixed. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np

from shardwise.techniques import settings
from support.memory_runs import MODELS_MODULE, Case, Run, run_case, write_models
from support.rounds import add_rounds_flag, parse_with_tiny

LAYOUTS = {
    "single": "--nproc 1",
    "dp2": "--nproc 2",
    "pp2": "--nproc 2 --pp 2 --microbatches 4",
    "pp2-gpipe": "--nproc 2 --pp 2 --microbatches 4 --schedule gpipe",
    "dp2-shard-full": "--nproc 2 --shard full",
    "dp2-shard-grads": "--nproc 2 --shard grads",
    "recompute-full": "--nproc 1 --recompute full",
    "recompute-selective": "--nproc 1 --recompute selective",
    "dp2-bf16": "--nproc 2 --precision bf16",
    "tp2": "--nproc 2 --tp 2",
}
# Which layouts each model takes: recurrent kernels refuse selective recompute, and an LSTM has
# no layer a tensor split pays for; a model without layer_names() has no pipeline pieces and no
# blocks to recompute.
MODELS = {
    "transformer": list(LAYOUTS),
    "lstm": [name for name in LAYOUTS if name not in ("recompute-selective", "tp2")],
    "user_style": ["single", "dp2", "dp2-shard-full", "dp2-bf16"],
}
# Flags a layout needs a technique for, and the setting that registers it.
NEEDS = {"--shard": "shard", "--recompute": "recompute"}


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="memory-prediction-") as folder:
        work = Path(folder)
        write_models(work, *model_sizes(args))
        data = heavy_tailed(work / "heavy.jsonl", args.long, args.max_len)
        cases, skipped = chosen_cases(args)
        for name, why in skipped.items():
            print(f"{name}: skipped ({why})", flush=True)
        runs: dict[str, list[Run]] = {case.name: [] for case in cases}
        for index in range(args.rounds):
            order = cases[index % len(cases) :] + cases[: index % len(cases)]
            for position, case in enumerate(order):
                ask = args.launcher and (not args.tiny or position == 0)
                run = run_case(case, data, work, dry_run=ask)
                runs[case.name].append(run)
                print(case_line(index, args.rounds, case.name, run), flush=True)
    print(json.dumps(figures(runs, skipped, args)), flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=256, help="the Transformer's width")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512, help="the LSTMs' hidden size")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--long", type=int, default=6, help="long sequences in the corpus")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument(
        "--no-launcher",
        dest="launcher",
        action="store_false",
        help="skip --dry-run before each case (no memory_error_launcher_* figures)",
    )
    parser.add_argument("--mmap-threshold", type=int, default=0, help="MALLOC_MMAP_THRESHOLD_")
    add_rounds_flag(parser, default=1)
    tiny = {"dim": 32, "layers": 2, "hidden": 32, "batch_size": 4, "max_len": 64, "long": 3}
    tiny |= {"steps": 3, "rounds": 1}
    return parse_with_tiny(parser, tiny)


def model_sizes(args: argparse.Namespace) -> tuple[dict, dict, dict]:
    heads = max(1, args.dim // 64)
    transformer = {"dim": args.dim, "num_layers": args.layers, "num_heads": heads}
    transformer["max_len"] = args.max_len
    lstm = {"embed_dim": args.dim // 2, "hidden_dim": args.hidden, "num_layers": 2}
    user = {"ninp": args.dim // 2, "nhid": args.hidden, "nlayers": 2}
    return transformer, lstm, user


def chosen_cases(args: argparse.Namespace) -> tuple[list[Case], dict[str, str]]:
    """Every model x layout asked for, and those skipped with the reason."""
    known = settings()
    env = {"MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)} if args.mmap_threshold else {}
    cases, skipped = [], {}
    batch = f"--batching fixed --batch-size {args.batch_size} --max-len {args.max_len}"
    batch += f" --max-steps {args.steps} --lr 1e-3"
    for model, layouts in MODELS.items():
        for layout in layouts:
            name = f"{model}-{layout}"
            if args.cases and name not in args.cases.split(","):
                continue
            if args.tiny and (layout not in ("single", "dp2") or model == "lstm"):
                continue  # does it still run: one model data parallel, a user's model alone
            flags = LAYOUTS[layout]
            missing = [s for flag, s in NEEDS.items() if flag in flags and s not in known]
            if missing:
                skipped[name] = f"--{missing[0]} is not a registered technique's setting yet"
                continue
            if model == "user_style" and args.tiny and layout != "single":
                continue
            cases.append(Case(name, f"{MODELS_MODULE}:{model}", f"{flags} {batch}", env))
    return cases, skipped


def heavy_tailed(path: Path, long: int, max_len: int, count: int = 600, seed: int = 0) -> Path:
    """Token rows of 8 to ~60 tokens (a Pareto tail), and `long` of nearly `max_len`: a batch
    holding one of those is several times wider than the mean batch."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.pareto(2.5, size=count) * 12 + 8, 8, max_len // 4).astype(int)
    lengths[rng.choice(count, size=long, replace=False)] = max_len
    with path.open("w", encoding="utf-8") as out:
        for length in lengths:
            out.write(json.dumps({"tokens": rng.integers(1, 250, size=length).tolist()}) + "\n")
    return path


def case_line(index: int, rounds: int, name: str, run: Run) -> str:
    errors = " ".join(f"{e:+.1%}" for e in run.errors)
    totals = " ".join(f"{e:+.1%}" for e in run.total_errors)
    worst = [rank["worst_batch"] for rank in run.ranks]
    steps = " ".join(
        f"{w['step']}/{r}/{rose}" for w, r, rose in zip(worst, run.reached, run.rose, strict=True)
    )
    launcher = ""
    if run.launcher:
        launcher = " | launcher " + " ".join(f"{e:+.1%}" for e in run.launcher_errors)
    return (
        f"round {index + 1}/{rounds} {name}: above baseline {errors} | total {totals}{launcher}"
        f" | peak {run.above_baseline / 2**20:.0f} MiB above baseline | worst step predicted/"
        f"peak reached/rose most {steps}"
    )


def figures(runs: dict[str, list[Run]], skipped: dict[str, str], args: argparse.Namespace) -> dict:
    every = [run for case_runs in runs.values() for run in case_runs]
    result: dict[str, object] = {}
    for key, errors_of in (
        ("memory_error", lambda run: run.errors),
        ("memory_error_total", lambda run: run.total_errors),
        ("memory_error_launcher", lambda run: run.launcher_errors if run.launcher else []),
    ):
        errors = [abs(e) for run in every for e in errors_of(run) if e is not None]
        result[f"{key}_median"] = round(statistics.median(errors), 4) if errors else None
        result[f"{key}_max"] = round(max(errors), 4) if errors else None
    median, most = result["memory_error_median"], result["memory_error_max"]
    result["targets"] = {
        "memory_error_median<=0.10": median is not None and median <= 0.10,
        "memory_error_max<=0.20": most is not None and most <= 0.20,
        "median_over_target_by": None if median is None else round(max(median - 0.10, 0), 4),
        "max_over_target_by": None if most is None else round(max(most - 0.20, 0), 4),
    }
    worst = [rank["worst_batch"]["step"] for run in every for rank in run.ranks]
    reached = [step for run in every for step in run.reached]
    rose = [step for run in every for step in run.rose]
    result["peak_at_worst_step"] = [sum(map(int.__eq__, worst, reached)), len(worst)]
    result["largest_rise_at_worst_step"] = [sum(map(int.__eq__, worst, rose)), len(worst)]
    result["cases"] = {
        name: {
            "error": [round(e, 4) for run in case_runs for e in run.errors],
            "error_total": [round(e, 4) for run in case_runs for e in run.total_errors],
            "predicted_worst_step": [
                r["worst_batch"]["step"] for run in case_runs for r in run.ranks
            ],
            "peak_reached_at_step": [s for run in case_runs for s in run.reached],
            "largest_rise_at_step": [s for run in case_runs for s in run.rose],
        }
        for name, case_runs in runs.items()
    }
    result["skipped"] = skipped
    result["mmap_threshold"] = args.mmap_threshold or None
    result["rounds"] = args.rounds
    return result


if __name__ == "__main__":
    main()
