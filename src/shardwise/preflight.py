"""Catch a user's mistakes in the launching process, before a worker starts or a file is written.

nproc = preflight(config)   # raises ShardwiseError with a one-line message, or returns nproc
"""

from __future__ import annotations

import numpy as np
import torch

from shardwise.checkpoint import find_checkpoint
from shardwise.config import TrainConfig
from shardwise.data.batch import collate
from shardwise.distributed import resolve_device
from shardwise.errors import ShardwiseError
from shardwise.launch import check_port_free
from shardwise.models import build_model, check_model_spec
from shardwise.parallel.mesh import Layout
from shardwise.parallel.stages import model_pieces, stage_starts
from shardwise.plan import plan_stages
from shardwise.run_dir import check_run_dir, resolve_run_dir
from shardwise.train.batching import build_sampler
from shardwise.train.precision import Precision
from shardwise.train.worker import load_corpus


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


def preflight(config: TrainConfig) -> int:
    """Check devices, model, data, batch layout, resume path, run dir and port; local nproc."""
    nproc = default_nproc(config)
    device = resolve_device(config.device, nproc)
    dp = config.layout(nproc * config.nnodes).dp
    Precision(config.precision, device)
    check_model_spec(config.model)
    corpus = load_corpus(config)
    build_sampler(config, np.array([len(seq) for seq in corpus.train]), dp, rank=0)
    if config.pp > 1:
        check_pipeline_split(config, corpus.vocab_size)
    if config.resume is not None:
        find_checkpoint(config.resume)
    check_run_dir(config, resolve_run_dir(config))
    if config.nnodes == 1 and config.rdzv_endpoint:
        check_port_free(config.rdzv_endpoint)
    return nproc


def check_pipeline_split(config: TrainConfig, vocab_size: int) -> None:
    """Enough cuttable pieces for --pp stages, and split points that name real cut places."""
    with torch.device("meta"):  # structure only: no memory, no initialisation cost
        model = build_model(config.model, vocab_size)
    pieces = model_pieces(model)
    if config.pp > len(pieces):
        raise ShardwiseError(
            f"--pp {config.pp}: model {config.model!r} has only {len(pieces)} pieces that can "
            f"start a stage ({', '.join(p.name for p in pieces)}); use --pp {len(pieces)} or less"
        )
    if config.split_points is not None:
        stage_starts(model, pieces, config.split_points, config.pp)


def dry_run(config: TrainConfig, nproc: int) -> str:
    """What `shardwise train --dry-run` prints: the layout and, with --pp, the planned cut."""
    layout = config.layout(nproc * config.nnodes)
    dp, pp, tp = layout.dp, layout.pp, layout.tp
    lines = [
        f"layout: {dp} data-parallel x {pp} pipeline x {tp} tensor-parallel = "
        f"{layout.world_size} ranks ({nproc} per node on {config.nnodes} node(s))"
    ]
    if pp == 1:
        return "\n".join([*lines, "one stage: every rank of a replica holds the whole model"])
    corpus = load_corpus(config)
    torch.manual_seed(config.seed)
    model = build_model(config.model, corpus.vocab_size)
    sample = collate(corpus.train[: config.batch_size], step_tokens=1).tokens
    plan = plan_stages(
        model,
        pp,
        sample,
        microbatches=config.microbatches,
        schedule=config.schedule,
        cuts=config.split_points,
    )
    return "\n".join([*lines, plan.describe()])
