"""Tensor split: each large layer's weights divided over `--tp` ranks (parallel/tensor_parallel.py).

    >>> TENSOR_SPLIT.settings
    ()

The degree is the layout's (`--tp`), and which layers split is found on the model itself, so
the technique has no settings of its own: it declares its entry and its cost.
"""

from __future__ import annotations

from typing import Any

from shardwise.techniques.base import Cost, Footprint, Technique


def entry(config: Any, layout: Any) -> Any:
    if layout.tp == 1:
        return None
    from shardwise.parallel.parallelism import TensorSplit

    return TensorSplit()


def cost(split: Any, footprint: Footprint) -> Cost:
    """The split layers' state divides by tp (counted as all of it: an upper bound on the
    saving, since embeddings and norms may stay whole); so do the activations saved between a
    column-wise layer and its row-wise reader (the profile's `split_share` of them)."""
    tp = footprint.layout.tp
    parts = ("parameters", "gradients", "optimizer")
    memory = {part: -(footprint.parts.get(part, 0) * (tp - 1) // tp) for part in parts}
    inside = footprint.parts.get("activations", 0) * footprint.split_share
    memory["activations"] = -int(inside * (tp - 1) / tp)
    return Cost(memory=memory)


def warm(split: Any, layout: Any) -> None:
    """DTensor's first steps, on a toy split as the run's layers are (parallel/)."""
    from shardwise.parallel.tensor_parallel import warm_up

    warm_up(layout)


TENSOR_SPLIT = Technique(
    name="tensor", title="Tensor split (--tp 2 or more)", entry=entry, cost=cost, warm=warm
)
