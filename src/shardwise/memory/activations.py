"""What a model holds for backward, as a function of the batch's shape, from a few profiles.

    profile = profile_activations(model, contract, autocast)
    profile.whole.bytes(BatchShape(rows=16, width=512))     # the whole call and its loss
    profile.pieces[1].saved.bytes(BatchShape(16, 512))      # one pipeline piece (a block)

What autograd saves grows with a row's width w as k + a*w + c*w*w (c: anything kept per pair
of positions, such as an attention mask), so the whole call through the model's contract, loss
included, profiled on rows of three widths, fixes its curve exactly, and the run's worst batch
is read off the curve instead of being run. Each pipeline piece (partition/profile.py's
`profile_pieces`, the cut planner's profile) is profiled at the same shapes, for its own curve:
what a stage holds, and what one block holds for the techniques that work block by block.
Profiling happens under the run's autocast, so bf16 activations count as bf16.

Each storage is counted twice: every byte it asks for (what a GPU's allocator holds), and on
the host the pages its forward wrote, where this process can tell them (`counts_pages`). A
fused kernel may save a workspace larger than its forward writes: oneDNN's LSTM writes about
two fifths of it, its backward the rest, one layer at a time, so a host holds the written
pages of every layer plus one layer's rest (`workspace`), not every byte.

A host also keeps what its kernel caches compiled for each new batch shape (`kernels`,
memory/kernels.py), measured here first, on shapes never run before, while the caches hold
nothing of the model; and what a backward holds besides what it saved (`scratch`: a recurrent
kernel's copies of its weights), measured last, at the narrowest shape.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import itertools
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from shardwise.data.cache import default_cache_dir
from shardwise.errors import ShardwiseError
from shardwise.loss import token_loss_sum
from shardwise.memory.batches import BatchShape
from shardwise.memory.kernels import (
    KernelCache,
    kept_by_new_shapes,
    kernel_cache_capacities,
)
from shardwise.memory.measure import backward_scratch, mmap_threshold, release_freed_memory
from shardwise.models.contract import ModelContract
from shardwise.parallel.stages import model_pieces, probe_boundaries
from shardwise.partition import profile_pieces
from shardwise.partition.profile import Saved, SavedStorages, backward_scratch_by_piece

Autocast = Callable[[], AbstractContextManager[None]]

# Profiled rows and the widest profiled row: what a row saves does not depend on the other
# rows, so one row fixes the curves, cheaply enough for the launcher to profile in seconds.
ROWS = 1
WIDEST = 64
_FORMAT = 8  # of a profile remembered on disk: another format is profiled again


@dataclass(frozen=True)
class Curve:
    """Bytes as rows * (k + a*w + c*w*w) + once for rows of width w: what each row saves
    (fitted through three profiled widths), and what a call saves once whatever its rows (the
    weights cast to 16 bits).

    >>> curve = Curve.through((8, 4, 2), (80, 40, 20), once=5)
    >>> curve.bytes(BatchShape(rows=3, width=100))
    3005
    """

    k: float = 0.0
    a: float = 0.0
    c: float = 0.0
    once: float = 0.0

    @classmethod
    def through(cls, widths: Sequence[int], per_row: Sequence[float], once: float = 0.0) -> Curve:
        """The curve through three (width, bytes per row) points, and `once` bytes a call.

        What a row saves never grows less than linearly with its width (a term in w*w is a
        tensor per pair of positions), so where the three points bend the other way (a kernel
        rounding its buffers to its own blocks) the line through the two widest is taken: a
        negative w*w term, read 8x beyond the profiled widths, loses a tenth of an LSTM's.

        >>> Curve.through((64, 32, 16), (6430, 3230, 1500))  # bends down: the line instead
        Curve(k=30.0, a=100.0, c=0.0, once=0.0)
        """
        w = torch.tensor([[1.0, x, x * x] for x in widths], dtype=torch.float64)
        k, a, c = torch.linalg.solve(w, torch.tensor(per_row, dtype=torch.float64)).tolist()
        if c < 0:
            (wide, narrow), (most, less) = widths[:2], per_row[:2]
            a = (most - less) / (wide - narrow)
            k, c = most - a * wide, 0.0
        return cls(k, a, c, once)

    def per_row(self, width: int) -> float:
        return max(self.k + self.a * width + self.c * width * width, 0.0)

    def bytes(self, shape: BatchShape) -> int:
        if shape.rows <= 0:
            return 0
        return round(shape.rows * self.per_row(shape.width) + max(self.once, 0.0))

    def __add__(self, other: Curve) -> Curve:
        return Curve(self.k + other.k, self.a + other.a, self.c + other.c, self.once + other.once)

    def __sub__(self, other: Curve) -> Curve:
        return Curve(self.k - other.k, self.a - other.a, self.c - other.c, self.once - other.once)


@dataclass(frozen=True)
class PieceActivations:
    """One pipeline piece: its parameters' bytes, what it saves, and its output's bytes.

    As profiled, `saved` counts every saved byte, `touched` those its forward wrote and
    `workspace` the largest saved storage's rest, written by its backward (on the host: a
    fused kernel's workspace, oneDNN's LSTM's, is sized for both). A run's view of the profile
    (`ActivationProfile.on_host` or `.on_device`) says which it holds.
    """

    names: tuple[str, ...]
    param_bytes: int
    saved: Curve
    output_per_token: int  # bytes of its output per (row, position): a stage boundary's
    touched: Curve | None = None  # as profiled; None in a run's view
    workspace: Curve = Curve()
    scratch: int = 0  # what its backward holds besides, on the host (measure.backward_scratch)

    def view(self, on_host: bool) -> PieceActivations:
        if self.touched is None:  # a view already
            return self
        if on_host:
            return dataclasses.replace(self, saved=self.touched, touched=None)
        return dataclasses.replace(self, touched=None, workspace=Curve(), scratch=0)


@dataclass(frozen=True)
class ActivationProfile:
    """A model's saved activations by shape: the whole call (loss included) and each piece.

    `loss` is what the whole call holds beyond its pieces (the loss's log-probabilities and
    whatever the model's own forward adds, such as an attention mask): the last stage's.
    `pieces` is empty for a model that cannot be cut into pieces.

    As profiled it holds both ways of counting what autograd saves (`PieceActivations`); a
    prediction takes the view its device holds: a GPU's allocator holds every byte a storage
    asks for (`on_device`); a host holds the pages written, the forward's, plus one storage's
    rest while its backward writes it (`on_host`: `workspace`), and what its kernel caches
    keep for each new batch shape (`kernels`; a GPU's view has none).
    """

    whole: Curve
    pieces: tuple[PieceActivations, ...]
    param_bytes: int
    # Of `whole`, what a tensor split divides over its ranks: the tensors saved between a
    # column-wise layer's output and its row-wise reader (attention heads, an MLP's hidden
    # layer). Profiled only for a split (`split_styles`); else nothing.
    split: Curve = Curve()
    touched: Curve | None = None  # as profiled; None in a run's view
    workspace: Curve = Curve()
    kernels: KernelCache = field(default_factory=KernelCache)
    scratch: int = 0  # what the whole call's backward holds besides, on the host

    @property
    def loss(self) -> Curve:
        return self.whole - sum((piece.saved for piece in self.pieces), Curve())

    def on_host(self) -> ActivationProfile:
        """What a host holds: the pages written, and the workspace its backward writes."""
        return self._view(True)

    def on_device(self) -> ActivationProfile:
        """What a GPU's allocator holds: every saved byte, written or not."""
        return self._view(False)

    def _view(self, on_host: bool) -> ActivationProfile:
        pieces = tuple(piece.view(on_host) for piece in self.pieces)
        device = {} if on_host else {"kernels": KernelCache(), "scratch": 0}
        if self.touched is None:
            return dataclasses.replace(self, pieces=pieces, **device)
        if on_host:
            return dataclasses.replace(self, whole=self.touched, pieces=pieces, touched=None)
        return dataclasses.replace(self, pieces=pieces, touched=None, workspace=Curve(), **device)


def profile_activations(
    model: nn.Module,
    contract: ModelContract,
    autocast: Autocast = contextlib.nullcontext,
    widest: int = WIDEST,
    packed: bool = False,
    split_styles: Mapping[str, str] | None = None,
) -> ActivationProfile:
    """Profile `model` (in training mode, its random state kept) on rows up to `widest` wide.

        profile = profile_activations(seeded_model(config, 256), ModelContract(), autocast)

    `packed`: the run packs several sequences per row, so the whole call gets `positions` and
    `segment_ids` as the loop passes them (an attention mask per batch). `split_styles`: a
    tensor split's styles in words by module name (LayerSplit.labels), to profile `split`.
    """
    widths = _widths(widest)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    # One row at each width, then two rows at the widest: what a row saves, and what a call
    # saves once whatever its rows (`_fitted`).
    shapes = [(ROWS, width) for width in widths] + [(2 * ROWS, widths[0])]
    found, by_piece = [], []
    with torch.random.fork_rng(), autocast():
        model.train()
        kernels = _kernels(model, contract, packed, shapes)  # first: its caches hold none yet
        # Its graphs' tensors go now, not at some collection during the calls counted next,
        # where a storage could land in pages they wrote and read as written (measured: an
        # LSTM's forward then read above every byte it saved, two runs in five under load).
        release_freed_memory()
        for rows, width in shapes:
            tokens = torch.zeros(rows, width, dtype=torch.long)
            found.append(_whole_call(model, contract, tokens, weights, packed, split_styles))
        # The pieces (timed too, by the planner's profile), at the same shapes.
        for rows, width in shapes:
            by_piece.append(_piece_costs(model, torch.zeros(rows, width, dtype=torch.long)))
        narrowest = torch.zeros(ROWS, widths[-1], dtype=torch.long)
        scratch, piece_scratch = _scratch(model, contract, narrowest, packed)
    pieces: tuple[PieceActivations, ...] = ()
    if by_piece[0] is not None:
        outputs = _output_bytes(model, autocast)
        found_pieces = []
        for i, cost in enumerate(by_piece[0]):
            saved, touched, workspace = _curves(widths, [costs[i].saved for costs in by_piece])
            found_pieces.append(
                PieceActivations(
                    cost.names,
                    cost.param_bytes,
                    saved,
                    outputs[i],
                    touched,
                    workspace,
                    piece_scratch[i],
                )
            )
        pieces = tuple(found_pieces)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    whole, touched, workspace = _curves(widths, [every for every, _ in found])
    if not counts_pages():  # every saved byte, on the host too
        pieces = tuple(dataclasses.replace(p, touched=None, workspace=Curve()) for p in pieces)
        touched, workspace = None, Curve()
    # Of all saved bytes, those inside a tensor split's regions.
    split = _fitted(widths, [inside.bytes for _, inside in found])
    return ActivationProfile(whole, pieces, params, split, touched, workspace, kernels, scratch)


def _scratch(
    model: nn.Module, contract: ModelContract, tokens: torch.Tensor, packed: bool
) -> tuple[int, list[int]]:
    """What the backward holds besides on the host (measure.backward_scratch), of the whole
    call and of each piece on the previous one's output, at `tokens`' (narrow) shape: what is
    left there is not the batch's. Measured once a process for a model, precision and shape,
    as the kernel caches are: a measure of resident memory moves by a few percent from one
    reading to the next, and a profile taken again here should say what the first said."""
    key = (_model_key(model), packed, _autocast_dtype(), tuple(tokens.shape))
    if key not in _SCRATCH:
        _SCRATCH[key] = _measured_scratch(model, contract, tokens, packed)
    return _SCRATCH[key]


def _measured_scratch(
    model: nn.Module, contract: ModelContract, tokens: torch.Tensor, packed: bool
) -> tuple[int, list[int]]:
    params = list(model.parameters())
    whole = backward_scratch(lambda: (_forward(model, contract, tokens, packed), params))
    try:
        return whole, backward_scratch_by_piece(model, tokens)
    except ShardwiseError:  # no pieces: a model of the user's without layer_names()
        return whole, []


def _kernels(
    model: nn.Module, contract: ModelContract, packed: bool, profiled: Sequence[tuple[int, int]]
) -> KernelCache:
    """What the kernel caches keep for each batch shape, measured on shapes this process
    never ran, after one forward and backward at the narrowest profiled shape has
    loaded what a first backward loads once. Measured once a process for a model and
    precision: a later profile of it (another tensor split) would find its kernels cached."""
    key = (_model_key(model), packed, _autocast_dtype())
    if key in _MEASURED:
        return _MEASURED[key]

    def step(rows: int, width: int) -> None:
        tokens = torch.zeros(rows, width, dtype=torch.long)
        _forward(model, contract, tokens, packed).backward()
        model.zero_grad(set_to_none=True)

    warm = min(profiled, key=lambda shape: shape[0] * shape[1])
    step(*warm)
    widest = max(width for _, width in profiled)
    kept = kept_by_new_shapes(step, _unseen_shapes(widest, {*profiled, *_RUN}))
    if kept.most is not None:  # the warm shape's kernels were in the caches from the start
        kept = dataclasses.replace(kept, most=kept.most + kept.per_shape)
    _MEASURED[key] = kept
    return kept


# What the kernel caches keep, as measured in this process, by model, packing and precision,
# and the shapes those measurements ran: another measurement takes others.
_MEASURED: dict[tuple, KernelCache] = {}
_SCRATCH: dict[tuple, tuple[int, list[int]]] = {}  # what backwards hold besides, likewise
_RUN: set[tuple[int, int]] = set()


def _model_key(model: nn.Module) -> tuple:
    shapes = tuple((n, tuple(t.shape), str(t.dtype)) for n, t in model.state_dict().items())
    return type(model).__qualname__, shapes


def _autocast_dtype() -> torch.dtype | None:
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None


def _unseen_shapes(widest: int, taken: set[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """Shapes not `taken`: one row, narrowing from `widest` - 1, then two rows, and so on.

    >>> list(itertools.islice(_unseen_shapes(4, {(1, 3)}), 4))
    [(1, 2), (1, 1), (2, 3), (2, 2)]
    """
    for rows in itertools.count(1):
        for width in range(max(widest - 1, 1), 0, -1):
            if (rows, width) not in taken:
                _RUN.add((rows, width))
                yield rows, width


def cached_profile(
    model: nn.Module,
    contract: ModelContract,
    autocast: Autocast,
    widest: int,
    packed: bool,
    mode: str,
    cache_dir: Path | None = None,
    split_styles: Mapping[str, str] | None = None,
) -> ActivationProfile:
    """`profile_activations`, remembered on disk by what decides it: the model's parameters
    (names, shapes, dtypes), the source of its class's module, its call, the precision `mode`,
    the widths and packing. The launcher's prediction and every run's record of the same model
    then profile once, not once each (a few seconds of a tiny run's start).

        profile = cached_profile(model, contract, autocast, 64, False, "fp32")
    """
    key = _profile_key(model, contract, widest, packed, mode, split_styles)
    path = (cache_dir or default_cache_dir()) / "memory" / f"{key}.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        found = _profile_from_json(json.loads(path.read_text()))
        if found.touched is not None or not counts_pages():
            return found  # else profiled again, now counting the pages written
    profile = profile_activations(model, contract, autocast, widest, packed, split_styles)
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(dataclasses.asdict(profile)))
        temporary.replace(path)  # whole or not at all, for a reader in another process
    return profile


def _profile_key(
    model: nn.Module,
    contract: ModelContract,
    widest: int,
    packed: bool,
    mode: str,
    split_styles: Mapping[str, str] | None,
) -> str:
    shapes = list(_model_key(model)[1])
    try:
        source = Path(inspect.getfile(type(model))).read_bytes()
    except (OSError, TypeError):  # defined where no file holds it: never reused across runs
        source = repr(id(type(model))).encode()
    split = sorted((split_styles or {}).items())
    values = (shapes, type(model).__qualname__, contract.describe(), widest, packed, mode, split)
    values += (sorted(kernel_cache_capacities().items()),)  # what the kernel caches keep
    text = repr((_FORMAT, *values))
    return hashlib.sha256(text.encode() + hashlib.sha256(source).digest()).hexdigest()[:24]


def _profile_from_json(values: dict) -> ActivationProfile:
    def curve(values: dict | None) -> Curve | None:
        return None if values is None else Curve(**values)

    pieces = tuple(
        PieceActivations(
            tuple(piece["names"]),
            int(piece["param_bytes"]),
            Curve(**piece["saved"]),
            int(piece["output_per_token"]),
            curve(piece["touched"]),
            Curve(**piece["workspace"]),
            int(piece["scratch"]),
        )
        for piece in values["pieces"]
    )
    whole, split = Curve(**values["whole"]), Curve(**values["split"])
    touched, workspace = curve(values["touched"]), Curve(**values["workspace"])
    kernels, scratch = KernelCache(**values["kernels"]), int(values["scratch"])
    params = int(values["param_bytes"])
    return ActivationProfile(whole, pieces, params, split, touched, workspace, kernels, scratch)


def counts_pages() -> bool:
    """Whether a profile here tells the pages a kernel writes from those it only asked for: with
    glibc's mmap threshold fixed (memory/measure.py), a large tensor is a fresh mapping whose
    pages are resident once written. With the threshold glibc moves, a storage may take heap
    pages another tensor of the same call wrote, so resident says nothing: every byte counts."""
    return mmap_threshold() is not None


def _curves(widths: Sequence[int], saved: Sequence[Saved]) -> tuple[Curve, Curve, Curve]:
    """Curves of what the profiled calls saved: all bytes, those written by the forward, and
    the largest storage's rest (`partition.profile.Saved`)."""
    return (
        _fitted(widths, [call.bytes for call in saved]),
        _fitted(widths, [call.touched for call in saved]),
        _fitted(widths, [call.untouched_max for call in saved]),
    )


def _fitted(widths: Sequence[int], saved: Sequence[float]) -> Curve:
    """The curve through bytes saved by one row at each of three `widths` and by two rows at
    the first (widest): what the call saves once whatever its rows (the weights cast to 16
    bits, a mask) is one row's bytes twice less two rows'; the rest is per row, a constant
    (a recurrent layer's states) plus terms in w and w*w.

    >>> _fitted((8, 4, 2), [5 + 152, 5 + 64, 5 + 32, 5 + 2 * 152])  # 8 + 10w + w*w a row
    Curve(k=8.0, a=10.0, c=1.0, once=5)
    """
    one, two = saved[: len(widths)], saved[len(widths)]
    once = max(2 * one[0] - two, 0)
    return Curve.through(widths, [(bytes_ - once) / ROWS for bytes_ in one], once)


def _widths(widest: int) -> tuple[int, int, int]:
    """Three distinct widths, the widest first."""
    widest = max(widest, 4)
    return widest, widest // 2, widest // 4


def _whole_call(
    model: nn.Module,
    contract: ModelContract,
    tokens: torch.Tensor,
    weights: set[int],
    packed: bool,
    split_styles: Mapping[str, str] | None = None,
) -> tuple[Saved, Saved]:
    """What autograd saves for the call and its loss (each storage once, weights aside), and
    of that what is saved inside a tensor split's regions (`split_styles`: after a column-wise
    layer whose output stays split, up to and with its row-wise reader)."""
    saved = SavedStorages(weights)

    def entered(module: nn.Module, args: object, out: object) -> None:
        saved.mark = True

    def left(module: nn.Module, args: object, out: object) -> None:
        saved.mark = False

    hooks = []
    for name, style in (split_styles or {}).items():
        if style == "column-wise":  # its output stays split: the region begins after it
            hooks.append(model.get_submodule(name).register_forward_hook(entered))
        elif style == "row-wise":  # its input (saved) was split, its output is whole again
            hooks.append(model.get_submodule(name).register_forward_hook(left))
    try:
        with saved:
            _forward(model, contract, tokens, packed)
    finally:
        for hook in hooks:
            hook.remove()
    return saved.sizes(), saved.sizes(marked=True)


def _forward(
    model: nn.Module, contract: ModelContract, tokens: torch.Tensor, packed: bool
) -> torch.Tensor:
    """The whole call's summed token loss on `tokens` (targets: token 0)."""
    kwargs = {}
    if packed:  # one sequence per row: the mask and positions of the packed call, same shapes
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        kwargs = {"positions": positions, "segment_ids": torch.zeros_like(tokens)}
    return token_loss_sum(contract(model, tokens, **kwargs), torch.zeros_like(tokens))


def _piece_costs(model: nn.Module, tokens: torch.Tensor) -> list | None:
    try:
        return profile_pieces(model, tokens, repeats=1)
    except ShardwiseError:  # no pieces: a model of the user's without layer_names()
        return None


def _output_bytes(model: nn.Module, autocast: Autocast) -> list[int]:
    """Each piece's output bytes per position (probe_boundaries' shapes and dtypes)."""
    pieces = model_pieces(model)
    with autocast():
        shapes = probe_boundaries(model, pieces, range(1, len(pieces) + 1))
    return [
        int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        for shape, dtype in shapes
    ]
