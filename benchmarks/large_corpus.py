"""What a default run costs on a 200 MB text file, and whether its evaluation stays in its bound.

    python benchmarks/large_corpus.py                  # 200 MB, 5 rounds of the default run
    python benchmarks/large_corpus.py --megabytes 20 --rounds 1 --max-steps 20   # a smoke test
    python benchmarks/large_corpus.py --tiny           # 1 MB, 2 steps: does it still run?

The file is the embedded corpus's paragraphs, shuffled and repeated up to the size asked (about
a million paragraphs for 200 MB). Each round runs `shardwise train --data FILE` with its
defaults (2 CPU ranks, the LSTM, 5% held out, --eval-tokens 200,000) and its A/A twin; the
first, unmeasured run builds the tokenisation cache every later run loads. The figures, per
run, from summary.json: the evaluation's seconds against the workers' wall time (the share a
user waits on evaluation), the whole command's seconds (start-up, reading the file, the
workers), the held-out tokens evaluated of those available, and each rank's peak memory.
`eval_s_unbounded_estimate` is what evaluating every held-out token would take at the run's
own evaluation rate: the end-of-run evaluation the bound replaced (minutes of silence on such
a file). One side, so no ratio is claimed: the A/A band of the wall time shows the noise. The
last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shardwise.data.corpus import default_paragraphs
from support.rounds import add_rounds_flag, again, interleave, parse_with_tiny, ratios, round_line

SIDE = "default"


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="large-corpus-") as root:
        data = write_corpus(Path(root) / "large.txt", args.megabytes)
        print(f"corpus: {data.stat().st_size / 2**20:.0f} MiB at {data}", flush=True)
        started = time.perf_counter()
        first = run(data, Path(root) / "warm", args)
        print(f"first run (tokenises and caches the file): {time.perf_counter() - started:.0f}s")
        counter = iter(range(10_000))
        samples = interleave(
            {SIDE: lambda: run(data, Path(root) / f"run{next(counter)}", args)},
            args.rounds,
            aa=SIDE,
            on_round=lambda index, runs: print_round(index, runs, args.rounds),
        )
    print(json.dumps(figures(samples, first, args.megabytes)))


def write_corpus(path: Path, megabytes: float) -> Path:
    """The embedded paragraphs, shuffled anew for each pass, until `megabytes` are written."""
    paragraphs, rng, written = default_paragraphs(), random.Random(0), 0
    with path.open("w", encoding="utf-8") as out:
        while written < megabytes * 2**20:
            rng.shuffle(paragraphs)
            chunk = "\n\n".join(paragraphs) + "\n\n"
            out.write(chunk)
            written += len(chunk.encode())
    return path


def run(data: Path, run_dir: Path, args: argparse.Namespace) -> dict:
    """One `shardwise train` on the file; its summary.json."""
    command = [sys.executable, "-m", "shardwise", "train", "--data", str(data)]
    command += ["--run-dir", str(run_dir), "--max-steps", str(args.max_steps)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    process_s = time.perf_counter() - started  # with start-up: the corpus read, the workers
    if done.returncode != 0:
        raise SystemExit(f"shardwise train failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    shown = [line for line in done.stdout.splitlines() if "evaluating" in line]
    if not shown:
        raise SystemExit("the run printed no evaluation progress line")
    return json.loads((run_dir / "summary.json").read_text()) | {"process_s": process_s}


def print_round(index: int, runs: dict[str, dict], rounds: int) -> None:
    shares = {name: summary["eval_s"] / summary["wall_time_s"] for name, summary in runs.items()}
    print(round_line(index, rounds, shares, "eval share of wall time"), flush=True)


def figures(samples: dict[str, list[dict]], first: dict, megabytes: float) -> dict:
    """The JSON figures: medians over every measured run, with their ranges."""
    runs = samples[SIDE] + samples[again(SIDE)]
    wall_aa = ratios(
        {k: [s["wall_time_s"] for s in v] for k, v in samples.items()}, again(SIDE), SIDE
    )
    unbounded = [s["eval_s"] * s["eval_tokens_available"] / s["eval_tokens"] for s in runs]
    ranks = range(len(first["peak_rss_bytes"]))
    return {
        "megabytes": round(megabytes),
        "eval_tokens": first["eval_tokens"],
        "eval_tokens_available": first["eval_tokens_available"],
        **_median_and_range("eval_s", [s["eval_s"] for s in runs]),
        **_median_and_range("eval_share_of_wall", [s["eval_s"] / s["wall_time_s"] for s in runs]),
        **_median_and_range("wall_time_s", [s["wall_time_s"] for s in runs]),
        **_median_and_range("command_s", [s["process_s"] for s in runs]),
        "wall_time_aa_range": [round(min(wall_aa), 3), round(max(wall_aa), 3)],
        "peak_rss_mib_per_rank": [
            round(statistics.median(s["peak_rss_bytes"][rank] for s in runs) / 2**20)
            for rank in ranks
        ],
        **_median_and_range("eval_s_unbounded_estimate", unbounded),
        "rounds": len(samples[SIDE]),
    }


def _median_and_range(key: str, values: list[float]) -> dict[str, object]:
    return {
        key: round(statistics.median(values), 3),
        f"{key}_range": [round(min(values), 3), round(max(values), 3)],
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=200.0, help="size of the text file")
    parser.add_argument("--max-steps", type=int, default=300, help="training steps a run")
    add_rounds_flag(parser, default=5)
    return parse_with_tiny(parser, {"megabytes": 1.0, "max_steps": 2, "rounds": 1})


if __name__ == "__main__":
    main()
