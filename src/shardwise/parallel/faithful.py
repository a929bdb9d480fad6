"""Prove on a probe batch that a model's pipeline pieces, chained, compute what its forward does.

    check_faithful_chain(model, vocab_size=256)          # raises ShardwiseError when they differ
    check_faithful_chain(model, 256, forward=contract)   # the model's own call, adapted

A pipeline runs the pieces `model_pieces` lists, one after another, and never the model's own
`forward`: whatever that forward does between its layers (build a causal mask, add a residual,
scale) is lost, and the run trains another model without a word. This check runs both on the
same seeded random tokens, in eval mode and without gradients, and compares log-probabilities
(a forward that ends in `log_softmax` is loss-equivalent to one that returns logits).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from shardwise.errors import ShardwiseError, first_line
from shardwise.models.contract import probe_tokens as contract_probe_tokens
from shardwise.models.contract import probing
from shardwise.parallel.stages import model_pieces

Forward = Callable[[torch.Tensor], torch.Tensor]  # tokens [batch, time] -> logits [b, t, vocab]

PROBE_ROWS, PROBE_LENGTH, PROBE_SEED = 3, 12, 1234


def own_forward(model: nn.Module) -> Forward:
    """`model(tokens)`, a tuple output taken as its first element (as `nn.LSTM` returns).

    forward = own_forward(model)
    logits = forward(tokens)   # [batch, time, vocab]
    """

    def forward(tokens: torch.Tensor) -> torch.Tensor:
        out = model(tokens)
        return out[0] if isinstance(out, tuple) else out

    return forward


def probe_tokens(
    vocab_size: int, device: torch.device, seed: int = PROBE_SEED, length: int = PROBE_LENGTH
) -> torch.Tensor:
    """The pipeline and tensor-parallel checks' probe: `PROBE_ROWS` x `length` seeded ids.

    tokens = probe_tokens(256, torch.device("cpu"))   # the same batch on every rank
    """
    return contract_probe_tokens(vocab_size, device, seed=seed, length=length, rows=PROBE_ROWS)


def token_bound(model: nn.Module) -> int:
    """Token ids every embedding of `model` accepts: below its smallest table (2 without one).

    probe_tokens(token_bound(model), device)   # when the vocabulary size is not known
    """
    sizes = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
    return min(sizes, default=2)


def check_faithful_chain(model: nn.Module, vocab_size: int, forward: Forward | None = None) -> None:
    """Refuse (ShardwiseError) a model whose chained pieces give other outputs than `forward`.

    check_faithful_chain(MaskInForward(256), 256)   # refused: forward builds the mask
    check_faithful_chain(TransformerLM(), 256)      # fine: the built-in pieces are exact
    """
    forward = forward or own_forward(model)
    pieces = model_pieces(model)
    name, listed = type(model).__name__, _how_listed(model)
    device = next(model.parameters(), torch.empty(0)).device
    tokens = probe_tokens(vocab_size, device, length=_probe_length(model))
    with probing(model):
        expected = _run(forward, tokens, f"{name}'s forward", "fix it or train without --pp")
        chained = tokens
        for piece in pieces:
            where = f"{name}'s layer {piece.name!r} chained as {listed}"
            chained = _run(piece.run, chained, where, _FIX)
    if chained.shape != expected.shape:
        raise ShardwiseError(
            f"--pp: {name}'s layers chained as {listed} give outputs of shape "
            f"{tuple(chained.shape)}, its forward {tuple(expected.shape)}: {_FIX}"
        )
    difference = _log_prob_difference(chained, expected)
    if difference > _tolerance(expected.dtype):
        raise ShardwiseError(
            f"--pp: {name}'s layers chained as {listed} give other outputs than its forward "
            f"(max difference {difference:.3g}): forward does work between its layers (a mask, "
            f"a residual, a scale); {_FIX}"
        )


_FIX = "make each listed layer do all its own work, or train without --pp"


def _run(step: Forward, x: torch.Tensor, where: str, fix: str) -> torch.Tensor:
    try:
        out = step(x)
    except ShardwiseError:
        raise
    except Exception as error:
        raise ShardwiseError(
            f"--pp: {where} fails on a {PROBE_ROWS} x {x.shape[1]} probe batch "
            f"({first_line(error, with_type=True)}); {fix}"
        ) from error
    return out[0] if isinstance(out, tuple) else out


def _how_listed(model: nn.Module) -> str:
    if isinstance(model, nn.Sequential):
        return "nn.Sequential orders them"
    if callable(getattr(model, "forward_layer", None)):
        return "layer_names() lists and forward_layer() runs them"
    return "layer_names() lists them"


def _probe_length(model: nn.Module) -> int:
    max_len = getattr(model, "max_len", None)
    return min(PROBE_LENGTH, max_len) if isinstance(max_len, int) and max_len > 0 else PROBE_LENGTH


def _log_prob_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().log_softmax(-1), b.float().log_softmax(-1)
    return float((a - b).abs().max()) if a.numel() else 0.0


def _tolerance(dtype: torch.dtype) -> float:
    # Chaining runs the same operations in the same order, so float32 agrees to rounding; half
    # precision rounds each layer's output coarsely.
    return 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2
