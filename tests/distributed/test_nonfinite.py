"""A NaN loss on one rank stops the run in one line (or is skipped), never reaching a checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import final_weights, metrics
from shardwise.checkpoint import load_checkpoint
from shardwise.data.tokenize import VOCAB_SIZE
from shardwise.distributed import DistEnv
from shardwise.models import RecurrentLM

# Rank 1's third training forward returns NaN logits: its loss, and through the gradient
# all-reduce every rank's gradients, go non-finite at step 3 (one forward per step here).
USER_MODULE = textwrap.dedent("""
    import os

    import torch

    from shardwise.models import RecurrentLM


    class NaNAtStep3(RecurrentLM):
        calls = 0

        def forward(self, tokens, lengths=None):
            logits = super().forward(tokens, lengths)
            if self.training:
                self.calls += 1
                if os.environ.get("RANK") == "1" and self.calls == 3:
                    return logits * torch.nan
            return logits


    def nan_at_step_3(vocab_size):
        return NaNAtStep3(vocab_size, embed_dim=16, hidden_dim=16, num_layers=1, cell="gru")
""")
SMALL_RUN = ["--nproc", "2", "--device", "cpu", "--max-len", "32", "--batching", "fixed"]
SMALL_RUN += ["--batch-size", "4", "--no-tensorboard"]
ENV = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))


def train_cli(tmp_path: Path, corpus: Path, *flags: str) -> subprocess.CompletedProcess:
    """`shardwise train` of the NaN model on 2 CPU workers, a checkpoint every step."""
    (tmp_path / "usermod.py").write_text(USER_MODULE)
    command = [sys.executable, "-m", "shardwise", "train", "--model", "usermod:nan_at_step_3"]
    command += ["--data", str(corpus), "--run-dir", str(tmp_path / "run"), *flags]
    command += [*SMALL_RUN, "--checkpoint-every", "1", "--log-every", "1", "--timeout-s", "20"]
    return subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=100, check=False
    )


def checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    model = RecurrentLM(VOCAB_SIZE, embed_dim=16, hidden_dim=16, num_layers=1, cell="gru")
    optimizer = torch.optim.AdamW(model.parameters())
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)  # its groups as the run's were
    load_checkpoint(path, model, optimizer, ENV)
    return model.state_dict()


@pytest.mark.timeout(120)
def test_a_nan_loss_stops_the_run_in_one_line_before_any_checkpoint(
    corpus: Path, tmp_path: Path
) -> None:
    result = train_cli(tmp_path, corpus, "--max-steps", "5")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("shardwise: error: step 3: non-finite loss on rank 1 and "), last
    assert "gradient norm on ranks 0, 1" in last
    assert "--on-nonfinite skip" in last
    # Steps 1 and 2 were saved; step 3 was never applied, so nothing after it exists.
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(path.name for path in checkpoints.glob("step_*")) == [
        "step_00000001",
        "step_00000002",
    ]
    weights = checkpoint_weights(checkpoints / "step_00000002")
    assert all(torch.isfinite(value).all() for value in weights.values())


@pytest.mark.timeout(120)
def test_with_skip_the_nan_step_is_skipped_counted_and_leaves_the_weights_alone(
    corpus: Path, tmp_path: Path
) -> None:
    result = train_cli(tmp_path, corpus, "--max-steps", "4", "--on-nonfinite", "skip")
    assert result.returncode == 0, result.stderr
    assert "shardwise: warning: step 3: non-finite loss on rank 1" in result.stderr
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4
    assert summary["nonfinite_steps_skipped"] == 1
    rows = {row["step"]: row for row in metrics(run)}
    assert [rows[step]["nonfinite_steps_skipped"] for step in (1, 2, 3, 4)] == [0, 0, 1, 0]
    assert rows[3]["loss"] is None  # its only step was skipped: no loss was trained on
    assert all(rows[step]["loss"] > 0 for step in (1, 2, 4))
    # Skipped means untouched: no optimizer step (AdamW's momentum alone would move them).
    checkpoints = run / "checkpoints"
    before, after = (checkpoint_weights(checkpoints / f"step_0000000{n}") for n in (2, 3))
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, atol=0, rtol=0)
    assert all(torch.isfinite(value).all() for value in final_weights(run).values())
