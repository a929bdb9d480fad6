"""Activation recompute: a model's blocks run their forward again in backward instead of keeping
what it saved, through PyTorch's composable checkpoint (torch.distributed._composable).

    model = apply_recompute(TransformerLM(num_layers=4), Recompute("full"))
    model(tokens).sum().backward()   # each block keeps its input; the rest is made again

The composable form hooks each block where it is, so parameter names, state dicts, checkpoints
and tensor-split plans are the same with and without recompute (`checkpoint_wrapper` would add
`_checkpoint_wrapped_module.` to every name). "selective" passes it PyTorch's selective
checkpoint contexts (`create_selective_checkpoint_contexts`): a block's matmul outputs are kept,
everything else between them (norms, activations, attention) is made again.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from shardwise.errors import ShardwiseError

# Their outputs are what selective recompute keeps: most of a block's compute, half its memory.
MATMULS = ("mm", "addmm", "bmm", "linear")
# What a recomputed block keeps of its saved activations, and spends again as a share of its
# forward + backward. On the built-in Transformer's block (dim 128, 8 x 256 tokens, one CPU
# thread) the matmul outputs were 54% of its saved bytes (tests/test_recompute.py checks
# 40-65%), and forward + backward took 1.12x with selective recompute, 1.41x with full.
SELECTIVE_KEPT = 0.5
SELECTIVE_AGAIN = 0.12
FULL_AGAIN = 1 / 3  # one more forward: a third of forward + backward, counted in FLOPs


@dataclass(frozen=True)
class Recompute:
    """Which blocks recompute, and how: "full" keeps only a block's input, "selective" its
    matmul outputs too; `every` k: only every k-th block (full).

    >>> Recompute("full", every=2).describe()
    'recompute: full, every 2nd block (blocks 1, 3, ...)'
    >>> every_2nd = Recompute("full", every=2)
    >>> every_2nd.recomputes("blocks.3"), every_2nd.recomputes("blocks.2")
    (True, False)
    """

    mode: str = "full"
    every: int = 1

    def describe(self) -> str:
        if self.mode == "selective":
            return "recompute: selective, every block (its matmul outputs kept)"
        if self.every == 1:
            return "recompute: full, every block"
        k = self.every
        return f"recompute: full, every {_ordinal(k)} block (blocks {k - 1}, {2 * k - 1}, ...)"

    def recomputes(self, block: str) -> bool:
        """Whether the block named `block` (`<list>.<index>`) recomputes: the k-th, 2k-th, ..."""
        return (int(block.rsplit(".", 1)[1]) + 1) % self.every == 0

    def held(self, per_block: int, boundary: int) -> tuple[int, int]:
        """Bytes a recomputed block keeps per batch between its forward and backward, and the
        bytes it makes again in backward (held for one block at a time), given what it would
        save without recompute (`per_block`) and its input (`boundary`).

        >>> Recompute("full").held(per_block=1000, boundary=100)
        (100, 1000)
        """
        if self.mode == "selective":  # its input, and its matmul outputs
            kept = min(per_block, boundary + int(SELECTIVE_KEPT * per_block))
            return kept, per_block - kept
        return boundary, per_block

    @property
    def again(self) -> float:
        """A recomputed block's extra compute, as a share of its forward + backward."""
        return SELECTIVE_AGAIN if self.mode == "selective" else FULL_AGAIN

    def piece_costs(self, costs: Sequence[Any]) -> list[Any]:
        """The pipeline planner's measured piece costs (partition.PieceCost) under recompute:
        a recomputed block holds `held`'s bytes per micro-batch in flight, makes the rest again
        once at a time (`recompute_bytes`), and takes `again` longer.

            plan = cut_stages(model, 2, tokens, adjust=Recompute("full").piece_costs)
        """
        adjusted = list(costs)
        for index, cost in enumerate(costs):
            if not (len(cost.names) == 1 and is_block(cost.names[0])):
                continue
            if not self.recomputes(cost.names[0]):
                continue
            boundary = costs[index - 1].output_bytes if index else 0
            kept, again = self.held(cost.activation_bytes, boundary)
            adjusted[index] = replace(
                cost,
                activation_bytes=kept,
                recompute_bytes=again,
                time_s=cost.time_s * (1 + self.again),
            )
        return adjusted


def is_block(name: str) -> bool:
    """A block is a named layer held in a list of layers: `<list>.<index>`.

    >>> is_block("blocks.3"), is_block("model.layers.0"), is_block("head"), is_block("0")
    (True, True, False, False)
    """
    parent, _, index = name.rpartition(".")
    return bool(parent) and index.isdigit()


def block_names(part: nn.Module) -> list[str]:
    """The blocks among `part`'s named layers (`layer_names()`, or a pipeline stage's own).

    block_names(TransformerLM(num_layers=2))   # ["blocks.0", "blocks.1"]
    """
    names = getattr(part, "layer_names", None)
    if callable(names):
        names = names()
    blocks = [name for name in names or () if is_block(name)]
    if not blocks:
        raise ShardwiseError(
            f"--recompute: {type(part).__name__} names no blocks to recompute; give it a "
            "layer_names() method listing its layers in forward order, the repeated ones held "
            "in an nn.ModuleList (blocks.0, blocks.1, ...), or drop --recompute"
        )
    return blocks


def apply_recompute(part: nn.Module, recompute: Recompute) -> nn.Module:
    """`part` with each of its blocks that `recompute` names recomputing in backward, in place.

        stage = apply_recompute(stage, Recompute("selective"))   # a pipeline stage: its blocks

    Names, parameters and state dicts stay as they were. Refused (ShardwiseError) for a model
    that names no blocks.
    """
    from torch.distributed._composable import checkpoint

    selective = recompute.mode == "selective"
    for name in block_names(part):
        if recompute.recomputes(name):
            contexts = functools.partial(_keep_matmuls, name) if selective else None
            checkpoint(part.get_submodule(name), use_reentrant=False, context_fn=contexts)
    return part


def _keep_matmuls(block: str) -> tuple[Any, Any]:
    """Selective checkpoint contexts for one forward of `block` (PyTorch wants a fresh pair per
    forward): its matmul outputs saved, the rest recomputed."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_MatmulPolicy(block))


class _MatmulPolicy:
    """Save matmul outputs; refuse a forward that then changes one in place.

    A kept output changed in place would be handed to the backward changed: PyTorch notices
    when the tensor itself is written, but not through `unsafe_split` views, which nn.GRU's
    CPU kernel writes through (its gradients then come out wrong, silently).
    """

    def __init__(self, block: str) -> None:
        self.block = block
        self.kept: set[int] = set()  # storages of the outputs saved in this forward

    def __call__(self, ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
        from torch.utils.checkpoint import CheckpointPolicy

        if op in _matmul_ops():
            output = getattr(ctx, "op_output", None)
            if isinstance(output, torch.Tensor) and not ctx.is_recompute:
                self.kept |= {_storage(output)} - {None}
            return CheckpointPolicy.MUST_SAVE
        if self.kept and op._schema.is_mutable and self.kept & _written(op, args, kwargs):
            raise ShardwiseError(
                f"--recompute selective: {self.block} changes a matmul output in place "
                f"({op.name()}), so it cannot be kept for the backward; use --recompute full"
            )
        return CheckpointPolicy.PREFER_RECOMPUTE


def _written(op: Any, args: tuple, kwargs: dict) -> set[int]:
    """Storages of the tensors `op` writes to."""
    written = set()
    for index, argument in enumerate(op._schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = args[index] if index < len(args) else kwargs.get(argument.name)
        if isinstance(value, torch.Tensor):
            written.add(_storage(value))
    return written - {None}


def _storage(tensor: torch.Tensor) -> int | None:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a tensor subclass without storage (DTensor)
        return None


@functools.cache
def _matmul_ops() -> frozenset:
    return frozenset(getattr(torch.ops.aten, name).default for name in MATMULS)


def _ordinal(k: int) -> str:
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"
