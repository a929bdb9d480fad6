"""SLURM's environment into settings, so `shardwise train` in an `srun` step needs no flags.

    # in an sbatch script: one `shardwise train` per node, each starting that node's workers
    srun --ntasks-per-node=1 shardwise train --data corpus.txt

Inside an `srun` step (SLURM_STEP_ID set) this module reads the step's node count, this node's
place in it, the node list and the GPUs on the node, and turns them into `nnodes`,
`node_rank`, `rdzv_endpoint` (the step's first node, at `rendezvous_port(job id)`) and `nproc`.
Anything the user set — a flag or a key of the --config file — wins over SLURM's value.

One task per node is the supported shape: each node's elastic agent starts, watches and
restarts its own workers, which a task per GPU (srun's ranks used directly as workers) would
bypass; such a step is refused with a message that says to use `--ntasks-per-node=1`.
Outside a step (in the batch script itself) nothing is taken: only one process runs there.
"""

from __future__ import annotations

import itertools
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shardwise.config.files import read_toml
from shardwise.errors import ShardwiseError

# Rendezvous ports are 20000 + job id % 10000: every node of a job computes the same one, and
# the range stays below Linux's ephemeral ports (32768 and up), which outgoing connections take.
RDZV_PORT_BASE = 20000
RDZV_PORT_SPAN = 10000
# One bracketed range list in a hostlist, e.g. "[01-04,07]".
_BRACKET = re.compile(r"\[([^\[\]]*)\]")
# A numeric range inside brackets: "7" or "01-04".
_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def expand_hostlist(hostlist: str) -> list[str]:
    """Every host named by a SLURM hostlist, in order (what `scontrol show hostnames` prints).

    >>> expand_hostlist("node[01-03,07],gpu[8-10]")
    ['node01', 'node02', 'node03', 'node07', 'gpu8', 'gpu9', 'gpu10']

    Zero padding follows the range's first number; several brackets in one name multiply
    (`a[1-2]b[3-4]` is a1b3 a1b4 a2b3 a2b4), as in SLURM itself.
    """
    hosts: list[str] = []
    for name in _split_top_level(hostlist):
        hosts.extend(_expand_name(name, hostlist))
    return hosts


def rendezvous_port(job_id: int) -> int:
    """The rendezvous port every node of SLURM job `job_id` derives alike.

    >>> rendezvous_port(12345)
    22345
    """
    return RDZV_PORT_BASE + job_id % RDZV_PORT_SPAN


def slurm_settings(environ: Mapping[str, str]) -> dict[str, Any]:
    """The settings an `srun` step implies for this node; empty outside a step.

    >>> slurm_settings({"SLURM_STEP_ID": "0", "SLURM_JOB_ID": "7", "SLURM_NNODES": "2",
    ...                 "SLURM_NODEID": "1", "SLURM_STEP_NODELIST": "n[1-2]"})
    {'nnodes': 2, 'node_rank': 1, 'rdzv_endpoint': 'n1:20007'}
    """
    # A torchrun started under srun makes its own workers (RANK set): they are not nodes.
    if "SLURM_STEP_ID" not in environ or "RANK" in environ:
        return {}
    nnodes = _first_int(environ, "SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
    nnodes = nnodes or 1
    _refuse_task_per_gpu(environ, nnodes)
    settings: dict[str, Any] = {}
    if nnodes > 1:  # one node needs no rendezvous of its own: the default free port does
        nodelist = _first(environ, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
        job_id = _first_int(environ, "SLURM_JOB_ID", "SLURM_JOBID")
        if not nodelist or job_id is None:
            raise ShardwiseError(
                "SLURM step without SLURM_STEP_NODELIST or SLURM_JOB_ID; "
                "pass --nnodes, --node-rank and --rdzv-endpoint HOST:PORT yourself"
            )
        settings["nnodes"] = nnodes
        settings["node_rank"] = _first_int(environ, "SLURM_NODEID") or 0
        first_host = expand_hostlist(nodelist)[0]
        settings["rdzv_endpoint"] = f"{first_host}:{rendezvous_port(job_id)}"
    gpus = _gpus_on_node(environ)
    if gpus:
        settings["nproc"] = gpus
    return settings


def apply_slurm(
    environ: Mapping[str, str], overrides: dict[str, Any], config_file: Path | None = None
) -> dict[str, Any]:
    """`overrides` (the user's flags) plus what SLURM implies for keys the user did not set.

        overrides = apply_slurm(os.environ, overrides, args.config)

    Keys given as flags or in `config_file` win, and a node count of the user's other than
    SLURM's drops SLURM's node rank and rendezvous too. One line on stderr says what was taken.
    """
    settings = slurm_settings(environ)
    if not settings:  # not in a step, or one node without GPUs named: nothing to say
        return overrides
    given = {**(read_toml(config_file) if config_file is not None else {}), **overrides}
    taken = {key: value for key, value in settings.items() if key not in given}
    if given.get("nnodes", settings.get("nnodes")) != settings.get("nnodes"):
        # The user's own node count: this node's place among SLURM's nodes would not fit it.
        taken = {key: value for key, value in taken.items() if key == "nproc"}
    unseen = None
    if "nproc" in taken and (given.get("device") == "cpu" or not _cuda_visible()):
        # GPUs SLURM allotted that torch cannot use: a worker count for them would mislead.
        unseen = taken.pop("nproc")
    print(_describe(taken, unseen), file=sys.stderr, flush=True)
    return {**taken, **overrides}


def _cuda_visible() -> bool:
    import torch  # here: the CLI's --help and SLURM parsing stay free of it otherwise

    return torch.cuda.is_available()


def _describe(taken: Mapping[str, Any], unseen: int | None = None) -> str:
    """`SLURM: 4 nodes, this is node 2, rendezvous at node01:29517, 4 GPUs`, of what was taken.

    `unseen`: GPUs SLURM names that this run will not use (none visible, or --device cpu).
    """
    parts = []
    if "nnodes" in taken:
        parts.append(f"{taken['nnodes']} nodes")
    if "node_rank" in taken:
        parts.append(f"this is node {taken['node_rank']}")
    if "rdzv_endpoint" in taken:
        parts.append(f"rendezvous at {taken['rdzv_endpoint']}")
    if "nproc" in taken:
        parts.append(f"{taken['nproc']} GPUs, one worker each")
    if unseen is not None:
        parts.append(f"{unseen} GPUs named but none used here (workers as on CPU)")
    return "SLURM: " + (", ".join(parts) if parts else "nothing taken, every value set by the user")


def _refuse_task_per_gpu(environ: Mapping[str, str], nnodes: int) -> None:
    tasks = _first_int(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    if tasks is not None and tasks > nnodes:
        raise ShardwiseError(
            f"SLURM step runs {tasks} tasks on {nnodes} node(s), but shardwise starts each "
            "node's workers itself; run one task per node: srun --ntasks-per-node=1 shardwise train"
        )


def _gpus_on_node(environ: Mapping[str, str]) -> int | None:
    """GPUs SLURM gave this node: SLURM_GPUS_ON_NODE, else the count of its GPU index list."""
    count = _first_int(environ, "SLURM_GPUS_ON_NODE")
    if count is not None:
        return count
    indices = _first(environ, "SLURM_STEP_GPUS", "SLURM_JOB_GPUS")
    return len(indices.split(",")) if indices else None


def _first(environ: Mapping[str, str], *names: str) -> str | None:
    return next((environ[name] for name in names if environ.get(name)), None)


def _first_int(environ: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        text = environ.get(name, "").strip()
        if text:
            if not text.isdigit():
                raise ShardwiseError(f"{name}={text!r} is not a whole number; unset or fix it")
            return int(text)
    return None


def _split_top_level(hostlist: str) -> list[str]:
    """Split at commas outside brackets: 'a[1,3],b' -> ['a[1,3]', 'b']."""
    names, depth, start = [], 0, 0
    for index, char in enumerate(hostlist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            names.append(hostlist[start:index])
            start = index + 1
    names.append(hostlist[start:])
    return [name.strip() for name in names if name.strip()]


def _expand_name(name: str, hostlist: str) -> list[str]:
    """One hostname pattern, e.g. 'rack[1-2]n[01-02]', into its hosts."""
    pieces = _BRACKET.split(name)  # text, range list, text, range list, ..., text
    if "[" in "".join(pieces[0::2]) or "]" in "".join(pieces[0::2]):
        raise _invalid(hostlist, name)
    choices = [
        [text] if i % 2 == 0 else _expand_ranges(text, hostlist) for i, text in enumerate(pieces)
    ]
    return ["".join(parts) for parts in itertools.product(*choices)]


def _expand_ranges(ranges: str, hostlist: str) -> list[str]:
    """'01-03,7' -> ['01', '02', '03', '7']; the width of each range's first number is kept."""
    numbers: list[str] = []
    for part in ranges.split(","):
        match = _RANGE.fullmatch(part.strip())
        if not match:
            raise _invalid(hostlist, part)
        low, high = match.group(1), match.group(2) or match.group(1)
        if int(high) < int(low):
            raise _invalid(hostlist, part)
        numbers.extend(str(n).zfill(len(low)) for n in range(int(low), int(high) + 1))
    return numbers


def _invalid(hostlist: str, part: str) -> ShardwiseError:
    return ShardwiseError(
        f"SLURM node list {hostlist!r}: cannot read {part!r}; "
        "pass --rdzv-endpoint HOST:PORT (the first node's address) instead"
    )
