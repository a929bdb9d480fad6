"""How much memory a run may use, and the one line that refuses a run predicted over it.

    budget = memory_budget(config, device, nproc)    # --memory-budget, or what the machine has
    over = over_budget(prediction, budget, nproc)    # None when it fits
    if over: raise ShardwiseError(refusal(over, budget, alternatives(...)))

`--memory-budget` is what each rank may use. Without it a GPU rank may use its device's memory,
and the ranks on one CPU machine share what its cgroup allows (cgroup v2 memory.max, v1
memory.limit_in_bytes, the tightest of the process's cgroup and its parents), else MemTotal:
their predicted peaks together, plus what the launcher itself holds while they run, must fit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from shardwise.config import TrainConfig
from shardwise.data.prepare import PreparedCorpus
from shardwise.errors import ShardwiseError
from shardwise.memory.alternatives import changes_that_fit
from shardwise.memory.measure import release_freed_memory, resident_bytes
from shardwise.memory.predict import MemoryPrediction, MemoryPredictor
from shardwise.memory.sizes import format_size
from shardwise.optim import warm_optimizer
from shardwise.parallel.mesh import Layout

PROC = Path("/proc")
# A cgroup limit this large is "no limit" (v1 writes 2**63 rounded down to a page).
_UNLIMITED = 2**60


def kept_budget(
    config: TrainConfig,
    corpus: PreparedCorpus,
    layout: Layout,
    cuts: Sequence[str] | None,
    device: torch.device,
    nproc: int,
    check: Callable[[TrainConfig], None] = lambda config: None,
) -> MemoryPrediction:
    """`config`'s prediction over `layout`, refused in one line (ShardwiseError) when it does
    not fit its budget, naming the changes that do (`check`: the device checks a changed
    config must pass too). A CPU rank's baseline is this process's resident memory: the
    launcher, like a worker, has torch, the corpus and the data plan loaded; a GPU rank's is
    what its device holds at the start, nothing the prediction does not count itself. On CPU
    the launcher first takes the optimizer's step on a toy, as each rank does before its
    baseline: a process's first AdamW imports torch's compiler stack (25-70 MiB, whatever the
    model), which a rank's baseline holds."""
    if device.type == "cpu":
        warm_optimizer(config, device)
    release_freed_memory()
    launcher = resident_bytes()
    predictor = MemoryPredictor(config, corpus, launcher if device.type == "cpu" else 0)
    prediction = predictor.predict(config, layout, cuts)
    budget = memory_budget(config.memory_budget, device, nproc, launcher=launcher)
    over = over_budget(prediction, budget, nproc)
    if over is None:
        fits = f"{budget.describe()}; fits, at {format_size(load(prediction, budget, nproc))}"
        return dataclasses.replace(prediction, budget=fits)

    def fits(candidate: MemoryPrediction) -> bool:
        return over_budget(candidate, budget, nproc) is None

    found = changes_that_fit(predictor, config, layout.world_size, fits, check)
    shown = [(fit.flags, load(fit.prediction, budget, nproc)) for fit in found]
    raise ShardwiseError(refusal(over, budget, shown))


@dataclass(frozen=True)
class MemoryBudget:
    """`limit` bytes: each rank's own, or (`shared`) the ranks' of one machine together, less
    `launcher` bytes the launching process keeps while they run. `source` names where it came
    from, as the user would look it up."""

    limit: int
    source: str
    shared: bool = False
    launcher: int = 0

    def describe(self) -> str:
        if not self.shared:
            return f"{format_size(self.limit)} a rank ({self.source})"
        launcher = " and this launcher" if self.launcher else ""
        return f"{format_size(self.limit)} for this machine's ranks{launcher} ({self.source})"


@dataclass(frozen=True)
class OverBudget:
    """What does not fit: the predicted bytes set against the budget, and who they are."""

    predicted: int
    who: str  # "rank 0 (worst batch 16 x 1023 at step 37)", or a machine's ranks

    def describe(self, budget: MemoryBudget) -> str:
        return (
            f"predicted peak {format_size(self.predicted)} on {self.who} is over the memory "
            f"budget of {budget.describe()}"
        )


def memory_budget(
    given: int | None, device: torch.device, nproc: int, launcher: int = 0
) -> MemoryBudget:
    """`given` (--memory-budget, bytes a rank) or the device's: a GPU's memory, else this
    machine's for its `nproc` ranks, less `launcher` bytes when the launcher outlives them."""
    if given is not None:
        return MemoryBudget(given, f"--memory-budget {format_size(given)}")
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device.index or 0).total_memory
        return MemoryBudget(total, f"the GPU's {format_size(total)}")
    limit, source = machine_memory()
    return MemoryBudget(limit, source, shared=True, launcher=launcher if nproc > 1 else 0)


def machine_memory(proc: Path = PROC, root: Path = Path("/")) -> tuple[int, str]:
    """(bytes, where from): the tightest cgroup memory limit over this process, else MemTotal.

    `proc` and `root` are where /proc and the file system are read (tests give folders).
    """
    limits = sorted(cgroup_limits(proc, root))
    if limits:
        return limits[0]
    for line in (proc / "meminfo").read_text(encoding="ascii").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024, "MemTotal in /proc/meminfo"
    raise RuntimeError("/proc/meminfo has no MemTotal")


def cgroup_limits(proc: Path = PROC, root: Path = Path("/")) -> list[tuple[int, str]]:
    """Every memory limit set on this process's cgroups and their parents, v2 and v1."""
    try:
        groups = (proc / "self" / "cgroup").read_text(encoding="utf-8").splitlines()
        mounts = (proc / "self" / "mountinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    found = []
    for line in groups:
        number, controllers, path = line.split(":", 2)
        v2 = number == "0" and controllers == ""
        if not v2 and "memory" not in controllers.split(","):
            continue
        name = "memory.max" if v2 else "memory.limit_in_bytes"
        for mount_root, mount_point in _cgroup_mounts(mounts, v2):
            inside = (
                Path(path).relative_to(mount_root)
                if Path(path).is_relative_to(mount_root)
                else None
            )
            if inside is None:
                continue
            folder = root / mount_point.lstrip("/") / inside
            for level in [folder, *folder.parents]:
                if not level.is_relative_to(root / mount_point.lstrip("/")):
                    break
                limit = _read_limit(level / name)
                if limit is not None:
                    found.append((limit, f"cgroup {name} of {_shown(level, root)}"))
    return found


def _cgroup_mounts(mounts: Sequence[str], v2: bool) -> list[tuple[str, str]]:
    """(root in the hierarchy, mount point) of the cgroup2 mounts, or v1's memory ones."""
    found = []
    for line in mounts:
        fields = line.split()
        if "-" not in fields:
            continue
        dash = fields.index("-")
        kind, options = fields[dash + 1], fields[dash + 3] if len(fields) > dash + 3 else ""
        if (v2 and kind == "cgroup2") or (
            not v2 and kind == "cgroup" and "memory" in options.split(",")
        ):
            found.append((fields[3], fields[4]))
    return found


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except OSError:
        return None
    if text == "max" or not text.isdigit() or int(text) >= _UNLIMITED:
        return None
    return int(text)


def _shown(level: Path, root: Path) -> str:
    return "/" + str(level.relative_to(root))


def load(prediction: MemoryPrediction, budget: MemoryBudget, nproc: int) -> int:
    """What `budget` must hold of `prediction`: the costliest rank's peak, or (shared) the
    costliest machine's ranks together and the launcher."""
    if not budget.shared:
        return prediction.peak.total
    machines = _machines(prediction, nproc)
    return max(sum(rank.total for rank in machine) for machine in machines) + budget.launcher


def over_budget(
    prediction: MemoryPrediction, budget: MemoryBudget, nproc: int
) -> OverBudget | None:
    """Where `prediction` does not fit `budget` (the costliest rank, or machine), or None.

    A shared budget holds each machine's `nproc` consecutive ranks (the launcher numbers a
    machine's ranks together) and the launcher; a rank's own budget holds every rank.
    """
    total = load(prediction, budget, nproc)
    if total <= budget.limit:
        return None
    if not budget.shared:
        peak = prediction.peak
        shape, step = peak.batch.shape.describe(), peak.batch.step
        return OverBudget(total, f"rank {peak.rank} (worst batch {shape} at step {step})")
    heaviest = max(_machines(prediction, nproc), key=lambda m: sum(rank.total for rank in m))
    each = ", ".join(f"rank {rank.rank} {format_size(rank.total)}" for rank in heaviest)
    launcher = f" and this launcher's {format_size(budget.launcher)}" if budget.launcher else ""
    return OverBudget(total, f"this machine's {len(heaviest)} rank(s) together ({each}{launcher})")


def _machines(prediction: MemoryPrediction, nproc: int) -> list[tuple]:
    ranks = prediction.ranks
    return [ranks[start : start + nproc] for start in range(0, len(ranks), nproc)]


def refusal(over: OverBudget, budget: MemoryBudget, fits: Sequence[tuple[str, int]]) -> str:
    """The one line that refuses the run: what, over what, and the changes that fit.

    >>> refusal(OverBudget(5 * 2**30, "rank 0"), MemoryBudget(4 * 2**30, "--memory-budget"),
    ...         [("--shard full", 3 * 2**30)])  # doctest: +NORMALIZE_WHITESPACE
    'predicted peak 5.00 GiB on rank 0 is over the memory budget of 4.00 GiB a rank
    (--memory-budget); changes that fit on the same devices: --shard full (predicted 3.00 GiB);
    or raise --memory-budget'
    """
    line = over.describe(budget)
    if fits:
        shown = ", ".join(f"{change} (predicted {format_size(peak)})" for change, peak in fits)
        return f"{line}; changes that fit on the same devices: {shown}; or raise --memory-budget"
    return (
        f"{line}; no setting of a technique, nor another --pp or --tp on the same devices, "
        "fits: use more devices, smaller batches (--tokens-per-batch, --batch-size) or a "
        "smaller model, or raise --memory-budget"
    )
