"""Gradient compression for DDP through PyTorch's own communication hooks, with bytes counted.

    ddp = wrap_data_parallel(model, env, bucket_mb=options.bucket_mb)
    powersgd = register_compression(ddp, options, traffic)   # PowerSGD's memory, or None

bf16 and fp16 halve the bytes of each bucket; PowerSGD sends two low-rank factors per matrix
with error feedback. All three are PyTorch's hooks (`ddp_comm_hooks`), not ours, and like DDP
they *average* over the group, which is what our loss scaling expects (see parallel/model.py).
Without compression DDP's plain all-reduce is registered as PyTorch's `allreduce_hook`, which
its docs give as equal to DDP's built-in path, so that every bucket passes a hook. Each hook is
wrapped, never rewritten, by one that adds the bucket's payload to `traffic` (see traffic.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

from shardwise.errors import ShardwiseError
from shardwise.parallel.sync.options import SyncOptions
from shardwise.parallel.sync.powersgd_state import PowerSGDMemory
from shardwise.parallel.sync.traffic import SyncTraffic

Hook = Callable[[Any, dist.GradBucket], torch.futures.Future[torch.Tensor]]
# The width each default hook all-reduces a bucket in (None: the bucket's own dtype).
_DEFAULT_HOOKS: dict[str, tuple[Hook, int | None]] = {
    "none": (default_hooks.allreduce_hook, None),
    "fp16": (default_hooks.fp16_compress_hook, 2),
    "bf16": (default_hooks.bf16_compress_hook, 2),
}


def register_compression(
    ddp: DistributedDataParallel, options: SyncOptions, traffic: SyncTraffic
) -> PowerSGDMemory | None:
    """Register `options.grad_compression`'s hook on `ddp`, counting what it sends in `traffic`.

    PowerSGD's state comes back (to be checkpointed); the other hooks keep none.
    """
    if options.grad_compression == "powersgd":
        check_one_gloo_bucket(ddp, options)
        memory = PowerSGDMemory(ddp, options)
        ddp.register_comm_hook(memory.state, counting_powersgd(traffic, memory))
        return memory
    hook, width = _DEFAULT_HOOKS[options.grad_compression]
    try:
        ddp.register_comm_hook(None, counting(hook, traffic, width))
    except TypeError as exc:  # bf16: DDP checks the build: CUDA and NCCL (or XPU and XCCL)
        if options.grad_compression != "bf16":
            raise
        raise ShardwiseError(
            f"--grad-compression bf16: {exc} in this PyTorch; use --grad-compression fp16"
        ) from None
    return None


def counting(hook: Hook, traffic: SyncTraffic, width: int | None = None) -> Hook:
    """`hook`, adding each bucket's all-reduced bytes (`width` bytes an element) to `traffic`.

    ddp.register_comm_hook(None, counting(default_hooks.fp16_compress_hook, traffic, 2))
    """

    # functools.wraps keeps the name DDP checks (it refuses bf16_compress_hook without NCCL).
    @functools.wraps(hook)
    def counted(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        buffer = bucket.buffer()
        traffic.count(buffer.numel() * (width or buffer.element_size()))
        return hook(state, bucket)

    return counted


def check_one_gloo_bucket(ddp: DistributedDataParallel, options: SyncOptions) -> None:
    """Refuse PowerSGD over gloo with more than one bucket: PyTorch's hook then fails there."""
    if dist.get_backend(ddp.process_group) != "gloo":
        return
    grads = sum(p.numel() * p.element_size() for p in ddp.module.parameters() if p.requires_grad)
    if grads > options.bucket_mb * 2**20:
        need = -(-grads // 2**20)  # whole megabytes, rounded up
        raise ShardwiseError(
            f"--grad-compression powersgd on CPU (gloo): PyTorch's PowerSGD hook fails when the "
            f"gradients ({grads / 2**20:.1f} MB) span more than one --bucket-mb "
            f"{options.bucket_mb:g} bucket; use --bucket-mb {need} or --grad-compression fp16"
        )


def counting_powersgd(traffic: SyncTraffic, memory: PowerSGDMemory) -> Hook:
    """PyTorch's `powerSGD_hook`, adding each bucket's all-reduced bytes to `traffic`.

    ddp.register_comm_hook(memory.state, counting_powersgd(traffic, memory))

    In warm-up the hook all-reduces the whole bucket. After it, it all-reduces the bucket's
    uncompressed tensors, then P, then Q: the element count the state adds to its own
    `compression_stats()` for the bucket, each element in the bucket's dtype. Before it
    compresses a bucket, `memory` fits the state to the bucket's layout (see powersgd_state.py).
    """

    @functools.wraps(powerSGD_hook.powerSGD_hook)
    def counted(
        state: powerSGD_hook.PowerSGDState, bucket: dist.GradBucket
    ) -> torch.futures.Future[torch.Tensor]:
        buffer = bucket.buffer()
        if state.iter < state.start_powerSGD_iter:
            traffic.count(buffer.numel() * buffer.element_size())
            return powerSGD_hook.powerSGD_hook(state, bucket)
        memory.fit(bucket)
        before = state.compression_stats()[2]
        future = powerSGD_hook.powerSGD_hook(state, bucket)  # counts before it returns
        sent = state.compression_stats()[2] - before
        traffic.count(sent * buffer.element_size(), exchanges=3)
        return future

    return counted
