"""Transparency: a model sharded over its data ranks (FSDP2) trains exactly like one process,
alone and with tensor splits, pipeline stages, several copies (hybrid), gradient accumulation
and evaluations that deal ranks different numbers of batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from parallel_cases import (
    CLIP,
    LR,
    Trained,
    assert_ranks_match,
    layout_for,
    parallelism,
    replica_share,
    step_batches,
    tiny_model,
    train_layout,
    train_single,
    whole_tensors,
)
from ranks import run_ranks
from shardwise.data.batch import collate
from shardwise.distributed import DistEnv
from shardwise.loss import token_loss_sum
from shardwise.parallel.parallelize import parallelize
from shardwise.train.evaluation import HeldOutSet, held_out_loss


def accumulated_single(kind: str) -> Trained:
    """One process, each step's batch taken as two halves whose gradients add up."""
    model = tiny_model(kind)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    trained = Trained(state={})
    for batch in step_batches():
        for half in (replica_share(batch, 2, 0), replica_share(batch, 2, 1)):
            loss = token_loss_sum(model(half.tokens), half.targets) / batch.step_tokens
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad()
    trained.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return trained


def train_accumulating(env: DistEnv, kind: str) -> dict:
    """Two micro-steps a step on each of two sharded data ranks: the first skips the
    reduce-scatter (its gradients stay unsharded and whole), the second sends both."""
    layout = layout_for(env, dp=2, shard=2)
    model = parallelize(tiny_model(kind), parallelism(layout, shard="full"), env)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    whole_between = []
    for batch in step_batches():
        mine = replica_share(batch, 2, layout.dp_rank)
        micro = [replica_share(mine, 2, 0), replica_share(mine, 2, 1)]
        model.forward_backward(micro[0].tokens, micro[0].targets, batch.step_tokens, sync=False)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        whole_between.append(bool(grads) and not any(isinstance(g, DTensor) for g in grads))
        model.forward_backward(micro[1].tokens, micro[1].targets, batch.step_tokens)
        model.clip_grad_norm(CLIP)
        optimizer.step()
        optimizer.zero_grad()
    return {"state": whole_tensors(model.state_dict()), "whole_between": whole_between}


def evaluate_unevenly(env: DistEnv) -> dict:
    """Three held-out batches dealt over two data ranks (two and one) between training steps,
    as evaluations deal them: each rank gathers block by block in every forward, so both run
    two forwards (the second rank's second counted nowhere); the loss is the whole set's."""
    layout = layout_for(env, dp=2, shard=2)
    model = parallelize(tiny_model("transformer"), parallelism(layout, shard="full"), env)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    batches = step_batches()
    for batch in batches[:2]:
        mine = replica_share(batch, 2, layout.dp_rank)
        model.forward_backward(mine.tokens, mine.targets, batch.step_tokens)
        optimizer.step()
        optimizer.zero_grad()
    rng = np.random.default_rng(3)
    sequences = [rng.integers(0, 256, size=n) for n in (9, 12, 7, 15, 11, 8)]
    held_out = HeldOutSet(
        batches=tuple(tuple(sequences[i : i + 2]) for i in (0, 2, 4)),
        tokens=sum(len(seq) - 1 for seq in sequences),
        available=sum(len(seq) - 1 for seq in sequences),
    )
    loss = held_out_loss(model, held_out, env)
    state = whole_tensors(model.state_dict())
    reference = tiny_model("transformer")
    reference.load_state_dict(state)
    reference.eval()
    whole = collate(sequences, step_tokens=1)
    with torch.no_grad():
        expected = token_loss_sum(reference(whole.tokens), whole.targets) / whole.n_tokens
    mine = replica_share(batches[2], 2, layout.dp_rank)  # and training goes on, sharded again
    model.forward_backward(mine.tokens, mine.targets, batches[2].step_tokens)
    sharded = all(isinstance(p, DTensor) for p in model.parameters())
    return {"loss": loss, "expected": float(expected), "sharded": sharded, "state": state}


def two_rank_worker(env: DistEnv) -> dict:
    layout = layout_for(env, dp=2, shard=2)
    model = parallelize(tiny_model("transformer"), parallelism(layout, shard="full"), env)
    return {
        "layout": {
            "fsdp": isinstance(model.module, FSDPModule),
            "shapes": {n: tuple(p.to_local().shape) for n, p in model.named_parameters()},
            "whole": model.holds_whole_model,
        },
        "full transformer": train_layout(env, "transformer", {"dp": 2, "shard": 2}, shard="full"),
        "grads transformer": train_layout(env, "transformer", {"dp": 2, "shard": 2}, shard="grads"),
        "full lstm": train_layout(env, "lstm", {"dp": 2, "shard": 2}, shard="full"),
        "accumulating": train_accumulating(env, "transformer"),
        "evaluating": evaluate_unevenly(env),
    }


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_ranks(two_rank_worker, world=2, timeout_s=100)


@pytest.mark.timeout(120)
def test_each_data_rank_holds_half_of_every_parameter(two_ranks: list[dict]) -> None:
    layout = two_ranks[0]["layout"]
    assert layout["fsdp"] and not layout["whole"]  # not wrapped in DDP, not taken for whole
    assert layout["shapes"]["head.1.weight"] == (128, 16)  # 256 vocabulary rows, half each
    assert layout["shapes"]["blocks.0.mlp.fc1.weight"] == (32, 16)
    assert layout["shapes"]["blocks.0.ln1.weight"] == (8,)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("case", "kind"),
    [
        ("full transformer", "transformer"),
        ("grads transformer", "transformer"),
        ("full lstm", "lstm"),
    ],
)
def test_sharded_data_ranks_train_exactly_like_one_process(
    two_ranks: list[dict], case: str, kind: str
) -> None:
    assert_ranks_match([result[case] for result in two_ranks], train_single(kind))


@pytest.mark.timeout(120)
def test_accumulation_skips_the_reduce_scatter_and_ends_exactly(two_ranks: list[dict]) -> None:
    reference = accumulated_single("transformer").state
    for result in two_ranks:
        accumulating = result["accumulating"]
        assert accumulating["whole_between"] == [True] * 4  # unsharded until the last micro-step
        for name, value in reference.items():
            torch.testing.assert_close(accumulating["state"][name], value, atol=1e-5, rtol=0)


@pytest.mark.timeout(120)
def test_ranks_evaluate_different_numbers_of_batches_then_train_on(two_ranks: list[dict]) -> None:
    first, second = (result["evaluating"] for result in two_ranks)
    assert first["loss"] == second["loss"] == pytest.approx(first["expected"], rel=1e-5)
    assert first["sharded"] and second["sharded"]
    for name, value in first["state"].items():
        torch.testing.assert_close(second["state"][name], value, atol=0, rtol=0)


def placement(env: DistEnv, sizes: dict[str, int], mode: str, name: str) -> tuple:
    """How parameter `name` is laid out: its mesh's dimensions, placements and local shape."""
    layout = layout_for(env, **sizes)
    model = parallelize(tiny_model("transformer"), parallelism(layout, shard=mode), env)
    param = dict(model.named_parameters())[name]
    names = param.device_mesh.mesh_dim_names
    return names, [type(p).__name__ for p in param.placements], tuple(param.to_local().shape)


def four_rank_worker(env: DistEnv) -> dict:
    fc1 = "blocks.0.mlp.fc1.weight"  # 64 x 16: tensor parallelism splits its rows
    return {
        "placements": {
            "dp2xtp2": placement(env, {"dp": 2, "tp": 2, "shard": 2}, "full", fc1),
            "hybrid dp4": placement(env, {"dp": 4, "shard": 2}, "hybrid", fc1),
        },
        "dp2xtp2 full": train_layout(
            env, "transformer", {"dp": 2, "tp": 2, "shard": 2}, shard="full"
        ),
        "pp2xdp2 full": train_layout(
            env, "transformer", {"dp": 2, "pp": 2, "shard": 2}, shard="full", microbatches=2
        ),
        # Two copies of the state, each sharded over two data ranks: two machines' worth.
        "hybrid dp4": train_layout(env, "transformer", {"dp": 4, "shard": 2}, shard="hybrid"),
    }


@pytest.fixture(scope="module")
def four_ranks() -> list[dict]:
    return run_ranks(four_rank_worker, world=4, timeout_s=120)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("case", ["dp2xtp2 full", "pp2xdp2 full", "hybrid dp4"])
def test_sharding_composes_with_splits_stages_and_copies(four_ranks: list[dict], case: str) -> None:
    assert_ranks_match([result[case] for result in four_ranks], train_single("transformer"))


@pytest.mark.timeout(150)
def test_splits_and_copies_lay_parameters_out_on_two_dimensional_meshes(
    four_ranks: list[dict],
) -> None:
    placements = four_ranks[0]["placements"]
    names, kinds, shape = placements["dp2xtp2"]
    assert names == ("dp", "tp") and shape == (16, 16)  # a quarter of the rows on each rank
    assert all("Shard" in kind for kind in kinds)
    assert placements["hybrid dp4"] == (("replicate", "shard"), ["Replicate", "Shard"], (32, 16))
