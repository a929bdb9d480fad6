"""The bytes each strategy hands to its collectives, measured on 2 gloo ranks, step by step.

Every figure is read from the strategy's `SyncTraffic` after a real step through the Session and
compared with a size computed here from the model's own parameters: the gradient's fp32 bytes
for DDP, half for fp16, PowerSGD's factor sizes after its warm-up, the parameters only at
local-SGD meetings, DiLoCo's pseudo-gradient at half width with `outer_bf16`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import metrics, quick_config, train
from parallel_cases import LR, replica_share, step_batches, tiny_model
from ranks import COLLECTIVE_TIMEOUT_S, run_ranks
from shardwise.config import TrainConfig
from shardwise.distributed import DistEnv
from shardwise.models import build_model
from shardwise.session import Session

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

Step = tuple[int, int, float]  # bytes, exchanges, seconds blocked after the step


def traffic_per_step(env: DistEnv, settings: dict[str, Any], steps: int) -> list[Step]:
    """Train `steps` steps with `settings`; what the strategy counted in each of them."""
    config = TrainConfig(device="cpu", timeout_s=COLLECTIVE_TIMEOUT_S, **settings)
    session = Session.from_config(env, config)
    model = session.prepare(tiny_model("gru"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    traffic = model.strategy.traffic
    batches, counted = step_batches(), []
    for step in range(steps):
        batch = batches[step % len(batches)]
        mine = replica_share(batch, session.layout.dp, session.layout.dp_rank)
        session.forward_backward(model, mine.tokens, mine.targets, step_tokens=batch.step_tokens)
        session.step(optimizer, model)
        optimizer.zero_grad()
        taken = traffic.take()
        counted.append((taken.bytes, taken.exchanges, taken.seconds))
    return counted


def traffic_jobs(env: DistEnv, jobs: tuple[tuple[dict[str, Any], int], ...]) -> list[list[Step]]:
    return [traffic_per_step(env, settings, steps) for settings, steps in jobs]


POWERSGD = {"grad_compression": "powersgd", "powersgd_rank": 2, "powersgd_warmup_steps": 2}
JOBS: dict[str, tuple[dict[str, Any], int]] = {
    "allreduce": ({"sync": "allreduce"}, 3),
    "fp16": ({"sync": "allreduce", "grad_compression": "fp16"}, 3),
    "powersgd": ({"sync": "allreduce", **POWERSGD}, 4),
    "local-sgd": ({"sync": "local-sgd", "sync_every": 2, "sync_warmup_steps": 1}, 5),
    "diloco": ({"sync": "diloco", "sync_every": 2}, 4),
    "diloco bf16": ({"sync": "diloco", "sync_every": 2, "outer_bf16": True}, 4),
}


@pytest.fixture(scope="module")
def measured() -> dict[str, list[list[Step]]]:
    """Per job, per rank, per step: one process start for every job."""
    ranks = run_ranks(traffic_jobs, world=2, args=(tuple(JOBS.values()),), timeout_s=240)
    return {name: [rank[job] for rank in ranks] for job, name in enumerate(JOBS)}


def parameters() -> list[torch.Tensor]:
    return list(tiny_model("gru").parameters())


def fp32_bytes() -> int:
    return sum(p.numel() for p in parameters()) * 4


def powersgd_bytes(rank: int) -> int:
    """What PowerSGD all-reduces for this model once warm: P (n x r) and Q (m x r) for each
    matrix worth compressing, every other gradient whole (PyTorch's rule, compression rate 2)."""
    elements = 0
    for param in parameters():
        n, m = param.reshape(param.shape[0], -1).shape
        r = min(n, m, rank)
        elements += (n + m) * r if (n + m) * r * 2 < n * m else n * m
    return elements * 4


def sent(steps: list[Step]) -> list[int]:
    return [step[0] for step in steps]


def test_ddp_sends_the_whole_fp32_gradient_every_step(measured: dict) -> None:
    for rank in measured["allreduce"]:
        assert sent(rank) == [fp32_bytes()] * 3
        assert all(exchanges >= 1 for _, exchanges, _ in rank)  # at least one bucket a step


def test_fp16_compression_sends_exactly_half(measured: dict) -> None:
    for rank in measured["fp16"]:
        assert sent(rank) == [fp32_bytes() // 2] * 3


def test_powersgd_sends_the_whole_bucket_in_warm_up_then_its_factors(measured: dict) -> None:
    warm = powersgd_bytes(rank=2)
    assert warm < fp32_bytes() / 2  # far fewer: the reason to use it
    for rank in measured["powersgd"]:
        assert sent(rank) == [fp32_bytes(), fp32_bytes(), warm, warm]


def test_local_sgd_sends_gradients_in_warm_up_then_parameters_only_at_meetings(
    measured: dict,
) -> None:
    # Step 0 is warm-up (a gradient all-reduce); local steps 1-4 meet after steps 2 and 4.
    for rank in measured["local-sgd"]:
        assert sent(rank) == [fp32_bytes(), 0, fp32_bytes(), 0, fp32_bytes()]
        assert [seconds > 0 for _, _, seconds in rank] == [False, False, True, False, True]


def test_diloco_sends_its_pseudo_gradient_at_half_width_with_outer_bf16(measured: dict) -> None:
    for fp32, bf16 in zip(measured["diloco"], measured["diloco bf16"], strict=True):
        assert sent(fp32) == [0, fp32_bytes(), 0, fp32_bytes()]
        assert sent(bf16) == [0, fp32_bytes() // 2, 0, fp32_bytes() // 2]


def test_a_run_reports_sync_traffic_per_rank_in_metrics_and_summary(
    corpus: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    config = quick_config(corpus, run, sync="local-sgd", sync_every=2, max_steps=4)
    summary = train(config, nproc=2)
    model = build_model(config.model, summary["vocab_size"])
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = metrics(run)  # one row a step; the replicas meet after steps 2 and 4
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    want = [[0.0, 0.0] if row["step"] % 2 else [float(model_bytes)] * 2 for row in rows]
    assert [row["sync_bytes_per_step"] for row in rows] == want
    for row in rows:
        assert len(row["rank_sync_s"]) == len(row["rank_sync_share"]) == 2
    assert summary["sync_bytes_per_step"] == [model_bytes * 2 / 4] * 2  # 2 meetings, 4 steps
    assert summary["sync_exchanges"] == [2, 2]
    assert all(seconds > 0 for seconds in summary["sync_time_s"])
    assert all(seconds > 0 for seconds in summary["compute_time_s"])
    assert summary["sync_staleness_histogram"] is None  # no asynchronous strategy here
    assert math.isfinite(summary["eval_loss"])
