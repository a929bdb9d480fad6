"""Activation recompute: blocks make their activations again in backward instead of keeping them.

    >>> [setting.name for setting in RECOMPUTE.settings]
    ['recompute', 'recompute_every']

The runtime is parallel/recompute.py; this declares the settings, the `Recompute` entry, the
apply step (after the tensor split, before sharding and the replicas' wrap, as torchtitan
checkpoints before FSDP) and what it costs a rank: fewer activations held, more compute.
A resume may turn it on or off: it changes what is kept, not what is computed.
"""

from __future__ import annotations

from typing import Any, Literal

from shardwise.techniques.base import Cost, Footprint, Setting, Technique


def _full(config: Any) -> bool:
    return config.recompute == "full"


def _mode(config: Any) -> str:
    default = " (the default)" if config.recompute == "none" else ""
    return f"--recompute {config.recompute}{default}"


SETTINGS = (
    Setting(
        "recompute",
        Literal["none", "full", "selective"],
        "none",
        "full recomputes each block's activations in backward instead of storing them; "
        "selective recomputes each block but keeps its matmul outputs (PyTorch's selective "
        "activation checkpointing).",
    ),
    Setting(
        "recompute_every",
        int,
        1,
        "--recompute full: recompute every k-th block only.",
        {"ge": 1},
        _full,
        _mode,
        "--recompute full's choice of blocks",
        "drop it, or add --recompute full",
    ),
)


def entry(config: Any, layout: Any) -> Any:
    """The run's `Recompute`, or None without --recompute."""
    if config.recompute == "none":
        return None
    from shardwise.parallel.recompute import Recompute

    every = config.recompute_every if config.recompute == "full" else 1
    return Recompute(config.recompute, every)


def apply(part: Any, recompute: Any, layout: Any) -> Any:
    from shardwise.parallel.recompute import apply_recompute

    return apply_recompute(part, recompute)


def cost(recompute: Any, footprint: Footprint) -> Cost:
    """Each recomputed block keeps its input (full; selective: and its matmul outputs) instead
    of its activations, and makes them again in backward, one block at a time; every k-th block
    only: k times fewer. Its extra compute is one more forward of those blocks (full)."""
    blocks = footprint.blocks
    recomputed = blocks if recompute.every == 1 else blocks // recompute.every
    if not recomputed:
        return Cost()
    per_block = footprint.activations_per_block
    kept, again = recompute.held(per_block, footprint.boundary_bytes)
    change = recomputed * (kept - per_block) + again
    return Cost(
        memory={"activations": change},
        step_flops_factor=recompute.again * recomputed / blocks,
    )


RECOMPUTE = Technique(
    name="recompute",
    title="Activation recompute",
    settings=SETTINGS,
    entry=entry,
    apply=apply,
    cost=cost,
    frees_within_a_step=True,
)
