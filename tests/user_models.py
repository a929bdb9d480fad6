"""Models written the way users write them, not the way shardwise's built-ins are.

    shardwise train --model user_models:time_major_lstm     (from the tests folder)

Each one is the shape of a model people arrive with:
- `TimeMajorLSTM`: pytorch/examples' word_language_model style: time-major input, a `hidden`
  argument, a `(log_probs [T*B, V], hidden)` tuple out.
- `TimeMajorTransformer`: word_language_model's TransformerModel style: time-major input to an
  `nn.TransformerEncoder` (which warns that it cannot use nested tensors), log-probabilities
  `[T, B, V]` out.
- `MaskInForward`: a causal Transformer whose `forward` builds the attention mask and hands it
  to every layer; it lists its layers in `layer_names()`, so a stage chain that skips its
  `forward` loses the mask.
- `MaskInBlocks`: the same model with each block building its own mask, which a pipeline can
  cut faithfully.
- `OddNames`: two Linear projections, a GRU and a head under names shardwise never uses.
- `LayeredLM`: a model that says how its forward runs layer by layer (`forward_layer`,
  `layer_uses`: positions added to the tokens, a residual, dropout) and how tensor parallelism
  splits it (`tp_styles`), as the built-ins do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TimeMajorLSTM(nn.Module):
    def __init__(self, ntoken: int, ninp: int = 32, nhid: int = 32, nlayers: int = 1) -> None:
        super().__init__()
        self.ntoken = ntoken
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers)
        self.decoder = nn.Linear(nhid, ntoken)
        self.nlayers, self.nhid = nlayers, nhid

    def forward(self, input: torch.Tensor, hidden: tuple | None) -> tuple[torch.Tensor, tuple]:
        emb = self.encoder(input)
        output, hidden = self.rnn(emb, hidden)
        decoded = self.decoder(output).view(-1, self.ntoken)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz: int) -> tuple[torch.Tensor, torch.Tensor]:
        weight = next(self.parameters())
        return (
            weight.new_zeros(self.nlayers, bsz, self.nhid),
            weight.new_zeros(self.nlayers, bsz, self.nhid),
        )


def time_major_lstm(vocab_size: int = 256) -> TimeMajorLSTM:
    return TimeMajorLSTM(vocab_size)


class TimeMajorTransformer(nn.Module):
    def __init__(self, ntoken: int, ninp: int = 32, nhead: int = 2, nlayers: int = 1) -> None:
        super().__init__()
        self.encoder = nn.Embedding(ntoken, ninp)
        layer = nn.TransformerEncoderLayer(ninp, nhead, ninp, dropout=0.0)
        self.transformer_encoder = nn.TransformerEncoder(layer, nlayers)
        self.decoder = nn.Linear(ninp, ntoken)

    def forward(self, src: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(len(src), device=src.device)
        output = self.transformer_encoder(self.encoder(src), mask, is_causal=True)
        return F.log_softmax(self.decoder(output), dim=-1)


def time_major_transformer(vocab_size: int = 256) -> TimeMajorTransformer:
    return TimeMajorTransformer(vocab_size)


class _Block(nn.Module):
    def __init__(self, dim: int, own_mask: bool) -> None:
        super().__init__()
        self.own_mask = own_mask
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.own_mask:
            mask = causal_mask(x.shape[1], x.device)
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.ff(self.norm2(x))


def causal_mask(length: int, device: torch.device) -> torch.Tensor:
    return torch.triu(torch.full((length, length), float("-inf"), device=device), diagonal=1)


class _TokensAndPositions(nn.Module):
    def __init__(self, vocab_size: int, dim: int, max_len: int = 128) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok(tokens) + self.pos[: tokens.shape[1]]


class MaskInForward(nn.Module):
    own_mask = False

    def __init__(self, vocab_size: int = 256, dim: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.embed = _TokensAndPositions(vocab_size, dim)
        self.blocks = nn.ModuleList(_Block(dim, self.own_mask) for _ in range(layers))
        self.out = nn.Linear(dim, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        mask = None if self.own_mask else causal_mask(tokens.shape[1], tokens.device)
        for block in self.blocks:
            x = block(x, mask)
        return self.out(x)

    def layer_names(self) -> list[str]:
        return ["embed", *(f"blocks.{i}" for i in range(len(self.blocks))), "out"]


class MaskInBlocks(MaskInForward):
    own_mask = True


def mask_in_forward(vocab_size: int = 256) -> MaskInForward:
    return MaskInForward(vocab_size)


def mask_in_blocks(vocab_size: int = 256) -> MaskInBlocks:
    return MaskInBlocks(vocab_size)


class OddNames(nn.Module):
    def __init__(self, vocab_size: int = 256, dim: int = 32) -> None:
        super().__init__()
        self.lookup = nn.Embedding(vocab_size, dim)
        self.widen = nn.Linear(dim, 4 * dim)
        self.narrow = nn.Linear(4 * dim, dim)
        self.memory = nn.GRU(dim, dim, batch_first=True)
        self.readout = nn.Linear(dim, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.lookup(tokens)
        x = x + self.narrow(F.relu(self.widen(x)))
        x, _ = self.memory(x)
        return self.readout(x)


def odd_names(vocab_size: int = 256) -> OddNames:
    return OddNames(vocab_size)


class LayeredLM(nn.Module):
    def __init__(self, vocab_size: int = 256, dim: int = 32, dropout: float = 0.0) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, dim)
        self.places = nn.Embedding(64, dim)
        self.dropout = nn.Dropout(dropout)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.mixer = nn.GRU(dim, dim, batch_first=True)
        self.out = nn.Linear(dim, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        places = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.dropout(self.tokens(tokens) + self.places(places))
        x = x + self.ff(x)
        x, _ = self.mixer(x)
        return self.out(self.dropout(x))

    def layer_names(self) -> list[str]:
        return ["tokens", "places", "ff", "mixer", "out"]

    def layer_uses(self, name: str) -> tuple[str, ...]:
        return {"tokens": ("places", "dropout"), "mixer": ("dropout",)}.get(name, ())

    def forward_layer(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if name == "tokens":
            places = torch.arange(x.shape[1], device=x.device)
            return self.dropout(self.tokens(x) + self.places(places))
        if name == "ff":
            return x + self.ff(x)
        if name == "mixer":
            return self.dropout(self.mixer(x)[0])
        return self.out(x)

    def tp_styles(self) -> dict[str, dict[str, str]]:
        return {
            "embed": {"tokens": "row-wise"},
            "mlp": {"ff.0": "column-wise", "ff.2": "row-wise"},
            "head": {"out": "column-wise, output gathered"},
        }


def layered_lm(vocab_size: int = 256) -> LayeredLM:
    return LayeredLM(vocab_size)
