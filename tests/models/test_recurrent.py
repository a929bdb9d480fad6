"""RecurrentLM specifics: packing, dropout on packed data, configuration errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence

from shardwise.errors import ShardwiseError
from shardwise.models import RecurrentLM


def tiny(**kwargs: Any) -> RecurrentLM:
    torch.manual_seed(0)
    return RecurrentLM(embed_dim=8, hidden_dim=12, num_layers=3, **kwargs)


def test_blocks_see_only_real_tokens_when_lengths_are_given() -> None:
    model = tiny()
    seen: list[object] = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    model(torch.zeros(3, 9, dtype=torch.long), torch.tensor([9, 2, 4]))
    assert len(seen) == 3
    for packed in seen:
        assert isinstance(packed, PackedSequence)
        assert packed.data.shape[0] == 9 + 2 + 4


def test_layer_names_follow_the_blocks() -> None:
    assert tiny().layer_names() == ["embed", "blocks.0", "blocks.1", "blocks.2", "head"]


def test_dropout_works_on_packed_sequences() -> None:
    model = tiny(cell="gru", dropout=0.5)
    tokens, lengths = torch.randint(0, 256, (2, 6)), torch.tensor([6, 3])
    train_out = model.train()(tokens, lengths)
    eval_out = model.eval()(tokens, lengths)
    assert torch.isfinite(train_out).all()
    assert not torch.allclose(train_out[0], eval_out[0])
    torch.testing.assert_close(model(tokens, lengths), eval_out)


def test_unknown_cell_is_a_user_error() -> None:
    with pytest.raises(ShardwiseError, match=r"cell='rnn'.*'lstm' or 'gru'"):
        RecurrentLM(cell="rnn")


@pytest.mark.parametrize("lengths", [[4, 0], [4, 5], [4]])
def test_bad_lengths_name_the_problem(lengths: list[int]) -> None:
    with pytest.raises(ValueError, match="lengths"):
        tiny()(torch.zeros(2, 4, dtype=torch.long), torch.tensor(lengths))
