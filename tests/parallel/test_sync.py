"""The synchronisation seam: a strategy's hooks run at the same places in every loop."""

from __future__ import annotations

from contextlib import AbstractContextManager

import pytest
import torch
from torch import nn

from parallel_cases import parallelism, replica_share, step_batches, tiny_model
from shardwise.config import TrainConfig
from shardwise.distributed import DistEnv
from shardwise.errors import ShardwiseError
from shardwise.parallel.mesh import Layout
from shardwise.parallel.parallelize import parallelize
from shardwise.parallel.sync import AllReduceEveryStep, sync_strategy
from shardwise.session import Session

ALONE = DistEnv(0, 1, 0, 1, torch.device("cpu"))


class RecordingStrategy(AllReduceEveryStep):
    """Today's strategy, writing down when the loop calls it."""

    name = "recording"

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def wrap(self, module: nn.Module, layout: Layout, env: DistEnv) -> nn.Module:
        self.calls.append("wrap")
        return super().wrap(module, layout, env)

    def skipping(self, module: nn.Module) -> AbstractContextManager[None]:
        self.calls.append("skipping")
        return super().skipping(module)

    def after_backward(self, module: nn.Module, layout: Layout) -> None:
        self.calls.append("after_backward")

    def after_step(self, module: nn.Module, layout: Layout) -> None:
        self.calls.append("after_step")


def test_a_strategy_is_called_once_per_hook_at_its_place_in_a_step() -> None:
    strategy = RecordingStrategy()
    session = Session.from_config(ALONE, TrainConfig(device="cpu"))
    model = parallelize(tiny_model("gru"), parallelism(session.layout, sync=strategy), ALONE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = step_batches()[0]
    for half, last in ((0, False), (1, True)):  # two accumulation micro-steps
        share = replica_share(batch, 2, half)
        session.forward_backward(model, share.tokens, share.targets, sync=last)
    session.clip_gradients(model, optimizer, 1.0)
    session.step(optimizer, model)
    assert strategy.calls == ["wrap", "skipping", "after_backward", "after_step"]


def test_the_session_uses_the_configured_strategy() -> None:
    session = Session.from_config(ALONE, TrainConfig(device="cpu", sync="allreduce"))
    model = session.prepare(tiny_model("gru"))
    assert isinstance(model.strategy, AllReduceEveryStep)


def test_an_unknown_strategy_is_a_user_error() -> None:
    with pytest.raises(ShardwiseError, match="--sync nope: choose one of allreduce"):
        sync_strategy("nope")
    with pytest.raises(ValueError, match="sync"):
        TrainConfig(sync="nope")
