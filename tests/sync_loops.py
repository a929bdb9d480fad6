"""An own loop on `Session` for comparing synchronisation strategies, run on gloo ranks.

    ranks = run_ranks(sync_loops, world=2, args=((settings, range(4)),))

Each worker trains over the fixed batches of parallel_cases, cycled; every replica returns its
own weights, since under local SGD and DiLoCo replicas differ between meetings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from parallel_cases import LR, Trained, replica_share, step_batches, tiny_model
from ranks import COLLECTIVE_TIMEOUT_S
from shardwise.config import TrainConfig
from shardwise.distributed import DistEnv
from shardwise.session import Session


def sync_loop(
    env: DistEnv,
    settings: dict[str, Any],
    steps: range,
    optimizer_name: str = "adamw",
    save_to: Path | None = None,
    load_from: Path | None = None,
    finish: bool = False,
) -> Trained:
    """Train `steps` (indices into the cycled batches); optionally resume first, save last."""
    config = TrainConfig(device="cpu", timeout_s=COLLECTIVE_TIMEOUT_S, **settings)
    session = Session.from_config(env, config)
    model = session.prepare(tiny_model("gru"))
    if optimizer_name == "sgd":  # plain SGD: no momentum, so averaging commutes with the update
        optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    if load_from is not None:
        assert session.load(load_from, model, optimizer).step == steps.start
    batches = step_batches()
    trained = Trained(state={})
    for step in steps:
        batch = batches[step % len(batches)]
        mine = replica_share(batch, session.layout.dp, session.layout.dp_rank)
        loss = session.forward_backward(
            model, mine.tokens, mine.targets, step_tokens=batch.step_tokens
        )
        session.clip_gradients(model, optimizer, 0.0)
        session.step(optimizer, model)
        optimizer.zero_grad()
        trained.losses.append(float(loss))
    if finish:
        session.finish(model)
    trained.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if save_to is not None:
        session.save(save_to, model, optimizer, step=steps.stop)
    return trained


def sync_loops(env: DistEnv, jobs: tuple[tuple, ...]) -> list[Trained]:
    """Several `sync_loop`s one after another on the same ranks (one process start for all)."""
    return [sync_loop(env, *job) for job in jobs]
