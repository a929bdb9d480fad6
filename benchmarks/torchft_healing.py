"""Does torchft heal a killed data-parallel replica from a live peer on gloo/CPU, with no restart?

    python benchmarks/torchft_healing.py                  # 3 + 1 kill/heal scenarios, < 3 min
    python benchmarks/torchft_healing.py --scenarios 1 --ddp-scenarios 0   # a smoke run
    python benchmarks/torchft_healing.py --tiny     # 1 short scenario: does it still run?

Each scenario starts a torchft lighthouse on loopback (min_replicas 1) and two replica groups
of one process each (support/torchft_replica.py: a small RecurrentLM on random tokens, torchft's
Manager on its gloo group). When replica 1 reports step --kill-at it is SIGKILLed, and
restarted --down-s seconds later; both then train on until a step >= --steps that both took
part in. --scenarios run with the gradients averaged by Manager.allreduce after backward, the
figures below; --ddp-scenarios more with torchft's DDP wrapper doing it from its comm hook,
reported only as survived or not. Measured per scenario:

- survivor_steps_while_peer_dead: steps replica 0 committed between the kill and the restart
  (survivor_steps_until_heal: until replica 1's first committed step);
- survivor_longest_gap_s: its longest time between two committed steps, from the kill until
  replica 1's first committed step (survivor_median_step_s: its median step before the kill);
- heal_s: from replica 1's restart to its first committed step, split into the process start
  (heal_start_s: Python, torch, the Manager, until the replica reports ready) and the join and
  state transfer from the live peer after it (heal_join_s);
- max_abs_diff: the largest difference between the two replicas' parameters at the end.

These are single measurements of event latencies, not a throughput comparison, so there is
no A/A twin; the JSON holds the median and min-max over the scenarios. Every scenario runs
under a deadline (--scenario-timeout, and --budget-s for the whole run), so a hang, a crash or
a quorum that never forms ends it, and the finding lands in "failure" (the first one, with how
often it happened) with exit status 0. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import itertools
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from support.rounds import parse_with_tiny

REPLICA_SCRIPT = Path(__file__).parent / "support" / "torchft_replica.py"
SRC = Path(__file__).resolve().parents[1] / "src"
MIN_SCENARIO_S = 15.0  # a scenario needs about this long even on a quiet machine


class ScenarioFailed(Exception):
    """One line saying what did not work; it goes into the JSON's "failure"."""


@dataclass
class Replica:
    """A replica process and the JSON events it printed, read on a thread so nothing blocks."""

    index: int
    process: subprocess.Popen[str]
    started: float
    events: list[dict] = field(default_factory=list)

    def read_events(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("{"):
                self.events.append(json.loads(line))

    def committed_steps(self) -> list[dict]:
        return [e for e in self.events if e["event"] == "step" and e["committed"]]

    def last_step(self) -> int:
        steps = self.committed_steps()
        return steps[-1]["step"] if steps else 0

    def first(self, event: str) -> dict | None:
        return next((e for e in self.events if e["event"] == event), None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    env.setdefault("RUST_LOG", "warn")  # torchft's Rust side logs every quorum at info
    return env


def start_lighthouse(args: argparse.Namespace, port: int, log: Path) -> subprocess.Popen[bytes]:
    flags = [
        f"--bind=127.0.0.1:{port}",
        "--min_replicas=1",
        f"--heartbeat_timeout_ms={args.heartbeat_timeout_ms}",
        f"--join_timeout_ms={args.join_timeout_ms}",
    ]
    binary = shutil.which("torchft_lighthouse")
    if binary is None:
        raise ScenarioFailed(
            "torchft_lighthouse is not on PATH (torchft installed without its CLI)"
        )
    with log.open("ab") as sink:
        return subprocess.Popen([binary, *flags], stdout=sink, stderr=sink, env=child_env())


def start_replica(
    args: argparse.Namespace, path: str, index: int, lighthouse: str, workdir: Path
) -> Replica:
    command = [
        sys.executable,
        str(REPLICA_SCRIPT),
        f"--replica={index}",
        f"--lighthouse={lighthouse}",
        f"--steps={args.steps}",
        f"--sleep={args.sleep}",
        f"--out={workdir / f'replica{index}.pt'}",
        f"--path={path}",
    ]
    log = (workdir / f"replica{index}.log").open("a")
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=log, text=True, env=child_env()
    )
    replica = Replica(index, process, time.time())
    threading.Thread(target=replica.read_events, daemon=True).start()
    return replica


def wait_until(condition, deadline: float, what: str) -> None:
    while not condition():
        if time.time() > deadline:
            raise ScenarioFailed(f"timed out waiting for {what}")
        time.sleep(0.02)


def wait_until_done(replica: Replica, deadline: float) -> None:
    """Until the replica has saved its weights; its interpreter's teardown does not count."""
    wait_until(
        lambda: replica.first("done") or replica.process.poll() is not None,
        deadline,
        f"replica {replica.index} to finish",
    )
    if not replica.first("done"):
        raise ScenarioFailed(
            f"replica {replica.index} exited with status {replica.process.returncode} at step "
            f"{replica.last_step()} (see its log)"
        )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(timeout=10)


def max_abs_diff(workdir: Path) -> float:
    first, second = (torch.load(workdir / f"replica{i}.pt") for i in (0, 1))
    return max((first[name] - second[name]).abs().max().item() for name in first)


def longest_gap(times: list[float]) -> float:
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def measure(survivor: Replica, killed_at: float, restarted: Replica) -> dict[str, float | int]:
    healed = restarted.committed_steps()[0]["t"]
    ready = restarted.first("ready")
    survivor_times = [e["t"] for e in survivor.committed_steps()]
    before_kill = [t for t in survivor_times if t < killed_at]
    # The gap that spans the kill counts: it is the stall the survivor felt.
    window = [t for t in survivor_times if t <= healed]
    window = window[max(0, len(before_kill) - 1) :]
    return {
        "survivor_steps_while_peer_dead": sum(
            killed_at <= t < restarted.started for t in survivor_times
        ),
        "survivor_steps_until_heal": sum(killed_at <= t < healed for t in survivor_times),
        "survivor_longest_gap_s": longest_gap(window),
        "survivor_median_step_s": statistics.median(
            [b - a for a, b in itertools.pairwise(before_kill)] or [0.0]
        ),
        "heal_s": healed - restarted.started,
        "heal_start_s": (ready["t"] if ready else healed) - restarted.started,
        "heal_join_s": healed - (ready["t"] if ready else restarted.started),
        "healed_at_step": restarted.committed_steps()[0]["step"],
    }


def run_scenario(args: argparse.Namespace, path: str, workdir: Path) -> dict[str, float | int]:
    """Kill replica 1 at --kill-at, restart it, let both finish; the figures of one scenario."""
    deadline = min(time.time() + args.scenario_timeout, args.run_ends)
    port = free_port()
    lighthouse = start_lighthouse(args, port, workdir / "lighthouse.log")
    processes: list[subprocess.Popen] = [lighthouse]
    replicas: list[Replica] = []

    def launch(index: int) -> Replica:
        replica = start_replica(args, path, index, f"http://127.0.0.1:{port}", workdir)
        replicas.append(replica)
        processes.append(replica.process)
        return replica

    try:
        survivor, victim = launch(0), launch(1)
        wait_until(
            lambda: victim.last_step() >= args.kill_at,
            deadline,
            f"replica 1 to reach step {args.kill_at}",
        )
        victim.process.send_signal(signal.SIGKILL)
        killed_at = time.time()
        time.sleep(args.down_s)
        restarted = launch(1)
        wait_until(
            lambda: restarted.committed_steps(),
            deadline,
            "the restarted replica 1 to commit a step",
        )
        for replica in (survivor, restarted):
            wait_until_done(replica, deadline)
        return {**measure(survivor, killed_at, restarted), "max_abs_diff": max_abs_diff(workdir)}
    finally:
        for process in processes:
            stop(process)
        events = {f"{r.index}@{r.started:.3f}": r.events for r in replicas}
        (workdir / "events.json").write_text(json.dumps(events, indent=1))


def crash_cause(workdir: Path) -> str:
    """The exception and the torchft line it came from, out of the replicas' logs."""
    for log in sorted(workdir.glob("replica*.log")):
        lines = log.read_text(errors="replace").splitlines()
        errors = [i for i, line in enumerate(lines) if re.match(r"^\w+(Error|Exception)\b", line)]
        if errors:
            frames = [
                re.search(r'(torchft/[\w/]+\.py)", line (\d+), in (\w+)', line)
                for line in lines[: errors[-1]]
            ]
            frame = next((m for m in reversed(frames) if m), None)
            where = f" in {frame[3]} ({frame[1]}:{frame[2]})" if frame else ""
            return f"{lines[errors[-1]].strip()[:160]}{where}"
    return ""


def run_path(
    args: argparse.Namespace, path: str, count: int, root: Path
) -> tuple[list[dict], list[str]]:
    """Run `count` scenarios through one gradient path: the figures and the failures."""
    rounds: list[dict] = []
    failures: list[str] = []
    for index in range(count):
        if time.time() + MIN_SCENARIO_S > args.run_ends:
            failures.append(f"{path} scenario {index}: skipped, the run's --budget-s is spent")
            continue
        workdir = root / f"{path}{index}"
        workdir.mkdir()
        try:
            figures = run_scenario(args, path, workdir)
        except (ScenarioFailed, OSError, RuntimeError, ValueError, KeyError) as error:
            # Whatever went wrong is the finding: record it, never end without the JSON.
            if not isinstance(error, ScenarioFailed):
                error = ScenarioFailed(f"{type(error).__name__}: {error}")
            # A replica that crashed left its exception; a hang or a timeout did not.
            cause = crash_cause(workdir) if "exited with status" in str(error) else ""
            if time.time() >= args.run_ends:
                cause = "the run's --budget-s ran out"
            failure = f"{path} scenario {index}: {error}" + (f": {cause}" if cause else "")
            print(failure, flush=True)
            failures.append(failure)
            continue  # a crash can hang on when the kill lands; the next scenario may differ
        print_round(f"{path} scenario {index}", figures)
        rounds.append(figures)
    return rounds, failures


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(rounds: list[dict], failures: list[str]) -> dict[str, object]:
    outcome: dict[str, object] = {
        "scenarios_completed": f"{len(rounds)} of {len(rounds) + len(failures)}",
        # The first failure, with how often it happened; the log folder holds every one.
        "failure": f"{failures[0]} ({len(failures)}x)" if failures else None,
    }
    if not rounds:
        return {"works_on_gloo_cpu": False, **outcome}
    diff = max(r["max_abs_diff"] for r in rounds)
    survivor_steps = [r["survivor_steps_while_peer_dead"] for r in rounds]
    result: dict[str, object] = {
        "works_on_gloo_cpu": not failures and diff == 0.0 and min(survivor_steps) > 0,
        **outcome,
        "weights_equal_after_heal": diff == 0.0,
        "max_abs_diff": diff,
    }
    for key in ("survivor_steps_while_peer_dead", "survivor_steps_until_heal", "healed_at_step"):
        values = [r[key] for r in rounds]
        result[key] = statistics.median(values)
        result[f"{key}_range"] = [min(values), max(values)]
    for key in (
        "survivor_longest_gap_s",
        "survivor_median_step_s",
        "heal_s",
        "heal_start_s",
        "heal_join_s",
    ):
        figures = spread([r[key] for r in rounds])
        result[key] = round(figures["median"], 3)
        result[f"{key}_range"] = [round(figures["min"], 3), round(figures["max"], 3)]
    return result


def print_round(label: str, figures: dict) -> None:
    f = figures
    print(
        f"{label}: survivor committed {f['survivor_steps_while_peer_dead']} steps while replica 1 "
        f"was dead, {f['survivor_steps_until_heal']} until it healed; its longest gap "
        f"{f['survivor_longest_gap_s']:.2f} s (median step {f['survivor_median_step_s']:.2f} s); "
        f"replica 1 healed {f['heal_s']:.2f} s after its restart (start {f['heal_start_s']:.2f} s "
        f"+ join/heal {f['heal_join_s']:.2f} s) at step {f['healed_at_step']}; "
        f"max |w0 - w1| = {f['max_abs_diff']:g}",
        flush=True,
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scenarios", type=int, default=3, help="scenarios through Manager.allreduce"
    )
    parser.add_argument("--steps", type=int, default=20, help="train at least this many steps")
    parser.add_argument("--kill-at", type=int, default=8, help="kill replica 1 at this step")
    parser.add_argument("--down-s", type=float, default=2.0, help="seconds replica 1 stays dead")
    parser.add_argument("--sleep", type=float, default=0.1, help="seconds of 'work' per step")
    parser.add_argument(
        "--ddp-scenarios", type=int, default=1, help="scenarios through torchft's DDP wrapper"
    )
    parser.add_argument("--heartbeat-timeout-ms", type=int, default=1000)
    parser.add_argument("--join-timeout-ms", type=int, default=1000)
    parser.add_argument("--scenario-timeout", type=float, default=60.0, help="seconds per scenario")
    parser.add_argument("--budget-s", type=float, default=165.0, help="seconds for the whole run")
    parser.add_argument("--dir", default=None, help="where the logs go (default: a temp folder)")
    tiny = {"scenarios": 1, "ddp_scenarios": 0, "steps": 6, "kill_at": 3, "down_s": 0.5}
    return parse_with_tiny(parser, tiny | {"budget_s": 90.0})


def main() -> None:
    args = parse_args()
    args.run_ends = time.time() + args.budget_s
    root = Path(tempfile.mkdtemp(prefix="torchft-healing-", dir=args.dir))
    print(f"torchft {importlib.metadata.version('torchft')}; logs in {root}", flush=True)
    rounds, failures = run_path(args, "allreduce", args.scenarios, root)
    ddp_summary = summarize(*run_path(args, "ddp", args.ddp_scenarios, root))
    result = {
        "torchft_version": importlib.metadata.version("torchft"),
        "gradient_path": "Manager.allreduce per gradient",
        **summarize(rounds, failures),
        "ddp_wrapper": {
            key: ddp_summary[key] for key in ("works_on_gloo_cpu", "scenarios_completed", "failure")
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
