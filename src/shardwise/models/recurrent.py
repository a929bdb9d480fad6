"""A byte-level LSTM or GRU language model, built from pieces a pipeline can cut between.

model = RecurrentLM(cell="gru", num_layers=3)
logits = model(tokens, lengths)  # tokens [B, T] -> logits [B, T, 256]
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from shardwise.errors import ShardwiseError

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}


class RecurrentLM(nn.Module):
    """Embedding, a stack of single-layer LSTMs or GRUs, then LayerNorm and a linear head.

        model = RecurrentLM(vocab_size=256, hidden_dim=512, cell="lstm")
        loss = F.cross_entropy(model(x, lengths).flatten(0, 1), y.flatten())

    Each recurrent layer is its own module in `self.blocks` (rather than one `nn.LSTM` with
    `num_layers`) so that a pipeline can place layers on different stages: `layer_names()`
    lists them in order, `forward_layer()` runs one as a stage does and `tp_styles()` says how
    tensor parallelism splits them (the convention any model may follow; README, "Your own
    model"). Dropout, when asked for, is applied to the input of every block and of the head.

    With `lengths`, the sequences are packed once after the embedding: padding costs no
    recurrent compute, and the logits at padded positions come from zero features (mask
    them out of the loss). The hidden state starts at zero on every call.
    """

    def __init__(
        self,
        vocab_size: int = 256,
        embed_dim: int = 128,
        hidden_dim: int = 256,
        num_layers: int = 2,
        cell: str = "lstm",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if cell not in CELLS:
            raise ShardwiseError(f"cell={cell!r} is not a recurrent cell; use 'lstm' or 'gru'")
        if num_layers < 1:
            raise ShardwiseError(f"num_layers={num_layers}: a model needs at least 1 layer")
        rnn = CELLS[cell]
        self.cell = cell
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.blocks = nn.ModuleList(
            rnn(embed_dim if i == 0 else hidden_dim, hidden_dim, batch_first=True)
            for i in range(num_layers)
        )
        self.drop = nn.Dropout(dropout)
        self.head = nn.Sequential(nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, vocab_size))

    def layer_names(self) -> list[str]:
        """The top-level pieces in forward order: `["embed", "blocks.0", ..., "head"]`.

        names = model.layer_names()
        stage0 = [model.get_submodule(n) for n in names[:2]]
        """
        return ["embed", *(f"blocks.{i}" for i in range(len(self.blocks))), "head"]

    def layer_uses(self, name: str) -> tuple[str, ...]:
        """What `forward_layer(name, x)` calls besides the layer: the dropout after it.

        >>> RecurrentLM().layer_uses("blocks.0"), RecurrentLM().layer_uses("head")
        (('drop',), ())
        """
        return () if name == "head" else ("drop",)

    def forward_layer(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Layer `name`'s share of `forward` on unpacked rows, as a pipeline stage runs it.

        x = model.forward_layer("embed", tokens)   # [B, T, embed_dim], dropout applied
        x = model.forward_layer("blocks.0", x)     # the layer's outputs; its state is dropped
        """
        if name == "head":
            return self.head(x)
        out = self.get_submodule(name)(x)
        # A block returns (outputs, state): the next layer reads the outputs, and the state
        # starts at zero on every call, as in forward.
        return self.drop(out[0] if isinstance(out, tuple) else out)

    def tp_styles(self) -> dict[str, dict[str, str]]:
        """How tensor parallelism splits the model, by part: the token table and the head.

        >>> RecurrentLM().tp_styles()["head"]
        {'head.1': 'column-wise, output gathered'}
        """
        return {"embed": {"embed": "row-wise"}, "head": {"head.1": "column-wise, output gathered"}}

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Logits `[B, T, vocab_size]` for `tokens [B, T]`; `lengths [B]` marks real tokens."""
        total_length = tokens.shape[1]
        x: torch.Tensor | PackedSequence = self.drop(self.embed(tokens))
        if lengths is not None:
            x = pack_padded_sequence(
                x, _checked_lengths(lengths, tokens), batch_first=True, enforce_sorted=False
            )
        for block in self.blocks:
            x, _ = block(x)
            x = self._dropout(x)
        if isinstance(x, PackedSequence):
            x, _ = pad_packed_sequence(x, batch_first=True, total_length=total_length)
        return self.head(x)

    def _dropout(self, x: torch.Tensor | PackedSequence) -> torch.Tensor | PackedSequence:
        # A PackedSequence holds only real tokens in `.data`, so dropping there is exact.
        if isinstance(x, PackedSequence):
            return x._replace(data=self.drop(x.data))
        return self.drop(x)


def _checked_lengths(lengths: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    # pack_padded_sequence wants lengths on the CPU anyway; checking them there is free, and
    # its own errors for a bad length do not say which tensor was wrong.
    lengths = lengths.to("cpu", torch.int64)
    batch, total_length = tokens.shape
    if lengths.shape != (batch,):
        raise ValueError(f"lengths has shape {tuple(lengths.shape)}; expected ({batch},)")
    if lengths.numel() and not (lengths.min() >= 1 and lengths.max() <= total_length):
        raise ValueError(f"lengths must lie in [1, {total_length}]; got {lengths.tolist()}")
    return lengths
