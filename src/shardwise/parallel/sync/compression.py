"""Gradient compression for DDP through PyTorch's own communication hooks.

    ddp = wrap_data_parallel(model, env, bucket_mb=options.bucket_mb)
    powersgd = register_compression(ddp, options)   # the PowerSGD state, or None

bf16 and fp16 halve the bytes of each bucket; PowerSGD sends two low-rank factors per matrix
with error feedback. All three are PyTorch's hooks (`ddp_comm_hooks`), not ours, and like DDP
they *average* over the group, which is what our loss scaling expects (see parallel/model.py).
"""

from __future__ import annotations

from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

from shardwise.errors import ShardwiseError
from shardwise.parallel.sync.options import SyncOptions


def register_compression(
    ddp: DistributedDataParallel, options: SyncOptions
) -> powerSGD_hook.PowerSGDState | None:
    """Register `options.grad_compression`'s hook on `ddp` ("none": DDP's own all-reduce)."""
    if options.grad_compression == "bf16":
        try:
            ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
        except TypeError as exc:  # DDP checks the build: CUDA and NCCL (or XPU and XCCL)
            raise ShardwiseError(
                f"--grad-compression bf16: {exc} in this PyTorch; use --grad-compression fp16"
            ) from None
    elif options.grad_compression == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif options.grad_compression == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=options.powersgd_rank,
            start_powerSGD_iter=options.powersgd_warmup_steps,
        )
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        return state
    return None
