"""`shardwise.run` returns summary.json as a typed RunResult, which gives the trained model back;
and a plain script may call it with no `if __name__ == "__main__":` guard."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import shardwise
from helpers import quick_config, write_corpus
from shardwise.data.prepare import prepare_corpus
from shardwise.report.result import RunResult

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[shardwise.TrainConfig, RunResult]:
    """One quick single-process run, shared by the tests that only read its result."""
    folder = tmp_path_factory.mktemp("api")
    corpus = write_corpus(folder / "corpus.txt")
    # corpus_cache off: the autouse fixture that keeps the cache private is function-scoped.
    config = quick_config(corpus, folder / "run", nproc=1, corpus_cache=False)
    result = shardwise.run(config)
    assert isinstance(result, RunResult)
    return config, result


def test_the_result_is_summary_json_field_by_field(
    finished: tuple[shardwise.TrainConfig, RunResult],
) -> None:
    config, result = finished
    on_disk = json.loads((config.run_dir / "summary.json").read_text())
    assert [field.name for field in dataclasses.fields(RunResult)] == list(on_disk)
    assert result.to_summary() == on_disk
    assert (result.steps, result.world_size, result.model) == (3, 1, "gru")
    assert result.run_dir == config.run_dir
    assert result.peak_rss_bytes == tuple(on_disk["peak_rss_bytes"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.steps = 4  # type: ignore[misc]


def test_load_model_gives_the_trained_weights_and_their_held_out_loss(
    finished: tuple[shardwise.TrainConfig, RunResult],
) -> None:
    config, result = finished
    model = result.load_model()
    saved = load_file(str(config.run_dir / "model.safetensors"))
    state = model.state_dict()
    assert state.keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
    held_out = prepare_corpus(
        config.data, config.max_len, config.long_sequences, config.eval_fraction, config.seed
    ).eval
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for sequence in held_out:
            ids = torch.as_tensor(sequence, dtype=torch.long)[None]
            logits = model(ids[:, :-1])
            loss_sum += float(F.cross_entropy(logits[0], ids[0, 1:], reduction="sum"))
            tokens += ids.shape[1] - 1
    assert result.eval_loss is not None
    assert loss_sum / tokens == pytest.approx(result.eval_loss, rel=1e-4)


@pytest.mark.parametrize("change", ["missing", "unknown"])
def test_a_summary_that_does_not_match_the_fields_is_refused(
    finished: tuple[shardwise.TrainConfig, RunResult], change: str
) -> None:
    summary = finished[1].to_summary()
    if change == "missing":
        del summary["eval_loss"]
        expected = r"missing \['eval_loss'\], unknown \[\]"
    else:
        summary["new_figure"] = 1.0
        expected = r"missing \[\], unknown \['new_figure'\]"
    with pytest.raises(ValueError, match=expected):
        RunResult.from_summary(summary)


# No main guard: were the workers started by importing this script again (as spawning a function
# does), each would start the run anew. Each import of it leaves a line in imports.txt.
SCRIPT = """
    import sys
    from pathlib import Path

    import shardwise
    from helpers import quick_config

    with open("imports.txt", "a") as imports:
        print("imported", file=imports)
    corpus, run_dir = Path(sys.argv[1]), Path(sys.argv[2])
    result = shardwise.run(quick_config(corpus, run_dir, nproc=2, device="cpu"))
    print("result:", result.world_size, result.steps, result.eval_loss)
"""


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_a_script_without_a_main_guard_runs_two_workers_once(corpus: Path, tmp_path: Path) -> None:
    (tmp_path / "train_script.py").write_text(textwrap.dedent(SCRIPT))
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "train_script.py", str(corpus), str(tmp_path / "run")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "imports.txt").read_text().splitlines() == ["imported"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    last = result.stdout.strip().splitlines()[-1]
    assert last == f"result: 2 3 {summary['eval_loss']}"
