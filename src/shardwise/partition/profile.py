"""Measure each piece of a model: forward+backward time, and the memory it holds in training.

    costs = profile_pieces(model, tokens[:4])   # one micro-batch
    costs[1].time_s, costs[1].state_bytes, costs[1].activation_bytes

Time is measured here, in this process, with its threads: the same conditions a pipeline stage
will run under on a rank of this machine. Memory is counted, not measured: parameters, their
gradients and AdamW's two moments (`state_bytes`), plus the tensors autograd saves for the
backward of one micro-batch (`activation_bytes`), which a schedule keeps for every micro-batch
in flight.
"""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from shardwise.memory.measure import backward_scratch, touched_bytes
from shardwise.parallel.stages import Piece, model_pieces

# Parameters, gradients, and AdamW's exp_avg and exp_avg_sq: four copies of every weight.
STATE_COPIES = 4


@dataclass(frozen=True)
class Saved:
    """Bytes autograd saves for a backward: all of them; of those, what the forward wrote (on
    the host: pages resident; a fused kernel such as oneDNN's LSTM sizes its saved workspace
    for its backward's writes too); and the largest one storage's bytes not yet written, which
    its backward writes while the rest are still held.
    """

    bytes: int
    touched: int
    untouched_max: int


@dataclass(frozen=True)
class PieceCost:
    """What one piece costs per micro-batch (time, activations) and per step (state)."""

    names: tuple[str, ...]
    time_s: float
    param_count: int
    param_bytes: int
    activation_bytes: int  # saved for its backward, per micro-batch in flight
    saved: Saved | None = None  # the same, with what its forward wrote of it (on the host)
    output_bytes: int = 0  # what it passes on (the next piece's input)
    recompute_bytes: int = 0  # made again in its backward, one piece at a time (recompute)

    @property
    def state_bytes(self) -> int:
        return STATE_COPIES * self.param_bytes


def profile_pieces(model: nn.Module, tokens: torch.Tensor, repeats: int = 3) -> list[PieceCost]:
    """Profile every piece of `model` on the micro-batch `tokens` [B, T], in forward order.

        costs = profile_pieces(TransformerLM(num_layers=4), torch.zeros(4, 128, dtype=torch.long))
        [round(c.time_s * 1e3, 2) for c in costs]   # milliseconds per piece

    Each piece runs forward and backward `repeats` times on the previous piece's output; the
    median time counts. Gradients are taken with `torch.autograd.grad`, so the model's `.grad`
    fields are left as they were.
    """
    x = tokens
    costs = []
    with torch.random.fork_rng():  # dropout inside the profile must not shift training's RNG
        for piece in model_pieces(model):
            params = _parameters(model, piece)
            saved = _saved_bytes(piece, x, params)
            times = [_forward_backward_s(piece, x, params) for _ in range(max(1, repeats))]
            with torch.no_grad():
                x = piece.run(x)
            costs.append(
                PieceCost(
                    names=piece.names,
                    time_s=statistics.median(times),
                    param_count=sum(p.numel() for p in params),
                    param_bytes=sum(p.numel() * p.element_size() for p in params),
                    activation_bytes=saved.bytes,
                    saved=saved,
                    output_bytes=x.numel() * x.element_size(),
                )
            )
    return costs


def backward_scratch_by_piece(model: nn.Module, tokens: torch.Tensor) -> list[int]:
    """Per piece of `model`, in forward order, what its backward holds on the host besides
    what it saved, its gradients and its seed (memory/measure.py `backward_scratch`), each on
    the previous piece's output for `tokens`."""
    x = tokens
    found = []
    for piece in model_pieces(model):
        given = _input(x)
        run = functools.partial(_run_piece, piece, given, _parameters(model, piece))
        found.append(backward_scratch(run))
        with torch.no_grad():
            x = piece.run(x)
    return found


def _run_piece(
    piece: Piece, given: torch.Tensor, params: list[nn.Parameter]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    return piece.run(given), [given, *params]


def _parameters(model: nn.Module, piece: Piece) -> list[nn.Parameter]:
    return [p for name in piece.names for p in model.get_submodule(name).parameters()]


def _input(x: torch.Tensor) -> torch.Tensor:
    return x.detach().requires_grad_(x.is_floating_point())


def _forward_backward_s(piece: Piece, x: torch.Tensor, params: list[nn.Parameter]) -> float:
    x = _input(x)
    _synchronize(x.device)
    started = time.perf_counter()
    out = piece.run(x)
    wrt = [t for t in (x, *params) if t.requires_grad]
    if wrt and out.requires_grad:
        torch.autograd.grad(out, wrt, torch.ones_like(out))
    _synchronize(x.device)
    return time.perf_counter() - started


class SavedStorages:
    """The distinct storages autograd saves for a backward inside the block (those in `skip`,
    the weights, aside), kept until measured.

        with SavedStorages(skip=weights) as saved:
            loss = model(x).sum()
        saved.sizes()   # Saved(bytes=..., touched=..., untouched_max=...)

    On the host a page counts as written where it is resident: exact for a storage that is a
    fresh mapping (memory/activations.py `counts_pages`); a small one on the heap may sit in
    pages another tensor wrote, and then counts whole.
    """

    def __init__(self, skip: set[int]) -> None:
        self.skip = skip
        self.storages: dict[int, torch.UntypedStorage] = {}
        self.marked: set[int] = set()  # saved while `mark` was on
        self.mark = False
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def __enter__(self) -> SavedStorages:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in self.skip:
            if storage.nbytes() >= self.storages.get(pointer, storage).nbytes():
                self.storages[pointer] = storage
            if self.mark:
                self.marked.add(pointer)
        return tensor

    def sizes(self, marked: bool = False) -> Saved:
        """What the storages (those saved while `mark` was on, with `marked`) hold now."""
        chosen = [s for p, s in self.storages.items() if not marked or p in self.marked]
        sizes = [(storage.nbytes(), touched_bytes(storage)) for storage in chosen]
        rest = max((size - written for size, written in sizes), default=0)
        return Saved(sum(size for size, _ in sizes), sum(written for _, written in sizes), rest)


def _saved_bytes(piece: Piece, x: torch.Tensor, params: list[nn.Parameter]) -> Saved:
    """What autograd saves in one forward of `piece`: distinct non-parameter storages."""
    with SavedStorages({p.untyped_storage().data_ptr() for p in params}) as saved:
        piece.run(_input(x))
    return saved.sizes()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
