"""Tensor-parallel plans for models we did not write: by what layers do, never by their names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel

import shardwise
from helpers import quick_config
from parallel_cases import tiny_model
from shardwise.errors import ShardwiseError
from shardwise.parallel.tensor_parallel import (
    find_layer_split,
    require_split,
    tensor_parallel_styles,
)
from user_models import odd_names

VOCAB, DIM = 64, 16


def kinds(plan: dict) -> dict[str, str]:
    return {name: type(style).__name__ for name, style in plan.items()}


class TwoLinears(nn.Module):
    """Embedding, `fc1` -> between -> `fc2` (named like an MLP whatever it does), head."""

    def __init__(self, between: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.between = between
        self.embed = nn.Embedding(VOCAB, DIM)
        self.fc1, self.norm, self.fc2 = (
            nn.Linear(DIM, 4 * DIM),
            nn.LayerNorm(4 * DIM),
            nn.Linear(4 * DIM, DIM),
        )
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        h = self.fc1(x)
        if self.between == "gelu":
            y = self.fc2(F.gelu(h))
        elif self.between == "layernorm":  # mixes features: a shard cannot compute it alone
            y = self.fc2(self.norm(h))
        elif self.between == "residual":  # fc2 also reads the embedding
            y = self.fc2(F.gelu(h) + x.repeat(1, 1, 4))
        else:  # "also read": fc1's output reaches the logits besides through fc2
            y = self.fc2(F.gelu(h)) + h.mean(-1, keepdim=True)
        return self.head(x + y)  # fmt: skip


class Attention(nn.Module):
    """Causal attention in two common shapes, then an MLP that may be split."""

    def __init__(self, fused: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fused, self.heads = fused, 2
        self.embed = nn.Embedding(VOCAB, DIM)
        if fused:  # one projection whose output is split into heads by reshape
            self.qkv = nn.Linear(DIM, 3 * DIM)
        else:  # three projections as wide as the output projection's input
            self.q, self.k, self.v = (nn.Linear(DIM, DIM) for _ in range(3))
        self.o = nn.Linear(DIM, DIM)
        self.up, self.down = nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        batch, length, _ = x.shape
        if self.fused:
            q, k, v = self.qkv(x).view(batch, length, self.heads, 3, -1).unbind(3)
        else:
            q, k, v = (p(x).view(batch, length, self.heads, -1) for p in (self.q, self.k, self.v))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(y.transpose(1, 2).reshape(batch, length, DIM))
        return self.head(x + self.down(F.relu(self.up(x))))


def test_odd_names_are_split_by_structure() -> None:
    plan = find_layer_split(odd_names(256), 2)
    assert kinds(plan.styles) == {
        "lookup": "RowwiseParallel",
        "widen": "ColwiseParallel",
        "narrow": "RowwiseParallel",
        "readout": "ColwiseParallel",
    }
    assert plan.pairs == {"widen": "narrow"}
    head = plan.styles["readout"]
    assert isinstance(head, ColwiseParallel) and isinstance(head.output_layouts[0], Replicate)
    assert isinstance(plan.styles["lookup"].input_layouts[0], Replicate)
    assert "widen: column-wise, feeding narrow" in plan.describe()


@pytest.mark.parametrize("between", ["layernorm", "residual", "also read"])
def test_linears_not_joined_by_elementwise_operations_alone_stay_whole(between: str) -> None:
    # Named fc1 and fc2 like an MLP: each case breaks a different one of the probe's checks.
    plan = find_layer_split(TwoLinears(between), 2)
    assert "fc1" not in plan.styles and "fc2" not in plan.styles
    assert kinds(plan.styles) == {"embed": "RowwiseParallel", "head": "ColwiseParallel"}


def test_an_mlp_of_two_linears_and_a_gelu_is_a_pair() -> None:
    assert find_layer_split(TwoLinears("gelu"), 2).pairs == {"fc1": "fc2"}


@pytest.mark.parametrize("fused", [True, False])
def test_attention_projections_are_not_paired_but_the_mlp_beside_them_is(fused: bool) -> None:
    plan = find_layer_split(Attention(fused), 2)
    assert plan.pairs == {"up": "down"}
    assert not {"qkv", "q", "k", "v", "o"} & set(plan.styles)


def test_layers_tied_to_another_are_left_whole() -> None:
    model = TwoLinears("gelu")
    model.head.weight = model.embed.weight  # weight tying, as GPT-2 does
    plan = find_layer_split(model, 2)
    assert "head" not in plan.styles and "embed" not in plan.styles
    assert plan.whole["head"] == "its weight is tied to another module's"
    assert plan.pairs == {"fc1": "fc2"}


class OneHotGRU(nn.Module):
    """One-hot tokens into a GRU whose state is the logits: nothing tensor parallelism splits."""

    def __init__(self, vocab_size: int = VOCAB) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.rnn = nn.GRU(vocab_size, vocab_size, batch_first=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.rnn(F.one_hot(tokens, self.vocab_size).float())[0]


def one_hot_gru(vocab_size: int) -> OneHotGRU:
    return OneHotGRU(vocab_size)


def test_a_model_with_nothing_to_split_is_refused_in_one_line() -> None:
    plan = find_layer_split(OneHotGRU(), 2, vocab_size=VOCAB)
    assert plan.styles == {}
    with pytest.raises(ShardwiseError) as refused:
        require_split(plan, OneHotGRU())
    message = str(refused.value)
    assert message.startswith("--tp 2: OneHotGRU has no layer tensor parallelism can split")
    assert message.endswith("train without --tp") and "\n" not in message


def test_the_preflight_refuses_tp_with_nothing_to_split(corpus: Path, tmp_path: Path) -> None:
    # tests/ is on the path, so this very file is the factory's module.
    spec = "parallel.test_structural_split:one_hot_gru"
    config = quick_config(corpus, tmp_path / "run", model=spec, tp=2, nproc=2)
    with pytest.raises(ShardwiseError, match="OneHotGRU has no layer tensor parallelism can split"):
        shardwise.plan(config)


def test_layers_that_do_not_split_evenly_say_so() -> None:
    plan = find_layer_split(odd_names(255), 2)
    assert plan.whole == {"readout": "255 entries do not split over 2 ranks"} | {
        "lookup": "255 entries do not split over 2 ranks"
    }
    assert plan.pairs == {"widen": "narrow"}


@pytest.mark.parametrize("kind", ["lstm", "transformer"])
def test_built_in_models_keep_their_named_plan(kind: str) -> None:
    model = tiny_model(kind)
    assert kinds(find_layer_split(model, 2).styles) == kinds(tensor_parallel_styles(model, 2))


def test_a_plan_keeps_a_pair_whose_halves_share_a_stage() -> None:
    model = TwoLinears("gelu")
    plan = find_layer_split(model, 2)
    only_fc1 = nn.Module()
    only_fc1.fc1 = model.fc1
    assert "fc1" not in plan.within(only_fc1)  # its reader is on another stage
    assert set(plan.within(model)) == {"embed", "fc1", "fc2", "head"}


def test_the_dry_run_shows_what_is_split(corpus: Path, tmp_path: Path) -> None:
    config = quick_config(corpus, tmp_path / "run", model="user_models:odd_names", tp=2, nproc=2)
    shown = shardwise.plan(config).describe()
    assert "widen: column-wise, feeding narrow" in shown
    assert "lookup: row-wise over the" in shown
