"""`shardwise train` as a contender of benchmarks/peers.py: its command, steps and curve points.

    plan = CliPlan.of(["--lr", "2e-3"], tokens=800_000, dump_every=80_000)
    subprocess.run(plan.command(run_dir), check=True)
    points = plan.points(run_dir)    # (training seconds, tokens, checkpoint) at every dump

The run is the CLI's defaults plus the budget, a checkpoint every ~`dump_every` tokens (all
kept, written before the next step: a background writer would share the 2 cores with the
training it is timed against) and the caller's extra flags. Training seconds come from
metrics.jsonl: a row's window lasted its tokens over its tokens/s, where its tokens are what
the CLI's own sampler plans for those steps (replayed here; checked against summary.json).
The trainer keeps checkpoint writes out of its windows, so those seconds are training alone.
"""

from __future__ import annotations

import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from shardwise.cli import build_parser
from shardwise.config import TrainConfig, load_config
from shardwise.train.build import build_sampler, load_corpus, seeded_model, sequence_lengths
from shardwise.train.resume import data_fingerprint, model_fingerprint

NPROC = 2


def cli_config(flags: list[str]) -> TrainConfig:
    """The TrainConfig `shardwise train <flags>` runs with, parsed by the CLI's own parser."""
    args = build_parser().parse_args(["train", *flags])
    overrides = {
        key: value
        for key, value in vars(args).items()
        if key in TrainConfig.model_fields and value is not None
    }
    return load_config(args.config, overrides)


def planned_step_tokens(config: TrainConfig, budget: int) -> list[int]:
    """Each optimizer step's targets over every rank, in order, until `budget` is spent."""
    sampler = build_sampler(config, sequence_lengths(load_corpus(config)), NPROC, rank=0)
    requests = iter(sampler)
    spent, steps = 0, []
    while spent < budget:
        step = list(itertools.islice(requests, config.grad_accum))
        steps.append(step[-1].step_tokens)
        spent += steps[-1]
    return steps


@dataclass(frozen=True)
class CliPlan:
    """The command line of the CLI runs, and how to read their curves back."""

    flags: tuple[str, ...]
    tokens: int
    checkpoint_every: int

    @classmethod
    def of(cls, flags: list[str], tokens: int, dump_every: int) -> CliPlan:
        config = cli_config(flags)
        steps = planned_step_tokens(config, tokens)
        mean_step = sum(steps) / len(steps)
        # Checkpoints on metrics rows, so that each has its own training seconds.
        every = max(1, round(dump_every / mean_step / config.log_every)) * config.log_every
        return cls(tuple(flags), tokens, every)

    def command(self, run_dir: Path) -> list[str]:
        return [
            sys.executable, "-m", "shardwise", "train",
            f"--nproc={NPROC}", "--device=cpu", f"--run-dir={run_dir}", "--overwrite",
            f"--max-tokens={self.tokens}",
            f"--checkpoint-every={self.checkpoint_every}", "--no-checkpoint-async",
            *self.flags,
        ]  # fmt: skip

    def points(self, run_dir: Path) -> tuple[list[tuple[float, int, Path]], dict]:
        """(training seconds, tokens, checkpoint) at every checkpoint, and summary.json.

        The steps are replayed from the settings the run saved (config.toml), so a change to
        shardwise's defaults while a benchmark runs is reported, not mistaken for its curve.
        """
        summary = json.loads((run_dir / "summary.json").read_text())
        config = load_config(run_dir / "config.toml")
        self._report_changed_settings(config, run_dir)
        step_tokens = planned_step_tokens(config, summary["tokens"])
        if (len(step_tokens), sum(step_tokens)) != (summary["steps"], summary["tokens"]):
            raise RuntimeError(
                f"{run_dir}: the CLI trained {summary['tokens']} tokens in {summary['steps']} "
                f"steps, its replayed sampler {sum(step_tokens)} in {len(step_tokens)}: the "
                "curve's tokens would be wrong"
            )
        seconds_at = seconds_at_rows(run_dir / "metrics.jsonl", step_tokens)
        checkpoints = sorted((run_dir / "checkpoints").glob("step_*"))
        check_same_job(checkpoints[0], config)
        points = []
        for checkpoint in checkpoints:
            step = int(checkpoint.name.removeprefix("step_"))
            points.append((seconds_at[step], sum(step_tokens[:step]), checkpoint))
        return points, summary

    def _report_changed_settings(self, ran: TrainConfig, run_dir: Path) -> None:
        # What config.toml keeps of each (not where the run lives or how it started).
        planned = cli_config(self.command(run_dir)[4:]).settings()  # after `... train`
        kept = ran.settings()
        changed = [
            f"{key} {planned.get(key)!r} -> {kept.get(key)!r}"
            for key in sorted(planned.keys() | kept.keys())
            if planned.get(key) != kept.get(key)
        ]
        if changed:
            print(
                f"warning: this CLI run's settings are not the ones the benchmark started with "
                f"(shardwise changed while it ran?): {', '.join(changed)}",
                flush=True,
            )


def check_same_job(checkpoint: Path, config: TrainConfig) -> None:
    """The run's model (names, shapes) and training data are the ones `config` gives.

    Its starting weights are not saved; they come from the same `seeded_model` call with the
    same seed as every other contender's, whose hash the parent compares.
    """
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    corpus = load_corpus(config)
    expected = {
        "model_fingerprint": model_fingerprint(seeded_model(config, corpus.vocab_size)),
        "data_fingerprint": data_fingerprint(corpus),
    }
    for key, value in expected.items():
        if state[key] != value:
            raise RuntimeError(f"{checkpoint}: {key} {state[key]}, expected {value}")


def seconds_at_rows(metrics: Path, step_tokens: list[int]) -> dict[int, float]:
    """Training seconds up to each metrics row's step (a window: its tokens / its tokens/s)."""
    seconds, previous, at = 0.0, 0, {}
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        if "tokens_per_s" not in row:  # not a training window
            continue
        step = row["step"]
        seconds += sum(step_tokens[previous:step]) / row["tokens_per_s"]
        at[step], previous = seconds, step
    return at
