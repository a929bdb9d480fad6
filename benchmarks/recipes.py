"""Which training recipe reaches the lowest held-out loss for the same tokens: the defaults' ground.

    python benchmarks/recipes.py                          # the embedded corpus, 0.8M tokens
    python benchmarks/recipes.py --heavy-tailed           # a corpus of heavy-tailed lengths
    python benchmarks/recipes.py --recipes default old    # some of them
    python benchmarks/recipes.py --set sync --steps 192   # sync strategies' loss at equal tokens
    python benchmarks/recipes.py --tiny                   # the set's first recipe, a few steps

Each recipe is `shardwise train` with the same seed, model and token budget (`--max-tokens`)
and a few flags of its own; the figure is the final held-out loss, which the seed makes
deterministic on CPU (a rerun gives the same value), so one run per recipe is the measurement.
Speed is not compared here (see benchmarks/peers.py, which interleaves rounds): smaller token
batches cost a little throughput, which the time-to-loss benchmark weighs. The last line is
one JSON object: each recipe's loss and the default's gain over the old default.

`--set sync` compares the synchronisation strategies at equal tokens instead, with
benchmarks/sync_strategies.py's job (the LSTM at lr 3e-3, 1024 token slots a worker, 2
workers), for as many steps as asked: their loss gap to every-step all-reduce in percent. The
link's speed does not change a loss, so one machine and no rounds measure it exactly.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from support.heavy_tailed import write_heavy_tailed
from support.rounds import parse_with_tiny

# name: flags beyond the shared ones. "default" is the CLI's own recipe (no flags).
RECIPES: dict[str, list[str]] = {
    "default": [],
    "old": ["--tokens-per-batch", "4096", "--lr", "3e-3"],  # the defaults before this one
    "tokens4096_lr6e-3": ["--tokens-per-batch", "4096", "--lr", "6e-3"],
    "tokens2048_lr3e-3": ["--lr", "3e-3"],
    "tokens2048_lr5e-3": ["--lr", "5e-3"],
    "tokens1024_lr5e-3": ["--tokens-per-batch", "1024", "--lr", "5e-3"],
    "transformer_default": ["--model", "transformer"],
    "transformer_lr8e-3": ["--model", "transformer", "--lr", "8e-3"],
    "transformer_old": ["--model", "transformer", "--tokens-per-batch", "4096"],
}


# The sync benchmark's job; every strategy takes the same steps of the same tokens.
SYNC_JOB = ["--model", "lstm", "--seed", "0", "--eval-fraction", "0.02", "--max-len", "128"]
SYNC_JOB += ["--tokens-per-batch", "1024", "--lr", "3e-3"]
H8 = ["--sync-every", "8"]
POWERSGD4 = ["--grad-compression", "powersgd", "--powersgd-rank", "4", "--powersgd-warmup-steps"]
SYNC_RECIPES: dict[str, list[str]] = {
    "allreduce": [],
    "localsgd": ["--sync", "local-sgd", *H8],
    "localsgd_warmup32": ["--sync", "local-sgd", *H8, "--sync-warmup-steps", "32"],
    "localsgd_warmup64": ["--sync", "local-sgd", *H8, "--sync-warmup-steps", "64"],
    "diloco": ["--sync", "diloco", *H8],
    "diloco_momentum0.5": ["--sync", "diloco", *H8, "--outer-momentum", "0.5"],
    "diloco_lr1_momentum0.5": ["--sync", "diloco", *H8, "--outer-lr", "1", "--outer-momentum",
                               "0.5"],
    "powersgd": [*POWERSGD4, "4"],
    "powersgd_warmup32": [*POWERSGD4, "32"],
}  # fmt: skip
SETS = {"defaults": RECIPES, "sync": SYNC_RECIPES}


def main() -> None:
    args = parse_args()
    recipes = SETS[args.set]
    chosen = args.recipes or list(recipes)[: 1 if args.tiny else None]
    with tempfile.TemporaryDirectory(prefix="recipes-") as root:
        data = write_heavy_tailed(Path(root) / "heavy.txt") if args.heavy_tailed else None
        losses = {name: run(name, recipes[name], Path(root), args, data) for name in chosen}
    figures: dict[str, object] = {
        "set": args.set,
        "corpus": "heavy-tailed" if args.heavy_tailed else "embedded",
        "budget": f"{args.steps} steps" if args.set == "sync" else f"{args.tokens} tokens",
        "eval_loss": losses,
    }
    if "default" in losses and "old" in losses:
        figures["default_vs_old_loss"] = round(losses["default"] - losses["old"], 4)
    if "allreduce" in losses:
        base = losses["allreduce"]
        figures["loss_gap_pct"] = {n: round(100 * (v / base - 1), 2) for n, v in losses.items()}
    print(json.dumps(figures))


def run(
    name: str, flags: list[str], root: Path, args: argparse.Namespace, data: Path | None
) -> float:
    run_dir = root / name
    budget = ["--max-tokens", str(args.tokens)]
    if args.set == "sync":
        budget = [*SYNC_JOB, "--max-steps", str(args.steps), "--log-every", str(args.steps)]
    command = [sys.executable, "-m", "shardwise", "train", *budget]
    command += ["--run-dir", str(run_dir), "--no-tensorboard", "--sample-bytes", "0"]
    command += ["--nproc", str(args.nproc), "--device", "cpu", *flags]
    command += ["--data", str(data)] if data is not None else []
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{name}: exit {done.returncode}\n{done.stderr[-2000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    print(
        f"{name:22s} eval loss {summary['eval_loss']:.4f}  steps {summary['steps']:4d}  "
        f"tokens {summary['tokens']:,}  padding {summary['padding_fraction']:.1%}",
        flush=True,
    )
    return round(float(summary["eval_loss"]), 4)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", choices=sorted(SETS), default="defaults")
    names = sorted({*RECIPES, *SYNC_RECIPES})
    parser.add_argument("--recipes", nargs="+", choices=names, help="default: the whole set")
    parser.add_argument("--tokens", type=int, default=800_000, help="--max-tokens of each run")
    parser.add_argument("--steps", type=int, default=192, help="--set sync: steps of each run")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--heavy-tailed", action="store_true", help="a heavy-tailed corpus")
    return parse_with_tiny(parser, {"tokens": 8192, "steps": 4})


if __name__ == "__main__":
    main()
