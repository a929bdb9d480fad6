"""Sharded data parallel (`--shard`): the data ranks split one copy of the model's state.

    >>> [setting.name for setting in SHARDING.settings]
    ['shard', 'offload']

The work is parallel/sharding.py's (FSDP2); this declares the settings, the combinations that
cannot work, how sharding shapes the layout (`Layout.shard`: data ranks per copy of the state),
its entry, and what it saves a rank and costs it in traffic.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

from shardwise.errors import ShardwiseError
from shardwise.techniques.base import Cost, Footprint, Setting, Technique
from shardwise.techniques.sync import SETTINGS as SYNC_SETTINGS

PARTS = ("parameters", "gradients", "optimizer")
BUCKET_MB = next(setting.default for setting in SYNC_SETTINGS if setting.name == "bucket_mb")


def _sharded(config: Any) -> bool:
    return config.shard != "none"


SETTINGS = (
    Setting(
        "shard",
        Literal["none", "full", "grads", "hybrid"],
        "none",
        "Shard the model's state over the data ranks (FSDP2): full shards parameters, "
        "gradients and optimizer state (ZeRO-3); grads keeps parameters whole from forward "
        "to backward (ZeRO-2-like); hybrid shards inside a machine and replicates across "
        "machines (HSDP). Checkpoints reshard: a resume may change it.",
    ),
    Setting(
        "offload",
        bool,
        False,
        "Keep the sharded parameters, gradients and optimizer state in host memory (GPU only).",
        read_when=_sharded,
        ignored_by=lambda config: "--shard none",
        purpose="where sharded state lives",
        fix="drop it, or add --shard full",
    ),
)

# Settings of other techniques that a sharded model never reads, and why.
_REFUSED = {
    "--sync": ("sync", "allreduce", "its replicas step apart, and sharded state is one copy"),
    "--grad-compression": ("grad_compression", "none", "it compresses DDP's all-reduce"),
}


def check(config: Any) -> None:
    """Refuse what sharding cannot do (ValueError naming the flags and the fix)."""
    if not _sharded(config):
        return
    shard = f"--shard {config.shard}"
    for flag, (name, plain, why) in _REFUSED.items():
        value = getattr(config, name)
        if value != plain:
            raise ValueError(
                f"{shard} does not work with {flag} {value} ({why}): drop {flag} or --shard"
            )
    if config.bucket_mb != BUCKET_MB:
        raise ValueError(
            f"--bucket-mb {config.bucket_mb} has no effect with {shard} (it sizes DDP's "
            "all-reduce buckets; a sharded model reduce-scatters block by block): drop it"
        )
    if config.precision == "fp16":
        raise ValueError(
            f"{shard} does not work with --precision fp16 (each rank would see its own shard's "
            "overflows and skip steps alone); use --precision bf16"
        )
    if config.elastic:
        raise ValueError(
            f"{shard} does not work with --nnodes {config.min_nodes}:{config.nnodes} yet (a "
            "smaller world would change the shard degree mid-run): give one --nnodes"
        )
    if config.offload and config.device == "cpu":
        raise ValueError(
            "--offload moves sharded state from GPU to host memory; on --device cpu it is "
            "there already: drop --offload"
        )
    if config.shard == "hybrid":
        if config.nnodes == 1:
            raise ValueError(
                "--shard hybrid shards inside a machine and replicates across machines, but "
                "--nnodes is 1: use --shard full"
            )
        if config.tp > 1:
            raise ValueError(
                "--shard hybrid does not work with --tp yet (it would need a 3-D mesh): use "
                "--shard full or grads with --tp"
            )


def layout(config: Any, layout: Any) -> Any:
    """The layout with its shard degree: every data rank, or (hybrid) one machine's."""
    if not _sharded(config):
        return layout
    if config.shard != "hybrid":
        return replace(layout, shard=layout.dp)
    if layout.dp % config.nnodes:
        raise ShardwiseError(
            f"--shard hybrid shards over one machine's data ranks, but {layout.dp} data ranks "
            f"do not split evenly over --nnodes {config.nnodes}: give each machine a multiple "
            f"of --pp x --tp = {config.pp * config.tp} processes"
        )
    return replace(layout, shard=layout.dp // config.nnodes)


def entry(config: Any, layout: Any) -> Any:
    """The run's `Sharding`, or None with --shard none."""
    if not _sharded(config):
        return None
    from shardwise.parallel.sharding import Sharding

    return Sharding(config.shard, layout.shard, layout.replicas, config.offload, config.precision)


def apply(part: Any, sharding: Any, layout: Any) -> Any:
    """This rank's part with each block, then the rest, sharded (parallel/sharding.py)."""
    from shardwise.parallel.sharding import shard_model

    return shard_model(part, sharding, layout)


def cost(sharding: Any, footprint: Footprint) -> Cost:
    """Gradients and optimizer state divide by the shard degree, parameters too (not in grads
    mode, which keeps them whole from forward to backward); with --offload the shards leave the
    device altogether. A block's parameters are gathered whole, twice (the next block's
    prefetched), and in its backward its gradients whole and copied into the reduce-scatter's
    input, beyond what that block's saved activations free meanwhile: a block being this
    rank's parameters over its blocks, the mean block, which the largest (often the embedding
    or head) may exceed. A step all-gathers the parameters (again for the
    backward in full and hybrid modes) and reduce-scatters the gradients, each (n-1)/n of the
    whole per rank.

    >>> from shardwise.parallel.mesh import Layout
    >>> from shardwise.parallel.sharding import Sharding
    >>> parts = {"parameters": 800, "gradients": 800, "optimizer": 1600}
    >>> footprint = Footprint(parts, Layout(dp=2, shard=2), blocks=4)
    >>> full = cost(Sharding("full"), footprint)
    >>> full.memory, full.step_bytes
    ({'parameters': -400, 'gradients': -400, 'optimizer': -800, 'buffers': 800}, 1200)
    """
    n = footprint.layout.shard
    if n == 1:
        return Cost()
    parts = footprint.parts
    divided = ("gradients", "optimizer") if sharding.mode == "grads" else PARTS
    kept = 0 if sharding.offload else 1  # of n shards, the one on this rank's device
    memory = {part: -(parts.get(part, 0) * (n - kept) // n) for part in divided}
    parameters = parts.get("parameters", 0)
    # Two blocks gathered (this one and the next, prefetched; one where the model is one unit);
    # grads mode keeps every parameter whole instead. In a block's backward its gradients whole
    # and their copy in the reduce-scatter's input come too, while that block's own saved
    # activations are being freed: they add to the peak only as far as they exceed those.
    block = parameters // max(footprint.blocks, 1)
    gathered = 0 if sharding.mode == "grads" else min(footprint.blocks, 2) * block
    memory["buffers"] = gathered + max(0, 2 * block - footprint.activations_per_block)
    gathers = 1 if sharding.mode == "grads" else 2
    step_bytes = (gathers * parameters + parts.get("gradients", 0)) * (n - 1) // n
    return Cost(memory=memory, step_bytes=step_bytes)


def warm(sharding: Any, layout: Any) -> None:
    """FSDP2's first step, on a toy (parallel/sharding.py)."""
    from shardwise.parallel.sharding import warm_up

    warm_up(sharding, layout)


SHARDING = Technique(
    name="sharding",
    title="Sharded data parallel",
    settings=SETTINGS,
    check=check,
    entry=entry,
    layout=layout,
    apply=apply,
    cost=cost,
    warm=warm,
    frees_within_a_step=True,
)
