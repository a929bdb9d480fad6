"""What every built-in model promises: shapes, padding transparency, gradients, cut-able pieces."""

from __future__ import annotations

import pytest
import torch

from shardwise.models import BUILTIN_MODELS, RecurrentLM, TransformerLM, build_model

TINY = {
    "lstm": lambda: RecurrentLM(embed_dim=16, hidden_dim=24, num_layers=2, cell="lstm"),
    "gru": lambda: RecurrentLM(embed_dim=16, hidden_dim=24, num_layers=3, cell="gru"),
    "transformer": lambda: TransformerLM(dim=32, num_layers=2, num_heads=4, max_len=32),
}
LENGTHS = [7, 3, 5, 1]


@pytest.fixture(params=BUILTIN_MODELS)
def tiny(request: pytest.FixtureRequest) -> torch.nn.Module:
    torch.manual_seed(0)
    return TINY[request.param]().eval()


def padded_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    rng = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (len(LENGTHS), max(LENGTHS)), generator=rng)
    return tokens, torch.tensor(LENGTHS)


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_builtin_forward_shapes(name: str) -> None:
    model = build_model(name)
    tokens, lengths = padded_batch()
    assert model(tokens).shape == (4, 7, 256)
    assert model(tokens, lengths).shape == (4, 7, 256)


def test_padded_batch_matches_each_sequence_run_alone(tiny: torch.nn.Module) -> None:
    tokens, lengths = padded_batch()
    with torch.no_grad():
        batched = tiny(tokens, lengths)
        for row, length in enumerate(LENGTHS):
            alone = tiny(tokens[row : row + 1, :length])[0]
            torch.testing.assert_close(batched[row, :length], alone, atol=1e-5, rtol=0)


def test_padding_values_do_not_reach_real_positions(tiny: torch.nn.Module) -> None:
    tokens, lengths = padded_batch()
    is_padding = torch.arange(tokens.shape[1]) >= lengths[:, None]
    repadded = torch.where(is_padding, torch.randint_like(tokens, 0, 256), tokens)
    with torch.no_grad():
        before, after = tiny(tokens, lengths), tiny(repadded, lengths)
    torch.testing.assert_close(before[~is_padding], after[~is_padding], atol=1e-6, rtol=0)


def test_gradients_reach_every_parameter(tiny: torch.nn.Module) -> None:
    tokens, lengths = padded_batch()
    is_real = torch.arange(tokens.shape[1]) < lengths[:, None]
    logits = tiny.train()(tokens, lengths)
    torch.nn.functional.cross_entropy(logits[is_real], tokens[is_real]).backward()
    for name, parameter in tiny.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_layer_names_are_real_pieces_that_hold_every_parameter(tiny: torch.nn.Module) -> None:
    names = tiny.layer_names()
    assert names[0] == "embed" and names[-1] == "head"
    pieces = [tiny.get_submodule(name) for name in names]
    in_pieces = [id(p) for piece in pieces for p in piece.parameters()]
    assert sorted(in_pieces) == sorted(id(p) for p in tiny.parameters())
