"""The run directory: which one a run uses, whether it may write there, and one run at a time.

    run_dir = resolve_run_dir(config)
    check_run_dir(config, run_dir)            # preflight: one-line refusal of a live or used dir
    with hold_run_dir(config, run_dir):       # the run's owning process, for the whole run
        ...                                   # train; a second run on run_dir is refused

A run dir belongs to one run. While a run is alive its owning process holds an exclusive
`flock` on RUN_DIR/.shardwise.lock (which records its pid, host and start time), so a second
run there refuses and names it; the kernel drops the lock when that process dies, so a crashed
run never blocks the next one. A run dir that already holds a finished or crashed run is only
reused with --resume (that run continues) or --overwrite (the files shardwise wrote are deleted
first; anything else in the directory is left alone).

A run dir may come from elsewhere and hold symbolic links. Nothing is written through one: files
replaced whole go through safe_write.replace_file, a link where a file is written in place is
refused before training, and --overwrite unlinks links without touching what they point to.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from shardwise.checkpoint import check_no_links, is_checkpoint_dir
from shardwise.config import TrainConfig
from shardwise.errors import ShardwiseError
from shardwise.report.markdown import CONFIG_FILE, REPORT_FILE
from shardwise.report.metrics import METRICS_FILE, TENSORBOARD_DIR
from shardwise.report.summary import SUMMARY_FILE
from shardwise.signed_store import job_tag

LOCK_FILE = ".shardwise.lock"
CHECKPOINTS_DIR = "checkpoints"
WEIGHTS_FILE = "model.safetensors"
# What a run leaves behind that a new run would overwrite or mix with: the sign of a used dir.
USED_MARKERS = (CHECKPOINTS_DIR, METRICS_FILE, SUMMARY_FILE)
# Everything a run writes at the top of its run dir (train/worker.py, the trainer and report/):
# all that --overwrite deletes. The plot names are report/plots.py's; tests/test_run_dir.py
# checks this list against what a real run leaves, so a new output cannot be missed silently.
WRITTEN_BY_RUNS = (
    *USED_MARKERS,
    TENSORBOARD_DIR,
    REPORT_FILE,
    CONFIG_FILE,
    WEIGHTS_FILE,
    "loss.png",
    "throughput.png",
    "rank_step_time.png",
)
# What a run writes in place rather than replacing it whole: appended to (metrics.jsonl, the
# TensorBoard folder), locked, or written as it stands by train/worker.py (config.toml). A link
# at one of these names would be written through, so it is refused before training starts.
WRITTEN_IN_PLACE = (LOCK_FILE, METRICS_FILE, TENSORBOARD_DIR, CONFIG_FILE)
# A preflight probe elsewhere holds the lock for microseconds; a real owner holds it for the
# whole run. Retrying briefly keeps a probe from turning away the run it was checking for.
_ACQUIRE_TRIES = 10
_ACQUIRE_PAUSE_S = 0.05

# Run dirs this process holds, by resolved path: the torchrun path takes the lock before
# train() might (multi-node), and a second flock from the same process would refuse itself.
_held_here: dict[Path, int] = {}


def resolve_run_dir(config: TrainConfig) -> Path:
    """--run-dir, else the run being resumed, else a fresh runs/<timestamp>.

    resolve_run_dir(TrainConfig(run_dir=Path("runs/a")))        # runs/a
    resolve_run_dir(TrainConfig(resume=Path("runs/a/checkpoints/step_00000100")))  # runs/a
    """
    if config.run_dir is not None:
        return config.run_dir
    if config.resume is not None:
        resumed = config.resume
        return resumed.parent.parent if is_checkpoint_dir(resumed) else resumed
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def launcher_holds_lock(config: TrainConfig) -> bool:
    """Whether the launching process on this node is the one that holds the run dir.

    launcher_holds_lock(TrainConfig())                                        # True
    launcher_holds_lock(TrainConfig(nnodes=2, node_rank=1, rdzv_endpoint="h:1"))  # False

    One node: its launcher (or the single process). Several nodes: node rank 0's launcher; when
    the rendezvous chooses the node order (no --node-rank) nobody knows node 0 before the
    workers start, so global rank 0 takes the lock in train() instead.
    """
    return config.nnodes == 1 or config.node_rank == 0


def rank_zero_holds_lock(config: TrainConfig) -> bool:
    """Whether global rank 0's worker takes the lock: several nodes in rendezvous order."""
    return config.nnodes > 1 and config.node_rank is None


def check_run_dir(config: TrainConfig, run_dir: Path) -> None:
    """Refuse, in one line, a run dir that a live run holds, that holds a run already, or that
    holds a symbolic link where the run writes a file in place (WRITTEN_IN_PLACE).

    check_run_dir(config, Path("runs/a"))   # ShardwiseError if runs/a is in use or used

    Writes nothing. Only the side that will hold the lock looks at it: on a shared file system
    node 0 of this very job may already hold it while another node runs its preflight.
    """
    if config.elastic:  # a node arriving late finds its own job there; rank 0 checks as it locks
        return
    if launcher_holds_lock(config) or rank_zero_holds_lock(config):
        holder = _live_holder(run_dir)
        if holder is not None:
            raise ShardwiseError(_in_use_message(run_dir, holder))
    _check_reuse(config, run_dir)


@contextlib.contextmanager
def hold_run_dir(config: TrainConfig, run_dir: Path, restarted: bool = False) -> Iterator[Path]:
    """Own `run_dir` for the duration of the block: lock it, then apply --overwrite.

    with hold_run_dir(config, Path("runs/a")) as run_dir:
        train(...)

    Creates the directory. Refuses with the same one line as `check_run_dir` when another run
    won the race to it, or used it since the preflight. Re-entrant within one process.
    `restarted`: a worker group the elastic agent restarted holds it again; that is the same
    run, so its outputs are neither refused nor deleted (--overwrite applied at the start).
    """
    key = run_dir.resolve()
    if key in _held_here:
        yield run_dir
        return
    descriptor = _lock(run_dir)
    _held_here[key] = descriptor
    try:
        if not restarted:
            _check_reuse(config, run_dir)
            if config.overwrite:
                remove_run_outputs(run_dir)
        yield run_dir
    finally:
        del _held_here[key]
        os.close(descriptor)  # releases the flock; the file stays (see _lock)


def is_used(run_dir: Path) -> list[str]:
    """The outputs of an earlier run found in `run_dir` (empty: a fresh dir).

    is_used(Path("runs/a"))   # ["checkpoints/", "metrics.jsonl"]
    """
    found = []
    for name in USED_MARKERS:
        path = run_dir / name
        if path.is_dir():
            found.append(name + "/")
        elif path.exists() or path.is_symlink():
            found.append(name)
    return found


def remove_run_outputs(run_dir: Path) -> None:
    """Delete what shardwise writes in `run_dir` (WRITTEN_BY_RUNS); leave every other file.

    remove_run_outputs(Path("runs/a"))   # runs/a/notes.txt stays
    """
    for name in WRITTEN_BY_RUNS:
        path = run_dir / name
        # A link is removed as a link: whatever it points to is not the run dir's to delete.
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _check_reuse(config: TrainConfig, run_dir: Path) -> None:
    found = is_used(run_dir)
    continues_here = config.resume is not None and _is_within(config.resume, run_dir)
    if continues_here and config.overwrite:
        raise ShardwiseError(
            f"--overwrite with --resume {config.resume}: that checkpoint is inside --run-dir "
            f"{run_dir}, which --overwrite would delete; drop --overwrite to continue that run"
        )
    if found and not continues_here and not config.overwrite:
        raise ShardwiseError(
            f"--run-dir {run_dir} already holds a run ({', '.join(found)}); pass --resume "
            f"{run_dir} to continue it, --overwrite to replace it, or choose another --run-dir"
        )
    _refuse_links(config, run_dir)
    if not config.overwrite:  # --overwrite deletes checkpoints/ first, links and all
        check_no_links(run_dir)


def _refuse_links(config: TrainConfig, run_dir: Path) -> None:
    for name in WRITTEN_IN_PLACE:
        if name == TENSORBOARD_DIR and not config.tensorboard:
            continue  # never written: a link to the user's own log folder is theirs to keep
        if config.overwrite and name in WRITTEN_BY_RUNS:
            continue  # --overwrite unlinks it before the run writes anything
        if (run_dir / name).is_symlink():
            raise ShardwiseError(_link_message(run_dir / name))


def _link_message(path: Path) -> str:
    return (
        f"{path} is a symbolic link, and shardwise never writes through one in a run dir: "
        "delete the link (what it points to stays) or choose another --run-dir"
    )


def _is_within(path: Path, folder: Path) -> bool:
    resolved, root = path.resolve(), folder.resolve()
    return resolved == root or root in resolved.parents


def _lock(run_dir: Path) -> int:
    # The lock file is never deleted: a run that unlinked it on exit could leave a newcomer
    # holding a lock on the unlinked file while a third run locks a fresh one at the same path.
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        # O_NOFOLLOW: a link there would have us truncate and lock whatever it points to.
        descriptor = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as error:
        if (run_dir / LOCK_FILE).is_symlink():
            raise ShardwiseError(_link_message(run_dir / LOCK_FILE)) from None
        raise ShardwiseError(
            f"--run-dir {run_dir}: cannot write there ({error.strerror}); choose a writable "
            "--run-dir"
        ) from None
    for attempt in range(_ACQUIRE_TRIES):
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if attempt == _ACQUIRE_TRIES - 1:
                holder = _read_holder(descriptor)
                os.close(descriptor)
                raise ShardwiseError(_in_use_message(run_dir, holder)) from None
            time.sleep(_ACQUIRE_PAUSE_S)
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "job": job_tag(),
        "since": datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, json.dumps(record).encode(), 0)
    return descriptor


def holds_lease(run_dir: Path) -> bool:
    """Whether this job still holds `run_dir`: its lock is held, here by us or an ancestor.

        if not holds_lease(run_dir): stop without writing   # our launcher is gone

    A worker whose launcher died would otherwise write checkpoints beside a new run that took
    the freed lock. A holder on another machine is the job's node that took it (several nodes).
    """
    holder = _live_holder(run_dir)
    if holder is None:
        return False
    mine = job_tag()
    if mine is not None and holder.get("job") == mine:
        return True  # another node of this job (two "nodes" may share a machine)
    if holder.get("host") != socket.gethostname():
        return True
    return holder.get("pid") in _ancestry(os.getpid())


def _ancestry(pid: int) -> list[int]:
    """`pid` and its parents up to init, from /proc (only `pid` itself where there is none)."""
    chain = [pid]
    while chain[-1] > 1 and len(chain) < 64:
        try:
            stat = Path(f"/proc/{chain[-1]}/stat").read_text(encoding="ascii", errors="replace")
        except OSError:
            break
        chain.append(int(stat.rsplit(")", 1)[1].split()[1]))  # field 4, after the command name
    return chain


def _live_holder(run_dir: Path) -> dict | None:
    """Who holds `run_dir` now (None if nobody), by trying the lock and letting go at once."""
    try:
        descriptor = os.open(run_dir / LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError:
        return None  # unreadable or a link: _check_reuse and hold_run_dir refuse it
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_holder(descriptor)
    else:
        return None
    finally:
        os.close(descriptor)  # also releases the shared lock, if it was granted


def _read_holder(descriptor: int) -> dict:
    try:
        record = json.loads(os.pread(descriptor, 4096, 0))
    except (OSError, ValueError):
        return {}  # the holder is between locking and writing its record
    return record if isinstance(record, dict) else {}


def _in_use_message(run_dir: Path, holder: dict) -> str:
    who = (
        f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since "
        f"{holder.get('since', '?')}"
        if holder
        else "details not yet written"
    )
    return (
        f"--run-dir {run_dir} is in use by another run ({who}); wait for it to end or choose "
        "another --run-dir"
    )
