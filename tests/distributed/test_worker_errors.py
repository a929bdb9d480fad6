"""An exception raised inside a worker reaches the user as its root cause, in one line."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Each factory or forward fails only inside a worker ("RANK" is set there), so the launcher's
# own checks before the start pass and the failure has to travel back from the worker.
USER_MODULE = textwrap.dedent("""
    import os

    from shardwise.models import RecurrentLM


    def broken_factory(vocab_size):
        if "RANK" in os.environ:
            raise ValueError("my factory is broken")
        return RecurrentLM(vocab_size, embed_dim=16, hidden_dim=16, num_layers=1, cell="gru")


    class MisfitForward(RecurrentLM):
        def forward(self, tokens, lengths=None):
            # Training's batches (4 rows), not the probe a model of the user's gets first.
            if os.environ.get("RANK") == "1" and tokens.shape[0] == 4:
                raise TypeError("forward() does not fit these tokens")
            return super().forward(tokens, lengths)


    def misfit_forward(vocab_size):
        return MisfitForward(vocab_size, embed_dim=16, hidden_dim=16, num_layers=1, cell="gru")
""")


def train_cli(tmp_path: Path, corpus: Path, model: str, *extra: str) -> subprocess.CompletedProcess:
    """`shardwise train` on 2 CPU workers, from tmp_path so that `--model` finds usermod.py."""
    (tmp_path / "usermod.py").write_text(USER_MODULE)
    flags = "--nproc 2 --device cpu --max-steps 2 --max-len 32 --batching fixed --batch-size 4"
    command = [sys.executable, "-m", "shardwise", "train", "--model", model, "--data", str(corpus)]
    command += [*flags.split(), "--run-dir", str(tmp_path / "run"), "--no-tensorboard"]
    command += ["--sample-bytes", "0", "--timeout-s", "20", *extra]
    return subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=100, check=False
    )


def error_line(result: subprocess.CompletedProcess) -> str:
    """The launcher's last stderr line, once it has exited as a failed run."""
    assert result.returncode == 2, result.stderr
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.timeout(120)
def test_a_factory_that_raises_in_a_worker_is_the_one_line_error(
    corpus: Path, tmp_path: Path
) -> None:
    result = train_cli(tmp_path, corpus, "usermod:broken_factory")
    last = error_line(result)
    assert last.startswith("shardwise: error: model 'usermod:broken_factory'")
    assert "ValueError: my factory is broken" in last
    assert "see its output above" not in result.stderr
    # A user error is that one line alone: no traceback of ours or of the agent.
    assert "Traceback" not in result.stderr, result.stderr


@pytest.mark.timeout(120)
def test_a_forward_that_raises_is_the_error_with_its_traceback_once(
    corpus: Path, tmp_path: Path
) -> None:
    # A bug is retried like any failure (--max-restarts); here it must fail at once.
    result = train_cli(tmp_path, corpus, "usermod:misfit_forward", "--max-restarts", "0")
    assert error_line(result) == (
        "shardwise: error: worker rank 1 failed: TypeError: forward() does not fit these tokens"
    )
    # Not a user error of the kind we check for: the worker's traceback, printed exactly once,
    # and pointing into the user's own file.
    assert result.stderr.count("Traceback (most recent call last)") == 1, result.stderr
    assert "usermod.py" in result.stderr
