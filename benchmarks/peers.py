"""Time to the same held-out loss: shardwise (CLI and own loop) against Accelerate and Fabric.

    python benchmarks/peers.py                # 5 rounds of ~0.8M tokens: over an hour here
    python benchmarks/peers.py --rounds 1 --tokens 100000          # a smoke run, ~4-6 minutes
    python benchmarks/peers.py --cli-flags "--lr 2e-3 --warmup-steps 10"   # try a CLI recipe
    python benchmarks/peers.py --tiny                          # 1 round of 20k tokens: a check

One job, five ways, on 2 CPU ranks (gloo, one intra-op thread per rank in every contender:
`shardwise train` picks it from the cores per worker, the others call torch.set_num_threads(1)):
- `cli`:        `shardwise train` with its defaults, plus only the budget, a checkpoint every
                ~`--dump-every` tokens and `--cli-flags`. `cli_again` is its A/A twin.
- `own_loop`:   shardwise's own-loop API with its token-balanced loader
                (`session.loader(sequences, tokens_per_batch=...)` at the CLI's default budget,
                `session.loss`), at the
                peers' constant --peer-lr.
- `accelerate`: Accelerate as its documentation shows, started by `torchrun --nproc-per-node 2`
                with `Accelerator(cpu=True)` (`accelerate launch --cpu --num_processes 2`
                silently runs a single process on CPU).
- `fabric`:     Lightning Fabric, `Fabric(accelerator="cpu", devices=2, strategy="ddp")` and
                `fabric.launch()` in a script run with `python`.
The peers use the plain recipe: a DataLoader of 16 sequences per rank, shuffled, padded to the
longest, behind a DistributedSampler (added by `prepare` / `setup_dataloaders`), AdamW at a
constant --peer-lr (3e-3), no clipping. Every contender trains
on the default corpus's training sequences (`shardwise train`'s, held-out split excluded) from
the default LSTM's seeded weights (their hash is compared), until --tokens useful (non-padding)
target tokens over both ranks are spent.

The curve: each contender saves its weights every ~--dump-every tokens with its training
clock stopped (support/peers/recording.py; the CLI: checkpoints, kept out of its metrics
windows), noting (training seconds, tokens). Afterwards this process computes the token-mean
cross-entropy of every dump on the same held-out sequences. The target is the loss both
Accelerate and Fabric reach by the end of that round (the higher of their final losses; they
end a few thousandths apart); a contender's time to it is the first dump at or below it, the
time linearly interpolated between that dump and the one before by loss (a contender that
never gets there has none). `time_to_loss_vs_X` is X's time over the CLI's per round (above
1: shardwise gets there first; null when a side misses the target in a round);
`time_to_cli_loss_vs_X` the same for the CLI's own final loss as the target (defined even when
the CLI stops short of the peers' loss); `time_to_best_peer_loss_vs_X` the same for the better
peer's final loss (the lower), where the other peer's whole training time stands in when it
never gets there (that round's ratio is then a lower bound, counted in
`..._lower_bound_rounds`); `tokens_per_s_vs_X` the CLI's useful tokens/s over
X's; `own_loop_tokens_per_s_vs_fabric` the own loop's over Fabric's. Each is the median of the
rounds with its min-max and the A/A band (cli_again / cli): within it, "not resolved".
Lines of user code: non-blank, non-comment lines of each contender's script, docstring aside
(the dataset and padding collate every plain loop writes are shared in support/peers/job.py
and counted for none); the CLI's is its one command line.

Needs Accelerate and Lightning: `pip install -e .[bench]`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from shardwise.checkpoint.load import load_model_weights
from support.heavy_tailed import write_heavy_tailed
from support.peers.cli_run import CliPlan
from support.peers.job import DATA_ENV, Job, held_out_loss, initial_model, job_sequences, state_hash
from support.rounds import (
    Comparison,
    add_rounds_flag,
    again,
    interleave,
    parse_with_tiny,
    round_line,
)

SCRIPTS = Path(__file__).parent / "support" / "peers"
CLI, OWN, ACCELERATE, FABRIC = "cli", "own_loop", "accelerate", "fabric"
PEERS = (ACCELERATE, FABRIC)


@dataclass(frozen=True)
class Point:
    """One dump: training seconds and useful tokens so far, and the held-out loss there."""

    seconds: float
    tokens: int
    loss: float


@dataclass(frozen=True)
class Run:
    """One contender's whole budget in one round."""

    points: tuple[Point, ...]
    tokens: int
    padding: float
    seconds: float
    peak_rss_bytes: float  # the largest over the ranks
    start_hash: str

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def final_loss(self) -> float:
        return self.points[-1].loss

    def time_to(self, target: float) -> float | None:
        """Training seconds to `target` loss, interpolated between dumps; None if never."""
        for before, point in zip(self.points, self.points[1:], strict=False):
            if point.loss <= target:
                share = (before.loss - target) / (before.loss - point.loss)
                return before.seconds + share * (point.seconds - before.seconds)
        return None


class Contenders:
    """Runs each contender as its own process tree and reads its curve back."""

    def __init__(self, args: argparse.Namespace, scratch: Path) -> None:
        self.args = args
        self.scratch = scratch
        self.held_out = job_sequences()[1]
        self.start_loss = held_out_loss(initial_model(), self.held_out)
        self.cli_plan = CliPlan.of(shlex.split(args.cli_flags), args.tokens, args.dump_every)
        self.runs = 0
        self.retries = 0  # contender runs that crashed and ran again

    def cli(self) -> Run:
        run_dir = self._fresh_dir("cli")
        self._call(self.cli_plan.command(run_dir), run_dir)
        dumps, summary = self.cli_plan.points(run_dir)
        points = [Point(0.0, 0, self.start_loss)]
        for seconds, tokens, checkpoint in dumps:
            model = load_model_weights(checkpoint, initial_model())
            points.append(Point(seconds, tokens, held_out_loss(model, self.held_out)))
        shutil.rmtree(run_dir)
        return Run(
            tuple(points),
            summary["tokens"],
            summary["padding_fraction"],
            points[-1].seconds,
            max(summary["peak_rss_bytes"]),
            state_hash(initial_model()),  # the CLI builds it by the same seeded_model call
        )

    def own_loop(self) -> Run:
        return self._script_run(OWN, [*torchrun(), "own_loop.py"])

    def accelerate(self) -> Run:
        return self._script_run(ACCELERATE, [*torchrun(), "accelerate_loop.py"])

    def fabric(self) -> Run:
        return self._script_run(FABRIC, [sys.executable, "fabric_loop.py"])

    def _script_run(self, name: str, command: list[str]) -> Run:
        for attempt in range(2):  # a process tree that crashes (seen once: SIGABRT in gloo's
            out = self._fresh_dir(name)  # start-up) is run again, and the run says so
            job = Job(self.args.tokens, self.args.dump_every, self.args.peer_lr, 16, out)
            try:
                self._call([*command, *job.argv()], out, cwd=SCRIPTS)
                break
            except RuntimeError as failed:
                if attempt:
                    raise
                print(f"{name} failed, running it again: {str(failed).splitlines()[0]}")
                self.retries += 1
        result = json.loads((out / "result.json").read_text())
        points = []
        for dump in result["dumps"]:
            model = initial_model()
            model.load_state_dict(load_file(dump["path"]))
            loss = held_out_loss(model, self.held_out)
            points.append(Point(dump["elapsed_s"], dump["tokens"], loss))
        shutil.rmtree(out)
        return Run(
            tuple(points),
            result["tokens"],
            1 - result["tokens"] / result["slots"],
            result["elapsed_s"],
            max(result["peak_rss_bytes"]),
            result["start_hash"],
        )

    def _fresh_dir(self, name: str) -> Path:
        self.runs += 1
        return self.scratch / f"{self.runs:03d}_{name}"

    def _call(self, command: list[str], out: Path, cwd: Path | None = None) -> None:
        out.mkdir(parents=True, exist_ok=True)
        log = self.scratch / f"{out.name}.log"
        with log.open("w") as sink:
            # Its own session, so that a tree that hangs (seen once: a contender's rank stuck
            # at exit in gloo's teardown) is killed whole after --contender-timeout-s.
            run = subprocess.Popen(
                command, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                run.wait(timeout=self.args.contender_timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
                raise RuntimeError(
                    f"{shlex.join(command)} ran past {self.args.contender_timeout_s:g}s: killed"
                ) from None
        if run.returncode != 0:
            tail = "\n".join(log.read_text().splitlines()[-30:])
            raise RuntimeError(f"{shlex.join(command)} failed ({run.returncode}):\n{tail}")


def torchrun() -> list[str]:
    """torchrun for 2 local processes on a free port of their own (not the default 29500,
    which the previous contender's sockets may still hold)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return ["torchrun", "--nproc-per-node=2", f"--master-port={port}"]


def missing_bench_packages() -> list[str]:
    return [name for name in ("accelerate", "lightning") if importlib.util.find_spec(name) is None]


def user_code_lines(script: Path) -> int:
    """Non-blank, non-comment lines of `script`, its module docstring aside."""
    source = script.read_text()
    body = source.split('"""', 2)[2] if source.startswith('"""') else source
    lines = (line.strip() for line in body.splitlines())
    return sum(1 for line in lines if line and not line.startswith("#"))


def round_target(runs: dict[str, Run]) -> float:
    """The round's target loss: where both peers end up, the higher of their final losses.

    Not the better peer's: the two end a few thousandths apart (their data orders differ), so
    the other would never reach it and have no time to compare.
    """
    return max(runs[peer].final_loss for peer in PEERS)


def targets_of(rounds: list[dict[str, Run]]) -> list[float]:
    return [round_target(runs) for runs in rounds]


def spread(values: list[float], digits: int = 3) -> dict[str, float | list[float]]:
    return {
        "median": round(statistics.median(values), digits),
        "range": [round(min(values), digits), round(max(values), digits)],
    }


def contender_figures(runs: list[Run], targets: list[float]) -> dict:
    """Median and min-max over rounds of what the issue asks for, for one contender."""
    times = [run.time_to(target) for run, target in zip(runs, targets, strict=True)]
    reached = [time for time in times if time is not None]
    return {
        "time_to_target_s": spread(reached) if reached else None,
        "rounds_reaching_target": f"{len(reached)}/{len(runs)}",
        "tokens_per_s": spread([run.tokens_per_s for run in runs], 0),
        "padding_fraction": spread([run.padding for run in runs]),
        "peak_rss_mib": spread([run.peak_rss_bytes / 2**20 for run in runs], 0),
        "final_loss": spread([run.final_loss for run in runs], 4),
        "tokens": spread([run.tokens for run in runs], 0),
    }


def time_ratios(
    rounds: list[dict[str, Run]], targets: list[float], top: str, bottom: str
) -> list[float] | None:
    """Per round `top`'s time to target over `bottom`'s; None if either missed it in a round."""
    ratios = []
    for runs, target in zip(rounds, targets, strict=True):
        over, under = runs[top].time_to(target), runs[bottom].time_to(target)
        if over is None or under is None:
            return None
        ratios.append(over / under)
    return ratios


def speed_ratios(rounds: list[dict[str, Run]], top: str, bottom: str) -> list[float]:
    return [runs[top].tokens_per_s / runs[bottom].tokens_per_s for runs in rounds]


def comparisons(rounds: list[dict[str, Run]], targets: list[float]) -> dict:
    """Every headline ratio with its A/A band; a time ratio is null when a side missed."""
    aa_speed = speed_ratios(rounds, again(CLI), CLI)
    figures: dict = {}
    # The CLI's own final loss as a second target: how long the peers take to get as far.
    cli_targets = [runs[CLI].final_loss for runs in rounds]
    for peer in PEERS:
        key = f"time_to_loss_vs_{peer}"
        figures |= time_comparison(rounds, targets, peer, CLI, key, aa_speed)
        key = f"time_to_cli_loss_vs_{peer}"
        figures |= time_comparison(rounds, cli_targets, peer, CLI, key, aa_speed)
    for peer in PEERS:
        figures |= speed_comparison(rounds, CLI, peer, f"tokens_per_s_vs_{peer}", aa_speed)
    figures |= speed_comparison(rounds, OWN, FABRIC, "own_loop_tokens_per_s_vs_fabric", aa_speed)
    for peer in PEERS:
        figures |= best_peer_comparison(rounds, peer)
    key = "own_loop_time_to_loss_vs_fabric"
    return figures | time_comparison(rounds, targets, FABRIC, OWN, key, aa_speed)


def best_peer_comparison(rounds: list[dict[str, Run]], peer: str) -> dict:
    """`peer`'s time over the CLI's to the loss the better peer ends at, per round.

    A peer that never gets there counts with its whole training time: that round's ratio is
    then a lower bound (`..._lower_bound_rounds` says how many). None if the CLI missed it.
    """
    key, ratios, bounds = f"time_to_best_peer_loss_vs_{peer}", [], 0
    for runs in rounds:
        target = min(runs[name].final_loss for name in PEERS)
        ours, theirs = runs[CLI].time_to(target), runs[peer].time_to(target)
        if ours is None:
            return {key: None}
        bounds += theirs is None
        ratios.append((theirs if theirs is not None else runs[peer].seconds) / ours)
    figure = spread(ratios)
    print(f"{key} {figure['median']} (rounds {figure['range']}; lower bounds in {bounds})")
    return {
        key: figure["median"],
        f"{key}_range": figure["range"],
        f"{key}_lower_bound_rounds": bounds,
    }


def time_comparison(
    rounds: list[dict[str, Run]],
    targets: list[float],
    top: str,
    bottom: str,
    key: str,
    aa_speed: list[float],
) -> dict:
    """`top`'s time to the targets over `bottom`'s, against the CLI twin's (or, where the twin
    misses a target, against the twin's tokens/s band); {key: None} when a side missed."""
    ratios = time_ratios(rounds, targets, top, bottom)
    if ratios is None:
        print(f"{key}: none (a side did not reach the target loss in every round)")
        return {key: None}
    comparison = Comparison.of(ratios, time_ratios(rounds, targets, again(CLI), CLI) or aa_speed)
    print(comparison.line(key))
    return comparison.figures(key)


def speed_comparison(
    rounds: list[dict[str, Run]], top: str, bottom: str, key: str, aa_speed: list[float]
) -> dict:
    comparison = Comparison.of(speed_ratios(rounds, top, bottom), aa_speed)
    print(comparison.line(key))
    return comparison.figures(key)


def print_round(index: int, total: int, runs: dict[str, Run]) -> None:
    target = round_target(runs)
    shown = {name: run.time_to(target) or float("inf") for name, run in runs.items()}
    print(round_line(index, total, shown, f"s to loss {target:.4f}"), flush=True)
    speeds = {name: run.tokens_per_s for name, run in runs.items()}
    print(round_line(index, total, speeds, "useful tokens/s"), flush=True)
    finals = {name: run.final_loss for name, run in runs.items()}
    print(round_line(index, total, finals, "final held-out loss"), flush=True)
    print_curves(runs)


def print_curves(runs: dict[str, Run]) -> None:
    for name, run in runs.items():
        shown = ", ".join(f"{p.seconds:.1f}s/{p.tokens // 1000}k:{p.loss:.3f}" for p in run.points)
        print(f"  curve {name} (s/tokens:loss): {shown}", flush=True)


def curves(runs: dict[str, Run]) -> dict[str, list[list[float]]]:
    """[seconds, tokens, loss] at every dump, one list per contender."""
    return {
        name: [[round(p.seconds, 2), p.tokens, round(p.loss, 4)] for p in run.points]
        for name, run in runs.items()
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_rounds_flag(parser, default=5)
    parser.add_argument("--tokens", type=int, default=800_000, help="useful training tokens")
    parser.add_argument("--dump-every", type=int, default=80_000, help="tokens between dumps")
    parser.add_argument("--peer-lr", type=float, default=3e-3, help="the peers' constant lr")
    parser.add_argument("--cli-flags", default="", help="extra `shardwise train` flags")
    parser.add_argument(
        "--heavy-tailed", action="store_true", help="every contender on a heavy-tailed corpus"
    )
    parser.add_argument(
        "--contender-timeout-s", type=float, default=1200, help="a contender run's time limit"
    )
    return parse_with_tiny(parser, {"rounds": 1, "tokens": 20_000, "dump_every": 5_000})


def main() -> None:
    args = parse_args()
    if missing := missing_bench_packages():
        sys.exit(f"peers.py needs {', '.join(missing)}: pip install -e .[bench]")
    torch.set_num_threads(2)  # the evaluations, between contenders
    with tempfile.TemporaryDirectory(prefix="shardwise-peers-") as scratch:
        if args.heavy_tailed:  # the contenders read it from the environment, the CLI its flag
            corpus = write_heavy_tailed(Path(scratch) / "heavy_tailed.txt")
            os.environ[DATA_ENV] = str(corpus)
            args.cli_flags += f" --data {corpus}"
        contenders = Contenders(args, Path(scratch))
        sides = {
            CLI: contenders.cli,
            OWN: contenders.own_loop,
            ACCELERATE: contenders.accelerate,
            FABRIC: contenders.fabric,
        }
        samples = interleave(
            sides,
            args.rounds,
            aa=CLI,
            on_round=lambda i, runs: print_round(i, args.rounds, runs),
        )
    rounds = [{name: runs[i] for name, runs in samples.items()} for i in range(args.rounds)]
    hashes = {run.start_hash for runs in rounds for run in runs.values()}
    if len(hashes) != 1:
        raise RuntimeError(f"the contenders started from different weights: {hashes}")
    targets = targets_of(rounds)
    figures = comparisons(rounds, targets)
    scripts = {
        OWN: "own_loop.py",
        ACCELERATE: "accelerate_loop.py",
        FABRIC: "fabric_loop.py",
    }
    report = {
        **figures,
        **{f"final_loss_{name}": round(statistics.median(r.final_loss for r in runs), 4)
           for name, runs in samples.items()},
        "target_loss": spread(targets, 4),
        "contenders": {
            name: contender_figures(runs, targets) for name, runs in samples.items()
        },
        "user_code_lines": {CLI: 1} | {n: user_code_lines(SCRIPTS / s) for n, s in scripts.items()},
        "cli_command_flags": list(contenders.cli_plan.command(Path("RUN"))[3:]),
        "start_weights_hash": hashes.pop(),
        "rounds": args.rounds,
        "contender_runs_repeated_after_a_crash": contenders.retries,
        "tokens_budget": args.tokens,
        "peer_lr": args.peer_lr,
        "curves_last_round": curves(rounds[-1]),
    }  # fmt: skip
    print(json.dumps(report))


if __name__ == "__main__":
    main()
