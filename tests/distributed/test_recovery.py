"""A worker that dies mid-run is restarted by the agent and the run ends as if it never had."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from train_cli import assert_identical_weights, run_train, summary

# Rank 1 exits with status 7 at its second forward, at every attempt: restarting cannot help.
ALWAYS_FAILING_MODEL = textwrap.dedent("""
    import os

    from shardwise.models import RecurrentLM


    class FailsOnRankOne(RecurrentLM):
        calls = 0

        def forward(self, tokens, lengths=None):
            FailsOnRankOne.calls += 1
            if os.environ.get("RANK") == "1" and FailsOnRankOne.calls == 2:
                os._exit(7)
            return super().forward(tokens, lengths)


    def make(vocab_size):
        return FailsOnRankOne(vocab_size, embed_dim=16, hidden_dim=16, num_layers=1, cell="gru")
""")


@pytest.mark.timeout(300)
def test_a_killed_rank_is_restarted_and_the_run_ends_bit_identical(
    corpus: Path, tmp_path: Path
) -> None:
    flags = ("--max-steps", "8", "--checkpoint-every", "3")
    # The testing aid SIGKILLs rank 1 once it finished step 5, on the first attempt only.
    killed = run_train(corpus, tmp_path / "killed", *flags, SHARDWISE_TESTING_KILL="1:5")
    assert killed.returncode == 0, killed.stderr
    assert "Traceback" not in killed.stderr, killed.stderr
    assert "shardwise: restart 1 of 3: worker rank 1 exited without an error record" in (
        killed.stdout
    )
    [restart] = summary(tmp_path / "killed")["restarts"]
    assert restart["rank"] == 1
    assert "worker rank 1" in restart["reason"]
    assert restart["resumed_from_step"] == 3  # the newest checkpoint before the kill
    assert restart["steps_lost"] == 2  # steps 4 and 5, trained again
    done = summary(tmp_path / "killed")
    assert done["steps"] == 8
    # The whole run, both attempts, outlasts the last attempt's own training.
    assert done["wall_time_s_since_launch"] > done["wall_time_s"] > 0

    whole = run_train(corpus, tmp_path / "whole", *flags)
    assert whole.returncode == 0, whole.stderr
    assert summary(tmp_path / "whole")["restarts"] == []
    assert_identical_weights(tmp_path / "killed", tmp_path / "whole")


@pytest.mark.timeout(300)
def test_once_the_restarts_are_used_up_the_root_cause_is_the_error(
    corpus: Path, tmp_path: Path
) -> None:
    (tmp_path / "failing.py").write_text(ALWAYS_FAILING_MODEL)
    result = run_train(
        corpus,
        tmp_path / "run",
        *("--max-steps", "20", "--max-restarts", "1", "--model", "failing:make"),
        PYTHONPATH=str(tmp_path),
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "shardwise: error: worker rank 1 failed with exit code 7 and left no error record; look "
        "for a crash above (out of memory, a native library abort) (still failing after 1 "
        "restart(s), --max-restarts 1)"
    )
    assert "Traceback" not in result.stderr, result.stderr
    assert "restart 1 of 1: worker rank 1 exited without an error record" in result.stdout
