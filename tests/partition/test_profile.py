"""Profiling pieces: every piece measured, memory counted, the model left untouched."""

from __future__ import annotations

import torch

from parallel_cases import tiny_model
from shardwise.partition import profile_pieces
from shardwise.partition.profile import STATE_COPIES


def test_every_piece_gets_a_time_and_its_parameters_counted() -> None:
    model = tiny_model("transformer")
    costs = profile_pieces(model, torch.randint(0, 256, (2, 8)), repeats=1)
    assert costs[0].names == ("embed", "pos")
    assert all(c.time_s > 0 for c in costs)
    assert sum(c.param_count for c in costs) == sum(p.numel() for p in model.parameters())
    assert all(c.state_bytes == STATE_COPIES * c.param_bytes for c in costs)


def test_activations_grow_with_the_micro_batch() -> None:
    model = tiny_model("lstm")
    small = profile_pieces(model, torch.zeros(2, 8, dtype=torch.long), repeats=1)
    large = profile_pieces(model, torch.zeros(8, 8, dtype=torch.long), repeats=1)
    for a, b in zip(small[1:], large[1:], strict=True):
        assert b.activation_bytes > a.activation_bytes > 0


def test_profiling_leaves_gradients_and_random_state_alone() -> None:
    model = tiny_model("gru")
    state = torch.get_rng_state()
    profile_pieces(model, torch.zeros(2, 4, dtype=torch.long), repeats=2)
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(state, torch.get_rng_state())
