"""PowerSGD resumed from a checkpoint continues exactly as the uninterrupted run (2 gloo ranks).

Each replica's own error feedback is saved, the warm-up is not run again, and the state survives
the resumed DDP's first step laying its bucket out in parameter order, where the saved run's
later steps had it in the order gradients became ready (DDP cuts its buckets anew after step 1).
Only one bucket: PowerSGD's hook on gloo with several buckets mismatches its collectives
across ranks, in PyTorch itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import final_weights, quick_config, train
from parallel_cases import Trained, assert_same_state, tiny_model
from ranks import run_ranks
from shardwise.config import TrainConfig
from shardwise.distributed import DistEnv
from shardwise.errors import ShardwiseError
from shardwise.session import Session
from sync_loops import sync_loop, sync_loops

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]

POWERSGD = {"grad_compression": "powersgd", "powersgd_rank": 2, "powersgd_warmup_steps": 2}


SAVED_AFTER = {"in-warm-up": 1, "compressing": 3}


def jobs_then_refusal(env: DistEnv, jobs: tuple[tuple, ...]) -> tuple[list[Trained], str]:
    """`sync_loops(jobs)`, then the refusal of several gloo buckets: one process start for all."""
    return sync_loops(env, jobs), powersgd_refusal(env)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Every 2-rank run of this module in one process start: the uninterrupted 6 steps, and for
    each save point a run saved there and one resumed from it; then the refusal's message."""
    saves = tmp_path_factory.mktemp("powersgd")
    jobs: list[tuple] = [(POWERSGD, range(6))]
    for saved_after in SAVED_AFTER.values():  # in order: each save comes before its resume
        jobs.append((POWERSGD, range(saved_after), "adamw", saves))
        jobs.append((POWERSGD, range(saved_after, 6), "adamw", None, saves / step_dir(saved_after)))
    ranks = run_ranks(jobs_then_refusal, world=2, args=(tuple(jobs),), timeout_s=240)
    results = [list(trained) for trained in zip(*(rank[0] for rank in ranks), strict=True)]
    return {
        "whole": results[0],
        "resumed": {after: results[2 + 2 * i] for i, after in enumerate(SAVED_AFTER.values())},
        "saves": saves,
        "refusals": [rank[1] for rank in ranks],
    }


def step_dir(step: int) -> str:
    return f"step_{step:08d}"


@pytest.mark.parametrize("saved_after", SAVED_AFTER.values(), ids=SAVED_AFTER.keys())
def test_resumed_powersgd_equals_the_uninterrupted_run_bit_for_bit(
    saved_after: int, two_ranks: dict
) -> None:
    # Warm-up steps 0-1, compressed steps 2-5: saved before compression or one step into it.
    whole, resumed = two_ranks["whole"], two_ranks["resumed"][saved_after]
    for mine, theirs in zip(resumed, whole, strict=True):
        assert_same_state(mine.state, theirs.state, atol=0)
    assert [r.losses for r in resumed] == [w.losses[saved_after:] for w in whole]


def test_another_data_parallel_degree_finds_no_error_feedback_of_its_own(two_ranks: dict) -> None:
    # The checkpoint 2 ranks saved after 3 steps (PowerSGD, AdamW), loaded on 3 ranks.
    path = two_ranks["saves"] / step_dir(3)
    refusal = r"holds no sync\.powersgd\.dp\dof3\.\S+ for .* degree that saved it"
    with pytest.raises(Exception, match=refusal):
        run_ranks(sync_loop, world=3, args=(POWERSGD, range(3, 4), "adamw", None, path))


def test_a_powersgd_run_resumes_exactly_and_refuses_what_would_lose_its_state(
    corpus: Path, tmp_path: Path
) -> None:
    settings = {**POWERSGD, "max_steps": 5, "checkpoint_every": 3}
    train(quick_config(corpus, tmp_path / "whole", **settings), nproc=2)
    checkpoint = tmp_path / "whole" / "checkpoints" / "step_00000003"
    again = quick_config(corpus, tmp_path / "again", **settings, resume=checkpoint)
    with pytest.raises(ShardwiseError, match="error feedback of 2 data-parallel replicas"):
        train(again, nproc=1)
    with pytest.raises(ShardwiseError, match="powersgd_rank was 2, now 4"):
        train(again.model_copy(update={"powersgd_rank": 4}), nproc=2)
    assert train(again, nproc=2)["steps"] == 5
    assert_same_state(final_weights(tmp_path / "again"), final_weights(tmp_path / "whole"), atol=0)


def powersgd_refusal(env: DistEnv) -> str:
    """The error preparing PowerSGD with buckets far smaller than the model's gradients."""
    config = TrainConfig(device="cpu", grad_compression="powersgd", bucket_mb=0.001)
    try:
        Session.from_config(env, config).prepare(tiny_model("gru"))
    except ShardwiseError as exc:
        return str(exc)
    return "prepared"


def test_powersgd_over_several_gloo_buckets_is_refused_in_one_line(two_ranks: dict) -> None:
    for message in two_ranks["refusals"]:
        assert message.startswith("--grad-compression powersgd on CPU (gloo): PyTorch's PowerSGD")
        assert "use --bucket-mb 1 or --grad-compression fp16" in message
