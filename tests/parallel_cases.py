"""Tiny models, a few fixed batches, and the single-process training every layout must match.

    reference = train_single("lstm")
    results = run_ranks(train_layout_worker, 2, ("lstm", {"pp": 2}))
    assert_same_state(merge_states(results), reference.state)

Batches vary in length from step to step and carry padding, so a pipeline meets several
shapes and ignored targets. Every step clips at a norm the gradients exceed, so clipping is
compared too. AdamW turns every gradient into an update of about the learning rate, so a
gradient that is wrong anywhere shows in the weights; a rate of 1e-3 keeps float rounding
(which Adam's normalisation amplifies where gradients nearly cancel) below the 1e-5 tolerance.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ranks import COLLECTIVE_TIMEOUT_S
from shardwise.data.batch import Batch
from shardwise.distributed import DistEnv, all_reduce_sum
from shardwise.loss import IGNORE_INDEX, token_loss_sum
from shardwise.models import RecurrentLM, TransformerLM
from shardwise.parallel.mesh import Layout
from shardwise.parallel.parallelism import Parallelism, PipelineStages
from shardwise.parallel.parallelize import parallelize
from shardwise.parallel.schedules import pipeline_schedule
from shardwise.parallel.sharding import Sharding
from shardwise.parallel.sync import SyncStrategy, sync_strategy

LENGTHS = (5, 9, 12, 5)
ROWS = 8
LR = 1e-3
CLIP = 0.1
CUTS = {2: ["blocks.1"], 3: ["blocks.1", "head"], 4: ["blocks.0", "blocks.1", "blocks.2"]}


@dataclass
class Trained:
    """Weights by parameter name (whole tensors), and each step's loss and gradient norm."""

    state: dict[str, torch.Tensor]
    losses: list[float] = field(default_factory=list)
    norms: list[float] = field(default_factory=list)


def parallelism(
    layout: Layout,
    *,
    cuts: list[str] | tuple[str, ...] = (),
    schedule: str = "1f1b",
    microbatches: int = 1,
    sync: str | SyncStrategy = "allreduce",
    length_bucket: int = 32,
    autocast: Any = None,
    shard: str = "none",
) -> Parallelism:
    """The Parallelism a test asks for in the words of its settings (pipeline only with pp>1;
    `shard`: a sharding mode over the layout's `shard` data ranks)."""
    stages = None
    if layout.pp > 1:
        stages = PipelineStages(
            tuple(cuts), pipeline_schedule(schedule), microbatches, length_bucket
        )
    strategy = sync_strategy(sync) if isinstance(sync, str) else sync
    extra: dict[str, Any] = {} if autocast is None else {"autocast": autocast}
    if shard != "none":
        extra["entries"] = {"sharding": Sharding(shard, layout.shard, layout.replicas)}
    return Parallelism(layout, strategy, stages, **extra)


def tiny_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "transformer":
        return TransformerLM(dim=16, num_layers=3, num_heads=2, max_len=32)
    return RecurrentLM(embed_dim=8, hidden_dim=16, num_layers=3, cell=kind)


def step_batches() -> list[Batch]:
    """One batch per step, `ROWS` rows, lengths from `LENGTHS`, rows padded at random."""
    rng = torch.Generator().manual_seed(1)
    batches = []
    for length in LENGTHS:
        tokens = torch.randint(0, 256, (ROWS, length), generator=rng)
        targets = torch.randint(0, 256, (ROWS, length), generator=rng)
        lengths = torch.randint(1, length + 1, (ROWS,), generator=rng)
        lengths[0] = length
        targets[torch.arange(length)[None] >= lengths[:, None]] = IGNORE_INDEX
        batches.append(Batch(tokens, targets, lengths, step_tokens=int(lengths.sum())))
    return batches


def replica_share(batch: Batch, dp: int, dp_rank: int) -> Batch:
    """Replica `dp_rank`'s rows of a step; `step_tokens` stays the whole step's count."""
    rows = batch.tokens.shape[0] // dp
    mine = slice(dp_rank * rows, (dp_rank + 1) * rows)
    return dataclasses.replace(
        batch, tokens=batch.tokens[mine], targets=batch.targets[mine], lengths=batch.lengths[mine]
    )


def train_single(kind: str, clip_norm: float = CLIP) -> Trained:
    """Plain training in this process: the reference."""
    model = tiny_model(kind)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    trained = Trained(state={})
    for batch in step_batches():
        loss = token_loss_sum(model(batch.tokens), batch.targets) / batch.step_tokens
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        optimizer.step()
        optimizer.zero_grad()
        trained.losses.append(float(loss.detach()))
        trained.norms.append(float(norm))
    trained.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return trained


def train_layout(env: DistEnv, kind: str, sizes: dict[str, int], **options: Any) -> Trained:
    """This rank's share of training `kind` on the layout `sizes` ({"dp": 2, "pp": 2, ...})."""
    layout = layout_for(env, **sizes)
    options.setdefault("microbatches", 4)
    # Exact lengths: steps of length 5, 9, 12 and 5 need three stage shapes, the last reused.
    options.setdefault("length_bucket", 1)
    setting = parallelism(layout, cuts=CUTS.get(layout.pp, []), **options)
    model = parallelize(tiny_model(kind), setting, env)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    trained = Trained(state={})
    for batch in step_batches():
        mine = replica_share(batch, layout.dp, layout.dp_rank)
        owned = model.forward_backward(mine.tokens, mine.targets, batch.step_tokens)
        norm = model.clip_grad_norm(CLIP)
        optimizer.step()
        optimizer.zero_grad()
        loss = all_reduce_sum(owned.detach().double().reshape(1), env) / batch.step_tokens
        trained.losses.append(float(loss))
        trained.norms.append(float(norm))
    trained.state = whole_tensors(model.state_dict())
    return trained


def layout_for(env: DistEnv, shard: int = 1, **sizes: int) -> Layout:
    """The layout for `sizes` (`shard`: data ranks per copy of the state), its groups timing
    out as quickly as the test's default group."""
    layout = dataclasses.replace(Layout.for_world(env.world_size, **sizes), shard=shard)
    return layout.build(env, COLLECTIVE_TIMEOUT_S)


def whole_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gather tensor-parallel shards (a collective: every tensor-parallel rank must call it)."""
    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
        for k, v in state.items()
    }


def merge_states(results: list[Trained]) -> dict[str, torch.Tensor]:
    merged: dict[str, torch.Tensor] = {}
    for result in results:
        merged.update(result.state)
    return merged


def assert_ranks_match(ranks: list[Trained], reference: Trained, atol: float = 1e-5) -> None:
    """Together the ranks hold every weight; each one's weights, losses and norms match."""
    assert sorted(merge_states(ranks)) == sorted(reference.state)
    for rank in ranks:
        assert_same_state(rank.state, {k: reference.state[k] for k in rank.state}, atol)
        assert rank.losses == pytest.approx(reference.losses, rel=1e-5)
        assert rank.norms == pytest.approx(reference.norms, rel=1e-5)


def assert_same_state(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 1e-5
) -> None:
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, atol=atol, rtol=0, msg=name)
