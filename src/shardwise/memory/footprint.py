"""One rank's memory before any technique's terms (a `Footprint`), then with every technique's.

    base = base_footprint(profile, layout.at(rank), parallelism, batch, baseline)
    parts = with_costs(base, parallelism)   # each registered technique in effect, in order

The base is the model's state as AdamW trains it (parameters, their gradients, two moments of
the parameters' dtype) and the activations the profile predicts for the rank's worst batch (in
the view of the device: on a host, the pages written, and the workspace a backward writes),
and on a host what its kernel caches keep of the batch shapes met by then and what its backward
holds besides (`scratch`: a recurrent kernel's own copies of its weights);
after the techniques' terms, AdamW's step adds its temporary where it exceeds what the backward
held (`optimizer_step`).
Under a pipeline the base is this rank's own stage scaled to a whole replica (pp stages like
its own): the pipeline's cost takes 1/pp of a replica, and so gives this stage's share, stage
by stage, rather than the mean stage. The techniques' own costs (techniques/) then say what
each changes; nothing here knows a technique by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shardwise.memory.activations import ActivationProfile, PieceActivations
from shardwise.memory.batches import BatchShape
from shardwise.parallel.microbatch import bucket_length, rows_for
from shardwise.parallel.parallelism import Parallelism
from shardwise.techniques import Footprint

# AdamW keeps exp_avg and exp_avg_sq, each the size of the parameters.
OPTIMIZER_COPIES = 2
# Every part a footprint starts with, in the order they are shown.
PARTS = (
    "parameters",
    "gradients",
    "optimizer",
    "activations",
    "workspace",
    "scratch",
    "buffers",
    "in_flight",
    "optimizer_step",
    "kernels",
    "baseline",
)
_TOKEN_BYTES = 8  # a stage's first input when it holds the embedding: int64 token ids


def model_shape(shape: BatchShape, parallelism: Parallelism, max_len: int | None) -> BatchShape:
    """The shape the model runs: a pipeline pads rows to whole micro-batches and the width to
    its length bucket (parallel/model.py `_shaped`)."""
    stages = parallelism.pipeline
    if stages is None or parallelism.layout.pp == 1:
        return shape
    return BatchShape(
        rows_for(shape.rows, stages.microbatches),
        bucket_length(shape.width, stages.length_bucket, max_len),
        shape.packed,
    )


def rank_pieces(
    profile: ActivationProfile, parallelism: Parallelism, pp_rank: int
) -> tuple[list[PieceActivations], bool]:
    """The pieces pipeline rank `pp_rank` holds, and whether it holds the model's last one
    (and so computes the loss). Without a pipeline: every piece, and the loss."""
    stages, pp = parallelism.pipeline, parallelism.layout.pp
    pieces = list(profile.pieces)
    if stages is None or pp == 1 or not pieces:
        return pieces, True
    firsts = [piece.names[0] for piece in pieces]
    starts = [0, *(firsts.index(cut) for cut in stages.cuts), len(pieces)]
    mine = stages.schedule.stages_of(pp_rank, pp)
    held = [piece for stage in mine for piece in pieces[starts[stage] : starts[stage + 1]]]
    return held, len(starts) - 2 in mine


def is_block(piece: PieceActivations) -> bool:
    """A block is one layer of a list of layers (`blocks.3`, `model.layers.0`), as the
    techniques that work block by block count them; not an embedding or a head.

    >>> from shardwise.memory.activations import Curve
    >>> [is_block(PieceActivations((name,), 0, Curve(), 0)) for name in ("blocks.3", "head")]
    [True, False]
    """
    parent, _, index = piece.names[0].rpartition(".")
    return len(piece.names) == 1 and bool(parent) and index.isdigit()


def base_footprint(
    profile: ActivationProfile,
    layout: Any,
    parallelism: Parallelism,
    shape: BatchShape,
    baseline: int,
    distinct: int = 0,
) -> Footprint:
    """Rank `layout.rank`'s footprint before any technique, for its worst batch `shape`, met
    after `distinct` batch shapes (what a host's kernel caches keep of them: `kernels`)."""
    held, last = rank_pieces(profile, parallelism, layout.pp_rank)
    staged = parallelism.pipeline is not None and parallelism.layout.pp > 1 and bool(held)
    params, activations = profile.param_bytes, profile.whole.bytes(shape)
    per_block, boundary = activations, _TOKEN_BYTES * shape.slots
    blocks = 1
    if held:
        saved = [piece.saved.bytes(shape) for piece in held]
        inputs = [_TOKEN_BYTES, *(piece.output_per_token for piece in profile.pieces)]
        first = profile.pieces.index(held[0])
        # The repeated blocks (the embedding and the head are not), with their inputs.
        repeated = [i for i, piece in enumerate(held) if is_block(piece)] or range(len(held))
        blocks = len(repeated)
        per_block = max(saved[i] for i in repeated)
        boundary = max(inputs[first + i] for i in repeated) * shape.slots
    # What a backward writes beyond the saved pages (a host's view of the profile: a fused
    # kernel's workspace), for one storage at a time: the largest this rank holds.
    workspace = profile.workspace.bytes(shape)
    if staged:  # this rank's stage: its pieces' state and saved tensors, the loss on the last
        params = sum(piece.param_bytes for piece in held)
        activations = sum(saved) + (profile.loss.bytes(shape) if last else 0)
        workspace = max(piece.workspace.bytes(shape) for piece in held)
    if workspace:  # the backward writing it holds its output's gradient and writes its input's
        workspace += 2 * boundary
    # What a backward holds besides on the host, whatever the batch (a recurrent kernel's own
    # copies of its weights): the whole call's, or the largest of this stage's pieces'.
    scratch = max((piece.scratch for piece in held), default=0) if staged else profile.scratch
    scale = parallelism.layout.pp if staged else 1
    parts = {
        "parameters": scale * params,
        "gradients": scale * params,
        "optimizer": scale * OPTIMIZER_COPIES * params,
        "activations": scale * activations,
        "workspace": scale * workspace,
        "scratch": scratch,
        "buffers": 0,
        "in_flight": 0,
        "kernels": profile.kernels.bytes(distinct),
        "baseline": baseline,
    }
    # What a tensor split divides: its share of the whole call, as of a stage's own.
    whole = profile.whole.bytes(shape)
    split = min(profile.split.bytes(shape) / whole, 1.0) if whole else 0.0
    return Footprint(parts, layout, per_block, blocks, boundary, split)


@dataclass(frozen=True)
class StepCost:
    """What the techniques in effect add to a step: compute (a share of one forward+backward)
    and bytes sent per rank."""

    flops_factor: float = 0.0
    bytes: int = 0


def with_costs(footprint: Footprint, parallelism: Parallelism) -> tuple[dict[str, int], StepCost]:
    """The footprint's parts after each registered technique in effect adds its cost, in the
    order they are registered (each sees the parts its predecessors left), and the step's
    extra compute and traffic they declare."""
    parts = dict(footprint.parts)
    flops, sent = 0.0, 0
    for technique, entry in parallelism.in_effect():
        if technique.cost is None:
            continue
        cost = technique.cost(entry, dataclasses.replace(footprint, parts=dict(parts)))
        for part, delta in cost.memory.items():
            parts[part] = parts.get(part, 0) + int(delta)
        flops, sent = flops + cost.step_flops_factor, sent + cost.step_bytes
    parts = {part: max(size, 0) for part, size in parts.items()}
    parts["optimizer_step"] = optimizer_step(parts)
    return parts, StepCost(flops, sent)


def optimizer_step(parts: Mapping[str, int]) -> int:
    """What AdamW's step adds beyond the backward's peak: its foreach kernels make one
    temporary the size of the parameters it steps on (half its two moments' bytes), once the
    backward has freed the activations and buffers, so only what exceeds those counts.

    >>> optimizer_step({"optimizer": 200, "activations": 30, "buffers": 20})
    50
    >>> optimizer_step({"optimizer": 200, "activations": 300})
    0
    """
    stepped = parts.get("optimizer", 0) // OPTIMIZER_COPIES
    gone = ("activations", "workspace", "scratch", "buffers", "in_flight")
    freed = sum(parts.get(part, 0) for part in gone)
    return max(0, stepped - freed)


def ordered(parts: Mapping[str, int]) -> dict[str, int]:
    """Parts in PARTS order, any a technique added after them."""
    known = {part: parts[part] for part in PARTS if part in parts}
    return known | {part: size for part, size in parts.items() if part not in known}
