"""TransformerLM specifics: max_len, packed rows, head layout for tensor parallelism, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from shardwise.data.batch import pack_collate
from shardwise.errors import ShardwiseError
from shardwise.models import TransformerLM
from shardwise.models.transformer import CausalSelfAttention, segment_mask


def test_sequences_longer_than_max_len_are_refused() -> None:
    model = TransformerLM(dim=16, num_layers=1, num_heads=2, max_len=8)
    model(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ShardwiseError, match="max_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_lengths_are_accepted_and_ignored() -> None:
    model = TransformerLM(dim=16, num_layers=1, num_heads=2, max_len=8).eval()
    tokens = torch.randint(0, 256, (2, 5))
    torch.testing.assert_close(model(tokens, torch.tensor([5, 2])), model(tokens))


def test_a_packed_row_gives_each_sequence_the_logits_it_gets_alone() -> None:
    torch.manual_seed(0)
    model = TransformerLM(dim=32, num_layers=2, num_heads=4, max_len=16).eval()
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, 256, size=n) for n in (9, 4, 6, 2, 7)]
    batch = pack_collate(sequences, step_tokens=0, row_len=16)
    assert batch.tokens.shape[0] < len(sequences)  # really packed
    with torch.no_grad():
        logits = model(batch.tokens, **batch.model_kwargs(torch.device("cpu")))
        for row in range(batch.tokens.shape[0]):
            for segment in batch.segment_ids[row].unique().tolist():
                if segment < 0:
                    continue
                where = batch.segment_ids[row] == segment
                alone = model(batch.tokens[row, where][None])[0]
                torch.testing.assert_close(logits[row, where], alone, atol=1e-5, rtol=0)


def test_packing_padding_stays_finite_in_outputs_and_gradients() -> None:
    model = TransformerLM(dim=16, num_layers=1, num_heads=2, max_len=8)
    batch = pack_collate([np.arange(6), np.arange(3), np.arange(2)], step_tokens=0)
    logits = model(batch.tokens, **batch.model_kwargs(torch.device("cpu")))
    logits.sum().backward()
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_segment_mask_is_causal_inside_segments_only() -> None:
    mask = segment_mask(torch.tensor([[0, 0, 1, -1]]))[0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]


def test_layer_names_keep_embed_and_pos_first() -> None:
    model = TransformerLM(dim=16, num_layers=3, num_heads=2)
    assert model.layer_names() == ["embed", "pos", "blocks.0", "blocks.1", "blocks.2", "head"]


def test_heads_must_divide_dim() -> None:
    with pytest.raises(ShardwiseError, match="num_heads=3"):
        TransformerLM(dim=16, num_heads=3)


def test_column_shards_of_qkv_hold_whole_heads() -> None:
    # Tensor parallelism splits qkv by rows and proj by columns; the sum of the two halves'
    # outputs must equal the whole attention for that split to be possible at all.
    torch.manual_seed(0)
    full = CausalSelfAttention(dim=16, num_heads=4)
    x = torch.randn(2, 5, 16)
    halves = []
    for rank in range(2):
        shard = CausalSelfAttention(dim=16, num_heads=4)
        rows, cols = slice(24 * rank, 24 * (rank + 1)), slice(8 * rank, 8 * (rank + 1))
        shard.qkv = _linear(full.qkv.weight[rows], full.qkv.bias[rows])
        # A row-parallel proj adds its bias once, on one rank.
        shard.proj = _linear(full.proj.weight[:, cols], full.proj.bias * (rank == 0))
        halves.append(shard(x))
    torch.testing.assert_close(halves[0] + halves[1], full(x), atol=1e-6, rtol=0)


def _linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer
