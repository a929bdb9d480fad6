"""Token-budget batching is transparent: the loss and gradient of a step split into bucketed,
balanced (and, for the Transformer, packed) batches over ranks and micro-steps equal those of
the plain computation over the same samples in one padded batch."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shardwise.data.batch import IGNORE_INDEX, Batch, collate, pack_collate
from shardwise.data.cost import cost_model_for
from shardwise.data.token_sampler import StepPlan, TokenBudgetSampler
from shardwise.models import RecurrentLM, TransformerLM

WORLD_SIZE, GRAD_ACCUM = 2, 2


def sequences(count: int = 40, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=int(n)) for n in rng.integers(2, 30, size=count)]


def loss_sum(model: nn.Module, batch: Batch, **kwargs: torch.Tensor) -> torch.Tensor:
    """The trainer's per-micro-batch loss: summed token cross-entropy."""
    logits = model(batch.tokens, **kwargs)
    return F.cross_entropy(
        logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def plain(model: nn.Module, data: list[np.ndarray]) -> tuple[float, list[torch.Tensor]]:
    """One padded batch of every sample, token-mean loss: what a single process computes."""
    batch = collate(data, step_tokens=0)
    loss = loss_sum(model, batch) / batch.n_tokens
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters()]


def split(
    model: nn.Module, data: list[np.ndarray], plan: StepPlan, pack: bool, lengths: bool
) -> tuple[float, list[torch.Tensor]]:
    """The step as the trainer runs it on every rank, with DDP's gradient average by hand."""
    grads = [torch.zeros_like(p) for p in model.parameters()]
    total = 0.0
    for rank_batches in plan.batches:
        model.zero_grad()
        for indices in rank_batches:
            chosen = [data[i] for i in indices]
            batch = (pack_collate if pack else collate)(chosen, plan.step_tokens)
            kwargs = batch.model_kwargs(torch.device("cpu"))
            if lengths:
                kwargs["lengths"] = batch.lengths
            micro = loss_sum(model, batch, **kwargs)
            (micro * WORLD_SIZE / plan.step_tokens).backward()
            total += float(micro.detach()) / plan.step_tokens
        for mine, p in zip(grads, model.parameters(), strict=True):
            mine += p.grad / WORLD_SIZE  # DDP averages over ranks
    return total, grads


def check_transparent(model: nn.Module, name: str, pack: bool, lengths: bool) -> None:
    data = sequences()
    sampler = TokenBudgetSampler(
        np.array([len(s) for s in data]),
        tokens_per_batch=96,
        world_size=WORLD_SIZE,
        grad_accum=GRAD_ACCUM,
        cost_model=cost_model_for(name),
        packing=pack,
    )
    plan = next(sampler.steps())
    chosen = sorted(i for rank in plan.batches for batch in rank for i in batch)
    assert 4 <= len(chosen) < len(data)  # a real split of part of the data
    reference = copy.deepcopy(model)
    expected_loss, expected_grads = plain(reference, [data[i] for i in chosen])
    loss, grads = split(model, data, plan, pack, lengths)
    assert loss == pytest.approx(expected_loss, rel=1e-12)
    for got, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("lengths", [True, False], ids=["packed-sequence", "over-padding"])
def test_lstm_buckets_match_the_plain_loss_and_gradient(lengths: bool) -> None:
    torch.manual_seed(0)
    model = RecurrentLM(embed_dim=8, hidden_dim=12, num_layers=2).double()
    check_transparent(model, "lstm", pack=False, lengths=lengths)


@pytest.mark.parametrize("pack", [True, False], ids=["packed-rows", "padded"])
def test_transformer_packed_rows_match_the_plain_loss_and_gradient(pack: bool) -> None:
    torch.manual_seed(0)
    model = TransformerLM(dim=16, num_layers=2, num_heads=2, max_len=32).double()
    check_transparent(model, "transformer", pack=pack, lengths=False)
