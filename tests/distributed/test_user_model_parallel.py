"""Users' own models under --tp and --pp: split by structure and trained like one process, or
refused before training when a layout would train something else."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

import shardwise
from helpers import assert_adam_equivalent_weights, final_weights, metrics, quick_config, train
from parallel_cases import layout_for, parallelism
from ranks import run_ranks
from shardwise.distributed import DistEnv
from shardwise.errors import ShardwiseError
from shardwise.models.contract import PLAIN
from shardwise.parallel.layer_split import LayerSplit
from shardwise.parallel.mesh import Layout
from shardwise.parallel.parallelize import apply_tensor_parallel, parallelize, split_probe
from user_models import odd_names


class WronglyPaired(nn.Module):
    """`a` feeds `b` through a norm over all features (or an attention that also reads `k`):
    split as a Megatron pair, one changes the outputs and the other breaks the forward."""

    def __init__(self, attention: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attention = attention
        self.embed = nn.Embedding(32, 16)
        self.a, self.k, self.b = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.head = nn.Linear(16, 32)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x, h = self.embed(tokens), self.a(self.embed(tokens))
        if self.attention:
            h = F.scaled_dot_product_attention(h, self.k(x), x, is_causal=True)
        else:
            h = h / h.norm(dim=-1, keepdim=True)
        return self.head(x + self.b(h))


def wrongly_split(attention: bool, layout: Layout, env: DistEnv) -> str:
    """The error of forcing the pair (a, b) the structural probe refuses; "" when none."""
    model = WronglyPaired(attention)
    plan = LayerSplit(2, {"a": ColwiseParallel(), "b": RowwiseParallel()}, {}, token_bound=32)
    try:
        probe = split_probe(model, layout, [], plan, PLAIN, env.device)
        apply_tensor_parallel(model, layout, plan, probe)
    except ShardwiseError as error:
        return str(error)
    return ""


def split_worker(env: DistEnv) -> dict[str, Any]:
    layout = layout_for(env, tp=2)
    torch.manual_seed(0)
    model = parallelize(
        odd_names(256), parallelism(layout), env
    )  # checks its own split on a probe batch
    shards = {
        name: tuple(p.to_local().shape)
        for name, p in model.named_parameters()
        if isinstance(p, DTensor)
    }
    # Forced on, pairings the probe refuses must be caught by the workers' check of the split
    # against the whole model.
    return {
        "shards": shards,
        "norm": wrongly_split(False, layout, env),
        "attention": wrongly_split(True, layout, env),
    }


@pytest.mark.timeout(90)
def test_odd_names_layers_are_split_and_a_wrong_split_is_caught() -> None:
    ranks = run_ranks(split_worker, world=2, timeout_s=60)
    for result in ranks:
        assert result["shards"]["widen.weight"] == (64, 32)  # half of widen's 128 output rows
        assert result["shards"]["narrow.weight"] == (32, 64)  # half of narrow's 128 inputs
        assert result["shards"]["readout.weight"] == (128, 32)
        assert result["shards"]["lookup.weight"] == (128, 32)
        assert "memory.weight_ih_l0" not in result["shards"]
        assert result["norm"].startswith("--tp 2: splitting a, b changes the model's outputs")
        assert result["attention"].startswith("--tp 2: splitting a, b breaks the model's forward")


@pytest.mark.timeout(150)
def test_tensor_parallel_odd_names_trains_like_one_process(corpus: Path, tmp_path: Path) -> None:
    common = {"model": "user_models:odd_names", "batch_size": 8, "max_steps": 3}
    train(quick_config(corpus, tmp_path / "single", **common), nproc=1)
    summary = train(quick_config(corpus, tmp_path / "tp", tp=2, **common), nproc=2)
    assert summary["world_size"] == 2
    for one, two in zip(metrics(tmp_path / "single"), metrics(tmp_path / "tp"), strict=True):
        assert one["loss"] == pytest.approx(two["loss"], rel=1e-5)
    assert_adam_equivalent_weights(
        final_weights(tmp_path / "single"), final_weights(tmp_path / "tp"), lr=3e-3
    )


@pytest.mark.timeout(150)
def test_a_faithful_pipeline_trains_like_one_process_and_an_unfaithful_one_is_refused(
    corpus: Path, tmp_path: Path
) -> None:
    common = {"batch_size": 8, "max_steps": 3, "max_len": 64}
    blocks = {"model": "user_models:mask_in_blocks", **common}
    train(quick_config(corpus, tmp_path / "single", **blocks), nproc=1)
    piped = quick_config(corpus, tmp_path / "pp", pp=2, microbatches=2, schedule="gpipe", **blocks)
    train(piped, nproc=2)
    for one, two in zip(metrics(tmp_path / "single"), metrics(tmp_path / "pp"), strict=True):
        assert one["loss"] == pytest.approx(two["loss"], rel=1e-5)
    assert_adam_equivalent_weights(
        final_weights(tmp_path / "single"), final_weights(tmp_path / "pp"), lr=3e-3
    )

    unfaithful = quick_config(
        corpus, tmp_path / "refused", model="user_models:mask_in_forward", pp=2, **common
    )
    with pytest.raises(ShardwiseError, match="MaskInForward's layers chained as layer_names"):
        shardwise.run(unfaithful.model_copy(update={"nproc": 2}))
    assert not (tmp_path / "refused" / "metrics.jsonl").exists()
