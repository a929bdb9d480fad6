"""One worker's whole job: join the group, build, train, export, report, leave.

    summary = run_worker(TrainConfig(max_steps=50).model_dump_json())

This is the single worker entry point: our own launcher starts it in each worker process, a
user's `torchrun -m shardwise train ...` reaches it through the CLI, and a single process calls it
directly. A user error is written to the launcher's error folder as one line (ERROR_FILE); the
launcher (agent.py) reads it back and prints it; handoff.py holds what the two share.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from functools import partial
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
from shardwise.handoff import (
    ERROR_FILE,
    GIVE_UP_SIGNAL,
    LAUNCHED_FILE,
    LAUNCHER_PID_ENV,
    PID_FILE_GLOB,
    PREEMPTED_FILE,
    SYS_PATH_FILE,
    Preempted,
    write_rank_summary,
    write_record,
)
from shardwise.memory.kernels import bound_kernel_caches
from shardwise.memory.measure import hand_back_large_frees
from shardwise.parallel.sync.ps_links import AsyncRun
from shardwise.report import format_summary, plot_metrics, write_report, write_summary
from shardwise.report.markdown import CONFIG_FILE
from shardwise.report.summary import SUMMARY_FILE, json_value
from shardwise.run_dir import hold_run_dir, rank_zero_holds_lock, resolve_run_dir
from shardwise.safe_write import replace_file
from shardwise.session import Session
from shardwise.techniques import freeing_within_a_step, joining
from shardwise.train.build import load_corpus, pipeline_cut, seeded_model, with_step_budget
from shardwise.train.export import export_model, whole_model
from shardwise.train.faults import Faults, read_faults
from shardwise.train.health import NonFiniteStepError
from shardwise.train.heartbeat import heartbeat
from shardwise.train.preemption import (
    PreemptionCheck,
    preemptible,
    watch_signals,
)
from shardwise.train.restarts import (
    config_for_attempt,
    record_restart,
    restart_count,
)
from shardwise.train.serve import serve_parameters
from shardwise.train.supervisor import (
    die_with_parent,
    expendable_ranks,
    supervise,
    supervises,
)
from shardwise.train.trainer import Trainer

RAISED_FILE = "raised-rank{rank}.json"
_EXIT_FAILED = 2
_ROOT_CAUSE_GRACE_S = 1.0


def run_worker(config_json: str, error_dir: str | None = None) -> dict:
    """A worker process's entry point: join the group, train, leave the group.

    A user error is reported through `error_dir` (the launcher's folder, for it to print) or
    raised when there is no launcher. A lost peer ends the process at once: tearing down a
    process group whose peer is dead or hung can block forever in the communication library's
    destructors. SIGTERM and Ctrl-C stop it after a step with a checkpoint (`Preempted`).
    """
    config = TrainConfig.model_validate_json(config_json)
    folder = Path(error_dir) if error_dir is not None else None
    try:
        faults = read_faults(os.environ, restart_count())  # what a test asked for; else none
        with watch_signals(folder, enabled=preemptible(config)):
            env, run = _join(config)
            # After joining: a rank 0 that hosts the store itself has it up by now.
            hung, untrusted = partial(_hung, folder), partial(_untrusted, folder)
            expendable = expendable_ranks(config)
            with heartbeat(config.heartbeat_timeout_s, hung, expendable, untrusted):
                if run is not None and run.is_server:
                    summary = serve_parameters(config, env, run)
                else:
                    summary = train(config, env, folder, faults)
    except Preempted:
        shutdown_distributed()  # every rank stopped after the same step
        raise
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


def _hung(folder: Path | None, line: str) -> None:
    """A watched rank went silent: this attempt's failure (a restart may follow); leave now."""
    if folder is not None:
        write_record(folder, ERROR_FILE, {"message": line, "peer_lost": False})
    else:
        print(f"shardwise: error: {line}", file=sys.stderr, flush=True)
    os._exit(_EXIT_FAILED)  # from the heartbeat thread: the main one may be stuck in a collective


def _untrusted(folder: Path | None, exc: ShardwiseError) -> None:
    """The job's store holds a value nobody in the job signed: the run's end, with no restart."""
    _report(exc, None if folder is None else str(folder))
    os._exit(_EXIT_FAILED)  # from the heartbeat thread, as _hung


def _join(config: TrainConfig) -> tuple[DistEnv, AsyncRun | None]:
    """This rank's group: torchrun's, or its place among processes a technique starts beside
    the ranks (--sync async: workers and parameter servers)."""
    join = joining(config)
    if join is not None:
        return join(config.device, config.timeout_s)
    return init_distributed(config.device, config.timeout_s), None


def _report(exc: ShardwiseError, error_dir: str | None) -> None:
    if error_dir is None:
        print(f"shardwise: error: {exc}", file=sys.stderr)
    else:
        peer_lost = isinstance(exc, PeerLostError)
        write_record(Path(error_dir), ERROR_FILE, {"message": str(exc), "peer_lost": peer_lost})
        if not peer_lost:
            os.kill(os.getppid(), GIVE_UP_SIGNAL)  # the launcher: our parent (see agent.py)
    sys.stdout.flush()
    sys.stderr.flush()


class PeerLostError(ShardwiseError):
    """This rank is fine, but a collective failed because a peer died or stopped answering."""


def train(
    config: TrainConfig, env: DistEnv, folder: Path | None = None, faults: Faults | None = None
) -> dict:
    """Train as described by `config` on this rank; rank 0 writes the report and prints it.

    `folder` is the launcher's: where a restarted group learns what ended the last attempt;
    `faults`: what a test asked this rank for (train/faults.py).
    """
    bound_kernel_caches()  # inherited from the launcher, else before this rank's first kernel
    if env.device.type == "cpu" and freeing_within_a_step(config, config.layout(env.world_size)):
        hand_back_large_frees()  # before anything large is allocated (memory/measure.py)
    run_dir = Path(str(broadcast_object(str(resolve_run_dir(config)), env)))
    # The run's own settings for config.toml; a restarted attempt resumes (restarts.py).
    settings, config = config, config_for_attempt(config, run_dir)
    corpus = load_corpus(config)
    config = with_step_budget(config, corpus, env.world_size)
    stages = pipeline_cut(config, corpus, env)  # before the model: profiling draws random numbers
    model = seeded_model(config, corpus.vocab_size)
    session = Session.from_config(env, config)
    # Usually the launching process holds the run dir; only when the rendezvous picked which
    # node is node 0 does rank 0 learn here that the run is its to hold.
    owns_it = env.is_main and rank_zero_holds_lock(config)
    restarted = restart_count() > 0
    with hold_run_dir(config, run_dir, restarted) if owns_it else contextlib.nullcontext():
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            replace_file(run_dir / CONFIG_FILE, settings.to_toml())  # never through a link
        barrier(env)
        restarts = record_restart(folder, env, config, run_dir) if folder else []
        check = PreemptionCheck.for_config(config, env, folder)
        trainer = Trainer(
            config, session, corpus, model, run_dir, stages, preemption=check, faults=faults
        )
        try:
            result = trainer.fit()
        except NonFiniteStepError:  # every rank stops at the same step: finish a save in flight
            session.wait_for_checkpoint()
            raise
        if result.summary is None:  # resumed at its end: the finished run's files stay
            if not env.is_main:
                return {}
            return _finished_already(run_dir, config, trainer)
        summary = result.summary
        if env.is_main:
            whole = whole_model(trainer.model, result.checkpoint, config, corpus.vocab_size)
            summary |= export_model(config, whole, run_dir, trainer.model.contract)
            summary["restarts"] = restarts
            summary["wall_time_s_since_launch"] = _since_launch(folder)
            write_summary(run_dir, summary)
            final_eval = (trainer.state.step, summary.get("eval_loss"))
            write_report(run_dir, summary, plot_metrics(run_dir, final_eval))
            print(format_summary(summary), flush=True)
    return summary


def _finished_already(run_dir: Path, config: TrainConfig, trainer: Trainer) -> dict:
    """The summary a finished run wrote, kept as it is on disk, and one line saying so.

    A job script that always passes --resume may run again after its run finished (a requeue):
    that is no error, and a second summary of zero steps would overwrite the real one. What this
    start's resume found (checkpoints skipped on the way) is still said, and returned with it.
    """
    step = trainer.state.step
    try:
        summary = json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = None
    if not isinstance(summary, dict):  # resumed into another run dir, or it never reported
        raise ShardwiseError(
            f"--resume {config.resume}: that run already trained {step} steps, all of "
            f"--max-steps {config.max_steps}; raise --max-steps to train further"
        )
    for note in trainer.resume_notes:
        print(f"shardwise: resume: {note}", flush=True)
    print(
        f"shardwise: run dir {run_dir}: it already trained {step} steps, all of --max-steps "
        f"{config.max_steps}; nothing to train, its {SUMMARY_FILE} and report are kept "
        "(raise --max-steps to train further)",
        flush=True,
    )
    resumed = {"resumed_from": str(trainer.resumed_from), "resume_notes": trainer.resume_notes}
    return {**summary, **resumed}


def _since_launch(folder: Path | None) -> float | None:
    """Seconds since our launcher started the run, restarts included (None without it)."""
    launched = folder / LAUNCHED_FILE if folder is not None else None
    if launched is None or not launched.exists():
        return None
    return round(time.time() - float(launched.read_text(encoding="ascii")), 3)


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


@record
def main() -> None:
    """`python -P -m shardwise.train.worker CONFIG_JSON FOLDER`: one worker of launch_workers.

        elastic_launch(launch_config, sys.executable)("-P", "-m", "shardwise.train.worker", ...)

    Takes the launcher's sys.path (as a spawned worker would inherit it), trains, and leaves its
    summary in FOLDER, since a command returns nothing through the agent. `@record` writes an
    exception to this worker's error file (TORCHELASTIC_ERROR_FILE) for the launcher to report.
    """
    config_json, folder = sys.argv[1:]
    # Never train on, unsupervised, after the launcher is killed (SIGKILL leaves it no say).
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    die_with_parent(int(launcher) if launcher else None)
    sys.path[:] = json.loads(Path(folder, SYS_PATH_FILE).read_text(encoding="utf-8"))
    # For the launcher's abort at a second Ctrl-C: each worker leads its own process group.
    pid_file = Path(folder, PID_FILE_GLOB.replace("*", str(os.getpid())))
    pid_file.touch()
    try:
        if supervises(TrainConfig.model_validate_json(config_json)):  # it runs in our group
            sys.exit(supervise([sys.executable, *sys.orig_argv[1:]]))
        summary = run_worker(config_json, folder)
    except Preempted as stop:
        saved = {"step": stop.step, "checkpoint": str(stop.checkpoint), "signal": stop.signal_name}
        write_record(Path(folder), PREEMPTED_FILE, saved)
        return  # a clean exit: preemption is no failure, and must not cost a restart
    finally:
        pid_file.unlink(missing_ok=True)
    write_rank_summary(Path(folder), json.dumps(summary, default=json_value))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # a second Ctrl-C sent to this worker itself: abort, quietly
        sys.exit(130)
    except Exception as exc:
        if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
            raise
        # Recorded in the error file, which the launcher prints once: not here a second time.
        # The note tells a restarted group which rank raised what.
        write_record(Path(sys.argv[2]), RAISED_FILE, {"message": first_line(exc, with_type=True)})
        sys.exit(1)
