"""Which training recipe reaches the lowest held-out loss for the same tokens: the defaults' ground.

    python benchmarks/recipes.py                          # the embedded corpus, 0.8M tokens
    python benchmarks/recipes.py --heavy-tailed           # a corpus of heavy-tailed lengths
    python benchmarks/recipes.py --recipes default old    # some of them

Each recipe is `shardwise train` with the same seed, model and token budget (`--max-tokens`)
and a few flags of its own; the figure is the final held-out loss, which the seed makes
deterministic on CPU (a rerun gives the same value), so one run per recipe is the measurement.
Speed is not compared here (see benchmarks/peers.py, which interleaves rounds): smaller token
batches cost a little throughput, which the time-to-loss benchmark weighs. The last line is
one JSON object: each recipe's loss and the default's gain over the old default.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from support.heavy_tailed import write_heavy_tailed

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


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="recipes-") as root:
        data = write_heavy_tailed(Path(root) / "heavy.txt") if args.heavy_tailed else None
        losses = {name: run(name, Path(root), args, data) for name in args.recipes}
    figures: dict[str, object] = {
        "corpus": "heavy-tailed" if args.heavy_tailed else "embedded",
        "max_tokens": args.tokens,
        "eval_loss": losses,
    }
    if "default" in losses and "old" in losses:
        figures["default_vs_old_loss"] = round(losses["default"] - losses["old"], 4)
    print(json.dumps(figures))


def run(name: str, root: Path, args: argparse.Namespace, data: Path | None) -> float:
    run_dir = root / name
    command = [sys.executable, "-m", "shardwise", "train", "--max-tokens", str(args.tokens)]
    command += ["--run-dir", str(run_dir), "--no-tensorboard", "--sample-bytes", "0"]
    command += ["--nproc", str(args.nproc), "--device", "cpu", *RECIPES[name]]
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
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=list(RECIPES))
    parser.add_argument("--tokens", type=int, default=800_000, help="--max-tokens of each run")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--heavy-tailed", action="store_true", help="a heavy-tailed corpus")
    return parser.parse_args()


if __name__ == "__main__":
    main()
