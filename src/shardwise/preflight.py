"""Catch a user's mistakes in the launching process, before a worker starts or a file is written.

plan = preflight(config)   # raises ShardwiseError with a one-line message, or returns the plan
print(plan.describe())     # what --dry-run prints: the layout and the cut the workers train

Everything it builds comes from train/build.py, the builder the workers use.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from shardwise.checkpoint import find_checkpoint
from shardwise.config import TrainConfig
from shardwise.config.parallelism import parallelism_from
from shardwise.config.train_config import DEFAULT_BATCH_SIZE
from shardwise.data.prepare import PreparedCorpus
from shardwise.distributed import resolve_device
from shardwise.errors import ShardwiseError
from shardwise.memory.budget import kept_budget
from shardwise.memory.measure import hand_back_large_frees
from shardwise.memory.predict import MemoryPrediction
from shardwise.models import check_model_spec
from shardwise.models.contract import ModelContract
from shardwise.parallel.layer_split import LayerSplit
from shardwise.parallel.mesh import Layout
from shardwise.parallel.parallelism import Parallelism
from shardwise.partition import PipelineCut
from shardwise.precision import Precision
from shardwise.run_dir import check_run_dir, resolve_run_dir
from shardwise.stores import check_port_free
from shardwise.techniques import Beside, processes_beside
from shardwise.techniques import freeing_within_a_step as frees_within
from shardwise.train.build import (
    build_sampler,
    load_corpus,
    pipeline_cut,
    seeded_model,
    sequence_lengths,
    tensor_parallel_split,
    user_model_call,
    with_step_budget,
)


def default_nproc(config: TrainConfig) -> int:
    """Every GPU on CUDA; on CPU the ranks a given layout needs, else 2 processes."""
    if config.nproc is not None:
        return config.nproc
    if resolve_device(config.device).type == "cuda":
        return torch.cuda.device_count()
    if config.dp is not None or config.model_parallel > 1:
        needed = Layout(dp=config.dp or 1, pp=config.pp, tp=config.tp).world_size
        return max(1, needed // config.nnodes)
    return 2


@dataclass(frozen=True)
class RunPlan:
    """What a run will be, known before any worker starts: what `--dry-run` prints.

    plan = shardwise.plan(TrainConfig(pp=2))
    plan.layout.pp, plan.cuts, print(plan.describe())
    """

    nproc: int  # workers on this node
    nnodes: int
    layout: Layout
    stages: PipelineCut | None  # the pipeline cut and its predictions; None for one stage
    corpus: PreparedCorpus = field(repr=False)
    beside: tuple[Beside, ...] = ()  # processes started beside the workers (parameter servers)
    budget: str = ""  # what --max-tokens or --epochs comes to, when given
    contract: ModelContract | None = None  # how a user's model is called (None: a built-in)
    split: LayerSplit | None = None  # what --tp splits; None without it
    config: TrainConfig | None = field(default=None, repr=False)  # as the workers get it
    parallelism: Parallelism | None = None  # each technique the workers apply, and with what
    memory: MemoryPrediction | None = None  # each rank's predicted peak, by part

    @property
    def processes(self) -> int:
        """Processes this node starts: its workers and those the techniques start beside them."""
        return self.nproc + sum(other.count for other in self.beside)

    @property
    def cuts(self) -> list[str]:
        return self.stages.cuts if self.stages else []

    def describe(self) -> str:
        """What the run will do: model, data and steps, batches, schedule, layout, cut, run dir.

        Step times are not predicted here: the cut planner's profile ranks the stages against
        each other (its shares), but its absolute times were 12-22x off a measured step.
        """
        lines = [*self._what_and_how_long()]
        tp = self.layout.tp
        if self.parallelism is not None:
            lines += self.parallelism.describe().splitlines()
        lines.append(f"ranks: {self.nproc} per node on {self.nnodes} node(s)")
        lines += [beside.line() for beside in self.beside]
        if self.budget:
            lines.append(self.budget)
        if self.contract is not None:
            lines.append(self.contract.describe())
        if self.stages is not None:
            lines.append(self.stages.describe())
        elif self.split is not None:
            lines.append(
                f"one stage: every rank holds the model with its large layers split {tp} ways:"
            )
        elif self.layout.shard == 1:
            lines.append("one stage: every rank holds the whole model")
        else:  # the sharding line above says how the state is spread
            lines.append("one stage: every rank runs the whole model, its state sharded")
        if self.split is not None:
            lines.append(self.split.describe())
        if self.memory is not None:
            lines += self.memory.describe().splitlines()
        if self.config is not None:
            lines.append(f"run dir: {self.config.run_dir or resolve_run_dir(self.config)}")
        return "\n".join(lines)

    def _what_and_how_long(self) -> list[str]:
        config = self.config
        if config is None:
            return []
        model = seeded_model(config, self.corpus.vocab_size)
        params = sum(p.numel() for p in model.parameters())
        if config.batching == "tokens":
            rank = f"{config.tokens_per_batch:,} token slots"
            slots = config.tokens_per_batch * self.layout.data_ranks * config.grad_accum
            whole = f"{slots:,} token slots"
        else:
            batch = config.batch_size or DEFAULT_BATCH_SIZE
            rank = f"{batch} sequences of up to {config.max_len} tokens"
            whole = f"{batch * self.layout.data_ranks * config.grad_accum} sequences"
        accum = f" x {config.grad_accum} accumulated" if config.grad_accum > 1 else ""
        low = config.lr * config.min_lr_ratio
        return [
            f"model: {config.model}, {params:,} parameters; data: {config.data or 'embedded'} "
            f"({self.corpus.vocab_size} token ids)",
            f"steps: {config.max_steps}; batch: {rank} a rank{accum}, {whole} a step in all",
            f"learning rate: {config.lr:g} peak after {config.warmup_steps} warmup steps, cosine "
            f"to {low:g} at step {config.max_steps}",
        ]


def preflight(config: TrainConfig) -> RunPlan:
    """Check devices, model, data, batches, cut, resume path, run dir and port; the run's plan."""
    nproc = default_nproc(config)
    device = resolve_device(config.device, nproc)
    beside = processes_beside(config)  # e.g. parameter servers, on every node
    processes = nproc + sum(other.count for other in beside)  # on this node
    crowded = None
    if device.type == "cpu":
        crowded = check_cores(processes, config.nproc is None)
    layout = config.layout(nproc * config.nnodes)
    Precision(config.precision, device)  # refuses fp16 without a GPU, before any worker
    check_model_spec(config.model)
    corpus = load_corpus(config)
    contract = user_model_call(config, corpus)
    build_sampler(config, sequence_lengths(corpus), layout.data_ranks, rank=0)
    stages = pipeline_cut(config, corpus)
    split = tensor_parallel_split(config, corpus.vocab_size, contract)
    if config.resume is not None:
        find_checkpoint(config.resume)
    check_run_dir(config, config.run_dir or resolve_run_dir(config))
    if config.nnodes == 1 and config.rdzv_endpoint:
        check_port_free(config.rdzv_endpoint)
    planned = with_step_budget(config, corpus, nproc * config.nnodes)  # once: it plans the batches
    if device.type == "cpu" and (
        processes > 1 or config.nnodes > 1 or frees_within(config, layout)
    ):
        # This process trains none of it (or would fix it anyway): large allocations as fresh
        # mappings let the profile count the pages a kernel writes (memory/activations.py).
        hand_back_large_frees()
    budget = _budget(config, planned.max_steps)
    # Refused here, in one line, when a rank would not fit: before any worker starts.
    memory = kept_budget(
        planned, corpus, layout, stages and stages.cuts, device, nproc, check=_device_check(device)
    )
    if crowded:  # after the checks: a run that fails on them ends on its error line alone
        print(f"shardwise: warning: {crowded}", file=sys.stderr, flush=True)
    parallelism = parallelism_from(config, layout)
    if stages is not None:
        parallelism = parallelism.with_cuts(stages.cuts)
    return RunPlan(
        nproc,
        config.nnodes,
        layout,
        stages,
        corpus,
        beside,
        budget,
        contract,
        split,
        planned,
        parallelism,
        memory,
    )


def _device_check(device: torch.device) -> Callable[[TrainConfig], None]:
    """What a config must pass on `device` beyond its own checks (for the memory budget's
    alternatives, as for the run itself above)."""

    def check(config: TrainConfig) -> None:
        Precision(config.precision, device)

    return check


# Past this many processes per core a CPU job spends its time switching between them (and
# holds a process's baseline memory per rank, ~0.4 GB each): refused rather than crawled.
MAX_RANKS_PER_CORE = 4


def check_cores(processes: int, derived: bool) -> str | None:
    """More processes than this process's cores: a warning to print; far more: refused.

        check_cores(16, derived=False)   # on 2 cores: ShardwiseError naming --nproc 2
        check_cores(3, derived=False)    # on 2 cores: '3 processes on 2 CPU core(s) ...'

    Each rank gets its share of the cores (distributed.init_distributed), so oversubscribed
    ranks do not go faster together, and every rank adds its batch to the global one.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    if processes <= cores:
        return None
    why = "the layout needs them" if derived else f"--nproc {processes}"
    line = (
        f"{processes} processes on {cores} CPU core(s) ({why}): each rank gets a share of a "
        f"core, so the run is no faster than on {cores} and each rank still adds its batch to "
        "the global one"
    )
    if processes > MAX_RANKS_PER_CORE * cores:
        raise ShardwiseError(
            f"{line}; use --nproc {cores} or fewer on this machine (more than "
            f"{MAX_RANKS_PER_CORE} per core is refused), or run on more cores or nodes"
        )
    return line


def _budget(config: TrainConfig, steps: int) -> str:
    """What --max-tokens or --epochs comes to (`steps`, as planned), for --dry-run."""
    if config.max_tokens is None and config.epochs is None:
        return ""
    given = (
        f"--max-tokens {config.max_tokens}" if config.max_tokens else f"--epochs {config.epochs:g}"
    )
    return f"budget: {given} = {steps} optimizer steps (the learning-rate schedule spans them)"
