"""Predicted compute of one batch, from the lengths of the spans the model computes over.

    cost = cost_model_for("transformer")
    cost(np.array([512, 512, 100]))   # tokens, plus a quadratic term for attention

A span is what one sequence costs the model: in a padded batch every row runs to the batch's
width, so each row counts at that width (`batch_cost` does this); in a packed row attention never
crosses a sequence boundary, so each packed sequence is its own span. Costs are in units of
"one token of linear work", so an RNN batch costs its token slots.

A cost model is any callable from an int array of span lengths to a float. Samplers on every
rank call it and must agree on the result to the last bit, so it must be a pure function of the
lengths; the built-in ones sum integers before touching floats for that reason.
"""

from __future__ import annotations

import functools
from typing import Protocol

import numpy as np

# Attention reads every earlier key per query: ~4*dim FLOPs per (query, key) pair against
# ~24*dim**2 per token for the projections and MLP, so one pair weighs ~1/(6*dim) of a token.
# 1/768 is that ratio for the default TransformerLM (dim=128); CPU timings of a 2-layer,
# dim-128 model gave ~1/1000 (measured 40 us/token at 30 tokens, 78 at 1000).
DEFAULT_QUADRATIC_WEIGHT = 1 / 768


class CostModel(Protocol):
    """Anything that predicts a batch's compute from its span lengths.

    def my_cost(lengths: np.ndarray) -> float:
        return float(lengths.sum() + 0.5 * lengths.max())   # e.g. a per-step RNN overhead
    """

    def __call__(self, lengths: np.ndarray) -> float: ...


def rnn_cost(lengths: np.ndarray) -> float:
    """A recurrent model's work is linear in the tokens it steps through: the sum of lengths.

    rnn_cost(np.array([3, 5]))   # 8.0
    """
    return float(np.sum(lengths, dtype=np.int64))


def attention_cost(
    lengths: np.ndarray, quadratic_weight: float = DEFAULT_QUADRATIC_WEIGHT
) -> float:
    """Linear work per token plus `quadratic_weight` per (query, key) pair of each span.

    attention_cost(np.array([100, 100]), quadratic_weight=0.01)   # 200 + 0.01 * 20000 = 400.0

    The quadratic term is per span, which is exact for packed rows under a block-diagonal mask
    only when the kernel skips masked blocks (variable-length/flash attention); a dense masked
    kernel still spends row_length**2 on the row.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    return float(lengths.sum()) + quadratic_weight * float(np.square(lengths).sum())


def cost_model_for(
    model_name: str, quadratic_weight: float = DEFAULT_QUADRATIC_WEIGHT
) -> CostModel:
    """The cost model for the model `model_name` names: attention for one that attends, else RNN.

    cost_model_for("lstm") is rnn_cost                   # True
    cost_model_for("transformer")(np.array([1024]))      # 1024 + 1024**2 / 768
    """
    # Here, not at the top: the models load torch, which the samplers themselves never need.
    from shardwise.models import attends

    if attends(model_name):
        return functools.partial(attention_cost, quadratic_weight=quadratic_weight)
    return rnn_cost


def batch_cost(cost_model: CostModel, lengths: np.ndarray, packed: bool = False) -> float:
    """Predicted cost of one batch of sequences with model-input `lengths`.

    batch_cost(rnn_cost, np.array([10, 4]))               # 20.0: both rows padded to 10
    batch_cost(rnn_cost, np.array([10, 4]), packed=True)  # 14.0
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    spans = lengths if packed else np.full(len(lengths), lengths.max(initial=0))
    return cost_model(spans)
