"""`--nnodes MIN:MAX`: the config's elastic range, its refusals, and the agent's settings."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from shardwise.agent import _agent, _launch_config
from shardwise.cli import build_parser
from shardwise.config import TrainConfig
from shardwise.distributed import ATTEMPT_ENV, attempt_number

MULTI = {"rdzv_endpoint": "10.0.0.1:29500"}


def test_a_range_sets_the_most_and_fewest_nodes_and_a_count_stays_a_count() -> None:
    elastic = TrainConfig(nnodes="1:2", **MULTI)
    assert (elastic.nnodes, elastic.min_nodes) == (2, 1)
    assert TrainConfig.model_validate_json(elastic.model_dump_json()) == elastic
    plain = TrainConfig(nnodes="2", **MULTI)
    assert (plain.nnodes, plain.min_nodes) == (2, None)
    args = build_parser().parse_args(["train", "--nnodes", "2:3", "--grad-accum", "6"])
    assert (args.nnodes, args.grad_accum) == ("2:3", "6")  # the config parses both


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"nnodes": "1:x"}, "nnodes '1:x' is neither N nor MIN:MAX"),
        ({"nnodes": "3:2"}, "--nnodes 3:2: MIN must not exceed MAX"),
        ({"nnodes": "1:2", "min_nodes": 2}, "nnodes '1:2' and min_nodes 2 disagree"),
        ({"nnodes": "1:2", "node_rank": 0}, "does not work with --node-rank"),
        ({"nnodes": "1:2", "dp": 2}, "does not work with --dp"),
        ({"nnodes": "1:2", "sync": "diloco"}, "does not work with --sync"),
        ({"nnodes": "1:2", "grad_compression": "powersgd"}, "with --grad-compression"),
        # On 2 of 3 nodes the 3 nodes' batch would be 1.5 micro-steps a rank.
        ({"nnodes": "2:3"}, "use a --grad-accum that is a multiple of 2"),
        ({"nnodes": "1:4", "grad_accum": 2}, "use a --grad-accum that is a multiple of 3"),
    ],
)
def test_ranges_that_cannot_keep_the_layout_or_the_global_batch_are_refused(
    values: dict, message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        TrainConfig(**MULTI, **values)


def test_ranges_whose_every_size_divides_the_full_batch_are_accepted() -> None:
    assert TrainConfig(nnodes="2:3", grad_accum=2, **MULTI).grad_accum == 2
    assert TrainConfig(nnodes="1:4", grad_accum=12, **MULTI).min_nodes == 1
    assert TrainConfig(nnodes="2:2", **MULTI).min_nodes == 2  # a range of one: not elastic


def test_the_agent_gets_the_range_and_short_waits_for_the_dead_and_the_late() -> None:
    elastic = _launch_config(1, "127.0.0.1:29500", nnodes=2, min_nodes=1)
    assert (elastic.min_nodes, elastic.max_nodes) == (1, 2)
    waits = ("keep_alive_interval", "keep_alive_max_attempt", "last_call_timeout")
    assert [elastic.rdzv_configs[key] for key in waits] == [2, 3, 5]
    fixed = _launch_config(1, "127.0.0.1:29500", nnodes=2)
    assert (fixed.min_nodes, fixed.max_nodes) == (2, 2)
    assert "last_call_timeout" not in fixed.rdzv_configs  # torch's own waits


def test_the_attempt_is_the_rendezvous_round_which_does_not_outlive_the_agent(
    monkeypatch,
) -> None:
    monkeypatch.delenv(ATTEMPT_ENV, raising=False)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # torchrun's own agent: its count
    assert attempt_number() == 1
    # Our rendezvous handler's round also counts a restart that admitted a late node.
    monkeypatch.setenv(ATTEMPT_ENV, "2")
    assert attempt_number() == 2
    with _agent(_launch_config(1, "127.0.0.1:29500"), nnodes=1):
        pass
    assert ATTEMPT_ENV not in os.environ  # a later run without the agent starts at attempt 0
