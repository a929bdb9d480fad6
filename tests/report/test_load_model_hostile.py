"""Loading a run someone else made: its run dir names code and paths, and neither is obeyed.

A run dir is input. Its summary names the model factory to import (as a pickle names a class)
and a run_dir; a hostile one names `evilmod:build` shipped beside it, or `http.server:test`, or
another run's folder. Each test here tried one of those through the documented loader.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import shardwise
from helpers import quick_config, write_corpus
from shardwise.errors import ShardwiseError
from shardwise.models import build_model
from shardwise.report.result import RunResult

EVIL = """
from pathlib import Path
Path(__file__).with_name("IMPORTED").write_text("evilmod ran")
def build(vocab_size=256):
    Path(__file__).with_name("CALLED").write_text("evilmod.build ran")
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real 3-step GRU run, copied by each test that changes it."""
    folder = tmp_path_factory.mktemp("trained")
    corpus = write_corpus(folder / "corpus.txt")
    config = quick_config(corpus, folder / "run", nproc=1, corpus_cache=False)
    assert shardwise.run(config) is not None
    return folder / "run"


@pytest.fixture
def run_dir(trained: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    rewrite(copy, run_dir=str(copy))  # a run dir's summary names the run dir itself
    return copy


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def rewrite(folder: Path, **changes: object) -> None:
    """Edit summary.json (and the model line of config.toml), as a hostile sender would."""
    summary = {**summary_of(folder), **changes}
    (folder / "summary.json").write_text(json.dumps(summary))
    if "model" in changes:
        config = folder / "config.toml"
        lines = [
            f"model = {json.dumps(changes['model'])}" if line.startswith("model =") else line
            for line in config.read_text().splitlines()
        ]
        config.write_text("\n".join(lines) + "\n")


def read_the_old_way(run_dir: Path) -> RunResult:
    """What the docstring showed: a summary read from disk, handed to from_summary."""
    return RunResult.from_summary(summary_of(run_dir))


def same_weights(model: torch.nn.Module, path: Path) -> bool:
    saved = load_file(str(path))
    state = model.state_dict()
    return state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)


@pytest.mark.timeout(30)
def test_a_factory_shipped_in_the_run_dir_is_never_imported(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: evilmod.py ran (the loader looks in the working directory, here the run dir).
    (run_dir / "evilmod.py").write_text(EVIL)
    rewrite(run_dir, model="evilmod:build")
    monkeypatch.chdir(run_dir)
    monkeypatch.syspath_prepend(str(run_dir))  # as `python -c` or a notebook started there
    for result in (read_the_old_way(run_dir), RunResult.read(run_dir)):
        with pytest.raises(ShardwiseError, match=r"'evilmod:build'.*load_model\(model="):
            result.load_model()
    # Named by the caller, it is still not taken from the run dir that shadows it.
    with pytest.raises(ShardwiseError, match=r"inside the run dir"):
        RunResult.read(run_dir).load_model(model="evilmod:build")
    assert not (run_dir / "IMPORTED").exists()
    assert "evilmod" not in sys.modules


@pytest.mark.timeout(30)
def test_a_factory_the_caller_did_not_name_is_never_called(run_dir: Path) -> None:
    # Before: http.server's test() opened a server on port 8000 and never returned.
    rewrite(run_dir, model="http.server:test")
    for result in (read_the_old_way(run_dir), RunResult.read(run_dir)):
        with pytest.raises(ShardwiseError) as refused:
            result.load_model()
        message = str(refused.value)
        assert "'http.server:test'" in message and "\n" not in message
        assert "load_model(model='http.server:test')" in message


@pytest.mark.timeout(30)
def test_the_weights_come_from_the_folder_given_not_the_summarys_run_dir(
    run_dir: Path, tmp_path: Path
) -> None:
    # Before: summary.json's run_dir pointed the loader at another run's weights.
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    weights = load_file(str(other / "model.safetensors"))
    save_file({k: torch.zeros_like(v) for k, v in weights.items()}, other / "model.safetensors")
    rewrite(other, run_dir=str(other), steps=99)  # another run, with its own summary
    rewrite(run_dir, run_dir=str(other))
    assert same_weights(RunResult.read(run_dir).load_model(), run_dir / "model.safetensors")
    with pytest.raises(ShardwiseError, match=r"RunResult.read"):
        read_the_old_way(run_dir).load_model()


@pytest.mark.timeout(30)
def test_a_relative_run_dir_in_the_summary_does_not_decide_where_to_read(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: "run" was read relative to the working directory, wherever that was.
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(run_dir, elsewhere / "run")
    weights = load_file(str(elsewhere / "run" / "model.safetensors"))
    ones = {k: torch.ones_like(v) for k, v in weights.items()}
    save_file(ones, elsewhere / "run" / "model.safetensors")
    rewrite(elsewhere / "run", run_dir="run", steps=7)
    rewrite(run_dir, run_dir="run")
    monkeypatch.chdir(elsewhere)
    assert same_weights(RunResult.read(run_dir).load_model(), run_dir / "model.safetensors")
    with pytest.raises(ShardwiseError, match=r"RunResult.read"):
        read_the_old_way(run_dir).load_model()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", ["model.safetensors", "summary.json"])
def test_a_pipe_in_the_run_dir_is_refused_not_waited_on(run_dir: Path, name: str) -> None:
    # Before: a FIFO as model.safetensors blocked the loader forever.
    path = run_dir / name
    path.unlink()
    os.mkfifo(path)
    assert stat.S_ISFIFO(path.stat().st_mode)
    with pytest.raises(ShardwiseError, match=rf"{name}: not a regular file"):
        RunResult.read(run_dir).load_model()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("vocab_size", [2**24, 2**40])
def test_a_vocabulary_the_weights_do_not_have_is_refused_before_building(
    run_dir: Path, vocab_size: int
) -> None:
    # Before: the model was built at the summary's vocabulary size, however large (2**40: an
    # allocation error's traceback; 2**24: 26 GB of GRU).
    rewrite(run_dir, vocab_size=vocab_size)
    with pytest.raises(ShardwiseError, match=rf"vocab_size {vocab_size}"):
        RunResult.read(run_dir).load_model()


@pytest.mark.timeout(30)
def test_a_builtin_needs_no_import(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shardwise.models as models

    def no_import(name: str) -> None:
        raise AssertionError(f"imported {name}")

    monkeypatch.setattr(models, "import_user_module", no_import)
    (run_dir / "gru.py").write_text(EVIL)  # a file named like the built-in is not it
    monkeypatch.chdir(run_dir)
    assert same_weights(RunResult.read(run_dir).load_model(), run_dir / "model.safetensors")
    assert not (run_dir / "IMPORTED").exists()


def user_model_run(run_dir: Path) -> None:
    """Turn the copied run into a run of tests/user_models.py's time_major_lstm."""
    import user_models

    model = user_models.time_major_lstm(vocab_size=summary_of(run_dir)["vocab_size"])
    save_file(model.state_dict(), run_dir / "model.safetensors")
    rewrite(run_dir, model="user_models:time_major_lstm")


@pytest.mark.timeout(30)
def test_a_user_model_loads_once_the_caller_names_it(run_dir: Path) -> None:
    import user_models

    user_model_run(run_dir)
    weights = run_dir / "model.safetensors"
    result = RunResult.read(run_dir)
    with pytest.raises(ShardwiseError, match=r"names the model factory 'user_models:time_major"):
        result.load_model()
    assert same_weights(result.load_model(model="user_models:time_major_lstm"), weights)
    assert same_weights(result.load_model(factory=user_models.time_major_lstm), weights)
    # The caller who ran the config named its model: shardwise.run passes it on like this.
    summary = summary_of(run_dir)
    vouched = RunResult.from_summary(summary, run_dir, model="user_models:time_major_lstm")
    assert same_weights(vouched.load_model(), weights)


@pytest.mark.timeout(30)
def test_weights_that_do_not_fit_the_named_model_are_one_line(run_dir: Path) -> None:
    with pytest.raises(ShardwiseError, match=r"do not fit") as refused:
        RunResult.read(run_dir).load_model(factory=lambda: build_model("lstm"))
    assert "\n" not in str(refused.value)


@pytest.mark.timeout(60)
def test_the_model_the_caller_ran_loads_without_naming_it_again(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus.txt")
    config = quick_config(
        corpus, tmp_path / "run", nproc=1, corpus_cache=False, model="user_models:odd_names"
    )
    result = shardwise.run(config)
    assert result is not None
    assert same_weights(result.load_model(), tmp_path / "run" / "model.safetensors")
