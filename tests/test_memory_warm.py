"""What runs once before a rank's memory baseline is taken: the model's own code on a tiny batch,
and each technique's code on a toy, so that what that code costs a process once (its imports,
the autograd engine, kernels' tables) is the baseline's and not counted as the run's state.
The model run leaves no trace; after the techniques' warm-up, applying them loads nothing new."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from ranks import run_ranks
from shardwise.distributed import DistEnv
from shardwise.memory.activations import run_once
from shardwise.models import TransformerLM
from shardwise.models.contract import ModelContract

pytestmark = pytest.mark.timeout(120)


class Counted(nn.Module):
    """A Transformer that counts its forwards and keeps a buffer its forward changes."""

    def __init__(self) -> None:
        super().__init__()
        self.lm = TransformerLM(vocab_size=32, dim=16, num_layers=1, num_heads=2, max_len=32)
        self.register_buffer("calls", torch.zeros(()))
        self.backwards = 0

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.lm(tokens)
        if out.requires_grad:
            out.register_hook(self._backward)
        return out

    def _backward(self, grad: torch.Tensor) -> None:
        self.backwards += 1


def test_the_model_runs_once_and_leaves_no_trace() -> None:
    model = Counted().eval()
    head = next(model.parameters())
    head.grad = torch.full_like(head, 3.0)  # a gradient of the caller's stays as it was
    rng = torch.get_rng_state()
    run_once(model, ModelContract())
    assert model.backwards == 1  # forward, loss and backward ran
    assert model.calls.item() == 0  # its buffers are as they were
    assert not model.training
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(head.grad, torch.full_like(head, 3.0))
    assert all(p.grad is None for p in list(model.parameters())[1:])


def _loaded_by(build) -> list[str]:
    before = set(sys.modules)
    build()
    return sorted(name for name in set(sys.modules) - before if name.startswith("torch"))


def warmed_then_applied(env: DistEnv) -> dict[str, list[str]]:
    from torch.nn.parallel import DistributedDataParallel

    from shardwise.parallel.mesh import Layout
    from shardwise.parallel.sync import sync_strategy
    from shardwise.techniques.pipeline import warm as warm_pipeline
    from shardwise.techniques.sync import warm as warm_sync

    layout = Layout(dp=2).build(env)
    found = {
        "sync warm": _loaded_by(lambda: warm_sync(sync_strategy("allreduce"), layout)),
        "pipeline warm": _loaded_by(lambda: warm_pipeline(None, layout)),
    }

    def apply() -> None:
        from torch.distributed import pipelining  # noqa: F401

        wrapped = DistributedDataParallel(nn.Linear(8, 8), gradient_as_bucket_view=True)
        wrapped(torch.ones(2, 8)).sum().backward()

    found["applied after"] = _loaded_by(apply)
    return found


@pytest.mark.distributed
def test_after_the_warm_up_applying_ddp_and_the_pipeline_loads_nothing_new() -> None:
    for found in run_ranks(warmed_then_applied, world=2, timeout_s=90):
        # The warm-ups did load what the techniques need (so this check could fail)...
        assert "torch.distributed.pipelining" in found["pipeline warm"]
        assert found["sync warm"], "DDP's first step loaded nothing: nothing to warm"
        # ...and once they have, the run's own DDP and pipeline load nothing more.
        assert found["applied after"] == []
