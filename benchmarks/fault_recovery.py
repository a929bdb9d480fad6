"""What fault tolerance costs and buys: one function per figure, one JSON line at the end.

    python benchmarks/fault_recovery.py                      # every section, 6 rounds
    python benchmarks/fault_recovery.py --only checkpoint_overhead --rounds 2   # a smoke test
    python benchmarks/fault_recovery.py --tiny               # every section, smallest sizes

checkpoint_overhead: the step-time cost of checkpointing every --every steps against not
checkpointing, with the saves written in the foreground (`sync`) and in the background
(`async`, DCP's async_save: the state is copied to CPU memory, a thread writes and seals it).
A TransformerLM (support/transformer_job.py) trains --steps AdamW steps in one process through
`shardwise.checkpoint.CheckpointWriter`, the path the trainer takes; a side's figure is its
wall time per step, including the wait for a background save still in flight at the end (as
the trainer waits before its last save). Every round runs none, sync, async and none again (the
A/A pair: the noise floor), in an order rotated each round (support/rounds.py); the figures are
the medians of the per-round ratios side / none, their min-max, and whether each is resolved
against the A/A noise. Keys: checkpoint_overhead_sync and checkpoint_overhead_async (a ratio:
1.05 = 5% slower), with _range, _aa_range and _resolved beside each; for context the median
step time of each side and save_blocking_ms_sync / _async, how long one save held the loop up
(for async: the copy to CPU memory, plus any wait for the save before it).

recovery (support/recovery.py): the seconds from a killed worker to the restarted group's
first step, and the steps of work lost (recovery_s with its min-max over the rounds,
steps_lost).

Sections are functions `name(args) -> dict` in SECTIONS, each with its own flags.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from shardwise.checkpoint import CheckpointWriter, TrainerState, take_snapshot
from shardwise.data.batch import Batch
from shardwise.distributed import DistEnv
from support.recovery import add_recovery_flags, recovery
from support.rounds import (
    Comparison,
    add_rounds_flag,
    again,
    interleave,
    parse_with_tiny,
    round_line,
)
from support.transformer_job import build_transformer, fixed_batch, model_flags

ENV = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
_MODES = ("none", "sync", "async")


def checkpoint_overhead(args: argparse.Namespace) -> dict[str, object]:
    """Seconds per step checkpointing every --every steps, sync and async, against none."""
    model = build_transformer(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = fixed_batch(args)
    params = sum(p.numel() for p in model.parameters())
    print(f"TransformerLM {params / 1e6:.1f}M parameters; checkpoint ~{12 * params / 1e6:.0f} MB")
    with tempfile.TemporaryDirectory(prefix="fault-recovery-", dir=args.dir) as root:
        writer = CheckpointWriter()

        blocked: dict[str, list[float]] = {mode: [] for mode in _MODES}

        def side(mode: str) -> Callable[[], float]:
            parts = model, optimizer, batch, writer, root, args
            return lambda: _seconds_per_step(mode, *parts, blocked[mode])

        _seconds_per_step("async", model, optimizer, batch, writer, root, args, [])  # warm-up
        sides = {mode: side(mode) for mode in _MODES}
        show = _round_printer(args.rounds)
        samples = interleave(sides, args.rounds, aa="none", on_round=show)
    figures: dict[str, object] = {"checkpoint_every": args.every, "steps": args.steps}
    for mode in ("sync", "async"):
        comparison = Comparison.between(samples, mode, "none", aa="none")
        print(comparison.line(f"checkpoint_overhead_{mode}"))
        figures |= comparison.figures(f"checkpoint_overhead_{mode}")
    for mode in _MODES:
        figures[f"step_ms_{mode}"] = round(1000 * statistics.median(samples[mode]), 1)
    for mode in ("sync", "async"):  # what one save holds the training loop up for
        figures[f"save_blocking_ms_{mode}"] = round(1000 * statistics.median(blocked[mode]), 1)
        # The stall alone, as a share of the steps between saves: measured inside each side,
        # so free of the load that drifts between sides (the background write's own CPU use,
        # on a spare core here, is in the interleaved ratios above, not in this share).
        share = statistics.median(blocked[mode]) / (args.every * statistics.median(samples["none"]))
        figures[f"checkpoint_blocking_share_{mode}"] = round(share, 4)
        print(f"checkpoint_blocking_share_{mode} {share:.2%} of the step time between saves")
    return figures


def _seconds_per_step(
    mode: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    writer: CheckpointWriter,
    root: str,
    args: argparse.Namespace,
    blocked: list[float],
) -> float:
    """Wall seconds per step; appends the seconds each save (and the last wait) held it up."""
    directory = Path(root) / mode
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        logits = model(batch.tokens)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if mode != "none" and step % args.every == 0:
            saving = time.perf_counter()
            snapshot = take_snapshot(directory, model, optimizer, TrainerState(step=step))
            writer.save(snapshot, ENV, background=mode == "async")
            blocked.append(time.perf_counter() - saving)
    waiting = time.perf_counter()
    writer.wait()  # a background save still in flight counts: the trainer waits for it too
    if mode == "async":
        blocked[-1] += time.perf_counter() - waiting
    seconds = (time.perf_counter() - started) / args.steps
    for path in directory.glob("step_*"):  # the disk holds the same amount for every side
        shutil.rmtree(path)
    return seconds


def _round_printer(rounds: int) -> Callable[[int, dict[str, float]], None]:
    def show(index: int, seconds: dict[str, float]) -> None:
        shown = {f"{mode}/none": seconds[mode] / seconds["none"] for mode in ("sync", "async")}
        shown["A/A"] = seconds[again("none")] / seconds["none"]
        per_step = {name: 1000 * value for name, value in seconds.items()}
        print(round_line(index, rounds, per_step, "ms/step", shown), flush=True)

    return show


SECTIONS: dict[str, Callable[[argparse.Namespace], dict[str, object]]] = {
    "checkpoint_overhead": checkpoint_overhead,
    "recovery": recovery,
}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    result: dict[str, object] = {"rounds": args.rounds}
    for name in args.only or list(SECTIONS):
        result |= SECTIONS[name](args)
    print(json.dumps(result))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model_flags(parser, dim=256, layers=4, heads=4, batch=8, length=128)
    add_rounds_flag(parser, default=6)
    parser.add_argument("--only", nargs="+", choices=sorted(SECTIONS), help="sections to run")
    parser.add_argument("--steps", type=int, default=40, help="training steps per side a round")
    parser.add_argument("--every", type=int, default=10, help="checkpoint every N steps")
    parser.add_argument("--threads", type=int, default=1, help="torch compute threads")
    parser.add_argument("--dir", default=None, help="where checkpoints go (default: temp dir)")
    add_recovery_flags(parser)
    tiny = {"dim": 64, "layers": 2, "heads": 2, "batch": 2, "length": 16, "rounds": 1}
    tiny |= {"steps": 4, "every": 2, "kill_at": 2, "recovery_every": 1}
    return parse_with_tiny(parser, tiny)


if __name__ == "__main__":
    main()
