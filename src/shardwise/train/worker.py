"""One worker's whole job: join the group, build, train, export, report, leave.

    summary = run_worker(TrainConfig(max_steps=50).model_dump_json())

This is the single worker entry point: our own launcher starts it in each worker process, a
user's `torchrun -m shardwise train ...` reaches it through the CLI, and a single process calls it
directly. A user error is written to the launcher's error folder as one line (ERROR_FILE); the
launcher (launch.py) reads it back and prints it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from shardwise.config import TrainConfig
from shardwise.distributed import (
    DistEnv,
    barrier,
    broadcast_object,
    init_distributed,
    shutdown_distributed,
)
from shardwise.errors import ShardwiseError, first_line
from shardwise.report import format_summary, plot_metrics, write_report, write_summary
from shardwise.report.summary import json_value
from shardwise.run_dir import hold_run_dir, rank_zero_holds_lock, resolve_run_dir
from shardwise.session import Session
from shardwise.train.build import load_corpus, seeded_model, stage_plan
from shardwise.train.export import export_model, whole_model
from shardwise.train.trainer import Trainer

ERROR_FILE = "error-rank{rank}.txt"
ERROR_FILE_GLOB = "error-rank*.txt"
SYS_PATH_FILE = "sys_path.json"
LAUNCHER_SUMMARY_FILE = "summary-rank{rank}.json"
_EXIT_FAILED = 2
_ROOT_CAUSE_GRACE_S = 1.0


def run_worker(config_json: str, error_dir: str | None = None) -> dict:
    """A worker process's entry point: join the group, train, leave the group.

    A user error is reported through `error_dir` (for the launcher to print) or raised when there
    is no launcher. A lost peer ends the process at once: tearing down a process group whose
    peer is dead or hung can block forever in the communication library's destructors.
    """
    config = TrainConfig.model_validate_json(config_json)
    try:
        env = init_distributed(config.device, config.timeout_s)
        summary = train(config, env)
    except RuntimeError as exc:
        if not _is_peer_failure(exc):
            raise
        rank = os.environ.get("RANK", "0")
        lost = PeerLostError(
            f"rank {rank} lost contact with its peers ({first_line(exc)}): a peer died or "
            f"hung; if steps are legitimately slower than {config.timeout_s:g}s, raise --timeout-s"
        )
        _report(lost, error_dir)
        # Give the agent (polling every 0.1 s) time to see a peer that really died exit first,
        # so the run is reported by its root cause rather than by this symptom.
        time.sleep(_ROOT_CAUSE_GRACE_S)
        os._exit(_EXIT_FAILED)
    except ShardwiseError as exc:
        if error_dir is None:
            raise
        _report(exc, error_dir)
        sys.exit(_EXIT_FAILED)
    shutdown_distributed()
    return summary


def _report(exc: ShardwiseError, error_dir: str | None) -> None:
    if error_dir is None:
        print(f"shardwise: error: {exc}", file=sys.stderr)
    else:
        report = {"message": str(exc), "peer_lost": isinstance(exc, PeerLostError)}
        rank = os.environ.get("RANK", "0")
        Path(error_dir, ERROR_FILE.format(rank=rank)).write_text(json.dumps(report))
    sys.stdout.flush()
    sys.stderr.flush()


class PeerLostError(ShardwiseError):
    """This rank is fine, but a collective failed because a peer died or stopped answering."""


def train(config: TrainConfig, env: DistEnv) -> dict:
    """Train as described by `config` on this rank; rank 0 writes the report and prints it."""
    corpus = load_corpus(config)
    stages = stage_plan(config, corpus, env)  # before the model: profiling draws random numbers
    model = seeded_model(config, corpus.vocab_size)
    session = Session(env, config)
    run_dir = Path(str(broadcast_object(str(resolve_run_dir(config)), env)))
    # Usually the launching process holds the run dir; only when the rendezvous picked which
    # node is node 0 does rank 0 learn here that the run is its to hold.
    owns_it = env.is_main and rank_zero_holds_lock(config)
    with hold_run_dir(config, run_dir) if owns_it else contextlib.nullcontext():
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.toml").write_text(config.to_toml(), encoding="utf-8")
        barrier(env)
        trainer = Trainer(config, session, corpus, model, run_dir, stages)
        result = trainer.fit()
        summary = result.summary
        if env.is_main:
            whole = whole_model(trainer.model, result.checkpoint, config, corpus.vocab_size)
            summary |= export_model(config, whole, run_dir)
            write_summary(run_dir, summary)
            write_report(run_dir, summary, plot_metrics(run_dir))
            print(format_summary(summary), flush=True)
    return summary


# What gloo and NCCL say when a collective's peer is gone or silent past the timeout.
_PEER_FAILURE_MARKERS = (
    "Timed out",
    "timed out",
    "Connection closed by peer",
    "Connection reset by peer",
    "NCCL communicator was aborted",
    "Broken pipe",
)


def _is_peer_failure(exc: RuntimeError) -> bool:
    return any(marker in str(exc) for marker in _PEER_FAILURE_MARKERS)


# Below: launch_workers starts each worker as the command `python -P -m shardwise.train.worker`.


# What that command reads from the launcher's folder, and leaves there for it.


@record
def main() -> None:
    """`python -P -m shardwise.train.worker CONFIG_JSON FOLDER`: one worker of launch_workers.

        elastic_launch(launch_config, sys.executable)("-P", "-m", "shardwise.train.worker", ...)

    Takes the launcher's sys.path (as a spawned worker would inherit it), trains, and leaves its
    summary in FOLDER, since a command returns nothing through the agent. `@record` writes an
    exception to this worker's error file (TORCHELASTIC_ERROR_FILE) for the launcher to report.
    """
    config_json, folder = sys.argv[1:]
    sys.path[:] = json.loads(Path(folder, SYS_PATH_FILE).read_text(encoding="utf-8"))
    summary = run_worker(config_json, folder)
    rank = os.environ.get("RANK", "0")
    text = json.dumps(summary, default=json_value)
    Path(folder, LAUNCHER_SUMMARY_FILE.format(rank=rank)).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    try:
        main()
    except Exception:
        if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
            raise
        # Recorded in the error file, which the launcher prints once: not here a second time.
        sys.exit(1)
