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
    saving, since embeddings and norms may stay whole); activations inside them too."""
    tp = footprint.layout.tp
    parts = ("parameters", "gradients", "optimizer")
    return Cost(memory={part: -(footprint.parts.get(part, 0) * (tp - 1) // tp) for part in parts})


TENSOR_SPLIT = Technique(
    name="tensor", title="Tensor split (--tp 2 or more)", entry=entry, cost=cost
)
