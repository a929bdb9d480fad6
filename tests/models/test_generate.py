"""generate(): length, determinism, byte-only output, mode restoring, argument errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from shardwise.errors import ShardwiseError
from shardwise.models import RecurrentLM, TransformerLM, generate


class FixedLogits(nn.Module):
    """Returns the same logits at every position, and remembers the longest input seen."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.longest = 0

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        self.longest = max(self.longest, tokens.shape[1])
        return self.logits.expand(*tokens.shape, -1)


def tiny_gru() -> RecurrentLM:
    torch.manual_seed(0)
    return RecurrentLM(embed_dim=8, hidden_dim=16, num_layers=1, cell="gru")


def test_returns_exactly_the_new_bytes() -> None:
    out = generate(tiny_gru(), b"hello", max_new_tokens=12)
    assert isinstance(out, bytes) and len(out) == 12
    assert generate(tiny_gru(), b"hello", max_new_tokens=0) == b""


def test_a_seeded_generator_makes_it_deterministic() -> None:
    model = tiny_gru()

    def sample(seed: int) -> bytes:
        rng = torch.Generator().manual_seed(seed)
        return generate(model, b"ab", 30, temperature=1.0, top_k=None, generator=rng)

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)


def test_tokens_past_the_byte_range_are_never_emitted() -> None:
    logits = torch.zeros(260)
    logits[256:] = 50.0  # the model would rather emit its special tokens than any byte
    out = generate(FixedLogits(logits), b"x", 50, temperature=1.0, top_k=None)
    assert len(out) == 50
    model = RecurrentLM(vocab_size=260, embed_dim=8, hidden_dim=8, num_layers=1)
    with torch.no_grad():
        model.head[-1].bias[256:] = 50.0
    assert len(generate(model, b"x", 20, temperature=1.0, top_k=None)) == 20


def test_zero_temperature_is_greedy_and_top_k_cuts_the_rest() -> None:
    logits = torch.full((256,), -5.0)
    logits[ord("A")], logits[ord("B")] = 3.0, 2.0
    assert generate(FixedLogits(logits), b"x", 4, temperature=0) == b"AAAA"
    rng = torch.Generator().manual_seed(0)
    out = generate(FixedLogits(logits), b"x", 40, temperature=5.0, top_k=2, generator=rng)
    assert set(out) == {ord("A"), ord("B")}


def test_context_is_clamped_to_max_len_and_modes_are_restored() -> None:
    model = TransformerLM(dim=16, num_layers=1, num_heads=2, max_len=8).train()
    model.blocks[0].eval()  # a submodule's own mode must survive too
    assert len(generate(model, b"abcd", 10, context=256)) == 10
    assert model.training and model.head.training and not model.blocks[0].training
    stub = FixedLogits(torch.zeros(256))
    generate(stub, b"abc", 10, context=5)
    assert stub.longest == 5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prompt": b""}, "prompt is empty"),
        ({"max_new_tokens": -1}, "max_new_tokens=-1"),
        ({"temperature": -0.5}, "temperature=-0.5"),
        ({"top_k": 0}, "top_k=0"),
        ({"context": 0}, "context=0"),
    ],
)
def test_bad_arguments_are_user_errors(kwargs: dict[str, Any], match: str) -> None:
    arguments = {"prompt": b"x", "max_new_tokens": 1, **kwargs}
    with pytest.raises(ShardwiseError, match=match):
        generate(FixedLogits(torch.zeros(256)), **arguments)


def test_a_model_with_fewer_than_256_logits_is_refused() -> None:
    with pytest.raises(ShardwiseError, match="vocab_size >= 256"):
        generate(FixedLogits(torch.zeros(100)), b"x", 1)
