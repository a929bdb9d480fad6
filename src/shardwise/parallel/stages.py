"""Cut a language model into pipeline stages whose parameters keep the model's own names.

    stages = split_into_stages(model, cuts=["blocks.2"])   # stage 1 starts at blocks.2
    stages[1].state_dict().keys()   # "blocks.2.weight_ih_l0", ..., "head.1.bias": same as model's

A model is first turned into an ordered list of *pieces* (`model_pieces`), from the layers its
`layer_names()` lists (the built-ins': the embedding, with the position embedding for the
Transformer, each block, and the head). Every piece maps one tensor to one tensor, so any
contiguous run of pieces is a stage a pipeline can send a single activation out of. Because a
stage registers each module under its original dotted path, a stage's `state_dict()` and
`named_parameters()` use exactly the model's names: a checkpoint written by K stages loads into
one model, and back.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from shardwise.errors import ShardwiseError

Run = Callable[[torch.Tensor], torch.Tensor]
Autocast = Callable[[], AbstractContextManager[None]]


@dataclass(frozen=True)
class Piece:
    """The smallest unit a pipeline cuts between: modules it owns, and its tensor-to-tensor step.

        piece = model_pieces(model)[1]
        piece.names, piece.run(x).shape   # ("blocks.0",), torch.Size([B, T, H])

    `names` are the dotted paths of the modules holding the piece's parameters; its first name
    is the piece's cut point. `helpers` are parameter-free modules it also calls (dropout), kept
    with the stage so that `stage.train()` and `stage.eval()` reach them.
    """

    names: tuple[str, ...]
    run: Run
    helpers: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.names[0]


def model_pieces(model: nn.Module) -> list[Piece]:
    """The ordered pieces of an `nn.Sequential` or of a model with `layer_names()`.

        pieces = model_pieces(TransformerLM(num_layers=2))
        [p.names for p in pieces]   # [("embed", "pos"), ("blocks.0",), ("blocks.1",), ("head",)]

    Each name in `layer_names()` is a module whose forward takes the previous one's output (a
    tuple output counts as its first element, as for `nn.LSTM`). A model whose forward does more
    between its layers says how with `forward_layer(name, x)`, layer `name`'s share of it, and
    `layer_uses(name)`, the modules that share calls: a listed layer there joins the piece (no
    stage starts at it), an unlisted one holds no state (a dropout) and goes with the stage.
    A pipeline never runs the model's own `forward`, so `--pp` first checks that the chained
    pieces compute what it does (faithful.py).
    """
    if isinstance(model, nn.Sequential):
        names = [name for name, _ in model.named_children()]
    elif callable(getattr(model, "layer_names", None)):
        names = list(model.layer_names())
    else:
        raise ShardwiseError(
            f"{type(model).__name__} cannot be cut into pipeline stages: give it a layer_names() "
            "method listing its top-level modules in forward order, or build it as nn.Sequential"
        )
    uses = {name: _layer_uses(model, name) for name in names}
    joined = _joined_layers(model, names, uses)
    forward_layer = getattr(model, "forward_layer", None)
    pieces = []
    for name in (name for name in names if name not in joined):
        module = _submodule(model, name)
        step = partial(forward_layer, name) if callable(forward_layer) else module
        listed = tuple(used for used in uses[name] if used in names)
        helpers = tuple(_helper(model, name, used) for used in uses[name] if used not in names)
        pieces.append(Piece((name, *listed), _first_output(step), helpers))
    return pieces


def split_into_stages(model: nn.Module, cuts: Sequence[str]) -> list[nn.Module]:
    """One stage module per run of pieces; stage k+1 starts at the piece named `cuts[k]`.

        stage0, stage1 = split_into_stages(model, ["blocks.1"])
        logits = stage1(stage0(tokens))   # the model's forward, in two halves

    Stages share modules with `model` (nothing is copied). A cut that names no module, names a
    module that is not the first of a piece, or comes out of order raises `ShardwiseError`
    listing the valid cut points.
    """
    pieces = model_pieces(model)
    starts = [0, *cut_indices(model, pieces, cuts), len(pieces)]
    return [StageModule(model, pieces[begin:end]) for begin, end in itertools.pairwise(starts)]


def cut_indices(model: nn.Module, pieces: Sequence[Piece], cuts: Sequence[str]) -> list[int]:
    """Indices of the pieces that open stages 1..K-1, checked against the model.

    cut_indices(model, model_pieces(model), ["blocks.1"])   # [2] for a TransformerLM
    """
    valid = [piece.name for piece in pieces[1:]]
    index_of = {piece.name: i for i, piece in enumerate(pieces)}
    indices: list[int] = []
    for cut in cuts:
        if index_of.get(cut) == 0:
            raise ShardwiseError(
                f"split point {cut!r} starts the first stage already; name where stages 2 and "
                f"later begin: one of {', '.join(valid)}"
            )
        if cut not in index_of:
            raise ShardwiseError(_bad_cut_message(model, cut, valid))
        if indices and index_of[cut] <= indices[-1]:
            raise ShardwiseError(
                f"split point {cut!r} does not come after {pieces[indices[-1]].name!r} in the "
                "model; list each split point once, in forward order"
            )
        indices.append(index_of[cut])
    return indices


def stage_starts(
    model: nn.Module, pieces: Sequence[Piece], cuts: Sequence[str], num_stages: int
) -> list[int]:
    """`[0, first piece of stage 1, ..., len(pieces)]`, checked to make `num_stages` stages.

    stage_starts(model, model_pieces(model), ["blocks.1"], 2)   # [0, 2, 5] for 3 blocks
    """
    starts = [0, *cut_indices(model, pieces, cuts), len(pieces)]
    if len(starts) - 1 != num_stages:
        raise ShardwiseError(
            f"{len(cuts)} split point(s) make {len(starts) - 1} stage(s), but --pp is "
            f"{num_stages}; give {num_stages - 1} split point(s)"
        )
    return starts


class StageModule(nn.Module):
    """A run of pieces, registered under their original dotted paths, applied in order.

    stage = StageModule(model, model_pieces(model)[2:])
    stage.get_submodule("blocks.1") is model.blocks[1]   # True

    Its `tp_styles()` is the model's, less the layers other stages hold.
    """

    def __init__(self, model: nn.Module, pieces: Sequence[Piece]) -> None:
        super().__init__()
        for name in dict.fromkeys(n for piece in pieces for n in (*piece.names, *piece.helpers)):
            _register_path(self, name, _submodule(model, name))
        self.layer_names = [name for piece in pieces for name in piece.names]
        # A plain list: the steps are closures over modules registered above, not modules.
        self._runs = [piece.run for piece in pieces]
        self._model_tp_plan = getattr(model, "tp_styles", None)

    def tp_styles(self) -> dict[str, dict[str, Any]]:
        """The model's declared tensor split of the layers this stage holds ({} without one)."""
        declared = self._model_tp_plan() if callable(self._model_tp_plan) else {}
        held = {name for name, _ in self.named_modules()}
        return {
            part: {name: style for name, style in layers.items() if name in held}
            for part, layers in declared.items()
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for run in self._runs:
            x = run(x)
        return x


Boundary = tuple[tuple[int, ...], torch.dtype]  # a stage output's shape after [B, T], dtype


def keep_stage(
    model: nn.Module,
    cuts: Sequence[str],
    num_stages: int,
    stage: int,
    autocast: Autocast = contextlib.nullcontext,
) -> tuple[StageModule, list[Boundary]]:
    """Stage `stage` of `model` cut at `cuts`, and every stage boundary's shape and dtype.

        mine, boundaries = keep_stage(model, ["blocks.1"], num_stages=2, stage=rank)

    The pieces of the other stages move to the meta device: their memory is freed here, while
    the model keeps its structure. Boundaries come from one 1 x 2 token forward, done before,
    so a pipeline of any batch shape needs no probing pass of its own; under `autocast`, as
    the stages will run, so that the dtypes are the ones sent.
    """
    pieces = model_pieces(model)
    starts = stage_starts(model, pieces, cuts, num_stages)
    with autocast():
        boundaries = probe_boundaries(model, pieces, starts[1:])
    mine = pieces[starts[stage] : starts[stage + 1]]
    kept = {name for piece in mine for name in piece.names}
    for piece in pieces:
        for name in piece.names:
            if name not in kept:  # another rank trains it
                model.get_submodule(name).to("meta")
    return StageModule(model, mine), boundaries


@torch.no_grad()
def probe_boundaries(
    model: nn.Module, pieces: Sequence[Piece], ends: Sequence[int]
) -> list[Boundary]:
    """The output shape (after [batch, time]) and dtype of each stage, ending before `ends`."""
    device = next(model.parameters(), torch.empty(0)).device
    x = torch.zeros(1, 2, dtype=torch.long, device=device)
    boundaries = []
    for index, piece in enumerate(pieces, start=1):
        x = piece.run(x)
        if index in ends:
            if tuple(x.shape[:2]) != (1, 2):
                raise ShardwiseError(
                    f"piece {piece.name!r} returns shape {tuple(x.shape)} for a 1 x 2 token "
                    "batch; pipeline stages must pass [batch, time, ...] tensors"
                )
            boundaries.append((tuple(x.shape[2:]), x.dtype))
    return boundaries


class _Container(nn.Module):
    """An intermediate node of a dotted path ("blocks" in "blocks.1"); it is never called."""


def _register_path(root: nn.Module, path: str, module: nn.Module) -> None:
    *parents, leaf = path.split(".")
    node = root
    for part in parents:
        if not hasattr(node, part):
            node.add_module(part, _Container())
        node = getattr(node, part)
    node.add_module(leaf, module)


def _submodule(model: nn.Module, name: str, lister: str = "layer_names()") -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ShardwiseError(
            f"{type(model).__name__}.{lister} lists {name!r}, which is not a submodule"
        ) from None


def _bad_cut_message(model: nn.Module, cut: str, valid: list[str]) -> str:
    try:
        model.get_submodule(cut)
        problem = "is inside a piece, not at its start"
    except AttributeError:
        problem = "names no module"
    return (
        f"split point {cut!r} {problem} of {type(model).__name__}; "
        f"split at one of: {', '.join(valid)}"
    )


def _first_output(step: Callable[[torch.Tensor], object]) -> Run:
    def run(x: torch.Tensor) -> torch.Tensor:
        out = step(x)
        return out[0] if isinstance(out, tuple) else out

    return run


def _layer_uses(model: nn.Module, name: str) -> tuple[str, ...]:
    layer_uses = getattr(model, "layer_uses", None)
    used = tuple(u for u in layer_uses(name) if u != name) if callable(layer_uses) else ()
    for other in used:
        _submodule(model, other, f"layer_uses({name!r})")
    return used


def _joined_layers(
    model: nn.Module, names: list[str], uses: dict[str, tuple[str, ...]]
) -> dict[str, str]:
    """Listed layers that another layer uses -> that layer (they share its piece)."""
    joined: dict[str, str] = {}
    for name in names:
        for used in (used for used in uses[name] if used in names):
            if used in joined:
                raise ShardwiseError(
                    f"{type(model).__name__}.layer_uses() joins layer {used!r} to both "
                    f"{joined[used]!r} and {name!r}; a layer belongs to one piece"
                )
            joined[used] = name
    return joined


def _helper(model: nn.Module, name: str, used: str) -> str:
    module = model.get_submodule(used)
    if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
        raise ShardwiseError(
            f"{type(model).__name__}.layer_uses({name!r}) names {used!r}, which holds "
            "parameters or buffers but is not in layer_names(); list it there"
        )
    return used
