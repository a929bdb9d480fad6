"""Transparency: pipeline training on 2 and 4 gloo ranks computes what one process computes."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

from parallel_cases import (
    CLIP,
    CUTS,
    assert_ranks_match,
    layout_for,
    parallelism,
    step_batches,
    tiny_model,
    train_layout,
    train_single,
)
from ranks import run_ranks
from shardwise.distributed import DistEnv
from shardwise.loss import token_loss_sum
from shardwise.parallel.mesh import DIMS, MODEL
from shardwise.parallel.parallelize import parallelize
from shardwise.parallel.stages import split_into_stages

CASES = [(kind, schedule) for kind in ("lstm", "transformer") for schedule in ("gpipe", "1f1b")]


def stock_pipelining_on_an_lstm(env: DistEnv) -> str:
    """torch.distributed.pipelining alone, on an LSTM cut in two: the error it raises."""
    stage = split_into_stages(tiny_model("lstm"), CUTS[2])[env.rank]
    schedule = ScheduleGPipe(
        PipelineStage(stage, env.rank, 2, env.device),
        n_microbatches=4,
        loss_fn=lambda logits, targets: F.cross_entropy(logits.flatten(0, 1), targets.flatten()),
    )
    batch = step_batches()[0]
    try:
        schedule.step(batch.tokens) if env.rank == 0 else schedule.step(target=batch.targets)
    except RuntimeError as error:
        return str(error)
    return "no error"


def bfloat16() -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def two_stage_worker(env: DistEnv) -> dict[Any, Any]:
    results: dict[Any, Any] = {"stock": stock_pipelining_on_an_lstm(env)}
    for kind, schedule in CASES:
        # LSTM steps pad lengths up to buckets of 8 (8, 16, 16, 8); Transformer steps run exact.
        bucket = 8 if kind == "lstm" else 1
        results[kind, schedule] = train_layout(
            env, kind, {"pp": 2}, schedule=schedule, length_bucket=bucket
        )
    results["bf16"] = train_layout(env, "transformer", {"pp": 2}, autocast=bfloat16)
    model = tiny_model("transformer")
    setting = parallelism(layout_for(env, pp=2), cuts=CUTS[2], microbatches=4)
    prepared = parallelize(model, setting, env)
    evaluated, first = step_batches()[1], step_batches()[0]
    results["eval"] = float(prepared.evaluate(evaluated.tokens, evaluated.targets))
    owned = prepared.forward_backward(first.tokens, first.targets, first.step_tokens)
    results["share"] = float(owned) / first.step_tokens
    results["released"] = {name for name, p in model.named_parameters() if p.is_meta}
    results["kept"] = {name for name, _ in prepared.named_parameters()}
    return results


def four_rank_worker(env: DistEnv) -> dict[str, Any]:
    layout = layout_for(env, dp=2, pp=2)
    return {
        "groups": {d: dist.get_process_group_ranks(layout.group(d)) for d in (*DIMS, MODEL)},
        "dp2xpp2 lstm 1f1b": train_layout(env, "lstm", {"dp": 2, "pp": 2}, schedule="1f1b"),
        "dp2xpp2 transformer gpipe": train_layout(
            env, "transformer", {"dp": 2, "pp": 2}, schedule="gpipe", microbatches=2
        ),
        "pp4 gru gpipe": train_layout(env, "gru", {"pp": 4}, schedule="gpipe"),
    }


@pytest.fixture(scope="module")
def two_stages() -> list[dict[Any, Any]]:
    return run_ranks(two_stage_worker, world=2, timeout_s=60)


@pytest.fixture(scope="module")
def four_ranks() -> list[dict[str, Any]]:
    return run_ranks(four_rank_worker, world=4, timeout_s=80)


@pytest.mark.timeout(90)
def test_stock_pipelining_fails_to_send_an_lstm_output_over_gloo(
    two_stages: list[dict[Any, Any]],
) -> None:
    # The failure StagePipeline exists to fix: an LSTM's batch_first output is a transposed view.
    assert "contiguous" in two_stages[0]["stock"] or "contiguous" in two_stages[1]["stock"]


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("kind", "schedule"), CASES)
def test_two_stages_train_exactly_like_one_process(
    two_stages: list[dict[Any, Any]], kind: str, schedule: str
) -> None:
    reference = train_single(kind)
    assert_ranks_match([result[kind, schedule] for result in two_stages], reference)
    assert min(reference.norms) > CLIP  # every step really clipped


@pytest.mark.timeout(90)
def test_each_stage_holds_only_its_own_parameters(two_stages: list[dict[Any, Any]]) -> None:
    first, second = (result["lstm", "gpipe"].state for result in two_stages)
    names = tiny_model("lstm").state_dict()
    assert set(first) == {name for name in names if name.startswith(("embed.", "blocks.0."))}
    assert set(second) == set(names) - set(first)


@pytest.mark.timeout(90)
def test_bf16_autocast_runs_through_the_stages(two_stages: list[dict[Any, Any]]) -> None:
    # bf16 rounds differently per micro-batch, so compare with fp32 training loosely.
    reference = train_single("transformer")
    for rank in two_stages:
        assert rank["bf16"].losses == pytest.approx(reference.losses, rel=1e-3)
    merged = {**two_stages[0]["bf16"].state, **two_stages[1]["bf16"].state}
    for name, value in reference.state.items():
        torch.testing.assert_close(merged[name], value, atol=2e-2, rtol=0, msg=name)


@pytest.mark.timeout(90)
def test_the_model_keeps_memory_only_for_this_ranks_stage(
    two_stages: list[dict[Any, Any]],
) -> None:
    names = set(tiny_model("transformer").state_dict())
    for result in two_stages:
        assert result["released"] == names - result["kept"]
    assert two_stages[0]["kept"] | two_stages[1]["kept"] == names


@pytest.mark.timeout(90)
def test_evaluate_gives_the_summed_token_loss_on_the_last_stage_only(
    two_stages: list[dict[Any, Any]],
) -> None:
    batch = step_batches()[1]
    with torch.no_grad():
        want = float(token_loss_sum(tiny_model("transformer")(batch.tokens), batch.targets))
    assert [result["eval"] for result in two_stages] == pytest.approx([0.0, want], rel=1e-5)


@pytest.mark.timeout(90)
def test_owned_loss_sums_are_the_loss_on_the_last_stage_only(
    two_stages: list[dict[Any, Any]],
) -> None:
    first_loss = train_single("transformer").losses[0]
    assert two_stages[0]["share"] == 0.0  # only the last stage holds the loss
    assert two_stages[1]["share"] == pytest.approx(first_loss, rel=1e-5)


@pytest.mark.timeout(120)
def test_dp_by_pp_mesh_groups_ranks_as_documented(four_ranks: list[dict[str, Any]]) -> None:
    # Rank r = (pp_rank * dp + dp_rank): stages are ranks {0, 1} and {2, 3}.
    assert [result["groups"] for result in four_ranks] == [
        {"pp": [0, 2], "dp": [0, 1], "tp": [0], "model": [0, 2]},
        {"pp": [1, 3], "dp": [0, 1], "tp": [1], "model": [1, 3]},
        {"pp": [0, 2], "dp": [2, 3], "tp": [2], "model": [0, 2]},
        {"pp": [1, 3], "dp": [2, 3], "tp": [3], "model": [1, 3]},
    ]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("case", "kind"),
    [
        ("dp2xpp2 lstm 1f1b", "lstm"),
        ("dp2xpp2 transformer gpipe", "transformer"),
        ("pp4 gru gpipe", "gru"),
    ],
)
def test_four_ranks_train_exactly_like_one_process(
    four_ranks: list[dict[str, Any]], case: str, kind: str
) -> None:
    assert_ranks_match([result[case] for result in four_ranks], train_single(kind))
