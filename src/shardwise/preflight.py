"""Catch a user's mistakes in the launching process, before a worker starts or a file is written.

nproc = preflight(config)   # raises ShardwiseError with a one-line message, or returns nproc
"""

from __future__ import annotations

from shardwise.checkpoint import find_checkpoint
from shardwise.config import TrainConfig
from shardwise.data.prepare import prepare_corpus
from shardwise.data.sampler import FixedBatchSampler
from shardwise.distributed import resolve_device
from shardwise.launch import check_port_free
from shardwise.models import check_model_spec
from shardwise.train.precision import Precision


def default_nproc(config: TrainConfig) -> int:
    """Every GPU when the run is on CUDA, else 2 CPU processes."""
    import torch

    if config.nproc is not None:
        return config.nproc
    if resolve_device(config.device).type == "cuda":
        return torch.cuda.device_count()
    return 2


def preflight(config: TrainConfig) -> int:
    """Check devices, model, data, batch layout, resume path and port; return local nproc."""
    nproc = default_nproc(config)
    device = resolve_device(config.device, nproc)
    Precision(config.precision, device)
    check_model_spec(config.model)
    corpus = prepare_corpus(
        config.data, config.max_len, config.long_sequences, config.eval_fraction, config.seed
    )
    FixedBatchSampler(
        [len(seq) for seq in corpus.train],
        config.batch_size,
        world_size=nproc * config.nnodes,
        grad_accum=config.grad_accum,
    )
    if config.resume is not None:
        find_checkpoint(config.resume)
    if config.nnodes == 1 and config.rdzv_endpoint:
        check_port_free(config.rdzv_endpoint)
    return nproc
