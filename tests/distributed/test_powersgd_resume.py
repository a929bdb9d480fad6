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


def run_jobs(*jobs: tuple) -> list[list[Trained]]:
    """Each job's per-rank results; every job is `(settings, steps, *sync_loop's other args)`."""
    ranks = run_ranks(sync_loops, world=2, args=(jobs,), timeout_s=240)
    return [list(results) for results in zip(*ranks, strict=True)]


@pytest.mark.parametrize("saved_after", [1, 3], ids=["in-warm-up", "compressing"])
def test_resumed_powersgd_equals_the_uninterrupted_run_bit_for_bit(
    saved_after: int, tmp_path: Path
) -> None:
    # Warm-up steps 0-1, compressed steps 2-5: saved before compression or one step into it.
    whole, _, resumed = run_jobs(  # in order: the save comes before the resume
        (POWERSGD, range(6)),
        (POWERSGD, range(saved_after), "adamw", tmp_path),
        (POWERSGD, range(saved_after, 6), "adamw", None, tmp_path / f"step_{saved_after:08d}"),
    )
    for mine, theirs in zip(resumed, whole, strict=True):
        assert_same_state(mine.state, theirs.state, atol=0)
    assert [r.losses for r in resumed] == [w.losses[saved_after:] for w in whole]


def test_another_data_parallel_degree_finds_no_error_feedback_of_its_own(tmp_path: Path) -> None:
    run_ranks(sync_loop, world=2, args=(POWERSGD, range(3), "adamw", tmp_path), timeout_s=240)
    path = tmp_path / "step_00000003"
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
        Session(env, config).prepare(tiny_model("gru"))
    except ShardwiseError as exc:
        return str(exc)
    return "prepared"


def test_powersgd_over_several_gloo_buckets_is_refused_in_one_line() -> None:
    messages = run_ranks(powersgd_refusal, world=2, timeout_s=120)
    for message in messages:
        assert message.startswith("--grad-compression powersgd on CPU (gloo): PyTorch's PowerSGD")
        assert "use --bucket-mb 1 or --grad-compression fp16" in message
