"""--eval-every: the held-out loss during training, on its steps' rows, alike on 1 and 2 ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import metrics, quick_config, train
from train_cli import run_train

pytestmark = pytest.mark.timeout(240)


def test_held_out_loss_every_n_steps_does_not_depend_on_the_ranks(
    corpus: Path, tmp_path: Path
) -> None:
    # 2 ranks of 4 sequences train what 1 rank of 8 trains, so their held-out losses agree.
    flags = {"eval_every": 2, "eval_tokens": 600, "max_steps": 5, "log_every": 3}
    one = train(quick_config(corpus, tmp_path / "one", batch_size=8, **flags), nproc=1)
    cli = ("--eval-every", "2", "--eval-tokens", "600", "--max-steps", "5", "--log-every", "3")
    two = run_train(corpus, tmp_path / "two", *cli)
    assert two.returncode == 0, two.stderr

    one_rows, two_rows = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    # Step 2 and 4 evaluate without being logging steps: their rows close the window there.
    assert [row["step"] for row in two_rows] == [2, 3, 4, 5]
    assert [row["step"] for row in two_rows if "eval_loss" in row] == [2, 4, 5]
    for a, b in zip(one_rows, two_rows, strict=True):
        assert a.keys() == b.keys()
        if "eval_loss" in a:
            assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-4)
    assert one_rows[0]["eval_loss"] > one_rows[-1]["eval_loss"]  # it learns: the points move

    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["eval_loss"] == two_rows[-1]["eval_loss"]  # the last step's, not redone
    assert 0 < summary["eval_tokens"] <= 600 < summary["eval_tokens_available"]
    assert one["eval_tokens"] == summary["eval_tokens"]
    assert "evaluating held-out loss at step 2: 0/" in two.stdout
    assert two.stdout.count(" held-out tokens, ") == 3  # each result, the last one once
