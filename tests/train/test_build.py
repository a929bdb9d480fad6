"""The builder the preflight, the dry run and the workers share: one corpus, model and cut."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from helpers import quick_config
from shardwise.data.batch import collate
from shardwise.errors import ShardwiseError
from shardwise.train.build import (
    load_corpus,
    pipeline_cut,
    profile_sample,
    seeded_model,
    step_groups,
)


def test_one_stage_needs_no_plan(corpus: Path, tmp_path: Path) -> None:
    config = quick_config(corpus, tmp_path / "run")
    assert pipeline_cut(config, load_corpus(config)) is None


def test_given_split_points_are_kept(corpus: Path, tmp_path: Path) -> None:
    config = quick_config(corpus, tmp_path / "run", pp=2, split_points=["blocks.1"])
    plan = pipeline_cut(config, load_corpus(config))
    assert plan is not None and plan.cuts == ["blocks.1"]


def test_a_profiled_cut_is_remembered_and_reused(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHARDWISE_CACHE", str(tmp_path / "cache"))
    config = quick_config(corpus, tmp_path / "run", pp=2, microbatches=2)
    corpus_ = load_corpus(config)
    first = pipeline_cut(config, corpus_)
    assert first is not None
    entries = list((tmp_path / "cache" / "cuts").glob("*.json"))
    assert [json.loads(entry.read_text()) for entry in entries] == [first.cuts]
    # Whatever the next profile would say, the remembered cut decides.
    other = ["head"] if first.cuts != ["head"] else ["blocks.1"]
    entries[0].write_text(json.dumps(other))
    again = pipeline_cut(config, corpus_)
    assert again is not None and again.cuts == other


def test_too_many_stages_for_the_model_is_refused(corpus: Path, tmp_path: Path) -> None:
    config = quick_config(corpus, tmp_path / "run", pp=9, microbatches=9)
    with pytest.raises(ShardwiseError, match="--pp 9: model 'gru' has only"):
        pipeline_cut(config, load_corpus(config))


def test_the_profile_sample_is_the_first_batch_of_training_sequences(
    corpus: Path, tmp_path: Path
) -> None:
    config = quick_config(corpus, tmp_path / "run", batch_size=3)
    corpus_ = load_corpus(config)
    want = collate(corpus_.train[:3], step_tokens=1).tokens
    assert torch.equal(profile_sample(config, corpus_), want)


def test_the_model_is_the_same_on_every_call(corpus: Path, tmp_path: Path) -> None:
    config = quick_config(corpus, tmp_path / "run")
    one, two = seeded_model(config, 256), seeded_model(config, 256)
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_step_groups_give_grad_accum_batches_per_step_for_each_replica(
    corpus: Path, tmp_path: Path
) -> None:
    config = quick_config(corpus, tmp_path / "run", grad_accum=2)
    corpus_ = load_corpus(config)
    mine, theirs = (
        next(step_groups(config, corpus_, 2, replica, torch.device("cpu"))) for replica in (0, 1)
    )
    assert len(mine) == len(theirs) == 2
    assert mine[0].step_tokens == theirs[0].step_tokens  # both know the whole step's count
    assert not torch.equal(mine[0].tokens, theirs[0].tokens)


NESTED = "enable_nested_tensor is True"


@pytest.mark.parametrize(
    ("environ", "shown"),
    [
        ({}, True),  # the launcher's probe, or one process alone
        ({"RANK": "0"}, True),  # rank 0 of the user's torchrun: nothing probed before it
        ({"RANK": "1"}, False),
        ({"RANK": "0", "SHARDWISE_LAUNCHER_PID": "1"}, False),  # a worker of our launcher
    ],
)
def test_a_models_build_warnings_show_in_one_process_of_the_run(
    corpus: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    environ: dict[str, str],
    shown: bool,
) -> None:
    for name in ("RANK", "SHARDWISE_LAUNCHER_PID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    config = quick_config(corpus, tmp_path / "run", model="user_models:time_major_transformer")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seeded_model(config, 256)
    assert any(NESTED in str(warning.message) for warning in caught) == shown
